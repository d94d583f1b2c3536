//! Key files, key directories, the per-image key walk of a chain, key generation and
//! passphrase derivation.

use std::ffi::{OsStr, OsString};
use std::io::Read;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use zeroize::Zeroizing;

use super::{CryptoError, KeyBytes, KeyHash, XtsCipher};

/// Key directory list variable of blktap3 (comma-separated).
pub const KEYDIR_ENV: &str = "TAPDISK3_CRYPTO_KEYDIR";
/// Key directory list variable of blktap2, accepted when [`KEYDIR_ENV`] is unset.
pub const KEYDIR_ENV_LEGACY: &str = "TAPDISK2_CRYPTO_KEYDIR";
/// Key sizes in bits, in search order: all directories at 512, then all at 256.
pub const KEY_SIZES_BITS: [u32; 2] = [512, 256];
/// Largest key file `vhd-util key` reads.
pub const KEY_FILE_MAX: u64 = 512;
/// Default PBKDF2-HMAC-SHA256 iteration count for [`derive_key_from_passphrase`].
pub const PBKDF2_DEFAULT_ITERATIONS: u32 = 600_000;
/// Smallest salt [`derive_key_from_passphrase`] accepts (128 bits, NIST SP 800-132).
pub const PBKDF2_MIN_SALT_LEN: usize = 16;

const CIPHER_TAG: &[u8] = b",aes-xts-plain,";

/// Where the keys of a chain come from.
#[derive(Clone, Default)]
pub enum KeySource {
    /// No key: every image must be plaintext (a set keyhash is an error).
    #[default]
    None,
    /// OpenXT key directories (`TAPDISK3_CRYPTO_KEYDIR`, comma-separated), searched per image.
    Dirs(Vec<PathBuf>),
    /// A key handed over by the caller (tap-ctl open -E); applies to every keyed image.
    Explicit(KeyBytes),
}

impl std::fmt::Debug for KeySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            KeySource::None => f.write_str("None"),
            KeySource::Dirs(d) => f.debug_tuple("Dirs").field(d).finish(),
            KeySource::Explicit(k) => write!(f, "Explicit(<{}-byte key>)", k.len()),
        }
    }
}

impl KeySource {
    /// The key source of a tapdisk process: the directories of `TAPDISK3_CRYPTO_KEYDIR`,
    /// else of `TAPDISK2_CRYPTO_KEYDIR`, else [`KeySource::None`] (no default directory,
    /// as in OpenXT blktap3).
    pub fn from_env() -> KeySource {
        KeySource::from_env_values(
            std::env::var_os(KEYDIR_ENV).as_deref(),
            std::env::var_os(KEYDIR_ENV_LEGACY).as_deref(),
        )
    }

    /// [`KeySource::from_env`] on given variable values (for tests and callers that read
    /// the environment themselves). A set but empty variable gives `Dirs(vec![])`, which
    /// behaves like `None` except that nothing is ever looked up.
    pub fn from_env_values(tapdisk3: Option<&OsStr>, tapdisk2: Option<&OsStr>) -> KeySource {
        match tapdisk3.or(tapdisk2) {
            Some(v) => KeySource::Dirs(parse_keydirs(v)),
            None => KeySource::None,
        }
    }
}

/// Split a comma-separated directory list; empty entries are skipped. No length limit
/// (the 2018 C code silently truncated entries at 255 characters).
pub fn parse_keydirs(value: &OsStr) -> Vec<PathBuf> {
    value
        .as_bytes()
        .split(|&b| b == b',')
        .filter(|s| !s.is_empty())
        .map(|s| PathBuf::from(OsString::from_vec(s.to_vec())))
        .collect()
}

