#!/usr/bin/env bash
# Prove scripts/install-deps.sh on fresh Debian 12 roots made with mmdebstrap (as root):
#   plain:     minbase bookworm without apt lists; `install-deps.sh demo` installs the demo's
#              tools and no qemu-system, then scripts/demo.sh runs there; `install-deps.sh test`
#              installs the rest; a second `test` run installs nothing.
#   backport:  bookworm with qemu-utils from bookworm-backports installed and the backports
#              source removed again (how these machines come): `install-deps.sh test` ends with
#              one qemu series (bookworm's, qemu-utils downgraded).
#   backport-kept: the same with the backports source kept: qemu-system-x86 comes from the
#              backports, qemu-utils stays.
# The host's Rust toolchain (rustup/cargo homes) is bind-mounted into the roots: a new machine
# of this kind comes with it, and no toolchain can be downloaded here.
# Prints "install-deps-roots: N passed, M failed".
# Usage: scripts/test-install-deps.sh [plain|backport|backport-kept]...
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
work=$here/target/install-deps-roots
cases=("$@")
[ "${#cases[@]}" -gt 0 ] || cases=(plain backport backport-kept)

if [ "$(id -u)" -ne 0 ]; then
    echo "test-install-deps: skipped: needs root (mmdebstrap, chroot, mounts)" >&2
    echo "install-deps-roots: 0 passed, 0 failed, ${#cases[@]} skipped"
    exit 0
fi
command -v mmdebstrap >/dev/null || { echo "test-install-deps: mmdebstrap is required (scripts/install-deps.sh)" >&2; exit 1; }
cargo_home=${CARGO_HOME:-$HOME/.cargo}
rustup_home=${RUSTUP_HOME:-$HOME/.rustup}
[ -x "$cargo_home/bin/cargo" ] || { echo "test-install-deps: no cargo in $cargo_home/bin" >&2; exit 1; }

mirror=http://deb.debian.org/debian
sources=("deb $mirror bookworm main" "deb $mirror bookworm-updates main"
    "deb http://deb.debian.org/debian-security bookworm-security main")

