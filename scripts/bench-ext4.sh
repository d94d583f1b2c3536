#!/bin/bash
# bench-ext4.sh: issue 12's NBD benchmark. tapdisk's NBD export, started as a user starts it
# (`tap-ctl create -a TYPE:PATH`), against `qemu-nbd --cache=none --aio=native` on the same file
# on ext4, and against the storage itself (fio --ioengine=libaio --direct=1 on the raw file).
#
# Usage: scripts/bench-ext4.sh [options]
#   --dir DIR        where the images live (default /var/tmp). Must not be tmpfs: the issue
#                    measures the filesystem OpenXT keeps its VHDs on (this machine's / is ext4);
#                    another filesystem than ext2/3/4 runs with a warning
#   --size SIZE      virtual size of every image (default 1G; --quick: 512M)
#   --reps N         repetitions (default 3; --quick: 2). In each repetition every workload runs
#                    on every server in turn; the order reverses in every other repetition
#                    (tapdisk, qemu-nbd, ..., then ..., qemu-nbd, tapdisk)
#   --runtime S      seconds per fio run (default 5; --quick: 2); no ramp: the server's CPU is
#                    counted over exactly the operations fio reports
#   --quick          short smoke run (sizes, reps and runtime above)
#   --images LIST    comma-separated, default raw,vhd,enc:
#                      raw  a raw file of random data (aio:, qemu-nbd -f raw)
#                      vhd  a fully allocated dynamic VHD made as OpenXT makes them: vhd-util
#                           create, then the raw file's bytes written in order through its own
#                           export (tap-ctl create; nbdcopy -C 1 -R 1); vhd:, qemu-nbd -f vpc
#                      enc  the same with a 512-bit XTS key (vhd-util key -s, the key in
#                           TAPDISK3_CRYPTO_KEYDIR); compared with our plain VHD (qemu-nbd cannot
#                           read OpenXT's encryption), so it needs vhd
#   --qemu-vhd       make the vhd image with qemu-img convert -O vpc -o subformat=dynamic,
#                    force_size=on instead (no batmap; enc keeps the vhd-util layout)
#   --workloads LIST "name:rw:bs:qd ..." (default: seqread:read:1M:8 seqwrite:write:1M:8
#                    randread_qd1:randread:4k:1 randread_qd32:randread:4k:32
#                    randwrite_qd1:randwrite:4k:1 randwrite_qd32:randwrite:4k:32)
#   --pin same|cross|none  same (default): servers and fio on CPU --cpu; cross: servers on CPU 1,
#                    fio on CPU 0; none: unpinned. As root everything runs at nice -n -15
#   --cpu N          the CPU for --pin same (default 1)
#   --tmpfs          add a raw image on /dev/shm as an extra row, reported only (no target)
#   --engines LIST   comma-separated tapdisk I/O engines (TAPDISK3_IO values: uring, aio,
#                    threads), each a server of its own in the same alternating run, with its
#                    own rows (default: one tapdisk with the environment's TAPDISK3_IO)
#   --bindir DIR     tapdisk, tap-ctl and vhd-util (default target/release, built when missing)
#   -h, --help       this text
# Environment: TAPDISK3_DIRECT_IO and the other TAPDISK3_* variables reach tapdisk (tap-ctl
# passes its environment on); the header line says what the image's file descriptor really has.
#
# Method: every image is checked first (sha256 of the whole export from each server equals the
# raw file's). Before every fio run: sync and `echo 3 > /proc/sys/vm/drop_caches` (said in the
# header when not permitted), so reads reach the disk. The client is fio's nbd engine
# (--ioengine=nbd --uri=nbd+unix:///?socket=...) with the same job for both servers; the
# ceiling is the same job with --ioengine=libaio --direct=1 --filename=<the raw file> (also the
# ceiling for the VHD rows: same filesystem, same size; fio must not write a VHD's metadata).
# Server CPU per I/O: utime+stime of the server process (all threads, /proc/PID/stat) over the
# fio run / the I/Os fio completed; the ceiling's is fio's own usr+sys.
# Prints a markdown table of medians: IOPS (4k rows) or MB/s (1M rows), ratios tapdisk/qemu-nbd
# and tapdisk/ceiling, CPU per I/O, the issue's target and met/not met. Targets: raw and VHD
# >= 1.0x qemu-nbd with less CPU per I/O on every row, and >= 0.8x the ceiling on the QD32 rows;
# encrypted VHD >= 0.9x our plain VHD on 4k rows, >= 0.8x on 1M rows. Exit status 0 when the
# run completed, whatever the verdicts (a failed check or a server that does not start: 1).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
prog=bench-ext4
die() { echo "$prog: $*" >&2; exit 1; }
args="$*"
usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }

