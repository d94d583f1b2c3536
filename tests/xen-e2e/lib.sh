#!/bin/sh
# Helpers for the dom0 side of the Xen end-to-end tests (sourced).
# shellcheck shell=sh

B=/xen-e2e/bin
export BLKTAP_CONTROL_DIR=/run/blktap-control
export BLKTAP_TAPDISK=$B/tapdisk
export PATH="$B:$PATH"

say() { echo "XEN-E2E: $*"; }
die() {
    echo "FAIL: $*"
    df -h /tmp | sed 's/^/  df| /'
    [ ! -f /tmp/tapback.log ] || sed 's/^/  tapback| /' /tmp/tapback.log
    [ ! -f /tmp/messages ] || sed 's/^/  syslog| /' /tmp/messages
    exit 1
}

uptime_s() { cut -d' ' -f1 /proc/uptime; }

# wait_for SECONDS COMMAND...: until COMMAND succeeds, timed by /proc/uptime (TCG makes
# `sleep`-counting loops drift).
wait_for() {
    limit=$1
    shift
    end=$(awk -v u="$(uptime_s)" -v l="$limit" 'BEGIN {print u + l}')
    until "$@"; do
        if awk -v u="$(uptime_s)" -v e="$end" 'BEGIN {exit !(u > e)}'; then
            return 1
        fi
        sleep 0.2
    done
}

guest_gone() { ! xl domid "$1" >/dev/null 2>&1; }

# start_guest NAME MEM_MB EXTRA_CMDLINE: a paused PV guest booting the busybox initramfs with
# xen-blkfront, no disk in its config (the test writes the vbd3 nodes), GUEST_VCPUS vCPUs
# (default 1). Prints its domid.
start_guest() {
    cat >"/tmp/$1.cfg" <<CFG
name = "$1"
type = "pv"
kernel = "/boot/vmlinuz"
ramdisk = "/boot/domu.cpio"
extra = "console=hvc0 rdinit=/init loglevel=7 $3"
memory = $2
vcpus = ${GUEST_VCPUS:-1}
on_poweroff = "destroy"
on_crash = "destroy"
CFG
    xl create -p "/tmp/$1.cfg" >/dev/null || return 1
    xl domid "$1"
}

# write_vbd3 DOMID DEVID DEV TAPDISK_PARAMS MODE LOCATOR_KEY LOCATOR_VALUE [KEY VALUE...]: the
# frontend and backend nodes OpenXT's libxl writes for a vbd3 disk, in one transaction, with
# libxl's permissions. LOCATOR_KEY is physical-device (hex major:minor of /dev/nbdN, what libxl
# writes) or physical-device-path (the NBD socket); more backend KEY VALUE pairs may follow.
# hotplug-status=connected is written as OpenXT 8's libxl does, unless VBD3_HOTPLUG_STATUS is
# set: then its value, or no hotplug-status at all when it is empty (OpenXT 9 leaves that
# node to the block-vbd3 hotplug script).
write_vbd3() {
    fe=/local/domain/$1/device/vbd/$2
    be=/local/domain/0/backend/vbd3/$1/$2
    wv_dom=$1 wv_devid=$2 wv_dev=$3 wv_params=$4 wv_mode=$5 wv_key=$6 wv_value=$7
    shift 7
    # The extra pairs, rotated to the end with the backend directory in front of each key.
    wv_n=$#
    while [ "$wv_n" -ge 2 ]; do
        wv_k=$1 wv_v=$2
        shift 2
        set -- "$@" "$be/$wv_k" "$wv_v"
        wv_n=$((wv_n - 2))
    done
    hs=${VBD3_HOTPLUG_STATUS-connected}
    xenstore-write \
        "$fe/backend" "$be" "$fe/backend-id" 0 "$fe/state" 1 "$fe/virtual-device" "$wv_devid" \
        "$fe/device-type" disk \
        "$be/frontend" "$fe" "$be/frontend-id" "$wv_dom" "$be/online" 1 "$be/removable" 0 \
        "$be/bootable" 1 "$be/state" 1 "$be/dev" "$wv_dev" "$be/type" tap "$be/mode" "$wv_mode" \
        "$be/device-type" disk "$be/discard-enable" 1 "$be/$wv_key" "$wv_value" \
        "$be/tapdisk-params" "$wv_params" ${hs:+"$be/hotplug-status"} ${hs:+"$hs"} "$@" || return 1
    xenstore-chmod -r "$fe" "n$wv_dom" r0 || return 1
    xenstore-chmod -r "$be" n0 "r$wv_dom"
}

