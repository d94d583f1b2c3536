#!/usr/bin/env bash
# nbd-kernel-vm.sh: `tap-ctl create` against a REAL kernel NBD driver. Boots Debian's Linux
# kernel in QEMU (KVM when usable, else TCG) with an initramfs holding busybox, nbd.ko and
# our tap-ctl/tapdisk/vhd-util, and checks inside the guest that:
#   - tap-ctl create prints /dev/nbdN, which is a block device of the VHD's size whose
#     /sys/block/nbdN/backend names the tapdisk's NBD socket;
#   - O_DIRECT writes through /dev/nbdN land in the VHD, flushed and read back intact;
#   - create makes /dev/xen/blktap-2/tapdev<minor> a symlink to the /dev/nbdN it printed,
#     and I/O through the link reaches the same device;
#   - tap-ctl list shows the disk; tap-ctl destroy -d /dev/nbdN (OpenXT's form) disconnects
#     the device (size 0), ends the tapdisk and removes the tapdev link;
#   - a second create serves the data written through the first device, and
#     tap-ctl destroy -d /dev/xen/blktap-2/tapdev<minor> destroys it and removes the link;
#   - without the module (first step, before insmod) create prints the socket path instead,
#     and makes no tapdev link;
#   - a tapdisk killed with SIGKILL fails the device's I/O at once (no hang), the next create
#     disconnects the orphaned device and removes the dead VBD's tapdev link (the new one
#     points to the new device), and destroy of the dead VBD frees its minor.
# The guest prints NBD-VM-RESULT: PASS or FAIL; this script exits 0 only on PASS.
#
# Usage: scripts/nbd-kernel-vm.sh [BIN_DIR]   (default: target/debug, built first)
# Environment: NBD_VM_WORK (default target/nbd-vm: the initramfs and console log),
#              DEBIAN_KERNEL_DIR (default target/debian-kernel: the kernel package, kept),
#              NBD_VM_TIMEOUT (seconds, default 600).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bin=${1:-$here/target/debug}
work=${NBD_VM_WORK:-$here/target/nbd-vm}
timeout_s=${NBD_VM_TIMEOUT:-600}

if [ $# -eq 0 ]; then
    (cd "$here" && cargo build --bins >&2)
fi
for b in tapdisk tap-ctl vhd-util; do
    [ -x "$bin/$b" ] || { echo "nbd-kernel-vm: $bin/$b missing" >&2; exit 1; }
done
for t in qemu-system-x86_64 busybox cpio dpkg-deb apt-get gzip; do
    command -v "$t" >/dev/null || { echo "nbd-kernel-vm: $t is required (scripts/install-deps.sh)" >&2; exit 1; }
done
busybox_bin=$(command -v busybox)

mkdir -p "$work"
# Debian's kernel, downloaded once (shared with xen-e2e.sh).
# shellcheck source=scripts/vm-common.sh
. "$here/scripts/vm-common.sh"
kdir=${DEBIAN_KERNEL_DIR:-$here/target/debian-kernel}
debian_kernel "$kdir"

# The initramfs: busybox, nbd.ko, our binaries and the shared libraries they load.
root=$work/initramfs
rm -rf "$root"
mkdir -p "$root"/{bin,usr/bin,proc,sys,dev,run,tmp,etc}
plain_module "$kdir" nbd "$root/nbd.ko"
add_bin() { initramfs_add_bin "$root" "$1" "$2"; }
add_bin "$busybox_bin" /bin/busybox
for b in tapdisk tap-ctl vhd-util; do
    add_bin "$bin/$b" "/usr/bin/$b"
done
{
    init_preamble
    cat <<'EOF'
export BLKTAP_CONTROL_DIR=/run/blktap-control
fail() { echo "NBD-VM-FAIL: $*"; echo "NBD-VM-RESULT: FAIL"; poweroff -f; }
step() { echo "NBD-VM-STEP: $*"; }
tapdevs=/dev/xen/blktap-2
# minor_of PATTERN: the minor of the VBD whose tap-ctl list line matches PATTERN.
minor_of() { tap-ctl list | grep -- "$1" | awk '{print $2}' | cut -d= -f2; }
# check_link MINOR DEV: tapdev<MINOR> is a symlink to DEV.
check_link() {
    [ -L "$tapdevs/tapdev$1" ] || fail "$tapdevs/tapdev$1 is not a symlink"
    [ "$(readlink "$tapdevs/tapdev$1")" = "$2" ] ||
        fail "$tapdevs/tapdev$1 points to '$(readlink "$tapdevs/tapdev$1")', not $2"
    [ -b "$tapdevs/tapdev$1" ] || fail "$tapdevs/tapdev$1 does not lead to a block device"
}
# check_no_link MINOR
check_no_link() {
    [ ! -e "$tapdevs/tapdev$1" ] && [ ! -L "$tapdevs/tapdev$1" ] ||
        fail "$tapdevs/tapdev$1 is still there (-> $(readlink "$tapdevs/tapdev$1"))"
}

vhd-util create -n /tmp/d.vhd -s 64 || fail "vhd-util create"

step "no nbd module: create prints the socket path"
out=$(tap-ctl create -a vhd:/tmp/d.vhd) || fail "create without module"
case $out in /run/blktap-control/nbd*) ;; *) fail "expected a socket path, got '$out'" ;; esac
check_no_link "$(minor_of vhd:/tmp/d.vhd)"
tap-ctl destroy -p "$(tap-ctl list | awk '{print $1}' | cut -d= -f2)" -m 0 || fail "destroy without module"

