#!/usr/bin/env bash
# Install what blktap3's build, demo and tests need on Debian 12 (run as root, or with sudo).
# Idempotent: only missing pieces are installed.
set -euo pipefail

need_apt=()
have() { command -v "$1" >/dev/null 2>&1; }

have nbdinfo || need_apt+=(libnbd-bin)
have fio || need_apt+=(fio)
have shellcheck || need_apt+=(shellcheck)
have openssl || need_apt+=(openssl)
have gcc || need_apt+=(gcc)
have python3 || need_apt+=(python3)
# qemu-system-x86 boots Debian's kernel for a real NBD driver (scripts/nbd-kernel-vm.sh). It
# and qemu-utils must come from the same series (installing one alone can remove the other),
# so they are installed together.
# qemu-img/qemu-io/qemu-nbd are the VHD and NBD peers.
if ! have qemu-img || ! have qemu-io || ! have qemu-nbd || ! have qemu-system-x86_64; then
    need_apt+=(qemu-system-x86 qemu-utils)
fi
[ -x /bin/busybox ] && /bin/busybox --list >/dev/null 2>&1 || need_apt+=(busybox-static)
have cpio || need_apt+=(cpio)
# scripts/xen-e2e.sh: Xen's dom0 rootfs is built with mmdebstrap; depmod indexes its modules.
have mmdebstrap || need_apt+=(mmdebstrap)
have depmod || need_apt+=(kmod)
# 32-bit C runtime for the i686 build (OpenXT 8's dom0 is i686).
[ -e /usr/lib32/libc.so ] || [ -e /usr/lib/gcc/x86_64-linux-gnu/12/32/crtbegin.o ] || need_apt+=(gcc-multilib)

if [ "${#need_apt[@]}" -gt 0 ]; then
    mapfile -t need_apt < <(printf '%s\n' "${need_apt[@]}" | sort -u)
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    echo "install-deps: installing ${need_apt[*]}" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if ! have cargo; then
    echo "install-deps: no Rust toolchain found; install one with rustup (https://rustup.rs) and rerun" >&2
    exit 1
fi
if have rustup && ! rustup target list --installed | grep -qx i686-unknown-linux-gnu; then
    echo "install-deps: adding the i686-unknown-linux-gnu target" >&2
    rustup target add i686-unknown-linux-gnu >/dev/null
fi
