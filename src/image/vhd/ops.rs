//! Offline VHD operations for vhd-util: create, snapshot, and (further down) coalesce,
//! repair, check, resize, reparent, fill.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use super::engine::{VhdImage, VhdOpenOptions};
use super::format::*;
use super::parent::{locator_payloads, relative_path, resolve_parent, ParentRef};
use crate::image::chain::chain_depth;
use crate::image::file::{BlockFile, OsFile};
use crate::image::{ImageError, SECTOR_SIZE};

/// What to create.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CreateOptions {
    /// Virtual size in bytes (a multiple of 512, at most 2040 GiB).
    pub size: u64,
    /// Fixed (`-r`) or dynamic.
    pub fixed: bool,
    /// Block size of a dynamic disk (power of two, 512 B ..= 2 MiB).
    pub block_size: u32,
    /// Size the BAT for this virtual size (`-S`, for a later fast resize); >= `size`.
    pub max_size: Option<u64>,
}

impl CreateOptions {
    /// A dynamic disk of `size` bytes with 2 MiB blocks.
    pub fn dynamic(size: u64) -> CreateOptions {
        CreateOptions {
            size,
            fixed: false,
            block_size: DEFAULT_BLOCK_SIZE,
            max_size: None,
        }
    }
}

/// Seconds since the VHD epoch (2000-01-01 UTC), truncated to 32 bits.
pub fn vhd_time(t: SystemTime) -> u32 {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    secs.saturating_sub(VHD_EPOCH_OFFSET) as u32
}

fn new_uuid() -> [u8; 16] {
    *uuid::Uuid::new_v4().as_bytes()
}

fn invalid(s: impl Into<String>) -> ImageError {
    ImageError::Invalid(s.into())
}

fn check_size(size: u64) -> Result<(), ImageError> {
    if size == 0 || !size.is_multiple_of(SECTOR_SIZE) || size > MAX_VIRTUAL_SIZE {
        return Err(invalid(format!(
            "bad virtual size {size} (a multiple of 512 up to 2040 GiB)"
        )));
    }
    Ok(())
}

/// The parent a new differencing disk links to.
struct ParentSpec {
    uuid: [u8; 16],
    ts: u32,
    name: String,
    rel: String,
    keyhash: Option<[u8; 65]>,
}

/// Create a VHD at `path` (fails if the file exists).
pub fn create(path: &Path, opts: &CreateOptions) -> Result<(), ImageError> {
    check_size(opts.size)?;
    let f = OsFile::create_new(path).map_err(|e| ImageError::io(path, "create", e))?;
    let r = if opts.fixed {
        create_fixed(path, &f, opts.size)
    } else {
        create_dynamic(path, &f, opts, None)
    };
    if r.is_err() {
        let _ = std::fs::remove_file(path);
    }
    r
}

fn create_fixed(path: &Path, f: &dyn BlockFile, size: u64) -> Result<(), ImageError> {
    let mut footer = Footer::new(
        DiskType::Fixed,
        size,
        new_uuid(),
        vhd_time(SystemTime::now()),
    );
    f.set_len(size + FOOTER_SIZE as u64)
        .map_err(|e| ImageError::io(path, "truncate", e))?;
    f.write_at(&footer.encode(), size)
        .map_err(|e| ImageError::io(path, "write footer", e))?;
    f.sync().map_err(|e| ImageError::io(path, "fdatasync", e))
}

/// Write the metadata of a new dynamic/differencing disk into the empty file `f`.
fn create_dynamic(
    path: &Path,
    f: &dyn BlockFile,
    opts: &CreateOptions,
    parent: Option<ParentSpec>,
) -> Result<(), ImageError> {
    valid_block_size(opts.block_size).map_err(|e| invalid(e.to_string()))?;
    let max_size = opts.max_size.unwrap_or(opts.size);
    if max_size < opts.size {
        return Err(invalid("maximum size is below the virtual size"));
    }
    check_size(max_size)?;
    let bs = u64::from(opts.block_size);
    let max_bat = u32::try_from(max_size.div_ceil(bs)).map_err(|_| invalid("too many blocks"))?;
    let dtype = if parent.is_some() {
        DiskType::Differencing
    } else {
        DiskType::Dynamic
    };
    let mut footer = Footer::new(dtype, opts.size, new_uuid(), vhd_time(SystemTime::now()));
    let mut header = DynHeader::new(max_bat, opts.block_size);
    let bat_len = pad512(u64::from(max_bat) * 4);
    let bm_hdr_off = BAT_OFFSET + bat_len;
    let mut bmh = BatmapHeader::new(bm_hdr_off, max_bat);
    let map_len = u64::from(bmh.batmap_size) * SECTOR_SIZE;
    let mut end = bmh.batmap_offset + map_len;
    let mut loc_writes = Vec::new();
    if let Some(p) = &parent {
        header.prt_uuid = p.uuid;
        header.prt_ts = p.ts;
        header.set_parent_name(&p.name);
        for (i, (code, data)) in locator_payloads(&p.rel).into_iter().enumerate() {
            let space = pad512(data.len() as u64);
            header.loc[i] = Locator {
                code,
                data_space: u32::try_from(space).map_err(|_| invalid("parent path too long"))?,
                data_len: u32::try_from(data.len()).map_err(|_| invalid("parent path too long"))?,
                res: 0,
                data_offset: end,
            };
            loc_writes.push((end, data));
            end += space;
        }
        if let Some(kh) = p.keyhash {
            bmh.keyhash = kh;
        }
    }
    let map = vec![0u8; map_len as usize];
    bmh.checksum = batmap_checksum(&map, opts.size, BATMAP_VERSION);
    let io = |e| ImageError::io(path, "write", e);
    let fb = footer.encode();
    f.set_len(end + FOOTER_SIZE as u64).map_err(io)?;
    f.write_at(&fb, 0).map_err(io)?;
    f.write_at(&header.encode(), HEADER_OFFSET).map_err(io)?;
    let bat = vec![0xFFu8; bat_len as usize];
    f.write_at(&bat, BAT_OFFSET).map_err(io)?;
    f.write_at(&bmh.encode(), bm_hdr_off).map_err(io)?;
    f.write_at(&map, bmh.batmap_offset).map_err(io)?;
    for (off, data) in loc_writes {
        let mut d = data;
        d.resize(pad512(d.len() as u64) as usize, 0);
        f.write_at(&d, off).map_err(io)?;
    }
    f.write_at(&fb, end).map_err(io)?;
    f.sync().map_err(|e| ImageError::io(path, "fdatasync", e))
}

