//! Offline VHD operations for vhd-util: create, snapshot, and (further down) coalesce,
//! repair, check, resize, reparent, fill.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use super::engine::{VhdImage, VhdOpenOptions};
use super::format::*;
use super::parent::{locator_payloads, relative_path, resolve_parent, ParentRef};
use crate::image::chain::{chain_depth, DEFAULT_MAX_DEPTH};
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
    if !size.is_multiple_of(SECTOR_SIZE) || size > MAX_VIRTUAL_SIZE {
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
    let max_bat = u32::try_from(max_size.div_ceil(bs))
        .ok()
        .filter(|&n| u64::from(n) <= super::engine::MAX_BAT_ENTRIES)
        .ok_or_else(|| invalid("too many blocks for the block size"))?;
    let dtype = if parent.is_some() {
        DiskType::Differencing
    } else {
        DiskType::Dynamic
    };
    let mut footer = Footer::new(dtype, opts.size, new_uuid(), vhd_time(SystemTime::now()));
    let mut header = DynHeader::new(max_bat, opts.block_size);
    let bat_len = bat_bytes_padded(max_bat);
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
    // Entries are 0xFF (unallocated); the tail of the last sector is 0x00, as libvhd
    // writes it.
    let entries = u64::from(max_bat) * 4;
    let ff = vec![0xFFu8; entries.min(1 << 20) as usize];
    let mut off = 0;
    while off < entries {
        let n = (entries - off).min(ff.len() as u64) as usize;
        f.write_at(&ff[..n], BAT_OFFSET + off).map_err(io)?;
        off += n as u64;
    }
    let tail = vec![0u8; (bat_len - entries) as usize];
    f.write_at(&tail, BAT_OFFSET + entries).map_err(io)?;
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

/// The image a snapshot of the VHD `parent` links to unless told to link exactly: `parent`,
/// or the first non-empty ancestor above empty differencing disks. Returns (target, target
/// is raw). A chain of empty disks longer than [`DEFAULT_MAX_DEPTH`] (a loop) is an error.
pub fn snapshot_target(parent: &Path) -> Result<(PathBuf, bool), ImageError> {
    let mut target = parent.to_path_buf();
    let mut cur = open_ro(parent)?;
    for _ in 0..DEFAULT_MAX_DEPTH {
        if !cur.is_differencing() || cur.allocated_blocks() != 0 {
            return Ok((target, false));
        }
        let Some(ParentRef { path, raw, .. }) = resolve_parent(&cur)? else {
            return Ok((target, false));
        };
        target = path;
        if raw {
            return Ok((target, true));
        }
        cur = open_ro(&target)?;
    }
    Err(ImageError::Corrupt {
        path: parent.display().to_string(),
        what: "loop or absurd depth in chain of empty parents".into(),
    })
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
            (target, raw) = snapshot_target(parent)?;
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

/// Largest virtual size a fast resize can reach (`max_bat_size * block_size`), or the
/// current size for fixed disks (vhd-util query -S).
pub fn max_fast_resize_size(img: &VhdImage) -> u64 {
    match img.header() {
        Some(h) => u64::from(h.max_bat_size) * u64::from(h.block_size),
        None => img.footer().curr_size,
    }
}

/// Grow a dynamic/differencing disk within its preallocated BAT (vhd-util resize -f).
/// Shrinking and journaled growth beyond the BAT are not supported.
pub fn resize_fast(path: &Path, new_size: u64) -> Result<(), ImageError> {
    let img = open_meta(path, false)?;
    if img.disk_type() == DiskType::Fixed {
        return Err(ImageError::Unsupported {
            path: path.display().to_string(),
            what: "fast resize of a fixed disk".into(),
        });
    }
    check_size(new_size)?;
    let cur = img.footer().curr_size;
    if new_size < cur {
        return Err(invalid("shrinking is not supported"));
    }
    if new_size > max_fast_resize_size(&img) {
        return Err(ImageError::NoSpace(format!(
            "{new_size} bytes exceeds the preallocated BAT ({} bytes)",
            max_fast_resize_size(&img)
        )));
    }
    img.update_footer(|f| {
        f.curr_size = new_size;
        f.geometry = chs_geometry(new_size);
    })
}

/// Rewrite the footer from the one read (the backup at 0 with `use_backup`), generating
/// a uuid if it is null; the primary goes at the end of data (vhd-util repair).
pub fn repair(path: &Path, use_backup: bool) -> Result<(), ImageError> {
    let f = OsFile::open(path, true).map_err(|e| ImageError::io(path, "open", e))?;
    let img = VhdImage::open_file(
        path,
        Arc::new(f),
        &VhdOpenOptions {
            read_only: false,
            use_backup_footer: use_backup,
            ..Default::default()
        },
    )?;
    if img.footer().uuid == [0; 16] {
        img.update_footer(|f| f.uuid = new_uuid())?;
    }
    img.rewrite_footers()
}

/// Progress hook of the long operations ([`coalesce`], [`fill`]): called before each
/// unit of work with (units done, units total). The caller draws the final state.
pub type ProgressFn<'a> = &'a mut dyn FnMut(u64, u64);

fn report(progress: &mut Option<ProgressFn<'_>>, done: u64, total: u64) {
    if let Some(p) = progress.as_mut() {
        p(done, total);
    }
}

/// Copy every sector `child` holds into its parent (VHD or raw), vhd-util coalesce.
/// Both sides go through the image layer with the keys of `opts`: the child chain is read
/// with its resolved key and the parent written with its own, so encrypted layers stay
/// correct also when they use different keys (a keyed layer without its key fails the
/// open before anything is written). Returns the number of sectors copied.
pub fn coalesce(
    child: &Path,
    opts: &crate::image::chain::OpenOptions,
    progress: Option<ProgressFn<'_>>,
) -> Result<u64, ImageError> {
    use crate::image::chain::open_vhd_chain;
    use crate::image::raw::RawImage;
    use crate::image::Image;
    let mut co = opts.clone();
    co.read_only = true;
    let c = open_vhd_chain(child, &co)?;
    let Some(p) = resolve_parent(&c)? else {
        return Err(invalid(format!("{} has no parent", child.display())));
    };
    // The chain open checked that the parent's uuid matches the child's link.
    let parent: Box<dyn Image> = if p.raw {
        Box::new(RawImage::open(&p.path, false)?)
    } else {
        let mut po = opts.clone();
        po.read_only = false;
        Box::new(open_vhd_chain(&p.path, &po)?)
    };
    let r = coalesce_onto(&c, parent.as_ref(), progress);
    let closed = parent.close();
    let _ = c.close();
    let n = r?;
    closed?;
    Ok(n)
}

/// Copy the sectors held by `child` (opened with its chain and keys) into `parent`
/// through the image layer, then flush the parent. Runs are collected first (bitmap, or
/// the whole block when the batmap marks it full) so nothing is written when one of them
/// does not fit the parent. Progress counts runs. Returns the number of sectors copied.
pub fn coalesce_onto(
    child: &VhdImage,
    parent: &dyn crate::image::Image,
    mut progress: Option<ProgressFn<'_>>,
) -> Result<u64, ImageError> {
    use crate::image::Image;
    let bat = child.bat();
    let spb = u64::from(child.sectors_per_block());
    let csize = child.info().size_sectors;
    let psize = parent.info().size_sectors;
    let full = child.batmap().map(|(_, m)| m);
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for (i, &e) in bat.iter().enumerate() {
        let first = i as u64 * spb;
        if e == BAT_UNUSED || first >= csize {
            continue;
        }
        let n = spb.min(csize - first);
        if full.as_ref().is_some_and(|m| bit_test(m, i as u64)) {
            runs.push((first, n));
            continue;
        }
        let blk = u32::try_from(i).map_err(|_| invalid("block number out of range"))?;
        let Some(bm) = child.block_bitmap(blk)? else {
            continue;
        };
        let mut s = 0;
        while s < n {
            let (set, len) = bit_run(&bm, s, n - s);
            if set {
                runs.push((first + s, len));
            }
            s += len;
        }
    }
    if let Some(&(s, n)) = runs.iter().find(|&&(s, n)| s + n > psize) {
        return Err(ImageError::OutOfRange {
            sector: s,
            nsectors: n,
            size: psize,
        });
    }
    let total = runs.len() as u64;
    let mut copied = 0u64;
    let mut buf = Vec::new();
    for (i, &(s, len)) in runs.iter().enumerate() {
        report(&mut progress, i as u64, total);
        let bytes = usize::try_from(len * SECTOR_SIZE).map_err(|_| invalid("run too large"))?;
        buf.resize(bytes, 0);
        child.read(s, &mut buf)?;
        parent.write(s, &buf)?;
        copied += len;
    }
    parent.flush()?;
    Ok(copied)
}

/// Point `child` at a new parent (vhd-util modify -p [-m]): rewrites the parent uuid,
/// timestamp, name and the locators in place. Fails if a new locator does not fit the
/// space reserved by the existing one.
pub fn set_parent(child: &Path, new_parent: &Path, raw: bool) -> Result<(), ImageError> {
    let c = open_meta(child, false)?;
    let Some(h) = c.header() else {
        return Err(invalid("not a differencing disk"));
    };
    if !c.is_differencing() {
        return Err(invalid("not a differencing disk"));
    }
    let uuid = if raw {
        [0u8; 16]
    } else {
        open_ro(new_parent)?.footer().uuid
    };
    let meta = std::fs::metadata(new_parent).map_err(|e| ImageError::io(new_parent, "stat", e))?;
    let ts = vhd_time(meta.modified().unwrap_or(UNIX_EPOCH));
    let tcanon = new_parent
        .canonicalize()
        .map_err(|e| ImageError::io(new_parent, "canonicalize", e))?;
    let cdir = match child.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(d) => d.canonicalize(),
        None => std::env::current_dir(),
    }
    .map_err(|e| ImageError::io(child, "canonicalize", e))?;
    let rel = relative_path(&cdir, &tcanon);
    let payloads = locator_payloads(&rel);
    // The reserved spaces come from the file: each must lie inside the metadata area
    // (after the header, before the footer, clear of the BAT and of every allocated
    // block) before anything is written there.
    let corrupt = |what: &str| ImageError::Corrupt {
        path: child.display().to_string(),
        what: what.into(),
    };
    let file_len = c
        .file()
        .len()
        .map_err(|e| ImageError::io(child, "stat", e))?;
    let blk_bytes = (u64::from(h.spb()) + u64::from(h.bitmap_sectors())) * SECTOR_SIZE;
    let blocks: Vec<u64> = c
        .bat()
        .into_iter()
        .filter(|&e| e != BAT_UNUSED)
        .map(|e| u64::from(e) * SECTOR_SIZE)
        .collect();
    let mut locs = h.loc;
    let mut writes = Vec::new();
    for l in locs.iter_mut() {
        let Some((_, data)) = payloads.iter().find(|(code, _)| *code == l.code) else {
            continue;
        };
        let space = l
            .space_bytes()
            .ok_or_else(|| corrupt("bad parent locator data space"))?;
        let len = data.len() as u64;
        if len > space {
            return Err(ImageError::NoSpace(format!(
                "new parent locator needs {len} bytes, {space} reserved"
            )));
        }
        let start = l.data_offset;
        let end = start
            .checked_add(space)
            .ok_or_else(|| corrupt("parent locator out of bounds"))?;
        let bat_end = h.table_offset + u64::from(h.max_bat_size) * 4;
        if start < c.footer().data_offset + HEADER_SIZE as u64
            || (start < bat_end && h.table_offset < end)
            || end > file_len.saturating_sub(FOOTER_SIZE as u64)
            || blocks.iter().any(|&b| start < b + blk_bytes && b < end)
        {
            return Err(corrupt("parent locator space overlaps other data"));
        }
        // Only the new payload, padded to whole sectors: readers stop at data_len.
        let mut d = data.clone();
        d.resize(
            usize::try_from(pad512(len)).map_err(|_| corrupt("parent locator too large"))?,
            0,
        );
        writes.push((start, d));
        l.data_len = u32::try_from(len).map_err(|_| corrupt("parent locator too large"))?;
    }
    if writes.is_empty() {
        return Err(invalid("child has no MacX/W2ku/W2ru locator to rewrite"));
    }
    for (off, d) in &writes {
        c.write_raw(d, *off)?;
    }
    let name = tcanon
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    c.update_header(|hh| {
        hh.loc = locs;
        hh.prt_uuid = uuid;
        hh.prt_ts = ts;
        hh.set_parent_name(&name);
    })
}

/// Allocate every block of a dynamic/differencing disk, preserving the contents seen
/// through the chain (vhd-util fill); the keys of `opts` are used, so encrypted images
/// are filled with correctly encrypted data. Returns the number of blocks newly filled.
pub fn fill(
    path: &Path,
    opts: &crate::image::chain::OpenOptions,
    progress: Option<ProgressFn<'_>>,
) -> Result<u32, ImageError> {
    use crate::image::Image;
    let mut o = opts.clone();
    o.read_only = false;
    let img = crate::image::chain::open_vhd_chain(path, &o)?;
    let r = fill_image(&img, progress);
    let closed = img.close();
    let n = r?;
    closed?;
    Ok(n)
}

/// [`fill`] on an image already opened writable with its chain; flushes it. A fixed
/// disk is always fully allocated (nothing to do). Progress counts blocks.
pub fn fill_image(img: &VhdImage, mut progress: Option<ProgressFn<'_>>) -> Result<u32, ImageError> {
    use crate::image::Image;
    if img.header().is_none() {
        return Ok(0);
    }
    let spb = u64::from(img.sectors_per_block());
    if spb == 0 {
        return Err(invalid("not a dynamic disk"));
    }
    let size = img.info().size_sectors;
    let nblocks = size.div_ceil(spb);
    let mut filled = 0;
    let mut buf = Vec::new();
    for blk in 0..nblocks {
        report(&mut progress, blk, nblocks);
        let start = blk * spb;
        let n = spb.min(size - start);
        let b = u32::try_from(blk).map_err(|_| invalid("block number out of range"))?;
        let full = img
            .block_bitmap(b)?
            .is_some_and(|bm| bits_all(&bm, 0, n, true));
        if full {
            continue;
        }
        let bytes = usize::try_from(n * SECTOR_SIZE).map_err(|_| invalid("block too large"))?;
        buf.resize(bytes, 0);
        img.read(start, &mut buf)?;
        img.write(start, &buf)?;
        filled += 1;
    }
    img.flush()?;
    Ok(filled)
}

/// Structural checks (vhd-util check). Returns the problems found (empty = clean);
/// an image that cannot be opened at all is reported as a single problem.
pub fn check(path: &Path) -> Result<Vec<String>, ImageError> {
    let mut problems = Vec::new();
    let img = match open_meta(path, true) {
        Ok(i) => i,
        Err(e) => {
            problems.push(e.to_string());
            return Ok(problems);
        }
    };
    let len = std::fs::metadata(path)
        .map_err(|e| ImageError::io(path, "stat", e))?
        .len();
    match img.footer_source() {
        super::engine::FooterSource::Primary => {}
        s => problems.push(format!("primary footer invalid (used {s:?} footer)")),
    }
    let footer = img.footer();
    if img.disk_type() == DiskType::Fixed {
        return Ok(problems);
    }
    // Backup footer.
    let f = OsFile::open(path, false).map_err(|e| ImageError::io(path, "open", e))?;
    let mut b = [0u8; FOOTER_SIZE];
    f.read_at(&mut b, 0)
        .map_err(|e| ImageError::io(path, "read", e))?;
    let backup = Footer::decode(&b);
    if backup.validate().is_err() {
        problems.push("backup footer invalid".into());
    } else if backup != footer {
        problems.push("backup footer differs from primary".into());
    }
    let Some(h) = img.header() else {
        return Ok(problems);
    };
    // BAT: blocks must not overlap each other or the metadata.
    let spb = u64::from(h.spb());
    let blk_secs = spb + u64::from(h.bitmap_sectors());
    let meta_end = (h.table_offset + bat_bytes_padded(h.max_bat_size)) / SECTOR_SIZE;
    let mut blocks: Vec<(u64, usize)> = img
        .bat()
        .iter()
        .enumerate()
        .filter(|(_, &e)| e != BAT_UNUSED)
        .map(|(i, &e)| (u64::from(e), i))
        .collect();
    blocks.sort_unstable();
    for w in blocks.windows(2) {
        if w[0].0 + blk_secs > w[1].0 {
            problems.push(format!("blocks {} and {} overlap", w[0].1, w[1].1));
        }
    }
    for &(s, i) in &blocks {
        if s < meta_end {
            problems.push(format!("block {i} overlaps the BAT"));
        }
        if (s + blk_secs) * SECTOR_SIZE > len.saturating_sub(FOOTER_SIZE as u64) {
            problems.push(format!("block {i} overlaps the footer"));
        }
    }
    // Batmap.
    if let Some((_, map)) = img.batmap() {
        if img.batmap_valid() == Some(false) {
            problems.push("batmap checksum invalid".into());
        }
        for &(_, i) in &blocks {
            if bit_test(&map, i as u64) {
                let full = img
                    .block_bitmap(i as u32)?
                    .is_some_and(|bm| bits_all(&bm, 0, spb, true));
                if !full {
                    problems.push(format!("batmap marks block {i} full but its bitmap is not"));
                }
            }
        }
    }
    // Parent.
    if img.is_differencing() {
        match resolve_parent(&img) {
            Ok(Some(p)) if !p.raw => match open_ro(&p.path) {
                Ok(pv) => {
                    if pv.footer().uuid != h.prt_uuid {
                        problems.push(format!("parent uuid mismatch with {}", p.path.display()));
                    }
                    let ts = std::fs::metadata(&p.path)
                        .ok()
                        .and_then(|m| m.modified().ok())
                        .map(vhd_time);
                    if ts != Some(h.prt_ts) {
                        problems.push(format!(
                            "parent timestamp mismatch ({} recorded, {} on disk)",
                            h.prt_ts,
                            ts.unwrap_or(0)
                        ));
                    }
                }
                Err(e) => problems.push(format!("parent: {e}")),
            },
            Ok(_) => {}
            Err(e) => problems.push(format!("parent: {e}")),
        }
    }
    if len > img.physical_size() {
        problems.push(format!(
            "{} bytes after the end of data before the footer",
            len - img.physical_size()
        ));
    }
    Ok(problems)
}
