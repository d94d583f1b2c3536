#!/bin/sh
# Compile meta-blktap3's SELinux module (blktap3nbd) against refpolicy headers, as a check
# that it builds, and look up the labels of the paths blktap3 installs and creates;
# exits non-zero on any error.
#
#   scripts/check-selinux.sh [--refpolicy-src DIR [--xenclient-oe DIR]] [--no-install]
#
# Always: Debian's refpolicy headers (/usr/share/selinux/devel, package selinux-policy-dev;
# checkmodule from checkpolicy, semodule_package from semodule-utils), installed with
# apt-get when missing unless --no-install. The m4-expanded module must hold the named
# type_transitions that label /run/blktap-control for its creators (tapdisk, tap-ctl, libxl
# in xenmgr and xl, the tapback-daemon init script).
# --refpolicy-src DIR: also a refpolicy source tree (e.g. RELEASE_2_20170204, what OpenXT 8's
# refpolicy-mcs 2.20170204 is built from): its headers are generated in a temporary
# directory (TYPE=mcs) and the module is compiled against them too. Then the tree's file
# contexts are built (its fc_sort, as the policy build does) with and without blktap3nbd.fc
# and looked up with libselinux (selabel_lookup, with file_contexts.subs_dist): the init
# script (initrc_exec_t), block-vbd3 (bin_t like OpenXT block), the udev rule,
# /run/blktap-control (also spelled /var/run) and /dev/nbdN get their types, the last two
# only through blktap3nbd.fc.
# --xenclient-oe DIR: a xenclient-oe stable-8 tree; its own modules' .fc files (blktap.fc,
# vhdutils.fc, ...) join the lookup (tapback pid file, binaries). Its patches to refpolicy's
# modules are not applied (some need the contrib tree); instead none of them, nor its own
# modules, may name /etc/xen/scripts, the init script or the udev rule.
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
xenclient_oe=
usage="usage: $0 [--refpolicy-src DIR [--xenclient-oe DIR]] [--no-install]"
while [ $# -gt 0 ]; do
	case $1 in
	--refpolicy-src)
		[ $# -ge 2 ] || { echo "$usage" >&2; exit 2; }
		refpolicy_src=$2
		shift 2
		;;
	--xenclient-oe)
		[ $# -ge 2 ] || { echo "$usage" >&2; exit 2; }
		xenclient_oe=$2
		shift 2
		;;
	--no-install) install=no; shift ;;
	-h | --help)
		sed -n '2,/^set -eu$/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
		exit 0
		;;
	*) echo "$usage" >&2; exit 2 ;;
	esac
done
if [ -n "$xenclient_oe" ] && [ -z "$refpolicy_src" ]; then
	echo "$0: --xenclient-oe needs --refpolicy-src" >&2
	exit 2
fi

fail() { echo "check-selinux: FAIL: $*" >&2; exit 1; }

devel_makefile=/usr/share/selinux/devel/Makefile
need_pkgs=
[ -f "$devel_makefile" ] || need_pkgs="$need_pkgs selinux-policy-dev"
command -v checkmodule >/dev/null 2>&1 || need_pkgs="$need_pkgs checkpolicy"
command -v semodule_package >/dev/null 2>&1 || need_pkgs="$need_pkgs semodule-utils"
command -v m4 >/dev/null 2>&1 || need_pkgs="$need_pkgs m4"
command -v make >/dev/null 2>&1 || need_pkgs="$need_pkgs make"
if [ -n "$refpolicy_src" ]; then
	command -v selabel_lookup >/dev/null 2>&1 || need_pkgs="$need_pkgs selinux-utils"
	command -v cc >/dev/null 2>&1 || need_pkgs="$need_pkgs gcc libc6-dev"
