# meta-blktap3: the dom0 kernel for blktap3 (Rust) on NBD, without blktap2.
#
# - The blktap2 kernel driver patch of xenclient-oe is dropped (no machine needs it:
#   tapdisk serves dom0 through NBD, not through blktap2 tapdevs).
# - On the xenclient-dom0 machine, files/blktap3.cfg is merged into the defconfig:
#   CONFIG_BLK_DEV_NBD=y, CONFIG_XEN_GNTDEV=y, CONFIG_XEN_DEV_EVTCHN=y, and
#   CONFIG_BLK_DEV_TAP off. linux-openxt uses meta-oe's linux.inc, which does not merge
#   .cfg fragments (only linux-yocto does), so do_configure_append merges it, runs
#   olddefconfig and fails the build if a requested option did not survive.

# (noncoreoverride: changing another layer's recipe is what a bbappend is for.)
# nooelint: oelint.vars.noncoreoverride
FILESEXTRAPATHS_prepend := "${THISDIR}/files:"

# The entry must match xenclient-oe's exactly, ";patch=1" included.
# nooelint: oelint.vars.noncoreoverride, oelint.vars.srcurioptions
SRC_URI_remove = "file://blktap2.patch;patch=1"

SRC_URI_append_xenclient-dom0 = " file://blktap3.cfg"

# (func.specific: xenclient-dom0 is an OpenXT MACHINE, unknown to the linter.)
# nooelint: oelint.func.specific
do_configure_append_xenclient-dom0() {
    frag=${WORKDIR}/blktap3.cfg
    config=${B}/.config
    # Drop every option the fragment sets, then append the fragment.
    for opt in $(sed -n -e 's/^\(CONFIG_[A-Za-z0-9_]*\)=.*/\1/p' \
        -e 's/^# \(CONFIG_[A-Za-z0-9_]*\) is not set$/\1/p' "$frag"); do
        sed -i -e "/^$opt=/d" -e "/^# $opt is not set\$/d" "$config"
    done
    cat "$frag" >> "$config"
    oe_runmake -C ${S} O=${B} olddefconfig
    # What the fragment asks for must be what the kernel is built with.
    for want in $(sed -n 's/^\(CONFIG_[A-Za-z0-9_]*=.*\)$/\1/p' "$frag"); do
        grep -qxF "$want" "$config" || bbfatal "blktap3.cfg: $want did not survive olddefconfig"
    done
    for off in $(sed -n 's/^# \(CONFIG_[A-Za-z0-9_]*\) is not set$/\1/p' "$frag"); do
        if grep -q "^$off=" "$config"; then
            bbfatal "blktap3.cfg: $off is still set"
        fi
    done
}
