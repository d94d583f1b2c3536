#!/bin/sh
# Runs the do_configure_append of meta-blktap3's linux-openxt bbappend outside bitbake, on a
# .config like xenclient-oe's xenclient-dom0 defconfig (blktap2 on, NBD off), with
# oe_runmake/bbfatal stand-ins: olddefconfig is simulated by dropping the options of the
# blktap2 driver, whose patch the bbappend removes (Kconfig no longer knows them).
# Checks that the fragment's options end up in .config, that the blktap2 option is gone,
# that a fragment option the "kernel" refuses fails the build, and (with --xenclient-oe DIR,
# a checkout of xenclient-oe stable-8) that SRC_URI_remove names an entry the recipe has.
#
#   scripts/check-kernel-config.sh [--xenclient-oe DIR]
set -eu

here=$(cd "$(dirname "$0")/.." && pwd)
dir=$here/meta-blktap3/recipes-kernel/linux
bbappend=$dir/linux-openxt_%.bbappend
frag=$dir/files/blktap3.cfg
xoe=
case ${1:-} in
--xenclient-oe) xoe=${2:?usage: $0 [--xenclient-oe DIR]} ;;
"") ;;
*) echo "usage: $0 [--xenclient-oe DIR]" >&2; exit 2 ;;
esac

fail() { echo "check-kernel-config: FAIL: $*" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT INT TERM

[ -f "$frag" ] || fail "$frag missing"
grep -q 'SRC_URI_append_xenclient-dom0 = " file://blktap3.cfg"' "$bbappend" ||
	fail "the bbappend does not add blktap3.cfg for xenclient-dom0"
sed -n '/^do_configure_append_xenclient-dom0() {$/,/^}$/p' "$bbappend" | sed '1d;$d' >"$work/body.sh"
[ -s "$work/body.sh" ] || fail "no do_configure_append_xenclient-dom0 in the bbappend"

# run_configure MODE: run the function body on a fresh .config; MODE selects what the
# simulated olddefconfig does. Prints the exit status.
run_configure() {
	mkdir -p "$work/B" "$work/S" "$work/WORKDIR"
	cp "$frag" "$work/WORKDIR/blktap3.cfg"
	cat >"$work/B/.config" <<'EOF'
CONFIG_MODULES=y
CONFIG_NET=y
# CONFIG_BLK_DEV_NBD is not set
CONFIG_XEN_BLKDEV_BACKEND=y
CONFIG_BLK_DEV_TAP=y
CONFIG_XEN_DEV_EVTCHN=y
CONFIG_XEN_GNTDEV=y
EOF
	cat >"$work/run.sh" <<EOF
set -eu
WORKDIR=$work/WORKDIR
B=$work/B
S=$work/S
bbfatal() { echo "bbfatal: \$*" >&2; exit 1; }
oe_runmake() {
	# olddefconfig: symbols Kconfig does not know disappear.
	sed -i -e '/^CONFIG_BLK_DEV_TAP=/d' -e '/^# CONFIG_BLK_DEV_TAP is not set\$/d' "\$B/.config"
	if [ "$1" = refuse-nbd ]; then
		sed -i 's/^CONFIG_BLK_DEV_NBD=y\$/CONFIG_BLK_DEV_NBD=m/' "\$B/.config"
	fi
	echo "oe_runmake \$*" >>"$work/make.log"
}
EOF
	cat "$work/body.sh" >>"$work/run.sh"
	st=0
	sh "$work/run.sh" >"$work/out.log" 2>&1 || st=$?
	echo "$st"
}

st=$(run_configure normal)
[ "$st" -eq 0 ] || { cat "$work/out.log" >&2; fail "the configure append failed ($st)"; }
grep -q "olddefconfig" "$work/make.log" || fail "olddefconfig was not run"
for want in CONFIG_BLK_DEV_NBD=y CONFIG_XEN_GNTDEV=y CONFIG_XEN_DEV_EVTCHN=y CONFIG_NET=y; do
	grep -qxF "$want" "$work/B/.config" || fail "$want missing from .config"
done
if grep -q '^CONFIG_BLK_DEV_TAP=' "$work/B/.config"; then fail "CONFIG_BLK_DEV_TAP still set"; fi
n=$(grep -c 'CONFIG_BLK_DEV_NBD' "$work/B/.config")
[ "$n" -eq 1 ] || fail "CONFIG_BLK_DEV_NBD appears $n times in .config"

rm -rf "$work/B" "$work/make.log"
st=$(run_configure refuse-nbd)
[ "$st" -ne 0 ] || fail "a refused CONFIG_BLK_DEV_NBD=y did not fail the build"
grep -q "bbfatal: blktap3.cfg: CONFIG_BLK_DEV_NBD=y did not survive" "$work/out.log" ||
	fail "unexpected failure: $(cat "$work/out.log")"

if [ -n "$xoe" ]; then
	entry=$(sed -n 's/^SRC_URI_remove = "\(.*\)"$/\1/p' "$bbappend")
	[ -n "$entry" ] || fail "no SRC_URI_remove in the bbappend"
	found=$(grep -rlF --include="linux-openxt_*.bb" -e "$entry" "$xoe/recipes-kernel/linux" || true)
	[ -n "$found" ] || fail "no linux-openxt recipe in $xoe has $entry"
	echo "check-kernel-config: $entry is in $(echo "$found" | sed "s|$xoe/||" | tr "\n" " " | sed "s/ $//")"
fi
echo "check-kernel-config: ok"
