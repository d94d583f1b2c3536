#!/bin/bash
# Hostile peers on the real binaries (issue 13): one tapdisk (tap-ctl spawn) serving many VBDs
# (raw, dynamic VHD, encrypted VHD) over NBD while misbehaving NBD and control-socket peers
# attack it and verifier clients keep writing, flushing and reading back stamped data
# (examples/hostile_peers.rs). Prints a markdown table with tapdisk's peak RSS per scenario.
# See docs/reliability.md.
set -euo pipefail

usage() {
    cat <<USAGE
usage: scripts/hostile-peers.sh [--ci | --long] [--release] [--seed S] [--work DIR]
  --ci         32 VBDs, 300 extra clients, 4 s per scenario (default)
  --long       64 VBDs, 900 extra clients, 20 s per scenario, more of every peer
  --release    build and run the release binaries (default: debug)
  --seed S     seed (default: time-based; printed, rerun with it)
  --work DIR   scratch directory (default: a new one under /var/tmp, removed afterwards)
Runs under nice -n 10 as the user tapdisk runs as (it resets tapdisk's peak RSS through
/proc/PID/clear_refs and lowers its open-files limit with prlimit).
Exit status 0 = every check of every scenario passed.
USAGE
}

ROOT=$(cd "$(dirname "$0")/.." && pwd)
MODE=()
PROFILE=debug
SEED=()
WORK=
while [ $# -gt 0 ]; do
    case "$1" in
        --ci) MODE=() ;;
        --long) MODE=(--long) ;;
        --release) PROFILE=release ;;
        --seed) SEED=(--seed "${2:?--seed needs S}"); shift ;;
        --work) WORK=${2:?--work needs DIR}; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
    shift
done

cd "$ROOT"
BUILD=(cargo build --bins --example hostile_peers)
[ "$PROFILE" = release ] && BUILD+=(--release)
nice -n 10 "${BUILD[@]}"
BIN=$ROOT/target/$PROFILE

KEEP=1
if [ -z "$WORK" ]; then
    WORK=$(mktemp -d /var/tmp/hostile.XXXXXX)
    KEEP=0
fi
cleanup() {
    # A tapdisk still serving our control directory (only after a driver error).
    for s in "$WORK"/ctl/ctl[0-9]*; do
        [ -e "$s" ] || continue
        pid=${s##*/ctl}
        if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = tapdisk ]; then
            kill -9 "$pid" 2>/dev/null || true
        fi
    done
    [ "$KEEP" = 1 ] || rm -rf "$WORK"
}
trap cleanup EXIT

START=$(date +%s)
nice -n 10 "$BIN/examples/hostile_peers" --bindir "$BIN" --work "$WORK" "${MODE[@]}" "${SEED[@]}"
echo "hostile-peers.sh: passed in $(($(date +%s) - START)) s ($PROFILE binaries)"