/// The key-file basename of an image path: the file name (text after the last `/`,
/// trailing slashes ignored) cut at the FIRST occurrence of `.vhd` anywhere in it
/// (`snap_X.vhd.snap.tmp.vhd` -> `snap_X`). The path is used as given: a symlink's own
/// name counts, not its target's.
pub fn image_basename(image: &Path) -> OsString {
    let mut b = image.as_os_str().as_bytes();
    while b.len() > 1 && b.ends_with(b"/") {
        b = &b[..b.len() - 1];
    }
    let name = match b.iter().rposition(|&c| c == b'/') {
        Some(i) if b.len() > 1 => &b[i + 1..],
        _ => b,
    };
    let cut = name
        .windows(4)
        .position(|w| w == b".vhd")
        .unwrap_or(name.len());
    OsString::from_vec(name[..cut].to_vec())
}

/// `<basename>,aes-xts-plain,<bits>.key` for an image path.
pub fn key_file_name(image: &Path, bits: u32) -> OsString {
    let mut v = image_basename(image).into_vec();
    v.extend_from_slice(CIPHER_TAG);
    v.extend_from_slice(bits.to_string().as_bytes());
    v.extend_from_slice(b".key");
    OsString::from_vec(v)
}

/// The key size in bits named by a key file name (`...,aes-xts-plain,512.key` -> 512,
/// `...,aes-xts-plain,256.key` -> 256), as upstream `vhd-util key` derives it.
pub fn key_bits_from_filename(keyfile: &Path) -> Result<u32, CryptoError> {
    let name = keyfile.file_name().map(|n| n.as_bytes()).unwrap_or(b"");
    for bits in KEY_SIZES_BITS {
        let mut suffix = CIPHER_TAG.to_vec();
        suffix.extend_from_slice(bits.to_string().as_bytes());
        suffix.extend_from_slice(b".key");
        if name.len() > suffix.len() && name.ends_with(&suffix) {
            return Ok(bits);
        }
    }
    Err(CryptoError::KeyFileName(keyfile.to_path_buf()))
}

/// Upstream `vhd-util key` validation: the key file's name must be exactly
/// `<image basename>,aes-xts-plain,<512|256>.key`. Returns the key size in bits named by
/// it, or [`CryptoError::KeyFileName`]. (OpenXT stable-8's `vhd-util` does not check.)
pub fn keyfile_bits_for_image(keyfile: &Path, image: &Path) -> Result<u32, CryptoError> {
    let bits = key_bits_from_filename(keyfile)?;
    if keyfile.file_name() == Some(key_file_name(image, bits).as_os_str()) {
        Ok(bits)
    } else {
        Err(CryptoError::KeyFileName(keyfile.to_path_buf()))
    }
}

/// A key found in a key directory. `Debug` prints the path and size, never the key.
pub struct KeyFile {
    pub path: PathBuf,
    /// 512 (64-byte key, XTS-AES-256) or 256 (32-byte key, XTS-AES-128).
    pub bits: u32,
    /// The first `bits / 8` bytes of the file.
    pub key: KeyBytes,
}

impl std::fmt::Debug for KeyFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyFile")
            .field("path", &self.path)
            .field("bits", &self.bits)
            .finish_non_exhaustive()
    }
}

fn io_err(path: &Path, source: std::io::Error) -> CryptoError {
    CryptoError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Read up to `limit` bytes (fewer only at end of file) into a zeroed-on-drop buffer.
fn read_up_to(
    path: &Path,
    file: &mut std::fs::File,
    limit: usize,
) -> Result<KeyBytes, CryptoError> {
    let mut buf = Zeroizing::new(vec![0u8; limit]);
    let mut got = 0;
    while got < limit {
        match file.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(io_err(path, e)),
        }
    }
    buf.truncate(got);
    Ok(buf)
}

/// tapdisk's read of a chosen key file: the first `bits / 8` bytes; a shorter file is a
/// "short read".
fn read_key_prefix(path: &Path, bits: u32) -> Result<KeyFile, CryptoError> {
    let need = (bits / 8) as usize;
    let mut f = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
    let key = read_up_to(path, &mut f, need)?;
    if key.len() < need {
        return Err(CryptoError::ShortKeyFile {
            path: path.to_path_buf(),
            len: key.len() as u64,
            need: need as u64,
        });
    }
    Ok(KeyFile {
        path: path.to_path_buf(),
        bits,
        key,
    })
}

