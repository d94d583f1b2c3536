#!/bin/sh
# A PV guest's xen-blkfront writes and reads a dynamic VHD served by our tapdisk over the
# blkif ring; tapback connects it from the vbd3 nodes OpenXT's libxl writes (physical-device
# = major:minor of the /dev/nbdN that tap-ctl create returned, tapdisk-params). Afterwards
# dom0 reads the guest's data through /dev/nbdN and the VHD checks clean.
# shellcheck source=tests/xen-e2e/lib.sh
. /xen-e2e/lib.sh
set -e
vhd-util create -n /tmp/vbd3.vhd -s 64
dev=$(tap-ctl create -a vhd:/tmp/vbd3.vhd)
case $dev in /dev/nbd[0-9]*) ;; *) die "tap-ctl create gave '$dev', not /dev/nbdN" ;; esac
run_vbd3_guest e2e-vhd rw w vhd:/tmp/vbd3.vhd physical-device "$(physical_device "$dev")"
[ "$(md5_at "$dev" 0 8)" = "$GUEST_MD5" ] || die "dom0 reads other data at 0 through $dev"
[ "$(md5_at "$dev" 56 8)" = "$GUEST_MD5" ] || die "dom0 reads other data at the end through $dev"
tap-ctl stats -p "$(vbd_pid /tmp/vbd3.vhd)" -m 0
echo
stop_tapback
tap-ctl destroy -d "$dev"
vhd-util check -n /tmp/vbd3.vhd
rm -f /tmp/vbd3.vhd
