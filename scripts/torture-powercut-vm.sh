#!/usr/bin/env bash
# torture-powercut-vm.sh: the kill torture with power cuts, not only process death (issue 13).
# Boots Debian's Linux kernel in QEMU (as nbd-kernel-vm.sh does) with an initramfs holding
# busybox, dmsetup, mke2fs, brd/dm-mod/dm-flakey/ext4 and our binaries plus the torture driver
# (examples/torture.rs). In the guest the images live on ext4 on a dm-flakey device over a RAM
# disk. At each cut point the driver stops tapdisk (SIGSTOP: every thread out of its system
# calls, so no reply follows the cut), switches dm-flakey to drop_writes (from now on nothing
# reaches the "disk"), SIGKILLs tapdisk, then syncs (the dirty page cache goes into the dropped
# writes), unmounts, allows writes again, drops the caches and mounts (ext4 replays its
# journal): the files are exactly what had reached the device before the cut, as after a power
# failure. Then vhd-util check (or repair), tap-ctl create and the model check of every sector.
#
# Usage: scripts/torture-powercut-vm.sh [--cuts N] [--seed S] [BIN_DIR]
#   default: 60 cuts, target/debug (built first, with the driver)
# Environment: POWERCUT_VM_WORK (default target/powercut-vm), DEBIAN_KERNEL_DIR (default
#   target/debian-kernel, shared with nbd-kernel-vm.sh), POWERCUT_VM_TIMEOUT (s, default 1200).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cuts=60
seed=
bin=
while [ $# -gt 0 ]; do
    case "$1" in
        --cuts) cuts=${2:?--cuts needs N}; shift ;;
        --seed) seed=${2:?--seed needs S}; shift ;;
        -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) bin=$1 ;;
    esac
    shift
done
if [ -z "$bin" ]; then
    bin=$here/target/debug
    (cd "$here" && nice -n 10 cargo build --bins --example torture >&2)
fi
work=${POWERCUT_VM_WORK:-$here/target/powercut-vm}
timeout_s=${POWERCUT_VM_TIMEOUT:-1200}
for b in tapdisk tap-ctl vhd-util examples/torture; do
    [ -x "$bin/$b" ] || { echo "torture-powercut-vm: $bin/$b missing" >&2; exit 1; }
done
for t in qemu-system-x86_64 busybox cpio dpkg-deb apt-get gzip dmsetup mke2fs; do
    command -v "$t" >/dev/null || { echo "torture-powercut-vm: $t is required" >&2; exit 1; }
done

mkdir -p "$work"
# shellcheck source=scripts/vm-common.sh
. "$here/scripts/vm-common.sh"
kdir=${DEBIAN_KERNEL_DIR:-$here/target/debian-kernel}
debian_kernel "$kdir"

root=$work/initramfs
rm -rf "$root"
mkdir -p "$root"/{bin,usr/bin,opt/bin,proc,sys,dev,run,tmp,etc,mnt}
for m in brd dm-mod dm-flakey crc16 crc32c_generic mbcache jbd2 ext4; do
    plain_module "$kdir" "$m" "$root/$m.ko"
done
add_bin() { initramfs_add_bin "$root" "$1" "$2"; }
add_bin "$(command -v busybox)" /bin/busybox
add_bin "$(command -v dmsetup)" /usr/bin/dmsetup
add_bin "$(command -v mke2fs)" /opt/bin/mke2fs
cp /etc/mke2fs.conf "$root/etc/mke2fs.conf"
for b in tapdisk tap-ctl vhd-util; do
    add_bin "$bin/$b" "/usr/bin/$b"
done
add_bin "$bin/examples/torture" /usr/bin/torture
echo "$cuts ${seed}" >"$root/args"
{
    init_preamble
    cat <<'EOF'
fail() { echo "POWERCUT-VM-FAIL: $*"; echo "POWERCUT-VM-RESULT: FAIL"; poweroff -f; }
read -r cuts seed </args
for m in brd dm-mod dm-flakey crc16 crc32c_generic mbcache jbd2 ext4; do
    if [ "$m" = brd ]; then
        insmod /brd.ko rd_nr=1 rd_size=393216 || fail "insmod brd"
    else
        insmod "/$m.ko" || fail "insmod $m"
    fi
done
sectors=$(cat /sys/block/ram0/size)
allow="0 $sectors flakey /dev/ram0 0 180 0"
drop="0 $sectors flakey /dev/ram0 0 0 180 1 drop_writes"
export DM_DISABLE_UDEV=1 # no udev here: dmsetup makes /dev/mapper nodes itself
dmsetup create flakey --table "$allow" || fail "dmsetup create"
dmsetup mknodes flakey || fail "dmsetup mknodes"
[ -b /dev/mapper/flakey ] || fail "no /dev/mapper/flakey: $(ls -l /dev/mapper /dev/dm-* 2>&1)"
/opt/bin/mke2fs -q -F -t ext4 /dev/mapper/flakey || fail "mke2fs"
mount -t ext4 /dev/mapper/flakey /mnt || fail "mount"
# The cut: from now on every write (and flush) to the device is dropped. --nolockfs: do not
# freeze (and so sync) the filesystem on suspend.
cat >/run/cut <<C
dmsetup suspend --nolockfs flakey && dmsetup load flakey --table "$drop" && dmsetup resume flakey
C
# After tapdisk is dead: the page cache goes into the dropped writes, then is discarded.
cat >/run/restore <<C
set -e
sync
umount /mnt
dmsetup suspend flakey
dmsetup load flakey --table "$allow"
dmsetup resume flakey
echo 3 >/proc/sys/vm/drop_caches
mount -t ext4 /dev/mapper/flakey /mnt
C
set -- --kills "$cuts" --rounds-per-image 10
[ -n "$seed" ] && set -- "$@" --seed "$seed"
echo "POWERCUT-VM-STEP: torture $*"
torture --bindir /usr/bin --work /mnt/img --state /run/state \
    --cut-cmd "sh /run/cut" --restore-cmd "sh /run/restore" "$@" && rc=0 || rc=$?
[ "$rc" = 0 ] || fail "torture exit $rc"
echo "POWERCUT-VM-RESULT: PASS"
poweroff -f
EOF
} >"$root/init"
chmod +x "$root/init"
pack_cpio "$root" | gzip -1 >"$work/initramfs.cpio.gz"

log=$work/console.log
echo "torture-powercut-vm: booting Linux $(debian_kernel_version "$kdir") (${POWERCUT_VM_ACCEL:-tcg}), $cuts cuts" >&2
start=$(date +%s)
rc=0
boot_kernel_vm POWERCUT-VM "$kdir" "$work/initramfs.cpio.gz" "$log" "$timeout_s" 1536 "${POWERCUT_VM_ACCEL:-tcg}" 10 || rc=$?
# The driver's summary.
sed -n '/^torture: seed/,/^result:/p' "$log" | tr -d '\r' >&2 || true
[ "$rc" = 0 ] || exit 1
echo "torture-powercut-vm: PASS in $(($(date +%s) - start)) s" >&2
