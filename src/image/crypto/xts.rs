//! XTS-AES (IEEE 1619) over aes 0.9's backend API.
//!
//! The data path is batched per chunk of sectors (one chunk for requests of up to 8
//! sectors, [`CHUNK_SECTORS`] otherwise): the sectors' first tweaks are encrypted with K2
//! in one `encrypt_blocks` call, then the whole XTS loop over the chunk runs inside one
//! `encrypt_with_backend`/`decrypt_with_backend` closure of K1. The closure is generic
//! over the backend the aes crate picks at run time (VAES-512, VAES-256 or AES-NI, with
//! 64, 30 or 8 blocks per parallel call) and is inlined into that backend's
//! target-feature function, so the tweak arithmetic and the XORs are compiled for the same
//! vector width as the cipher (AVX-512 on a VAES-512 CPU, although the shipped build
//! targets a generic x86-64 or i686). Per parallel batch the tweaks are computed directly
//! (t0 * x^j: two shifts and a fold each, no serial doubling chain), XORed in, the batch
//! is encrypted in place and the tweaks are XORed in again while it is still in L1. A
//! last, shorter batch goes through a zero-padded copy, sector by sector with fixed-size
//! loops when the batch width is whole sectors (a single 512-byte sector on VAES-512).
//!
//! Performance note: aes 0.9's backends only inline their block loads and stores into
//! this loop when the crate is built with one codegen unit (`[profile.release]
//! codegen-units = 1`); with the default 16 the same code runs at roughly 0.3x (512 B)
//! to 0.6x (64 KiB).

use aes::cipher::array::{Array, ArraySize};
use aes::cipher::consts::{U16, U32};
use aes::cipher::typenum::Unsigned;
use aes::cipher::{
    BlockCipherDecBackend, BlockCipherDecClosure, BlockCipherDecrypt, BlockCipherEncBackend,
    BlockCipherEncClosure, BlockCipherEncrypt, BlockSizeUser, KeyInit,
};
use aes::{Aes128, Aes128Enc, Aes256, Aes256Enc, Block};

use super::CryptoError;
use crate::SECTOR_SIZE;

/// AES blocks per data unit (one virtual-disk sector, [`SECTOR_SIZE`]).
const BLOCKS_PER_SECTOR: usize = SECTOR_SIZE as usize / 16;
/// Sectors per call into the cipher backend for requests of more than 8 sectors: their
/// first tweaks are encrypted with K2 in one call (64 blocks: one VAES-512 batch), then
/// the data of all of them in one more. Requests of 1 and of 2..=8 sectors are one chunk.
pub const CHUNK_SECTORS: usize = 64;

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

/// XOR the tweaks in `scratch` into the blocks.
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

/// One AES key's parallel-block operation, as the runtime-selected backend gives it.
///
/// Implemented for the encryption and decryption backends handed to the closures below;
/// the XTS loop ([`xts_sectors`]) is written once over this trait so that it is compiled
/// inside the backend's target-feature context (VAES-512, VAES-256 or AES-NI), where its
/// tweak arithmetic and XORs may use the same vector width as the cipher.
trait ParCrypt {
    /// Blocks per parallel call (64 for VAES-512, 30 for VAES-256, 8 for AES-NI).
    type P: ArraySize;
    fn par(&self, blocks: &mut Array<Block, Self::P>);
}

struct EncPar<'a, B>(&'a B);
struct DecPar<'a, B>(&'a B);

impl<B: BlockCipherEncBackend<BlockSize = U16>> ParCrypt for EncPar<'_, B> {
    type P = B::ParBlocksSize;
    #[inline(always)]
    fn par(&self, blocks: &mut Array<Block, Self::P>) {
        self.0.encrypt_par_blocks_inplace(blocks);
    }
}

impl<B: BlockCipherDecBackend<BlockSize = U16>> ParCrypt for DecPar<'_, B> {
    type P = B::ParBlocksSize;
    #[inline(always)]
    fn par(&self, blocks: &mut Array<Block, Self::P>) {
        self.0.decrypt_par_blocks_inplace(blocks);
    }
}

/// The data-key pass over a run of whole sectors, given their encrypted first tweaks.
struct SectorJob<'a> {
    /// E_K2(plain tweak) of each sector of `dst`, in order.
    t0: &'a [Block],
    /// Source blocks (same length as `dst`); `None` works in place.
    src: Option<&'a [Block]>,
    dst: &'a mut [Block],
}

impl BlockSizeUser for SectorJob<'_> {
    type BlockSize = U16;
}

