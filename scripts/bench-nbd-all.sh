#!/bin/bash
# bench-nbd-all.sh: run every scripts/bench-nbd.sh mode in sequence and write the results file.
#
# Usage: scripts/bench-nbd-all.sh [OUT]     (OUT default: docs/benchmarks.md; a "## Reading"
#        section at its end is kept when the file is regenerated)
# Environment:
#   REPS=2 RUNTIME=3    per mode (passed to bench-nbd.sh)
#   EXT4_DIR=target/bench-nbd   directory on the real filesystem for the ext4 placement
#   ONLY="shm-raw ..."  run only these runs (names below); the results file is written from
#                       the logs of every run present in LOGDIR, so runs can be redone one by one
#   LOGDIR=target/bench-nbd-logs   where each run's output is kept (<name>.final)
#   LOADMAX=2 QUIET_WAIT=30     before each run wait up to QUIET_WAIT s for the 1-min load
#                       average to fall below LOADMAX; a run that started above LOADMAX is
#                       re-run once (RERUN=1, the default) and the run that started with the
#                       lowest load is kept (a kept result from an earlier invocation competes)
# Runs (name: placement, mode, pinning, qemu-nbd cache):
#   shm-raw shm-vpc shm-enc shm-alloc   /dev/shm (tmpfs + O_DIRECT), PIN=same  (gated)
#   shm-enc128                          shm-enc with a 256-bit key (XTS-AES-128) instead of 512
#   shm-encq                            the encrypted VHD, ours (decrypting) against qemu-nbd
#                                       serving the same file (ciphertext: it cannot decrypt)
#   ext4-raw ext4-vpc ext4-alloc        $EXT4_DIR (ext4; qemu-nbd O_DIRECT), PIN=cross (reported)
#   ext4-raw-wb ext4-vpc-wb             the same with qemu-nbd --cache=writeback: like for like,
#                                       since our tapdisk opens images without O_DIRECT
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-$here/docs/benchmarks.md}
REPS=${REPS:-2}
RUNTIME=${RUNTIME:-3}
EXT4_DIR=${EXT4_DIR:-$here/target/bench-nbd}
LOADMAX=${LOADMAX:-2}
QUIET_WAIT=${QUIET_WAIT:-30}
RERUN=${RERUN:-1}
RUNS="shm-raw:/dev/shm:raw:same:none shm-vpc:/dev/shm:vpc:same:none shm-enc:/dev/shm:enc:same:none shm-enc128:/dev/shm:enc:same:none:256 shm-encq:/dev/shm:encq:same:none shm-alloc:/dev/shm:alloc:same:none ext4-raw:$EXT4_DIR:raw:cross:none ext4-vpc:$EXT4_DIR:vpc:cross:none ext4-alloc:$EXT4_DIR:alloc:cross:none ext4-raw-wb:$EXT4_DIR:raw:cross:writeback ext4-vpc-wb:$EXT4_DIR:vpc:cross:writeback"
ONLY=${ONLY:-}

(cd "$here" && cargo build --release --bin tapdisk --bin vhd-util >&2)
mkdir -p "$(dirname "$OUT")" "$EXT4_DIR"
logs=${LOGDIR:-$here/target/bench-nbd-logs}
mkdir -p "$logs"

load1() { cut -d' ' -f1 /proc/loadavg; }
above() { python3 -c "import sys; sys.exit(0 if float('$1') > float('$2') else 1)"; }
wait_quiet() {
    local t=0
    while above "$(load1)" "$LOADMAX" && [ "$t" -lt "$QUIET_WAIT" ]; do sleep 5; t=$((t + 5)); done
}

# One run of a mode; its output goes to $logs/$name.N; prints the load at its start.
run_one() { # name dir mode pin n cache keybits
    local l
    wait_quiet
    l=$(load1)
    echo "== $1 (try $5): start load $l" >&2
    DIR=$2 PIN=$4 QEMU_CACHE=$6 KEYBITS=${7:-512} REPS=$REPS RUNTIME=$RUNTIME "$here/scripts/bench-nbd.sh" "" "$3" >"$logs/$1.$5" 2>&1 || {
        cat "$logs/$1.$5" >&2
        echo "bench-nbd-all: $1 failed" >&2
        exit 1
    }
    echo "$l" >"$logs/$1.$5.load"
}

