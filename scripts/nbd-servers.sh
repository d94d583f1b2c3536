#!/usr/bin/env bash
# nbd-servers.sh: sourced by the NBD benchmarks (bench-ext4.sh, bench-memory.sh). One NBD
# server at a time, on a Unix socket:
#   start_tapdisk SPEC [NAME=VALUE...]  `tap-ctl create -a SPEC` (no kernel NBD device) with
#                            the extra environment given; sets sock, spid (the tapdisk)
#   start_qemu FORMAT FILE [OPTION...]  qemu-nbd -f FORMAT with the options on FILE
#   stop_server              the running one: tap-ctl destroy (kill if that fails) or kill
# The caller sets: ctl (control directory), work (scratch directory), TAPCTL, TAPDISK,
# srv_pin (a command prefix for the server: nice/taskset, may be empty) and die().
# shellcheck shell=bash disable=SC2154 # ctl, work and srv_pin come from the caller

start_tapdisk() {
    local spec=$1 out
    shift
    # shellcheck disable=SC2086
    out=$(env "$@" BLKTAP_CONTROL_DIR="$ctl" BLKTAP_NBD_DEVICE=0 BLKTAP_TAPDISK="$TAPDISK" \
        $srv_pin "$TAPCTL" create -a "$spec" 2>&1) || die "tap-ctl create -a $spec failed: $out"
    [[ $out =~ /nbd([0-9]+)\.[0-9]+$ ]] || die "tap-ctl create -a $spec printed '$out', not an NBD socket path"
    spid=${BASH_REMATCH[1]} sock=$out skind=tapdisk
    [ -S "$sock" ] || die "tap-ctl create -a $spec: no socket $sock"
}

start_qemu() {
    local fmt=$1 file=$2
    shift 2
    sock=$work/q.sock skind=qemu
    rm -f "$sock"
    # shellcheck disable=SC2086
    $srv_pin qemu-nbd -k "$sock" -f "$fmt" -t -e 8 "$@" "$file" 2>"$work/qemu.log" &
    spid=$!
    for _ in $(seq 250); do [ -S "$sock" ] && break; sleep 0.02; done
    [ -S "$sock" ] || { cat "$work/qemu.log" >&2; die "qemu-nbd -f $fmt $* $file did not start"; }
}

stop_server() {
    local pid=$spid
    spid=""
    if [ "$skind" = tapdisk ]; then
        BLKTAP_CONTROL_DIR=$ctl BLKTAP_NBD_DEVICE=0 "$TAPCTL" destroy -d "$sock" >/dev/null 2>&1 ||
            kill "$pid" 2>/dev/null || true
        for _ in $(seq 250); do [ -d "/proc/$pid" ] || break; sleep 0.02; done
        if [ -d "/proc/$pid" ]; then kill "$pid" 2>/dev/null || true; fi
    else
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    fi
}
