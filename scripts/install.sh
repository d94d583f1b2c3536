#!/usr/bin/env bash
# Install blktap3 under OpenXT's paths: the entry point of meta-blktap3's recipe (do_install) and
# of a user on a plain Debian dom0.
#
#   scripts/install.sh [--destdir DIR] [--prefix /usr] [--target TRIPLE] [--no-build]
#                      [--bindir DIR] [--sbindir DIR] [--libdir DIR] [--libexecdir DIR]
#                      [--includedir DIR] [--sysconfdir DIR]
#
# Builds (cargo build --release --locked [--target TRIPLE]) unless --no-build, then installs
#   ${libexecdir}/tapdisk, ${sbindir}/tap-ctl, ${bindir}/tapback, ${bindir}/vhd-util and
#   ${sbindir}/vhd-util (link), ${libdir}/libblktapctl.so.0.<x> with the libblktapctl.so.0 and
#   libblktapctl.so links, ${includedir}/blktap/*.h, ${sysconfdir}/init.d/tapback-daemon,
#   ${sysconfdir}/udev/rules.d/xen-vbd3-backend.rules and ${sysconfdir}/xen/scripts/block-vbd3.
# Defaults: prefix /usr, bindir PREFIX/bin, sbindir PREFIX/sbin, libdir PREFIX/lib, libexecdir
# PREFIX/libexec, includedir PREFIX/include, sysconfdir /etc; DESTDIR from the environment.
# Environment: CARGO_TARGET_DIR (default target/ of the source tree), CARGO_PROFILE_DIR (release),
# CARGO (cargo), BLKTAP3_SOVERSION (the version of libblktapctl.so.0.<x>; default Cargo.toml's).
set -euo pipefail

src=$(cd "$(dirname "$0")/.." && pwd)
prog=install.sh

usage() {
    sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"
}

die() {
    echo "$prog: $*" >&2
    exit 1
}

destdir=${DESTDIR:-}
prefix=/usr
target=
build=1
bindir='' sbindir='' libdir='' libexecdir='' includedir='' sysconfdir=''

while [ $# -gt 0 ]; do
    opt=$1
    case "$opt" in
        --no-build) build=0; shift; continue ;;
        -h|--help) usage; exit 0 ;;
        --destdir=*|--prefix=*|--target=*|--bindir=*|--sbindir=*|--libdir=*|--libexecdir=*|--includedir=*|--sysconfdir=*)
            val=${opt#*=}; opt=${opt%%=*}; shift ;;
        --destdir|--prefix|--target|--bindir|--sbindir|--libdir|--libexecdir|--includedir|--sysconfdir)
            [ $# -ge 2 ] || die "$opt needs a value"; val=$2; shift 2 ;;
        *) die "unknown argument: $opt (see --help)" ;;
    esac
    case "$opt" in
        --destdir) destdir=$val ;;
        --prefix) prefix=$val ;;
        --target) target=$val ;;
        --bindir) bindir=$val ;;
        --sbindir) sbindir=$val ;;
        --libdir) libdir=$val ;;
        --libexecdir) libexecdir=$val ;;
        --includedir) includedir=$val ;;
        --sysconfdir) sysconfdir=$val ;;
    esac
done

case "$prefix" in /*) ;; *) die "--prefix must be absolute: $prefix" ;; esac
bindir=${bindir:-$prefix/bin}
sbindir=${sbindir:-$prefix/sbin}
libdir=${libdir:-$prefix/lib}
libexecdir=${libexecdir:-$prefix/libexec}
includedir=${includedir:-$prefix/include}
sysconfdir=${sysconfdir:-/etc}
for d in "$bindir" "$sbindir" "$libdir" "$libexecdir" "$includedir" "$sysconfdir"; do
    case "$d" in /*) ;; *) die "installation directories must be absolute: $d" ;; esac
done

soversion=${BLKTAP3_SOVERSION:-$(sed -n '/^\[package\]/,/^\[/s/^version *= *"\([^"]*\)".*/\1/p' "$src/Cargo.toml" | head -n1)}
case "$soversion" in
    0.*) ;;
    *) die "libblktapctl.so.0.<x> needs a 0.x version, not '$soversion' (BLKTAP3_SOVERSION)" ;;
