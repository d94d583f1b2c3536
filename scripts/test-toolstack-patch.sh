#!/usr/bin/env bash
# SPDX-License-Identifier: BSD-3-Clause
#
# CI check of meta-blktap3's xenclient-toolstack patch without OpenXT's trees (we do not
# ship OpenXT's block script; scripts/check-toolstack-patch.sh checks the patch against it):
#   - the bbappend adds the patch with SRC_URI_append, only without blktap2, uses only the
#     underscore override syntax, and the patch exists under the name it adds;
#   - the patch is well formed: its hunk applies with --fuzz=0 to its own pre-image (the
#     context lines at the hunk's line numbers), adds lines only and touches scripts/block;
#   - the lines it adds, run as sh after the script's own TYPE/DOMID/DEVID lines (written
#     here, not copied) with a stand-in xenstore, exit 0 without touching xenstore for vbd3
#     backends (by XENBUS_PATH or XENBUS_TYPE) and fall through for vbd, vif and tap ones.
# Usage: scripts/test-toolstack-patch.sh
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=$REPO/meta-blktap3/recipes-openxt/xenclient
BBAPPEND=$DIR/xenclient-toolstack_git.bbappend
PATCH_NAME=meta-blktap3-block-leave-vbd3-alone.patch
PATCH=$DIR/xenclient-toolstack/$PATCH_NAME

fail() {
	printf 'FAIL: %s\n' "$*"
	exit 1
}
ok() { printf 'ok: %s\n' "$*"; }

W=$(mktemp -d /tmp/test-toolstack-patch.XXXXXX)
trap 'rm -rf "$W"' EXIT

# --- the bbappend ---------------------------------------------------------------------------
[ -f "$BBAPPEND" ] || fail "$BBAPPEND missing"
[ -f "$PATCH" ] || fail "$PATCH missing"
# shellcheck disable=SC2016 # a literal bitbake pattern
grep -Eq '^[A-Za-z_${}]+:(append|prepend|remove)' "$BBAPPEND" && fail "colon override syntax in $BBAPPEND (pyro parses only _append)"
line=$(grep '^SRC_URI' "$BBAPPEND") || fail "the bbappend does not touch SRC_URI"
[ "$(printf '%s\n' "$line" | wc -l)" -eq 1 ] || fail "more than one SRC_URI line: $line"
case $line in
"SRC_URI_append = \" \${@bb.utils.contains('DISTRO_FEATURES', 'blktap2', '', 'file://$PATCH_NAME', d)}\"") ;;
*) fail "unexpected SRC_URI line (want SRC_URI_append of file://$PATCH_NAME unless blktap2): $line" ;;
esac
# shellcheck disable=SC2016 # a literal bitbake line
grep -q '^FILESEXTRAPATHS_prepend := "${THISDIR}/${PN}:"$' "$BBAPPEND" || fail "FILESEXTRAPATHS_prepend of \${THISDIR}/\${PN} missing"
[ "$(basename "$(dirname "$PATCH")")" = xenclient-toolstack ] || fail "patch not in \${THISDIR}/\${PN}"
ok "bbappend: SRC_URI_append of file://$PATCH_NAME unless blktap2, from \${THISDIR}/\${PN}"

# --- the patch is well formed ---------------------------------------------------------------------
files=$(sed -n 's|^+++ b/\([^[:space:]]*\).*|\1|p' "$PATCH")
[ "$files" = scripts/block ] || fail "the patch touches '$files', not just scripts/block"
grep -q '^Upstream-Status: ' "$PATCH" || fail "no Upstream-Status"
[ "$(grep -c '^@@ ' "$PATCH")" -eq 1 ] || fail "expected one hunk"
grep -q '^-[^-]' "$PATCH" && fail "the patch removes lines; it should only add the vbd3 exit"
hdr=$(grep '^@@ ' "$PATCH")
start=$(printf '%s\n' "$hdr" | sed -n 's/^@@ -\([0-9]*\),.*/\1/p')
[ -n "$start" ] || fail "cannot parse hunk header: $hdr"
# The pre-image: filler lines, then the hunk's context lines from line $start on.
mkdir -p "$W/pre/scripts"
{
	i=1
	while [ "$i" -lt "$start" ]; do
		echo "# filler $i"
		i=$((i + 1))
	done
	sed -n '/^@@ /,$p' "$PATCH" | sed -n '2,$p' | sed -n 's/^ //p'
} >"$W/pre/scripts/block"
cp -a "$W/pre" "$W/post"
patch -d "$W/post" -p1 --fuzz=0 --no-backup-if-mismatch -s -i "$PATCH" >"$W/patch.log" 2>&1 ||
	fail "the patch does not apply at --fuzz=0 to its own pre-image: $(cat "$W/patch.log")"