/// Scan the directories for one key size: the first path whose `stat` succeeds wins; a
/// `stat` error other than ENOENT aborts the scan of this size with that error.
fn find_key_of_size(
    dirs: &[PathBuf],
    image: &Path,
    bits: u32,
) -> Result<Option<KeyFile>, CryptoError> {
    let name = key_file_name(image, bits);
    for dir in dirs {
        let path = dir.join(&name);
        match std::fs::metadata(&path) {
            Ok(_) => return read_key_prefix(&path, bits).map(Some),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
            Err(e) => return Err(io_err(&path, e)),
        }
    }
    Ok(None)
}

/// tapdisk's key file lookup for one image (OpenXT reference §1.4): for size in
/// [512, 256], for each directory in order, `stat(dir/<basename>,aes-xts-plain,<size>.key)`;
/// the first existing file wins and its first size/8 bytes are the key.
///
/// Sizes are tried in turn until one yields a key; when none does, the outcome of the
/// LAST size tried (256) is the result: `Ok(None)` if no 256 file exists, or its error
/// (a short 256 file, a stat error other than ENOENT). So a short or unreadable 512 file
/// falls through to the 256 search, and a short 256 file is an error.
pub fn find_key_file(dirs: &[PathBuf], image: &Path) -> Result<Option<KeyFile>, CryptoError> {
    let mut last = Ok(None);
    for bits in KEY_SIZES_BITS {
        last = find_key_of_size(dirs, image, bits);
        if let Ok(Some(_)) = last {
            return last;
        }
    }
    last
}

/// `vhd-util key` style read of a whole key file: up to [`KEY_FILE_MAX`] bytes, and an
/// error if that is less than the file's size (`st_size`).
pub fn read_keyfile_whole(path: &Path) -> Result<KeyBytes, CryptoError> {
    let mut f = std::fs::File::open(path).map_err(|e| io_err(path, e))?;
    let size = f.metadata().map_err(|e| io_err(path, e))?.len();
    let data = read_up_to(path, &mut f, KEY_FILE_MAX as usize)?;
    if (data.len() as u64) < size {
        return Err(CryptoError::KeyFileSize {
            path: path.to_path_buf(),
            size,
            read: data.len() as u64,
        });
    }
    Ok(data)
}

/// `vhd-util key -C`: the key hash record of a key file, hashing the WHOLE file (so a
/// trailing newline changes the hash, as in the C tool) with the given nonce (all-zero
/// unless `-N`).
pub fn keyhash_for_keyfile(path: &Path, nonce: &[u8; 32]) -> Result<KeyHash, CryptoError> {
    let data = read_keyfile_whole(path)?;
    Ok(KeyHash::for_key(&data, nonce))
}

/// `vhd-util key -c`: whether the image's key hash is set and matches the whole key
/// file. `Ok(false)` is the C tool's EINVAL ("no keyhash or it does not match").
pub fn keyfile_matches(path: &Path, keyhash: &KeyHash) -> Result<bool, CryptoError> {
    let data = read_keyfile_whole(path)?;
    Ok(keyhash.matches(&data))
}

fn key_len_for_bits(bits: u32) -> Result<usize, CryptoError> {
    match bits {
        256 | 512 => Ok((bits / 8) as usize),
        _ => Err(CryptoError::KeyLength((bits / 8) as usize)),
    }
}

fn refuse_equal_halves(key: &[u8]) -> Result<(), CryptoError> {
    let h = key.len() / 2;
    if key[..h] == key[h..] {
        return Err(CryptoError::WeakKey);
    }
    Ok(())
}

/// A fresh random key of `bits` (256 or 512) from `/dev/urandom`. A key whose halves are
/// equal (K1 == K2; probability 2^-128 or less) is refused, never returned.
pub fn generate_key(bits: u32) -> Result<KeyBytes, CryptoError> {
    let len = key_len_for_bits(bits)?;
    let dev = Path::new("/dev/urandom");
    let mut f = std::fs::File::open(dev).map_err(|e| io_err(dev, e))?;
    let mut key = Zeroizing::new(vec![0u8; len]);
    f.read_exact(&mut key).map_err(|e| io_err(dev, e))?;
    refuse_equal_halves(&key)?;
    Ok(key)
}

