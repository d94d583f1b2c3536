#!/bin/bash
# Build and run the libFuzzer targets in fuzz/ (see docs/fuzzing.md).
#
#   scripts/fuzz.sh --ci [SECONDS]   every target for SECONDS (default 25) each; fails on a crash
#   scripts/fuzz.sh --long HOURS     a campaign of HOURS in total, split evenly over the targets;
#                                    restarts a target after a crash; prints time, executions and
#                                    crashes per target
#   scripts/fuzz.sh --build          only build the targets
#   scripts/fuzz.sh --list           list the targets
#
# Options: --target NAME (repeatable; default all), --asan (AddressSanitizer: needs a nightly
# toolchain), --out DIR (work directory, default target/fuzz), --help.
#
# The targets are built with the project's stable toolchain: libfuzzer-sys links libFuzzer (built
# from C++ sources, needs a C++ compiler) and RUSTFLAGS turn on SanitizerCoverage, debug
# assertions and overflow checks. The seed corpora in fuzz/corpus/<target>/ are read, never
# written: new inputs go to the work directory, crash inputs to <out>/artifacts/<target>/.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
FUZZ="$ROOT/fuzz"
TRIPLE=x86_64-unknown-linux-gnu
MODE=""
ARG=""
ASAN=0
OUT="$ROOT/target/fuzz"
BUILD="$FUZZ/target"
TARGETS=()

usage() {
	awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
}

die() {
	echo "fuzz.sh: $*" >&2
	exit 2
}

all_targets() {
	sed -n 's/^name = "\(.*\)"$/\1/p' "$FUZZ/Cargo.toml" | grep -v '^blktap3-fuzz$'
}

while [ $# -gt 0 ]; do
	case "$1" in
	--ci)
		MODE=ci
		if [ $# -gt 1 ] && [[ "$2" =~ ^[0-9]+$ ]]; then
			ARG=$2
			shift
		fi
		;;
	--long)
		MODE=long
		[ $# -gt 1 ] || die "--long needs HOURS"
		ARG=$2
		[[ "$ARG" =~ ^[0-9]+([.][0-9]+)?$ ]] || die "--long HOURS: not a number: $ARG"
		shift
		;;
	--build) MODE=build ;;
	--list) MODE=list ;;
	--target)
		[ $# -gt 1 ] || die "--target needs NAME"
		TARGETS+=("$2")
		shift
		;;
	--asan) ASAN=1 ;;
	--out)
		[ $# -gt 1 ] || die "--out needs DIR"
		OUT=$2
		shift
		;;
	-h | --help)
		usage
		exit 0
		;;
	*) die "unknown argument: $1 (see --help)" ;;
	esac
	shift
done
[ -n "$MODE" ] || {
	usage >&2
	exit 2
}

mapfile -t ALL < <(all_targets)
if [ "$MODE" = list ]; then
	printf '%s\n' "${ALL[@]}"
	exit 0