[ ! -s "$W/patch.log" ] || fail "patch said: $(cat "$W/patch.log")"
added=$(diff "$W/pre/scripts/block" "$W/post/scripts/block" | grep -c '^>' || true)
[ "$added" -eq "$(grep -c '^+[^+]\|^+$' "$PATCH")" ] || fail "applied $added lines, the patch adds $(grep -c '^+[^+]\|^+$' "$PATCH")"
ok "the hunk ($hdr) applies at --fuzz=0 and adds $added lines to scripts/block"

# --- what the added lines do --------------------------------------------------------------------
{
	cat <<'HEAD'
#!/bin/sh
# harness: the same parse of XENBUS_PATH as the block script
TYPE=$(echo "${XENBUS_PATH}" | cut -f 2 -d /)
DOMID=$(echo "${XENBUS_PATH}" | cut -f 3 -d /)
DEVID=$(echo "${XENBUS_PATH}" | cut -f 4 -d /)
HEAD
	sed -n '/^@@ /,$p' "$PATCH" | sed -n 's/^+//p'
	cat <<'TAIL'
xenstore-write "/xapi/${DOMID}/hotplug/${TYPE}/${DEVID}/reached" "$1"
TAIL
} >"$W/harness.sh"
sh -n "$W/harness.sh" || fail "the added lines are not valid sh"
shellcheck -s sh "$W/harness.sh" >"$W/sc.log" 2>&1 || fail "shellcheck on the added lines: $(cat "$W/sc.log")"
# shellcheck source=scripts/fake-xenstore.sh
. "$REPO/scripts/fake-xenstore.sh"
ST=$W/store
fake_xenstore "$ST" "$W/bin"
xs_set "$ST" backend/vbd3/1/51712/physical-device-path /dev/nbd1
# run EXPECT ACTION XENBUS_PATH [XENBUS_TYPE]: EXPECT is skip (exit 0, store unchanged)
# or fall (the script goes on to what follows the added lines).
run() {
	local expect=$1 action=$2 xp=$3 xt=${4-} type domid devid before rc=0
	type=$(echo "$xp" | cut -d/ -f2)
	domid=$(echo "$xp" | cut -d/ -f3)
	devid=$(echo "$xp" | cut -d/ -f4)
	before=$(cd "$ST" && find . | sort)
	env ${xt:+XENBUS_TYPE=$xt} XENBUS_PATH="$xp" PATH="$W/bin:$PATH" sh "$W/harness.sh" "$action" >"$W/out" 2>&1 || rc=$?
	case $expect in
	skip)
		[ "$rc" -eq 0 ] || fail "$action $xp (XENBUS_TYPE=${xt:-unset}): exit $rc, want 0"
		[ ! -s "$W/out" ] || fail "$action $xp printed: $(cat "$W/out")"
		[ "$before" = "$(cd "$ST" && find . | sort)" ] || fail "$action $xp changed the store"
		;;
	fall)
		[ "$rc" -eq 0 ] || fail "$action $xp: exit $rc: $(cat "$W/out")"
		[ "$(xs_get "$ST" "/xapi/$domid/hotplug/$type/$devid/reached")" = "$action" ] ||
			fail "$action $xp (XENBUS_TYPE=${xt:-unset}) did not reach the rest of the script"
		;;
	esac
	[ "$(xs_get "$ST" backend/vbd3/1/51712/physical-device-path)" = /dev/nbd1 ] ||
		fail "physical-device-path changed"
}
for action in add remove; do
	run skip "$action" backend/vbd3/1/51712 vbd3
	run skip "$action" backend/vbd3/1/51712
	run skip "$action" backend/odd/1/51712 vbd3
	run fall "$action" backend/vbd/1/51728 vbd
	run fall "$action" backend/vbd/1/51728
	run fall "$action" backend/vbd3x/1/51712 vbd3x
	run fall "$action" backend/tap/1/51728 tap
	run fall "$action" backend/vif/1/0 vif
done
ok "the added lines: vbd3 (by XENBUS_PATH or XENBUS_TYPE) exits 0 without touching xenstore; vbd, vbd3x, tap, vif go on"
echo "PASS: meta-blktap3's xenclient-toolstack bbappend and patch"
