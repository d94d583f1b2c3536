#!/bin/sh
# The dom0 side of scripts/bench-xen.sh, run by dom0-init.sh as the only test ("bench").
# Mounts the ext4 disk the host attached (/dev/vda, holding raw.img) on /var/tmp, makes the
# fully allocated dynamic VHD and the encrypted VHD from raw.img through tapdisk, then for
# each round starts one PV guest per backend, in an order rotated every round, each guest
# running every workload with blkbench (domu-bench.sh):
#   tap-raw    our tapdisk (aio:raw.img) through tapback, vbd3 nodes as OpenXT's libxl writes
#   tap-vhd    our tapdisk, vhd:dyn.vhd (the same data, every block allocated)
#   tap-enc    our tapdisk, vhd:enc.vhd (encrypted VHD, AES-XTS-512 key)
#   qdisk      xl, backendtype=qdisk, format=raw on raw.img (QEMU's xen-block, libxl defaults)
#   qdisk-vhd  xl, backendtype=qdisk, format=vhd on dyn.vhd (not in the default set)
#   blkback    xl, phy: on a loop device of raw.img (losetup --direct-io=$BENCH_LOOP_DIO)
# dom0's page cache is dropped before every guest. Prints, live on the console:
#   XEN-BENCH: ...                                  progress
#   XEN-BENCH-INFO: backend=B ...                   how the backend opened the file
#   XEN-BENCH-RESULT: round=R backend=B workload=W mbps=X iops=Y
#   XEN-BENCH-DONE: N results
# Environment (from /xen-e2e/env): BENCH_ROUNDS, BENCH_SECS, BENCH_RAMP, BENCH_BACKENDS,
# BENCH_WORKLOADS (NAME:MODE:BYTES:QD,...), BENCH_PIN (cross: guest on pCPU 1), GUEST_MB,
# BENCH_LOOP_DIO (on|off).
# shellcheck source=tests/xen-e2e/lib.sh
. /xen-e2e/lib.sh
set -e
rounds=${BENCH_ROUNDS:-3}
secs=${BENCH_SECS:-5}
ramp=${BENCH_RAMP:-1}
backends=${BENCH_BACKENDS:-tap-raw tap-vhd tap-enc qdisk blkback}
workloads=${BENCH_WORKLOADS:?no BENCH_WORKLOADS}
guest_mb=${GUEST_MB:-128}
d=/var/tmp/bench
raw=$d/raw.img

# live MESSAGE: on the console now (the test's own log, which dom0-init.sh prints when the
# test ends, keeps only the failures).
live() { echo "$*" >/dev/console; }

for m in virtio_pci virtio_blk ext4 loop xen-blkback crc32c_generic; do
    modprobe "$m" || die "modprobe $m"
done
wait_for 20 test -b /dev/vda || die "no /dev/vda: the host attached no bench disk"
mount -o noatime /dev/vda /var/tmp || die "mount /dev/vda on /var/tmp"
fstype=$(awk '$2 == "/var/tmp" {print $3}' /proc/mounts)
[ "$fstype" = ext4 ] || die "/var/tmp is $fstype, not ext4"
[ -f "$raw" ] || die "no $raw on the bench disk"
size_mb=$(($(stat -c %s "$raw") >> 20))
live "XEN-BENCH: /var/tmp is ext4 on /dev/vda ($(df -m /var/tmp | awk 'NR == 2 {print $4}') MiB free), raw.img $size_mb MiB, dom0 $(nproc) vCPU, $(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo) MiB"

# fill_vhd VHD: every block of VHD written with raw.img's data through our tapdisk.
fill_vhd() {
    t0=$(uptime_s)
    dev=$(tap-ctl create -a "vhd:$1") || die "tap-ctl create vhd:$1"
    dd if="$raw" of="$dev" bs=1M iflag=direct oflag=direct conv=fsync 2>/dev/null || die "filling $1"
    tap-ctl destroy -d "$dev" || die "tap-ctl destroy $dev"
    blocks=$(vhd-util query -n "$1" -a) || die "vhd-util query -a $1"
    [ "$blocks" -eq $((size_mb / 2)) ] || die "$1 has $blocks blocks allocated, expected $((size_mb / 2))"
    vhd-util check -n "$1" >/dev/null || die "vhd-util check $1"
    live "XEN-BENCH: $1 filled, $blocks blocks of 2 MiB allocated, in $(awk -v a="$t0" -v b="$(uptime_s)" 'BEGIN {printf "%.0f", b - a}') s"
}
need() { case " $backends " in *" $1 "*) return 0 ;; esac; return 1; }
mkdir -p "$d/keys"
export TAPDISK3_CRYPTO_KEYDIR=$d/keys
if need tap-vhd || need qdisk-vhd; then
    rm -f "$d/dyn.vhd"
    vhd-util create -n "$d/dyn.vhd" -s "$size_mb" || die "vhd-util create dyn.vhd"
    fill_vhd "$d/dyn.vhd"
