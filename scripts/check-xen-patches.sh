#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
#
# Check meta-blktap3's Xen 4.9 patches against the real trees:
#   1. export Xen RELEASE-4.9.3 and xenclient-oe stable-8's recipes-extended/xen;
#   2. apply xenclient-oe's whole Xen patch queue in bitbake's SRC_URI order for
#      xen-libxl (blktap3 configuration: DISTRO_FEATURES without blktap2), then
#      meta-blktap3's patches (scripts/xen-patch-queue.py works the order out);
#   3. configure Xen's tools and build what xen.bb and xen-libxl.bb build before
#      and including libxl and xl, against this repo's include/blktap/*.h and
#      libblktapctl.so.0 built from this repo (cargo build --release --lib);
#   4. check: libxl's tap-ctl.h is this repo's (and the Makefile's -I=/usr/include/blktap
#      finds it under a sysroot), the files the patches touch compile with libxl's own
#      -Werror (x86_64, and i686 with -m32), every tap_ctl_* symbol libxenlight needs is
#      in libblktapctl.so.0, libxenlight.so itself needs it (NEEDED libblktapctl.so.0,
#      kept also when relinked with --as-needed), and xl links against it.
#
# Usage: scripts/check-xen-patches.sh XEN XENCLIENT_OE
#   XEN          a git dir (bare or not) holding tag RELEASE-4.9.3, or a Xen 4.9 source tree
#   XENCLIENT_OE a git dir holding branch stable-8, or a xenclient-oe source tree
# Environment:
#   XEN_REF (RELEASE-4.9.3), OE_REF (stable-8)  refs to export from git dirs
#   BLKTAP_INCLUDE  directory with tap-ctl.h, list.h, tapdisk-message.h
#                   (default: this repo's include/blktap)
#   BLKTAPCTL_LIB   a built libblktapctl (default: cargo build --release --lib here)
#   CHECK_WORKDIR   scratch directory (default: a new one under /tmp, removed on
#                   PASS unless KEEP_WORKDIR=1)
#   JOBS            make -j (default: nproc)
# Needs: git, patch, python3 with lib2to3 (Xen 4.9's generators are Python 2), gcc,
# make, and Xen's tools build deps: uuid-dev libyajl-dev libaio-dev zlib1g-dev
# libncurses-dev libnl-3-dev libnl-route-3-dev acpica-tools gettext bison flex
# python3-dev, and gcc-multilib for the -m32 compile. Not run in CI: it needs the
# fetched trees.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
XEN_REF=${XEN_REF:-RELEASE-4.9.3}
OE_REF=${OE_REF:-stable-8}
INC=${BLKTAP_INCLUDE:-$REPO/include/blktap}
JOBS=${JOBS:-$(nproc)}
LAYER_XEN=$REPO/meta-blktap3/recipes-extended/xen

say() { printf '==> %s\n' "$*"; }
fail() {
	printf 'FAIL: %s\n' "$*"
	[ -n "${W:-}" ] && printf '(work dir kept: %s)\n' "$W"
	exit 1
}
# Show the end of a log, then fail.
fail_log() {
	local log=$1
	shift
	tail -n 25 "$log" | cut -c1-300
	fail "$* (log: $log)"
}

[ $# -eq 2 ] || {
	sed -n '3,/^set -euo/p' "$0" | sed -n 's/^# \{0,1\}//p'
	exit 2
}
XEN_SRC=$1
OE_SRC=$2

W=${CHECK_WORKDIR:-$(mktemp -d /tmp/check-xen-patches.XXXXXX)}
mkdir -p "$W/logs"
say "work dir $W"

# export_tree SRC REF DEST MARKER: git archive REF of a git dir, or copy a source tree.
export_tree() {
	local src=$1 ref=$2 dest=$3 marker=$4 r
	rm -rf "$dest"
	mkdir -p "$dest"
	if [ -f "$src/$marker" ]; then
		say "$src is a source tree: copying it as it is (ref $ref not checked)"
		cp -a "$src/." "$dest/"
		return
	fi
	for r in "$ref" "origin/$ref" "refs/tags/$ref"; do
		if git -C "$src" rev-parse -q --verify "$r^{commit}" >/dev/null 2>&1; then
			say "exporting $r ($(git -C "$src" rev-parse --short "$r^{commit}")) from $src"
			git -C "$src" archive "$r" | tar -x -C "$dest"
			return
		fi
	done
	fail "$src is neither a tree with $marker nor a git dir with $ref"
}

