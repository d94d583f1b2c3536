#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
#
# Check meta-blktap3's xenclient-toolstack patch against the real trees:
#   1. export scripts/block and scripts/xen-backend.rules of OpenXT's toolstack (stable-8),
#      and check that the udev rule KERNEL=="vbd*" runs block (it matches vbd3-* too);
#   2. with XENCLIENT_OE: check the bbappend's recipe (xenclient-toolstack_git.bb, same
#      directory), that no xenclient-oe file has our patch's name, and apply xenclient-oe's
#      0001-blktap3-move-physical-device-xenstore-node-creation-.patch first, as bitbake
#      does when blktap2 is not in DISTRO_FEATURES;
#   3. patch --dry-run --fuzz=0, then apply meta-blktap3-block-leave-vbd3-alone.patch;
#   4. run the script before and after our patch with a stand-in xenstore
#      (scripts/fake-xenstore.sh) on a vbd3 and a vbd backend, add and remove:
#      before, a vbd3 add overwrites libxl's physical-device-path with ""; after, vbd3
#      backends are left alone (add and remove), and vbd backends get exactly what they
#      got before.
#
# Usage: scripts/check-toolstack-patch.sh TOOLSTACK [XENCLIENT_OE]
#   TOOLSTACK     a git dir holding branch stable-8 of OpenXT/toolstack, or a source tree
#   XENCLIENT_OE  a git dir holding branch stable-8 of OpenXT/xenclient-oe, or a source tree
# Environment: TOOLSTACK_REF, OE_REF (default stable-8), KEEP_WORKDIR=1 keeps the scratch
# directory. Not run in CI: it needs the fetched trees (scripts/test-toolstack-patch.sh
# checks our part without them).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOOLSTACK_REF=${TOOLSTACK_REF:-stable-8}
OE_REF=${OE_REF:-stable-8}
LAYER_DIR=$REPO/meta-blktap3/recipes-openxt/xenclient
BBAPPEND=$LAYER_DIR/xenclient-toolstack_git.bbappend
PATCH_NAME=meta-blktap3-block-leave-vbd3-alone.patch
PATCH=$LAYER_DIR/xenclient-toolstack/$PATCH_NAME
OE_RECIPE=recipes-openxt/xenclient/xenclient-toolstack_git.bb
OE_0001=recipes-openxt/xenclient/xenclient-toolstack/0001-blktap3-move-physical-device-xenstore-node-creation-.patch

say() { printf '==> %s\n' "$*"; }
fail() {
	printf 'FAIL: %s\n' "$*"
	[ -n "${W:-}" ] && printf '(work dir kept: %s)\n' "$W"
	exit 1
}

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
	sed -n '3,/^set -euo/p' "$0" | sed -n 's/^# \{0,1\}//p'
	exit 2
fi
TS_SRC=$1
OE_SRC=${2:-}
[ -f "$BBAPPEND" ] || fail "$BBAPPEND missing"
[ -f "$PATCH" ] || fail "$PATCH missing"
grep -q "file://$PATCH_NAME" "$BBAPPEND" || fail "the bbappend does not add $PATCH_NAME"

W=$(mktemp -d /tmp/check-toolstack-patch.XXXXXX)
say "work dir $W"

# show SRC REF FILE: a file of a git dir's REF (or origin/REF), or of a source tree.
show() {
	local src=$1 ref=$2 file=$3 r
	if [ -f "$src/$file" ]; then
		cat "$src/$file"
		return
	fi
	for r in "$ref" "origin/$ref"; do
		if git -C "$src" rev-parse -q --verify "$r^{commit}" >/dev/null 2>&1; then
			git -C "$src" show "$r:$file"
			return
		fi
	done
	return 1
}

# --- 1. the toolstack's script and rule ---------------------------------------------
mkdir -p "$W/before/scripts"
show "$TS_SRC" "$TOOLSTACK_REF" scripts/block >"$W/before/scripts/block" ||
	fail "$TS_SRC has no scripts/block at $TOOLSTACK_REF"
show "$TS_SRC" "$TOOLSTACK_REF" scripts/xen-backend.rules >"$W/xen-backend.rules" ||
	fail "$TS_SRC has no scripts/xen-backend.rules at $TOOLSTACK_REF"