fi
if need tap-enc; then
    rm -f "$d/enc.vhd"
    vhd-util create -n "$d/enc.vhd" -s "$size_mb" || die "vhd-util create enc.vhd"
    head -c 64 /dev/urandom >"$d/keys/enc,aes-xts-plain,512.key"
    vhd-util key -s -n "$d/enc.vhd" -k "$d/keys/enc,aes-xts-plain,512.key" || die "vhd-util key -s"
    fill_vhd "$d/enc.vhd"
fi

dm=/usr/libexec/xen-qemu-system-i386
# bench_guest NAME [DISK_SPEC]: a paused PV guest running domu-bench.sh (with xl's disk line
# DISK_SPEC, if given; vbd3 disks are written by the caller). Prints its domid.
bench_guest() {
    {
        echo "name = \"$1\""
        echo 'type = "pv"'
        echo 'kernel = "/boot/vmlinuz"'
        echo 'ramdisk = "/boot/domu.cpio"'
        echo "extra = \"console=hvc0 rdinit=/init loglevel=4 bench.w=$workloads bench.secs=$secs bench.ramp=$ramp\""
        echo "memory = $guest_mb"
        echo 'vcpus = 1'
        [ "${BENCH_PIN:-cross}" != cross ] || echo 'cpus = "1"'
        echo 'on_poweroff = "destroy"'
        echo 'on_crash = "destroy"'
        if [ -n "${2:-}" ]; then
            echo "disk = [ '$2' ]"
            [ ! -x "$dm" ] || echo "device_model_override = \"$dm\""
        fi
    } >"/tmp/$1.cfg"
    xl create -p "/tmp/$1.cfg" >"/tmp/$1.xl.log" 2>&1 || {
        sed 's/^/  xl| /' "/tmp/$1.xl.log"
        return 1
    }
    xl domid "$1"
}

# flags_of PID FILE: the open flags (octal, from fdinfo) of PID's descriptors on FILE, and
# whether O_DIRECT (040000) is among them.
flags_of() {
    out=""
    for fd in /proc/"$1"/fd/*; do
        [ "$(readlink "$fd" 2>/dev/null)" = "$2" ] || continue
        f=$(awk '/^flags:/ {print $2}' "/proc/$1/fdinfo/${fd##*/}")
        if [ $((0$f & 040000)) -ne 0 ]; then dio=O_DIRECT; else dio=buffered; fi
        out="$out fd${fd##*/}=$f($dio)"
    done
    echo "${out# }"
}

