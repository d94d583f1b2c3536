#!/bin/bash
# check-release-no-sim.sh: prove that a release build holds none of the test simulations
# (cargo feature `sim`: xen::sim, tapdisk's SimXenOpener and MemImage, SimKernelNbd,
# image::fault's fault injection and its BlockFile::inject_aio and inject_aio_submit hooks; the pattern
# inject_aio below matches both).
#
#   scripts/check-release-no-sim.sh [--no-build] [--target TRIPLE] [--dir DIR]
#
# Builds what scripts/install.sh and the Yocto recipe build (cargo build --release --locked
# [--target TRIPLE]) unless --no-build, then checks the artifacts in DIR (default
# target/[TRIPLE/]release):
#   1. libblktap3.d, rustc's list of the source files compiled into the library, names no
#      file of the simulations (so they were not compiled at all);
#   2. the symbol tables of libblktap3.rlib (everything the library compiled), the cdylib
#      libblktap3.so and the four binaries have crate symbols (not stripped) and none of
#      the simulations';
#   3. no artifact carries a simulation's source path (panic locations, debug line tables).
# Prints one line per check and "N passed, M failed"; exit 1 if any failed. Pointed with
# --dir at a build made with `--features sim` it fails: that is how the check was checked.
# With --no-build, mind that `cargo bench` and `cargo test --release` (which turn `sim` on)
# leave their own library and binaries in target/release until the next release build.
set -u

src=$(cd "$(dirname "$0")/.." && pwd)
build=1
target=
dir=
while [ $# -gt 0 ]; do
    case $1 in
    --no-build) build=0 ;;
    --target) target=${2:?--target needs a triple}; shift ;;
    --dir) dir=${2:?--dir needs a directory}; shift ;;
    -h | --help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "check-release-no-sim: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

target_dir=${CARGO_TARGET_DIR:-$src/target}
if [ -z "$dir" ]; then
    dir=$target_dir/${target:+$target/}release
fi

if [ "$build" = 1 ]; then
    args=(build --release --locked --manifest-path "$src/Cargo.toml")
    [ -n "$target" ] && args+=(--target "$target")
    "${CARGO:-cargo}" "${args[@]}" || { echo "check-release-no-sim: build failed" >&2; exit 1; }
fi

# Source files of the simulations, and their symbols (demangled).
sim_files='src/xen/sim/|src/tapdisk/mem\.rs|src/image/fault\.rs'
sim_syms='blktap3::xen::sim::|blktap3::tapdisk::mem::|SimXen|SimGrants|SimEvtchn|SimBlkfront|SimDomain|SimMapping|MemXenStore|MemXsConn|SimKernelNbd|MemImage|blktap3::image::fault::|FaultFile|inject_aio|open_wrapped'

pass=0
fail=0
ok() { echo "ok   $*"; pass=$((pass + 1)); }
bad() { echo "FAIL $*"; fail=$((fail + 1)); }

depinfo=$dir/libblktap3.d
if [ ! -f "$depinfo" ]; then
    bad "$depinfo: missing"
elif ! grep -q 'src/lib\.rs' "$depinfo"; then
    bad "$depinfo: does not list src/lib.rs (not rustc's dep-info?)"
elif hits=$(grep -oE "[^ ]*($sim_files)[^ ]*" "$depinfo" | sort -u) && [ -n "$hits" ]; then
    bad "$depinfo: compiled simulation sources: $(tr '\n' ' ' <<<"$hits")"
else
    ok "$depinfo: $(tr ' ' '\n' <"$depinfo" | grep -c '/src/.*\.rs$') source files compiled, none of the simulations"
fi

for f in libblktap3.rlib libblktap3.so tapdisk tap-ctl tapback vhd-util; do
    p=$dir/$f
    if [ ! -f "$p" ]; then
        bad "$p: missing"
        continue
    fi
    syms=$(nm -C --defined-only "$p" 2>/dev/null)
    total=$(grep -c 'blktap3::' <<<"$syms")
    if [ "$total" -eq 0 ]; then
        bad "$p: no blktap3:: symbols (stripped?), cannot check"
        continue
    fi
    found=$(grep -E "$sim_syms" <<<"$syms" | head -n 5)
    if [ -n "$found" ]; then
        bad "$p: simulation symbols, e.g.:"
        while IFS= read -r line; do printf '       %s\n' "$line"; done <<<"$found"
    else
        ok "$p: $total blktap3:: symbols, none of the simulations"
    fi
    paths=$(grep -aoE "($sim_files)[A-Za-z_/]*(\.rs)?" "$p" | sort -u | head -n 5)
    if [ -n "$paths" ]; then
        bad "$p: simulation source paths: $(tr '\n' ' ' <<<"$paths")"
    else
        ok "$p: no simulation source paths"
    fi
done

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
