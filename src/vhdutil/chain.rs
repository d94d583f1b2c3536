//! Opening images through the image layer for data operations (coalesce, fill, copy,
//! read -r): parents attached, and keys from `TAPDISK3_CRYPTO_KEYDIR` /
//! `TAPDISK2_CRYPTO_KEYDIR` so encrypted chains are read and written as plaintext.

use std::path::Path;

use crate::image::chain::{open_vhd_chain, OpenOptions};
use crate::image::crypto::KeySource;
use crate::image::vhd::engine::VhdImage;
use crate::image::ImageError;

/// Open the VHD at `name` with its chain and the environment's key directories.
pub fn open_chain(name: &str, read_only: bool) -> Result<VhdImage, ImageError> {
    let opts = OpenOptions {
        read_only,
        keys: KeySource::from_env(),
        ..Default::default()
    };
    open_vhd_chain(Path::new(name), &opts)
}

/// Open the VHD at `name` with its chain, read-only, for the bytes as stored: encrypted
/// layers are not decrypted and no key is needed (blktap's `vhd-util read -r/-R`).
pub fn open_chain_stored(name: &str) -> Result<VhdImage, ImageError> {
    let opts = OpenOptions {
        read_only: true,
        stored_bytes: true,
        ..Default::default()
    };
    open_vhd_chain(Path::new(name), &opts)
}

/// [`open_chain`] for a command: on failure print blktap's `error opening NAME: -errno`
/// on stdout and the cause on stderr.
pub fn open_chain_or_report(
    io: &mut super::Io,
    name: &str,
    read_only: bool,
) -> super::error::Result<VhdImage> {
    open_chain(name, read_only).map_err(|e| {
        crate::vout!(io, "error opening {name}: {}", -e.errno());
        crate::verr!(io, "{}", super::common::describe(&e));
        e.into()
    })
}
