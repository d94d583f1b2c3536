//! The key check value stored in an encrypted VHD, and hex helpers.

use sha2::{Digest, Sha256};

use super::CryptoError;

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

    /// The record `vhd-util key -s` writes for `key`: cookie 1, the given nonce and
    /// SHA-256(nonce || key).
    pub fn for_key(key: &[u8], nonce: &[u8; 32]) -> Self {
        KeyHash {
            cookie: 1,
            nonce: *nonce,
            hash: compute_hash(nonce, key),
        }
    }

    /// Whether this record is set and matches `key` (SHA-256 of nonce || key).
    pub fn matches(&self, key: &[u8]) -> bool {
        self.is_set() && constant_time_eq(&compute_hash(&self.nonce, key), &self.hash)
    }

    /// `vhd-util key -p` output without the newline: `none` unless the cookie is exactly
    /// 1, else `<nonce hex> <hash hex>` (lowercase).
    pub fn print_form(&self) -> String {
        if self.cookie == 1 {
            format!("{} {}", to_hex(&self.nonce), to_hex(&self.hash))
        } else {
            "none".to_string()
        }
    }
}

/// SHA-256(nonce || key): the key hash of OpenXT encrypted VHDs.
pub fn compute_hash(nonce: &[u8; 32], key: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(nonce);
    h.update(key);
    h.finalize().into()
}

fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Lowercase hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

fn nibble(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// Parse exactly `2 * N` hex digits (either case, most significant nibble first), as
/// `vhd-util key -N/-H` do. Anything else (wrong length, other characters, whitespace) is
/// an error.
pub fn parse_hex<const N: usize>(s: &str) -> Result<[u8; N], CryptoError> {
    let v = parse_hex_vec(s)?;
    if v.len() != N {
        return Err(CryptoError::Hex(format!(
            "expected {} hex digits, got {}",
            2 * N,
            s.len()
        )));
    }
    let mut out = [0u8; N];
    out.copy_from_slice(&v);
    Ok(out)
}

/// Parse an even-length string of hex digits (either case) into bytes.
pub fn parse_hex_vec(s: &str) -> Result<Vec<u8>, CryptoError> {
    let b = s.as_bytes();
    if !b.len().is_multiple_of(2) {
        return Err(CryptoError::Hex(format!(
            "odd number of hex digits ({})",
            b.len()
        )));
    }
    b.chunks(2)
        .map(|p| match (nibble(p[0]), nibble(p[1])) {
            (Some(h), Some(l)) => Ok((h << 4) | l),
            _ => Err(CryptoError::Hex(format!(
                "invalid hex digit in {:?}",
                String::from_utf8_lossy(p)
            ))),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_roundtrip_and_case() {
        let v: [u8; 4] = parse_hex("DeadBEEF").unwrap();
        assert_eq!(v, [0xde, 0xad, 0xbe, 0xef]);
        assert_eq!(to_hex(&v), "deadbeef");
        assert!(parse_hex::<4>("deadbee").is_err());
        assert!(parse_hex::<4>("deadbeef00").is_err());
        assert!(parse_hex::<4>("deadbeeg").is_err());
        assert!(parse_hex::<4>(" deadbee").is_err());
        assert!(parse_hex::<4>("+eadbeef").is_err());
        assert_eq!(parse_hex::<2>("zz").unwrap_err().errno(), libc::EINVAL);
    }

    #[test]
    fn keyhash_record_roundtrip() {
        let mut raw = [0u8; KeyHash::LEN];
        for (i, b) in raw.iter_mut().enumerate() {
            *b = i as u8;
        }
        let kh = KeyHash::from_bytes(&raw);
        assert_eq!(kh.cookie, 0);
        assert!(!kh.is_set());
        assert_eq!(kh.nonce[0], 1);
        assert_eq!(kh.hash[31], 64);
        assert_eq!(kh.to_bytes(), raw);
        assert_eq!(kh.print_form(), "none");
        let kh2 = KeyHash { cookie: 2, ..kh };
        assert!(kh2.is_set());
        assert_eq!(kh2.print_form(), "none");
    }

    #[test]
    fn matches_requires_cookie_and_hash() {
        let key = [3u8; 32];
        let kh = KeyHash::for_key(&key, &[9u8; 32]);
        assert!(kh.matches(&key));
        assert!(!kh.matches(&[4u8; 32]));
        assert!(!KeyHash { cookie: 0, ..kh }.matches(&key));
        let mut bad = kh;
        bad.hash[5] ^= 1;
        assert!(!bad.matches(&key));
        assert_eq!(
            kh.print_form(),
            format!("{} {}", "09".repeat(32), to_hex(&kh.hash))
        );
    }
}