export_tree "$XEN_SRC" "$XEN_REF" "$W/xen" tools/libxl/Makefile
export_tree "$OE_SRC" "$OE_REF" "$W/xenclient-oe" recipes-extended/xen/xen-common.inc
XEN_VER=$(sed -n 's/^export XEN_VERSION *= *\([0-9]*\).*/\1/p; s/^export XEN_SUBVERSION *= *\([0-9]*\).*/.\1/p; s/^export XEN_EXTRAVERSION *?= *\(\.[0-9]*\).*/\1/p' "$W/xen/xen/Makefile" | tr -d '\n')
say "Xen version in the tree: $XEN_VER"
case $XEN_VER in
4.9.*) ;;
*) fail "expected Xen 4.9.x, found '$XEN_VER'" ;;
esac

OE_XEN=$W/xenclient-oe/recipes-extended/xen
for r in xen-libxl xen-ocaml-libs; do
	[ -f "$OE_XEN/$r.bb" ] || fail "$OE_XEN/$r.bb missing"
	[ -f "$LAYER_XEN/$r.bbappend" ] || fail "$LAYER_XEN/$r.bbappend missing"
done

# --- 2. the patch queue --------------------------------------------------------------
say "patch queue of xen-libxl.bb + meta-blktap3's xen-libxl.bbappend (DISTRO_FEATURES without blktap2)"
python3 "$REPO/scripts/xen-patch-queue.py" "$OE_XEN/xen-libxl.bb" "$LAYER_XEN/xen-libxl.bbappend" \
	>"$W/queue.txt" 2>"$W/logs/queue.err" || fail_log "$W/logs/queue.err" "cannot work out the patch queue"
# The one note expected: xen-libxl.bb requires meta-virtualization's xen.inc, which is
# not in these trees; meta-virtualization pyro's xen.inc sets no SRC_URI (checked by hand).
sed 's/^/    /' "$W/logs/queue.err"
python3 "$REPO/scripts/xen-patch-queue.py" "$OE_XEN/xen-ocaml-libs.bb" "$LAYER_XEN/xen-ocaml-libs.bbappend" \
	>"$W/queue-ocaml.txt" 2>/dev/null || fail "cannot work out xen-ocaml-libs' patch queue"
cmp -s <(cut -f1 "$W/queue.txt") <(cut -f1 "$W/queue-ocaml.txt") ||
	fail "xen-ocaml-libs' patch queue differs from xen-libxl's"
