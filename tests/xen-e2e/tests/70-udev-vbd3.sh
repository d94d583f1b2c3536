#!/bin/sh
# The udev rule and hotplug script on real vbd3 backend devices: a real udevd runs
# /etc/udev/rules.d/xen-vbd3-backend.rules for the xen-backend devices vbd3-<domid>-<devid>
# the kernel creates and removes as the vbd3 backend directories come and go.
#  - OpenXT 9 style (the toolstack writes no hotplug-status): block-vbd3 add writes
#    hotplug-status=connected; a guest then does its blkfront I/O over the disk; a remove
#    event while the directory exists takes back only the script's nodes; after the toolstack
#    removes the directory the kernel's remove event re-creates nothing.
#  - OpenXT 8 style (libxl writes hotplug-status=connected itself): the script writes nothing.
# Xen's block-common.sh is moved away while this runs: block-vbd3 must not need it.
# shellcheck source=tests/xen-e2e/lib.sh
. /xen-e2e/lib.sh
set -e
udevd=""
for u in /lib/systemd/systemd-udevd /usr/lib/systemd/systemd-udevd; do
    [ ! -x "$u" ] || udevd=$u
done
[ -n "$udevd" ] || die "no systemd-udevd in dom0"
[ -x /etc/xen/scripts/block-vbd3 ] || die "block-vbd3 is not installed"
[ -f /etc/udev/rules.d/xen-vbd3-backend.rules ] || die "xen-vbd3-backend.rules is not installed"
mv /etc/xen/scripts/block-common.sh /tmp/block-common.sh.away
"$udevd" >/tmp/udevd.log 2>&1 &
UDEVD=$!
cleanup() {
    udevadm control --exit 2>/dev/null || kill "$UDEVD" 2>/dev/null || true
    mv /tmp/block-common.sh.away /etc/xen/scripts/block-common.sh 2>/dev/null || true
}
trap cleanup EXIT
fail() {
    sed 's/^/  udevd| /' /tmp/udevd.log
    die "$*"
}
wait_for 20 udevadm control --ping 2>/dev/null || fail "udevd does not answer"

# logged MESSAGE: block-vbd3 logged MESSAGE (syslog, kept in /tmp/messages).
logged() { grep -q "block-vbd3.*$1" /tmp/messages 2>/dev/null; }
# node_is PATH VALUE
node_is() { [ "$(xenstore-read "$1" 2>/dev/null)" = "$2" ]; }
no_node() { ! xenstore-exists "$1" 2>/dev/null; }
# dump DIR: the nodes under DIR with their values, without the script's two.
dump() { xenstore-ls -f "$1" | grep -v -e '/hotplug-status = ' -e '/hotplug-owner = '; }

vhd-util create -n /tmp/udev.vhd -s 64
dev=$(tap-ctl create -a vhd:/tmp/udev.vhd)
DOMID=$(start_guest e2e-udev "${GUEST_MB:-96}" "e2e.io=rw") || fail "xl create e2e-udev"

# OpenXT 8: libxl wrote hotplug-status=connected; the script only notes it.
write_vbd3 "$DOMID" 51728 xvdb vhd:/tmp/udev.vhd w physical-device "$(physical_device "$dev")" ||
    fail "writing the OpenXT 8 style nodes"
be8=backend/vbd3/$DOMID/51728
wait_for 20 logged "add $be8: hotplug-status already connected" || fail "block-vbd3 add did not run for vbd3-$DOMID-51728"
[ -e "/sys/bus/xen-backend/devices/vbd3-$DOMID-51728" ] || fail "no xen-backend device vbd3-$DOMID-51728"
no_node "/local/domain/0/$be8/hotplug-owner" || fail "block-vbd3 claimed libxl's hotplug-status"
node_is "/local/domain/0/$be8/hotplug-status" connected || fail "hotplug-status changed"
xenstore-rm "/local/domain/0/$be8" "/local/domain/$DOMID/device/vbd/51728"
wait_for 20 logged "remove $be8: nothing written by block-vbd3" || fail "block-vbd3 remove did not run for vbd3-$DOMID-51728"
udevadm settle
[ ! -e "/sys/bus/xen-backend/devices/vbd3-$DOMID-51728" ] || fail "vbd3-$DOMID-51728 still exists"
no_node "/local/domain/0/$be8" || fail "the removed backend came back: $(xenstore-ls -f "/local/domain/0/$be8")"
echo "OpenXT 8 style: the script saw libxl's hotplug-status and wrote nothing"

# OpenXT 9: the toolstack leaves hotplug-status to the hotplug script.
VBD3_HOTPLUG_STATUS='' write_vbd3 "$DOMID" 51712 xvda vhd:/tmp/udev.vhd w \
    physical-device "$(physical_device "$dev")" || fail "writing the OpenXT 9 style nodes"
BE=/local/domain/0/backend/vbd3/$DOMID/51712
wait_for 20 node_is "$BE/hotplug-status" connected || fail "no hotplug-status=connected from block-vbd3"
node_is "$BE/hotplug-owner" block-vbd3 || fail "no hotplug-owner=block-vbd3"
logged "add backend/vbd3/$DOMID/51712: hotplug-status=connected" || fail "block-vbd3 did not log its add"
sysdev=/sys/bus/xen-backend/devices/vbd3-$DOMID-51712
[ -e "$sysdev" ] || fail "no xen-backend device vbd3-$DOMID-51712"
echo "OpenXT 9 style: block-vbd3 wrote hotplug-status=connected"

# A remove event with the directory still there takes back the script's two nodes only.
before=$(dump "$BE")
udevadm trigger --action=remove "$sysdev"
udevadm settle
wait_for 20 no_node "$BE/hotplug-status" || fail "remove left hotplug-status"
no_node "$BE/hotplug-owner" || fail "remove left hotplug-owner"
[ "$(dump "$BE")" = "$before" ] || fail "remove changed other nodes: $(dump "$BE")"
# and an add event (udevadm trigger, coldplug) writes them again.
udevadm trigger --action=add "$sysdev"
udevadm settle
wait_for 20 node_is "$BE/hotplug-status" connected || fail "no hotplug-status after a second add"

# The guest does its I/O on the disk.
start_tapback
wait_for 30 backend_state "$BE" 2 || fail "backend never reached InitWait: $(xenstore-read "$BE/state")"
xl unpause "$DOMID"
vbd3_guest_finish e2e-udev
[ "$(md5_at "$dev" 0 8)" = "$GUEST_MD5" ] || fail "dom0 reads other data through $dev"

# vbd3_guest_finish removed the backend directory, as libxl does: the kernel removes the
# device and udev runs block-vbd3 remove, which finds nothing of its own and writes nothing.
wait_for 20 logged "remove backend/vbd3/$DOMID/51712: nothing written" ||
    fail "block-vbd3 remove did not run for vbd3-$DOMID-51712"
udevadm settle
[ ! -e "$sysdev" ] || fail "vbd3-$DOMID-51712 still exists"
no_node "/local/domain/0/backend/vbd3/$DOMID" || fail "the removed backend came back: $(xenstore-ls -f "/local/domain/0/backend/vbd3/$DOMID")"
grep 'block-vbd3' /tmp/messages | sed 's/^/  syslog| /'
stop_tapback
tap-ctl destroy -d "$dev"
rm -f /tmp/udev.vhd
