//! OpenXT encrypted VHD: AES-XTS per 512-byte sector, key hashes and key files.
//!
//! * [`XtsCipher`]: XTS-AES-128 (32-byte key) / XTS-AES-256 (64-byte key), one data unit
//!   per 512-byte sector, blktap's 32-bit "plain" tweak (the low 32 bits of the virtual
//!   sector number, little-endian, zero-padded). Batched inside the backend aes 0.9 selects
//!   at run time (VAES-512, VAES-256 or AES-NI).
//! * [`KeyHash`]: the 65-byte key check value, `SHA-256(nonce || key)`.
//! * Key files `<basename>,aes-xts-plain,<512|256>.key` in the directories of
//!   `TAPDISK3_CRYPTO_KEYDIR` / `TAPDISK2_CRYPTO_KEYDIR` ([`find_key_file`],
//!   [`KeySource::from_env`]), and the per-image key walk of a chain
//!   ([`resolve_chain_keys`], OpenXT reference §1.5).
//! * Helpers for `vhd-util key`: [`keyhash_for_keyfile`], [`keyfile_matches`],
//!   [`key_bits_from_filename`], [`generate_key`], [`derive_key_from_passphrase`].
//!
//! Key material lives in [`KeyBytes`] (zeroed on drop) and in the AES key schedules
//! (zeroed on drop); no type here prints key bytes in `Debug` or in an error message.

mod keyhash;
mod keys;
mod xts;

use std::path::PathBuf;

pub use keyhash::{compute_hash, parse_hex, parse_hex_vec, to_hex, KeyHash};
pub use keys::{
    derive_key_from_passphrase, find_key_file, generate_key, image_basename,
    key_bits_from_filename, key_file_name, keyfile_bits_for_image, keyfile_matches,
    keyhash_for_keyfile, parse_keydirs, read_keyfile_whole, resolve_chain_keys, write_key_file,
    KeyFile, KeySource, KeyWalkEntry, KEYDIR_ENV, KEYDIR_ENV_LEGACY, KEY_FILE_MAX, KEY_SIZES_BITS,
    PBKDF2_DEFAULT_ITERATIONS, PBKDF2_MIN_SALT_LEN,
};
pub use xts::{XtsCipher, CHUNK_SECTORS};

/// Raw key bytes (32 = AES-128-XTS, 64 = AES-256-XTS), zeroed on drop.
///
/// Note: `Zeroizing`'s own `Debug` would print the bytes; never `{:?}` a `KeyBytes`
/// directly. The types of this module that hold one implement `Debug` by hand.
pub type KeyBytes = zeroize::Zeroizing<Vec<u8>>;

/// Errors of key handling and encryption. `errno()` gives what tapdisk / vhd-util report.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    /// A key that is not 32 or 64 bytes (or a key size other than 256/512 bits).
    #[error("invalid key length {0} (must be 32 or 64 bytes)")]
    KeyLength(usize),
    /// The image has a key hash but no key is available for it: no key directory, no
    /// key file, or no key supplied (ENOKEY).
    #[error("{}: image is encrypted but no key is available", path.display())]
    NoKey { path: PathBuf },
    /// A key was found (or supplied) but SHA-256(nonce || key) differs from the image's
    /// key hash (ENOKEY).
    #[error("{}: key does not match the image's key hash{}", path.display(),
        keyfile.as_ref().map(|k| format!(" (key file {})", k.display())).unwrap_or_default())]
    KeyMismatch {
        path: PathBuf,
        keyfile: Option<PathBuf>,
    },
    /// A key file exists for an image that has no key hash: refused so that a planted
    /// key cannot turn a plaintext image into an encrypted one (EACCES).
    #[error("{}: key file {} exists but the image has no key hash", path.display(), keyfile.display())]
    KeyWithoutHash { path: PathBuf, keyfile: PathBuf },
    /// An explicit key was supplied but no image of the chain has a key hash (EINVAL).
    #[error("a key was supplied but no image in the chain has a key hash")]
    KeyNotNeeded,
    /// The chosen key file is shorter than the key size (EINVAL).
    #[error("{}: short read: key file holds {len} bytes, {need} needed", path.display())]
    ShortKeyFile { path: PathBuf, len: u64, need: u64 },
    /// `vhd-util key` style read: the file is larger than 512 bytes or changed size.
    #[error("{}: key file is {size} bytes, could read only {read}", path.display())]
    KeyFileSize { path: PathBuf, size: u64, read: u64 },
    /// An I/O error on a key file or key directory (its errno, EIO when it has none).
    #[error("{}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Bad hex text (`-N`, `-H`).
    #[error("invalid hex: {0}")]
    Hex(String),
    /// A key file name that is not `<name>,aes-xts-plain,<512|256>.key`.
    #[error("{}: key file name must end in ,aes-xts-plain,512.key or ,aes-xts-plain,256.key", .0.display())]
    KeyFileName(PathBuf),
    /// A key whose two halves are equal (K1 == K2); never generated.
    #[error("refusing a key whose two halves are equal")]
    WeakKey,
    /// Bad passphrase-derivation parameters.
    #[error("invalid key derivation parameters: {0}")]
    Kdf(&'static str),
}

impl CryptoError {
    /// The positive errno for this error.
    ///
    /// ENOKEY (126) for a missing or mismatching key, EACCES (13) for a key file without
    /// a key hash, the OS errno of an I/O error (EIO if none), EINVAL for everything else.
    pub fn errno(&self) -> i32 {
        match self {
            CryptoError::NoKey { .. } | CryptoError::KeyMismatch { .. } => libc::ENOKEY,
            CryptoError::KeyWithoutHash { .. } => libc::EACCES,
            CryptoError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            CryptoError::KeyLength(_)
            | CryptoError::KeyNotNeeded
            | CryptoError::ShortKeyFile { .. }
            | CryptoError::KeyFileSize { .. }
            | CryptoError::Hex(_)
            | CryptoError::KeyFileName(_)
            | CryptoError::WeakKey
            | CryptoError::Kdf(_) => libc::EINVAL,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errno_mapping() {
        let p = PathBuf::from("/x/a.vhd");
        assert_eq!(CryptoError::NoKey { path: p.clone() }.errno(), 126);
        assert_eq!(
            CryptoError::KeyMismatch {
                path: p.clone(),
                keyfile: None
            }
            .errno(),
            126
        );
        assert_eq!(
            CryptoError::KeyWithoutHash {
                path: p.clone(),
                keyfile: p.clone()
            }
            .errno(),
            13
        );
        assert_eq!(CryptoError::KeyNotNeeded.errno(), libc::EINVAL);
        let io = CryptoError::Io {
            path: p.clone(),
            source: std::io::Error::from_raw_os_error(libc::ENOTDIR),
        };
        assert_eq!(io.errno(), libc::ENOTDIR);
        let io2 = CryptoError::Io {
            path: p,
            source: std::io::Error::other("x"),
        };
        assert_eq!(io2.errno(), libc::EIO);
    }

    #[test]
    fn messages_are_lowercase_without_period() {
        let errs = [
            CryptoError::KeyLength(3).to_string(),
            CryptoError::NoKey {
                path: "a.vhd".into(),
            }
            .to_string(),
            CryptoError::KeyNotNeeded.to_string(),
            CryptoError::WeakKey.to_string(),
        ];
        for e in errs {
            assert!(!e.ends_with('.'), "{e}");
            let first = e.chars().next().unwrap();
            assert!(!first.is_uppercase(), "{e}");
        }
    }
}