mounts=()
cleanup() {
    local i
    for ((i = ${#mounts[@]} - 1; i >= 0; i--)); do umount -l "${mounts[i]}" 2>/dev/null || true; done
    mounts=()
}
trap cleanup EXIT
bind() { # bind SRC DEST-in-root
    mkdir -p "$2"
    mount --bind "$1" "$2"
    mounts+=("$2")
}

# A new root with the repo (tracked files as they are in the work tree) in /src.
make_root() {
    local root=$1
    rm -rf "$root"
    mkdir -p "$root"
    mmdebstrap --quiet --variant=minbase --include=ca-certificates bookworm "$root" "${sources[@]}"
    mkdir -p "$root/src"
    (cd "$here" && git ls-files -z | xargs -0 tar -cf - --no-recursion) | tar -xf - -C "$root/src"
    cp /etc/resolv.conf "$root/etc/resolv.conf"
    # The machine's own CA certificates (a TLS-inspecting egress proxy signs with one here):
    # part of the machine a new user starts from, not something install-deps provides.
    if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
        chroot "$root" update-ca-certificates >/dev/null 2>&1
    fi
}
enter() { # enter ROOT: mounts for running commands in it
    local root=$1
    bind /dev "$root/dev"
    bind /dev/pts "$root/dev/pts"
    mount -t proc proc "$root/proc" && mounts+=("$root/proc")
    mount -t sysfs sysfs "$root/sys" && mounts+=("$root/sys")
    bind "$cargo_home" "$root$cargo_home"
    bind "$rustup_home" "$root$rustup_home"
    mkdir -p "$work/cargo-target"
    bind "$work/cargo-target" "$root/src/target"
}
in_root() { # in_root ROOT CMD...: a login-like environment, like a new user's shell
    local root=$1
    shift
    chroot "$root" /usr/bin/env -i HOME=/root TERM=dumb LANG=C.UTF-8 \
        PATH="$cargo_home/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
        CARGO_HOME="$cargo_home" RUSTUP_HOME="$rustup_home" "$@"
}

pass=0 fail=0
check() { # check NAME COMMAND...: one assertion
    local name=$1
    shift
    if "$@"; then
        echo "ok: $name"
        pass=$((pass + 1))
    else
        echo "FAIL: $name"
        fail=$((fail + 1))
    fi
}
# shellcheck disable=SC2016 # dpkg-query's own ${Field} syntax
pkg_version() { in_root "$1" dpkg-query -W -f='${Status} ${Version}\n' "$2" 2>/dev/null | sed -n 's/^install ok installed //p'; }
no_pkg() { [ -z "$(pkg_version "$1" "$2")" ]; }
same_qemu_series() {
    local u s
    u=$(pkg_version "$1" qemu-utils)
    s=$(pkg_version "$1" qemu-system-x86)
    echo "  qemu-utils $u, qemu-system-x86 $s"
    [ -n "$u" ] && [ "$u" = "$s" ]
}
# run_logged ROOT LOG CMD...: run in the root, output to LOG (shown on failure)
run_logged() {
    local root=$1 log=$2
    shift 2
    if in_root "$root" "$@" >"$log" 2>&1; then return 0; fi
    echo "  --- $log (last 30 lines)"
    tail -n 30 "$log" | sed 's/^/  | /'
    return 1
}
installs_nothing() { ! grep -q 'installing' "$1"; }

case_plain() {
    local root=$work/plain
    echo "== plain bookworm (minbase, no apt lists)"
    make_root "$root"
    rm -rf "$root"/var/lib/apt/lists/*
    enter "$root"
    check "plain: install-deps demo" run_logged "$root" "$work/plain-demo-deps.log" /src/scripts/install-deps.sh demo
    check "plain: demo profile leaves qemu-system-x86 out" no_pkg "$root" qemu-system-x86
    check "plain: scripts/demo.sh" run_logged "$root" "$work/plain-demo.log" /src/scripts/demo.sh
    check "plain: install-deps test" run_logged "$root" "$work/plain-test-deps.log" /src/scripts/install-deps.sh test
    check "plain: one qemu series" same_qemu_series "$root"
    check "plain: install-deps test again" run_logged "$root" "$work/plain-test-deps2.log" /src/scripts/install-deps.sh test
    check "plain: second run installs nothing" installs_nothing "$work/plain-test-deps2.log"
    cleanup
}

# case_backport NAME keep|drop: qemu-utils from bookworm-backports, the source kept or dropped
case_backport() {
    local name=$1 keep=$2 root=$work/$1 bpo
    echo "== bookworm with qemu-utils from bookworm-backports, backports source: $keep"
    make_root "$root"
    enter "$root"
    echo "deb $mirror bookworm-backports main" >"$root/etc/apt/sources.list.d/backports.list"
    in_root "$root" apt-get update -qq
    in_root "$root" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -t bookworm-backports qemu-utils >/dev/null
    if [ "$keep" = drop ]; then
        rm "$root/etc/apt/sources.list.d/backports.list"
        in_root "$root" apt-get update -qq
    fi
    bpo=$(pkg_version "$root" qemu-utils)
    echo "  pre-installed qemu-utils $bpo"
    check "$name: qemu-utils from the backports is installed" grep -q 'bpo' <<<"$bpo"
    check "$name: install-deps test" run_logged "$root" "$work/$name-test-deps.log" /src/scripts/install-deps.sh test
    check "$name: one qemu series" same_qemu_series "$root"
    if [ "$keep" = keep ]; then
        check "$name: qemu-utils kept at $bpo" test "$(pkg_version "$root" qemu-utils)" = "$bpo"
    fi
    local q
    for q in qemu-img qemu-io qemu-nbd qemu-system-x86_64; do
        check "$name: $q runs" run_logged "$root" "$work/$name-$q.log" "$q" --version
    done
    cleanup
}

mkdir -p "$work"
for c in "${cases[@]}"; do
    case $c in
    plain) case_plain ;;
    backport) case_backport backport drop ;;
    backport-kept) case_backport backport-kept keep ;;
    *) echo "test-install-deps: unknown case $c" >&2; exit 2 ;;
    esac
done
echo "install-deps-roots: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
