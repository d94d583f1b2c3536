#!/bin/sh
# A read-only raw disk (tap-ctl create -R, backend mode r): the guest sees ro=1, reads the
# data dom0 put there, and its write is refused.
# shellcheck source=tests/xen-e2e/lib.sh
. /xen-e2e/lib.sh
set -e
dd if=/dev/urandom of=/tmp/ro.img bs=1M count=32 2>/dev/null
want=$(dd if=/tmp/ro.img bs=1M count=8 2>/dev/null | md5sum | cut -d' ' -f1)
dev=$(tap-ctl create -R -a aio:/tmp/ro.img)
run_vbd3_guest e2e-ro ro r aio:/tmp/ro.img physical-device "$(physical_device "$dev")"
[ "$GUEST_MD5" = "$want" ] || die "the guest read $GUEST_MD5, the image holds $want"
stop_tapback
tap-ctl destroy -d "$dev"
[ "$(dd if=/tmp/ro.img bs=1M count=8 2>/dev/null | md5sum | cut -d' ' -f1)" = "$want" ] ||
    die "the read-only image changed"
rm -f /tmp/ro.img