say "toolstack $TOOLSTACK_REF: scripts/block ($(wc -l <"$W/before/scripts/block") lines)"
grep -q 'KERNEL=="vbd\*".*/etc/xen/scripts/block ' "$W/xen-backend.rules" ||
	fail "xen-backend.rules has no KERNEL==\"vbd*\" rule running block"
say "xen-backend.rules: $(grep 'KERNEL=="vbd\*"' "$W/xen-backend.rules")"

# --- 2. xenclient-oe's recipe and its own patch ---------------------------------------
if [ -n "$OE_SRC" ]; then
	show "$OE_SRC" "$OE_REF" "$OE_RECIPE" >"$W/recipe.bb" || fail "$OE_SRC has no $OE_RECIPE at $OE_REF"
	say "xenclient-oe $OE_REF: $OE_RECIPE is the recipe the bbappend extends"
	grep -q "0001-blktap3-move-physical-device-xenstore-node-creation-.patch" "$W/recipe.bb" ||
		fail "$OE_RECIPE no longer adds 0001-blktap3-move-physical-device-xenstore-node-creation-.patch"
	if [ -d "$OE_SRC/.git" ] || [ -f "$OE_SRC/HEAD" ]; then
		names=$(git -C "$OE_SRC" ls-tree -r --name-only "$OE_REF" 2>/dev/null ||
			git -C "$OE_SRC" ls-tree -r --name-only "origin/$OE_REF")
	else
		names=$(cd "$OE_SRC" && find . -type f | sed 's|^\./||')
	fi
	if printf '%s\n' "$names" | grep -q "/$PATCH_NAME\$"; then
		fail "xenclient-oe has a file named $PATCH_NAME: ours would shadow it"
	fi
	say "no xenclient-oe file is named $PATCH_NAME"
	show "$OE_SRC" "$OE_REF" "$OE_0001" >"$W/0001.patch" || fail "$OE_SRC has no $OE_0001"
	patch -d "$W/before" -p1 --fuzz=0 --no-backup-if-mismatch -s -i "$W/0001.patch" ||
		fail "xenclient-oe's $(basename "$OE_0001") does not apply"
	say "applied xenclient-oe's $(basename "$OE_0001")"
	! grep -q 'physical-device"' "$W/before/scripts/block" ||
		fail "block still writes physical-device after xenclient-oe's patch"
else
	say "no xenclient-oe tree: our patch goes on the toolstack's script as it is"
fi

# --- 3. our patch ---------------------------------------------------------------------
cp -a "$W/before" "$W/after"
patch -d "$W/after" -p1 --fuzz=0 --dry-run -i "$PATCH" >"$W/dry-run.log" 2>&1 ||
	fail "$PATCH_NAME does not apply (patch --dry-run --fuzz=0): $(cat "$W/dry-run.log")"
say "patch --dry-run --fuzz=0: $(tr '\n' ' ' <"$W/dry-run.log")"
patch -d "$W/after" -p1 --fuzz=0 --no-backup-if-mismatch -s -i "$PATCH" || fail "$PATCH_NAME does not apply"
sh -n "$W/after/scripts/block" || fail "the patched block is not valid sh"
say "applied $PATCH_NAME; the result parses (sh -n)"

# --- 4. behaviour with a stand-in xenstore ----------------------------------------------
# shellcheck source=scripts/fake-xenstore.sh
. "$REPO/scripts/fake-xenstore.sh"
# run WHICH STORE ACTION XENBUS_PATH: the block script as udev runs it, for a device of
# domain 1; the state of the store afterwards in STORE.state.
run() {
	local which=$1 st=$2 action=$3 xp=$4 type
	type=$(printf %s "$xp" | cut -d/ -f2)
	fake_xenstore "$st" "$W/bin-$(basename "$st")"
	PATH="$W/bin-$(basename "$st"):$PATH" XENBUS_PATH=$xp XENBUS_TYPE=$type ACTION=$action \
		sh "$W/$which/scripts/block" "$action" >"$st.out" 2>&1 || echo "exit $?" >>"$st.out"
	(cd "$st" && find . -name .value | sort | while read -r f; do printf '%s=%s\n' "${f%/.value}" "$(cat "$f")"; done) >"$st.state"
}
# A domain 1 with a vbd3 disk as libxl leaves it, a vbd disk, and a vif's hotplug record.
seed() {
	local st=$1
	rm -rf "$st"
	mkdir -p "$st"
	xs_set "$st" backend/vbd3/1/51712/physical-device 2b:20
	xs_set "$st" backend/vbd3/1/51712/physical-device-path /dev/nbd1
	xs_set "$st" backend/vbd3/1/51712/tapdisk-params vhd:/storage/disks/d.vhd
	xs_set "$st" backend/vbd3/1/51712/hotplug-status connected
	xs_set "$st" backend/vbd/1/51728/params "$W/phys-disk"
	xs_set "$st" /xapi/1/hotplug/vif/0/hotplug online
}
: >"$W/phys-disk"
V3=backend/vbd3/1/51712
V=backend/vbd/1/51728

