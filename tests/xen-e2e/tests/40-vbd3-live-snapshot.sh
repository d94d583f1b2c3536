#!/bin/sh
# OpenXT's live snapshot under a running guest: while the guest writes, dom0 pauses the VBD
# (in-flight requests drain, new ones wait in the ring), takes a vhd-util snapshot, and
# unpauses onto the new leaf; tapback is restarted meanwhile (the ring stays connected and
# tapback picks it up again). The guest reads back all it wrote, and so does dom0 through
# the new chain.
# shellcheck source=tests/xen-e2e/lib.sh
. /xen-e2e/lib.sh
set -e
vhd-util create -n /tmp/base.vhd -s 64
dev=$(tap-ctl create -a vhd:/tmp/base.vhd)
pid=$(vbd_pid /tmp/base.vhd)
minor=$(tap-ctl list | grep -F /tmp/base.vhd | tr ' ' '\n' | sed -n 's/^minor=//p')
GUEST_MB=192 vbd3_guest_start e2e-snap slow w vhd:/tmp/base.vhd physical-device "$(physical_device "$dev")"
wait_for 60 backend_state "$BE" 4 || die "backend never Connected"
# Snapshot once the guest's first MiB is in (8 write requests of 128 KiB).
writes() { tap-ctl stats -p "$pid" -m "$minor" | sed -n 's/.*"hits": \[ [0-9]*, \([0-9]*\) \].*/\1/p'; }
first_mib_written() { [ "$(writes)" -ge 8 ] 2>/dev/null; }
wait_for 120 first_mib_written || die "the guest did not write: $(tap-ctl stats -p "$pid" -m "$minor")"
tap-ctl pause -p "$pid" -m "$minor"
vhd-util snapshot -n /tmp/leaf.vhd -p /tmp/base.vhd
tap-ctl unpause -p "$pid" -m "$minor" -a vhd:/tmp/leaf.vhd
tap-ctl list | grep -q "vhd:/tmp/leaf.vhd" || die "tap-ctl list does not show the new leaf: $(tap-ctl list)"
stop_tapback
sleep 1
start_tapback
vbd3_guest_finish e2e-snap
grep -q "$DOMID/51712: tapdisk $pid minor $minor already has our ring" /tmp/tapback.log ||
    die "the restarted tapback did not find the ring connected"
# ... and took it over without rewriting the backend state (blkfront would revalidate).
if guest_log e2e-snap | grep -q "Setting capacity"; then
    die "the guest saw the backend state rewritten"
fi
[ "$(md5_at "$dev" 0 24)" = "$GUEST_MD5" ] || die "dom0 reads other data through the new chain"
[ "$(vhd-util query -n /tmp/leaf.vhd -p)" = /tmp/base.vhd ] || die "leaf's parent: $(vhd-util query -n /tmp/leaf.vhd -p)"
# The snapshot fell in the middle of the writes: both layers hold some of the 12 blocks.
base_blocks=$(vhd-util query -n /tmp/base.vhd -a)
leaf_blocks=$(vhd-util query -n /tmp/leaf.vhd -a)
echo "allocated blocks: base $base_blocks, leaf $leaf_blocks"
if [ "$base_blocks" -eq 0 ] || [ "$base_blocks" -ge 12 ] || [ "$leaf_blocks" -eq 0 ]; then
    die "the snapshot did not split the writes (base $base_blocks, leaf $leaf_blocks blocks)"
fi
stop_tapback
tap-ctl destroy -d "$dev"
vhd-util check -n /tmp/leaf.vhd
vhd-util check -n /tmp/base.vhd
rm -f /tmp/leaf.vhd /tmp/base.vhd