say "xen-ocaml-libs.bb + its bbappend: the same queue"
n_oe=$(grep -vc -F "$LAYER_XEN/" "$W/queue.txt" || true)
n_ours=$(grep -c -F "$LAYER_XEN/" "$W/queue.txt" || true)
say "$n_oe xenclient-oe patches, then $n_ours meta-blktap3 patches"
# Our files dir comes first in FILESPATH: an OpenXT patch name found there is shadowed.
while IFS=$'\t' read -r path _ origin; do
	case $origin in meta-blktap3-*) ;; *)
		case $path in "$LAYER_XEN"/*) fail "meta-blktap3 shadows xenclient-oe's $(basename "$path")" ;; esac
		;;
	esac
done <"$W/queue.txt"
n_blktap2=$(DISTRO_FEATURES=blktap2 python3 "$REPO/scripts/xen-patch-queue.py" "$OE_XEN/xen-libxl.bb" \
	"$LAYER_XEN/xen-libxl.bbappend" 2>/dev/null | grep -c -F "$LAYER_XEN/" || true)
[ "$n_blktap2" -eq 0 ] || fail "with blktap2 in DISTRO_FEATURES the bbappend still adds $n_blktap2 patches"
say "with blktap2 in DISTRO_FEATURES the bbappend adds no patch"

say "applying the queue to Xen $XEN_VER (patch --fuzz=0)"
i=0
while IFS=$'\t' read -r path strip origin; do
	i=$((i + 1))
	if ! patch -d "$W/xen" -p"$strip" --fuzz=0 --no-backup-if-mismatch -s -i "$path" >"$W/logs/patch.log" 2>&1; then
		fail_log "$W/logs/patch.log" "patch $i $(basename "$path") ($origin) does not apply"
	fi
	if [ -s "$W/logs/patch.log" ]; then
		sed 's/^/    /' "$W/logs/patch.log"
	fi
	case $origin in meta-blktap3-*) say "  $i $(basename "$path"): applied" ;; esac
done <"$W/queue.txt"
say "all $i patches applied"

# --- 3. build -----------------------------------------------------------------------
for h in tap-ctl.h list.h tapdisk-message.h; do
	[ -f "$INC/$h" ] || fail "$INC lacks $h"
done
grep -q 'tap_ctl_find_device *(' "$INC/tap-ctl.h" ||
	fail "$INC/tap-ctl.h does not declare tap_ctl_find_device(), which the patched libxl calls"
say "headers: $INC"

if [ -n "${BLKTAPCTL_LIB:-}" ]; then
	LIB=$BLKTAPCTL_LIB
else
	say "building libblktapctl: cargo build --release --lib"
	(cd "$REPO" && cargo build --release --lib) >"$W/logs/cargo.log" 2>&1 ||
		fail_log "$W/logs/cargo.log" "cargo build failed"
	LIB=$(cd "$REPO" && cargo metadata --format-version 1 --no-deps |
		python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/libblktap3.so
fi
[ -f "$LIB" ] || fail "$LIB not found"
SONAME=$(readelf -d "$LIB" | sed -n 's/.*Library soname: \[\(.*\)\]/\1/p')
say "library: $LIB (soname $SONAME)"
[ "$SONAME" = libblktapctl.so.0 ] || fail "soname of $LIB is '$SONAME', not libblktapctl.so.0"
mkdir -p "$W/lib"
cp "$LIB" "$W/lib/libblktapctl.so.0"
ln -sf libblktapctl.so.0 "$W/lib/libblktapctl.so"

# Xen 4.9's build-time generators are Python 2. Debian 12 has no Python 2, so convert the
# ones this build runs with lib2to3 (plus one sort(cmp) that 2to3 leaves alone). Only
# generator scripts in the scratch tree change; no C source does.
PY2TO3=""
for p in python3 /usr/bin/python3; do
	if "$p" -c 'import lib2to3' 2>/dev/null; then
		PY2TO3=$p
		break
	fi
done
[ -n "$PY2TO3" ] || fail "no python3 with lib2to3 (Debian: apt-get install python3-lib2to3)"
GEN_PY=(tools/libxl/gentypes.py tools/libxl/gentest.py tools/libxl/idl.py
	tools/include/xen-foreign/mkheader.py tools/include/xen-foreign/mkchecker.py
	tools/include/xen-foreign/structs.py xen/tools/gen-cpuid.py)
(cd "$W/xen" && "$PY2TO3" -W ignore -m lib2to3 -w -n --no-diffs "${GEN_PY[@]}") >"$W/logs/2to3.log" 2>&1 ||
	fail_log "$W/logs/2to3.log" "lib2to3 failed"
sed -i 's/^integers\.sort(lambda a, b: cmp(len(b),len(a)));$/integers.sort(key=len, reverse=True)/' \
	"$W/xen/tools/include/xen-foreign/mkheader.py"
grep -q 'integers.sort(key=len, reverse=True)' "$W/xen/tools/include/xen-foreign/mkheader.py" ||
	fail "mkheader.py: the sort(cmp) line was not found"
say "Python 2 generators converted for python3 (${#GEN_PY[@]} scripts)"

PYTHON_ABS=/usr/bin/python3
[ -x "$PYTHON_ABS" ] || PYTHON_ABS=$(command -v python3)
say "configure (tools only; blktap2 left on as in OpenXT, so LIBXL_BLKTAP=y builds libxl_blktap3.o)"
(cd "$W/xen" && ./configure PYTHON="$PYTHON_ABS" --disable-qemu-traditional \
	--with-system-qemu=/usr/bin/qemu-system-i386 --disable-seabios --disable-rombios \
	--disable-ipxe --disable-ocamltools --disable-systemd --disable-stubdom --disable-docs) \
	>"$W/logs/configure.log" 2>&1 || fail_log "$W/logs/configure.log" "configure failed"
grep -q '^CONFIG_BLKTAP2 *:= *y' "$W/xen/config/Tools.mk" || fail "configure did not enable CONFIG_BLKTAP2"

# As the recipes: CFLAGS from the environment with the blktap include first
# (xen-libxl.bb's CFLAGS_prepend), LDLIBS_libblktapctl=-lblktapctl on the command line.
# gcc 12 vs 2017 code: warnings are not errors here (-Wno-error comes after -Werror),
# -fcommon for the old tentative definitions; step 4 re-checks the patched files with -Werror.
export CFLAGS="-I$INC"
# libxl-blktap3-support.patch dropped -lblktapctl from libxenlight.so's link;
# meta-blktap3-libxl-link-blktapctl.patch puts it back (checked below, also with
# --as-needed). xl is linked with -lblktapctl too. OE's cross gcc does not default to
# --as-needed and meta-virtualization's xen.inc exports LDFLAGS="": build as there,
# with --as-needed off (Debian's gcc defaults to it).
export LDFLAGS="-Wl,--no-as-needed -L$W/lib -Wl,-rpath-link=$W/lib"
MAKEVARS=(APPEND_CFLAGS="-Wno-error -fcommon" LDLIBS_libblktapctl=-lblktapctl)
for sub in include libs libxc xenstore libxl xl; do
	say "make -C tools subdir-all-$sub"
	make -C "$W/xen/tools" -j"$JOBS" "${MAKEVARS[@]}" "subdir-all-$sub" >"$W/logs/make-$sub.log" 2>&1 ||
		fail_log "$W/logs/make-$sub.log" "make subdir-all-$sub failed"
done

# --- 4. checks ----------------------------------------------------------------------
# dep_of DEPFILE NAME: the path of header NAME in a gcc -MMD dependency file.
dep_of() {
	sed 's/[\\ ]/\n/g' "$1" | grep "/$2\$" | head -n 1
}
L=$W/xen/tools/libxl
dep=$(dep_of "$L/.libxl_blktap3.o.d" tap-ctl.h)
[ "$(readlink -f "$dep")" = "$(readlink -f "$INC/tap-ctl.h")" ] ||
	fail "libxl_blktap3.o was compiled with tap-ctl.h from '$dep', not $INC"
say "libxl_blktap3.o used $dep"
if grep -q -- '-I/usr/include/blktap' "$L/Makefile" || ! grep -q -- '-I=/usr/include/blktap' "$L/Makefile"; then
	fail "tools/libxl/Makefile: expected -I=/usr/include/blktap and no host -I/usr/include/blktap"
fi

# The sysroot include: without the recipe's -I, the Makefile's -I=/usr/include/blktap
# must find the headers under the compiler's sysroot. A stand-in sysroot: the host's
# /usr/include entries except blktap, plus blktap -> $INC.
SR=$W/sysroot
mkdir -p "$SR/usr/include"
for e in /usr/include/*; do
	[ "$(basename "$e")" = blktap ] || ln -sfn "$e" "$SR/usr/include/$(basename "$e")"
done
ln -sfn "$INC" "$SR/usr/include/blktap"
rm -f "$L/libxl_blktap3.o"
CFLAGS="-isysroot $SR" make -C "$L" "${MAKEVARS[@]}" libxl_blktap3.o >"$W/logs/make-sysroot.log" 2>&1 ||
	fail_log "$W/logs/make-sysroot.log" "libxl_blktap3.c does not compile with only -I=/usr/include/blktap and a sysroot"
dep=$(dep_of "$L/.libxl_blktap3.o.d" tap-ctl.h)
[ "$(printf %s "$dep" | tr -s /)" = "$(printf %s "$SR/usr/include/blktap/tap-ctl.h" | tr -s /)" ] ||
	fail "with -isysroot $SR, tap-ctl.h came from '$dep'"
say "with only the Makefile's -I=/usr/include/blktap and -isysroot, tap-ctl.h came from the sysroot"

# The files the patches touch, rebuilt with libxl's own -Werror in force.
PATCHED_TUS=(libxl_blktap3.o libxl_disk.o libxl_dm.o)
rm -f "${PATCHED_TUS[@]/#/$L/}"
make -C "$L" APPEND_CFLAGS=-fcommon LDLIBS_libblktapctl=-lblktapctl "${PATCHED_TUS[@]}" \
	>"$W/logs/make-werror.log" 2>&1 ||
	fail_log "$W/logs/make-werror.log" "a file the patches touch does not compile with -Werror"
say "${PATCHED_TUS[*]} compile with -Werror (gcc $(gcc -dumpfullversion))"

# The TUs changed; relink libxenlight and xl with them.
make -C "$W/xen/tools" -j"$JOBS" "${MAKEVARS[@]}" subdir-all-libxl subdir-all-xl >"$W/logs/make-relink.log" 2>&1 ||
	fail_log "$W/logs/make-relink.log" "relinking libxl/xl failed"

mapfile -t needed < <(nm -D --undefined-only "$L/libxenlight.so" | awk '{print $NF}' | grep '^tap_ctl_' | sort -u)
[ "${#needed[@]}" -gt 0 ] || fail "libxenlight.so needs no tap_ctl_* symbol: libxl_blktap3.o was not linked in"
missing=()
for s in "${needed[@]}"; do
	nm -D --defined-only "$W/lib/libblktapctl.so.0" | awk '{print $NF}' | grep -qx "$s" || missing+=("$s")
done
say "libxenlight.so needs from libblktapctl: ${needed[*]}"
[ "${#missing[@]}" -eq 0 ] || fail "libblktapctl.so.0 does not define: ${missing[*]}"
XL=$W/xen/tools/xl/xl
[ -x "$XL" ] || fail "xl was not built"
readelf -d "$XL" | grep -q 'NEEDED.*\[libblktapctl\.so\.0\]' || fail "xl does not need libblktapctl.so.0"
LD_LIBRARY_PATH=$W/lib:$L:$W/xen/tools/libxl ldd "$XL" >"$W/logs/ldd.log" 2>&1 || true
grep -q "libblktapctl.so.0 => $W/lib/libblktapctl.so.0" "$W/logs/ldd.log" ||
	fail_log "$W/logs/ldd.log" "xl does not resolve libblktapctl.so.0 to the repo's library"
say "xl links against libblktapctl.so.0 (NEEDED) and resolves it to $W/lib/libblktapctl.so.0"

# libxenlight.so calls tap_ctl_*(): it needs libblktapctl.so.0 itself, not only through
# xl. Relinked with --as-needed, the entry stays only because the symbols are used.
needed_by_libxl() {
	readelf -d "$L/libxenlight.so.4.9.0" | grep -q 'NEEDED.*\[libblktapctl\.so\.0\]'
}
needed_by_libxl || fail "libxenlight.so.4.9.0 has no NEEDED libblktapctl.so.0"
rm -f "$L/libxenlight.so.4.9.0"
LDFLAGS="-Wl,--as-needed -L$W/lib -Wl,-rpath-link=$W/lib" make -C "$L" "${MAKEVARS[@]}" libxenlight.so.4.9.0 \
	>"$W/logs/make-as-needed.log" 2>&1 || fail_log "$W/logs/make-as-needed.log" "relinking libxenlight.so with --as-needed failed"
needed_by_libxl || fail "libxenlight.so.4.9.0 relinked with --as-needed has no NEEDED libblktapctl.so.0"
LD_LIBRARY_PATH=$W/lib ldd "$L/libxenlight.so.4.9.0" >"$W/logs/ldd-libxl.log" 2>&1 || true
grep -q "libblktapctl.so.0 => $W/lib/libblktapctl.so.0" "$W/logs/ldd-libxl.log" ||
	fail_log "$W/logs/ldd-libxl.log" "libxenlight.so does not resolve libblktapctl.so.0 to the repo's library"
say "libxenlight.so.4.9.0 needs libblktapctl.so.0 itself (NEEDED, also when linked with --as-needed)"

# OpenXT 8's dom0 is i686: the patched files compile for it too, with -Werror. (Last:
# the objects are left 32-bit.)
rm -f "${PATCHED_TUS[@]/#/$L/}"
make -C "$L" APPEND_CFLAGS="-fcommon -m32" LDLIBS_libblktapctl=-lblktapctl "${PATCHED_TUS[@]}" \
	>"$W/logs/make-m32.log" 2>&1 ||
	fail_log "$W/logs/make-m32.log" "a file the patches touch does not compile for i686 (-m32) with -Werror"
for o in "${PATCHED_TUS[@]}"; do
	readelf -h "$L/$o" | grep -q 'Class: *ELF32' || fail "$o is not a 32-bit object"
done
say "${PATCHED_TUS[*]} also compile for i686 (-m32) with -Werror"

say "patches from meta-blktap3:"
grep -F "$LAYER_XEN/" "$W/queue.txt" | cut -f1 | xargs -n1 basename | sed 's/^/    /'
if [ "${KEEP_WORKDIR:-0}" != 1 ] && [ -z "${CHECK_WORKDIR:-}" ]; then
	rm -rf "$W"
fi
echo "PASS: $n_oe xenclient-oe ($OE_REF) + $n_ours meta-blktap3 patches apply on Xen $XEN_VER; libxl and xl build against $INC/tap-ctl.h and link against libblktapctl.so.0"
