#!/bin/sh
# OpenXT's encrypted VHD under a real guest: an AES-XTS-512 key file in
# TAPDISK3_CRYPTO_KEYDIR, the keyhash set with vhd-util key; the disk is located through
# physical-device-path (the NBD socket, no kernel NBD device), and the guest uses a 16-page
# ring with 256 indirect segments per request. The guest's data reads back
# through a new tapdisk with the key, and the image cannot be opened without it. (That the
# file holds only ciphertext is checked on the host: tests/tapdisk_crypto.rs, demo.sh.)
# shellcheck source=tests/xen-e2e/lib.sh
. /xen-e2e/lib.sh
set -e
keys=/tmp/keys
mkdir -p "$keys"
vhd-util create -n /tmp/enc.vhd -s 64
head -c 64 /dev/urandom >"$keys/enc,aes-xts-plain,512.key"
vhd-util key -s -n /tmp/enc.vhd -k "$keys/enc,aes-xts-plain,512.key"
export TAPDISK3_CRYPTO_KEYDIR=$keys
sock=$(BLKTAP_NBD_DEVICE=0 tap-ctl create -a vhd:/tmp/enc.vhd)
case $sock in /run/blktap-control/nbd*) ;; *) die "expected the NBD socket path, got '$sock'" ;; esac
# The guest's blkfront asks for a 16-page ring and 256 indirect segments (Linux defaults to
# one page and 32): tapback advertises max-ring-page-order 4. Its per-request bookkeeping for
# 512 requests of 256 segments does not fit a 96 MiB guest.
GUEST_MB=256 run_vbd3_guest e2e-enc rw w vhd:/tmp/enc.vhd physical-device-path "$sock" \
    e2e.blkfront=max_ring_page_order=4,max_indirect_segments=256
case $RING in "ring (order 4,"*) ;; *) die "expected an order-4 ring, tapback says: $RING" ;; esac
stop_tapback
tap-ctl destroy -d "$sock"
dev=$(tap-ctl create -a vhd:/tmp/enc.vhd)
[ "$(md5_at "$dev" 0 8)" = "$GUEST_MD5" ] || die "decrypted data differs from what the guest wrote"
tap-ctl destroy -d "$dev"
if TAPDISK3_CRYPTO_KEYDIR=/nonexistent tap-ctl create -a vhd:/tmp/enc.vhd; then
    die "the encrypted VHD opened without its key"
fi
vhd-util check -n /tmp/enc.vhd
rm -rf /tmp/enc.vhd "$keys"
