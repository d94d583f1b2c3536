#!/usr/bin/env bash
# xen-e2e.sh: our tapdisk, tap-ctl and tapback against a real Xen hypervisor and a real Linux
# xen-blkfront. Boots Debian's Xen 4.17 with a Debian Linux PV dom0 inside QEMU (TCG; see
# ../shared/reference/xen-e2e.md), and in dom0 runs each test of tests/xen-e2e/tests/: they
# create VHDs with vhd-util, serve them with `tap-ctl create`, start tapback, write the vbd3
# xenstore nodes the way OpenXT's libxl does, and start PV guests whose blkfront does I/O
# over the shared ring (grant copy through /dev/xen/gntdev, event channels, xenstore).
#
# The overlay also installs what the OpenXT recipe installs, at its paths: libblktapctl.so.0
# in /usr/lib (with a C program, tests/xen-e2e/libxl-tap.c, built here against
# include/blktap and linked with -lblktapctl, that makes libxl's tap_ctl_* calls),
# /etc/init.d/tapback-daemon with /usr/bin/tapback, and the udev rule and block-vbd3 hotplug
# script (dom0 has udev; the udev test starts udevd).
#
# Usage: scripts/xen-e2e.sh [--tests "NAME ..."] [BIN_DIR]
#   BIN_DIR  tapdisk/tap-ctl/tapback/vhd-util and libblktap3.so (the cdylib) to test
#            (default: target/release, built first)
#   --tests  run only these tests (file names in tests/xen-e2e/tests/ without NN- and .sh)
# Environment: XEN_E2E_WORK (default target/xen-e2e: dom0 rootfs, boot files, logs),
#   DEBIAN_KERNEL_DIR (default target/debian-kernel), XEN_E2E_TIMEOUT (seconds, default 900),
#   QEMU_CPU (default qemu64: Xen 4.17 PV dom0 crashes under TCG's SMAP emulation with max).
# Prints XEN-E2E-RESULT lines and exits 0 only if at least one test passed and none failed.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
work=${XEN_E2E_WORK:-$here/target/xen-e2e}
timeout_s=${XEN_E2E_TIMEOUT:-900}
tests=""
bin=""
while [ $# -gt 0 ]; do
    case $1 in
        --tests) tests=$2; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) echo "xen-e2e: unknown option $1" >&2; exit 2 ;;
        *) bin=$1; shift ;;
    esac
done
if [ -z "$bin" ]; then
    (cd "$here" && cargo build --release --bins --lib >&2)
    bin=$here/target/release
fi
bin=$(cd "$bin" && pwd)
for b in tapdisk tap-ctl tapback vhd-util libblktap3.so; do
    [ -e "$bin/$b" ] || { echo "xen-e2e: $bin/$b missing" >&2; exit 1; }
done
for t in qemu-system-x86_64 mmdebstrap busybox cpio dpkg-deb apt-get depmod gcc; do
    command -v "$t" >/dev/null || { echo "xen-e2e: $t is required (scripts/install-deps.sh)" >&2; exit 1; }
done

mkdir -p "$work"
log() { echo "xen-e2e: $*" >&2; }

