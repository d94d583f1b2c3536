//! XTS-AES (IEEE 1619) over aes 0.9's multi-block API.
//!
//! The data path is batched: for a chunk of up to [`CHUNK_SECTORS`] sectors, all the
//! sectors' initial tweaks are encrypted with K2 in one `encrypt_blocks` call, the tweaks
//! are expanded by GF(2^128) doubling (four independent lanes) into a per-thread scratch
//! array and XORed into the data, then one `encrypt_blocks`/`decrypt_blocks` call with K1
//! runs over every block of the chunk (letting the runtime-selected VAES-512/VAES-256/
//! AES-NI backend pipeline 64, 30 or 8 blocks at a time), and finally the stored tweaks
//! are XORed in again. Chunks stay at 8 KiB so the data and the tweak scratch stay in L1.
//!
//! Performance note: aes 0.9's backends only inline their block helpers into this loop
//! when the crate is built with one codegen unit (`[profile.release] codegen-units = 1`);
//! with the default 16 the same code runs at roughly 0.6x.

use std::cell::RefCell;

use aes::cipher::array::Array;
use aes::cipher::consts::U16;
use aes::cipher::{BlockCipherDecrypt, BlockCipherEncrypt, KeyInit};
use aes::{Aes128, Aes128Enc, Aes256, Aes256Enc, Block};

use super::CryptoError;
use crate::SECTOR_SIZE;

/// AES blocks per data unit (one virtual-disk sector, [`SECTOR_SIZE`]).
const BLOCKS_PER_SECTOR: usize = SECTOR_SIZE as usize / 16;
/// Sectors processed per batch (8 KiB of data plus 8 KiB of tweaks: fits in L1).
pub const CHUNK_SECTORS: usize = 16;
/// AES blocks per batch.
const CHUNK_BLOCKS: usize = CHUNK_SECTORS * BLOCKS_PER_SECTOR;