seed "$W/s-b3"
run before "$W/s-b3" add "$V3"
[ "$(xs_get "$W/s-b3" "$V3/physical-device-path")" = "" ] ||
	fail "expected the unpatched block to overwrite a vbd3 physical-device-path (the bug this fixes); got '$(xs_get "$W/s-b3" "$V3/physical-device-path")'"
say "unpatched, vbd3 add: physical-device-path /dev/nbd1 -> '' (the bug)"

seed "$W/s-a3"
run after "$W/s-a3" add "$V3"
[ "$(xs_get "$W/s-a3" "$V3/physical-device-path")" = /dev/nbd1 ] ||
	fail "patched, vbd3 add: physical-device-path is '$(xs_get "$W/s-a3" "$V3/physical-device-path")'"
[ ! -s "$W/s-a3.out" ] || fail "patched, vbd3 add printed: $(cat "$W/s-a3.out")"
seed "$W/s-seed"
(cd "$W/s-seed" && find . -name .value | sort | while read -r f; do printf '%s=%s\n' "${f%/.value}" "$(cat "$f")"; done) >"$W/s-seed.state"
cmp -s "$W/s-seed.state" "$W/s-a3.state" || fail "patched, vbd3 add changed the store: $(diff "$W/s-seed.state" "$W/s-a3.state")"
say "patched, vbd3 add: the store is untouched (physical-device-path stays /dev/nbd1, no /xapi node)"
run after "$W/s-a3" remove "$V3"
cmp -s "$W/s-seed.state" "$W/s-a3.state" || fail "patched, vbd3 remove changed the store: $(diff "$W/s-seed.state" "$W/s-a3.state")"
say "patched, vbd3 remove: the store is untouched (/xapi/1 stays)"

for action in add remove; do
	seed "$W/s-bv"
	seed "$W/s-av"
	run before "$W/s-bv" "$action" "$V"
	run after "$W/s-av" "$action" "$V"
	cmp -s "$W/s-bv.state" "$W/s-av.state" ||
		fail "vbd $action differs from the unpatched script: $(diff "$W/s-bv.state" "$W/s-av.state")"
	cmp -s "$W/s-bv.out" "$W/s-av.out" || fail "vbd $action prints differently from the unpatched script"
done
seed "$W/s-v"
run after "$W/s-v" add "$V"
[ "$(xs_get "$W/s-v" "$V/physical-device-path")" = "$W/phys-disk" ] ||
	fail "patched, vbd add: physical-device-path is '$(xs_get "$W/s-v" "$V/physical-device-path")'"
[ "$(xs_get "$W/s-v" /xapi/1/hotplug/vbd/51728/hotplug)" = online ] || fail "patched, vbd add: no hotplug=online"
run after "$W/s-v" remove "$V"
! xs_has "$W/s-v" /xapi/1 || fail "patched, vbd remove: /xapi/1 is still there"
say "vbd add/remove: the same store and output as unpatched (physical-device-path = params, /xapi/1/hotplug/vbd/51728/hotplug=online; remove drops /xapi/1)"

if [ "${KEEP_WORKDIR:-0}" != 1 ]; then
	rm -rf "$W"
fi
after_oe=""
[ -z "$OE_SRC" ] || after_oe=" after xenclient-oe $OE_REF's 0001 patch"
echo "PASS: $PATCH_NAME applies (--fuzz=0) to toolstack $TOOLSTACK_REF's scripts/block$after_oe; vbd3 backends are left alone, vbd backends behave as before"
