#!/bin/sh
# Our stack driven the way OpenXT's patched libxl drives it, with the same library calls:
# libxl-tap (tests/xen-e2e/libxl-tap.c, linked against /usr/lib/libblktapctl.so.0) looks the
# image up with tap_ctl_find_minor and creates its tapdisk with tap_ctl_create, which returns
# the device path (/dev/nbdN); the test writes the vbd3 nodes libxl writes from that path
# (physical-device from stat, physical-device-path, tapdisk-params, hotplug-status) and a PV
# guest does its blkfront I/O; teardown as libxl's: tapdisk-params from the backend, the
# in-use check over every vbd3 backend, tap_ctl_find_minor + tap_ctl_list + tap_ctl_destroy.
# tapback is started and stopped by the init script (/etc/init.d/tapback-daemon, defaults:
# /usr/bin/tapback, /var/run/tapback.pid) with Debian's start-stop-daemon.
# shellcheck source=tests/xen-e2e/lib.sh
. /xen-e2e/lib.sh
set -e
initd=/etc/init.d/tapback-daemon
# field LINE KEY: the value of KEY=VALUE in a libxl-tap output line.
field() { echo "$1" | tr ' ' '\n' | sed -n "s/^$2=//p"; }
gone() { [ ! -d "/proc/$1" ] || grep -q '^State:.*Z' "/proc/$1/status"; }

# tapback through the init script; a second start leaves the first daemon alone.
$initd start || die "tapback-daemon start"
tb=$(cat /var/run/tapback.pid) || die "no /var/run/tapback.pid"
[ "$(cat "/proc/$tb/comm")" = tapback ] || die "pid file names $tb, not a running tapback"
$initd start || die "second tapback-daemon start"
[ "$(pgrep -x tapback)" = "$tb" ] || die "after a second start: tapbacks $(pgrep -x tapback | tr '\n' ' ')"
$initd status || die "tapback-daemon status: $?"
[ -d /run/blktap-control ] || die "the init script did not create /run/blktap-control"

# libxl__blktap_devpath: no tapdisk yet, so tap_ctl_create.
vhd-util create -n /tmp/libxl.vhd -s 64
out=$(libxl-tap create vhd /tmp/libxl.vhd) || die "libxl-tap create"
echo "libxl-tap: $out"
case $out in created\ *) ;; *) die "a tapdisk already served the new image: $out" ;; esac
minor=$(field "$out" minor) tdpid=$(field "$out" pid) dev=$(field "$out" devname)
[ -b "$dev" ] || die "tap_ctl_create returned '$dev', not a block device"
case $dev in /dev/nbd[0-9]*) ;; *) die "tap_ctl_create returned '$dev', not /dev/nbdN" ;; esac
[ -d "/proc/$tdpid" ] || die "tapdisk $tdpid is not running"
# The same image again (the stubdomain's copy of the disk): found, not created twice.
again=$(libxl-tap create vhd /tmp/libxl.vhd) || die "libxl-tap create (again)"
[ "$again" = "existing minor=$minor pid=$tdpid" ] || die "second lookup: $again"
[ "$(tap-ctl list | grep -c -F /tmp/libxl.vhd)" = 1 ] || die "$(tap-ctl list)"

# The nodes libxl writes, from the device path tap_ctl_create returned.
DOMID=$(start_guest e2e-libxl "${GUEST_MB:-96}" "e2e.io=rw") || die "xl create e2e-libxl"
write_vbd3 "$DOMID" 51712 xvda vhd:/tmp/libxl.vhd w physical-device "$(physical_device "$dev")" \
    physical-device-path "$dev" || die "writing the vbd3 nodes"
BE=/local/domain/0/backend/vbd3/$DOMID/51712
echo "physical-device=$(xenstore-read "$BE/physical-device") physical-device-path=$(xenstore-read "$BE/physical-device-path")"
wait_for 30 backend_state "$BE" 2 || die "backend never reached InitWait: $(xenstore-read "$BE/state")"
xl unpause "$DOMID"
params=$(xenstore-read "$BE/tapdisk-params")
vbd3_guest_finish e2e-libxl
[ "$(md5_at "$dev" 0 8)" = "$GUEST_MD5" ] || die "dom0 reads other data at 0 through $dev"
[ "$(md5_at "$dev" 56 8)" = "$GUEST_MD5" ] || die "dom0 reads other data at the end through $dev"

# libxl__device_destroy_tapdisk: kept while another vbd3 backend names the same params.
for d in $(xenstore-list /local/domain/0/backend/vbd3 2>/dev/null); do
    for v in $(xenstore-list "/local/domain/0/backend/vbd3/$d" 2>/dev/null); do
        [ "$(xenstore-read "/local/domain/0/backend/vbd3/$d/$v/tapdisk-params" 2>/dev/null)" != "$params" ] ||
            die "backend/vbd3/$d/$v still uses $params"
    done
done
out=$(libxl-tap destroy "$params") || die "libxl-tap destroy $params"
echo "libxl-tap: $out"
[ "$out" = "destroyed minor=$minor pid=$tdpid" ] || die "destroy: $out"
wait_for 10 gone "$tdpid" || die "tapdisk $tdpid still runs after tap_ctl_destroy"
! tap-ctl list | grep -q -F /tmp/libxl.vhd || die "still listed: $(tap-ctl list)"
[ ! -e "/run/blktap-control/ctl$tdpid" ] || die "control socket ctl$tdpid left behind"
[ "$(cat "/sys/block/${dev#/dev/}/size")" = 0 ] || die "$dev still connected"
! libxl-tap destroy "$params" 2>/dev/null || die "a second destroy found a tapdisk"

# access=ro: libxl's flags make the tapdisk read-only; writes through the device fail.
vhd-util create -n /tmp/libxl-ro.vhd -s 16
rodev=$(field "$(libxl-tap create vhd /tmp/libxl-ro.vhd ro)" devname)
[ -b "$rodev" ] || die "read-only create returned '$rodev'"
! dd if=/dev/zero of="$rodev" bs=4k count=1 oflag=direct 2>/dev/null || die "a write to read-only $rodev succeeded"
dd if="$rodev" of=/dev/null bs=4k count=1 iflag=direct 2>/dev/null || die "read from read-only $rodev failed"
libxl-tap destroy vhd:/tmp/libxl-ro.vhd >/dev/null || die "destroying the read-only tapdisk"

# tapback through the init script: stop waits for the exit; stopping again is fine.
$initd stop || die "tapback-daemon stop"
gone "$tb" || die "tapback $tb still runs after stop"
[ ! -e /var/run/tapback.pid ] || die "the pid file is left after stop"
rc=0
$initd status || rc=$?
[ "$rc" = 3 ] || die "status after stop: $rc"
$initd stop || die "second tapback-daemon stop"
vhd-util check -n /tmp/libxl.vhd
rm -f /tmp/libxl.vhd /tmp/libxl-ro.vhd