thread_local! {
    /// Per-thread tweak scratch: avoids zero-filling 8 KiB of stack on every call.
    /// Holds only tweak values (E_K2(sector) multiples), never key material.
    static SCRATCH: RefCell<[u128; CHUNK_BLOCKS]> = const { RefCell::new([0u128; CHUNK_BLOCKS]) };
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dir {
    Encrypt,
    Decrypt,
}

/// Multiply a tweak by x in GF(2^128), IEEE 1619 little-endian convention
/// (byte 0 is the least significant byte; reduction polynomial x^128 + x^7 + x^2 + x + 1).
#[inline(always)]
fn mul_x(t: u128) -> u128 {
    let carry = (((t as i128) >> 127) as u128) & 0x87;
    (t << 1) ^ carry
}

#[inline(always)]
fn block_to_u128(b: &Block) -> u128 {
    u128::from_le_bytes(b.0)
}

#[inline(always)]
fn xor_block(b: &mut Block, t: u128) {
    b.0 = (u128::from_le_bytes(b.0) ^ t).to_le_bytes();
}

/// Tweak lanes advanced in parallel: block j of a run uses lane j % LANES, and each lane
/// steps by x^LANES, so the doubling chain is LANES independent dependency chains.
const LANES: usize = 4;

/// Fill `scratch` with the tweaks of a run of consecutive blocks starting at tweak `t`
/// (t, t*x, t*x^2, ...); returns the tweak after the last one.
///
/// The doubling is done in LANES independent lanes, each stepping by x^LANES (lane halves
/// kept as separate u64s), so the serial dependency chain is a quarter as long as with
/// one doubling per block.
#[inline(always)]
fn gen_tweaks(scratch: &mut [u128], t: u128) -> u128 {
    let mut lo = [0u64; LANES];
    let mut hi = [0u64; LANES];
    let mut x = t;
    for k in 0..LANES {
        lo[k] = x as u64;
        hi[k] = (x >> 64) as u64;
        x = mul_x(x);
    }
    let full = scratch.len() - scratch.len() % LANES;
    let (head, tail) = scratch.split_at_mut(full);
    for sc in head.chunks_exact_mut(LANES) {
        for k in 0..LANES {
            sc[k] = (lo[k] as u128) | ((hi[k] as u128) << 64);
        }
        for k in 0..LANES {
            // Multiply by x^LANES: the LANES bits shifted out (c) fold back as the
            // carry-less product c * (x^7 + x^2 + x + 1).
            let c = hi[k] >> (64 - LANES);
            hi[k] = (hi[k] << LANES) | (lo[k] >> (64 - LANES));
            lo[k] = (lo[k] << LANES) ^ c ^ (c << 1) ^ (c << 2) ^ (c << 7);
        }
    }
    // Fewer than LANES blocks left: continue serially from lane 0's tweak.
    let mut t = (lo[0] as u128) | ((hi[0] as u128) << 64);
    for s in tail.iter_mut() {
        *s = t;
        t = mul_x(t);
    }
    t
}

/// XOR the tweaks in `scratch` into the blocks, reading from `src` when given.
#[inline(always)]
fn whiten(blocks: &mut [Block], src: Option<&[Block]>, scratch: &[u128]) {
    match src {
        None => unwhiten(blocks, scratch),
        Some(src) => {
            for ((b, i), s) in blocks.iter_mut().zip(src).zip(scratch) {
                b.0 = (block_to_u128(i) ^ *s).to_le_bytes();
            }
        }
    }
}

/// Pass 3: XOR the stored tweaks in again.
#[inline(always)]
fn unwhiten(blocks: &mut [Block], scratch: &[u128]) {
    for (b, s) in blocks.iter_mut().zip(scratch) {
        xor_block(b, *s);
    }
}

/// The two key schedules of one XTS key.
#[derive(Clone)]
enum Keys {
    A128 { data: Aes128, tweak: Aes128Enc },
    A256 { data: Aes256, tweak: Aes256Enc },
}

/// AES-XTS with blktap's "plain" tweak: the low 32 bits of the virtual sector number,
/// little-endian, zero-padded to 16 bytes. Each 512-byte sector is one data unit.
///
/// A 32-byte key gives XTS-AES-128, a 64-byte key XTS-AES-256; the first half is K1
/// (data), the second half K2 (tweak). The key bytes themselves are not kept; the AES key
/// schedules are wiped on drop (aes `zeroize` feature). `Debug` prints no key material.
#[derive(Clone)]
pub struct XtsCipher {
    keys: Keys,
    key_len: usize,
    equal_halves: bool,
}

impl std::fmt::Debug for XtsCipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XtsCipher")
            .field("key_bits", &(self.key_len * 8))
            .finish_non_exhaustive()
    }
}

/// Build a 16- or 32-byte AES key array from a slice of the right length.
fn key_array<const N: usize>(half: &[u8]) -> zeroize::Zeroizing<[u8; N]> {
    let mut a = zeroize::Zeroizing::new([0u8; N]);
    a.copy_from_slice(half);
    a
}

impl XtsCipher {
    /// Build a cipher from a 32-byte (XTS-AES-128) or 64-byte (XTS-AES-256) key.
    ///
    /// Keys whose two halves are equal are accepted (old OpenXT images were keyed on
    /// OpenSSL 1.0, which did not refuse them); see [`XtsCipher::has_equal_halves`] and
    /// [`super::generate_key`], which never produces one.
    pub fn new(key: &[u8]) -> Result<Self, CryptoError> {
        let half = key.len() / 2;
        let keys = match key.len() {
            32 => {
                let k1 = key_array::<16>(&key[..half]);
                let k2 = key_array::<16>(&key[half..]);
                Keys::A128 {
                    data: Aes128::new(&Array::from(*k1)),
                    tweak: Aes128Enc::new(&Array::from(*k2)),
                }
            }
            64 => {
                let k1 = key_array::<32>(&key[..half]);
                let k2 = key_array::<32>(&key[half..]);
                Keys::A256 {
                    data: Aes256::new(&Array::from(*k1)),
                    tweak: Aes256Enc::new(&Array::from(*k2)),
                }
            }
            n => return Err(CryptoError::KeyLength(n)),
        };
        Ok(XtsCipher {
            keys,
            key_len: key.len(),
            equal_halves: key[..half] == key[half..],
        })
    }

    /// Key size in bits as used in key file names (256 = XTS-AES-128, 512 = XTS-AES-256).
    pub fn key_bits(&self) -> u32 {
        (self.key_len * 8) as u32
    }