step "insmod nbd"
insmod /nbd.ko nbds_max=4 || fail "insmod nbd.ko"

step "create attaches /dev/nbdN"
dev=$(tap-ctl create -a vhd:/tmp/d.vhd) || fail "tap-ctl create"
case $dev in /dev/nbd[0-9]*) ;; *) fail "expected /dev/nbdN, got '$dev'" ;; esac
[ -b "$dev" ] || fail "$dev is not a block device"
n=${dev#/dev/}
size=$(cat "/sys/block/$n/size")
[ "$size" = 131072 ] || fail "$dev has $size sectors, expected 131072"
backend=$(cat "/sys/block/$n/backend" 2>/dev/null || true)
case $backend in /run/blktap-control/nbd*) ;; *) fail "backend of $dev is '$backend'" ;; esac
tap-ctl list | grep -q "vhd:/tmp/d.vhd" || fail "tap-ctl list does not show the disk"
minor=$(minor_of vhd:/tmp/d.vhd)
step "tapdev$minor -> $dev"
check_link "$minor" "$dev"

step "O_DIRECT I/O through $dev"
dd if=/dev/urandom of=/tmp/pattern bs=1M count=2 2>/dev/null
dd if=/tmp/pattern of="$dev" bs=1M seek=5 oflag=direct conv=fsync 2>/dev/null || fail "write to $dev"
dd if=/tmp/pattern of="$dev" bs=512 seek=131064 count=8 oflag=direct conv=fsync 2>/dev/null || fail "write at the end of $dev"
echo 3 >/proc/sys/vm/drop_caches
dd if="$dev" bs=1M skip=5 count=2 iflag=direct 2>/dev/null | cmp -s - /tmp/pattern || fail "read back through $dev"
dd if="$tapdevs/tapdev$minor" bs=1M skip=5 count=2 iflag=direct 2>/dev/null | cmp -s - /tmp/pattern ||
    fail "read back through $tapdevs/tapdev$minor"

step "destroy -d $dev"
pid=$(tap-ctl list | awk '{print $1}' | cut -d= -f2)
tap-ctl destroy -d "$dev" || fail "tap-ctl destroy -d $dev"
size=$(cat "/sys/block/$n/size")
[ "$size" = 0 ] || fail "$dev still has $size sectors after destroy"
sleep 1
[ ! -d "/proc/$pid" ] || fail "tapdisk $pid still runs after destroy"
[ -z "$(tap-ctl list)" ] || fail "tap-ctl list not empty after destroy: $(tap-ctl list)"
check_no_link "$minor"
vhd-util check -n /tmp/d.vhd || fail "vhd-util check after destroy"

