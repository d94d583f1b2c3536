# meta-blktap3: SELinux rules for blktap3 (Rust) on NBD.
#
# A module of its own, blktap3nbd (refpolicy-mcs/policy/modules/services/), added next
# to the blktap module of xenclient-oe, which stays: tapdisk, tap-ctl and tapback keep
# their domains and install paths. The new module labels /run/blktap-control and the
# kernel NBD devices (/dev/nbdN as blktap_device_t, like the blktap2 tapdevs they
# replace) and allows what the NBD design adds: marker files, NBD sockets, generic
# netlink to the nbd driver, the /dev/xen/blktap-2/tapdev<minor> links, and the same for
# libxl inside xenmgr (xend_t) and xl (xm_t); tapback reads those links, and the
# tapback-daemon init script creates the control directory with its type. The installed
# scripts need no labels of their own (refpolicy: init.d initrc_exec_t, /etc/xen/scripts
# bin_t). Checked with scripts/check-selinux.sh.

# (noncoreoverride: changing another layer's recipe is what a bbappend is for.)
# nooelint: oelint.vars.noncoreoverride
FILESEXTRAPATHS_prepend := "${THISDIR}/refpolicy-mcs:"

# xenclient-oe's do_srctree_copy copies ${WORKDIR}/policy into ${S}.
# nooelint: oelint.vars.noncoreoverride
SRC_URI_append = " \
    file://policy/modules/services/blktap3nbd.fc \
    file://policy/modules/services/blktap3nbd.if \
    file://policy/modules/services/blktap3nbd.te \
"

# xenclient-oe's do_modules_copy writes policy/modules.conf; enable the module there.
# nooelint: oelint.vars.noncoreoverride
do_modules_copy_append() {
    printf '\n# Layer: services\n# Module: blktap3nbd\n#\n# blktap3 (Rust) on NBD\n#\n%s\n' \
        'blktap3nbd = module' >> ${S}/policy/modules.conf
}
