#!/usr/bin/env bash
# bench-xen.sh: what a PV guest measures through our tapdisk next to QEMU's qdisk and kernel
# blkback, under a real Xen, in ONE boot of the xen-e2e harness (Xen 4.17 + Debian Linux PV
# dom0 under QEMU/TCG, see scripts/xen-e2e.sh).
#
# The host formats an ext4 disk image for dom0 (a virtio disk, QEMU cache=none) holding one
# raw image of random data; dom0 mounts it on /var/tmp (its rootfs is RAM) and makes a fully
# allocated dynamic VHD and an encrypted VHD (AES-XTS-512) from it through tapdisk. Then, per
# round, one guest per backend, in an order rotated every round:
#   tap-raw tap-vhd tap-enc  our tapdisk + tapback (vbd3 nodes as OpenXT's libxl writes them)
#                            on raw.img, dyn.vhd, enc.vhd
#   qdisk                    QEMU's xen-block (xl backendtype=qdisk, libxl's defaults) on raw.img
#   qdisk-vhd                the same on dyn.vhd (format=vhd; only when named in --backends)
#   tap-raw-poll             tap-raw with ring polling (TAPDISK3_POLL_US=BENCH_POLL_US, default
#                            1000; only when named in --backends)
#   blkback                  kernel xen-blkback, xl phy: on a loop device of raw.img
# Each guest runs every workload on /dev/xvda with blkbench (tests/xen-e2e/bench/blkbench.c,
# built here with gcc -static: O_DIRECT, Linux native AIO, fio-like; fio's library closure is
# 80 MB, too big for the guest's initramfs): sequential 1 MiB read and write at QD8, 4 KiB
# random read and write at QD1 and QD32. dom0's page cache is dropped before every guest.
# Prints a table of medians (min-max) per backend and the ratios tapdisk/qdisk (target
# >= 1.0 on every row, marked met or not met) and tapdisk/blkback. TCG makes absolute numbers
# meaningless; only ratios from the same boot count.
#
# Usage: scripts/bench-xen.sh [options] [BIN_DIR]
#   BIN_DIR             tapdisk, tap-ctl, tapback, vhd-util to measure (default target/release,
#                       built first)
#   --rounds N          rounds (default 3)
#   --secs S            counted seconds per workload (default 5)
#   --ramp S            uncounted seconds before each workload (default 1)
#   --size MIB          size of the image (default 1024: more than dom0's free page cache;
#                       even)
#   --backends "B ..."  default "tap-raw tap-vhd tap-enc qdisk blkback"
#   --workloads "NAME:MODE:BS:QD ..."  MODE read|write|randread|randwrite, BS like 4k or 1M
#                       (default "seqread:read:1M:8 seqwrite:write:1M:8
#                       randread_qd1:randread:4k:1 randread_qd32:randread:4k:32
#                       randwrite_qd1:randwrite:4k:1 randwrite_qd32:randwrite:4k:32")
#   --pin cross|none    cross (default): dom0 has one vCPU pinned to pCPU 0 (dom0_max_vcpus=1
#                       dom0_vcpus_pin), the guest's vCPU is pinned to pCPU 1; none: Xen's
#                       default placement, dom0 with 2 vCPUs
#   --loop-dio on|off   blkback's loop device with or without direct I/O (default on)
#   --quick             a smoke run: 1 round, 2 s + 1 s ramp, 64 MiB
#   --nice N            QEMU's nice level (default -15, as bench-nbd.sh runs its servers:
#                       other work on the host slows every backend alike, but TCG is its
#                       only CPU; 0 to leave the host's other work alone)
#   --out FILE          also write the report (markdown) to FILE
# Environment: BENCH_XEN_WORK (default target/bench-xen: the bench's dom0 rootfs, which adds
#   qemu-system-xen to the xen-e2e one, boot files, console.log), BENCH_DISK_DIR (default
#   /var/tmp/blktap3-bench-xen: the ext4 image; must not be tmpfs), DEBIAN_KERNEL_DIR (default
#   target/debian-kernel), BENCH_XEN_TIMEOUT (seconds, default: from the settings), QEMU_CPU
#   (default qemu64 plus AES-NI, PCLMULQDQ, SSSE3, SSE4.1/4.2 and POPCNT: every CPU OpenXT runs
#   on has AES-NI, and without it the encrypted rows would measure TCG emulating the
#   software AES fallback), GUEST_MB (the guest's memory, default 128),
#   BENCH_POLL_US (tap-raw-poll's polling window, default 1000).
# Exits 0 when every backend produced every result (whether or not the targets are met),
# 1 otherwise.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
work=${BENCH_XEN_WORK:-$here/target/bench-xen}
disk_dir=${BENCH_DISK_DIR:-/var/tmp/blktap3-bench-xen}
qemu_cpu=${QEMU_CPU:-qemu64,+aes,+pclmulqdq,+ssse3,+sse4.1,+sse4.2,+popcnt}
rounds=3 secs=5 ramp=1 size=1024 pin=cross loop_dio=on out="" nice=-15
backends="tap-raw tap-vhd tap-enc qdisk blkback"
workloads="seqread:read:1M:8 seqwrite:write:1M:8 randread_qd1:randread:4k:1 randread_qd32:randread:4k:32 randwrite_qd1:randwrite:4k:1 randwrite_qd32:randwrite:4k:32"
bin=""
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
fail() {
    echo "bench-xen: $*" >&2
    exit 1
}
need_arg() {
    if [ $# -lt 2 ] || [ -z "$2" ]; then
        echo "bench-xen: $1 needs a value" >&2
        exit 2
    fi
}
while [ $# -gt 0 ]; do
    case $1 in
        --rounds | --secs | --ramp | --size | --backends | --workloads | --pin | --loop-dio | --out | --nice)
            need_arg "$@"
            case $1 in
                --rounds) rounds=$2 ;;
                --secs) secs=$2 ;;
                --ramp) ramp=$2 ;;
                --size) size=$2 ;;
                --backends) backends=$2 ;;
                --workloads) workloads=$2 ;;
                --pin) pin=$2 ;;
                --loop-dio) loop_dio=$2 ;;
                --out) out=$2 ;;
                --nice) nice=$2 ;;
            esac
            shift 2
            ;;
        --quick) rounds=1 secs=2 ramp=1 size=64; shift ;;
        -h | --help) usage; exit 0 ;;
        -*) echo "bench-xen: unknown option $1 (see --help)" >&2; exit 2 ;;
        *) bin=$1; shift ;;
    esac