step "a new create serves the data"
dev=$(tap-ctl create -a vhd:/tmp/d.vhd) || fail "second create"
dd if="$dev" bs=1M skip=5 count=2 iflag=direct 2>/dev/null | cmp -s - /tmp/pattern || fail "data lost across create/destroy"
head -c 4096 /tmp/pattern >/tmp/pattern4k
dd if="$dev" bs=512 skip=131064 count=8 iflag=direct 2>/dev/null | cmp -s - /tmp/pattern4k || fail "last sectors lost"
minor=$(minor_of vhd:/tmp/d.vhd)
check_link "$minor" "$dev"
step "destroy -d $tapdevs/tapdev$minor"
pid=$(tap-ctl list | awk '{print $1}' | cut -d= -f2)
tap-ctl destroy -d "$tapdevs/tapdev$minor" || fail "tap-ctl destroy -d $tapdevs/tapdev$minor"
[ "$(cat "/sys/block/${dev#/dev/}/size")" = 0 ] || fail "$dev still attached after destroy by its tapdev name"
sleep 1
[ ! -d "/proc/$pid" ] || fail "tapdisk $pid still runs after destroy by its tapdev name"
[ -z "$(tap-ctl list)" ] || fail "tap-ctl list not empty after destroy by tapdev name: $(tap-ctl list)"
check_no_link "$minor"

step "tapdisk killed with the device attached"
dev=$(tap-ctl create -a vhd:/tmp/d.vhd) || fail "third create"
n=${dev#/dev/}
pid=$(tap-ctl list | awk '{print $1}' | cut -d= -f2)
minor=$(tap-ctl list | awk '{print $2}' | cut -d= -f2)
check_link "$minor" "$dev"
kill -9 "$pid"
# I/O on the dead tapdisk's device fails: at once when the kernel already saw the socket
# close; a request sent before that waits in the kernel (the NBD device has no timeout) until
# the next tap-ctl command reclaims the device, which fails it. dd in D state ignores
# signals, so it runs in the background and must end once the device is reclaimed.
dd if="$dev" of=/dev/null bs=4k count=1 iflag=direct 2>/dev/null &
ddpid=$!
sleep 1
dev2=$(tap-ctl create -a vhd:/tmp/d.vhd) || fail "create after SIGKILL"
i=0
while kill -0 "$ddpid" 2>/dev/null; do
    i=$((i + 1))
    [ "$i" -le 30 ] || fail "I/O on $dev still hung 30 s after the dead tapdisk's device was reclaimed"
    sleep 1
done
rc=0
wait "$ddpid" || rc=$?
[ "$rc" != 0 ] || fail "I/O on $dev after SIGKILL succeeded"
case $dev2 in /dev/nbd[0-9]*) ;; *) fail "expected /dev/nbdN after SIGKILL, got '$dev2'" ;; esac
grep -l "nbd$pid\." /sys/block/nbd*/backend 2>/dev/null && fail "a device of dead tapdisk $pid is still attached"
minor2=$(tap-ctl list | grep -v "minor=$minor " | grep vhd:/tmp/d.vhd | awk '{print $2}' | cut -d= -f2)
[ -n "$minor2" ] && [ "$minor2" != "$minor" ] || fail "no new minor after SIGKILL: $(tap-ctl list)"
step "after SIGKILL: tapdev$minor (dead, was $dev) cleaned up, tapdev$minor2 -> $dev2"
check_no_link "$minor"
check_link "$minor2" "$dev2"
dd if="$dev2" bs=1M skip=5 count=2 iflag=direct 2>/dev/null | cmp -s - /tmp/pattern || fail "data through $dev2 after SIGKILL"
tap-ctl destroy -p "$pid" -m "$minor" || fail "destroy of the dead tapdisk's VBD"
tap-ctl list | grep -qx "minor=$minor" && fail "minor $minor still allocated after destroy"
tap-ctl destroy -d "$dev2" || fail "destroy $dev2"
check_no_link "$minor2"
[ -z "$(tap-ctl list)" ] || fail "tap-ctl list not empty at the end: $(tap-ctl list)"

echo "NBD-VM-RESULT: PASS"
poweroff -f
EOF
} >"$root/init"
chmod +x "$root/init"
pack_cpio "$root" | gzip -1 >"$work/initramfs.cpio.gz"

log=$work/console.log
echo "nbd-kernel-vm: booting Linux $(debian_kernel_version "$kdir") (${NBD_VM_ACCEL:-tcg})" >&2
boot_kernel_vm NBD-VM "$kdir" "$work/initramfs.cpio.gz" "$log" "$timeout_s" 1024 "${NBD_VM_ACCEL:-tcg}"
echo "nbd-kernel-vm: PASS" >&2
