#!/bin/sh
# Compile meta-blktap3's SELinux module (blktap3nbd) against refpolicy headers, as a check
# that it builds; exits non-zero on any error.
#
#   scripts/check-selinux.sh [--refpolicy-src DIR] [--no-install]
#
# Always: Debian's refpolicy headers (/usr/share/selinux/devel, package selinux-policy-dev;
# checkmodule from checkpolicy, semodule_package from semodule-utils), installed with
# apt-get when missing unless --no-install.
# --refpolicy-src DIR: also a refpolicy source tree (e.g. RELEASE_2_20170204, what OpenXT 8's
# refpolicy-mcs 2.20170204 is built from): its headers are generated in a temporary
# directory (TYPE=mcs) and the module is compiled against them too.
#
# The module only declares requirements on OpenXT's own types (tapdisk_t, xend_t,
# blktap_device_t, ...); checkmodule accepts them unresolved, they are resolved when the
# module is linked into OpenXT's policy. What this checks is the syntax, the interfaces and
# macros used (they must exist in both header sets), the object classes and permissions.
set -eu

here=$(cd "$(dirname "$0")/.." && pwd)
layer_dir=$here/meta-blktap3/recipes-security/refpolicy
mod_dir=$layer_dir/refpolicy-mcs/policy/modules/services
bbappend=$layer_dir/refpolicy-mcs_2.%.bbappend
module=blktap3nbd

install=yes
refpolicy_src=
while [ $# -gt 0 ]; do
	case $1 in
	--refpolicy-src)
		[ $# -ge 2 ] || { echo "usage: $0 [--refpolicy-src DIR] [--no-install]" >&2; exit 2; }
		refpolicy_src=$2
		shift 2
		;;
	--no-install) install=no; shift ;;
	-h | --help)
		sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
		exit 0
		;;
	*) echo "usage: $0 [--refpolicy-src DIR] [--no-install]" >&2; exit 2 ;;
	esac
done

fail() { echo "check-selinux: FAIL: $*" >&2; exit 1; }

devel_makefile=/usr/share/selinux/devel/Makefile
need_pkgs=
[ -f "$devel_makefile" ] || need_pkgs="$need_pkgs selinux-policy-dev"
command -v checkmodule >/dev/null 2>&1 || need_pkgs="$need_pkgs checkpolicy"
command -v semodule_package >/dev/null 2>&1 || need_pkgs="$need_pkgs semodule-utils"
command -v m4 >/dev/null 2>&1 || need_pkgs="$need_pkgs m4"
command -v make >/dev/null 2>&1 || need_pkgs="$need_pkgs make"
if [ -n "$need_pkgs" ]; then
	[ "$install" = yes ] || fail "missing packages:$need_pkgs"
	if [ "$(id -u)" -eq 0 ]; then sudo=; else sudo=sudo; fi
	echo "check-selinux: installing$need_pkgs"
	# shellcheck disable=SC2086 # word splitting of the package list is wanted
	DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends $need_pkgs >/dev/null ||
		fail "apt-get install$need_pkgs"
fi

# The bbappend must ship exactly the module files that exist.
for ext in te if fc; do
	f=$mod_dir/$module.$ext
	[ -f "$f" ] || fail "$f missing"
	grep -q "file://policy/modules/services/$module.$ext" "$bbappend" ||
		fail "$bbappend does not ship $module.$ext"
done
grep -q "policy_module($module," "$mod_dir/$module.te" || fail "$module.te does not declare policy_module($module, ...)"
# A quote in a comment ends an m4 quoted string early; refuse it outright.
if grep -n "'" "$mod_dir/$module.te" "$mod_dir/$module.if" "$mod_dir/$module.fc" | grep -v "\`" | grep -v ":[[:space:]]*')\$"; then
	fail "stray quote (') in the module sources (m4 quoting)"
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT INT TERM

# The bbappend's do_modules_copy_append, run on a modules.conf, must enable the module.
mkdir -p "$work/S/policy"
printf '# Module: base\nbase = base\n' >"$work/S/policy/modules.conf"
sed -n '/^do_modules_copy_append() {$/,/^}$/p' "$bbappend" | sed '1d;$d' >"$work/modules-append.sh"
[ -s "$work/modules-append.sh" ] || fail "$bbappend has no do_modules_copy_append"
S=$work/S sh -eu "$work/modules-append.sh" || fail "do_modules_copy_append failed"
grep -qx "$module = module" "$work/S/policy/modules.conf" ||
	fail "do_modules_copy_append does not enable $module in modules.conf"
grep -qx "base = base" "$work/S/policy/modules.conf" || fail "do_modules_copy_append clobbered modules.conf"

# compile NAME MAKEFILE [MAKE ARGS...]: build $module.pp with the devel Makefile, fail on
# any error.
compile() {
	name=$1
	makefile=$2
	shift 2
	dir=$work/$name
	mkdir -p "$dir"
	cp "$mod_dir/$module.te" "$mod_dir/$module.if" "$mod_dir/$module.fc" "$dir/"
	if ! make -C "$dir" -f "$makefile" "$@" "$module.pp" >"$dir/log" 2>&1; then
		cat "$dir/log" >&2
		fail "$module.pp does not build against $name headers"
	fi
	if grep -Ei '(^|[^a-z])(error|warning)' "$dir/log" >&2; then
		fail "$module.pp built against $name headers with errors or warnings"
	fi
	[ -s "$dir/$module.pp" ] || fail "no $module.pp from $name headers"
	echo "check-selinux: $module.pp builds against $name headers ($(wc -c <"$dir/$module.pp") bytes)"
}

debian_version=$(dpkg-query -W -f '${Version}' selinux-policy-dev 2>/dev/null | sed 's/^[0-9]*://')
[ -n "$debian_version" ] || debian_version=unknown
compile "debian-refpolicy-$debian_version" "$devel_makefile"

if [ -n "$refpolicy_src" ]; then
	if [ ! -f "$refpolicy_src/Makefile" ] || [ ! -d "$refpolicy_src/policy/modules" ]; then
		fail "$refpolicy_src is not a refpolicy source tree"
	fi
	src=$work/refpolicy-src
	cp -a "$refpolicy_src" "$src"
	version=$(cat "$src/VERSION" 2>/dev/null || echo unknown)
	# Release tarballs carry the contrib modules; a git checkout without the submodule
	# needs its metadata file to build headers.
	if [ ! -f "$src/policy/modules/contrib/metadata.xml" ]; then
		mkdir -p "$src/policy/modules/contrib"
		echo '<summary>Contributed modules (not present)</summary>' >"$src/policy/modules/contrib/metadata.xml"
	fi
	sed -i 's/^TYPE = .*/TYPE = mcs/' "$src/build.conf"
	if ! make -C "$src" conf install-headers DESTDIR="$work/headers" >"$work/headers.log" 2>&1; then
		tail -20 "$work/headers.log" >&2
		fail "could not generate headers from $refpolicy_src"
	fi
	mk=$(find "$work/headers" -path '*/include/Makefile' | head -n 1)
	[ -n "$mk" ] || fail "no include/Makefile in the headers generated from $refpolicy_src"
	compile "refpolicy-$version" "$mk" HEADERDIR="$(dirname "$mk")"
fi
echo "check-selinux: ok"