done
for v in rounds secs size; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || { echo "bench-xen: --$v must be a positive integer, not '${!v}'" >&2; exit 2; }
done
[[ $nice =~ ^-?[0-9]+$ ]] || { echo "bench-xen: --nice must be an integer, not '$nice'" >&2; exit 2; }
[[ $ramp =~ ^[0-9]+$ ]] || { echo "bench-xen: --ramp must be an integer, not '$ramp'" >&2; exit 2; }
[ $((size % 2)) = 0 ] || { echo "bench-xen: --size must be even (whole 2 MiB VHD blocks)" >&2; exit 2; }
case $pin in cross | none) ;; *) echo "bench-xen: --pin cross|none, not '$pin'" >&2; exit 2 ;; esac
case $loop_dio in on | off) ;; *) echo "bench-xen: --loop-dio on|off, not '$loop_dio'" >&2; exit 2 ;; esac
for b in $backends; do
    case $b in tap-raw | tap-raw-poll | tap-vhd | tap-enc | qdisk | qdisk-vhd | blkback) ;;
        *) echo "bench-xen: unknown backend '$b' (tap-raw tap-raw-poll tap-vhd tap-enc qdisk qdisk-vhd blkback)" >&2; exit 2 ;;
    esac
done
# The workloads as the guest takes them: NAME:MODE:BYTES:QD,...
gw=""
for w in $workloads; do
    IFS=: read -r name mode bs qd <<<"$w"
    case $mode in read | write | randread | randwrite) ;; *) echo "bench-xen: workload '$w': mode '$mode'" >&2; exit 2 ;; esac
    case $bs in
        *[kK]) bytes=$((${bs%[kK]} << 10)) ;;
        *M) bytes=$((${bs%M} << 20)) ;;
        *) bytes=$bs ;;
    esac
    if ! [[ $bytes =~ ^[0-9]+$ && $qd =~ ^[1-9][0-9]*$ && $name =~ ^[A-Za-z0-9_]+$ ]] ||
        [ $((bytes % 512)) != 0 ] || [ "$bytes" = 0 ] || [ "$qd" -gt 256 ]; then
        echo "bench-xen: workload '$w': want NAME:MODE:BS:QD, BS a multiple of 512, QD 1..256" >&2
        exit 2
    fi
    gw="$gw,$name:$mode:$bytes:$qd"