# 1. Debian's kernel (dom0 and guests) and Xen hypervisor.
# shellcheck source=scripts/vm-common.sh
. "$here/scripts/vm-common.sh"
kdir=${DEBIAN_KERNEL_DIR:-$here/target/debian-kernel}
debian_kernel "$kdir"
kver=$(debian_kernel_version "$kdir")
xen_series=4.17
if [ ! -f "$work/boot/xen" ]; then
    log "fetching xen-hypervisor-$xen_series-amd64"
    rm -rf "$work/xen-deb" && mkdir -p "$work/xen-deb" "$work/boot"
    apt_download "xen-hypervisor-$xen_series-amd64" "$work/xen-deb"
    dpkg-deb -x "$work"/xen-deb/*.deb "$work/xen-deb/root"
    # A gzipped 32-bit multiboot ELF: QEMU's -kernel wants it unpacked.
    gzip -dc "$(find "$work/xen-deb/root/boot" -name 'xen-*.gz' | head -n1)" >"$work/boot/xen.tmp"
    mv "$work/boot/xen.tmp" "$work/boot/xen"
    rm -rf "$work/xen-deb"
fi

# 2. The dom0 base rootfs (kept; rebuilt when the kernel changes): Debian minbase with the
#    Xen tools, the kernel's Xen and block modules, and the guest kernel.
stamp="$kver xen-utils-$xen_series v2 udev"
if [ ! -f "$work/boot/dom0-base.cpio" ] || [ "$(cat "$work/boot/dom0-base.stamp" 2>/dev/null)" != "$stamp" ]; then
    log "building the dom0 rootfs (mmdebstrap)"
    rm -rf "$work/dom0root" "$work/dom0-rootfs.tar"
    mmdebstrap --quiet --variant=minbase \
        --include="xen-utils-$xen_series,xenstore-utils,kmod,procps,udev" \
        bookworm "$work/dom0-rootfs.tar" >&2
    mkdir -p "$work/dom0root"
    tar -C "$work/dom0root" -xf "$work/dom0-rootfs.tar"
    rm -f "$work/dom0-rootfs.tar"
    # Only the modules the tests load, then their index.
    mdst=$work/dom0root/usr/lib/modules/$kver
    msrc=$kdir/root/lib/modules/$kver
    mkdir -p "$mdst/kernel/drivers"
    cp -a "$msrc/kernel/drivers/xen" "$msrc/kernel/drivers/block" "$mdst/kernel/drivers/"
    cp "$msrc"/modules.builtin* "$msrc/modules.order" "$mdst/" 2>/dev/null || true
    depmod -b "$work/dom0root" "$kver"
    rm -rf "$work"/dom0root/usr/share/{doc,man,info,locale} "$work"/dom0root/var/cache/apt/* \
        "$work"/dom0root/var/lib/apt/lists/* "$work"/dom0root/usr/lib/xen-*/boot
    mkdir -p "$work/dom0root/boot"
    cp "$kdir/vmlinuz" "$work/dom0root/boot/vmlinuz"
    pack_cpio "$work/dom0root" >"$work/boot/dom0-base.cpio"
    echo "$stamp" >"$work/boot/dom0-base.stamp"
    rm -rf "$work/dom0root"
fi
cp "$kdir/vmlinuz" "$work/boot/vmlinuz"