esac

target_dir=${CARGO_TARGET_DIR:-$src/target}
profile=${CARGO_PROFILE_DIR:-release}
if [ "$build" = 1 ]; then
    cargo_args=(build --release --locked --manifest-path "$src/Cargo.toml" --target-dir "$target_dir")
    [ -n "$target" ] && cargo_args+=(--target "$target")
    profile=release
    "${CARGO:-cargo}" "${cargo_args[@]}"
fi
out=$target_dir${target:+/$target}/$profile
for f in tapdisk tap-ctl tapback vhd-util libblktap3.so; do
    [ -f "$out/$f" ] || die "$out/$f is missing (build first, or drop --no-build)"
done

# The cdylib must carry the C library's soname (build.rs sets it) to replace libblktapctl.so.0.
if command -v readelf > /dev/null; then
    soname=$(readelf -d "$out/libblktap3.so" | sed -n 's/.*(SONAME).*\[\(.*\)\]/\1/p')
    [ "$soname" = libblktapctl.so.0 ] || die "$out/libblktap3.so has SONAME '$soname', not libblktapctl.so.0"
fi

# A link from directory $1 to file $2 that stays valid when the tree moves (relative when the two
# directories are siblings, as /usr/sbin and /usr/bin are).
link_target() {
    if [ "$1" = "$(dirname "$2")" ]; then
        basename "$2"
    elif [ "$(dirname "$1")" = "$(dirname "$(dirname "$2")")" ]; then
        echo "../$(basename "$(dirname "$2")")/$(basename "$2")"
    else
        echo "$2"
    fi
}

D=$destdir
install -d "$D$bindir" "$D$sbindir" "$D$libdir" "$D$libexecdir" "$D$includedir/blktap"
install -m 0755 "$out/tapdisk" "$D$libexecdir/tapdisk"
install -m 0755 "$out/tap-ctl" "$D$sbindir/tap-ctl"
install -m 0755 "$out/tapback" "$D$bindir/tapback"
install -m 0755 "$out/vhd-util" "$D$bindir/vhd-util"
ln -sfn "$(link_target "$sbindir" "$bindir/vhd-util")" "$D$sbindir/vhd-util"

install -m 0755 "$out/libblktap3.so" "$D$libdir/libblktapctl.so.$soversion"
ln -sfn "libblktapctl.so.$soversion" "$D$libdir/libblktapctl.so.0"
ln -sfn libblktapctl.so.0 "$D$libdir/libblktapctl.so"

headers=("$src"/include/blktap/*.h)
[ -f "${headers[0]}" ] || die "no headers in $src/include/blktap"
install -m 0644 "${headers[@]}" "$D$includedir/blktap/"

# The init script, the udev rule and the hotplug script, where the source tree has them.
install_extra() { # MODE SOURCE DEST
    if [ -f "$src/$2" ]; then
        install -d "$(dirname "$3")"
        install -m "$1" "$src/$2" "$3"
    else
        echo "$prog: warning: $2 is not in the source tree; not installed" >&2
    fi
}
install_extra 0755 init/tapback-daemon "$D$sysconfdir/init.d/tapback-daemon"
install_extra 0644 udev/xen-vbd3-backend.rules "$D$sysconfdir/udev/rules.d/xen-vbd3-backend.rules"
install_extra 0755 scripts/block-vbd3 "$D$sysconfdir/xen/scripts/block-vbd3"

# Installed into the live system: refresh the dynamic linker cache for libblktapctl.so.0.
if [ -z "$D" ] && command -v ldconfig > /dev/null; then
    ldconfig
fi

echo "$prog: installed blktap3 (${target:-host} $profile build) into ${D:-/}"