done
gw=${gw#,}
[ -n "$gw" ] || { echo "bench-xen: no workloads" >&2; exit 2; }

if [ -z "$bin" ]; then
    (cd "$here" && cargo build --release --bins >&2) || fail "cargo build --release failed"
    bin=$here/target/release
fi
[ -d "$bin" ] || fail "$bin is not a directory"
bin=$(cd "$bin" && pwd)
for b in tapdisk tap-ctl tapback vhd-util; do
    [ -x "$bin/$b" ] || fail "$bin/$b missing (build with cargo build --release, or name BIN_DIR)"
done
for t in qemu-system-x86_64 mmdebstrap busybox cpio dpkg-deb apt-get depmod gcc mkfs.ext4 python3; do
    command -v "$t" >/dev/null || fail "$t is required (scripts/install-deps.sh; mkfs.ext4 is in e2fsprogs)"
done
[ "$(id -u)" = 0 ] || fail "must run as root (mmdebstrap, the dom0 rootfs's ownership)"

mkdir -p "$work" "$disk_dir"
disk_fs=$(findmnt -n -o FSTYPE -T "$disk_dir" 2>/dev/null || stat -f -c %T "$disk_dir")
case $disk_fs in tmpfs | ramfs) fail "BENCH_DISK_DIR $disk_dir is on $disk_fs: the bench disk must be on real storage" ;; esac
log() { echo "bench-xen: $*" >&2; }
t_start=$(date +%s)
load_start=$(uptime)
commit=$(cd "$here" && git rev-parse --short HEAD 2>/dev/null || echo unknown)
src_commit=$(cd "$here" && git log -1 --format=%h -- src Cargo.toml Cargo.lock 2>/dev/null || echo unknown)
dirty=""
if (cd "$here" && git status --porcelain --untracked-files=no 2>/dev/null | grep -q .); then
    dirty=" (uncommitted changes)"
fi

