#!/bin/sh
# Multi-queue: tapback advertises multi-queue-max-queues, the 2-vCPU guest's xen-blkfront
# opens one ring per vCPU (multi-queue-num-queues=2, queue-0/ and queue-1/ with their own
# ring-ref and event-channel), tapback connects both rings to tapdisk (XENBLKIF_CONNECT for
# queue 0 and queue 1) and the guest's verified I/O goes through them; dom0 then reads the
# guest's data through /dev/nbdN.
# shellcheck source=tests/xen-e2e/lib.sh
. /xen-e2e/lib.sh
set -e
truncate -s 64M /tmp/mq.img
dev=$(tap-ctl create -a aio:/tmp/mq.img)
case $dev in /dev/nbd[0-9]*) ;; *) die "tap-ctl create gave '$dev', not /dev/nbdN" ;; esac
GUEST_VCPUS=2 vbd3_guest_start e2e-mq rw w aio:/tmp/mq.img physical-device "$(physical_device "$dev")"
FE=/local/domain/$DOMID/device/vbd/51712
max=$(xenstore-read "$BE/multi-queue-max-queues") || die "no multi-queue-max-queues in $BE"
echo "backend: multi-queue-max-queues=$max"
# While the guest is connected: its blkfront's keys, and tapdisk's rings.
wait_for 60 backend_state "$BE" 4 || die "backend state $(xenstore-read "$BE/state"), not Connected"
nq=$(xenstore-read "$FE/multi-queue-num-queues") || die "the frontend wrote no multi-queue-num-queues"
[ "$nq" = 2 ] || die "the 2-vCPU guest uses $nq queues"
for q in 0 1; do
    port=$(xenstore-read "$FE/queue-$q/event-channel") || die "no queue-$q/event-channel"
    ref=$(xenstore-read "$FE/queue-$q/ring-ref" 2>/dev/null || xenstore-read "$FE/queue-$q/ring-ref0") ||
        die "no queue-$q/ring-ref"
    echo "frontend queue-$q: ring-ref $ref, event-channel $port"
done
! xenstore-read "$FE/event-channel" >/dev/null 2>&1 || die "a top-level event-channel next to the queues"
pid=$(vbd_pid /tmp/mq.img)
stats=$(tap-ctl stats -p "$pid" -m 0)
echo "$stats"
[ "$(echo "$stats" | grep -o "\"domid\": $DOMID, \"devid\": 51712" | wc -l)" = 2 ] ||
    die "tapdisk does not serve two rings for the guest"
vbd3_guest_finish e2e-mq
for q in 0 1; do
    grep -q "$DOMID/51712: ring $q/2 (order" /tmp/tapback.log || die "tapback did not connect queue $q"
done
grep "$DOMID/51712: ring [01]/2 (order" /tmp/tapback.log | sed 's/.*: ring/ring/'
[ "$(md5_at "$dev" 0 8)" = "$GUEST_MD5" ] || die "dom0 reads other data at 0 through $dev"
[ "$(md5_at "$dev" 56 8)" = "$GUEST_MD5" ] || die "dom0 reads other data at the end through $dev"
stop_tapback
tap-ctl destroy -d "$dev"
rm -f /tmp/mq.img
