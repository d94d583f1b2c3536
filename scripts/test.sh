#!/usr/bin/env bash
# Run every blktap3 test: style, lints, the x86_64 suite (unit, integration, real peers),
# the kernel NBD driver in a QEMU-booted Linux, real Xen with PV guests under QEMU, the i686
# suite (OpenXT 8's dom0 is 32-bit), that a release build holds no test simulation, the
# Yocto layer (oelint-adv, crate list, the recipe's build and install run outside bitbake for
# i686), the SELinux module, the kernel config, the hotplug and init scripts, install-deps in
# fresh Debian roots, the kill -9 torture (200 kill points) and 60 power cuts (dm-flakey in a
# QEMU-booted Linux), hostile NBD and control peers against one tapdisk, every fuzz target
# for 25 s, Miri on the codecs, and shellcheck.
# Installs what it needs first. Every step runs even when an earlier one failed; the exit
# status says whether all passed.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh test
mkdir -p target

failed_steps=()
# run NAME CMD...: one step, its output shown and kept in target/test-NAME.log
run() {
    local name=$1 status
    shift
    printf '\n=== %s: %s\n' "$name" "$*"
    set +e
    "$@" 2>&1 | tee "target/test-$name.log"
    status=${PIPESTATUS[0]}
    set -e
    [ "$status" -eq 0 ] || failed_steps+=("$name (exit $status)")
}

run fmt cargo fmt --all -- --check
run clippy cargo clippy --all-targets -- -D warnings
run x86_64 cargo test
run hostile cargo test --test xenio_hostile -- --ignored hostile_stream_million
run i686 cargo test --target i686-unknown-linux-gnu
run no-sim scripts/check-release-no-sim.sh
run torture scripts/torture.sh --ci
run hostile-peers scripts/hostile-peers.sh --ci
run fuzz-fmt cargo fmt --manifest-path fuzz/Cargo.toml -- --check
run fuzz scripts/fuzz.sh --ci 25
run miri scripts/miri.sh --install --suite lib --suite xenstore
run nbd-vm scripts/nbd-kernel-vm.sh
run powercut scripts/torture-powercut-vm.sh --cuts 60
run xen-e2e scripts/xen-e2e.sh
run layer scripts/test-layer.sh
run selinux scripts/check-selinux.sh --no-install
run kernel-config scripts/check-kernel-config.sh
run toolstack-patch scripts/test-toolstack-patch.sh
run hotplug tests/hotplug/run.sh
run install-deps-roots scripts/test-install-deps.sh
mapfile -t shells < <(git ls-files | sort -u | while read -r f; do
    [ -f "$f" ] && head -n1 "$f" | grep -q '^#!.*\(ba\|da\)\?sh\b' && echo "$f"
done)
run shellcheck shellcheck "${shells[@]}"

printf '\n=== summary\n'
# Tests counted: cargo's "test result" lines, the scripts' "N passed, M failed" lines, and
# one each for the checks that report by exit status alone.
p=0 f=0
for name in x86_64 hostile i686; do
    read -r a b < <(sed -n 's/^test result: [A-Za-z]*\. \([0-9]*\) passed; \([0-9]*\) failed.*/\1 \2/p' \
        "target/test-$name.log" | awk '{p+=$1; f+=$2} END {print p+0, f+0}')
    p=$((p + a)) f=$((f + b))
done
for name in no-sim xen-e2e layer hotplug install-deps-roots fuzz miri; do
    read -r a b < <(sed -n 's/^\([a-z0-9-]*: \)\{0,1\}\([0-9]*\) passed, \([0-9]*\) failed.*/\2 \3/p' \
        "target/test-$name.log" | tail -n1) || true
    p=$((p + ${a:-0})) f=$((f + ${b:-1}))
    a="" b=""
done
for name in torture hostile-peers fuzz-fmt nbd-vm powercut selinux kernel-config toolstack-patch; do
    if printf '%s\n' "${failed_steps[@]}" | grep -q "^$name "; then f=$((f + 1)); else p=$((p + 1)); fi
done
if [ "${#failed_steps[@]}" -gt 0 ]; then
    printf 'failed step: %s\n' "${failed_steps[@]}"
    [ "$f" -gt 0 ] || f=1
fi
echo "all: $p passed, $f failed"
[ "$f" -eq 0 ] && [ "${#failed_steps[@]}" -eq 0 ]