# start_tapback: tapback once, in the foreground logging to /tmp/tapback.log; with
# TAPBACK_DAEMON=1 as the init script starts it: a daemon with a pid file, logging to syslog
# (which dom0 keeps in /tmp/messages).
TAPBACK_PID=
start_tapback() {
    [ -z "${TAPBACK_PID:-}" ] || return 0
    if [ "${TAPBACK_DAEMON:-0}" = 1 ]; then
        tapback -v -p /run/tapback.pid || die "tapback did not start as a daemon"
        TAPBACK_PID=$(cat /run/tapback.pid)
        [ -d "/proc/$TAPBACK_PID" ] || die "tapback daemon $TAPBACK_PID is not running"
    else
        tapback -d -v >>/tmp/tapback.log 2>&1 &
        TAPBACK_PID=$!
    fi
}

# stop_tapback: SIGTERM, and wait until it has exited (a daemon removes its pid file).
stop_tapback() {
    [ -n "${TAPBACK_PID:-}" ] || return 0
    kill "$TAPBACK_PID"
    wait_for 10 tapback_gone || die "tapback $TAPBACK_PID did not exit on SIGTERM"
    if [ "${TAPBACK_DAEMON:-0}" = 1 ] && [ -e /run/tapback.pid ]; then
        die "the tapback daemon left its pid file"
    fi
    TAPBACK_PID=
}
tapback_gone() { [ ! -d "/proc/$TAPBACK_PID" ] || grep -q '^State:.*Z' "/proc/$TAPBACK_PID/status"; }

# backend_state BACKEND_DIR STATE: whether the backend is in XenbusState STATE.
backend_state() { [ "$(xenstore-read "$1/state" 2>/dev/null)" = "$2" ]; }

# vbd3_guest_start NAME IO MODE TAPDISK_PARAMS LOCATOR_KEY LOCATOR_VALUE [GUEST_ARGS]: a guest
# whose xvda is the vbd3 disk, running domu-init.sh with e2e.io=IO (and GUEST_ARGS on its
# command line). Returns once it runs, the backend having gone InitWait before it started;
# sets DOMID and BE (the backend directory).
vbd3_guest_start() {
    start_tapback
    DOMID=$(start_guest "$1" "${GUEST_MB:-96}" "e2e.io=$2 ${7:-}") || die "xl create $1"
    write_vbd3 "$DOMID" 51712 xvda "$4" "$3" "$5" "$6" || die "writing the vbd3 nodes"
    BE=/local/domain/0/backend/vbd3/$DOMID/51712
    wait_for 30 backend_state "$BE" 2 || die "backend never reached InitWait: $(xenstore-read "$BE/state")"
    xl unpause "$DOMID"
}

# vbd3_guest_finish NAME: waits for the guest started by vbd3_guest_start to end, checks
# that the backend went Closed after it left and removes the backend directory (as libxl
# would). Sets GUEST_MD5 from the guest's PASS line and RING to tapback's
# "ring (order ...) connected" line.
vbd3_guest_finish() {
    if ! wait_for 300 guest_gone "$1"; then
        xl destroy "$1" || true
        guest_log "$1" | sed 's/^/  guest| /'
        die "guest $1 did not finish"
    fi
    guest_log "$1" | grep -E 'DOMU|blkfront|xvda|Setting capacity' | sed 's/^/  guest| /'
    result=$(guest_log "$1" | tr -d '\r' | sed -n 's/^DOMU-RESULT: //p' | tail -n1)
    case $result in
        "PASS md5="*) export GUEST_MD5="${result#PASS md5=}" ;;
        *)
            guest_log "$1" | grep -v -E 'DOMU|blkfront|xvda|Setting capacity' | sed 's/^/  guest| /'
            die "guest $1: ${result:-no result}"
            ;;
    esac
    RING=$(cat /tmp/tapback.log /tmp/messages 2>/dev/null | grep "$DOMID/51712: ring (order" |
        tail -n1 | sed 's/.*: ring/ring/')
    echo "tapback: $RING"
    export RING
    wait_for 20 backend_state "$BE" 6 || die "backend state $(xenstore-read "$BE/state") after the guest left"
    xenstore-rm "/local/domain/0/backend/vbd3/$DOMID"
}

# run_vbd3_guest NAME IO MODE TAPDISK_PARAMS LOCATOR_KEY LOCATOR_VALUE [GUEST_ARGS]: both.
run_vbd3_guest() {
    vbd3_guest_start "$@"
    vbd3_guest_finish "$1"
}

# md5_at DEV MIB_OFFSET MIB_COUNT: md5 of a range read with O_DIRECT.
md5_at() {
    dd if="$1" bs=1M skip="$2" count="$3" iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1
}

# vbd_pid PATH: the pid of the tapdisk serving image PATH (tap-ctl list).
vbd_pid() {
    tap-ctl list | grep -F "$1" | tr ' ' '\n' | sed -n 's/^pid=//p' | head -n1
}

# physical_device DEV: hex major:minor of a block device, as libxl writes it.
physical_device() {
    printf '%x:%x\n' "$(stat -L -c '0x%t' "$1")" "$(stat -L -c '0x%T' "$1")"
}

# guest_log NAME: what the guest printed on its console.
guest_log() { cat "/var/log/xen/console/guest-$1.log" 2>/dev/null; }
