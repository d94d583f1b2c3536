#!/bin/bash
# bench-nbd-all.sh: run issue 12's ext4 benchmark (scripts/bench-ext4.sh), its memory
# measurement (scripts/bench-memory.sh) and every scripts/bench-nbd.sh mode in sequence and
# write the results file.
#
# Usage: scripts/bench-nbd-all.sh [OUT]     (OUT default: docs/benchmarks.md; a "## Reading"
#        section at its end is kept when the file is regenerated, and so is the section of
#        every run that has no log in LOGDIR, so runs can be redone one by one)
# Environment:
#   REPS=2 RUNTIME=3    per bench-nbd.sh mode (passed to bench-nbd.sh)
#   EXT4_ARGS=""        options for bench-ext4.sh (e.g. "--quick", "--reps 5 --tmpfs")
#   MEMORY_ARGS=""      options for bench-memory.sh (e.g. "--quick")
#   EXT4_DIR=/var/tmp   directory on the real filesystem (--dir of both scripts above)
#   ONLY="ext4 ..."     run only these runs (names below); the results file is written from
#                       the logs of every run present in LOGDIR
#   LOGDIR=target/bench-nbd-logs   where each run's output is kept (<name>.final)
#   LOADMAX=2 QUIET_WAIT=30     before each run wait up to QUIET_WAIT s for the 1-min load
#                       average to fall below LOADMAX; a run that started above LOADMAX is
#                       re-run once (RERUN=1, the default) and the run that started with the
#                       lowest load is kept (a kept result from an earlier invocation competes)
# Runs:
#   ext4                issue 12's targets: scripts/bench-ext4.sh $EXT4_ARGS (raw, allocated
#                       dynamic VHD, encrypted VHD on ext4; tap-ctl create vs qemu-nbd
#                       --cache=none --aio=native vs the fio libaio O_DIRECT ceiling)
#   memory              scripts/bench-memory.sh $MEMORY_ARGS (RSS per VBD, page-cache growth)
#   (name: placement, bench-nbd.sh mode, pinning, qemu-nbd cache; reported only, no target:)
#   shm-raw shm-vpc shm-enc shm-alloc   /dev/shm (tmpfs + O_DIRECT), PIN=same
#   shm-enc128                          shm-enc with a 256-bit key (XTS-AES-128) instead of 512
#   shm-encq                            the encrypted VHD, ours (decrypting) against qemu-nbd
#                                       serving the same file (ciphertext: it cannot decrypt)
# (The former ext4-* runs of bench-nbd.sh are superseded by "ext4"; bench-nbd.sh still takes
# DIR=/var/tmp for them.)
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-$here/docs/benchmarks.md}
REPS=${REPS:-2}
RUNTIME=${RUNTIME:-3}
EXT4_DIR=${EXT4_DIR:-/var/tmp}
EXT4_ARGS=${EXT4_ARGS:-}
MEMORY_ARGS=${MEMORY_ARGS:-}
read -ra ext4_args <<<"$EXT4_ARGS"
read -ra memory_args <<<"$MEMORY_ARGS"
LOADMAX=${LOADMAX:-2}
QUIET_WAIT=${QUIET_WAIT:-30}
RERUN=${RERUN:-1}
RUNS="ext4:$EXT4_DIR:ext4 memory:$EXT4_DIR:memory shm-raw:/dev/shm:raw:same:none shm-vpc:/dev/shm:vpc:same:none shm-enc:/dev/shm:enc:same:none shm-enc128:/dev/shm:enc:same:none:256 shm-encq:/dev/shm:encq:same:none shm-alloc:/dev/shm:alloc:same:none"
ONLY=${ONLY:-}

