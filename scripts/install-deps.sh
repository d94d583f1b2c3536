#!/usr/bin/env bash
# Install what blktap3 needs on Debian 12 (as root, or with sudo), then check that every
# promised tool is there. Idempotent: only missing pieces are installed.
#
#   scripts/install-deps.sh demo   what scripts/demo.sh needs: qemu-img/qemu-io, nbdinfo/nbdcopy
#   scripts/install-deps.sh test   (default) everything scripts/test.sh needs: the demo's tools,
#                                  qemu-system-x86 and the VM tools, fio, shellcheck, gcc-multilib
#                                  and the i686 Rust target, the layer and SELinux checkers
#
# qemu: qemu-system-x86 and qemu-utils must come from one series (each depends on the other's
# exact version through qemu-system-common/qemu-block-extra). Three cases are handled:
#   - nothing installed: both from the apt sources;
#   - qemu-utils installed and a qemu-system-x86 of the same version available (e.g. the
#     backports are in the sources): qemu-system-x86 from that release;
#   - qemu-utils installed from a series the sources no longer carry (these machines come with
#     qemu-utils 10.0 from bookworm-backports and bookworm's sources only, where a plain install
#     fails with "held broken packages"): both at qemu-system-x86's candidate version, which
#     downgrades qemu-utils; said on stderr.
set -euo pipefail

profile=${1:-test}
case $profile in
demo | test) ;;
-h | --help)
    sed -n '2,18s/^# \{0,1\}//p' "$0"
    exit 0
    ;;
*)
    echo "install-deps: unknown profile '$profile' (demo or test)" >&2
    exit 2
    ;;
esac

say() { echo "install-deps: $*" >&2; }
trap 'say "failed (exit $?) at line $LINENO: $BASH_COMMAND"' ERR
die() {
    say "$*"
    exit 1
}
have() { command -v "$1" >/dev/null 2>&1; }
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO=sudo
apt_install() { DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null; }

# tool -> Debian package, per profile. Every tool listed here is checked after the install.
demo_tools=(qemu-img:qemu-utils qemu-io:qemu-utils nbdinfo:libnbd-bin nbdcopy:libnbd-bin gcc:gcc)
test_tools=(
    qemu-nbd:qemu-utils qemu-system-x86_64:qemu-system-x86
    fio:fio shellcheck:shellcheck openssl:openssl python3:python3 pip3:python3-pip
    busybox:busybox-static cpio:cpio mmdebstrap:mmdebstrap depmod:kmod dpkg-deb:dpkg
    checkmodule:checkpolicy semodule_package:semodule-utils m4:m4 make:make
    readelf:binutils curl:curl xz:xz-utils
)
tools=("${demo_tools[@]}")
[ "$profile" = test ] && tools+=("${test_tools[@]}")

need_apt=()
for tp in "${tools[@]}"; do
    have "${tp%%:*}" || need_apt+=("${tp#*:}")
done
extra_checks=()
if [ "$profile" = test ]; then
    # busybox must be the static one (it runs inside the VMs' initramfs).
    dpkg-query -W -f='${Status}\n' busybox-static 2>/dev/null | grep -q 'ok installed' ||
        need_apt+=(busybox-static)
    # 32-bit C runtime for the i686 build (OpenXT 8's dom0 is i686).
    [ -e /usr/lib32/crt1.o ] || need_apt+=(gcc-multilib)
    extra_checks+=(/usr/lib32/crt1.o)
    # refpolicy headers to compile the layer's SELinux module (meta-blktap3).
    [ -e /usr/share/selinux/devel/Makefile ] || need_apt+=(selinux-policy-dev)
    extra_checks+=(/usr/share/selinux/devel/Makefile)
fi

# release_of PKG VERSION: the release (suite) of the apt sources that offers PKG at VERSION.
release_of() {
    apt-cache policy "$1" | awk -v v="$2" '
        /^ +(\*\*\* )?[^ ]+ [0-9]+$/ { cur = ($1 == "***") ? $2 : $1; next }
        cur == v && $2 ~ /^(https?|file|cdrom):/ { split($3, a, "/"); print a[1]; exit }'
}