/// Derive a key of `bits` (256 -> 32 bytes, XTS-AES-128; 512 -> 64 bytes, XTS-AES-256)
/// from a passphrase: PBKDF2 (RFC 8018) with HMAC-SHA256 as the PRF, the given salt and
/// iteration count, output length bits/8. Requirements: `iterations >= 1`
/// ([`PBKDF2_DEFAULT_ITERATIONS`] = 600,000 recommended), `salt.len() >=
/// PBKDF2_MIN_SALT_LEN` (16; use a random salt stored next to the key's consumer). The
/// passphrase is used as raw bytes (no normalisation, no trailing newline stripping). A
/// result with equal halves is refused.
///
/// This is an extra of this implementation: OpenXT itself only uses random key files.
pub fn derive_key_from_passphrase(
    passphrase: &[u8],
    salt: &[u8],
    iterations: u32,
    bits: u32,
) -> Result<KeyBytes, CryptoError> {
    let len = key_len_for_bits(bits)?;
    if iterations == 0 {
        return Err(CryptoError::Kdf("iteration count must be at least 1"));
    }
    if salt.len() < PBKDF2_MIN_SALT_LEN {
        return Err(CryptoError::Kdf("salt must be at least 16 bytes"));
    }
    let mut key = Zeroizing::new(vec![0u8; len]);
    pbkdf2::pbkdf2_hmac::<sha2::Sha256>(passphrase, salt, iterations, &mut key);
    refuse_equal_halves(&key)?;
    Ok(key)
}

/// Write a new key file (created exclusively, mode 0600). Refuses keys that are not 32
/// or 64 bytes and keys with equal halves.
pub fn write_key_file(path: &Path, key: &[u8]) -> Result<(), CryptoError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if key.len() != 32 && key.len() != 64 {
        return Err(CryptoError::KeyLength(key.len()));
    }
    refuse_equal_halves(key)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| io_err(path, e))?;
    f.write_all(key).map_err(|e| io_err(path, e))?;
    f.sync_all().map_err(|e| io_err(path, e))
}

/// One image of a chain as the key walk sees it (leaf first).
#[derive(Clone, Debug)]
pub struct KeyWalkEntry {
    /// The path as opened (leaf) or as produced by parent-locator resolution (parents);
    /// not canonicalised: key files are named after this path's basename.
    pub path: PathBuf,
    /// The image's keyhash (all zero for images without one).
    pub keyhash: KeyHash,
    /// A raw image (never keyed, ends the walk).
    pub is_raw: bool,
}

/// The per-image outcome of checking an image's own key.
type Own = Result<Option<Arc<XtsCipher>>, CryptoError>;

/// The walk of §1.5 for every image at once. `own(e)` decides image `e` by itself:
/// `Ok(Some)` = keyed with this cipher (walk stops), `Ok(None)` = nothing here (walk
/// goes on to the parent), `Err` = the open of any image whose walk reaches it fails.
/// Computed from the root down so each image is looked at once; the error returned is
/// the one the leaf-first open order meets first.
fn walk_chain(
    chain: &[KeyWalkEntry],
    mut own: impl FnMut(&KeyWalkEntry) -> Own,
) -> Result<Vec<Option<Arc<XtsCipher>>>, CryptoError> {
    let n = chain.len();
    let mut out: Vec<Option<Arc<XtsCipher>>> = vec![None; n];
    let mut reaches_err: Vec<Option<usize>> = vec![None; n];
    let mut errs: Vec<Option<CryptoError>> = (0..n).map(|_| None).collect();
    for i in (0..n).rev() {
        if chain[i].is_raw {
            continue; // raw images are never keyed and end every walk
        }
        match own(&chain[i]) {
            Err(e) => {
                errs[i] = Some(e);
                reaches_err[i] = Some(i);
            }
            Ok(Some(c)) => out[i] = Some(c),
            Ok(None) => {
                if i + 1 < n && !chain[i + 1].is_raw {
                    out[i] = out[i + 1].clone();
                    reaches_err[i] = reaches_err[i + 1];
                }
            }
        }
    }
    if let Some(j) = reaches_err.iter().flatten().next() {
        if let Some(e) = errs[*j].take() {
            return Err(e);
        }
    }
    Ok(out)
}

