#!/usr/bin/env bash
# tests/hotplug/run.sh: scripts/block-vbd3 and init/tapback-daemon against stand-ins.
#   - a stand-in xenstore: xenstore-read/-write/-rm/-exists over a directory tree (one
#     directory per node, its value in a file), logging every call;
#   - start-stop-daemon: the real one, run once per implementation found (Debian's dpkg
#     one, and busybox's applet, which is what an OpenEmbedded image may carry);
#   - a stand-in tapback (tests/hotplug/standin-tapback.c, built with cc) that daemonises and
#     keeps its pid file the way tapback does;
#   - a stand-in modprobe that records its arguments.
# Usage: tests/hotplug/run.sh   (needs cc; prints "hotplug: N passed, M failed", exits 1 on
# any failure)
set -u
here=$(cd "$(dirname "$0")/../.." && pwd)
tmp=$(mktemp -d "${TMPDIR:-/tmp}/hotplug-test.XXXXXX")
passed=0
failed=0
started_pids=""

cleanup() {
    local p
    for p in $started_pids; do
        kill -KILL "$p" 2>/dev/null || true
    done
    rm -rf "$tmp"
}
trap cleanup EXIT

ok() { passed=$((passed + 1)); echo "ok   $*"; }
bad() { failed=$((failed + 1)); echo "FAIL $*"; }
# COMMAND; t DESCRIPTION: passes when COMMAND (the status just before the call) succeeded.
t() {
    local r=$?
    if [ "$r" = 0 ]; then ok "$1"; else bad "$1"; fi
}

