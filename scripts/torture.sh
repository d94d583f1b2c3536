#!/bin/bash
# Kill torture on the real binaries (issue 13): tapdisk serving a dynamic VHD, an encrypted VHD
# and a differencing leaf over NBD is SIGKILLed at random moments (often just after a write that
# allocates a block); after each kill vhd-util check (or repair, recorded), tap-ctl create
# again, and every sector is verified against the driver's model (examples/torture.rs).
# Models process death; power cuts: scripts/torture-powercut-vm.sh. See docs/reliability.md.
set -euo pipefail

usage() {
    cat <<EOF
usage: scripts/torture.sh [--ci | --long N | --self-test] [--release] [--seed S] [--work DIR]
  --ci         driver self-test, then 200 kill points (default)
  --long N     N kill points
  --self-test  only the self-test: writes behind the model's back must be reported
  --release    build and run the release binaries (default: debug)
  --seed S     seed (default: time-based; printed, rerun with it)
  --work DIR   scratch directory (default: a new one under /var/tmp, removed afterwards)
Runs under nice -n 10. Exit status 0 = every kill point passed.
EOF
}

ROOT=$(cd "$(dirname "$0")/.." && pwd)
MODE=ci
KILLS=200
PROFILE=debug
SEED=()
WORK=
while [ $# -gt 0 ]; do
    case "$1" in
        --ci) MODE=ci; KILLS=200 ;;
        --long) MODE=long; KILLS=${2:?--long needs N}; shift ;;
        --self-test) MODE=self ;;
        --release) PROFILE=release ;;
        --seed) SEED=(--seed "${2:?--seed needs S}"); shift ;;
        --work) WORK=${2:?--work needs DIR}; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; exit 2 ;;
    esac
    shift
done

cd "$ROOT"
BUILD=(cargo build --bins --example torture)
[ "$PROFILE" = release ] && BUILD+=(--release)
nice -n 10 "${BUILD[@]}"
BIN=$ROOT/target/$PROFILE
DRIVER=$BIN/examples/torture

KEEP=1
if [ -z "$WORK" ]; then
    WORK=$(mktemp -d /var/tmp/torture.XXXXXX)
    KEEP=0
fi
cleanup() {
    # Any tapdisk still serving our control directory (only after a driver error).
    for s in "$WORK"/*/ctl/ctl[0-9]*; do
        [ -e "$s" ] || continue
        pid=${s##*/ctl}
        if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = tapdisk ]; then
            kill -9 "$pid" 2>/dev/null || true
        fi
    done
    [ "$KEEP" = 1 ] || rm -rf "$WORK"
}
trap cleanup EXIT

selftest() {
    echo "== self-test: writes behind the model's back must be reported as garbage and data lost"
    set +e
    out=$(nice -n 10 "$DRIVER" --bindir "$BIN" --work "$WORK/self" --kills 30 \
        --rounds-per-image 10 --inject 3 "${SEED[@]}" 2>&1)
    rc=$?
    set -e
    printf '%s\n' "$out" | grep -v '^  VIOLATION' | sed 's/^/  | /'
    if [ "$rc" != 1 ] || ! printf '%s\n' "$out" | grep -q '^data lost (sectors): [1-9]' ||
        ! printf '%s\n' "$out" | grep -q '^garbage read (sectors): [1-9]'; then
        echo "SELF-TEST FAILED: the driver did not catch injected corruption (exit $rc)" >&2
        exit 1
    fi
    echo "self-test ok: injected corruption caught (exit 1)"
}

START=$(date +%s)
case "$MODE" in
    self) selftest ;;
    ci)
        selftest
        echo "== kill torture: $KILLS kill points"
        nice -n 10 "$DRIVER" --bindir "$BIN" --work "$WORK/run" --kills "$KILLS" "${SEED[@]}"
        ;;
    long)
        echo "== kill torture: $KILLS kill points"
        nice -n 10 "$DRIVER" --bindir "$BIN" --work "$WORK/run" --kills "$KILLS" "${SEED[@]}"
        ;;
esac
echo "torture.sh $MODE: passed in $(($(date +%s) - START)) s ($PROFILE binaries)"