/// For each entry of `chain` (leaf first; entry i+1 is the parent of entry i), the
/// cipher its own data is encrypted with (`None` = plaintext). Fails if opening any image
/// of the chain would fail in tapdisk.
///
/// * [`KeySource::Dirs`] — OpenXT §1.5 exactly: each image walks up from itself. At image
///   p: a key file for p's basename found ([`find_key_file`]) -> p has no key hash:
///   EACCES ([`CryptoError::KeyWithoutHash`]); hash mismatch: ENOKEY
///   ([`CryptoError::KeyMismatch`]); else that key, walk ends. No key file -> p has a key
///   hash: ENOKEY ([`CryptoError::NoKey`]); else go on to the parent. A lookup error
///   (short 256 file, stat error) fails. A raw parent or the chain root ends the walk:
///   plaintext. So an unkeyed snapshot child inherits its nearest keyed ancestor's key,
///   and each layer may have its own key. Images resolving to the same key file share
///   one `Arc`.
/// * [`KeySource::None`] (no key directory): any image with a key hash -> ENOKEY.
/// * [`KeySource::Explicit`] (tap-ctl open -E): the same walk with the one supplied key
///   standing in for every key file: at an image with a key hash, a match ends the walk
///   with that key and a mismatch is ENOKEY; images without a key hash go on to their
///   parent. So an OpenXT 8 snapshot child (no key hash) inherits the explicit key from
///   its keyed ancestor, while an image whose walk reaches no key hash (an unkeyed base
///   under a keyed child) stays plaintext. If NO image of the chain has a key hash the key was
///   not meant for this chain: EINVAL ([`CryptoError::KeyNotNeeded`]), as blktap does
///   ("key supplied but no keyhash"). A key that is not 32/64 bytes: EINVAL. (A key hash
///   without any key is ENOKEY under `None`; blktap's non-OpenXT build returns EINVAL
///   there, we keep OpenXT's ENOKEY, which libxl/xenmgr know as "key missing".)
pub fn resolve_chain_keys(
    chain: &[KeyWalkEntry],
    source: &KeySource,
) -> Result<Vec<Option<Arc<XtsCipher>>>, CryptoError> {
    match source {
        KeySource::None => walk_chain(chain, |e| {
            if e.keyhash.is_set() {
                Err(CryptoError::NoKey {
                    path: e.path.clone(),
                })
            } else {
                Ok(None)
            }
        }),
        KeySource::Dirs(dirs) => walk_chain(chain, |e| match find_key_file(dirs, &e.path)? {
            Some(kf) => {
                if !e.keyhash.is_set() {
                    return Err(CryptoError::KeyWithoutHash {
                        path: e.path.clone(),
                        keyfile: kf.path,
                    });
                }
                if !e.keyhash.matches(&kf.key) {
                    return Err(CryptoError::KeyMismatch {
                        path: e.path.clone(),
                        keyfile: Some(kf.path),
                    });
                }
                Ok(Some(Arc::new(XtsCipher::new(&kf.key)?)))
            }
            None if e.keyhash.is_set() => Err(CryptoError::NoKey {
                path: e.path.clone(),
            }),
            None => Ok(None),
        }),
        KeySource::Explicit(key) => {
            let cipher = Arc::new(XtsCipher::new(key)?);
            if !chain.iter().any(|e| !e.is_raw && e.keyhash.is_set()) {
                return Err(CryptoError::KeyNotNeeded);
            }
            walk_chain(chain, |e| {
                if !e.keyhash.is_set() {
                    Ok(None)
                } else if e.keyhash.matches(key) {
                    Ok(Some(cipher.clone()))
                } else {
                    Err(CryptoError::KeyMismatch {
                        path: e.path.clone(),
                        keyfile: None,
                    })
                }
            })
        }
    }
}