    /// Whether K1 == K2 (a weak key modern OpenSSL refuses; accepted here for old images).
    pub fn has_equal_halves(&self) -> bool {
        self.equal_halves
    }

    /// Encrypt whole sectors in place; `data[0..512]` is virtual sector `first_lba`.
    ///
    /// `data.len()` must be a multiple of 512 (debug-asserted); a trailing partial sector
    /// is left untouched.
    pub fn encrypt_sectors(&self, first_lba: u64, data: &mut [u8]) {
        self.crypt_sectors(first_lba, None, data, Dir::Encrypt);
    }

    /// Decrypt whole sectors in place; `data[0..512]` is virtual sector `first_lba`.
    ///
    /// Same length rule as [`XtsCipher::encrypt_sectors`].
    pub fn decrypt_sectors(&self, first_lba: u64, data: &mut [u8]) {
        self.crypt_sectors(first_lba, None, data, Dir::Decrypt);
    }

    /// Encrypt whole sectors from `src` into `dst` (a bounce buffer for the write path),
    /// leaving `src` untouched; `src[0..512]` is virtual sector `first_lba`.
    ///
    /// Both lengths must be equal multiples of 512 (debug-asserted); only the common
    /// whole sectors are processed.
    pub fn encrypt_sectors_to(&self, first_lba: u64, src: &[u8], dst: &mut [u8]) {
        self.crypt_sectors_to(first_lba, src, dst, Dir::Encrypt);
    }

    /// Decrypt whole sectors from `src` into `dst`; see [`XtsCipher::encrypt_sectors_to`].
    pub fn decrypt_sectors_to(&self, first_lba: u64, src: &[u8], dst: &mut [u8]) {
        self.crypt_sectors_to(first_lba, src, dst, Dir::Decrypt);
    }

    /// `src` → `dst` in direction `dir`, over the length both have.
    fn crypt_sectors_to(&self, first_lba: u64, src: &[u8], dst: &mut [u8], dir: Dir) {
        debug_assert_eq!(
            src.len(),
            dst.len(),
            "source and destination lengths differ"
        );
        let n = src.len().min(dst.len());
        self.crypt_sectors(first_lba, Some(&src[..n]), &mut dst[..n], dir);
    }

    /// General XTS encryption of one data unit (any whole number of 16-byte blocks, no
    /// ciphertext stealing) under a full 128-bit tweak, as IEEE 1619 defines it. The
    /// tweak is the data unit sequence number as 16 little-endian bytes.
    ///
    /// `unit.len()` must be a multiple of 16 (debug-asserted); a trailing partial block is
    /// left untouched.
    pub fn encrypt_unit(&self, tweak: &[u8; 16], unit: &mut [u8]) {
        self.crypt_unit(tweak, unit, Dir::Encrypt);
    }

    /// General XTS decryption of one data unit; see [`XtsCipher::encrypt_unit`].
    pub fn decrypt_unit(&self, tweak: &[u8; 16], unit: &mut [u8]) {
        self.crypt_unit(tweak, unit, Dir::Decrypt);
    }

    fn crypt_sectors(&self, first_lba: u64, src: Option<&[u8]>, data: &mut [u8], dir: Dir) {
        debug_assert!(
            data.len().is_multiple_of(SECTOR_SIZE as usize),
            "XTS sector buffer of {} bytes is not whole sectors",
            data.len()
        );
        let whole = data.len() - data.len() % SECTOR_SIZE as usize;
        let (blocks, _) = Array::<u8, U16>::slice_as_chunks_mut(&mut data[..whole]);
        let src = src.map(|s| Array::<u8, U16>::slice_as_chunks(&s[..whole]).0);
        match &self.keys {
            Keys::A128 { data, tweak } => plain_sectors(data, tweak, first_lba, src, blocks, dir),
            Keys::A256 { data, tweak } => plain_sectors(data, tweak, first_lba, src, blocks, dir),
        }
    }

