# cargo_vendored.bbclass: build a Rust crate offline with the pinned toolchain of
# rust-bin-native and crates fetched as checksummed SRC_URI entries (pyro's bitbake 1.34 has no
# crate:// fetcher).
#
# The recipe lists every package of Cargo.lock as
#   https://static.crates.io/crates/NAME/NAME-VER.crate;downloadfilename=NAME-VER.crate;unpack=0;subdir=cargo-crates;name=NAME-VER
# with SRC_URI[NAME-VER.sha256sum] (generated from Cargo.lock by scripts/gen-crate-srcuri.py).
# do_configure unpacks them into a cargo directory source with a .cargo-checksum.json each and
# writes $CARGO_HOME/config.toml (vendored sources only, linkers that wrap ${CC} and ${BUILD_CC});
# do_compile runs cargo build --offline --frozen for the target triple that TARGET_SYS maps to.
#
# Functions use only ${VAR} references (no inline python), so scripts/test-layer.sh can run
# them outside bitbake. Underscore override syntax only (pyro).

DEPENDS_append = " rust-bin-native"

CARGO = "${STAGING_BINDIR_NATIVE}/cargo"
RUSTC = "${STAGING_BINDIR_NATIVE}/rustc"
CARGO_HOME = "${WORKDIR}/cargo-home"
CARGO_CRATES_DIR = "${WORKDIR}/cargo-crates"
CARGO_VENDOR_DIR = "${WORKDIR}/cargo-vendor"
CARGO_TARGET_DIR = "${B}/target"
CARGO_MANIFEST = "${S}/Cargo.toml"
# Build profile; release keeps Cargo.toml's debug = 1 so bitbake splits the debug info into -dbg.
CARGO_BUILD_FLAGS = "--release"
# The directory cargo puts that profile's output in (under target/<triple>/).
# nooelint: oelint.vars.mispell.unknown
CARGO_PROFILE_DIR = "release"

B = "${WORKDIR}/build"

# Print the Rust target triple for TARGET_SYS (the std of these triples is in rust-bin-native).
cargo_vendored_triple() {
    case "${TARGET_SYS}" in
        i686-linux|i686-*-linux) echo i686-unknown-linux-gnu ;;
        x86_64-linux|x86_64-*-linux) echo x86_64-unknown-linux-gnu ;;
        *) bbfatal "cargo-vendored: no Rust std for TARGET_SYS ${TARGET_SYS} (rust-bin-native has i686 and x86_64 glibc Linux)" ;;
    esac
}

# Write an executable wrapper $1 that runs the compiler command $2 (a command with arguments,
# as ${CC} is) with the link flags $3 and the arguments rustc passes.
cargo_vendored_wrapper() {
    printf '#!/bin/sh\nexec %s %s "$@"\n' "$2" "$3" > "$1"
    chmod 0755 "$1"
}

cargo_vendored_do_configure() {
    [ -f "${S}/Cargo.lock" ] || bbfatal "cargo-vendored: ${S}/Cargo.lock is missing"

    # A cargo directory source: one unpacked crate per directory, each with the sha256 of its
    # .crate file (cargo compares it with Cargo.lock's checksum).
    rm -rf "${CARGO_VENDOR_DIR}"
    mkdir -p "${CARGO_VENDOR_DIR}"
    for crate in "${CARGO_CRATES_DIR}"/*.crate; do
        [ -f "$crate" ] || continue
        crate_dir=$(basename "$crate" .crate)
        tar -xzf "$crate" -C "${CARGO_VENDOR_DIR}"
        [ -f "${CARGO_VENDOR_DIR}/$crate_dir/Cargo.toml" ] ||
            bbfatal "cargo-vendored: $crate did not unpack to $crate_dir/"
        crate_sum=$(sha256sum "$crate" | cut -d' ' -f1)
        printf '{"files":{},"package":"%s"}\n' "$crate_sum" > "${CARGO_VENDOR_DIR}/$crate_dir/.cargo-checksum.json"
    done
    found=$(find "${CARGO_VENDOR_DIR}" -mindepth 1 -maxdepth 1 -type d | wc -l)
    [ "$found" -gt 0 ] || bbfatal "cargo-vendored: no .crate files in ${CARGO_CRATES_DIR}"
    bbnote "cargo-vendored: $found crates vendored in ${CARGO_VENDOR_DIR}"

    triple=$(cargo_vendored_triple)
    host_triple=$("${RUSTC}" -vV | sed -n 's/^host: //p')
    [ -n "$host_triple" ] || bbfatal "cargo-vendored: ${RUSTC} -vV printed no host triple"

    mkdir -p "${CARGO_HOME}"
    cargo_vendored_wrapper "${CARGO_HOME}/target-linker" "${CC}" "${LDFLAGS}"
    cargo_vendored_wrapper "${CARGO_HOME}/build-linker" "${BUILD_CC}" "${BUILD_LDFLAGS}"

    config="${CARGO_HOME}/config.toml"
    {
        printf '[source.crates-io]\nreplace-with = "vendored-sources"\n\n'
        printf '[source.vendored-sources]\ndirectory = "%s"\n\n' "${CARGO_VENDOR_DIR}"
        printf '[net]\noffline = true\n\n'
        printf '[build]\nrustc = "%s"\ntarget-dir = "%s"\n\n' "${RUSTC}" "${CARGO_TARGET_DIR}"
        printf '[target.%s]\nlinker = "%s"\n' "$triple" "${CARGO_HOME}/target-linker"
        # Build scripts and proc-macros run on the build host. When host and target triples are
        # the same (x86_64 dom0 on an x86_64 build host) cargo has one linker setting for both,
        # the target's: their objects then link against the target sysroot's glibc, which runs on
        # any newer host glibc.
        if [ "$host_triple" != "$triple" ]; then
            printf '\n[target.%s]\nlinker = "%s"\n' "$host_triple" "${CARGO_HOME}/build-linker"
        fi
    } > "$config"
    bbnote "cargo-vendored: wrote $config for $triple (build host $host_triple)"
}

cargo_vendored_do_compile() {
    triple=$(cargo_vendored_triple)
    CARGO_HOME="${CARGO_HOME}" "${CARGO}" build ${CARGO_BUILD_FLAGS} --offline --frozen \
        ${PARALLEL_MAKE} --manifest-path "${CARGO_MANIFEST}" \
        --target "$triple" --target-dir "${CARGO_TARGET_DIR}"
}

EXPORT_FUNCTIONS do_configure do_compile
