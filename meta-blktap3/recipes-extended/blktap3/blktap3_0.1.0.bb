SUMMARY = "blktap3 in Rust: tapdisk, tap-ctl, libblktapctl, tapback, vhd-util"
DESCRIPTION = "The Xen dom0 storage stack OpenXT ships as blktap3, rewritten in Rust: tapdisk \
               (VHD and raw images, OpenXT VHD encryption, NBD export), tap-ctl, libblktapctl.so.0 \
               (the C ABI libxl links against), tapback (the vbd3 xenstore backend) and vhd-util. \
               Replaces OpenXT's C blktap3 (same PN and install paths) and blktap2; needs no \
               blktap kernel module."
HOMEPAGE = "https://github.com/openxt/blktap3-rs"
SECTION = "console/utils"
# blktap3 is BSD-3-Clause; the statically linked crates are MIT or MIT/Apache-2.0 (the Rust std
# as well); see Cargo.lock and each crate's metadata.
LICENSE = "BSD-3-Clause & MIT & (MIT | Apache-2.0)"
LIC_FILES_CHKSUM = "file://LICENSE;md5=f702c31b4e33ac997cd4372cae89c2ae"

# This project's source. A release build pins SRCREV (in local.conf or a bbappend) to the commit
# whose Cargo.lock matches blktap3-crates.inc; BLKTAP3_GIT_URI may point at a local clone
# (git:///path/to/blktap3-rs;protocol=file;branch=...).
BLKTAP3_GIT_URI ?= "git://github.com/openxt/blktap3-rs.git;protocol=https;branch=master"
PV = "0.1.0+git${SRCPV}"
SRC_URI = "${BLKTAP3_GIT_URI}"
# Like OpenXT's own blktap3.bb; pin it for a release build (see above).
# nooelint: oelint.vars.autorev
SRCREV ?= "${AUTOREV}"
S = "${WORKDIR}/git"

# Every crate of Cargo.lock as a checksummed https source (scripts/gen-crate-srcuri.py).
require blktap3-crates.inc

inherit cargo_vendored update-rc.d

INITSCRIPT_NAME = "tapback-daemon"
INITSCRIPT_PARAMS = "defaults 61"

# Version of the installed libblktapctl.so.0.<x> (SONAME libblktapctl.so.0, set by build.rs).
BLKTAP3_SOVERSION = "0.1.0"

do_install() {
    triple=$(cargo_vendored_triple)
    CARGO_TARGET_DIR="${CARGO_TARGET_DIR}" CARGO_PROFILE_DIR="${CARGO_PROFILE_DIR}" \
    BLKTAP3_SOVERSION="${BLKTAP3_SOVERSION}" \
        "${S}/scripts/install.sh" --no-build --target "$triple" \
        --destdir "${D}" --prefix "${prefix}" --bindir "${bindir}" --sbindir "${sbindir}" \
        --libdir "${libdir}" --libexecdir "${libexecdir}" --includedir "${includedir}" \
        --sysconfdir "${sysconfdir}"
}

# Listed one by one: scripts/test-layer.sh checks that this is exactly what do_install installs.
# nooelint: oelint.var.filesoverride
FILES_${PN} = "${libexecdir}/tapdisk \
               ${sbindir}/tap-ctl \
               ${bindir}/tapback \
               ${bindir}/vhd-util \
               ${sbindir}/vhd-util \
               ${libdir}/libblktapctl.so.0 \
               ${libdir}/libblktapctl.so.${BLKTAP3_SOVERSION} \
               ${sysconfdir}/init.d/tapback-daemon \
               ${sysconfdir}/udev/rules.d/xen-vbd3-backend.rules \
               ${sysconfdir}/xen/scripts/block-vbd3 \
               "
# nooelint: oelint.var.filesoverride
FILES_${PN}-dev = "${includedir}/blktap \
                   ${libdir}/libblktapctl.so \
                   "

# What the installed scripts run (OpenXT stable-8 package names):
# - /etc/xen/scripts/block-vbd3: xenstore-read, -write, -rm and -exists, from xen-xenstore
#   (xenclient-oe's xen.bb; xenclient-toolstack's block script needs it too);
# - /etc/init.d/tapback-daemon: start-stop-daemon, the busybox applet (OpenXT's and oe-core's
#   busybox defconfigs enable it with the FANCY and LONG_OPTIONS features the script uses),
#   with head, tr, grep and the other base tools;
# - /etc/udev/rules.d/xen-vbd3-backend.rules: udev (eudev on a sysvinit dom0 RPROVIDES it).
# logger and modprobe are optional for the scripts, so they are not listed.
RDEPENDS_${PN} = "busybox udev xen-xenstore"

# dom0 reaches a disk through the kernel NBD driver; built in (no package) or as this module.
RRECOMMENDS_${PN} = "kernel-module-nbd"

# blktap2 (xen-blktap.bb) and this package provide the same commands and library.
RCONFLICTS_${PN} = "xen-blktap xen-libblktap xen-libblktapctl xen-libvhd"
RREPLACES_${PN} = "xen-blktap xen-libblktap xen-libblktapctl xen-libvhd"
RCONFLICTS_${PN}-dev = "xen-libblktap-dev xen-libblktapctl-dev xen-libvhd-dev"
RREPLACES_${PN}-dev = "xen-libblktap-dev xen-libblktapctl-dev xen-libvhd-dev"
