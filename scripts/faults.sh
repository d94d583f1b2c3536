#!/bin/bash
# faults.sh: run the fault-injection tests (tests/faults.rs over NBD, tests/faults_blkif.rs
# over blkif) and print how many faults were injected at each point, by kind.
#
#   scripts/faults.sh [--no-run LOG]
#
# Each test case prints a line `faults-injected point/kind=N ...` (image::fault's
# Injector::summary); this sums them. With --no-run, reads a saved test log instead.
# Exit status: that of cargo test (1 if any test failed or no fault was counted).
set -u

src=$(cd "$(dirname "$0")/.." && pwd)
log=
if [ "${1:-}" = "--no-run" ]; then
    log=${2:?--no-run needs a log file}
elif [ $# -gt 0 ]; then
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
    [ "$1" = -h ] || [ "$1" = --help ]
    exit $?
fi

rc=0
if [ -z "$log" ]; then
    log=$(mktemp)
    trap 'rm -f "$log"' EXIT
    (cd "$src" && "${CARGO:-cargo}" test --test faults --test faults_blkif -- \
        --nocapture --test-threads=1) >"$log" 2>&1 || rc=1
    grep -E '^test result:|FAILED|panicked' "$log" | sed 's/^/  /'
fi

rows=$(grep -oE 'faults-injected( [a-z]+/[A-Za-z]+=[0-9]+)+' "$log" |
    tr ' ' '\n' | grep '=' |
    awk -F'[/=]' '{ n[$1 " " $2] += $3 } END { for (k in n) print k, n[k] }' | sort)
if [ -z "$rows" ]; then
    echo "faults: no injected fault counted" >&2
    exit 1
fi
printf '%-10s %-8s %8s\n' point fault injected
total=0
while read -r p f c; do
    printf '%-10s %-8s %8d\n' "$p" "$f" "$c"
    total=$((total + c))
done <<<"$rows"
echo "total: $total faults injected at $(cut -d' ' -f1 <<<"$rows" | sort -u | wc -l) points"
exit "$rc"
