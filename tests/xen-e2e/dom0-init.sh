#!/bin/sh
# PID 1 of the Xen end-to-end dom0 (scripts/xen-e2e.sh): mounts, the Xen kernel modules,
# xenstored, xen-init-dom0 and xenconsoled; then each test in /xen-e2e/tests, one result line
# each, a summary line, and power-off (Xen then exits QEMU).
PATH=/usr/lib/xen-4.17/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /dev/shm
# Images and logs get their own space: the rootfs (the unpacked initramfs) is a tmpfs of half
# of dom0's memory and already half full.
mount -t tmpfs -o size=640m tmpfs /tmp
# udev would make these; xl's hotplug locking and shell redirections want them.
ln -sf /proc/self/fd /dev/fd
ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout
ln -sf /proc/self/fd/2 /dev/stderr

# shellcheck source=tests/xen-e2e/lib.sh
. /xen-e2e/lib.sh
set -a
# shellcheck source=/dev/null
. /xen-e2e/env
set +a

# tapdisk logs to syslog: keep it in /tmp/messages (tests print it when they fail).
/xen-e2e/busybox syslogd -n -O /tmp/messages &
say "dom0 init reached at uptime $(cut -d' ' -f1 /proc/uptime)s"
for m in xenfs xen-evtchn xen-gntdev xen-gntalloc xen-privcmd nbd; do
    modprobe "$m" 2>/dev/null || say "modprobe $m failed (built in?)"
done
mount -t xenfs xenfs /proc/xen
mkdir -p /run/xenstored /var/log/xen/console /var/lib/xen /run/xen /var/run
xenstored --pid-file /run/xenstore.pid
i=0
while [ ! -S /run/xenstored/socket ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
xen-init-dom0 >/dev/null
xenconsoled --pid-file=/run/xenconsoled.pid --log=guest --log-dir=/var/log/xen/console
say "toolstack up at uptime $(cut -d' ' -f1 /proc/uptime)s"

passed=0
failed=0
skipped=0
for t in /xen-e2e/tests/*.sh; do
    name=$(basename "$t" .sh)
    name=${name#[0-9][0-9]-}
    if [ -n "$XEN_E2E_TESTS" ]; then
        case " $XEN_E2E_TESTS " in *" $name "*) ;; *) continue ;; esac
    fi
    start=$(cut -d' ' -f1 /proc/uptime)
    say "starting $name ($(df -m /tmp | awk 'NR == 2 {print $4}') MiB free in /tmp, $(df -m / | awk 'NR == 2 {print $4}') in /)"
    rc=0
    sh "$t" >"/tmp/test-$name.log" 2>&1 || rc=$?
    secs=$(awk -v a="$start" -v b="$(cut -d' ' -f1 /proc/uptime)" 'BEGIN {printf "%.1f", b - a}')
    case $rc in
        0) passed=$((passed + 1)); verdict=PASS ;;
        77) skipped=$((skipped + 1)); verdict=SKIP ;;
        *) failed=$((failed + 1)); verdict="FAIL rc=$rc" ;;
    esac
    sed 's/^/  log| /' "/tmp/test-$name.log"
    echo "XEN-E2E-RESULT: $name $verdict (${secs}s)"
done
echo "XEN-E2E-SUMMARY: $passed passed, $failed failed, $skipped skipped"
sync
echo o >/proc/sysrq-trigger
sleep 10
