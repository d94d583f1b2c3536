//! Opening a VHD with its parent chain.
//!
//! The leaf is opened with the caller's mode; each parent found through the parent
//! locators is opened read-only: a VHD (its footer uuid must equal the child's `prt_uuid`)
//! or, when the child's parent uuid is null, a raw image. Loops (the same file twice) and
//! chains deeper than [`OpenOptions::max_depth`] are errors.
//!
//! Keys: one [`KeyWalkEntry`] per layer (leaf first: path as opened/resolved, keyhash from
//! the batmap or the xattr, raw flag) goes to [`resolve_chain_keys`]; each VHD layer gets
//! the resulting cipher for the data sectors it holds.

use std::collections::HashSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::crypto::{resolve_chain_keys, KeyHash, KeySource, KeyWalkEntry};
use super::file::{BlockFile, OsFile, SysOpener};
use super::raw::RawImage;
use super::vhd::engine::{VhdImage, VhdOpenOptions, DEFAULT_PREALLOC_BLOCKS};
use super::vhd::parent::resolve_parent;
use super::{Image, ImageError};

/// Default limit on the number of images in a chain.
pub const DEFAULT_MAX_DEPTH: u32 = 128;

/// How to open an image (and its chain).
#[derive(Clone, Debug)]
pub struct OpenOptions {
    pub read_only: bool,
    /// Where keys come from (default: none, plaintext only).
    pub keys: KeySource,
    /// Blocks reserved per file extension of the leaf.
    pub prealloc_blocks: u32,
    /// Read the leaf's footer from its backup copy.
    pub use_backup_footer: bool,
    /// Refuse chains with more images than this.
    pub max_depth: u32,
    /// Read the stored bytes: no keys are looked up and encrypted layers are not
    /// decrypted (`vhd-util read -r/-R`, as blktap's vhd-util does). Read-only opens only.
    pub stored_bytes: bool,
    /// Open the leaf alone: no parent is looked up or attached (sectors the leaf does not
    /// hold read as zeros); keys are resolved for the leaf only. For `vhd-util coalesce
    /// -x`, which reads only the sectors the leaf holds.
    pub leaf_only: bool,
    /// Open every file of the chain with `O_DIRECT` where the filesystem allows it
    /// (tapdisk; the tools keep buffered I/O). See [`super::file`].
    pub direct: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            read_only: true,
            keys: KeySource::None,
            prealloc_blocks: DEFAULT_PREALLOC_BLOCKS,
            use_backup_footer: false,
            max_depth: DEFAULT_MAX_DEPTH,
            stored_bytes: false,
            leaf_only: false,
            direct: false,
        }
    }
}

enum Layer {
    Vhd(Box<VhdImage>),
    Raw(RawImage),
}

