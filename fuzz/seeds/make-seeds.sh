#!/bin/bash
# Regenerate the seed corpora in fuzz/corpus/<target>/ (see docs/fuzzing.md for what each is).
#
#   fuzz/seeds/make-seeds.sh [--bin DIR] [--help]
#
# --bin DIR: where tapdisk, tap-ctl and vhd-util are (default: target/debug of this checkout;
# build them first with `cargo build`). Needs qemu-img, qemu-io, nbdinfo, nbdcopy (libnbd-bin)
# and python3. Real files and real traffic:
#   vhd_open       VHDs made by qemu-img (vpc) and by our vhd-util (dynamic, preallocated,
#                  differencing, raw parent, keyhash)
#   control_msg    tap-ctl <-> tapdisk control traffic, recorded by fuzz/seeds/capture.py
#   nbd_handshake,
#   nbd_conn       nbdinfo/nbdcopy/qemu-io <-> tapdisk's NBD export, recorded the same way
#   blkif_parse,
#   xs_wire,
#   tapback_values built here from the wire layouts (no Xen needed): typical requests, xenstore
#                  replies and the key sequences blkfront writes
# Existing seeds in those directories are replaced (names are stable; the contents of captured
# seeds vary with the PIDs and random data of the run).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
BIN="$ROOT/target/debug"
while [ $# -gt 0 ]; do
	case "$1" in
	--bin)
		BIN=$2
		shift
		;;
	-h | --help)
		awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
		exit 0
		;;
	*)
		echo "make-seeds.sh: unknown argument $1 (see --help)" >&2
		exit 2
		;;
	esac
	shift
done
for t in "$BIN/tapdisk" "$BIN/tap-ctl" "$BIN/vhd-util"; do
	[ -x "$t" ] || {
		echo "make-seeds.sh: $t missing: run cargo build (or pass --bin DIR)" >&2
		exit 2
	}
done
for t in qemu-img qemu-io nbdinfo nbdcopy python3; do
	command -v "$t" >/dev/null || {
		echo "make-seeds.sh: $t not found (apt-get install qemu-utils libnbd-bin python3)" >&2
		exit 2
	}
done

CORPUS="$ROOT/fuzz/corpus"
CAPTURE="$ROOT/fuzz/seeds/capture.py"
W=$(mktemp -d)
PIDS=()
cleanup() {
	for p in "${PIDS[@]}"; do
		kill "$p" 2>/dev/null || true
	done
	rm -rf "$W"
}
trap cleanup EXIT

fresh() {
	rm -rf "${CORPUS:?}/$1"
	mkdir -p "$CORPUS/$1"
}

# --- vhd_open ----------------------------------------------------------------------------
fresh vhd_open
V="$BIN/vhd-util"
D="$CORPUS/vhd_open"
qemu-img create -q -f vpc -o subformat=dynamic "$D/qemu-dynamic-4M.vhd" 4M
qemu-img create -q -f vpc -o subformat=fixed "$D/qemu-fixed-64K.vhd" 64K
"$V" create -n "$D/vhdutil-dynamic-2M.vhd" -s 2
"$V" create -n "$D/vhdutil-prealloc-2M.vhd" -s 2 -S 16
"$V" create -n "$W/parent.vhd" -s 2
"$V" snapshot -n "$W/child.vhd" -p "$W/parent.vhd"
cp "$W/child.vhd" "$D/vhdutil-differencing.vhd"
truncate -s 2M "$W/parent.raw"
"$V" snapshot -n "$W/rawchild.vhd" -p "$W/parent.raw" -m
cp "$W/rawchild.vhd" "$D/vhdutil-differencing-raw-parent.vhd"
"$V" create -n "$D/vhdutil-keyhash.vhd" -s 2
"$V" key -s -n "$D/vhdutil-keyhash.vhd" \
	-H 2b1f5e0c8d4a7b3e9f6a1c2d5e8f0a3b4c7d9e1f2a5b8c0d3e6f9a2b5c8d1e4f \
	-N 000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f

