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
