#!/usr/bin/env bash
# blktap3 demo: create an encrypted dynamic VHD, serve it with tapdisk through tap-ctl,
# do real I/O over its NBD export with standard clients, snapshot it under pause/unpause,
# and tear everything down. Runs as root or as a normal user (everything lives in a
# temporary directory; nothing under /run is touched).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh demo
echo "== building blktap3 (release)"
cargo build --release --bins --quiet
BIN=$PWD/target/release

WORK=$(mktemp -d /tmp/blktap3-demo.XXXXXX)
export BLKTAP_CONTROL_DIR=$WORK/run      # where tapdisk puts ctl<pid>, nbd<pid>.<minor>, markers
export BLKTAP_TAPDISK=$BIN/tapdisk       # what tap-ctl spawns
export TAPDISK3_CRYPTO_KEYDIR=$WORK/keys # where tapdisk finds <name>,aes-xts-plain,<bits>.key
mkdir -p "$BLKTAP_CONTROL_DIR" "$TAPDISK3_CRYPTO_KEYDIR"

TAPPID="" MINOR=""
cleanup() {
    if [ -n "$TAPPID" ]; then
        "$BIN/tap-ctl" destroy -p "$TAPPID" -m "$MINOR" >/dev/null 2>&1 || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

run() { printf '$ %s\n' "$*"; "$@"; }
# qemu-io exits 0 even when a pattern check fails: make that fatal.
qio() {
    local out
    printf '$ qemu-io -f raw %s\n' "$*"
    out=$(qemu-io -f raw "$@" 2>&1)
    printf '%s\n' "$out" | grep -v '^ *$'
    if printf '%s\n' "$out" | grep -qi 'fail'; then echo "ERROR: qemu-io reported a failure" >&2; exit 1; fi
}

echo
echo "== 1. an encrypted 256 MiB dynamic VHD (AES-256-XTS, key file in \$TAPDISK3_CRYPTO_KEYDIR)"
run "$BIN/vhd-util" create -n "$WORK/disk.vhd" -s 256
KEY="$TAPDISK3_CRYPTO_KEYDIR/disk,aes-xts-plain,512.key"
head -c 64 /dev/urandom >"$KEY"
run "$BIN/vhd-util" key -s -n "$WORK/disk.vhd" -k "$KEY"
run "$BIN/vhd-util" key -p -n "$WORK/disk.vhd"

echo
echo "== 2. serve it: tap-ctl create spawns tapdisk, attaches a minor and opens the chain"
DEV=$(run "$BIN/tap-ctl" create -a "vhd:$WORK/disk.vhd" | tail -n1)
echo "device: $DEV"
run "$BIN/tap-ctl" list
read -r TAPPID MINOR < <("$BIN/tap-ctl" list | awk -v p="$WORK/disk.vhd" '
    { for (i = 1; i <= NF; i++) { split($i, kv, "="); f[kv[1]] = kv[2] } }
    index($0, p) { print f["pid"], f["minor"]; exit }')
NBD="nbd+unix:///?socket=$BLKTAP_CONTROL_DIR/nbd$TAPPID.$MINOR"

echo
echo "== 3. real I/O over the NBD export"
head -c $((32 << 20)) /dev/urandom >"$WORK/payload"
run nbdinfo "$NBD"
run nbdcopy "$WORK/payload" "$NBD"
run nbdcopy "$NBD" "$WORK/readback"
cmp -n $((32 << 20)) "$WORK/payload" "$WORK/readback" && echo "read back 32 MiB: identical to what was written"
qio -c "write -P 0x5a 64M 4M" -c "read -P 0x5a 64M 4M" "$NBD"
run nbdinfo --map "$NBD" | head -n 5
if python3 -c 'import sys; p = open(sys.argv[1], "rb").read(4096); d = open(sys.argv[2], "rb").read(); sys.exit(0 if p in d else 1)' \
        "$WORK/payload" "$WORK/disk.vhd"; then
    echo "ERROR: plaintext found in the image file" >&2; exit 1
fi
echo "the image file holds ciphertext: the payload's bytes do not appear in disk.vhd"

echo
echo "== 4. snapshot under pause/unpause: new writes go to the child, the parent is frozen"
run "$BIN/tap-ctl" pause -p "$TAPPID" -m "$MINOR"
run "$BIN/vhd-util" snapshot -n "$WORK/snap.vhd" -p "$WORK/disk.vhd"
run "$BIN/tap-ctl" unpause -p "$TAPPID" -m "$MINOR" -a "vhd:$WORK/snap.vhd"
qio -c "write -P 0xc3 1M 1M" -c "read -P 0xc3 1M 1M" -c "read -P 0x5a 64M 4M" "$NBD"
run nbdcopy "$NBD" "$WORK/readback"
cmp -n $((1 << 20)) "$WORK/payload" "$WORK/readback"
cmp -i $((2 << 20)) -n $((30 << 20)) "$WORK/payload" "$WORK/readback"
echo "after the snapshot: the new 1 MiB comes from snap.vhd, the rest of the payload from disk.vhd"
run "$BIN/tap-ctl" stats -p "$TAPPID" -m "$MINOR"
run "$BIN/vhd-util" scan -p "$WORK"/*.vhd

echo
echo "== 5. tear down and check the images offline"
run "$BIN/tap-ctl" destroy -p "$TAPPID" -m "$MINOR"
TAPPID=""
run "$BIN/tap-ctl" list
run "$BIN/vhd-util" check -n "$WORK/snap.vhd"
run "$BIN/vhd-util" check -n "$WORK/disk.vhd"
run "$BIN/vhd-util" query -n "$WORK/snap.vhd" -v -s -p -d
echo
echo "demo finished: encrypted VHD created, served by tapdisk via tap-ctl, written and read over NBD, snapshotted live, torn down"