/// Options of [`snapshot`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SnapshotOptions {
    /// The parent is a raw image (`-m`).
    pub raw_parent: bool,
    /// Link to exactly the given parent (`-e`); otherwise empty differencing ancestors
    /// are skipped.
    pub link_exact: bool,
    /// Fail with NoSpace if the new chain would be deeper than this (`-l`).
    pub depth_limit: Option<u32>,
    /// BAT sized for this virtual size (`-S`).
    pub max_size: Option<u64>,
    /// Copy the parent's keyhash into the child (upstream behaviour; OpenXT 8 does not).
    pub copy_keyhash: bool,
}

fn open_ro(path: &Path) -> Result<VhdImage, ImageError> {
    VhdImage::open(path, &VhdOpenOptions::default())
}

/// Create a differencing disk `child` on top of `parent` (see [`SnapshotOptions`]).
/// Returns the path the child links to.
pub fn snapshot(
    child: &Path,
    parent: &Path,
    opts: &SnapshotOptions,
) -> Result<PathBuf, ImageError> {
    let mut target = parent.to_path_buf();
    let mut raw = opts.raw_parent;
    let (size, block_size) = if raw {
        let len = std::fs::metadata(parent)
            .map_err(|e| ImageError::io(parent, "stat", e))?
            .len();
        (len / SECTOR_SIZE * SECTOR_SIZE, DEFAULT_BLOCK_SIZE)
    } else {
        let p = open_ro(parent)?;
        let size = p.footer().curr_size;
        let bs = p.header().map_or(DEFAULT_BLOCK_SIZE, |h| h.block_size);
        if !opts.link_exact {
            let mut cur = p;
            while cur.is_differencing() && cur.allocated_blocks() == 0 {
                let Some(ParentRef { path, raw: r, .. }) = resolve_parent(&cur)? else {
                    break;
                };
                target = path;
                if r {
                    raw = true;
                    break;
                }
                cur = open_ro(&target)?;
            }
        }
        (size, bs)
    };
    check_size(size)?;
    let depth = if raw { 1 } else { chain_depth(&target)? };
    if let Some(limit) = opts.depth_limit {
        if depth + 1 > limit {
            return Err(ImageError::NoSpace("snapshot depth exceeded".into()));
        }
    }
    let meta = std::fs::metadata(&target).map_err(|e| ImageError::io(&target, "stat", e))?;
    let ts = vhd_time(meta.modified().unwrap_or(UNIX_EPOCH));
    let (uuid, keyhash) = if raw {
        ([0u8; 16], None)
    } else {
        let t = open_ro(&target)?;
        let kh = if opts.copy_keyhash {
            Some(t.keyhash()?.to_bytes())
        } else {
            None
        };
        (t.footer().uuid, kh)
    };
    let tcanon = target
        .canonicalize()
        .map_err(|e| ImageError::io(&target, "canonicalize", e))?;
    let cdir = match child.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(d) => d.canonicalize(),
        None => std::env::current_dir(),
    }
    .map_err(|e| ImageError::io(child, "canonicalize", e))?;
    let rel = relative_path(&cdir, &tcanon);
    let name = tcanon
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let spec = ParentSpec {
        uuid,
        ts,
        name,
        rel,
        keyhash,
    };
    let f = OsFile::create_new(child).map_err(|e| ImageError::io(child, "create", e))?;
    let copts = CreateOptions {
        size,
        fixed: false,
        block_size,
        max_size: opts.max_size.map(|m| m.max(size)),
    };
    let r = create_dynamic(child, &f, &copts, Some(spec));
    if r.is_err() {
        let _ = std::fs::remove_file(child);
    }
    r.map(|()| target)
}

/// Open a VHD file for metadata work (no chain).
pub fn open_meta(path: &Path, read_only: bool) -> Result<VhdImage, ImageError> {
    VhdImage::open(
        path,
        &VhdOpenOptions {
            read_only,
            ..Default::default()
        },
    )
}

/// Open a VHD from an arbitrary [`BlockFile`] for metadata work.
pub fn open_meta_file(
    path: &Path,
    file: Arc<dyn BlockFile>,
    read_only: bool,
) -> Result<VhdImage, ImageError> {
    VhdImage::open_file(
        path,
        file,
        &VhdOpenOptions {
            read_only,
            ..Default::default()
        },
    )
}