    fn crypt_unit(&self, tweak: &[u8; 16], unit: &mut [u8], dir: Dir) {
        debug_assert!(
            unit.len().is_multiple_of(16),
            "XTS data unit is not whole blocks"
        );
        let (blocks, _) = Array::<u8, U16>::slice_as_chunks_mut(unit);
        let mut t = Block::from(*tweak);
        match &self.keys {
            Keys::A128 { data, tweak } => {
                tweak.encrypt_block(&mut t);
                general_unit(data, block_to_u128(&t), blocks, dir)
            }
            Keys::A256 { data, tweak } => {
                tweak.encrypt_block(&mut t);
                general_unit(data, block_to_u128(&t), blocks, dir)
            }
        }
    }
}

#[inline(always)]
fn run_data_key<D>(data_key: &D, blocks: &mut [Block], dir: Dir)
where
    D: BlockCipherEncrypt<BlockSize = U16> + BlockCipherDecrypt<BlockSize = U16>,
{
    match dir {
        Dir::Encrypt => data_key.encrypt_blocks(blocks),
        Dir::Decrypt => data_key.decrypt_blocks(blocks),
    }
}

/// Sector-per-data-unit XTS with the 32-bit "plain" tweak, batched by chunks.
fn plain_sectors<D, T>(
    data_key: &D,
    tweak_key: &T,
    first_lba: u64,
    src: Option<&[Block]>,
    blocks: &mut [Block],
    dir: Dir,
) where
    D: BlockCipherEncrypt<BlockSize = U16> + BlockCipherDecrypt<BlockSize = U16>,
    T: BlockCipherEncrypt<BlockSize = U16>,
{
    SCRATCH.with_borrow_mut(|scratch| {
        let mut tweaks = [Block::default(); CHUNK_SECTORS];
        let mut lba = first_lba;
        for (ci, chunk) in blocks.chunks_mut(CHUNK_BLOCKS).enumerate() {
            let nsec = chunk.len() / BLOCKS_PER_SECTOR;
            for (i, t) in tweaks[..nsec].iter_mut().enumerate() {
                // "plain": low 32 bits of the virtual sector, little-endian, then zeros.
                let plain = lba.wrapping_add(i as u64) as u32;
                let mut iv = [0u8; 16];
                iv[..4].copy_from_slice(&plain.to_le_bytes());
                *t = Block::from(iv);
            }
            tweak_key.encrypt_blocks(&mut tweaks[..nsec]);
            let csrc = src.map(|s| &s[ci * CHUNK_BLOCKS..][..chunk.len()]);
            for (s, t0) in tweaks[..nsec].iter().enumerate() {
                let r = s * BLOCKS_PER_SECTOR..(s + 1) * BLOCKS_PER_SECTOR;
                gen_tweaks(&mut scratch[r], block_to_u128(t0));
            }
            whiten(chunk, csrc, &scratch[..chunk.len()]);
            run_data_key(data_key, chunk, dir);
            unwhiten(chunk, &scratch[..chunk.len()]);
            lba = lba.wrapping_add(nsec as u64);
        }
    })
}

