#!/usr/bin/env bash
# vm-common.sh: sourced by the VM test scripts (nbd-kernel-vm.sh, torture-powercut-vm.sh,
# xen-e2e.sh, bench-xen.sh).
#   debian_kernel DIR        Debian's current amd64 kernel (the package linux-image-amd64
#                            depends on), fetched once: DIR/vmlinuz and
#                            DIR/root/lib/modules/<version>/ (kept across runs)
#   debian_kernel_version DIR  the module directory's name, e.g. 6.1.0-41-amd64
#   plain_module DIR NAME OUT  module NAME (e.g. nbd, xen-blkfront) decompressed to OUT
#   apt_download PKG DIR     a package's .deb into DIR (refreshing stale package lists)
#   strip_copy SRC DEST      a binary without its debug info (TCG unpacks every initramfs byte)
#   pack_cpio DIR            DIR as a newc cpio archive on stdout
#   initramfs_add_bin ROOT SRC DEST  SRC stripped into ROOT at DEST, with the shared
#                            libraries it loads at their own paths
#   init_preamble            the first lines of a busybox /init (applets, PATH, /proc, /sys,
#                            /dev, tmpfs /run and /tmp), on stdout
#   boot_kernel_vm TAG KDIR INITRD LOG TIMEOUT MEM_MB ACCEL [NICE]  boot KDIR's kernel with
#                            INITRD in QEMU (console to LOG), print the guest's TAG- lines;
#                            succeeds when the guest printed "TAG-RESULT: PASS"
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

initramfs_add_bin() {
    local root=$1 src=$2 dest=$3
    mkdir -p "$(dirname "$root$dest")"
    strip_copy "$src" "$root$dest"
    { ldd "$src" 2>/dev/null || true; } | awk '/=> \// {print $3} /^[[:space:]]*\/[^ ]*ld-linux/ {print $1}' |
        while read -r lib; do
            mkdir -p "$root$(dirname "$lib")"
            cp -L "$lib" "$root$lib"
        done
}

init_preamble() {
    cat <<'EOF'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/usr/bin:/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs run /run
mount -t tmpfs tmp /tmp
EOF
}

# TCG by default: on these machines /dev/kvm is kvm_pvm (a paravirtual KVM for PVM-aware
# guests), which cannot run a stock kernel; ACCEL=kvm opts in where real KVM exists.
boot_kernel_vm() {
    local tag=$1 kdir=$2 initrd=$3 log=$4 timeout_s=$5 mem=$6 accel=$7 nice=${8:-0} rc=0
    timeout "$timeout_s" nice -n "$nice" qemu-system-x86_64 -accel "$accel" -cpu max -m "$mem" -smp 2 \
        -nographic -no-reboot -kernel "$kdir/vmlinuz" -initrd "$initrd" \
        -append "console=ttyS0 panic=-1 quiet rdinit=/init" </dev/null >"$log" 2>&1 || rc=$?
    grep -a "$tag-" "$log" >&2 || true
    grep -aq "$tag-RESULT: PASS" "$log" && return 0
    echo "$(basename "$0" .sh): FAIL (qemu exit $rc); console log: $log" >&2
    tail -n 40 "$log" >&2
    return 1
}