# Which qemu packages to ask for, with versions where the series must be forced.
qemu_args=()
qemu_plan() {
    local want_system=$1 installed cand
    installed=$(dpkg-query -W -f='${Status} ${Version}\n' qemu-utils 2>/dev/null |
        sed -n 's/^install ok installed //p' || true)
    if [ "$want_system" = no ] || have qemu-system-x86_64; then
        # qemu-system is not wanted or already there: qemu-utils alone, if missing at all.
        [ -n "$installed" ] || qemu_args+=(qemu-utils)
        return
    fi
    if [ -z "$installed" ]; then
        qemu_args+=(qemu-system-x86 qemu-utils)
    elif rel=$(release_of qemu-system-x86 "$installed") && [ -n "$rel" ]; then
        # The sources still carry that series (e.g. bookworm-backports): take qemu-system-x86
        # and its dependencies (qemu-system-common, -data, seabios) from that release. A
        # plain "=version" would pin the named package only and leave its dependencies at
        # the default release's versions, which conflict.
        qemu_args+=(-t "$rel" qemu-system-x86)
    else
        cand=$(apt-cache policy qemu-system-x86 | sed -n 's/^ *Candidate: //p')
        if [ -z "$cand" ] || [ "$cand" = "(none)" ]; then
            die "no qemu-system-x86 in the apt sources"
        fi
        say "qemu-utils $installed has no qemu-system-x86 of its series in the apt sources;" \
            "installing both at $cand (this downgrades qemu-utils)"
        qemu_args+=(--allow-downgrades "qemu-system-x86=$cand" "qemu-utils=$cand")
    fi
}

if [ "${#need_apt[@]}" -gt 0 ]; then
    mapfile -t need_apt < <(printf '%s\n' "${need_apt[@]}" | sort -u)
    say "installing for '$profile': ${need_apt[*]}"
    $SUDO apt-get update -qq
    want_system=no
    rest=()
    for p in "${need_apt[@]}"; do
        case $p in
        qemu-system-x86) want_system=yes ;;
        qemu-utils) ;;
        *) rest+=("$p") ;;
        esac
    done
    if printf '%s\n' "${need_apt[@]}" | grep -q '^qemu-'; then
        qemu_plan "$want_system"
        [ "${#qemu_args[@]}" -eq 0 ] || apt_install "${qemu_args[@]}"
    fi
    [ "${#rest[@]}" -eq 0 ] || apt_install "${rest[@]}"
fi

if [ "$profile" = test ]; then
    # oelint-adv lints the Yocto layer (PyPI; pinned so its rule set does not move under us).
    if ! have oelint-adv; then
        say "installing oelint-adv (pip)"
        pip3 install -q --break-system-packages 'oelint-adv==9.11.2' 2>/dev/null ||
            pip3 install -q 'oelint-adv==9.11.2'
    fi
    tools+=(oelint-adv:oelint-adv)
fi

# Rust: the machine's toolchain (rustup); the i686 target for the tests.
have cargo || die "no Rust toolchain found; install one with rustup (https://rustup.rs) and rerun"
if [ "$profile" = test ] && have rustup && ! rustup target list --installed | grep -qx i686-unknown-linux-gnu; then
    say "adding the i686-unknown-linux-gnu Rust target"
    rustup target add i686-unknown-linux-gnu >/dev/null
fi

# Check that everything promised is there.
missing=()
for tp in "${tools[@]}"; do
    have "${tp%%:*}" || missing+=("${tp%%:*} (package ${tp#*:})")
done
for f in "${extra_checks[@]}"; do
    [ -e "$f" ] || missing+=("$f")
done
if [ "$profile" = test ]; then
    rustup target list --installed 2>/dev/null | grep -qx i686-unknown-linux-gnu ||
        missing+=("the i686-unknown-linux-gnu Rust target (rustup target add i686-unknown-linux-gnu)")
    # One qemu series: qemu-img and qemu-system-x86_64 report the same version.
    vi=$(qemu-img --version 2>/dev/null | sed -n '1s/.*version \([0-9.]*\).*/\1/p')
    vs=$(qemu-system-x86_64 --version 2>/dev/null | sed -n '1s/.*version \([0-9.]*\).*/\1/p')
    if [ -z "$vi" ] || [ "$vi" != "$vs" ]; then
        missing+=("one qemu series (qemu-img ${vi:-?}, qemu-system-x86_64 ${vs:-?})")
    fi
fi
if [ "${#missing[@]}" -gt 0 ]; then
    printf 'install-deps: missing after install: %s\n' "${missing[@]}" >&2
    exit 1
fi
say "'$profile' dependencies present"
