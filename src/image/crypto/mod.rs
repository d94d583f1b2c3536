//! OpenXT encrypted VHD: AES-XTS per 512-byte sector, key hashes and key files.
//!
//! SKELETON: the API below is the contract the VHD engine codes against; the crypto
//! work (issue 3) replaces the bodies and adds key lookup and resolution.

use zeroize::Zeroizing;

/// Errors of key handling and encryption. `errno()` gives what tapdisk reports.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("invalid key length {0} (must be 32 or 64 bytes)")]
    KeyLength(usize),
}

impl CryptoError {
    /// The positive errno for this error (ENOKEY, EACCES, EINVAL, ...).
    pub fn errno(&self) -> i32 {
        match self {
            CryptoError::KeyLength(_) => libc::EINVAL,
        }
    }
}

/// The 65-byte key check value stored in the batmap header (offsets 29..94) or the
/// `user.com.citrix.xenclient.backend.keyhash` xattr.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct KeyHash {
    /// 1 = set (readers treat any non-zero value as set).
    pub cookie: u8,
    pub nonce: [u8; 32],
    /// SHA-256(nonce || key).
    pub hash: [u8; 32],
}

impl KeyHash {
    /// Size of the on-disk record.
    pub const LEN: usize = 65;

    /// Whether the record marks the image as keyed.
    pub fn is_set(&self) -> bool {
        self.cookie != 0
    }

    /// Decode the 65-byte on-disk record.
    pub fn from_bytes(b: &[u8; Self::LEN]) -> Self {
        let mut nonce = [0u8; 32];
        let mut hash = [0u8; 32];
        nonce.copy_from_slice(&b[1..33]);
        hash.copy_from_slice(&b[33..65]);
        KeyHash {
            cookie: b[0],
            nonce,
            hash,
        }
    }

    /// Encode the 65-byte on-disk record.
    pub fn to_bytes(&self) -> [u8; Self::LEN] {
        let mut b = [0u8; Self::LEN];
        b[0] = self.cookie;
        b[1..33].copy_from_slice(&self.nonce);
        b[33..65].copy_from_slice(&self.hash);
        b
    }
}

/// Raw key bytes (32 = AES-128-XTS, 64 = AES-256-XTS), zeroed on drop.
pub type KeyBytes = Zeroizing<Vec<u8>>;

/// AES-XTS with blktap's "plain" tweak: the low 32 bits of the virtual sector number,
/// little-endian, zero-padded to 16 bytes. Each 512-byte sector is one data unit.
#[derive(Clone)]
pub struct XtsCipher {
    _key: KeyBytes,
}

impl std::fmt::Debug for XtsCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("XtsCipher { .. }")
    }
}

impl XtsCipher {
    /// Build a cipher from a 32- or 64-byte key.
    pub fn new(key: &[u8]) -> Result<Self, CryptoError> {
        match key.len() {
            32 | 64 => Ok(XtsCipher {
                _key: Zeroizing::new(key.to_vec()),
            }),
            n => Err(CryptoError::KeyLength(n)),
        }
    }

    /// Encrypt whole sectors in place; `data[0..512]` is virtual sector `first_lba`.
    pub fn encrypt_sectors(&self, _first_lba: u64, _data: &mut [u8]) {
        unimplemented!("issue 3")
    }

    /// Decrypt whole sectors in place; `data[0..512]` is virtual sector `first_lba`.
    pub fn decrypt_sectors(&self, _first_lba: u64, _data: &mut [u8]) {
        unimplemented!("issue 3")
    }
}

/// Where the keys of a chain come from.
#[derive(Clone, Debug, Default)]
pub enum KeySource {
    /// No key: every image must be plaintext (a set keyhash is an error).
    #[default]
    None,
    /// OpenXT key directories (`TAPDISK3_CRYPTO_KEYDIR`, comma-separated), searched per image.
    Dirs(Vec<std::path::PathBuf>),
    /// A key handed over by the caller (tap-ctl open -E); applies to every keyed image.
    Explicit(KeyBytes),
}

/// One image of a chain as the key walk sees it (leaf first).
#[derive(Clone, Debug)]
pub struct KeyWalkEntry {
    /// The path as opened (leaf) or as produced by parent-locator resolution (parents);
    /// not canonicalised: key files are named after this path's basename.
    pub path: std::path::PathBuf,
    /// The image's keyhash (all zero for images without one).
    pub keyhash: KeyHash,
    /// A raw image (never keyed, ends the walk).
    pub is_raw: bool,
}

/// For each entry of `chain` (leaf first), the cipher its data is encrypted with
/// (`None` = plaintext). SKELETON: only the all-plaintext case; issue 3 fills in the rest.
pub fn resolve_chain_keys(
    chain: &[KeyWalkEntry],
    _source: &KeySource,
) -> Result<Vec<Option<std::sync::Arc<XtsCipher>>>, CryptoError> {
    if chain.iter().any(|e| e.keyhash.is_set()) {
        return Err(CryptoError::KeyLength(0));
    }
    Ok(vec![None; chain.len()])
}
