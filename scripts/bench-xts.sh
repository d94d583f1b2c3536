#!/usr/bin/env bash
# XTS micro-benchmark: our batched XTS (benches/xts.rs) against `openssl speed`, in one
# run, printing MB/s (10^6 B/s) and ratios ours / openssl at the same request sizes
# (512 B, 4 KiB, 64 KiB, 1 MiB).
#
#   scripts/bench-xts.sh            shipped build (release profile, no target-cpu=native)
#   NATIVE=1 scripts/bench-xts.sh   also a -C target-cpu=native build (separate target dir,
#                                   slow first build)
#   ROUNDS=5 scripts/bench-xts.sh   alternating rounds (default 3): each round runs ours,
#                                   then openssl, both pinned to the same CPU
#   CPU=0 scripts/bench-xts.sh      the CPU both are pinned to (default: the last one)
#   SECS=2 scripts/bench-xts.sh     openssl speed seconds per size (default 1)
#
# The table gives the median over the rounds of each side and the ratio of the medians;
# "range" is the lowest and highest per-round ratio (enc and dec together), i.e. the noise.
# Both sides divide by CPU time (openssl speed's default; the bench uses the thread CPU
# clock), so other load on a shared machine is mostly factored out.
set -euo pipefail
cd "$(dirname "$0")/.."

SECS=${SECS:-1}
ROUNDS=${ROUNDS:-3}
CPU=${CPU:-$(($(nproc) - 1))}
SIZES="512 4096 65536 1048576"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

for tool in openssl taskset; do
    if ! command -v "$tool" >/dev/null; then
        echo "bench-xts: $tool not found" >&2
        exit 1
    fi
done

run_ours() { # $1 = label, $2 = round, rest = env assignments for cargo
    local label=$1 round=$2
    shift 2
    env "$@" taskset -c "$CPU" cargo bench --quiet --bench xts -- --seconds 0.5 --reps 3 \
        >"$TMP/raw.txt"
    if [ "$round" = 1 ]; then
        grep -v '^result' "$TMP/raw.txt" >&2 || true
    fi
    awk -v r="$round" '$1 == "result" { print r, $0 }' "$TMP/raw.txt" >>"$TMP/ours-$label.txt"
}

run_openssl() { # $1 = round
    local c b v
    for c in aes-128-xts aes-256-xts; do
        for b in $SIZES; do
            v=$(taskset -c "$CPU" openssl speed -seconds "$SECS" -bytes "$b" -evp "$c" 2>/dev/null |
                awk -v c="$c" 'tolower($1) == c { v = $2 } END { print v }')
            # kB/s ("9149371.73k", k = 1000 B) -> MB/s
            echo "$1 $c $b ${v%k}" | awk '{ printf "%s %s %s %.0f\n", $1, $2, $3, $4 / 1000 }' \
                >>"$TMP/openssl.txt"
        done
    done
}

# Shipped configuration: no target-cpu=native, whatever the caller's environment says.
unset RUSTFLAGS CARGO_ENCODED_RUSTFLAGS CARGO_BUILD_RUSTFLAGS
echo "building benches/xts.rs (shipped)..." >&2
cargo bench --quiet --bench xts --no-run 2>/dev/null || cargo bench --bench xts --no-run
labels=shipped
if [ "${NATIVE:-0}" = 1 ]; then
    echo "building benches/xts.rs (native)..." >&2
    RUSTFLAGS="-C target-cpu=native" CARGO_TARGET_DIR=target/native \
        cargo bench --quiet --bench xts --no-run
    labels="shipped native"
fi

: >"$TMP/openssl.txt"
for round in $(seq 1 "$ROUNDS"); do
    echo "round $round/$ROUNDS on CPU $CPU: ours, then openssl speed (${SECS}s per size)..." >&2
    for label in $labels; do
        if [ "$label" = native ]; then
            run_ours native "$round" RUSTFLAGS="-C target-cpu=native" CARGO_TARGET_DIR=target/native
        else
            run_ours shipped "$round"
        fi
    done
    run_openssl "$round"
done

echo
echo "openssl: $(openssl version); $ROUNDS alternating rounds pinned to CPU $CPU; load: $(cut -d' ' -f1-3 /proc/loadavg)"
for label in $labels; do
    echo
    echo "build: $label   (MB/s, medians over rounds; ratio = ours / openssl speed)"
    awk -v sizes="$SIZES" '
        function median(list,    a, n, i, j, t) {
            n = split(list, a, " ")
            for (i = 2; i <= n; i++)
                for (j = i; j > 1 && a[j - 1] > a[j]; j--) { t = a[j]; a[j] = a[j - 1]; a[j - 1] = t }
            return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
        }
        FNR == NR { ossl[$2 " " $3] = ossl[$2 " " $3] " " $4; o1[$1 " " $2 " " $3] = $4; next }
        $2 == "result" {
            k = $3 " " $4 " " $5
            r[k] = r[k] " " $6
            o = o1[$1 " " $3 " " $5]
            if (o > 0) {
                q = $6 / o; kk = $3 " " $5
                if (!(kk in lo) || q < lo[kk]) lo[kk] = q
                if (!(kk in hi) || q > hi[kk]) hi[kk] = q
            }
        }
        END {
            printf "%-12s %8s %9s %9s %9s %8s %8s %11s\n", "cipher", "request", "ours-enc", "ours-dec", "openssl", "enc/ssl", "dec/ssl", "range"
            n = split("aes-128-xts aes-256-xts", cs, " ")
            m = split(sizes, sz, " ")
            for (i = 1; i <= n; i++) {
                c = cs[i]
                for (j = 1; j <= m; j++) {
                    b = sz[j]
                    e = median(r[c " enc " b]); d = median(r[c " dec " b]); o = median(ossl[c " " b])
                    if (o > 0)
                        printf "%-12s %8s %9.0f %9.0f %9.0f %8.2f %8.2f %5.2f-%5.2f\n", c, b, e, d, o, e / o, d / o, lo[c " " b], hi[c " " b]
                    else
                        printf "%-12s %8s %9.0f %9.0f %9s %8s %8s %11s\n", c, b, e, d, "n/a", "-", "-", "-"
                }
            }
        }' "$TMP/openssl.txt" "$TMP/ours-$label.txt"
done