(cd "$here" && cargo build --release --bin tapdisk --bin tap-ctl --bin vhd-util >&2)
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
    local cmd
    case $3 in
        ext4) cmd=("$here/scripts/bench-ext4.sh" --dir "$2" "${ext4_args[@]}") ;;
        memory) cmd=("$here/scripts/bench-memory.sh" --dir "$2" "${memory_args[@]}") ;;
        *) cmd=(env DIR="$2" PIN="$4" QEMU_CACHE="$6" KEYBITS="${7:-512}" REPS="$REPS" RUNTIME="$RUNTIME" "$here/scripts/bench-nbd.sh" "" "$3") ;;
    esac
    "${cmd[@]}" >"$logs/$1.$5" 2>&1 || {
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

# A hand-written "## Reading" section (to the end of the file) survives regeneration, and so
# does the section of a run that has no log here.
reading="" old=""
if [ -f "$OUT" ]; then
    reading=$(sed -n '/^## Reading/,$p' "$OUT")
    old=$(cat "$OUT")
fi
section_of() { # NAME: its "## NAME" section in the previous file, to the next "## " heading
    awk -v h="## $1" '$0 == h {on = 1; next} on && /^## / {exit} on {print}' <<<"$old" | sed '/./,$!d'
}
command_of() { # NAME DIR MODE PIN CACHE KEYBITS
    local kept
    # A kept bench-ext4/bench-memory section says how it was run.
    if [ ! -f "$logs/$1.final" ]; then
        kept=$(section_of "$1" | sed -n 's/^    command: //p' | head -1)
        if [ -n "$kept" ]; then echo "$kept   # $1"; return; fi
    fi
    case $3 in
        ext4) echo "scripts/bench-ext4.sh --dir $2${EXT4_ARGS:+ $EXT4_ARGS}   # $1" ;;
        memory) echo "scripts/bench-memory.sh --dir $2${MEMORY_ARGS:+ $MEMORY_ARGS}   # $1" ;;
        *) echo "DIR=${2/#$here\//} PIN=$4 QEMU_CACHE=$5${6:+ KEYBITS=$6} REPS=$REPS RUNTIME=$RUNTIME scripts/bench-nbd.sh \"\" $3   # $1" ;;
    esac
}
cpu_model=$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
{
    echo "# NBD benchmarks: tapdisk's NBD export on ext4 against qemu-nbd and the storage (issue 12), tapdisk's memory, and the tmpfs tables"
    echo
    echo "Generated by \`scripts/bench-nbd-all.sh\`. This invocation:"
    echo
    echo "- date: $(date -u '+%F %T') UTC; commit: $(git -C "$here" rev-parse --short HEAD); load at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "- machine: $(nproc) CPUs, $cpu_model; $(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo); crypto flags: $(grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -xE 'aes|vaes|vpclmulqdq|avx2|avx512f' | tr '\n' ' '); kernel $(uname -r)"
    echo "- peers: $(qemu-nbd --version | head -1); $(fio --version); nbdcopy $(nbdcopy --version | head -1 | awk '{print $2}')"
    echo
    echo "Every section starts with its own start time, commit and load (sections of runs not redone"
    echo "by this invocation are kept from the previous file). Method of the \`ext4\` section: see"
    echo "\`scripts/bench-ext4.sh --help\` and the Reading section; it carries issue 12's targets. The"
    echo "\`shm-*\` sections (tmpfs, \`scripts/bench-nbd.sh\`) are reported only: their cells are medians"
    echo "(min-max) of the repetitions, MB/s for seq/nbdcopy rows (1 MiB, QD8), IOPS for 4 KiB rows, server"
    echo "CPU in us per I/O (ms per GB for 1 MiB rows), ratio = candidate/reference."
    echo
    echo "Commands (from the repository root):"
    echo
    echo '```sh'
    for r in $RUNS; do
        IFS=: read -r name dir mode pin cache keybits <<<"$r"
        if [ -f "$logs/$name.final" ] || [ -n "$(section_of "$name")" ]; then
            command_of "$name" "$dir" "$mode" "$pin" "$cache" "$keybits"
        fi
    done
    echo '```'
    for r in $RUNS; do
        IFS=: read -r name _ <<<"$r"
        if [ -f "$logs/$name.final" ]; then
            body=$(grep '^#' "$logs/$name.final" | sed 's/^# */    /'
                echo
                grep -v '^#' "$logs/$name.final" | sed '/./,$!d')
        else
            body=$(section_of "$name")
        fi
        [ -n "$body" ] || continue
        echo
        echo "## $name"
        echo
        echo "$body"
    done
    if [ -n "$reading" ]; then
        echo
        echo "$reading"
    fi
} >"$OUT.new"
mv "$OUT.new" "$OUT"
echo "bench-nbd-all: wrote $OUT" >&2
