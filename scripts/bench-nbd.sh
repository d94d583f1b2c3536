#!/bin/bash
# bench-nbd.sh: our tapdisk NBD export against qemu-nbd on the same image (perf-anchors §6.1).
#
# Usage: scripts/bench-nbd.sh [IMAGE] [FORMAT] [REPS]
#   IMAGE   raw image to serve (default: a fresh deterministic one in /dev/shm/bench-nbd)
#   FORMAT  raw (default) or vpc (served by tapdisk as vhd:)
#   REPS    repetitions (default 3, or $REPS); reference and candidate alternate inside each one
# Environment:
#   SIZE=512M        size of the generated image
#   RUNTIME=3 RAMP=1 fio seconds per cell
#   PIN=same|cross|none   same: client and servers on CPU ${CPU:-1}; cross: servers on CPU 1,
#                    client on CPU 0; none: unpinned
#   WORKLOADS="name:rw:bs:qd ..."  (default: seq 1M QD8 read/write, 4k rand read/write QD1+QD32)
#   TAPDISK=path     tapdisk binary (default target/release/tapdisk, built if missing)
#   IO_THREADS=n     tapdisk I/O worker threads (TAPDISK3_IO_THREADS)
# Prints a table of medians (min-max), candidate/reference ratios and server CPU per op.
# Server CPU per op = (utime+stime of the server over the fio run, ramp included) /
#   (iops x (runtime + ramp)); for the 1M workloads it is reported per GB.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
FORMAT=${2:-raw}
REPS=${3:-${REPS:-3}}
SIZE=${SIZE:-512M}
RUNTIME=${RUNTIME:-3}
RAMP=${RAMP:-1}
PIN=${PIN:-same}
CPU=${CPU:-1}
WORKLOADS=${WORKLOADS:-"seqread:read:1M:8 seqwrite:write:1M:8 randread_qd1:randread:4k:1 randread_qd32:randread:4k:32 randwrite_qd1:randwrite:4k:1 randwrite_qd32:randwrite:4k:32"}
TAPDISK=${TAPDISK:-$here/target/release/tapdisk}

for t in qemu-nbd fio nbdcopy python3 taskset sha256sum; do
    command -v "$t" >/dev/null || { echo "bench-nbd: $t is required" >&2; exit 1; }
done
if [ ! -x "$TAPDISK" ]; then
    (cd "$here" && cargo build --release --bin tapdisk >&2)
fi

work=$(mktemp -d /dev/shm/bench-nbd.XXXXXX)
cleanup() {
    [ -n "${spid:-}" ] && kill "$spid" 2>/dev/null && wait "$spid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT

if [ -n "${1:-}" ]; then
    IMAGE=$1
else
    IMAGE=$work/rand.raw
    bytes=$(numfmt --from=iec "$SIZE")
    openssl enc -aes-128-ctr -pass pass:anchors -nosalt -pbkdf2 \
        -in <(head -c "$bytes" /dev/zero) -out "$IMAGE" 2>/dev/null
    if [ "$FORMAT" = vpc ]; then
        qemu-img convert -f raw -O vpc -o subformat=dynamic,force_size=on "$IMAGE" "$work/rand.vhd"
        IMAGE=$work/rand.vhd
    fi
fi
size_bytes=$(qemu-img info --output=json -f "$FORMAT" "$IMAGE" | python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])')

case $PIN in
    same) srv_pin="taskset -c $CPU"; cli_pin="taskset -c $CPU" ;;
    cross) srv_pin="taskset -c 1"; cli_pin="taskset -c 0" ;;
    *) srv_pin=""; cli_pin="" ;;
esac

# qemu-nbd with O_DIRECT when the placement supports it.
if dd if="$IMAGE" of=/dev/null bs=4096 count=1 iflag=direct 2>/dev/null; then
    QEMU_CACHE="--cache=none --aio=native"
else
    QEMU_CACHE="--cache=writeback --aio=threads"
fi
ttype=aio; [ "$FORMAT" = vpc ] && ttype=vhd

sock=$work/s.sock
start_server() { # $1 = ref|cand ; sets spid
    rm -f "$sock"
    if [ "$1" = ref ]; then
        # shellcheck disable=SC2086
        $srv_pin qemu-nbd -k "$sock" -f "$FORMAT" -t -e 8 $QEMU_CACHE "$IMAGE" &
        spid=$!
    else
        mkdir -p "$work/ctl"
        # shellcheck disable=SC2086
        BLKTAP_CONTROL_DIR=$work/ctl TAPDISK3_IO_THREADS=${IO_THREADS:-} \
            $srv_pin "$TAPDISK" -D --open "$ttype:$IMAGE" >/dev/null 2>"$work/td.log" &
        spid=$!
        for _ in $(seq 200); do [ -S "$work/ctl/nbd$spid.0" ] && break; sleep 0.02; done
        ln -sf "$work/ctl/nbd$spid.0" "$sock"
    fi
    for _ in $(seq 200); do [ -S "$sock" ] && break; sleep 0.02; done
    [ -S "$sock" ] || { echo "bench-nbd: server $1 did not start" >&2; exit 1; }
}
stop_server() {
    kill "$spid" 2>/dev/null || true
    wait "$spid" 2>/dev/null || true
    spid=
}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$spid/stat"; }
uri() { echo "nbd+unix:///?socket=$sock"; }

