#!/bin/bash
# bench-memory.sh: issue 12's memory measurement. tapdisk's memory per VBD (VmRSS/VmHWM of the
# tapdisk process `tap-ctl create` spawns for one VBD) and dom0's page-cache growth for the image
# file while a client reads the whole disk over the NBD export; with O_DIRECT the page cache
# should not grow. Each image is measured with tapdisk as configured (TAPDISK3_DIRECT_IO as in
# the caller's environment, normally unset: the engine's default), with TAPDISK3_DIRECT_IO=0
# (buffered, so the difference shows) and with qemu-nbd --cache=none --aio=native for reference.
#
# Usage: scripts/bench-memory.sh [options]
#   --dir DIR       where the images live (default /var/tmp; tmpfs is refused: its pages are the
#                   page cache)
#   --size SIZE     virtual size of each image (default 1G; --quick: 256M)
#   --images LIST   comma-separated, default raw,vhd: raw (a raw file of random data) and vhd (a
#                   fully allocated dynamic VHD converted from it by qemu-img)
#   --reader CMD    nbdcopy (default: nbdcopy URI null:, 4 connections) or fio (fio's nbd engine,
#                   sequential 1 MiB reads at QD8 over the whole disk)
#   --quick         smaller images (CI-like smoke use)
#   --cpu N         pin servers and the reader to CPU N (default: unpinned)
#   --bindir DIR    tapdisk and tap-ctl (default target/release, built when missing)
#   -h, --help      this text
#
# Method, per image and server: sync and drop the page cache (`echo 3 > /proc/sys/vm/drop_caches`;
# without permission the script says so and the fincore column still counts the image's own
# pages), then record the image's resident bytes (`fincore`) and Cached from /proc/meminfo,
# start the server, record VmRSS (idle), read the whole export once, record VmRSS and VmHWM
# (the peak) of the server process, the image's resident bytes and Cached again, stop the
# server. Cached is machine-wide (other processes' files count too); fincore is the image only.
# "read MB/s" is the image size over the reader's wall time (its start-up included).
# Verdict (issue 12: "near zero with O_DIRECT", the default) on every row but the
# TAPDISK3_DIRECT_IO=0 one: met when the image's page-cache growth is at most 1% of its size.
# The O_DIRECT column is what the server's descriptor on the image has (/proc/PID/fdinfo).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
prog=bench-memory
die() { echo "$prog: $*" >&2; exit 1; }
args="$*"
usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; }

DIR=/var/tmp SIZE="" IMAGES=raw,vhd READER=nbdcopy QUICK=0 CPU="" BINDIR=$here/target/release
while [ $# -gt 0 ]; do
    case $1 in
        --dir) DIR=${2:?--dir needs a directory}; shift ;;
        --size) SIZE=${2:?--size needs a size}; shift ;;
        --images) IMAGES=${2:?--images needs a list}; shift ;;
        --reader) READER=${2:?--reader needs nbdcopy or fio}; shift ;;
        --quick) QUICK=1 ;;
        --cpu) CPU=${2:?--cpu needs a number}; shift ;;
        --bindir) BINDIR=${2:?--bindir needs a directory}; shift ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument $1" ;;
    esac
    shift
done
if [ "$QUICK" = 1 ]; then SIZE=${SIZE:-256M}; else SIZE=${SIZE:-1G}; fi
case $READER in nbdcopy | fio) ;; *) die "--reader is nbdcopy or fio" ;; esac
[ -z "$CPU" ] || [[ $CPU =~ ^[0-9]+$ ]] || die "--cpu must be a CPU number"
for i in ${IMAGES//,/ }; do
    case $i in raw | vhd) ;; *) die "unknown image $i (raw, vhd)" ;; esac
done

missing=""
for t in qemu-nbd qemu-img nbdcopy nbdinfo fincore openssl python3 taskset numfmt stat "$READER"; do
    command -v "$t" >/dev/null || missing="$missing $t"
done
[ -z "$missing" ] || die "missing tools:$missing (scripts/install-deps.sh installs fio, libnbd-bin, qemu-utils; fincore is in util-linux)"
TAPDISK=$BINDIR/tapdisk TAPCTL=$BINDIR/tap-ctl
if [ ! -x "$TAPDISK" ] || [ ! -x "$TAPCTL" ]; then
    [ "$BINDIR" = "$here/target/release" ] || die "$BINDIR lacks tapdisk or tap-ctl"
    (cd "$here" && cargo build --release --bin tapdisk --bin tap-ctl >&2)
fi

mkdir -p "$DIR"
fstype=$(stat -f -c %T "$DIR")
case $fstype in
    tmpfs | ramfs) die "$DIR is $fstype: its pages are the page cache; use a disk filesystem (default /var/tmp)" ;;
    ext2/ext3) fsname=ext4 ;;
    *) fsname=$fstype; echo "$prog: warning: $DIR is $fstype, not ext4" >&2 ;;
esac
work=$(mktemp -d "$DIR/bench-memory.XXXXXX")
spid="" sock="" skind=""
cleanup() {
    if [ -n "$spid" ]; then stop_server || true; fi
    rm -rf "$work"
}
trap cleanup EXIT
dd if=/dev/zero of="$work/probe" bs=4096 count=1 oflag=direct 2>/dev/null ||
    die "$DIR refuses O_DIRECT"
rm -f "$work/probe"

DROP=0
if sync && { echo 3 >/proc/sys/vm/drop_caches; } 2>/dev/null; then DROP=1; fi
drop_caches() { if [ "$DROP" = 1 ]; then sync; echo 3 >/proc/sys/vm/drop_caches; fi; }
prio=""; [ "$(id -u)" -eq 0 ] && prio="nice -n -15"
pin="$prio${CPU:+ taskset -c $CPU}" srv_pin=$pin