fi
if [ ${#TARGETS[@]} -eq 0 ]; then
	TARGETS=("${ALL[@]}")
fi
for t in "${TARGETS[@]}"; do
	printf '%s\n' "${ALL[@]}" | grep -qx "$t" || die "no such target: $t (see --list)"
done

# --- tools -------------------------------------------------------------------------------
command -v cargo >/dev/null || die "cargo not found: install Rust (rustup) first"
command -v c++ >/dev/null || command -v g++ >/dev/null || command -v clang++ >/dev/null ||
	die "no C++ compiler: libfuzzer-sys builds libFuzzer from source (apt-get install g++)"
[ "$(uname -m)" = x86_64 ] || die "fuzzing is set up for x86_64 hosts only"

TOOLCHAIN=()
FLAGS="--cfg fuzzing -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4"
FLAGS+=" -Cllvm-args=-sanitizer-coverage-inline-8bit-counters"
FLAGS+=" -Cllvm-args=-sanitizer-coverage-pc-table"
FLAGS+=" -Cllvm-args=-sanitizer-coverage-trace-compares"
FLAGS+=" -Cdebug-assertions -Coverflow-checks"
if [ "$ASAN" = 1 ]; then
	command -v rustup >/dev/null || die "--asan needs rustup and a nightly toolchain"
	rustup toolchain list | grep -q '^nightly' ||
		die "--asan needs a nightly toolchain: rustup toolchain install nightly --profile minimal"
	TOOLCHAIN=(+nightly)
	FLAGS+=" -Zsanitizer=address"
fi

# --- build -------------------------------------------------------------------------------
BIN="$BUILD/$TRIPLE/release"
build() {
	echo "fuzz.sh: building ${TARGETS[*]}${TOOLCHAIN[*]:+ with ${TOOLCHAIN[*]}}" >&2
	local bins=()
	for t in "${TARGETS[@]}"; do
		bins+=(--bin "$t")
	done
	(cd "$FUZZ" && RUSTFLAGS="$FLAGS" cargo "${TOOLCHAIN[@]}" build --release --locked \
		--target "$TRIPLE" --target-dir "$BUILD" "${bins[@]}")
}
build
[ "$MODE" = build ] && exit 0

# --- run ---------------------------------------------------------------------------------
# run_once TARGET SECONDS LOG: one libFuzzer run; returns libFuzzer's status.
run_once() {
	local t=$1 secs=$2 log=$3
	local work="$OUT/corpus/$t" art="$OUT/artifacts/$t"
	mkdir -p "$work" "$art" "$FUZZ/corpus/$t"
	"$BIN/$t" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
		-artifact_prefix="$art/" "$work" "$FUZZ/corpus/$t" >"$log" 2>&1
}

# execs LOG: executions libFuzzer reported.
execs() {
	sed -n 's/^stat::number_of_executed_units: *//p' "$1" | tail -n1 | grep . || echo 0
}

artifacts() {
	mkdir -p "$OUT/artifacts/$1"
	find "$OUT/artifacts/$1" -maxdepth 1 -type f \
		\( -name 'crash-*' -o -name 'leak-*' -o -name 'timeout-*' -o -name 'oom-*' \) 2>/dev/null |
		wc -l
}

mkdir -p "$OUT/logs"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
FAILED=()
if [ "$MODE" = ci ]; then
	SECS=${ARG:-25}
	for t in "${TARGETS[@]}"; do
		before=$(artifacts "$t")
		log="$OUT/logs/$t.log"
		start=$(date +%s)
		if run_once "$t" "$SECS" "$log"; then st=ok; else st=FAILED; fi
		el=$(($(date +%s) - start))
		new=$(($(artifacts "$t") - before))
		[ "$new" -gt 0 ] && st=FAILED
		printf '%-16s %4ss %12s execs  %s\n' "$t" "$el" "$(execs "$log")" "$st" | tee -a "$SUMMARY"
		if [ "$st" != ok ]; then
			FAILED+=("$t")
			grep -E '^(==[0-9]+==|thread .* panicked|SUMMARY:|artifact_prefix|Test unit written)' "$log" |
				head -n 20 >&2 || true
			echo "fuzz.sh: $t failed: log $log, inputs in $OUT/artifacts/$t/" >&2
		fi
	done
else
	TOTAL=$(awk -v h="$ARG" 'BEGIN { printf "%d", h * 3600 }')
	PER=$((TOTAL / ${#TARGETS[@]}))
	[ "$PER" -ge 1 ] || die "--long $ARG: too short for ${#TARGETS[@]} targets"
	echo "fuzz.sh: campaign of ${ARG} h, ${PER} s per target" >&2
	printf '%-16s %10s %14s %8s\n' target seconds executions crashes | tee -a "$SUMMARY"
	for t in "${TARGETS[@]}"; do
		before=$(artifacts "$t")
		start=$(date +%s)
		total=0
		runs=0
		# After a crash libFuzzer stops: record it and go on until the time is used up.
		while :; do
			left=$((PER - ($(date +%s) - start)))
			[ "$left" -gt 0 ] || break
			runs=$((runs + 1))
			log="$OUT/logs/$t.$runs.log"
			run_once "$t" "$left" "$log" || true
			total=$((total + $(execs "$log")))
			[ "$(($(artifacts "$t") - before))" -lt 20 ] || break
		done
		el=$(($(date +%s) - start))
		crashes=$(($(artifacts "$t") - before))
		[ "$crashes" -gt 0 ] && FAILED+=("$t")
		printf '%-16s %10s %14s %8s\n' "$t" "$el" "$total" "$crashes" | tee -a "$SUMMARY"
	done
fi
echo "fuzz.sh: summary in $SUMMARY" >&2
# The line scripts/test.sh's summary counts.
echo "fuzz: $((${#TARGETS[@]} - ${#FAILED[@]})) passed, ${#FAILED[@]} failed"
if [ ${#FAILED[@]} -gt 0 ]; then
	echo "fuzz.sh: FAILED: ${FAILED[*]} (crash inputs under $OUT/artifacts/)" >&2
	exit 1
fi
echo "fuzz.sh: PASS (${#TARGETS[@]} targets, no crash)" >&2