DIR=/var/tmp SIZE="" REPS="" RUNTIME="" QUICK=0 IMAGES=raw,vhd,enc PIN=same CPU=1 TMPFS=0 QEMU_VHD=0 ENGINES=""
BINDIR=$here/target/release
WORKLOADS="seqread:read:1M:8 seqwrite:write:1M:8 randread_qd1:randread:4k:1 randread_qd32:randread:4k:32 randwrite_qd1:randwrite:4k:1 randwrite_qd32:randwrite:4k:32"
while [ $# -gt 0 ]; do
    case $1 in
        --dir) DIR=${2:?--dir needs a directory}; shift ;;
        --size) SIZE=${2:?--size needs a size}; shift ;;
        --reps) REPS=${2:?--reps needs a number}; shift ;;
        --runtime) RUNTIME=${2:?--runtime needs seconds}; shift ;;
        --quick) QUICK=1 ;;
        --images) IMAGES=${2:?--images needs a list}; shift ;;
        --workloads) WORKLOADS=${2:?--workloads needs a list}; shift ;;
        --pin) PIN=${2:?--pin needs same, cross or none}; shift ;;
        --cpu) CPU=${2:?--cpu needs a number}; shift ;;
        --tmpfs) TMPFS=1 ;;
        --engines) ENGINES=${2:?--engines needs a list}; shift ;;
        --qemu-vhd) QEMU_VHD=1 ;;
        --bindir) BINDIR=${2:?--bindir needs a directory}; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument $1" ;;
    esac
    shift
done
if [ "$QUICK" = 1 ]; then
    SIZE=${SIZE:-512M} REPS=${REPS:-2} RUNTIME=${RUNTIME:-2}
else
    SIZE=${SIZE:-1G} REPS=${REPS:-3} RUNTIME=${RUNTIME:-5}
fi
[[ $REPS =~ ^[1-9][0-9]*$ ]] || die "--reps must be a positive number"
[[ $RUNTIME =~ ^[1-9][0-9]*$ ]] || die "--runtime must be a whole number of seconds"
[[ $CPU =~ ^[0-9]+$ ]] || die "--cpu must be a CPU number"
case $PIN in same | cross | none) ;; *) die "--pin is same, cross or none" ;; esac
want() { [[ ",$IMAGES," == *",$1,"* ]]; }
for i in ${IMAGES//,/ }; do
    case $i in raw | vhd | enc) ;; *) die "unknown image $i (raw, vhd, enc)" ;; esac
done
want enc && ! want vhd && die "enc is compared with our plain VHD: --images must include vhd too"
for e in ${ENGINES//,/ }; do
    case $e in uring | aio | threads) ;; *) die "unknown engine $e (uring, aio, threads)" ;; esac
done

missing=""
for t in qemu-nbd qemu-img fio nbdcopy nbdinfo openssl python3 taskset sha256sum numfmt stat; do
    command -v "$t" >/dev/null || missing="$missing $t"
done
[ -z "$missing" ] || die "missing tools:$missing (scripts/install-deps.sh installs fio, libnbd-bin, qemu-utils)"
fio --enghelp=nbd >/dev/null 2>&1 || die "this fio has no nbd engine (fio >= 3.19 built with libnbd)"
fio --enghelp=libaio >/dev/null 2>&1 || die "this fio has no libaio engine"
TAPDISK=$BINDIR/tapdisk TAPCTL=$BINDIR/tap-ctl VHD_UTIL=$BINDIR/vhd-util
if [ ! -x "$TAPDISK" ] || [ ! -x "$TAPCTL" ] || [ ! -x "$VHD_UTIL" ]; then
    [ "$BINDIR" = "$here/target/release" ] || die "$BINDIR lacks tapdisk, tap-ctl or vhd-util"
    (cd "$here" && cargo build --release --bin tapdisk --bin tap-ctl --bin vhd-util >&2)