bytes=$(numfmt --from=iec "$SIZE")
[ $((bytes % 2097152)) -eq 0 ] || die "--size must be a multiple of 2 MiB"
raw=$work/img.raw vhd=$work/img.vhd
openssl enc -aes-128-ctr -pass pass:anchors -nosalt -pbkdf2 \
    -in <(head -c "$bytes" /dev/zero) -out "$raw" 2>/dev/null
[[ ",$IMAGES," == *",vhd,"* ]] &&
    qemu-img convert -f raw -O vpc -o subformat=dynamic,force_size=on "$raw" "$vhd"

ctl=$work/ctl
mkdir -p "$ctl"
# shellcheck source=scripts/nbd-servers.sh
. "$here/scripts/nbd-servers.sh"
kib() { awk -v k="$1" '$1 == k":" {print $2}' "/proc/$spid/status"; }
cached() { awk '$1 == "Cached:" {print $2}' /proc/meminfo; }
resident() { fincore --bytes --noheadings --output RES "$1"; }
odirect() {
    local fd flags any=""
    for fd in /proc/"$spid"/fd/*; do
        [ "$(readlink "$fd")" = "$1" ] || continue
        flags=$(awk '/^flags:/ {print $2}' "/proc/$spid/fdinfo/${fd##*/}")
        if [ $((8#$flags & 8#40000)) -ne 0 ]; then any="yes"; else any=${any:-no}; fi
    done
    echo "${any:-no descriptor}"
}
read_all() {
    local uri="nbd+unix:///?socket=$sock"
    if [ "$READER" = nbdcopy ]; then
        # shellcheck disable=SC2086
        $pin nbdcopy "$uri" null:
    else
        # shellcheck disable=SC2086
        $pin fio --name=x --ioengine=nbd --uri="$uri" --size="$bytes" --rw=read --bs=1M \
            --iodepth=8 --output-format=terse >/dev/null
    fi
}

commit=$(git -C "$here" rev-parse --short HEAD 2>/dev/null || echo unknown)
dirty=""; [ -n "$(git -C "$here" status --porcelain -- src 2>/dev/null)" ] && dirty=" (src modified)"
[ "$BINDIR" = "$here/target/release" ] || dirty="$dirty (but the binaries are from $BINDIR)"
echo "# command: scripts/bench-memory.sh${args:+ $args}"
echo "# bench-memory start $(date -u '+%F %T') UTC; commit $commit$dirty; loadavg $(cut -d' ' -f1-3 /proc/loadavg); MemTotal $(awk '/MemTotal/ {print $2}' /proc/meminfo) kB"
echo "# images on $fsname ($DIR), $bytes bytes each; reader: $READER over the whole export; ${pin:-unpinned}"
if [ "$DROP" = 1 ]; then
    echo "# page cache dropped (sync; echo 3 > /proc/sys/vm/drop_caches) before every server"
else
    echo "# page cache NOT dropped (no permission to write /proc/sys/vm/drop_caches): the growth columns start from whatever was cached"
fi
echo "# tapdisk: $TAPCTL create -a TYPE:PATH (one VBD per tapdisk process); default row: TAPDISK3_DIRECT_IO=${TAPDISK3_DIRECT_IO-unset}"
echo
echo "| image | server | O_DIRECT on the image | read MB/s | RSS idle MiB | VmHWM MiB | RSS after MiB | image in page cache after, MiB (fincore) | Cached growth, MiB (meminfo, machine-wide) | near-zero page cache (<= 1%) |"
echo "|---|---|---|---|---|---|---|---|---|---|"
mib() { awk -v x="$1" -v d="$2" 'BEGIN {printf "%.1f", x / d}'; }
for img in ${IMAGES//,/ }; do
    case $img in raw) file=$raw type=aio fmt=raw ;; vhd) file=$vhd type=vhd fmt=vpc ;; esac
    for srv in tapdisk tapdisk-buffered qemu-nbd; do
        drop_caches
        res0=$(resident "$file") c0=$(cached)
        case $srv in
            tapdisk) start_tapdisk "$type:$file"; label="tapdisk (TAPDISK3_DIRECT_IO=${TAPDISK3_DIRECT_IO-unset})" ;;
            tapdisk-buffered) start_tapdisk "$type:$file" TAPDISK3_DIRECT_IO=0; label="tapdisk (TAPDISK3_DIRECT_IO=0)" ;;
            qemu-nbd) start_qemu "$fmt" "$file" --cache=none --aio=native; label="qemu-nbd --cache=none --aio=native" ;;
        esac
        od=$(odirect "$file")
        rss0=$(kib VmRSS)
        t0=$(date +%s.%N)
        read_all
        t1=$(date +%s.%N)
        rss1=$(kib VmRSS) hwm=$(kib VmHWM)
        res1=$(resident "$file") c1=$(cached)
        stop_server
        mbs=$(awk -v b="$bytes" -v a="$t0" -v z="$t1" 'BEGIN {printf "%.0f", b / (z - a) / 1e6}')
        grow=$((res1 - res0))
        verdict="- (buffered on purpose)"
        if [ "$srv" != tapdisk-buffered ]; then
            if [ $((grow * 100)) -le "$bytes" ]; then verdict="met"; else verdict="NOT met"; fi
        fi
        echo "| $img | $label | $od | $mbs | $(mib "$rss0" 1024) | $(mib "$hwm" 1024) | $(mib "$rss1" 1024) | $(mib "$res1" 1048576) (+$(mib "$grow" 1048576)) | $(mib $((c1 - c0)) 1024) | $verdict |"
    done
done
echo
echo "# end $(date -u '+%F %T') UTC; loadavg $(cut -d' ' -f1-3 /proc/loadavg)"