# ---------------------------------------------------------------- the stand-in xenstore
mkdir -p "$tmp/bin" "$tmp/xs"
export XS_ROOT=$tmp/xs XS_LOG=$tmp/xs.log
cat >"$tmp/bin/xenstore-standin" <<'XS'
#!/bin/sh
# xenstore-read/-write/-rm/-exists over $XS_ROOT: node /a/b is the directory $XS_ROOT/a/b,
# its value the file .value in it. Relative paths are relative to /local/domain/0 (dom0's
# home). XS_FAIL_WRITE=1 makes writes fail. Every call is logged to $XS_LOG.
cmd=${0##*/}
echo "$cmd $*" >>"$XS_LOG"
node() {
    case $1 in
        *[!A-Za-z0-9/_@-]* | '' | *//*) echo "$cmd: invalid path '$1'" >&2; exit 1 ;;
        /*) echo "$XS_ROOT$1" ;;
        *) echo "$XS_ROOT/local/domain/0/$1" ;;
    esac
}
case $cmd in
    xenstore-read)
        [ $# -gt 0 ] || exit 1
        for k in "$@"; do
            d=$(node "$k") || exit 1
            [ -d "$d" ] || { echo "couldn't read path $k" >&2; exit 1; }
            [ ! -f "$d/.value" ] || cat "$d/.value"
            echo
        done
        ;;
    xenstore-exists)
        [ $# -gt 0 ] || exit 1
        for k in "$@"; do
            d=$(node "$k") || exit 1
            [ -d "$d" ] || exit 1
        done
        ;;
    xenstore-write)
        [ $# -ge 2 ] && [ $(($# % 2)) = 0 ] || { echo "usage" >&2; exit 1; }
        [ -z "${XS_FAIL_WRITE:-}" ] || { echo "could not write path" >&2; exit 1; }
        while [ $# -gt 0 ]; do
            d=$(node "$1") || exit 1
            mkdir -p "$d" && printf '%s' "$2" >"$d/.value" || exit 1
            shift 2
        done
        ;;
    xenstore-rm)
        for k in "$@"; do
            d=$(node "$k") || exit 1
            if [ -d "$d" ]; then
                rm -rf "$d"
            elif [ ! -d "${d%/*}" ]; then
                echo "could not remove $k" >&2
                exit 1
            fi
        done
        ;;
    *) echo "unknown stand-in $cmd" >&2; exit 1 ;;
esac
XS
chmod +x "$tmp/bin/xenstore-standin"
for c in read write rm exists; do
    ln -s xenstore-standin "$tmp/bin/xenstore-$c"
done
# A logger that fails: block-vbd3 then logs to stderr, which the tests keep.
printf '#!/bin/sh\nexit 1\n' >"$tmp/bin/logger"
chmod +x "$tmp/bin/logger"

xs_value() { cat "$XS_ROOT$1/.value" 2>/dev/null; }
xs_has() { [ -d "$XS_ROOT$1" ]; }
# xs_dump DIR: every node under DIR with its value, sorted (for before/after comparisons).
xs_dump() {
    (cd "$XS_ROOT" && find ".$1" -name .value -print | LC_ALL=C sort | while read -r f; do
        printf '%s=%s\n' "${f%/.value}" "$(cat "$f")"
    done)
}
xs_calls() { grep -c "^xenstore-$1 " "$XS_LOG" 2>/dev/null || true; }

BE=/local/domain/0/backend/vbd3/5/51712
FE=/local/domain/5/device/vbd/51712
# libxl_nodes [hotplug-status value]: the nodes OpenXT's libxl writes for a vbd3 disk
# (openxt-reference 2.3), hotplug-status only when given.
libxl_nodes() {
    rm -rf "$XS_ROOT/local"
    "$tmp/bin/xenstore-write" \
        "$FE/backend" "$BE" "$FE/backend-id" 0 "$FE/state" 1 "$FE/virtual-device" 51712 \
        "$FE/device-type" disk "$BE/frontend" "$FE" "$BE/frontend-id" 5 "$BE/online" 1 \
        "$BE/removable" 0 "$BE/bootable" 1 "$BE/state" 1 "$BE/dev" xvda "$BE/type" tap \
        "$BE/mode" w "$BE/device-type" disk "$BE/discard-enable" 1 \
        "$BE/physical-device" 2b:0 "$BE/tapdisk-params" vhd:/images/guest.vhd \
        ${1:+"$BE/hotplug-status"} ${1:+"$1"}
    : >"$XS_LOG"
}
# block_vbd3 ACTION [XENBUS_PATH]: the hotplug script as udev runs it (empty environment
# but for the uevent's variables); stderr to $tmp/hp.err, status in $rc.
block_vbd3() {
    env -i PATH="$tmp/bin:/usr/bin:/bin" XS_ROOT="$XS_ROOT" XS_LOG="$XS_LOG" \
        ${XS_FAIL_WRITE:+XS_FAIL_WRITE=1} ACTION="$1" XENBUS_PATH="${2-backend/vbd3/5/51712}" \
        XENBUS_TYPE=vbd3 XENBUS_BASE_PATH=backend SUBSYSTEM=xen-backend \
        sh "$here/scripts/block-vbd3" "$1" 2>"$tmp/hp.err"
    rc=$?
}

echo "== block-vbd3"
# add on OpenXT 9 (the toolstack leaves hotplug-status to the script).
libxl_nodes
before=$(xs_dump "$BE" | grep -v -e /hotplug-status= -e /hotplug-owner=)
fe_before=$(xs_dump /local/domain/5)
block_vbd3 add
[ "$rc" = 0 ]
t "add: exit 0"
[ "$(xs_value "$BE/hotplug-status")" = connected ]
t "add: hotplug-status=connected"
[ "$(xs_value "$BE/hotplug-owner")" = block-vbd3 ]
t "add: hotplug-owner=block-vbd3"
[ "$(xs_calls write)" = 1 ]
t "add: one xenstore-write (one transaction)"
[ "$(xs_dump "$BE" | grep -v -e /hotplug-status= -e /hotplug-owner=)" = "$before" ]
t "add: every other backend node unchanged"
[ "$(xs_dump /local/domain/5)" = "$fe_before" ]
t "add: frontend untouched"
[ "$(xs_dump "$BE" | wc -l)" = $(($(echo "$before" | wc -l) + 2)) ]
t "add: backend has exactly two new nodes"

# A second add (udevadm trigger, coldplug replay) writes nothing.
: >"$XS_LOG"
block_vbd3 add
[ "$rc" = 0 ] && [ "$(xs_calls write)" = 0 ]
t "add again: exit 0, no write"
[ "$(xs_value "$BE/hotplug-status")" = connected ]
t "add again: still connected"

# remove while the backend directory is still there: takes back its two nodes only.
block_vbd3 remove
[ "$rc" = 0 ]
t "remove: exit 0"
! xs_has "$BE/hotplug-status"
t "remove: hotplug-status removed"
! xs_has "$BE/hotplug-owner"
t "remove: hotplug-owner removed"
[ "$(xs_dump "$BE")" = "$before" ]
t "remove: every other backend node kept"
[ "$(xs_dump /local/domain/5)" = "$fe_before" ]
t "remove: frontend untouched"

# The kernel's order: the toolstack removes the directory, then udev runs remove.
libxl_nodes
block_vbd3 add
"$tmp/bin/xenstore-rm" "/local/domain/0/backend/vbd3/5"
: >"$XS_LOG"
block_vbd3 remove
[ "$rc" = 0 ]
t "remove after the directory went: exit 0"
[ "$(xs_calls write)" = 0 ] && [ ! -e "$XS_ROOT/local/domain/0/backend/vbd3/5" ]
t "remove after the directory went: nothing written or created"

# A late add event for a device the toolstack already removed re-creates nothing.
block_vbd3 add
[ "$rc" = 0 ] && [ "$(xs_calls write)" = 0 ]
t "late add: exit 0, nothing written"
[ ! -e "$XS_ROOT/local/domain/0/backend/vbd3/5" ]
t "late add: the backend stays gone"

# OpenXT 8: libxl wrote hotplug-status=connected itself; the script writes and removes nothing.
libxl_nodes connected
before=$(xs_dump /local)
block_vbd3 add
[ "$rc" = 0 ] && [ "$(xs_calls write)" = 0 ]
t "stable-8 add: exit 0, no write"
[ "$(xs_dump /local)" = "$before" ]
t "stable-8 add: store unchanged"
block_vbd3 remove
[ "$rc" = 0 ] && [ "$(xs_calls rm)" = 0 ] && [ "$(xs_dump /local)" = "$before" ]
t "stable-8 remove: libxl's hotplug-status kept"

# Someone else's hotplug-status (another script's error) is not clobbered.
libxl_nodes error
block_vbd3 add
[ "$rc" = 0 ] && [ "$(xs_value "$BE/hotplug-status")" = error ] && [ "$(xs_calls write)" = 0 ]
t "foreign hotplug-status: kept as 'error', no write"
grep -q "hotplug-status is 'error'" "$tmp/hp.err"
t "foreign hotplug-status: logged"

# An absolute XENBUS_PATH works the same.
libxl_nodes
block_vbd3 add "$BE"
[ "$rc" = 0 ] && [ "$(xs_value "$BE/hotplug-status")" = connected ]
t "absolute XENBUS_PATH: connected"

# Bad invocations: exit 1, nothing touched.
libxl_nodes
for p in "" backend/vbd/5/51712 "backend/vbd3/5/51712 x" backend/vbd3/5/../51712 backend/vbd3; do
    block_vbd3 add "$p"
    [ "$rc" = 1 ] && [ "$(xs_calls write)" = 0 ] && [ -s "$tmp/hp.err" ]
    t "XENBUS_PATH '$p' refused"
done
block_vbd3 online
[ "$rc" = 0 ] && [ ! -s "$XS_LOG" ]
t "other actions ignored"
XS_FAIL_WRITE=1 block_vbd3 add
[ "$rc" = 1 ] && grep -q "writing hotplug-status failed" "$tmp/hp.err"
t "failed write: exit 1"

echo "== xen-vbd3-backend.rules"
rule=$(grep -v -e '^#' -e '^[[:space:]]*$' "$here/udev/xen-vbd3-backend.rules")
[ "$(echo "$rule" | wc -l)" = 1 ]
t "one rule line"
# shellcheck disable=SC2016 # $env{ACTION} is udev's substitution, kept literally
[ "$rule" = 'SUBSYSTEM=="xen-backend", KERNEL=="vbd3*", RUN+="/etc/xen/scripts/block-vbd3 $env{ACTION}"' ]
t "rule matches xen-backend vbd3 devices and runs block-vbd3 \$env{ACTION}"

# ---------------------------------------------------------------- the init script
echo "== tapback-daemon"
cc -std=gnu99 -Wall -Wextra -Werror -o "$tmp/bin/tapback" "$here/tests/hotplug/standin-tapback.c" ||
    { bad "building the stand-in tapback"; echo "hotplug: $passed passed, $failed failed"; exit 1; }
printf '#!/bin/sh\necho "$*" >>"%s"\n' "$tmp/modprobe.log" >"$tmp/bin/modprobe"
chmod +x "$tmp/bin/modprobe"

# The start-stop-daemon implementations to run the init script with.
impls=""
real_ssd=$(PATH=$PATH:/usr/sbin:/sbin command -v start-stop-daemon || true)
if [ -n "$real_ssd" ] && "$real_ssd" --version 2>/dev/null | grep -q 'Debian'; then
    mkdir -p "$tmp/ssd-dpkg" && ln -s "$real_ssd" "$tmp/ssd-dpkg/start-stop-daemon"
    impls="$impls dpkg"
fi
bb=$(command -v busybox || true)
if [ -n "$bb" ] && "$bb" --list 2>/dev/null | grep -qx start-stop-daemon; then
    mkdir -p "$tmp/ssd-busybox"
    printf '#!/bin/sh\nexec %s start-stop-daemon "$@"\n' "$bb" >"$tmp/ssd-busybox/start-stop-daemon"
    chmod +x "$tmp/ssd-busybox/start-stop-daemon"
    impls="$impls busybox"
fi
[ -n "$impls" ] || bad "no start-stop-daemon found (dpkg or busybox)"

# initd IMPL ACTION [VAR=VALUE...]: the init script with stand-ins first on PATH; output in
# $out, status in $rc.
initd() {
    local impl=$1 action=$2
    shift 2
    out=$(env -i PATH="$tmp/ssd-$impl:$tmp/bin:/usr/bin:/bin" TAPBACK="$tmp/bin/tapback" \
        TAPBACK_PIDFILE="$tmp/run/tapback.pid" BLKTAP_CONTROL_DIR="$tmp/run/blktap-control" \
        STANDIN_LOG="$tmp/starts.log" "$@" sh "$here/init/tapback-daemon" "$action" 2>&1)
    rc=$?
}
pidfile_pid() { sed -n 1p "$tmp/run/tapback.pid" 2>/dev/null; }
alive() { [ -d "/proc/$1" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status"; }
# standins: pids of the live stand-in tapbacks.
standins() {
    local p
    for p in /proc/[0-9]*; do
        [ "$(readlink "$p/exe" 2>/dev/null)" = "$tmp/bin/tapback" ] && echo "${p#/proc/}"
    done
}
starts() { grep -c '^start ' "$tmp/starts.log" 2>/dev/null || true; }
remember() { started_pids="$started_pids $(standins | tr '\n' ' ')"; }

for impl in $impls; do
    echo "-- with $impl start-stop-daemon"
    rm -rf "$tmp/run" "$tmp/starts.log" "$tmp/modprobe.log"
    mkdir -p "$tmp/run"

    initd "$impl" status
    [ "$rc" = 3 ]
    t "$impl: status before start: 3"
    initd "$impl" stop
    [ "$rc" = 0 ] && [ -z "$(standins)" ]
    t "$impl: stop when not running: exit 0"

    initd "$impl" start
    remember
    pid=$(pidfile_pid)
    [ "$rc" = 0 ]
    t "$impl: start: exit 0"
    [ -n "$pid" ] && alive "$pid" && [ "$(cat "/proc/$pid/comm")" = tapback ]
    t "$impl: start: pid file names a live tapback"
    [ "$(standins)" = "$pid" ]
    t "$impl: start: exactly one daemon, the pid file's"
    grep -qx "start $pid -p $tmp/run/tapback.pid" "$tmp/starts.log"
    t "$impl: start: tapback got -p PIDFILE"
    [ "$(awk '{print $6}' "/proc/$pid/stat" 2>/dev/null)" = "$pid" ]
    t "$impl: start: daemon in its own session"
    [ "$(stat -c %a "$tmp/run/blktap-control" 2>/dev/null)" = 755 ]
    t "$impl: start: control directory created 0755"
    if [ -d /sys/module/nbd ]; then
        [ ! -e "$tmp/modprobe.log" ]
        t "$impl: start: nbd present, modprobe not run"
    else
        grep -qx -- "-q nbd" "$tmp/modprobe.log"
        t "$impl: start: modprobe -q nbd"
    fi

    initd "$impl" status
    [ "$rc" = 0 ] && echo "$out" | grep -q "pid $pid"
    t "$impl: status while running: 0 with the pid"

    initd "$impl" start
    [ "$rc" = 0 ]
    t "$impl: double start: exit 0"
    [ "$(standins)" = "$pid" ] && [ "$(starts)" = 1 ] && [ "$(pidfile_pid)" = "$pid" ]
    t "$impl: double start: no second daemon"

    initd "$impl" restart
    remember
    new=$(pidfile_pid)
    [ "$rc" = 0 ] && ! alive "$pid" && [ "$new" != "$pid" ] && [ "$(standins)" = "$new" ] && [ "$(starts)" = 2 ]
    t "$impl: restart: exit 0, the old daemon gone, one new one"
    pid=$new
    initd "$impl" force-reload
    remember
    new=$(pidfile_pid)
    [ "$rc" = 0 ] && ! alive "$pid" && [ "$(standins)" = "$new" ] && [ "$(starts)" = 3 ]
    t "$impl: force-reload: restarts"
    pid=$new

    initd "$impl" stop
    [ "$rc" = 0 ] && ! alive "$pid" && [ -z "$(standins)" ] && [ ! -e "$tmp/run/tapback.pid" ]
    t "$impl: stop: exit 0, daemon gone, pid file gone"
    initd "$impl" status
    [ "$rc" = 3 ]
    t "$impl: status after stop: 3"
    initd "$impl" stop
    [ "$rc" = 0 ]
    t "$impl: second stop: exit 0"

    # stop waits for a daemon that takes its time to exit.
    initd "$impl" start STANDIN_EXIT_DELAY_MS=1500
    remember
    pid=$(pidfile_pid)
    t0=$(date +%s%N)
    initd "$impl" stop
    t1=$(date +%s%N)
    [ "$rc" = 0 ] && [ -n "$pid" ] && ! alive "$pid" && [ ! -e "$tmp/run/tapback.pid" ] && [ $(((t1 - t0) / 1000000)) -ge 1400 ]
    t "$impl: stop waits for a slow exit (took $(((t1 - t0) / 1000000)) ms)"

    # A daemon ignoring SIGTERM is killed after TAPBACK_STOP_TIMEOUT; its pid file removed.
    initd "$impl" start STANDIN_IGNORE_TERM=1
    remember
    pid=$(pidfile_pid)
    initd "$impl" stop TAPBACK_STOP_TIMEOUT=1
    [ "$rc" = 0 ] && [ -n "$pid" ] && ! alive "$pid" && [ ! -e "$tmp/run/tapback.pid" ]
    t "$impl: stop kills a daemon ignoring SIGTERM"

    # A stale pid file (its process is not tapback): status 1; start starts a daemon anyway.
    sleep 30 &
    other=$!
    echo "$other" >"$tmp/run/tapback.pid"
    initd "$impl" status
    [ "$rc" = 1 ]
    t "$impl: stale pid file: status 1"
    initd "$impl" start
    remember
    pid=$(pidfile_pid)
    [ "$rc" = 0 ] && [ "$pid" != "$other" ] && alive "$pid" && alive "$other"
    t "$impl: stale pid file: start runs a new daemon, the other process untouched"
    initd "$impl" stop
    [ "$rc" = 0 ] && ! alive "$pid" && alive "$other"
    t "$impl: stale pid file: stop ends only tapback"
    kill "$other" 2>/dev/null
    wait "$other" 2>/dev/null

    # tapback failing at start-up: start fails and says why.
    initd "$impl" start STANDIN_FAIL=1
    [ "$rc" = 1 ] && echo "$out" | grep -q "start-up failed" && [ -z "$(standins)" ]
    t "$impl: failing tapback: start exits 1 with its error"
done

initd "${impls%% *}" reload
[ "$rc" = 3 ] && echo "$out" | grep -q Usage
t "unsupported action: usage, exit 3"
out=$(env -i PATH="$tmp/bin:/usr/bin:/bin" TAPBACK=/nonexistent/tapback sh "$here/init/tapback-daemon" start 2>&1)
rc=$?
[ "$rc" = 0 ] && [ -z "$out" ]
t "tapback not installed: exit 0, nothing done"

echo "hotplug: $passed passed, $failed failed"
[ "$failed" = 0 ]