# 3. The per-run overlay: /init, the tests, our binaries (stripped) and the test options.
ov=$work/overlay
rm -rf "$ov" && mkdir -p "$ov/xen-e2e/bin" "$ov/xen-e2e/tests"
cp "$here/tests/xen-e2e/dom0-init.sh" "$ov/init"
cp "$here/tests/xen-e2e/lib.sh" "$ov/xen-e2e/lib.sh"
cp "$here"/tests/xen-e2e/tests/*.sh "$ov/xen-e2e/tests/"
cp "$(command -v busybox)" "$ov/xen-e2e/busybox"
for b in tapdisk tap-ctl tapback vhd-util; do
    strip_copy "$bin/$b" "$ov/xen-e2e/bin/$b"
done
# What the recipe installs, at OpenXT's paths: the C library under its soname, the init
# script (its default daemon path a link to the binary under test), the udev rule and the
# hotplug script.
mkdir -p "$ov/usr/lib" "$ov/usr/bin" "$ov/etc/init.d" "$ov/etc/udev/rules.d" "$ov/etc/xen/scripts"
strip_copy "$bin/libblktap3.so" "$ov/usr/lib/libblktapctl.so.0"
ln -s /xen-e2e/bin/tapback "$ov/usr/bin/tapback"
install -m 0755 "$here/init/tapback-daemon" "$ov/etc/init.d/tapback-daemon"
install -m 0644 "$here/udev/xen-vbd3-backend.rules" "$ov/etc/udev/rules.d/xen-vbd3-backend.rules"
install -m 0755 "$here/scripts/block-vbd3" "$ov/etc/xen/scripts/block-vbd3"
# libxl-tap: libxl's tap_ctl_* calls, compiled against our header and linked against the
# library by its soname (as libxl links it).
libdir=$work/libblktapctl
rm -rf "$libdir" && mkdir -p "$libdir"
ln -s "$bin/libblktap3.so" "$libdir/libblktapctl.so"
gcc -std=gnu99 -Wall -Wextra -Werror -O2 -I "$here/include/blktap" \
    -o "$ov/xen-e2e/bin/libxl-tap" "$here/tests/xen-e2e/libxl-tap.c" -L "$libdir" -lblktapctl
readelf -d "$ov/xen-e2e/bin/libxl-tap" | grep -q 'NEEDED.*\[libblktapctl.so.0\]' ||
    { log "libxl-tap does not link libblktapctl.so.0"; exit 1; }
echo "XEN_E2E_TESTS='$tests'" >"$ov/xen-e2e/env"
chmod +x "$ov/init" "$ov"/xen-e2e/tests/*.sh
# The guest's initramfs: busybox, xen-blkfront and its init.
groot=$work/domu-root
rm -rf "$groot" && mkdir -p "$groot"/{bin,proc,sys,dev,tmp}
cp "$(command -v busybox)" "$groot/bin/busybox"
plain_module "$kdir" xen-blkfront "$groot/xen-blkfront.ko"
cp "$here/tests/xen-e2e/domu-init.sh" "$groot/init"
chmod +x "$groot/init"
mkdir -p "$ov/boot"
pack_cpio "$groot" >"$ov/boot/domu.cpio"
rm -rf "$groot"
pack_cpio "$ov" >"$work/boot/overlay.cpio"
cat "$work/boot/dom0-base.cpio" "$work/boot/overlay.cpio" >"$work/boot/dom0-initrd.cpio"

# 4. Boot. Xen's multiboot modules: the dom0 kernel (with its command line) and its initrd.
console=$work/console.log
log "booting Xen $xen_series + Linux $kver (TCG); console: $console"
set +e
timeout "$timeout_s" qemu-system-x86_64 -machine pc -accel tcg -cpu "${QEMU_CPU:-qemu64}" -smp 2 -m 2048 \
    -display none -vga none -no-reboot -monitor none -serial stdio -net none \
    -kernel "$work/boot/xen" \
    -append "console=com1 com1=115200,8n1 dom0_mem=1024M,max:1024M loglvl=all guest_loglvl=all" \
    -initrd "$work/boot/vmlinuz console=hvc0 earlyprintk=xen loglevel=4,$work/boot/dom0-initrd.cpio" \
    </dev/null 2>&1 | tee "$console" | grep -a --line-buffered -E '^(XEN-E2E|  (guest|log)\|)' >&2
rc=${PIPESTATUS[0]}
set -e
summary=$(grep -a '^XEN-E2E-SUMMARY:' "$console" | tail -n1 | tr -d '\r' || true)
if [ -z "$summary" ]; then
    [ "$rc" = 124 ] && log "TIMEOUT after ${timeout_s}s"
    log "FAIL: no summary (qemu exit $rc); last console lines:"
    tail -n 40 "$console" >&2
    exit 1
fi
echo "${summary#XEN-E2E-SUMMARY: }"
passed=$(echo "$summary" | sed -n 's/.* \([0-9]*\) passed.*/\1/p')
failed=$(echo "$summary" | sed -n 's/.* \([0-9]*\) failed.*/\1/p')
[ "${passed:-0}" -gt 0 ] && [ "${failed:-1}" -eq 0 ]