fi

# The placement: the issue's point is a real filesystem.
mkdir -p "$DIR"
fstype=$(stat -f -c %T "$DIR")
case $fstype in
    tmpfs | ramfs) die "$DIR is $fstype: the images must be on a disk filesystem (default /var/tmp; --tmpfs adds a reported tmpfs row)" ;;
    ext2/ext3) fsname=ext4 ;; # stat -f names the whole ext family so
    *) fsname=$fstype; echo "$prog: warning: $DIR is $fstype, not ext4" >&2 ;;
esac
work=$(mktemp -d "$DIR/bench-ext4.XXXXXX")
shm=""
spid="" sock="" skind=""
cleanup() {
    if [ -n "$spid" ]; then stop_server || true; fi
    rm -rf "$work"
    if [ -n "$shm" ]; then rm -rf "$shm"; fi
}
trap cleanup EXIT
dd if=/dev/zero of="$work/probe" bs=4096 count=1 oflag=direct 2>/dev/null ||
    die "$DIR refuses O_DIRECT: qemu-nbd --cache=none and fio --direct=1 cannot run there"
rm -f "$work/probe"
if [ "$TMPFS" = 1 ]; then
    shm=$(mktemp -d /dev/shm/bench-ext4.XXXXXX)
    shm_cache="--cache=none --aio=native"
    dd if=/dev/zero of="$shm/probe" bs=4096 count=1 oflag=direct 2>/dev/null ||
        shm_cache="--cache=writeback --aio=threads"
    rm -f "$shm/probe"
fi

# Page cache: dropped before every run when permitted.
DROP=0
if sync && { echo 3 >/proc/sys/vm/drop_caches; } 2>/dev/null; then DROP=1; fi
drop_caches() { if [ "$DROP" = 1 ]; then sync; echo 3 >/proc/sys/vm/drop_caches; fi; }

prio=""; [ "$(id -u)" -eq 0 ] && prio="nice -n -15"
case $PIN in
    same) srv_cpu=$CPU; cli_pin="$prio taskset -c $CPU" ;;
    cross) srv_cpu=1; cli_pin="$prio taskset -c 0" ;;
    none) srv_cpu=""; cli_pin="$prio" ;;
esac
srv_pin="$prio${srv_cpu:+ taskset -c $srv_cpu}"

loadavg() { cut -d' ' -f1-3 /proc/loadavg; }
# Compilers and TCG guests of other users of the machine, running now.
# shellcheck disable=SC2009  # pgrep refuses patterns longer than 15 characters
foreign() { ps -eo comm= | grep -cE '^(rustc|cc1|cc1plus|ld|ld\.lld|clippy-driver|qemu-system.*)$' || true; }

bytes=$(numfmt --from=iec "$SIZE")
[ $((bytes % 2097152)) -eq 0 ] || die "--size must be a multiple of 2 MiB (the VHD block)"
gen_raw() { # $1 = path: deterministic incompressible data (AES-CTR keystream), fully allocated
    openssl enc -aes-128-ctr -pass pass:anchors -nosalt -pbkdf2 \
        -in <(head -c "$bytes" /dev/zero) -out "$1" 2>/dev/null
}