/// One data unit of any length under an already-encrypted initial tweak `t`.
fn general_unit<D>(data_key: &D, mut t: u128, blocks: &mut [Block], dir: Dir)
where
    D: BlockCipherEncrypt<BlockSize = U16> + BlockCipherDecrypt<BlockSize = U16>,
{
    SCRATCH.with_borrow_mut(|scratch| {
        for chunk in blocks.chunks_mut(CHUNK_BLOCKS) {
            t = gen_tweaks(&mut scratch[..chunk.len()], t);
            whiten(chunk, None, &scratch[..chunk.len()]);
            run_data_key(data_key, chunk, dir);
            unwhiten(chunk, &scratch[..chunk.len()]);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        super::super::parse_hex_vec(s).unwrap()
    }

    #[test]
    fn gen_tweaks_matches_serial_for_every_length() {
        for n in 0..40usize {
            let t0 = 0xfedc_ba98_7654_3210_8f1e_2d3c_4b5a_6978u128;
            let mut scratch = vec![0u128; n];
            let next = gen_tweaks(&mut scratch, t0);
            let mut t = t0;
            for (j, s) in scratch.iter().enumerate() {
                assert_eq!(*s, t, "n {n} block {j}");
                t = mul_x(t);
            }
            assert_eq!(next, t, "n {n}");
        }
    }

    #[test]
    fn mul_x_matches_bytewise_doubling() {
        // Byte-wise reference: shift left across the 16 little-endian bytes, carry out of
        // byte 15 folds back as 0x87 into byte 0.
        let mut x = [0u8; 16];
        for (i, b) in x.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(37).wrapping_add(200);
        }
        let mut t = u128::from_le_bytes(x);
        for _ in 0..300 {
            let mut carry = 0u8;
            for b in x.iter_mut() {
                let next = *b >> 7;
                *b = (*b << 1) | carry;
                carry = next;
            }
            if carry != 0 {
                x[0] ^= 0x87;
            }
            t = mul_x(t);
            assert_eq!(t.to_le_bytes(), x);
        }
    }

    #[test]
    fn ieee1619_vector1_general_and_plain() {
        let c = XtsCipher::new(&[0u8; 32]).unwrap();
        let mut d = [0u8; 32];
        c.encrypt_unit(&[0u8; 16], &mut d);
        assert_eq!(
            d.to_vec(),
            hex("917cf69ebd68b2ec9b9fe9a3eadda692cd43d2f59598ed858c02c2652fbf922e")
        );
        // A 512-byte sector at LBA 0 starts with the same two blocks.
        let mut s = [0u8; 512];
        c.encrypt_sectors(0, &mut s);
        assert_eq!(&s[..32], &d[..]);
        c.decrypt_sectors(0, &mut s);
        assert_eq!(s, [0u8; 512]);
    }

    #[test]
    fn rejects_bad_key_lengths() {
        for n in [0usize, 16, 31, 33, 48, 63, 65, 128] {
            let e = XtsCipher::new(&vec![1u8; n]).unwrap_err();
            assert!(matches!(e, CryptoError::KeyLength(m) if m == n));
            assert_eq!(e.errno(), libc::EINVAL);
        }
    }

    #[test]
    fn debug_prints_no_key() {
        let key: Vec<u8> = (0xa0u8..0xe0).collect();
        let c = XtsCipher::new(&key).unwrap();
        let s = format!("{c:?}");
        assert!(s.contains("512"), "{s}");
        assert!(!s.to_lowercase().contains("a0a1"), "{s}");
        assert!(!s.contains("160"), "{s}");
    }

    #[test]
    fn equal_halves_detected_and_usable() {
        let c = XtsCipher::new(&[7u8; 32]).unwrap();
        assert!(c.has_equal_halves());
        let mut d = [0x5au8; 1024];
        c.encrypt_sectors(9, &mut d);
        assert_ne!(d, [0x5au8; 1024]);
        c.decrypt_sectors(9, &mut d);
        assert_eq!(d, [0x5au8; 1024]);
        let mut k = [7u8; 64];
        k[63] = 8;
        assert!(!XtsCipher::new(&k).unwrap().has_equal_halves());
    }

    #[test]
    fn plain_tweak_wraps_at_2_pow_32_and_crosses_chunks() {
        // 40 sectors (more than two chunks) starting just below the 32-bit wrap.
        let c = XtsCipher::new(&(0u8..64).collect::<Vec<_>>()).unwrap();
        let base = (1u64 << 32) - 20;
        let mut big = vec![0u8; 40 * 512];
        for (i, b) in big.iter_mut().enumerate() {
            *b = (i * 7 + 3) as u8;
        }
        let plain = big.clone();
        c.encrypt_sectors(base, &mut big);
        for s in 0..40u64 {
            let mut one = plain[s as usize * 512..][..512].to_vec();
            // Same result as encrypting the sector alone with the truncated LBA.
            c.encrypt_sectors((base + s) & 0xffff_ffff, &mut one);
            assert_eq!(&big[s as usize * 512..][..512], &one[..], "sector {s}");
            // And as the general primitive with the 32-bit tweak.
            let mut g = plain[s as usize * 512..][..512].to_vec();
            let mut tw = [0u8; 16];
            tw[..4].copy_from_slice(&((base + s) as u32).to_le_bytes());
            c.encrypt_unit(&tw, &mut g);
            assert_eq!(g, one);
        }
        let mut out = vec![0u8; big.len()];
        c.decrypt_sectors_to(base, &big, &mut out);
        assert_eq!(out, plain);
        let mut out2 = vec![0u8; big.len()];
        c.encrypt_sectors_to(base, &plain, &mut out2);
        assert_eq!(out2, big);
    }
}
