SUMMARY = "Pinned official Rust release (rustc, cargo, host std, i686 and x86_64 Linux std)"
DESCRIPTION = "Installs the official Rust ${PV} binary release from static.rust-lang.org into \
               the native sysroot: rustc and cargo for the build host, the standard library \
               for the i686-unknown-linux-gnu (OpenXT 8 dom0) and x86_64-unknown-linux-gnu \
               (OpenXT 9 dom0, and the x86_64 build host) targets. Pyro's own Rust \
               (1.15-1.24) is too old for blktap3. Used by cargo_vendored.bbclass."
HOMEPAGE = "https://www.rust-lang.org/"
SECTION = "devel"
LICENSE = "MIT | Apache-2.0"
LIC_FILES_CHKSUM = "file://LICENSE-MIT;md5=8a95ea02f2dd8c2953432d0ddd7cdd91 \
                    file://LICENSE-APACHE;md5=22a53954e4e0ec258dfce4391e905dac"

# Official binaries exist for these build hosts; the sums below are for x86_64 only.
COMPATIBLE_HOST = "x86_64.*-linux"

RUST_BIN_HOST = "x86_64-unknown-linux-gnu"
RUST_BIN_TARGETS = "i686-unknown-linux-gnu x86_64-unknown-linux-gnu"
RUST_BIN_DIST = "https://static.rust-lang.org/dist"

# Sums: the xz_hash entries of ${RUST_BIN_DIST}/channel-rust-${PV}.toml (the x86_64 tarballs
# also have a <tarball>.sha256 beside them), checked against the downloaded files;
# scripts/test-layer.sh with LAYER_TEST_NATIVE=1 checks them again and runs do_install.
SRC_URI = "${RUST_BIN_DIST}/rustc-${PV}-${RUST_BIN_HOST}.tar.xz;name=rustc \
           ${RUST_BIN_DIST}/cargo-${PV}-${RUST_BIN_HOST}.tar.xz;name=cargo \
           ${RUST_BIN_DIST}/rust-std-${PV}-x86_64-unknown-linux-gnu.tar.xz;name=std-x86-64 \
           ${RUST_BIN_DIST}/rust-std-${PV}-i686-unknown-linux-gnu.tar.xz;name=std-i686 \
           "
SRC_URI[rustc.sha256sum] = "b42c254e1349df86bd40bc28fdf386172a1a46f2eeabe3c7a08a75cf1fb60e27"
SRC_URI[cargo.sha256sum] = "99fc10be2aeedf2c23a484f217bfa76458494495a0eee33e280d3616bb08282d"
SRC_URI[std-x86-64.sha256sum] = "2719470dcd78b3f97d78b978c8f85a1a58d84ff11b62558294621c01bca34d49"
SRC_URI[std-i686.sha256sum] = "853605815e8267baf8fdc6e4594514d2e0afb46fb29f478ebec871a3424430f3"

S = "${WORKDIR}/rustc-${PV}-${RUST_BIN_HOST}"

inherit native

# Prebuilt: nothing to configure or compile. Keep the target std's objects as shipped.
do_configure[noexec] = "1"
do_compile[noexec] = "1"
INHIBIT_SYSROOT_STRIP = "1"

do_install() {
    for component in rustc-${PV}-${RUST_BIN_HOST} cargo-${PV}-${RUST_BIN_HOST}; do
        "${WORKDIR}/${component}/install.sh" --destdir="${D}" --prefix="${prefix}" \
            --disable-ldconfig --disable-verify
    done
    for triple in ${RUST_BIN_TARGETS}; do
        "${WORKDIR}/rust-std-${PV}-${triple}/install.sh" --destdir="${D}" --prefix="${prefix}" \
            --disable-ldconfig --disable-verify
    done
    # Installer bookkeeping, docs and shell completions are not needed in a sysroot.
    rm -f "${D}${libdir}/rustlib/install.log" "${D}${libdir}/rustlib/uninstall.sh"
    rm -rf "${D}${prefix}/etc" "${D}${datadir}/doc" "${D}${mandir}"
}