impl BlockCipherEncClosure for SectorJob<'_> {
    #[inline(always)]
    fn call<B: BlockCipherEncBackend<BlockSize = U16>>(self, backend: &B) {
        xts_sectors(&EncPar(backend), self.t0, self.src, self.dst);
    }
}

struct DecJob<'a>(SectorJob<'a>);

impl BlockSizeUser for DecJob<'_> {
    type BlockSize = U16;
}

impl BlockCipherDecClosure for DecJob<'_> {
    #[inline(always)]
    fn call<B: BlockCipherDecBackend<BlockSize = U16>>(self, backend: &B) {
        xts_sectors(&DecPar(backend), self.0.t0, self.0.src, self.0.dst);
    }
}

/// Reduction of the bits `c` shifted out of the top of a tweak (c < 2^32): c times
/// x^7 + x^2 + x + 1, carry-less; fits in the low word.
#[inline(always)]
fn fold(c: u64) -> u64 {
    c ^ (c << 1) ^ (c << 2) ^ (c << 7)
}

/// Tweaks of blocks `first..first + out.len()` of a run of sectors whose encrypted first
/// tweaks are `t0`: block j of sector s gets t0[s] * x^j (j < 32), each computed directly
/// (two shifts and a fold) so that there is no serial doubling chain to wait on.
#[inline(always)]
fn fill_tweaks(out: &mut [Block], t0: &[Block], first: usize) {
    let mut i = 0;
    while i < out.len() {
        let g = first + i;
        let (s, j0) = (g / BLOCKS_PER_SECTOR, g % BLOCKS_PER_SECTOR);
        let n = (BLOCKS_PER_SECTOR - j0).min(out.len() - i);
        let t = block_to_u128(&t0[s]);
        let (l, h) = (t as u64, (t >> 64) as u64);
        for (k, o) in out[i..i + n].iter_mut().enumerate() {
            let j = (j0 + k) as u32;
            // (x >> 1) >> (63 - j) is x >> (64 - j), and 0 for j == 0.
            let lo = (l << j) ^ fold((h >> 1) >> (63 - j));
            let hi = (h << j) | ((l >> 1) >> (63 - j));
            o.0[..8].copy_from_slice(&lo.to_le_bytes());
            o.0[8..].copy_from_slice(&hi.to_le_bytes());
        }
        i += n;
    }
}

#[inline(always)]
fn flat(b: &[Block]) -> &[u8] {
    Array::slice_as_flattened(b)
}

#[inline(always)]
fn flat_mut(b: &mut [Block]) -> &mut [u8] {
    Array::slice_as_flattened_mut(b)
}

/// `d ^= t`, bytewise (the compiler vectorizes it to the widest registers available).
#[inline(always)]
fn xor_assign(d: &mut [Block], t: &[Block]) {
    for (x, y) in flat_mut(d).iter_mut().zip(flat(t)) {
        *x ^= *y;
    }
}

/// `d = s ^ t`, bytewise.
#[inline(always)]
fn xor_from(d: &mut [Block], s: &[Block], t: &[Block]) {
    for ((x, y), z) in flat_mut(d).iter_mut().zip(flat(s)).zip(flat(t)) {
        *x = *y ^ *z;
    }
}

