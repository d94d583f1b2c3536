#!/bin/bash
# hostile-xen.sh: hostile Xen peers against the real binaries and the real request path,
# and a markdown table of what the others saw and the memory used.
#
#   scripts/hostile-xen.sh [--release] [--no-run LOG]
#
# Runs tests/tapback_hostile.rs (the real tapback binary, a fake xenstored and a fake
# tapdisk; one guest feeds it contradictory values while others connect),
# tests/xenstore_event_bound.rs (the xenstore client's bounded event queue) and
# tests/xenio_flood.rs (tapdisk's blkif path on simulated Xen: one guest floods its ring
# while another does verified I/O). Each scenario prints a `HOSTILE-XEN|...` line; this
# collects them. With --no-run, reads a saved test log instead.
# Exit status: 1 if any test failed or no scenario line was printed.
set -u

src=$(cd "$(dirname "$0")/.." && pwd)
log=
profile=()
while [ $# -gt 0 ]; do
    case "$1" in
    --release) profile=(--release) ;;
    --no-run)
        log=${2:?--no-run needs a log file}
        shift
        ;;
    *)
        sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
        [ "$1" = -h ] || [ "$1" = --help ]
        exit $?
        ;;
    esac
    shift
done

rc=0
if [ -z "$log" ]; then
    log=$(mktemp)
    trap 'rm -f "$log"' EXIT
    # One test at a time: each measures the peak RSS of a process of its own (tapback) or
    # of the test process itself (the in-process tapdisk).
    for t in tapback_hostile xenstore_event_bound xenio_flood; do
        (cd "$src" && "${CARGO:-cargo}" test "${profile[@]}" --test "$t" -- \
            --nocapture --test-threads=1) >>"$log" 2>&1 || rc=1
    done
    grep -E '^test result:|FAILED|panicked' "$log" | sed 's/^/  /' >&2
fi
# A saved log counts its failures too.
if grep -qE '^test result: FAILED|panicked' "$log"; then
    rc=1
fi

rows=$(grep -oE 'HOSTILE-XEN\|.*' "$log")
if [ -z "$rows" ]; then
    echo "hostile-xen: no scenario line found" >&2
    exit 1
fi
echo "| scenario | hostile peers | what the others saw | peak RSS (MiB) of tapback / tapdisk-under-test | data lost |"
echo "|---|---|---|---|---|"
while IFS='|' read -r _ scenario peers others rss lost; do
    echo "| $scenario | $peers | $others | $rss | $lost |"
done <<<"$rows"
lost=$(awk -F'|' '$6 != 0 { n++ } END { print n + 0 }' <<<"$rows")
if [ "$lost" -ne 0 ]; then
    echo "hostile-xen: $lost scenarios lost data" >&2
    rc=1
fi
exit "$rc"
