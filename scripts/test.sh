#!/usr/bin/env bash
# Run every blktap3 test: style, lints, the x86_64 suite (unit, integration, real peers),
# the kernel NBD driver in a QEMU-booted Linux, real Xen with PV guests under QEMU, the i686
# suite (OpenXT 8's dom0 is 32-bit) and shellcheck. Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh test

step() { printf '\n=== %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets -- -D warnings

step "cargo test (x86_64)"
cargo test 2>&1 | tee target/test-x86_64.log

step "hostile guest: one million adversarial ring requests (x86_64)"
cargo test --test xenio_hostile -- --ignored hostile_stream_million 2>&1 | tee target/test-hostile.log

step "kernel NBD driver: tap-ctl create/destroy with a real /dev/nbdN (Linux in QEMU)"
scripts/nbd-kernel-vm.sh 2>&1 | tee target/test-nbd-vm.log

step "real Xen: tapdisk/tapback/tap-ctl under Xen 4.17 with Linux PV guests (QEMU/TCG)"
scripts/xen-e2e.sh 2>&1 | tee target/test-xen-e2e.log

step "cargo test (i686-unknown-linux-gnu)"
cargo test --target i686-unknown-linux-gnu 2>&1 | tee target/test-i686.log

step "shellcheck"
mapfile -t shells < <(git ls-files '*.sh' 'scripts/*' 'meta-blktap3/**/*.sh' '.ci/*' | sort -u | while read -r f; do
    [ -f "$f" ] && head -n1 "$f" | grep -q '^#!.*\(ba\)\?sh' && echo "$f"; done)
shellcheck "${shells[@]}"

step "summary"
passed=$(cat target/test-x86_64.log target/test-hostile.log target/test-i686.log | sed -n 's/^test result: [A-Za-z]*\. \([0-9]*\) passed; \([0-9]*\) failed.*/\1 \2/p' | awk '{p+=$1; f+=$2} END {print p+0, f+0}')
read -r p f <<<"$passed"
grep -q '^nbd-kernel-vm: PASS' target/test-nbd-vm.log && p=$((p + 1)) || f=$((f + 1))
read -r xp xf < <(sed -n 's/^\([0-9]*\) passed, \([0-9]*\) failed.*/\1 \2/p' target/test-xen-e2e.log | tail -n1) || true
p=$((p + ${xp:-0}))
f=$((f + ${xf:-1}))
echo "all: $p passed, $f failed"
[ "$f" -eq 0 ]