# 1. Debian's kernel (dom0 and guests) and Xen hypervisor, as scripts/xen-e2e.sh gets them.
# shellcheck source=scripts/vm-common.sh
. "$here/scripts/vm-common.sh"
kdir=${DEBIAN_KERNEL_DIR:-$here/target/debian-kernel}
debian_kernel "$kdir" || fail "could not fetch Debian's kernel into $kdir"
kver=$(debian_kernel_version "$kdir")
xen_series=4.17
if [ ! -f "$work/boot/xen" ]; then
    log "fetching xen-hypervisor-$xen_series-amd64"
    rm -rf "$work/xen-deb" && mkdir -p "$work/xen-deb" "$work/boot"
    apt_download "xen-hypervisor-$xen_series-amd64" "$work/xen-deb" || fail "apt-get download xen-hypervisor-$xen_series-amd64"
    dpkg-deb -x "$work"/xen-deb/*.deb "$work/xen-deb/root"
    gzip -dc "$(find "$work/xen-deb/root/boot" -name 'xen-*.gz' | head -n1)" >"$work/boot/xen.tmp"
    mv "$work/boot/xen.tmp" "$work/boot/xen"
    rm -rf "$work/xen-deb"
fi

# 2. The bench's dom0 base rootfs: xen-e2e's plus qemu-system-xen (the device model that
#    serves qdisk), and the modules for the virtio disk, ext4, loop and blkback.
stamp="$kver xen-utils-$xen_series bench v1"
if [ ! -f "$work/boot/dom0-base.cpio" ] || [ "$(cat "$work/boot/dom0-base.stamp" 2>/dev/null)" != "$stamp" ]; then
    log "building the bench dom0 rootfs (mmdebstrap, with qemu-system-xen)"
    rm -rf "$work/dom0root" "$work/dom0-rootfs.tar"
    mmdebstrap --quiet --variant=minbase \
        --include="xen-utils-$xen_series,xenstore-utils,kmod,procps,qemu-system-xen" \
        bookworm "$work/dom0-rootfs.tar" >&2 || fail "mmdebstrap of the bench dom0 rootfs failed"
    mkdir -p "$work/dom0root"
    tar -C "$work/dom0root" -xf "$work/dom0-rootfs.tar"
    rm -f "$work/dom0-rootfs.tar"
    [ -x "$work/dom0root/usr/libexec/xen-qemu-system-i386" ] || fail "qemu-system-xen did not install /usr/libexec/xen-qemu-system-i386"
    mdst=$work/dom0root/usr/lib/modules/$kver
    msrc=$kdir/root/lib/modules/$kver
    mkdir -p "$mdst/kernel/drivers" "$mdst/kernel/fs" "$mdst/kernel/lib" "$mdst/kernel/crypto"
    cp -a "$msrc/kernel/drivers/xen" "$msrc/kernel/drivers/block" "$msrc/kernel/drivers/virtio" "$mdst/kernel/drivers/"
    cp -a "$msrc/kernel/fs/ext4" "$msrc/kernel/fs/jbd2" "$msrc"/kernel/fs/mbcache.ko* "$mdst/kernel/fs/"
    cp -a "$msrc"/kernel/lib/crc16.ko* "$mdst/kernel/lib/"
    cp -a "$msrc"/kernel/crypto/crc32c_generic.ko* "$mdst/kernel/crypto/"
    cp "$msrc"/modules.builtin* "$msrc/modules.order" "$mdst/" 2>/dev/null || true
    depmod -b "$work/dom0root" "$kver"
    # The ROMs and keymaps of full-machine QEMU: a xenpv device model loads none of them.
    rm -rf "$work"/dom0root/usr/share/{doc,man,info,locale} "$work"/dom0root/var/cache/apt/* \
        "$work"/dom0root/var/lib/apt/lists/* "$work"/dom0root/usr/lib/xen-*/boot \
        "$work"/dom0root/usr/share/qemu/*.{rom,bin,img} "$work"/dom0root/usr/lib/ipxe \
        "$work"/dom0root/usr/share/seabios
    mkdir -p "$work/dom0root/boot"
    cp "$kdir/vmlinuz" "$work/dom0root/boot/vmlinuz"
    mkdir -p "$work/boot"
    pack_cpio "$work/dom0root" >"$work/boot/dom0-base.cpio"
    echo "$stamp" >"$work/boot/dom0-base.stamp"
    rm -rf "$work/dom0root"
fi
cp "$kdir/vmlinuz" "$work/boot/vmlinuz"

# 3. The overlay: dom0-init.sh as /init with the bench as its only test, our binaries, and
#    the guest's initramfs (busybox, xen-blkfront, blkbench, domu-bench.sh).
ov=$work/overlay
rm -rf "$ov" && mkdir -p "$ov/xen-e2e/bin" "$ov/xen-e2e/tests" "$ov/boot"
cp "$here/tests/xen-e2e/dom0-init.sh" "$ov/init"
cp "$here/tests/xen-e2e/lib.sh" "$ov/xen-e2e/lib.sh"
cp "$here/tests/xen-e2e/bench/dom0-bench.sh" "$ov/xen-e2e/tests/90-bench.sh"
cp "$(command -v busybox)" "$ov/xen-e2e/busybox"
for b in tapdisk tap-ctl tapback vhd-util; do
    strip_copy "$bin/$b" "$ov/xen-e2e/bin/$b"
done
{
    echo "XEN_E2E_TESTS='bench'"
    echo "BENCH_ROUNDS=$rounds"
    echo "BENCH_SECS=$secs"
    echo "BENCH_RAMP=$ramp"
    echo "BENCH_BACKENDS='$backends'"
    echo "BENCH_WORKLOADS='$gw'"
    echo "BENCH_PIN=$pin"
    echo "BENCH_LOOP_DIO=$loop_dio"
    echo "BENCH_POLL_US=${BENCH_POLL_US:-1000}"
    echo "GUEST_MB=${GUEST_MB:-128}"
} >"$ov/xen-e2e/env"
chmod +x "$ov/init" "$ov"/xen-e2e/tests/*.sh
groot=$work/domu-root
rm -rf "$groot" && mkdir -p "$groot"/{bin,proc,sys,dev,tmp}
cp "$(command -v busybox)" "$groot/bin/busybox"
plain_module "$kdir" xen-blkfront "$groot/xen-blkfront.ko" || fail "no xen-blkfront module in $kdir"
gcc -static -O2 -Wall -Wextra -Werror -o "$groot/bin/blkbench" "$here/tests/xen-e2e/bench/blkbench.c" ||
    fail "building blkbench (gcc -static needs libc6-dev)"
cp "$here/tests/xen-e2e/bench/domu-bench.sh" "$groot/init"
chmod +x "$groot/init"
pack_cpio "$groot" >"$ov/boot/domu.cpio"
rm -rf "$groot"
pack_cpio "$ov" >"$work/boot/overlay.cpio"
cat "$work/boot/dom0-base.cpio" "$work/boot/overlay.cpio" >"$work/boot/dom0-initrd.cpio"

# 4. dom0's disk: ext4 holding raw.img (random bytes), fresh every run.
log "formatting the bench disk: ext4 in $disk_dir/dom0-disk.img with a ${size} MiB raw.img"
stage=$disk_dir/stage
rm -rf "$stage" "$disk_dir/dom0-disk.img" && mkdir -p "$stage/bench"
head -c $((size << 20)) /dev/urandom >"$stage/bench/raw.img"
[ "$(stat -c %s "$stage/bench/raw.img")" = $((size << 20)) ] || fail "short raw.img"
mkfs.ext4 -q -F -L benchxen -E nodiscard -d "$stage" "$disk_dir/dom0-disk.img" $((size * 3 + 256))M >&2 ||
    fail "mkfs.ext4 -d failed (e2fsprogs >= 1.43 needed)"
rm -rf "$stage"

# 5. Boot. Xen's multiboot modules: the dom0 kernel (with its command line) and its initrd.
xen_cmdline="console=com1 com1=115200,8n1 dom0_mem=1024M,max:1024M loglvl=all guest_loglvl=all"
[ "$pin" != cross ] || xen_cmdline="$xen_cmdline dom0_max_vcpus=1 dom0_vcpus_pin"
nb=$(wc -w <<<"$backends")
nw=$(wc -w <<<"$workloads")
timeout_s=${BENCH_XEN_TIMEOUT:-$((900 + rounds * nb * (120 + nw * (secs + ramp) * 3)))}
console=$work/console.log
log "booting Xen $xen_series + Linux $kver (TCG), $rounds round(s) x $nb backends x $nw workloads x ${secs}+${ramp} s; timeout ${timeout_s}s; console: $console"
set +e
timeout "$timeout_s" nice -n "$nice" qemu-system-x86_64 -machine pc -accel tcg -cpu "$qemu_cpu" -smp 2 -m 2048 \
    -display none -vga none -no-reboot -monitor none -serial stdio -net none \
    -drive "file=$disk_dir/dom0-disk.img,format=raw,if=virtio,cache=none,aio=native" \
    -kernel "$work/boot/xen" \
    -append "$xen_cmdline" \
    -initrd "$work/boot/vmlinuz console=hvc0 earlyprintk=xen loglevel=4,$work/boot/dom0-initrd.cpio" \
    </dev/null 2>&1 | tee "$console" | grep -a --line-buffered -E '^(XEN-E2E|XEN-BENCH|FAIL|  (guest|log|xl)\|)' >&2
rc=${PIPESTATUS[0]}
set -e
t_end=$(date +%s)
load_end=$(uptime)
[ "$rc" != 124 ] || log "TIMEOUT after ${timeout_s}s"
tr -d '\r' <"$console" | grep -a '^XEN-BENCH-RESULT: ' >"$work/results.txt" || true
expected=$((rounds * nb * nw))
got=$(wc -l <"$work/results.txt")
if ! tr -d '\r' <"$console" | grep -aq '^XEN-E2E-RESULT: bench PASS' || [ "$got" != "$expected" ]; then
    log "FAIL: the bench did not finish: $got of $expected results (qemu exit $rc); last console lines:"
    tail -n 40 "$console" >&2
    exit 1
fi
header=$(
    echo "date: $(date -u -d "@$t_start" '+%Y-%m-%d %H:%M') UTC; commit $commit$dirty (last change to src/: $src_commit); binaries: $bin"
    echo "host: $(nproc) CPUs; load at start: ${load_start#*load average: }; at end: ${load_end#*load average: }; run time $(((t_end - t_start) / 60)) min $(((t_end - t_start) % 60)) s"
    echo "Xen $xen_series under QEMU/TCG ($(qemu-system-x86_64 --version | head -n1 | sed 's/.*version //')), dom0 Linux $kver, -cpu $qemu_cpu -smp 2, nice $nice; pin=$pin; dom0 disk: virtio, ext4 image on $disk_fs ($disk_dir), QEMU cache=none"
    echo "$rounds round(s), order rotated per round; ${secs} s counted + ${ramp} s ramp per workload; image ${size} MiB; guest: 1 vCPU, blkbench (O_DIRECT, Linux AIO)"
    tr -d '\r' <"$console" | sed -n 's/^XEN-BENCH-INFO: backend=//p'
)
report=$(python3 "$here/tests/xen-e2e/bench/report.py" "$work/results.txt" "$backends" "$workloads" "$header") ||
    fail "report.py failed on $work/results.txt"
echo "$report"
[ -z "$out" ] || echo "$report" >"$out"
