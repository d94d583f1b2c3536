#!/bin/busybox sh
# shellcheck shell=dash
# PID 1 of the Xen end-to-end guest (a PV domU): loads xen-blkfront, and does I/O on
# /dev/xvda through our vbd3 backend. Options come from the kernel command line:
#   e2e.io=rw   print the md5 of the first 8 MiB ("DOMU: before md5=..."), write an 8 MiB
#               random pattern at the start and at the end with O_DIRECT, flush, drop
#               caches, read both back; sector-sized writes inside a page; buffered
#               I/O; a discard; flushes still on at the end
#   e2e.io=ro   a read-only disk: reads work, a write fails
#   e2e.io=slow 24 MiB written 1 MiB at a time, half a second apart, then read back
#   e2e.blkfront=P=V,...  xen-blkfront module parameters (max_ring_page_order, max_indirect_segments)
# Prints "DOMU-RESULT: PASS md5=<md5 of the pattern>" or "DOMU-RESULT: FAIL <why>".
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

result() { echo "DOMU-RESULT: $*"; sync; poweroff -f; }
fail() {
    dmesg | grep -v -E '^\[ *[0-9.]+\] (ACPI|PCI|pci|clocksource|x86|e820|Memory|Zone|Built|Kernel|Dentry|Inode|mem|NR_|rcu|Xen:|smp|smpboot|devtmpfs|Freeing|Write|Run|cpu|CPU)' | tail -n 25
    result "FAIL $*"
}
# random_file PATH MIB: MIB MiB of random bytes (dd from /dev/urandom may read short).
random_file() {
    head -c $(($2 << 20)) /dev/urandom >"$1"
    [ "$(wc -c <"$1")" -eq $(($2 << 20)) ] || fail "short random file $1"
}
arg() { tr ' ' '\n' </proc/cmdline | sed -n "s/^e2e\.$1=//p"; }

# shellcheck disable=SC2046 # the module parameters are words
insmod /xen-blkfront.ko $(arg blkfront | tr ',' ' ') || fail "insmod xen-blkfront"
i=0
while [ ! -b /dev/xvda ]; do
    i=$((i + 1))
    [ $i -lt 300 ] || fail "no /dev/xvda after 30 s"
    sleep 0.1
done
sectors=$(cat /sys/block/xvda/size)
ro=$(cat /sys/block/xvda/ro)
echo "DOMU: xvda $sectors sectors, ro=$ro, max_segments=$(cat /sys/block/xvda/queue/max_segments)," \
    "max_hw_sectors_kb=$(cat /sys/block/xvda/queue/max_hw_sectors_kb)," \
    "discard_max_bytes=$(cat /sys/block/xvda/queue/discard_max_bytes)," \
    "write_cache=$(cat /sys/block/xvda/queue/write_cache)"
mb=$((sectors / 2048))
[ "$mb" -ge 16 ] || fail "disk of $sectors sectors is too small"

case $(arg io) in
ro)
    [ "$ro" = 1 ] || fail "read-only disk shows ro=$ro"
    dd if=/dev/xvda of=/tmp/r bs=1M count=8 iflag=direct 2>/dev/null || fail "read"
    if dd if=/tmp/r of=/dev/xvda bs=4k count=1 oflag=direct conv=fsync 2>/dev/null; then
        fail "a write to the read-only disk succeeded"
    fi
    result "PASS md5=$(md5sum </tmp/r | cut -d' ' -f1)"
    ;;
rw)
    [ "$ro" = 0 ] || fail "writable disk shows ro=$ro"
    echo "DOMU: before md5=$(dd if=/dev/xvda bs=1M count=8 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
    random_file /tmp/p 8
    sum=$(md5sum </tmp/p | cut -d' ' -f1)
    dd if=/tmp/p of=/dev/xvda bs=1M oflag=direct conv=fsync 2>/dev/null || fail "write at 0"
    dd if=/tmp/p of=/dev/xvda bs=1M seek=$((mb - 8)) oflag=direct conv=fsync 2>/dev/null ||
        fail "write at the end"
    # Three sectors at 16 MiB + 3 sectors: a segment that starts and ends inside a page.
    dd if=/tmp/p of=/dev/xvda bs=512 skip=100 count=3 seek=$((32768 + 3)) oflag=direct conv=fsync 2>/dev/null ||
        fail "sector write"
    sync
    echo 3 >/proc/sys/vm/drop_caches
    got=$(dd if=/dev/xvda bs=1M count=8 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
    [ "$got" = "$sum" ] || fail "read back at 0: $got, wrote $sum"
    got=$(dd if=/dev/xvda bs=1M skip=$((mb - 8)) count=8 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
    [ "$got" = "$sum" ] || fail "read back at the end: $got, wrote $sum"
    dd if=/tmp/p bs=512 skip=100 count=3 2>/dev/null >/tmp/s
    dd if=/dev/xvda bs=512 skip=$((32768 + 3)) count=3 iflag=direct 2>/dev/null | cmp -s - /tmp/s ||
        fail "sector read back"
    # Buffered I/O through the page cache, then a flush.
    dd if=/tmp/p of=/dev/xvda bs=64k count=16 seek=$((24 * 16)) 2>/dev/null || fail "buffered write"
    sync
    echo 3 >/proc/sys/vm/drop_caches
    got=$(dd if=/dev/xvda bs=64k skip=$((24 * 16)) count=16 2>/dev/null | md5sum | cut -d' ' -f1)
    want=$(dd if=/tmp/p bs=64k count=16 2>/dev/null | md5sum | cut -d' ' -f1)
    [ "$got" = "$want" ] || fail "buffered read back"
    # Discard the 1 MiB at 32 MiB (the backend advertises it).
    if [ "$(cat /sys/block/xvda/queue/discard_max_bytes)" != 0 ]; then
        blkdiscard -o $((32 << 20)) -l $((1 << 20)) /dev/xvda || fail "discard"
    fi
    # blkfront turns flushes off (write through) when the backend fails one.
    wc=$(cat /sys/block/xvda/queue/write_cache)
    [ "$wc" = "write back" ] || fail "blkfront switched flushes off: write_cache=$wc"
    result "PASS md5=$sum"
    ;;
slow)
    # 24 MiB written 1 MiB at a time with pauses (dom0 snapshots the disk meanwhile), then
    # read back whole.
    random_file /tmp/p 24
    sum=$(md5sum </tmp/p | cut -d' ' -f1)
    i=0
    while [ $i -lt 24 ]; do
        dd if=/tmp/p of=/dev/xvda bs=1M skip=$i seek=$i count=1 oflag=direct conv=fsync 2>/dev/null ||
            fail "write of MiB $i"
        sleep 0.5
        i=$((i + 1))
    done
    echo 3 >/proc/sys/vm/drop_caches
    got=$(dd if=/dev/xvda bs=1M count=24 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
    if [ "$got" != "$sum" ]; then
        i=0
        while [ $i -lt 24 ]; do
            a=$(dd if=/tmp/p bs=1M skip=$i count=1 2>/dev/null | md5sum | cut -d' ' -f1)
            b=$(dd if=/dev/xvda bs=1M skip=$i count=1 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
            [ "$a" = "$b" ] || echo "DOMU: MiB $i differs: wrote $a, reads $b"
            i=$((i + 1))
        done
        fail "read back: $got, wrote $sum"
    fi
    result "PASS md5=$sum"
    ;;
*)
    fail "no e2e.io= on the command line"
    ;;
esac
