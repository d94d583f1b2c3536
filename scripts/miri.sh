#!/bin/bash
# Run the code Miri can interpret under Miri (undefined behaviour, out-of-bounds, data races,
# uninitialised reads, leaks): the codecs and the ring logic over simulated memory.
#
#   scripts/miri.sh [--install] [--list] [--suite NAME]... [--help]
#
# --install: when Miri is missing, install it first (the rustup command below; it downloads
# from static.rust-lang.org). scripts/test.sh passes it.
#
# Suites (each one `cargo +nightly miri test` invocation, names are libtest filters):
#   lib          unit tests: control::msg (tap-ctl message codec), nbd::proto (NBD handshake and
#                request codec), image::vhd::format (footer/header/BAT/batmap structs),
#                image::crypto::keyhash
#   blkif        tests/blkif_parse.rs, blkif_ring.rs, blkif_layout.rs, blkif_xenbus.rs: request
#                parsing and BackRing/FrontRing over HeapMem (simulated shared memory), less
#                the spinning concurrent-scribbler test (too slow under Miri)
#   xenstore     tests/xen_xenstore_wire.rs: the xenstored wire codec (not the client_* socket tests)
# Proptest-based tests run with PROPTEST_CASES (default 4 here: Miri is ~1000x slower).
# Needs a nightly toolchain with the miri and rust-src components (MIRI_TOOLCHAIN, default
# nightly; tested with nightly 1.97.0 of 2026-05-19):
#   rustup toolchain install nightly --profile minimal --component miri,rust-src
# Not run (Miri cannot): tests that open files, sockets, mmap grant regions, spawn processes or
# call ioctls or poll(2): tapdisk, vhd-util, the nbd server/client, xen gntdev/evtchn, and the
# SimXen grant tests (tests/xen_sim.rs: its guest memory is a memfd, and Miri has no
# memfd_create).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SUITES=()

usage() {
	awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
}

ALL=(lib blkif xenstore)
INSTALL=0
while [ $# -gt 0 ]; do
	case "$1" in
	--install) INSTALL=1 ;;
	--suite)
		[ $# -gt 1 ] || {
			echo "miri.sh: --suite needs NAME" >&2
			exit 2
		}
		SUITES+=("$2")
		shift
		;;
	--list)
		printf '%s\n' "${ALL[@]}"
		exit 0
		;;
	-h | --help)
		usage
		exit 0
		;;
	*)
		echo "miri.sh: unknown argument $1 (see --help)" >&2
		exit 2
		;;
	esac
	shift
done
[ ${#SUITES[@]} -gt 0 ] || SUITES=("${ALL[@]}")

command -v rustup >/dev/null || {
	echo "miri.sh: rustup not found (Miri ships as a rustup component of a nightly toolchain)" >&2
	exit 2
}
TC=${MIRI_TOOLCHAIN:-nightly}
if ! cargo "+$TC" miri --version >/dev/null 2>&1 && [ "$INSTALL" = 1 ]; then
	echo "miri.sh: installing Miri: rustup toolchain install $TC --profile minimal --component miri,rust-src" >&2
	rustup toolchain install "$TC" --profile minimal --component miri,rust-src >&2
fi
if ! cargo "+$TC" miri --version >/dev/null 2>&1; then
	echo "miri.sh: Miri is not installed; run:" >&2
	echo "  rustup toolchain install $TC --profile minimal --component miri,rust-src" >&2
	exit 2
fi

export PROPTEST_CASES="${PROPTEST_CASES:-4}"
# Proptest looks for its regression files next to the sources: let it read them.
export MIRIFLAGS="${MIRIFLAGS:--Zmiri-disable-isolation}"

run() {
	local name=$1
	shift
	local start
	start=$(date +%s)
	echo "miri.sh: [$name] cargo +$TC miri test $*" >&2
	if (cd "$ROOT" && cargo "+$TC" miri test "$@"); then
		echo "miri.sh: [$name] ok in $(($(date +%s) - start)) s" >&2
	else
		echo "miri.sh: [$name] FAILED" >&2
		FAILED+=("$name")
	fi
}

FAILED=()
for s in "${SUITES[@]}"; do
	case "$s" in
	lib)
		run lib --lib -- control::msg nbd::proto image::vhd::format image::crypto::keyhash
		;;
	blkif)
		# concurrent_scribbling_thread_never_breaks_validation spins a writer thread against
		# 200 ring rounds: over 5 minutes under Miri, so it is left to the native suite.
		run blkif --test blkif_parse --test blkif_ring --test blkif_layout --test blkif_xenbus \
			-- --skip concurrent_scribbling_thread_never_breaks_validation
		;;
	xenstore)
		# The codec tests only: the client_* tests talk over a socket with poll(2).
		run xenstore --test xen_xenstore_wire -- header_layout decode_needs payload_helpers \
			random_streams messages_round_trip
		;;
	*)
		echo "miri.sh: no suite $s (see --list)" >&2
		exit 2
		;;
	esac
done
# The line scripts/test.sh's summary counts.
echo "miri: $((${#SUITES[@]} - ${#FAILED[@]})) passed, ${#FAILED[@]} failed"
if [ ${#FAILED[@]} -gt 0 ]; then
	echo "miri.sh: FAILED: ${FAILED[*]}" >&2
	exit 1
fi
echo "miri.sh: PASS (${SUITES[*]})" >&2
