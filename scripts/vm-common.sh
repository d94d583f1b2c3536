#!/usr/bin/env bash
# vm-common.sh: sourced by the VM test scripts (nbd-kernel-vm.sh, xen-e2e.sh).
#   debian_kernel DIR        Debian's current amd64 kernel (the package linux-image-amd64
#                            depends on), fetched once: DIR/vmlinuz and
#                            DIR/root/lib/modules/<version>/ (kept across runs)
#   debian_kernel_version DIR  the module directory's name, e.g. 6.1.0-41-amd64
#   plain_module DIR NAME OUT  module NAME (e.g. nbd, xen-blkfront) decompressed to OUT
#   apt_download PKG DIR     a package's .deb into DIR (refreshing stale package lists)
#   strip_copy SRC DEST      a binary without its debug info (TCG unpacks every initramfs byte)
#   pack_cpio DIR            DIR as a newc cpio archive on stdout
# shellcheck shell=bash

# apt_download PKG DIR: the package's .deb into DIR; when the mirror no longer has the version
# the local package lists name, the lists are refreshed and the download tried once more.
apt_download() {
    (cd "$2" && apt-get download -qq "$1" >/dev/null 2>&1) && return 0
    apt-get update -qq >&2 || true
    (cd "$2" && apt-get download -qq "$1" >/dev/null)
}

debian_kernel() {
    local dir=$1 pkg
    if [ -f "$dir/vmlinuz" ] && [ -d "$dir/root/lib/modules" ]; then
        return 0
    fi
    kernel_pkg() { apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'; }
    pkg=$(kernel_pkg)
    if [ -z "$pkg" ]; then
        apt-get update -qq >&2 || true
        pkg=$(kernel_pkg)
    fi
    [ -n "$pkg" ] || { echo "debian-kernel: no linux-image package known to apt" >&2; return 1; }
    rm -rf "$dir" && mkdir -p "$dir/deb"
    apt_download "$pkg" "$dir/deb" || return 1
    dpkg-deb -x "$dir"/deb/*.deb "$dir/root" || return 1
    # usr-merged packages ship /usr/lib/modules; keep one path.
    if [ ! -d "$dir/root/lib/modules" ] && [ -d "$dir/root/usr/lib/modules" ]; then
        mkdir -p "$dir/root/lib" && mv "$dir/root/usr/lib/modules" "$dir/root/lib/modules"
    fi
    cp "$(ls "$dir"/root/boot/vmlinuz-*)" "$dir/vmlinuz.tmp" && mv "$dir/vmlinuz.tmp" "$dir/vmlinuz"
    rm -rf "$dir/deb"
}

debian_kernel_version() {
    find "$1/root/lib/modules" -mindepth 1 -maxdepth 1 -type d -printf '%f\n' | head -n1
}

plain_module() {
    local dir=$1 name=$2 out=$3 ko
    ko=$(find "$dir/root/lib/modules" -name "$name.ko*" | head -n1)
    [ -n "$ko" ] || { echo "debian-kernel: no module $name" >&2; return 1; }
    case $ko in
        *.ko.xz) xz -dc "$ko" >"$out" ;;
        *.ko.zst) zstd -qdc "$ko" >"$out" ;;
        *) cp "$ko" "$out" ;;
    esac
}

strip_copy() {
    strip -o "$2" "$1" 2>/dev/null || cp "$1" "$2"
}

pack_cpio() {
    (cd "$1" && find . | cpio -o -H newc --quiet)
}