/// XTS over whole sectors with one parallel call per `C::P` blocks: the tweaks of a batch
/// are computed, XORed in, the batch goes through the cipher in place, and the tweaks are
/// XORed in again. A last batch shorter than `C::P` goes through a padded copy.
#[inline(always)]
fn xts_sectors<C: ParCrypt>(c: &C, t0: &[Block], src: Option<&[Block]>, dst: &mut [Block]) {
    let p = C::P::USIZE;
    let mut tw: Array<Block, C::P> = Array::default();
    let (full, tail) = Array::<Block, C::P>::slice_as_chunks_mut(dst);
    let mut base = 0;
    for d in full.iter_mut() {
        fill_tweaks(&mut tw, t0, base);
        match src {
            Some(s) => xor_from(d, &s[base..base + p], &tw),
            None => xor_assign(d, &tw),
        }
        c.par(d);
        xor_assign(d, &tw);
        base += p;
    }
    if tail.is_empty() {
        return;
    }
    let m = tail.len();
    let mut buf: Array<Block, C::P> = Array::default();
    if p % BLOCKS_PER_SECTOR == 0 {
        // The tail is whole sectors (the batches before it were): fixed-size loops per
        // sector, so that loads and stores keep one width (no store-forwarding stalls).
        let first = base / BLOCKS_PER_SECTOR;
        let (tws, _) = Array::<Block, U32>::slice_as_chunks_mut(&mut tw);
        let (ds, _) = Array::<Block, U32>::slice_as_chunks_mut(tail);
        let srcs = src.map(|s| Array::<Block, U32>::slice_as_chunks(&s[base..]).0);
        let (bufs, _) = Array::<Block, U32>::slice_as_chunks_mut(&mut buf);
        for (k, ((t, b), d)) in tws
            .iter_mut()
            .zip(bufs.iter_mut())
            .zip(ds.iter())
            .enumerate()
        {
            fill_tweaks(t, &t0[first + k..first + k + 1], 0);
            match srcs {
                Some(s) => xor_from(b, &s[k], t),
                None => xor_from(b, d, t),
            }
        }
        c.par(&mut buf);
        let (bufs, _) = Array::<Block, U32>::slice_as_chunks(&buf);
        for ((t, b), d) in tws.iter().zip(bufs.iter()).zip(ds.iter_mut()) {
            xor_from(d, b, t);
        }
    } else {
        fill_tweaks(&mut tw[..m], t0, base);
        match src {
            Some(s) => xor_from(&mut buf[..m], &s[base..base + m], &tw[..m]),
            None => xor_from(&mut buf[..m], tail, &tw[..m]),
        }
        c.par(&mut buf);
        xor_from(tail, &buf[..m], &tw[..m]);
    }
}

/// Sector-per-data-unit XTS with the 32-bit "plain" tweak.
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
    // The first-tweak array is sized to the request (clearing a 1 KiB array costs a
    // single-sector request about a fifth of its time).
    match blocks.len() / BLOCKS_PER_SECTOR {
        0 | 1 => plain_chunks::<1, _, _>(data_key, tweak_key, first_lba, src, blocks, dir),
        2..=8 => plain_chunks::<8, _, _>(data_key, tweak_key, first_lba, src, blocks, dir),
        _ => plain_chunks::<CHUNK_SECTORS, _, _>(data_key, tweak_key, first_lba, src, blocks, dir),
    }
}

/// [`plain_sectors`] in chunks of `N` sectors: the chunk's first tweaks in one K2
/// `encrypt_blocks` call, then the chunk in one K1 backend closure.
#[inline(always)]
fn plain_chunks<const N: usize, D, T>(
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
    let mut t0 = [Block::default(); N];
    let mut lba = first_lba;
    for (ci, chunk) in blocks.chunks_mut(N * BLOCKS_PER_SECTOR).enumerate() {
        let nsec = chunk.len() / BLOCKS_PER_SECTOR;
        for (i, t) in t0[..nsec].iter_mut().enumerate() {
            // "plain": low 32 bits of the virtual sector, little-endian, then zeros.
            let plain = lba.wrapping_add(i as u64) as u32;
            *t = Block::from((plain as u128).to_le_bytes());
        }
        tweak_key.encrypt_blocks(&mut t0[..nsec]);
        let job = SectorJob {
            t0: &t0[..nsec],
            src: src.map(|s| &s[ci * N * BLOCKS_PER_SECTOR..][..chunk.len()]),
            dst: chunk,
        };
        match dir {
            Dir::Encrypt => data_key.encrypt_with_backend(job),
            Dir::Decrypt => data_key.decrypt_with_backend(DecJob(job)),
        }
        lba = lba.wrapping_add(nsec as u64);
    }
}

/// Blocks per batch of the general (any-length unit) path.
const UNIT_CHUNK: usize = 64;

