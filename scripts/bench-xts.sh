#!/usr/bin/env bash
# XTS micro-benchmark: our batched XTS (benches/xts.rs) against `openssl speed`, in one
# run, printing MB/s (10^6 B/s) and ratios ours / openssl at matching sizes.
#
#   scripts/bench-xts.sh            shipped build (release profile, no target-cpu=native)
#   NATIVE=1 scripts/bench-xts.sh   also a -C target-cpu=native build (separate target dir,
#                                   slow first build)
#   SECS=3 scripts/bench-xts.sh     openssl speed seconds per size (default 2)
#
# Both sides divide by CPU time (openssl speed's default; the bench uses the thread CPU
# clock), so other load on a shared machine is mostly factored out.
# 64 KiB requests are compared with openssl's -bytes 16384 figure (its largest size here).
set -euo pipefail
cd "$(dirname "$0")/.."

SECS=${SECS:-2}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

if ! command -v openssl >/dev/null; then
    echo "bench-xts: openssl not found" >&2
    exit 1
fi

run_ours() { # $1 = label, rest = env assignments for cargo
    local label=$1
    shift
    echo "building and running benches/xts.rs ($label)..." >&2
    env "$@" cargo bench --quiet --bench xts -- --seconds 0.5 --reps 3 >"$TMP/ours-$label.txt"
    grep -v '^result' "$TMP/ours-$label.txt" >&2 || true
}

# Shipped configuration: no target-cpu=native, whatever the caller's environment says.
unset RUSTFLAGS CARGO_ENCODED_RUSTFLAGS CARGO_BUILD_RUSTFLAGS
cargo bench --quiet --bench xts --no-run 2>/dev/null || cargo bench --bench xts --no-run
run_ours shipped
if [ "${NATIVE:-0}" = 1 ]; then
    run_ours native RUSTFLAGS="-C target-cpu=native" CARGO_TARGET_DIR=target/native
fi

echo "running openssl speed (${SECS}s per size)..." >&2
: >"$TMP/openssl.txt"
for c in aes-128-xts aes-256-xts; do
    for b in 512 4096 16384; do
        v=$(openssl speed -seconds "$SECS" -bytes "$b" -evp "$c" 2>/dev/null |
            awk -v c="$c" 'tolower($1) == c { v = $2 } END { print v }')
        # kB/s ("9149371.73k", k = 1000 B) -> MB/s
        echo "$c $b ${v%k}" | awk '{ printf "%s %s %.0f\n", $1, $2, $3 / 1000 }' >>"$TMP/openssl.txt"
    done
done

echo
echo "openssl: $(openssl version)"
for f in "$TMP"/ours-*.txt; do
    label=${f##*/ours-}
    label=${label%.txt}
    echo
    echo "build: $label   (MB/s; ratio = ours / openssl speed at the size in the openssl column)"
    awk '
        FNR == NR { ossl[$1 " " $2] = $3; next }
        $1 == "result" { r[$2 " " $3 " " $4] = $5 }
        END {
            printf "%-12s %9s %10s %10s %9s %8s %8s\n", "cipher", "request", "ours-enc", "ours-dec", "openssl", "enc/ssl", "dec/ssl"
            n = split("aes-128-xts aes-256-xts", cs, " ")
            for (i = 1; i <= n; i++) {
                c = cs[i]
                m = split("512:512 4096:4096 65536:16384", sz, " ")
                for (j = 1; j <= m; j++) {
                    split(sz[j], p, ":")
                    e = r[c " enc " p[1]]; d = r[c " dec " p[1]]; o = ossl[c " " p[2]]
                    label = p[1] (p[1] != p[2] ? "*" : "")
                    if (o > 0)
                        printf "%-12s %9s %10.0f %10.0f %9.0f %8.2f %8.2f\n", c, label, e, d, o, e / o, d / o
                    else
                        printf "%-12s %9s %10.0f %10.0f %9s %8s %8s\n", c, label, e, d, "n/a", "-", "-"
                }
            }
            print "* 64 KiB requests compared with openssl speed -bytes 16384"
        }' "$TMP/openssl.txt" "$f"
done