echo "# image $IMAGE ($FORMAT, $size_bytes bytes), PIN=$PIN, reps=$REPS, runtime=${RUNTIME}s+${RAMP}s ramp"
echo "# reference: qemu-nbd $QEMU_CACHE -e 8; candidate: $TAPDISK -D --open $ttype: (io threads ${IO_THREADS:-default})"

# Correctness gate: identical bytes from both servers.
declare -A sum
for s in ref cand; do
    start_server "$s"
    sum[$s]=$(nbdcopy "$(uri)" - | sha256sum | cut -d' ' -f1)
    stop_server
done
if [ "${sum[ref]}" != "${sum[cand]}" ]; then
    echo "bench-nbd: FAIL: exports differ (${sum[ref]} vs ${sum[cand]})" >&2
    exit 1
fi
echo "# identical exports: sha256 ${sum[ref]}"

results=$work/results.txt
: >"$results"
hz=$(getconf CLK_TCK)
for rep in $(seq "$REPS"); do
    order="ref cand"; [ $((rep % 2)) -eq 0 ] && order="cand ref"
    for wl in $WORKLOADS; do
        IFS=: read -r name rw bs qd <<<"$wl"
        for s in $order; do
            start_server "$s"
            t0=$(cpu_ticks)
            # shellcheck disable=SC2086
            $cli_pin fio --name=x --ioengine=nbd --uri="$(uri)" --size="$size_bytes" \
                --rw="$rw" --bs="$bs" --iodepth="$qd" --time_based --ramp_time="$RAMP" \
                --runtime="$RUNTIME" --randrepeat=0 --output-format=json \
                --output="$work/r.json" >/dev/null
            t1=$(cpu_ticks)
            stop_server
            python3 - "$work/r.json" "$name" "$s" "$((t1 - t0))" "$hz" "$RUNTIME" "$RAMP" "$bs" >>"$results" <<'EOF'
import json, sys
f, name, srv, ticks, hz, runtime, ramp, bs = sys.argv[1:]
j = json.load(open(f))["jobs"][0]
iops = j["read"]["iops"] + j["write"]["iops"]
bw = (j["read"]["bw_bytes"] + j["write"]["bw_bytes"]) / 1e6
cpu = int(ticks) / int(hz)
ops = iops * (float(runtime) + float(ramp))
per = (cpu / ops * 1e6) if ops else 0.0          # us per op
if bs.upper().endswith("M"):
    gb = bw * (float(runtime) + float(ramp)) / 1e3
    per = (cpu * 1e3 / gb) if gb else 0.0         # ms per GB
print(name, srv, f"{iops:.0f}", f"{bw:.1f}", f"{per:.2f}")
EOF
        done
    done
done

# nbdcopy of the whole export to null (4 connections), alternated too.
for rep in $(seq "$REPS"); do
    for s in ref cand; do
        start_server "$s"
        t0=$(date +%s.%N)
        $cli_pin nbdcopy "$(uri)" null:
        t1=$(date +%s.%N)
        stop_server
        echo "nbdcopy $s 0 $(python3 -c "print(f'{$size_bytes/($t1-$t0)/1e6:.1f}')") 0" >>"$results"
    done
done

python3 - "$results" <<'EOF'
import sys, statistics
rows = [l.split() for l in open(sys.argv[1])]
names = []
for r in rows:
    if r[0] not in names:
        names.append(r[0])
def cell(vals):
    return f"{statistics.median(vals):,.0f} ({min(vals):,.0f}-{max(vals):,.0f})"
print(f"| workload | qemu-nbd | tapdisk | tapdisk/qemu | server CPU/op qemu -> tapdisk |")
print("|---|---|---|---|---|")
for n in names:
    seq = n.startswith("seq") or n == "nbdcopy"
    col = 3 if seq else 2   # MB/s for sequential, IOPS for random
    unit = "MB/s" if seq else "IOPS"
    ref = [float(r[col]) for r in rows if r[0] == n and r[1] == "ref"]
    cand = [float(r[col]) for r in rows if r[0] == n and r[1] == "cand"]
    cref = [float(r[4]) for r in rows if r[0] == n and r[1] == "ref"]
    ccand = [float(r[4]) for r in rows if r[0] == n and r[1] == "cand"]
    ratio = statistics.median(cand) / statistics.median(ref) if statistics.median(ref) else 0
    cpu = "-" if n == "nbdcopy" else (
        f"{statistics.median(cref):.1f} -> {statistics.median(ccand):.1f} "
        + ("ms/GB" if seq else "us/IO"))
    print(f"| {n} ({unit}) | {cell(ref)} | {cell(cand)} | {ratio:.2f} | {cpu} |")
EOF
