#!/bin/busybox sh
# shellcheck shell=dash
# PID 1 of the benchmark guest of scripts/bench-xen.sh (a PV domU): loads xen-blkfront, waits
# for /dev/xvda and runs /bin/blkbench on it once per workload (O_DIRECT, Linux AIO).
# Options come from the kernel command line:
#   bench.w=NAME:MODE:BYTES:QD,...   the workloads, in order (MODE as blkbench takes it)
#   bench.secs=S bench.ramp=R        counted seconds and uncounted ramp per workload
# Prints "DOMU: xvda ..." (the queue limits blkfront negotiated), one
# "DOMU-BENCH: NAME BLKBENCH ..." line per workload, then "DOMU-RESULT: PASS" or
# "DOMU-RESULT: FAIL <why>", and powers off.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

result() { echo "DOMU-RESULT: $*"; sync; poweroff -f; }
arg() { tr ' ' '\n' </proc/cmdline | sed -n "s/^bench\.$1=//p"; }

insmod /xen-blkfront.ko || result "FAIL insmod xen-blkfront"
i=0
while [ ! -b /dev/xvda ]; do
    i=$((i + 1))
    [ $i -lt 300 ] || result "FAIL no /dev/xvda after 30 s"
    sleep 0.1
done
q=/sys/block/xvda/queue
echo "DOMU: xvda $(cat /sys/block/xvda/size) sectors, max_segments=$(cat $q/max_segments)," \
    "max_hw_sectors_kb=$(cat $q/max_hw_sectors_kb), nr_requests=$(cat $q/nr_requests)," \
    "mq=$(find /sys/block/xvda/mq -mindepth 1 -maxdepth 1 | wc -l)"
secs=$(arg secs)
ramp=$(arg ramp)
for w in $(arg w | tr ',' ' '); do
    name=${w%%:*}
    rest=${w#*:}
    mode=${rest%%:*}
    rest=${rest#*:}
    bs=${rest%%:*}
    qd=${rest#*:}
    out=$(/bin/blkbench /dev/xvda "$mode" "$bs" "$qd" "$secs" "$ramp" 2>&1) ||
        result "FAIL $name: $out"
    echo "DOMU-BENCH: $name $out"
done
result PASS