# --- tapdisk: control and NBD traffic ------------------------------------------------------
mkdir -p "$W/ctl" "$W/px"
export BLKTAP_CONTROL_DIR="$W/ctl" BLKTAP_NBD_DEVICE=0 BLKTAP_TAPDISK="$BIN/tapdisk"
T="$BIN/tap-ctl"
truncate -s 64K "$W/a.raw"
pid=$("$T" spawn)
PIDS+=("$pid")
minor_dev=$("$T" allocate)
minor=${minor_dev##*-}
python3 "$CAPTURE" "$W/px/ctl$pid" "$W/ctl/ctl$pid" "$W/ctl-cap" &
PIDS+=("$!")
sleep 0.5
ctl() {
	BLKTAP_CONTROL_DIR="$W/px" "$T" "$@" >/dev/null 2>&1 || true
}
ctl attach -p "$pid" -m "$minor"
ctl open -p "$pid" -m "$minor" -a "aio:$W/a.raw"
ctl list -p "$pid"
ctl stats -p "$pid" -m "$minor"
ctl pause -p "$pid" -m "$minor"
ctl unpause -p "$pid" -m "$minor" -a "aio:$W/a.raw"
ctl open -p "$pid" -m 7 -a "vhd:$W/missing.vhd"
NAMES=(attach open list stats pause unpause open-error)

# One recording proxy per client, so that every seed is one client's whole conversation
# (@URI@ in the command is replaced by the proxy's NBD URI).
nbd_client() {
	local name=$1 proxy
	shift
	python3 "$CAPTURE" "$W/px/nbd-$name" "$W/ctl/nbd$pid.$minor" "$W/nbd-$name" &
	proxy=$!
	sleep 0.5
	local uri="nbd+unix:///?socket=$W/px/nbd-$name" args=() a
	for a in "$@"; do
		args+=("${a//@URI@/$uri}")
	done
	"${args[@]}" >/dev/null 2>&1 || true
	sleep 0.3
	kill "$proxy"
	wait "$proxy" 2>/dev/null || true
}
head -c 8192 /dev/urandom >"$W/w.bin"
nbd_client nbdinfo nbdinfo @URI@
nbd_client nbdinfo-map nbdinfo --map @URI@
nbd_client nbdinfo-list nbdinfo --list @URI@
nbd_client nbdcopy-read nbdcopy --connections=1 --request-size=16384 @URI@ null:
nbd_client nbdcopy-write nbdcopy --connections=1 "$W/w.bin" @URI@
nbd_client qemu-io qemu-io -f raw @URI@ -c "write -P 0x42 0 4k" -c "read 0 8k" -c flush \
	-c "discard 8k 4k" -c "write -z 16k 4k" -c "write -P 0x17 512 512"
sleep 0.5
BLKTAP_CONTROL_DIR="$W/ctl" "$T" destroy -p "$pid" -m "$minor" >/dev/null 2>&1 || true

fresh control_msg
for i in "${!NAMES[@]}"; do
	n=$((i + 1))
	# First byte 0: the LP64 layout (tapdisk and tap-ctl on x86_64).
	for dir in c2s s2c; do
		f="$W/ctl-cap.$n.$dir"
		[ -s "$f" ] || continue
		kind=request
		[ "$dir" = s2c ] && kind=reply
		{ printf '\000'; cat "$f"; } >"$CORPUS/control_msg/tapctl-${NAMES[$i]}-$kind"
	done
done

fresh nbd_handshake
fresh nbd_conn
for f in "$W"/nbd-*.c2s; do
	[ -s "$f" ] || continue
	name=$(basename "$f" .c2s)
	# First byte 0x40: a 64 KiB writable export, as the captured one.
	for t in nbd_handshake nbd_conn; do
		{ printf '\100'; cat "$f"; } >"$CORPUS/$t/${name#nbd-}-client"
	done
done

# --- generated from the wire layouts ------------------------------------------------------
fresh blkif_parse
fresh xs_wire
fresh tapback_values
python3 - "$CORPUS" <<'PY'
import struct, sys, os
corpus = sys.argv[1]

def put(target, name, data):
    with open(os.path.join(corpus, target, name), "wb") as f:
        f.write(data)

# blkif_parse: u64 disk sectors (LE), flags (1 ro, 2 barrier, 4 flush, 8 discard),
# max_indirect_segments/16, then one ring slot in the x86_64 layout (the x86_32 one differs by
# the 4-byte alignment of id; the target parses the bytes in both).
def seg(gref, first, last):
    return struct.pack("<IBBxx", gref, first, last)

def rw(op, nseg, handle, rid, sector, segs):
    return struct.pack("<BBHxxxxQQ", op, nseg, handle, rid, sector) + b"".join(segs)

prefix = struct.pack("<Q", 1 << 21) + bytes([0x0e, 16])
put("blkif_parse", "read-1seg", prefix + rw(0, 1, 0, 1, 0, [seg(8, 0, 7)]))
put("blkif_parse", "write-11seg", prefix + rw(1, 11, 0, 2, 64, [seg(9 + i, 0, 7) for i in range(11)]))
put("blkif_parse", "flush", prefix + rw(3, 0, 0, 3, 0, []))
put("blkif_parse", "barrier", prefix + rw(2, 0, 0, 4, 0, []))
discard = struct.pack("<BBHxxxxQQQ", 5, 0, 0, 5, 128, 256)
put("blkif_parse", "discard", prefix + discard)
# BLKIF_OP_INDIRECT: indirect_op, nr_segments, id, sector_number, handle, grefs[8]
ind = struct.pack("<BBHxxxxQQH", 6, 0, 40, 6, 256, 0) + b"\0\0" + struct.pack("<8I", *range(20, 28))
put("blkif_parse", "indirect-read-40seg", prefix + ind + bytes(range(256)) * 2)

# xs_wire: xsd_sockmsg {type, req_id, tx_id, len} (LE u32s) + payload.
def xs(t, rid, tx, payload):
    return struct.pack("<IIII", t, rid, tx, len(payload)) + payload
XS_DIRECTORY, XS_READ, XS_GET_PERMS, XS_WATCH, XS_TRANSACTION_START, XS_WRITE, XS_ERROR, XS_WATCH_EVENT = 1, 2, 3, 4, 6, 11, 16, 15
put("xs_wire", "read-reply", xs(XS_READ, 1, 0, b"4"))
put("xs_wire", "directory-reply", xs(XS_DIRECTORY, 2, 0, b"ring-ref\0event-channel\0protocol\0state\0"))
put("xs_wire", "perms-reply", xs(XS_GET_PERMS, 3, 0, b"n0\0r5\0"))
put("xs_wire", "tx-start-reply", xs(XS_TRANSACTION_START, 4, 0, b"17\0"))
put("xs_wire", "error-reply", xs(XS_ERROR, 5, 17, b"EAGAIN\0"))
put("xs_wire", "write-request", xs(XS_WRITE, 6, 17, b"/local/domain/5/device/vbd/51712/state\0" + b"3"))
put("xs_wire", "watch-event", xs(XS_WATCH_EVENT, 0, 0, b"/local/domain/0/backend/vbd3/5/51712/state\0tok\0"))
put("xs_wire", "stream-3", xs(XS_WATCH, 7, 0, b"OK\0") + xs(XS_READ, 8, 0, b"x86_64-abi") + xs(XS_ERROR, 9, 0, b"ENOENT\0"))

# tapback_values: records [key index, value length, value]; key indices as in the target:
# 0 state, 1 ring-ref, 2..5 ring-ref0..3, 6 ring-page-order, 7 event-channel, 8 protocol,
# 9 feature-persistent, 10 device-type, 11 multi-queue-num-queues.
def recs(*kv):
    return b"".join(bytes([k, len(v)]) + v for k, v in kv)
put("tapback_values", "blkfront-connect", recs((1, b"100"), (7, b"7"), (8, b"x86_64-abi"), (9, b"0"), (0, b"3")))
put("tapback_values", "blkfront-connect-order2", recs((6, b"2"), (2, b"8"), (3, b"9"), (4, b"10"), (5, b"11"), (7, b"12"), (8, b"x86_32-abi"), (0, b"3")))
put("tapback_values", "connect-then-close", recs((1, b"5"), (7, b"3"), (0, b"3"), (0, b"5"), (0, b"6")))
put("tapback_values", "bad-values", recs((1, b"-1"), (7, b"0x10"), (8, b"arm-abi"), (6, b"99"), (0, b"3")))
put("tapback_values", "cdrom-multiqueue", recs((10, b"cdrom"), (11, b"4"), (1, b"1"), (7, b"2"), (0, b"3")))
put("tapback_values", "physical-device-text", b"ca:10\0")
# The stale-ring bug this target found: Connected, Closing, then a new ring and Initialised.
put("tapback_values", "closing-then-new-ring", recs((1, b"100"), (7, b"7"), (0, b"3"), (0, b"5"), (1, b"200"), (7, b"9"), (0, b"3")))
PY
echo "make-seeds.sh: seeds in $CORPUS:" >&2
du -sh "$CORPUS"/* >&2