for r in $RUNS; do
    IFS=: read -r name dir mode pin cache keybits <<<"$r"
    if [ -n "$ONLY" ] && [[ " $ONLY " != *" $name "* ]]; then continue; fi
    # A result kept from an earlier invocation competes as try 0.
    tries=""
    rm -f "$logs/$name".[0-2] "$logs/$name".[0-2].load
    if [ -f "$logs/$name.final" ] && [ -f "$logs/$name.final.load" ]; then
        grep -v '^# tries started' "$logs/$name.final" >"$logs/$name.0"
        mv "$logs/$name.final.load" "$logs/$name.0.load"
        tries=0
    fi
    run_one "$name" "$dir" "$mode" "$pin" 1 "$cache" "$keybits"
    tries="$tries 1"
    if [ "$RERUN" = 1 ] && above "$(cat "$logs/$name.1.load")" "$LOADMAX"; then
        run_one "$name" "$dir" "$mode" "$pin" 2 "$cache" "$keybits"
        tries="$tries 2"
    fi
    keep=1 note=""
    for t in $tries; do
        note="$note try $t at $(cat "$logs/$name.$t.load");"
        if above "$(cat "$logs/$name.$keep.load")" "$(cat "$logs/$name.$t.load")"; then keep=$t; fi
    done
    cp "$logs/$name.$keep" "$logs/$name.final"
    cp "$logs/$name.$keep.load" "$logs/$name.final.load"
    if [ "$tries" != " 1" ]; then
        echo "# tries started at loads:$note kept try $keep (the lowest start load)" >>"$logs/$name.final"
    fi
    cat "$logs/$name.final" >&2
done

# A hand-written "## Reading" section (to the end of the file) survives regeneration.
reading=""
[ -f "$OUT" ] && reading=$(sed -n '/^## Reading/,$p' "$OUT")
cpu_model=$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
{
    echo "# NBD benchmarks: our tapdisk against qemu-nbd (and our encrypted VHD against our plain VHD and against qemu-nbd serving its ciphertext)"
    echo
    echo "Generated by \`scripts/bench-nbd-all.sh\` (protocol: perf-anchors §6)."
    echo
    echo "- date: $(date -u '+%F %T') UTC"
    echo "- commit: $(git -C "$here" rev-parse --short HEAD)"
    echo "- machine: $(nproc) CPUs, $cpu_model; $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo); crypto flags: $(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -xE 'aes|vaes|vpclmulqdq|avx2|avx512f' | tr '\n' ' '); kernel $(uname -r)"
    echo "- peers: $(qemu-nbd --version | head -1); $(fio --version); nbdcopy $(nbdcopy --version | head -1 | awk '{print $2}')"
    echo "- tapdisk: \`target/release/tapdisk -D --open TYPE:PATH\` (release build, default I/O threads)"
    echo "- per mode: REPS=$REPS, RUNTIME=${RUNTIME}s; A/B alternated in each repetition; identical-bytes check (sha256 of the whole export) before timing (encq: ours must return the plaintext, qemu-nbd the ciphertext)"
    echo
    echo "Cells are medians (min-max) of the repetitions: MB/s for seq/nbdcopy rows (1 MiB, QD8), IOPS for"
    echo "4 KiB random rows. Server CPU/op is the server process's utime+stime (all threads) over the fio"
    echo "run divided by the operations done (us per I/O; ms per GB for 1 MiB rows). Ratio ="
    echo "candidate/reference. Only the tmpfs rows are gated; ext4 rows are reported."
    echo
    echo "Commands (from the repository root):"
    echo
    echo '```sh'
    for r in $RUNS; do
        IFS=: read -r name dir mode pin cache keybits <<<"$r"
        [ -f "$logs/$name.final" ] || continue
        echo "DIR=${dir/#$here\//} PIN=$pin QEMU_CACHE=$cache${keybits:+ KEYBITS=$keybits} REPS=$REPS RUNTIME=$RUNTIME scripts/bench-nbd.sh \"\" $mode   # $name"
    done
    echo '```'
    for r in $RUNS; do
        IFS=: read -r name dir mode pin cache <<<"$r"
        [ -f "$logs/$name.final" ] || continue
        echo
        echo "## $name"
        echo
        grep '^#' "$logs/$name.final" | sed 's/^# */    /'
        echo
        grep '^|' "$logs/$name.final"
    done
    if [ -n "$reading" ]; then
        echo
        echo "$reading"
    fi
} >"$OUT"
echo "bench-nbd-all: wrote $OUT" >&2