# Servers. tapdisk: spawned by tap-ctl create (it inherits tap-ctl's CPU affinity, nice and
# environment), torn down by tap-ctl destroy. qemu-nbd: started directly.
ctl=$work/ctl keys=$work/keys
mkdir -p "$ctl" "$keys"
# shellcheck source=scripts/nbd-servers.sh
. "$here/scripts/nbd-servers.sh"
tapctl() {
    BLKTAP_CONTROL_DIR=$ctl BLKTAP_NBD_DEVICE=0 BLKTAP_TAPDISK=$TAPDISK TAPDISK3_CRYPTO_KEYDIR=$keys \
        "$TAPCTL" "$@"
}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$spid/stat"; }
uri() { echo "nbd+unix:///?socket=$sock"; }
# Does the server's descriptor on $1 have O_DIRECT (040000 in /proc/PID/fdinfo flags)?
odirect() {
    local fd flags any=""
    for fd in /proc/"$spid"/fd/*; do
        [ "$(readlink "$fd")" = "$1" ] || continue
        flags=$(awk '/^flags:/ {print $2}' "/proc/$spid/fdinfo/${fd##*/}")
        if [ $((8#$flags & 8#40000)) -ne 0 ]; then any="yes"; else any=${any:-no}; fi
    done
    echo "${any:-no descriptor}"
}

# Cells: NAME KIND SPEC; the kinds are td (tap-ctl create -a SPEC), qemu (FORMAT:FILE:CACHE)
# and ceil (FILE, fio libaio O_DIRECT).
raw=$work/img.raw vhd=$work/img.vhd enc=$work/enc.vhd
gen_raw "$raw"
plain_sum=$(sha256sum <"$raw" | cut -d' ' -f1)
cells="ceil:ceil:$raw"
want raw && cells="$cells td_raw:td:aio:$raw qemu_raw:qemu:raw:$raw:none"
make_vhd() { # PATH [KEYNAME]: vhd-util create (and key), filled in order through tapdisk
    "$VHD_UTIL" create -n "$1" -s $((bytes / 1048576)) >/dev/null
    if [ -n "${2:-}" ]; then
        head -c 64 /dev/urandom >"$keys/$2,aes-xts-plain,512.key"
        "$VHD_UTIL" key -s -n "$1" -k "$keys/$2,aes-xts-plain,512.key"
    fi
    start_tapdisk "vhd:$1" TAPDISK3_CRYPTO_KEYDIR="$keys"
    nbdcopy -C 1 -R 1 "$raw" "$(uri)"
    stop_server
}
vhd_how="vhd-util create + filled through tap-ctl create"
if want vhd; then
    if [ "$QEMU_VHD" = 1 ]; then
        qemu-img convert -f raw -O vpc -o subformat=dynamic,force_size=on "$raw" "$vhd"
        vhd_how="qemu-img convert -O vpc -o subformat=dynamic,force_size=on"
    else
        make_vhd "$vhd"
    fi
    cells="$cells td_vhd:td:vhd:$vhd qemu_vhd:qemu:vpc:$vhd:none"
fi
if want enc; then
    make_vhd "$enc" enc
    rc=0
    qemu-img compare -q -f raw -F vpc "$raw" "$enc" 2>/dev/null || rc=$?
    [ "$rc" -eq 1 ] || die "the encrypted VHD holds the plaintext (or qemu-img compare failed: $rc)"
    cells="$cells td_enc:td:vhd:$enc"
fi
if [ "$TMPFS" = 1 ]; then
    cp "$raw" "$shm/img.raw"
    cells="$cells ceil_tmpfs:ceil:$shm/img.raw td_tmpfs:td:aio:$shm/img.raw qemu_tmpfs:qemu:raw:$shm/img.raw:${shm_cache// /,}"
fi

# --engines: every tapdisk cell once per engine (name td_X_ENGINE, kind td@ENGINE).
if [ -n "$ENGINES" ]; then
    more=""
    for c in $cells; do
        IFS=: read -r name kind spec <<<"$c"
        if [ "$kind" = td ]; then
            for e in ${ENGINES//,/ }; do more="$more ${name}_$e:td@$e:$spec"; done
        else
            more="$more $c"
        fi
    done
    cells=${more# }
fi

start_cell() { # KIND SPEC
    case $1 in
        td) start_tapdisk "$2" TAPDISK3_CRYPTO_KEYDIR="$keys" ;;
        td@*) start_tapdisk "$2" TAPDISK3_CRYPTO_KEYDIR="$keys" TAPDISK3_IO="${1#td@}" ;;
        qemu)
            local fmt file cache
            IFS=: read -r fmt file cache <<<"$2"
            [ "$cache" = none ] && cache="--cache=none,--aio=native"
            # shellcheck disable=SC2086
            start_qemu "$fmt" "$file" ${cache//,/ }
            ;;
    esac
}

commit=$(git -C "$here" rev-parse --short HEAD 2>/dev/null || echo unknown)
dirty=""; [ -n "$(git -C "$here" status --porcelain -- src 2>/dev/null)" ] && dirty=" (src modified)"
[ "$BINDIR" = "$here/target/release" ] || dirty="$dirty (but the binaries are from $BINDIR)"
echo "# command: scripts/bench-ext4.sh${args:+ $args}"
echo "# bench-ext4 start $(date -u '+%F %T') UTC; commit $commit$dirty; $(nproc) CPUs; loadavg $(loadavg); foreign busy processes: $(foreign)"
echo "# images on $fsname ($DIR), $bytes bytes each; reps=$REPS, ${RUNTIME}s per run, no ramp; PIN=$PIN${srv_cpu:+ (servers on CPU $srv_cpu)}, ${prio:-no nice}"
if [ "$DROP" = 1 ]; then
    echo "# page cache dropped (sync; echo 3 > /proc/sys/vm/drop_caches) before every run"
else
    echo "# page cache NOT dropped between runs (no permission to write /proc/sys/vm/drop_caches): reads may come from dom0's page cache"
fi
want vhd && echo "# dynamic VHD: $vhd_how; encrypted VHD: vhd-util create + vhd-util key -s + filled through tap-ctl create"
echo "# tapdisk: $TAPCTL create -a TYPE:PATH (spawns $TAPDISK; TAPDISK3_DIRECT_IO=${TAPDISK3_DIRECT_IO-unset}; TAPDISK3_IO=${ENGINES:+per engine: }${ENGINES:-${TAPDISK3_IO-unset}}); qemu-nbd: $(qemu-nbd --version | head -1 | awk '{print $2}') -t -e 8 --cache=none --aio=native; client $(fio --version), --ioengine=nbd; ceiling: fio --ioengine=libaio --direct=1 on img.raw"
[ "$TMPFS" = 1 ] && echo "# tmpfs row (reported only): /dev/shm, qemu-nbd ${shm_cache}"

# Correctness first: every export serves the raw file's bytes; and what each server's
# descriptor on the image really is.
for c in $cells; do
    IFS=: read -r name kind spec <<<"$c"
    [ "$kind" = ceil ] && continue
    start_cell "$kind" "$spec"
    file=${spec#*:}; file=${file%%:*}
    od=$(odirect "$file")
    sz=$(nbdinfo --size "$(uri)")
    [ "$sz" = "$bytes" ] || die "$name: the export is $sz bytes, not $bytes"
    sum=$(nbdcopy "$(uri)" - | sha256sum | cut -d' ' -f1)
    stop_server
    [ "$sum" = "$plain_sum" ] || die "$name: the export's sha256 is $sum, the raw file's $plain_sum"
    echo "# $name: identical bytes (sha256 ${sum:0:16}...); O_DIRECT on the image: $od"
done

results=$work/results.txt
: >"$results"
hz=$(getconf CLK_TCK)
for rep in $(seq "$REPS"); do
    order=$cells
    if [ $((rep % 2)) -eq 0 ]; then order=$(echo "$cells" | tr ' ' '\n' | tac | tr '\n' ' '); fi
    for wl in $WORKLOADS; do
        IFS=: read -r wname rw bs qd <<<"$wl"
        [ -n "$qd" ] || die "workload $wl is not name:rw:bs:qd"
        for c in $order; do
            IFS=: read -r name kind spec <<<"$c"
            drop_caches
            job=(--name=x --size="$bytes" --rw="$rw" --bs="$bs" --iodepth="$qd" --time_based
                --runtime="$RUNTIME" --randrepeat=0 --output-format=json --output="$work/r.json")
            if [ "$kind" = ceil ]; then
                # shellcheck disable=SC2086
                $cli_pin fio "${job[@]}" --ioengine=libaio --direct=1 --filename="$spec" >/dev/null
                ticks=-1
            else
                start_cell "$kind" "$spec"
                t0=$(cpu_ticks)
                # shellcheck disable=SC2086
                $cli_pin fio "${job[@]}" --ioengine=nbd --uri="$(uri)" >/dev/null
                t1=$(cpu_ticks)
                stop_server
                ticks=$((t1 - t0))
            fi
            python3 - "$work/r.json" "$wname" "$name" "$ticks" "$hz" "$rep" >>"$results" <<'EOF'
import json, sys
f, wl, name, ticks, hz, rep = sys.argv[1:]
j = json.load(open(f))["jobs"][0]
ios = j["read"]["total_ios"] + j["write"]["total_ios"]
iops = j["read"]["iops"] + j["write"]["iops"]
mbs = (j["read"]["bw_bytes"] + j["write"]["bw_bytes"]) / 1e6
if int(ticks) < 0:  # the ceiling: fio's own CPU (percent of one CPU over its run)
    secs = j["job_runtime"] / 1e3
    cpu = (j["usr_cpu"] + j["sys_cpu"]) / 100 * secs
else:
    cpu = int(ticks) / int(hz)
per = cpu / ios * 1e6 if ios else 0.0
print(wl, name, rep, f"{iops:.0f}", f"{mbs:.1f}", f"{per:.2f}")
EOF
        done
    done
done
echo "# end $(date -u '+%F %T') UTC; loadavg $(loadavg); foreign busy processes: $(foreign)"

python3 - "$results" "$fsname" "$ENGINES" <<'EOF'
import sys, statistics
path, fs, engines = sys.argv[1:]
rows = [l.split() for l in open(path)]
wls = []
for r in rows:
    if r[0] not in wls:
        wls.append(r[0])
def vals(wl, name, col):
    return [float(r[col]) for r in rows if r[0] == wl and r[1] == name]
def med(wl, name, col):
    v = vals(wl, name, col)
    return statistics.median(v) if v else None
def fmt(x, seq):
    return "-" if x is None else (f"{x:,.0f}" if not seq or x >= 100 else f"{x:,.1f}")
present = {r[1] for r in rows}
images = [("raw", f"raw ({fs})", "td_raw", "qemu_raw", "ceil"),
          ("vhd", f"dynamic VHD ({fs})", "td_vhd", "qemu_vhd", "ceil"),
          ("enc", f"encrypted VHD ({fs}), peer = our plain VHD", "td_enc", "td_vhd", "ceil"),
          ("tmpfs", "raw (tmpfs, reported only)", "td_tmpfs", "qemu_tmpfs", "ceil_tmpfs")]
if engines:  # one set of rows per engine, in the order given
    images = [(k, f"{l} [{e}]", f"{t}_{e}", f"{p}_{e}" if p.startswith("td_") else p, c)
              for k, l, t, p, c in images for e in engines.split(",")]
print("| image | workload | tapdisk | peer | ceiling | tapdisk/peer | tapdisk/ceiling | CPU us/IO tapdisk | CPU us/IO peer | CPU us/IO ceiling | target | met |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for key, label, td, peer, ceil in images:
    if td not in present:
        continue
    for wl in wls:
        bs_big = wl.startswith("seq")
        col = 4 if bs_big else 3          # MB/s for 1M rows, IOPS for 4k rows
        unit = "MB/s" if bs_big else "IOPS"
        t, p, c = med(wl, td, col), med(wl, peer, col), med(wl, ceil, col)
        ct, cp, cc = med(wl, td, 5), med(wl, peer, 5), med(wl, ceil, 5)
        rp = t / p if t is not None and p else None
        rc = t / c if t is not None and c else None
        misses = []
        if key == "enc":
            need = 0.8 if bs_big else 0.9
            target = f">= {need}x plain VHD"
            if rp is None or rp < need:
                misses.append(f"{rp or 0:.2f}x plain")
        elif key == "tmpfs":
            target = "reported"
        else:
            target = ">= 1.0x qemu-nbd, less CPU"
            if rp is None or rp < 1.0:
                misses.append(f"{rp or 0:.2f}x qemu-nbd")
            if ct is None or cp is None or ct >= cp:
                misses.append(f"CPU {ct / cp if ct and cp else 0:.2f}x")
            if wl.endswith("qd32"):
                target += ", >= 0.8x ceiling"
                if rc is None or rc < 0.8:
                    misses.append(f"{rc or 0:.2f}x ceiling")
        met = "-" if key == "tmpfs" else ("met" if not misses else "NOT met: " + ", ".join(misses))
        r2 = lambda x: "-" if x is None else f"{x:.2f}"
        c1 = lambda x: "-" if x is None else f"{x:.1f}"
        print(f"| {label} | {wl} ({unit}) | {fmt(t, bs_big)} | {fmt(p, bs_big)} | {fmt(c, bs_big)} | {r2(rp)} | {r2(rc)} | {c1(ct)} | {c1(cp)} | {c1(cc)} | {target} | {met} |")
print()
print("Repetitions (workload cell rep IOPS MB/s CPU-us/IO):")
print()
for r in rows:
    print("    " + " ".join(r))
EOF