fi
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
	# /run/blktap-control is created by whoever comes first; each creator gets the type at
	# once (restorecon may be missing, and the init script runs before any VM).
	for creator in tapdisk_t tapctl_t xend_t xm_t initrc_t; do
		grep -q "type_transition $creator var_run_t:dir tapdisk_var_run_t \"blktap-control\";" \
			"$dir/tmp/$module.tmp" ||
			fail "$creator creating /run/blktap-control: no named type_transition to tapdisk_var_run_t ($name headers)"
	done
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

	# File contexts as the policy build makes them: every module's .fc through m4 and the
	# tree's fc_sort (its base.fc rule, given the list of .fc files; -Werror dropped for
	# today's compilers), looked up with libselinux, which applies
	# file_contexts.subs_dist (/etc/init.d, /var/run aliases) next to the file.
	tree_fc=$(cd "$src" && find policy/modules -name '*.fc' | sort)
	extra_fc=
	if [ -n "$xenclient_oe" ]; then
		xoe_rp=$(find "$xenclient_oe/recipes-security/refpolicy" -maxdepth 1 -type d -name 'refpolicy-mcs-2*' | head -n 1)
		if [ -z "$xoe_rp" ] || [ ! -f "$xoe_rp/policy/modules/services/blktap.fc" ]; then
			fail "$xenclient_oe has no recipes-security/refpolicy/refpolicy-mcs-2.%/policy/modules/services/blktap.fc"
		fi
		extra_fc=$(find "$xoe_rp/policy/modules" -name '*.fc' | sort)
		# OpenXT patches refpolicy modules and adds its own: none may label the scripts.
		if grep -rn -E 'xen/scripts|init\\?\.d/tapback|xen-vbd3-backend' "$xoe_rp/patches" "$xoe_rp/policy/modules"; then
			fail "xenclient-oe relabels /etc/xen/scripts, the init script or the udev rule (above)"
		fi
	fi
	# fc_build NAME FC_FILE...: $work/fc-NAME, a sorted file_contexts with its .subs_dist.
	fc_build() {
		fc_out=$work/fc-$1
		shift
		fc_files="$*"
		rm -f "$src/base.fc" "$src/tmp/base.fc.tmp"
		if ! make -C "$src" base.fc CFLAGS=-O2 base_fc_files="$fc_files" >"$fc_out.log" 2>&1; then
			tail -20 "$fc_out.log" >&2
			fail "could not build file contexts from $refpolicy_src"
		fi
		mv "$src/base.fc" "$fc_out"
		cp "$src/config/file_contexts.subs_dist" "$fc_out.subs_dist"
	}
	# shellcheck disable=SC2086 # lists of paths without blanks (the refpolicy-mcs-2.% directory)
	fc_build without $tree_fc $extra_fc
	# shellcheck disable=SC2086
	fc_build with $tree_fc $extra_fc "$mod_dir/$module.fc"
	# expect NAME PATH TYPE: PATH's type in $work/fc-NAME is TYPE.
	expect() {
		got=$(selabel_lookup -b file -f "$work/fc-$1" -k "$2" 2>/dev/null |
			sed -n 's/^Default context: [^:]*:[^:]*:\([^:]*\):.*/\1/p')
		[ "$got" = "$3" ] || fail "$2 is ${got:-not labelled} ($1 $module.fc), want $3"
		echo "check-selinux: $2 -> $3 ($1 $module.fc)"
	}
	# The paths as the sources name them: the hotplug script the udev rule runs, the pid file
	# and control directory the init script uses.
	hotplug=$(sed -n 's/.*RUN+="\([^ "]*\).*/\1/p' "$here/udev/xen-vbd3-backend.rules")
	# shellcheck disable=SC2016 # a literal ${...} of the init script
	pidfile=$(sed -n 's/^TAPBACK_PIDFILE=\${TAPBACK_PIDFILE:-\(.*\)}$/\1/p' "$here/init/tapback-daemon")
	# shellcheck disable=SC2016
	ctldir=$(sed -n 's/^BLKTAP_CONTROL_DIR=\${BLKTAP_CONTROL_DIR:-\(.*\)}$/\1/p' "$here/init/tapback-daemon")
	[ -n "$hotplug" ] || fail "no RUN+= script in udev/xen-vbd3-backend.rules"
	if [ -z "$pidfile" ] || [ -z "$ctldir" ]; then
		fail "no default TAPBACK_PIDFILE or BLKTAP_CONTROL_DIR in init/tapback-daemon"
	fi
	expect with /etc/init.d/tapback-daemon initrc_exec_t
	expect with "$hotplug" bin_t
	expect with /etc/xen/scripts/block bin_t
	expect with /etc/udev/rules.d/xen-vbd3-backend.rules udev_rules_t
	expect with "$ctldir" tapdisk_var_run_t
	expect with /var/run/blktap-control tapdisk_var_run_t
	expect with /run/blktap-control/tapdisk/tapdisk-3 tapdisk_var_run_t
	expect with /run/blktap-control/nbd1234.3 tapdisk_var_run_t
	expect with /dev/nbd0 blktap_device_t
	expect with /dev/nbd15 blktap_device_t
	expect with /dev/sda fixed_disk_device_t
	# What the module changes: without it, these keep refpolicy's (and OpenXT's) labels.
	expect without /var/run/blktap-control var_run_t
	expect without /dev/nbd0 fixed_disk_device_t
	if [ -n "$xenclient_oe" ]; then
		expect with "$pidfile" tapback_var_run_t
		expect with /usr/bin/tapback tapback_exec_t
		expect with /usr/sbin/tap-ctl tapctl_exec_t
		expect with /usr/libexec/tapdisk tapdisk_exec_t
		expect with /usr/bin/vhd-util vhdutil_exec_t
		expect with /usr/sbin/vhd-util vhdutil_exec_t
	fi
fi
echo "check-selinux: ok"