fn file_id(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Open the VHD at `path` with its whole parent chain.
pub fn open_vhd_chain(path: &Path, opts: &OpenOptions) -> Result<VhdImage, ImageError> {
    let f = OsFile::open_with(path, !opts.read_only, opts.direct, &SysOpener)
        .map_err(|e| ImageError::io(path, "open", e))?;
    open_vhd_chain_file(path, Arc::new(f), opts)
}

/// Like [`open_vhd_chain`] with the leaf's file already open (parents are opened by path).
pub fn open_vhd_chain_file(
    path: &Path,
    file: Arc<dyn BlockFile>,
    opts: &OpenOptions,
) -> Result<VhdImage, ImageError> {
    let vo = VhdOpenOptions {
        read_only: opts.read_only,
        use_backup_footer: opts.use_backup_footer,
        prealloc_blocks: opts.prealloc_blocks,
        direct: opts.direct,
    };
    let leaf = VhdImage::open_file(path, file, &vo)?;
    let mut seen: HashSet<(u64, u64)> = HashSet::new();
    if let Some(id) = file_id(path) {
        seen.insert(id);
    }
    let mut entries = vec![KeyWalkEntry {
        path: path.to_path_buf(),
        keyhash: leaf.keyhash()?,
        is_raw: false,
    }];
    let mut parents: Vec<Layer> = Vec::new();
    let mut link = if opts.leaf_only {
        None
    } else {
        resolve_parent(&leaf)?
    };
    let mut child_uuid = leaf.header().map(|h| h.prt_uuid);
    let mut child_path: PathBuf = path.to_path_buf();
    while let Some(p) = link {
        if entries.len() as u64 >= u64::from(opts.max_depth) {
            return Err(ImageError::Corrupt {
                path: path.display().to_string(),
                what: format!("parent chain deeper than {} images", opts.max_depth),
            });
        }
        if let Some(id) = file_id(&p.path) {
            if !seen.insert(id) {
                return Err(ImageError::Corrupt {
                    path: child_path.display().to_string(),
                    what: format!("loop in parent chain at {}", p.path.display()),
                });
            }
        }
        if p.raw {
            let r = RawImage::open_with(&p.path, true, opts.direct)?;
            entries.push(KeyWalkEntry {
                path: p.path.clone(),
                keyhash: KeyHash::default(),
                is_raw: true,
            });
            parents.push(Layer::Raw(r));
            break;
        }
        let v = VhdImage::open(
            &p.path,
            &VhdOpenOptions {
                read_only: true,
                direct: opts.direct,
                ..Default::default()
            },
        )?;
        if Some(v.footer().uuid) != child_uuid {
            return Err(ImageError::Corrupt {
                path: child_path.display().to_string(),
                what: format!("parent uuid mismatch with {}", p.path.display()),
            });
        }
        entries.push(KeyWalkEntry {
            path: p.path.clone(),
            keyhash: v.keyhash()?,
            is_raw: false,
        });
        link = resolve_parent(&v)?;
        child_uuid = v.header().map(|h| h.prt_uuid);
        child_path = p.path.clone();
        parents.push(Layer::Vhd(Box::new(v)));
    }
    if opts.stored_bytes && !opts.read_only {
        return Err(ImageError::Invalid(
            "stored-bytes access is read-only".into(),
        ));
    }
    let ciphers = if opts.stored_bytes {
        Vec::new()
    } else {
        resolve_chain_keys(&entries, &opts.keys)?
    };
    let mut below: Option<Box<dyn Image>> = None;
    for (i, layer) in parents.into_iter().enumerate().rev() {
        let img: Box<dyn Image> = match layer {
            Layer::Raw(r) => Box::new(r),
            Layer::Vhd(mut v) => {
                v.set_cipher(ciphers.get(i + 1).cloned().flatten());
                if let Some(b) = below.take() {
                    v.set_parent(b);
                }
                v
            }
        };
        below = Some(img);
    }
    let mut leaf = leaf;
    leaf.set_cipher(ciphers.first().cloned().flatten());
    if let Some(b) = below {
        leaf.set_parent(b);
    }
    Ok(leaf)
}

/// Number of images in the chain rooted at the VHD at `path` (1 for a lone VHD), following
/// parent locators without opening the parents as images.
pub fn chain_depth(path: &Path) -> Result<u32, ImageError> {
    let mut depth = 1u32;
    let mut seen = HashSet::new();
    if let Some(id) = file_id(path) {
        seen.insert(id);
    }
    let mut cur = VhdImage::open(path, &VhdOpenOptions::default())?;
    while let Some(p) = resolve_parent(&cur)? {
        depth += 1;
        if depth > DEFAULT_MAX_DEPTH || file_id(&p.path).is_some_and(|id| !seen.insert(id)) {
            return Err(ImageError::Corrupt {
                path: path.display().to_string(),
                what: "loop or absurd depth in parent chain".into(),
            });
        }
        if p.raw {
            break;
        }
        cur = VhdImage::open(&p.path, &VhdOpenOptions::default())?;
    }
    Ok(depth)
}
