#!/bin/sh
# Hostile xenstore values: while one guest does slow, verified I/O through its vbd3 disk,
# dom0 plays the frontend of a second (paused) guest's vbd3 device and feeds tapback
# contradictory values, in rounds until the first guest is done: multi-queue-num-queues
# 0 / 99 / text, ring-page-order 9, protocol garbage, no event-channel, 3000-byte values,
# ring refs the guest never granted, the frontend state flapping through every XenbusState;
# then the frontend directory is removed mid-connect. The first guest must pass its I/O
# check with its data on the image, its ring connected once, tapback must keep running and
# refuse every round (errors under error/backend/vbd3/<domid>/<devid>); its peak RSS is
# printed.
# shellcheck source=tests/xen-e2e/lib.sh
. /xen-e2e/lib.sh
set -e
truncate -s 64M /tmp/good.img
truncate -s 64M /tmp/hostile.img
dev=$(tap-ctl create -a aio:/tmp/good.img)
hdev=$(tap-ctl create -a aio:/tmp/hostile.img)
start_tapback
# The hostile guest: created paused, so that its own blkfront never runs; dom0 writes its
# frontend's keys instead.
HDOM=$(start_guest e2e-hostile "${GUEST_MB:-96}" "") || die "xl create e2e-hostile"
write_vbd3 "$HDOM" 51712 xvda aio:/tmp/hostile.img w physical-device "$(physical_device "$hdev")" ||
    die "writing the hostile vbd3 nodes"
HFE=/local/domain/$HDOM/device/vbd/51712
HBE=/local/domain/0/backend/vbd3/$HDOM/51712
HERR=/local/domain/0/error/backend/vbd3/$HDOM/51712/error
wait_for 30 backend_state "$HBE" 2 || die "hostile backend never reached InitWait"
GUEST_MB=192 vbd3_guest_start e2e-good slow w aio:/tmp/good.img physical-device "$(physical_device "$dev")"
GOOD=$DOMID
GOOD_BE=$BE
# The good guest's ring is up before the first hostile value.
wait_for 60 backend_state "$GOOD_BE" 4 || die "the good guest's backend is $(xenstore-read "$GOOD_BE/state")"
long=$(head -c 3000 /dev/zero | tr '\0' 7)
# publish WANT [KEY VALUE]...: the frontend's ring keys (order 0, an ungranted ref, port 3)
# with the given keys overriding them, then Initialised; tapback must refuse (Closing) with
# an error node naming WANT ("" for values only tapdisk can refuse: any error); then back to
# Initialising for the next.
publish() {
    want=$1
    shift
    xenstore-rm "$HFE/multi-queue-num-queues" "$HFE/ring-page-order" "$HFE/protocol" 2>/dev/null || true
    xenstore-rm "$HERR" 2>/dev/null || true
    xenstore-write "$HFE/ring-ref" 8 "$HFE/event-channel" 3 "$HFE/protocol" x86_64-abi "$@"
    xenstore-write "$HFE/state" 3
    wait_for 20 backend_state "$HBE" 5 || die "hostile: backend $(xenstore-read "$HBE/state") after $*"
    err=$(xenstore-read "$HERR" 2>/dev/null) || die "hostile: no error node after $*"
    case $err in *"$want"*) ;; *) die "hostile: error '$(echo "$err" | cut -c1-160)' does not name $want" ;; esac
    [ "$round" -gt 0 ] || echo "hostile: $(echo "$err" | cut -c1-120)"
    xenstore-write "$HFE/state" 1
    wait_for 20 backend_state "$HBE" 2 || die "hostile backend did not go back to InitWait"
}
# Rounds of hostile values until the good guest has finished its I/O (at least one).
round=0
# At most 50 rounds: a good guest that hangs must end the test, not keep it looping.
while [ "$round" = 0 ] || { [ "$round" -lt 50 ] && xl domid e2e-good >/dev/null 2>&1; }; do
    publish multi-queue-num-queues "$HFE/multi-queue-num-queues" 0
    publish multi-queue-num-queues "$HFE/multi-queue-num-queues" 99
    publish multi-queue-num-queues "$HFE/multi-queue-num-queues" two
    publish ring-page-order "$HFE/ring-page-order" 9
    publish protocol "$HFE/protocol" x86_99-abi
    publish protocol "$HFE/protocol" "$long"
    publish event-channel "$HFE/event-channel" "$long"
    publish ring-ref "$HFE/ring-ref" "$long"
    xenstore-rm "$HFE/event-channel"
    xenstore-write "$HFE/state" 3
    wait_for 20 backend_state "$HBE" 5 || die "no event-channel was not refused"
    xenstore-write "$HFE/state" 1
    wait_for 20 backend_state "$HBE" 2 || die "hostile backend did not go back to InitWait"
    # Plausible values tapdisk cannot map (the paused guest granted nothing).
    publish ""
    i=0
    while [ $i -lt 40 ]; do
        for s in 1 3 4 5 6 2 7 0 9; do xenstore-write "$HFE/state" $s; done
        i=$((i + 1))
    done
    xenstore-write "$HFE/state" 1
    wait_for 20 backend_state "$HBE" 2 || die "hostile backend did not go back to InitWait"
    round=$((round + 1))
done
echo "hostile: $round rounds while the good guest ran"
# The frontend directory removed mid-connect.
xenstore-write "$HFE/state" 1 "$HFE/ring-ref" 8 "$HFE/event-channel" 3
xenstore-write "$HFE/state" 3
xenstore-rm "$HFE"
[ -d "/proc/$TAPBACK_PID" ] || die "tapback died"
vbd3_guest_finish e2e-good
[ "$(md5_at "$dev" 0 24)" = "$GUEST_MD5" ] || die "dom0 reads other data than the good guest wrote"
grep -q " $GOOD/51712: ring (order" /tmp/tapback.log || die "the good guest's ring was not connected"
if grep -q " $GOOD/51712: ring disconnected" /tmp/tapback.log; then
    # Only once, after the good guest left (vbd3_guest_finish checked it went Closed).
    [ "$(grep -c " $GOOD/51712: ring disconnected" /tmp/tapback.log)" = 1 ] || die "the good ring was disconnected twice"
fi
echo "good guest $GOOD ($GOOD_BE): $RING, md5 $GUEST_MD5"
failed=$(grep -c " $HDOM/51712: .*device failed" /tmp/tapback.log || true)
echo "hostile guest $HDOM: $failed refusals logged"
[ "$failed" -ge $((10 * round)) ] || die "tapback refused only $failed of the hostile values"
[ -d "/proc/$TAPBACK_PID" ] || die "tapback died"
echo "tapback peak RSS: $(sed -n 's/^VmHWM: *//p' "/proc/$TAPBACK_PID/status")"
xl destroy e2e-hostile || true
xenstore-rm "/local/domain/0/backend/vbd3/$HDOM" || true
stop_tapback
tap-ctl destroy -d "$dev"
tap-ctl destroy -d "$hdev"
rm -f /tmp/good.img /tmp/hostile.img
