#!/bin/sh
# OpenXT's usual layout: two guests at once, each on its own snapshot leaf of one golden VHD,
# each leaf served by its own tapdisk, one tapback for both domains. Each guest first reads
# the golden data through its leaf, then writes its own; afterwards each leaf holds its
# guest's data and the golden image is unchanged.
# tapback runs as the init script starts it: a daemon with a pid file, logging to syslog.
# shellcheck source=tests/xen-e2e/lib.sh
. /xen-e2e/lib.sh
set -e
export TAPBACK_DAEMON=1
vhd-util create -n /tmp/gold.vhd -s 64
head -c $((8 << 20)) /dev/urandom >/tmp/gold.pat
gold=$(md5sum </tmp/gold.pat | cut -d' ' -f1)
dev=$(tap-ctl create -a vhd:/tmp/gold.vhd)
dd if=/tmp/gold.pat of="$dev" bs=1M oflag=direct conv=fsync 2>/dev/null
tap-ctl destroy -d "$dev"
for vm in vm1 vm2; do
    vhd-util snapshot -n "/tmp/$vm.vhd" -p /tmp/gold.vhd
done
dev1=$(tap-ctl create -a vhd:/tmp/vm1.vhd)
dev2=$(tap-ctl create -a vhd:/tmp/vm2.vhd)
[ "$(vbd_pid /tmp/vm1.vhd)" != "$(vbd_pid /tmp/vm2.vhd)" ] || die "both leaves in one tapdisk"

vbd3_guest_start e2e-vm1 rw w vhd:/tmp/vm1.vhd physical-device "$(physical_device "$dev1")"
dom1=$DOMID be1=$BE
vbd3_guest_start e2e-vm2 rw w vhd:/tmp/vm2.vhd physical-device "$(physical_device "$dev2")"
dom2=$DOMID be2=$BE
DOMID=$dom1 BE=$be1
vbd3_guest_finish e2e-vm1
sum1=$GUEST_MD5
DOMID=$dom2 BE=$be2
vbd3_guest_finish e2e-vm2
sum2=$GUEST_MD5

for vm in vm1 vm2; do
    before=$(guest_log "e2e-$vm" | tr -d '\r' | sed -n 's/^DOMU: before md5=//p')
    [ "$before" = "$gold" ] || die "e2e-$vm read $before through its leaf, the golden image holds $gold"
done
[ "$sum1" != "$sum2" ] || die "the two guests wrote the same data"
[ "$(md5_at "$dev1" 0 8)" = "$sum1" ] || die "vm1's leaf does not hold vm1's data"
[ "$(md5_at "$dev2" 0 8)" = "$sum2" ] || die "vm2's leaf does not hold vm2's data"
stop_tapback
tap-ctl destroy -d "$dev1"
tap-ctl destroy -d "$dev2"
dev=$(tap-ctl create -R -a vhd:/tmp/gold.vhd)
[ "$(md5_at "$dev" 0 8)" = "$gold" ] || die "the golden image changed"
tap-ctl destroy -d "$dev"
for vm in vm1 vm2 gold; do
    vhd-util check -n "/tmp/$vm.vhd"
done
rm -f /tmp/vm1.vhd /tmp/vm2.vhd /tmp/gold.vhd /tmp/gold.pat