nw=$(echo "$workloads" | tr ',' '\n' | grep -c .)
guest_timeout=$((180 + nw * (secs + ramp) * 4))
results=0
# run BACKEND ROUND: one guest on BACKEND; prints its XEN-BENCH-RESULT lines.
run() {
    b=$1 r=$2 name=bench-$1-$2
    sync
    echo 3 >/proc/sys/vm/drop_caches
    tapdev="" loopdev="" be=""
    case $b in
        tap-raw | tap-raw-poll | tap-vhd | tap-enc)
            poll=0
            case $b in
                tap-raw) params=aio:$raw ;;
                tap-raw-poll) params=aio:$raw poll=${BENCH_POLL_US:-1000} ;;
                tap-vhd) params=vhd:$d/dyn.vhd ;;
                tap-enc) params=vhd:$d/enc.vhd ;;
            esac
            tapdev=$(TAPDISK3_POLL_US=$poll tap-ctl create -a "$params") || die "tap-ctl create $params"
            start_tapback
            DOMID=$(bench_guest "$name") || die "xl create $name"
            write_vbd3 "$DOMID" 51712 xvda "$params" w physical-device "$(physical_device "$tapdev")" ||
                die "writing the vbd3 nodes"
            be=/local/domain/0/backend/vbd3/$DOMID/51712
            wait_for 30 backend_state "$be" 2 || die "$b: backend never reached InitWait"
            pid=$(vbd_pid "${params#*:}")
            info="tapdisk pid $pid: $(flags_of "$pid" "${params#*:}")"
            ;;
        qdisk | qdisk-vhd)
            if [ "$b" = qdisk ]; then spec="format=raw, vdev=xvda, access=rw, backendtype=qdisk, target=$raw"; else
                spec="format=vhd, vdev=xvda, access=rw, backendtype=qdisk, target=$d/dyn.vhd"
            fi
            DOMID=$(bench_guest "$name" "$spec") || die "xl create $name ($spec)"
            be=/local/domain/0/backend/qdisk/$DOMID/51712
            info=""
            ;;
        blkback)
            loopdev=$(losetup -f --show --direct-io="${BENCH_LOOP_DIO:-on}" "$raw") || die "losetup $raw"
            DOMID=$(bench_guest "$name" "phy:$loopdev,xvda,w") || die "xl create $name (phy:$loopdev)"
            be=/local/domain/0/backend/vbd/$DOMID/51712
            info="$loopdev dio=$(cat "/sys/block/${loopdev#/dev/}/loop/dio")"
            ;;
        *) die "unknown backend $b" ;;
    esac
    t0=$(uptime_s)
    xl unpause "$DOMID"
    wait_for 120 backend_state "$be" 4 || die "$b: backend $be never Connected (state $(xenstore-read "$be/state" 2>/dev/null))"
    if [ "$b" = qdisk ] || [ "$b" = qdisk-vhd ]; then
        pid=$(xenstore-read "/local/domain/$DOMID/image/device-model-pid" 2>/dev/null || pgrep -f "xen-domid $DOMID " | head -n1)
        file=$raw
        [ "$b" = qdisk ] || file=$d/dyn.vhd
        info="qemu pid $pid: $(flags_of "$pid" "$file")"
    fi
    [ "$r" != 1 ] || live "XEN-BENCH-INFO: backend=$b $info"
    if ! wait_for "$guest_timeout" guest_gone "$name"; then
        xl destroy "$name" || true
        guest_log "$name" | sed 's/^/  guest| /'
        die "$b: guest $name did not finish in ${guest_timeout}s"
    fi
    gl=$(guest_log "$name" | tr -d '\r')
    case $(echo "$gl" | sed -n 's/^DOMU-RESULT: //p' | tail -n1) in
        PASS) ;;
        *)
            echo "$gl" | sed 's/^/  guest| /'
            die "$b: guest $name failed"
            ;;
    esac
    [ "$r" != 1 ] || live "XEN-BENCH-INFO: backend=$b guest $(echo "$gl" | sed -n 's/^DOMU: xvda //p')"
    n=0
    for line in $(echo "$gl" | sed -n 's/^DOMU-BENCH: \([^ ]*\) BLKBENCH .* mbps=\([0-9.]*\) iops=\([0-9.]*\)$/\1,\2,\3/p'); do
        IFS=, read -r w mbps iops <<EOF
$line
EOF
        live "XEN-BENCH-RESULT: round=$r backend=$b workload=$w mbps=$mbps iops=$iops"
        n=$((n + 1))
    done
    [ "$n" = "$nw" ] || die "$b: guest $name reported $n of $nw workloads"
    results=$((results + n))
    # Teardown as a toolstack would: xl's daemon removes its own devices; the vbd3 backend
    # goes Closed and its directory is removed by us, then the tapdisk is destroyed.
    if [ -n "$tapdev" ]; then
        wait_for 30 backend_state "$be" 6 || die "$b: backend state $(xenstore-read "$be/state") after the guest left"
        xenstore-rm "/local/domain/0/backend/vbd3/$DOMID"
        tap-ctl destroy -d "$tapdev" || die "tap-ctl destroy $tapdev"
    fi
    if [ -n "$loopdev" ]; then
        wait_for 30 losetup -d "$loopdev" 2>/dev/null || die "losetup -d $loopdev"
    fi
    live "XEN-BENCH: round $r $b done in $(awk -v a="$t0" -v b="$(uptime_s)" 'BEGIN {printf "%.0f", b - a}') s"
}

r=1
while [ "$r" -le "$rounds" ]; do
    # Rotate the order each round so no backend always runs first or after the same one.
    order=$(echo "$backends" | awk -v r="$r" '{for (i = 0; i < NF; i++) printf " %s", $((i + r - 1) % NF + 1)}')
    live "XEN-BENCH: round $r of $rounds:$order"
    for b in $order; do
        run "$b" "$r"
    done
    r=$((r + 1))
done
stop_tapback
live "XEN-BENCH-DONE: $results results"
