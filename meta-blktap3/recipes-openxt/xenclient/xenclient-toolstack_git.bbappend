# xenclient-toolstack's /etc/xen/scripts/block runs for every backend device
# matching KERNEL=="vbd*" (xen-backend.rules), which includes blktap3's vbd3
# backends. The patch makes it leave those alone, so that it no longer
# overwrites the physical-device-path libxl wrote for tapback.
#
# SRC_URI_append (not +=) puts it after xenclient-oe's own
# 0001-blktap3-move-physical-device-xenstore-node-creation-.patch. Like that
# patch, it is only added when blktap2 is not in DISTRO_FEATURES (with blktap2
# there are no vbd3 backends). The name does not shadow any xenclient-oe file.
# (noncoreoverride: changing another layer's recipe is what a bbappend is for.)

# nooelint: oelint.vars.noncoreoverride
FILESEXTRAPATHS_prepend := "${THISDIR}/${PN}:"

# nooelint: oelint.vars.noncoreoverride
SRC_URI_append = " ${@bb.utils.contains('DISTRO_FEATURES', 'blktap2', '', 'file://meta-blktap3-block-leave-vbd3-alone.patch', d)}"