/// One data unit of any length under an already-encrypted initial tweak `t`.
fn general_unit<D>(data_key: &D, mut t: u128, blocks: &mut [Block], dir: Dir)
where
    D: BlockCipherEncrypt<BlockSize = U16> + BlockCipherDecrypt<BlockSize = U16>,
{
    let mut scratch = [0u128; UNIT_CHUNK];
    for chunk in blocks.chunks_mut(UNIT_CHUNK) {
        let sc = &mut scratch[..chunk.len()];
        t = gen_tweaks(sc, t);
        unwhiten(chunk, sc);
        match dir {
            Dir::Encrypt => data_key.encrypt_blocks(chunk),
            Dir::Decrypt => data_key.decrypt_blocks(chunk),
        }
        unwhiten(chunk, sc);
    }
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
        // More than two chunks, starting so that the 32-bit wrap falls inside the second.
        let n = 2 * CHUNK_SECTORS as u64 + 9;
        let c = XtsCipher::new(&(0u8..64).collect::<Vec<_>>()).unwrap();
        let base = (1u64 << 32) - (CHUNK_SECTORS as u64 + 3);
        let mut big = vec![0u8; n as usize * 512];
        for (i, b) in big.iter_mut().enumerate() {
            *b = (i * 7 + 3) as u8;
        }
        let plain = big.clone();
        c.encrypt_sectors(base, &mut big);
        for s in 0..n {
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

    /// xorshift64 test data.
    fn rand_bytes(seed: &mut u64, n: usize) -> Vec<u8> {
        (0..n)
            .map(|_| {
                *seed ^= *seed << 13;
                *seed ^= *seed >> 7;
                *seed ^= *seed << 17;
                (*seed >> 24) as u8
            })
            .collect()
    }

    /// Independent reference: the xts-mode crate, one 512-byte data unit per sector,
    /// blktap's plain 32-bit tweak.
    fn reference(key: &[u8], lba: u64, data: &mut [u8], encrypt: bool) {
        let tw = |i: u128| Block::from((lba.wrapping_add(i as u64) as u32 as u128).to_le_bytes());
        let h = key.len() / 2;
        macro_rules! run {
            ($c:ty) => {{
                let x = xts_mode::Xts128::new(
                    <$c>::new_from_slice(&key[..h]).unwrap(),
                    <$c>::new_from_slice(&key[h..]).unwrap(),
                );
                if encrypt {
                    x.encrypt_area(data, 512, 0, tw)
                } else {
                    x.decrypt_area(data, 512, 0, tw)
                }
            }};
        }
        match key.len() {
            32 => run!(Aes128),
            _ => run!(Aes256),
        }
    }

    #[test]
    fn fill_tweaks_matches_doubling_chain_at_any_offset() {
        // First tweaks with the top bits set (every fold path) and a few patterns.
        let t0: Vec<u128> = vec![
            1,
            1 << 127,
            u128::MAX,
            (1 << 127) | 1,
            0xfedc_ba98_7654_3210_8f1e_2d3c_4b5a_6978,
            0x8000_0000_ffff_ffff_0000_0001_8000_0000,
        ];
        let t0b: Vec<Block> = t0.iter().map(|t| Block::from(t.to_le_bytes())).collect();
        let total = t0.len() * BLOCKS_PER_SECTOR;
        let mut want = Vec::with_capacity(total);
        for t in &t0 {
            let mut x = *t;
            for _ in 0..BLOCKS_PER_SECTOR {
                want.push(x);
                x = mul_x(x);
            }
        }
        for first in 0..total {
            for len in [1usize, 7, 8, 30, 32, 33, 64, total] {
                let len = len.min(total - first);
                let mut out = vec![Block::default(); len];
                fill_tweaks(&mut out, &t0b, first);
                for (i, o) in out.iter().enumerate() {
                    assert_eq!(block_to_u128(o), want[first + i], "first {first} i {i}");
                }
            }
        }
    }

    /// A parallel "backend" of any width `P` over the real cipher's one-block calls: runs
    /// the batching of [`xts_sectors`] at the widths of every aes backend (VAES-512 64,
    /// VAES-256 30, AES-NI 8, software 2 or 4) and at odd ones, whichever backend this
    /// CPU selects for the public API.
    struct Width<'a, K, P> {
        key: &'a K,
        encrypt: bool,
        width: std::marker::PhantomData<P>,
    }

    impl<K, P> ParCrypt for Width<'_, K, P>
    where
        K: BlockCipherEncrypt<BlockSize = U16> + BlockCipherDecrypt<BlockSize = U16>,
        P: ArraySize,
    {
        type P = P;
        fn par(&self, blocks: &mut Array<Block, P>) {
            for b in blocks.iter_mut() {
                if self.encrypt {
                    self.key.encrypt_block(b);
                } else {
                    self.key.decrypt_block(b);
                }
            }
        }
    }

    /// `xts_sectors` at width `P`, in place and source-to-destination; both results.
    fn at_width<P: ArraySize, K, T>(
        data_key: &K,
        tweak_key: &T,
        lba: u64,
        input: &[u8],
        encrypt: bool,
    ) -> (Vec<u8>, Vec<u8>)
    where
        K: BlockCipherEncrypt<BlockSize = U16> + BlockCipherDecrypt<BlockSize = U16>,
        T: BlockCipherEncrypt<BlockSize = U16>,
    {
        let nsec = input.len() / 512;
        let mut t0: Vec<Block> = (0..nsec as u64)
            .map(|i| Block::from((lba.wrapping_add(i) as u32 as u128).to_le_bytes()))
            .collect();
        tweak_key.encrypt_blocks(&mut t0);
        let w = Width::<K, P> {
            key: data_key,
            encrypt,
            width: std::marker::PhantomData,
        };
        let mut inplace = input.to_vec();
        xts_sectors(&w, &t0, None, Array::slice_as_chunks_mut(&mut inplace).0);
        let mut out = vec![0u8; input.len()];
        let src = Array::<u8, U16>::slice_as_chunks(input).0;
        xts_sectors(&w, &t0, Some(src), Array::slice_as_chunks_mut(&mut out).0);
        (inplace, out)
    }

    fn check_width<P: ArraySize>() {
        let mut seed = 0x0123_4567_89ab_cdef ^ P::USIZE as u64;
        for klen in [32usize, 64] {
            let key = rand_bytes(&mut seed, klen);
            let c = XtsCipher::new(&key).unwrap();
            for nsec in [1usize, 2, 3, 4, 5, 7, 8, 9, 16, 33] {
                // Start two sectors below the 32-bit wrap: the tweak wraps mid-request.
                let lba = (1u64 << 32) - 2;
                let plain = rand_bytes(&mut seed, nsec * 512);
                let mut want = plain.clone();
                reference(&key, lba, &mut want, true);
                let (enc_in_place, enc_to) = match &c.keys {
                    Keys::A128 { data, tweak } => {
                        at_width::<P, _, _>(data, tweak, lba, &plain, true)
                    }
                    Keys::A256 { data, tweak } => {
                        at_width::<P, _, _>(data, tweak, lba, &plain, true)
                    }
                };
                let what = format!("width {} key {klen} sectors {nsec}", P::USIZE);
                assert!(enc_in_place == want, "encrypt in place, {what}");
                assert!(enc_to == want, "encrypt to, {what}");
                let (dec_in_place, dec_to) = match &c.keys {
                    Keys::A128 { data, tweak } => {
                        at_width::<P, _, _>(data, tweak, lba, &want, false)
                    }
                    Keys::A256 { data, tweak } => {
                        at_width::<P, _, _>(data, tweak, lba, &want, false)
                    }
                };
                assert!(dec_in_place == plain, "decrypt in place, {what}");
                assert!(dec_to == plain, "decrypt to, {what}");
            }
        }
    }

    #[test]
    fn batching_matches_xts_mode_at_every_backend_width() {
        use aes::cipher::consts::{U1, U2, U3, U30, U4, U64, U8, U96};
        check_width::<U1>();
        check_width::<U2>();
        check_width::<U3>();
        check_width::<U4>();
        check_width::<U8>();
        check_width::<U30>();
        check_width::<U32>();
        check_width::<U64>();
        check_width::<U96>();
    }

    #[test]
    fn requests_of_512_bytes_to_1_mib_match_xts_mode() {
        // Through the public API (the backend this CPU selects), at sizes around its
        // batch and chunk boundaries, up to 1 MiB; in place and buffer to buffer.
        let mut seed = 0x5eed_0000_0000_0001u64;
        let sizes = [
            1usize,
            2,
            8,
            31,
            32,
            33,
            CHUNK_SECTORS - 1,
            CHUNK_SECTORS,
            CHUNK_SECTORS + 1,
            127,
            128,
            129,
            2048,
        ];
        for (n, nsec) in sizes.into_iter().enumerate() {
            let klen = if n % 2 == 0 { 64 } else { 32 };
            let key = rand_bytes(&mut seed, klen);
            let c = XtsCipher::new(&key).unwrap();
            let lba = match n % 3 {
                0 => (1u64 << 32) - (nsec as u64 / 2) - 1,
                1 => 0xdead_beef_0000_0000 + n as u64,
                _ => n as u64 * 1000,
            };
            let plain = rand_bytes(&mut seed, nsec * 512);
            let mut want = plain.clone();
            reference(&key, lba, &mut want, true);
            let what = format!("{nsec} sectors at {lba:#x}, {klen}-byte key");
            let mut ours = plain.clone();
            c.encrypt_sectors(lba, &mut ours);
            assert!(ours == want, "encrypt {what}");
            let mut to = vec![0u8; plain.len()];
            c.encrypt_sectors_to(lba, &plain, &mut to);
            assert!(to == want, "encrypt_to {what}");
            c.decrypt_sectors(lba, &mut ours);
            assert!(ours == plain, "decrypt {what}");
            let mut back = vec![0u8; plain.len()];
            c.decrypt_sectors_to(lba, &want, &mut back);
            assert!(back == plain, "decrypt_to {what}");
        }
    }
}
