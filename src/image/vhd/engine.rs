//! The VHD storage engine: one VHD file (fixed, dynamic or differencing) as an [`Image`].
//!
//! # Concurrency
//!
//! All I/O methods take `&self`. Metadata (BAT, cached sector bitmaps, batmap, allocation
//! cursor) lives in one `Mutex<Meta>`; guest data is read and written with positional I/O
//! *outside* that lock, so requests to different blocks (and to already allocated sectors of
//! the same block) run in parallel. A block allocated by a worker has its BAT sector (512
//! bytes, once per new 2 MiB block) written right away while holding the lock; one
//! allocated on the loop leaves it to its commit (below), which writes it outside the lock
//! like a bitmap (a version per changed sector, [`Meta::bat_secs`], one writer at a time).
//! Sector bitmaps, written at every first write to a sector, are written
//! *outside* the lock: each cached bitmap carries a version, one thread at a time writes a
//! block's bitmap with its latest bits, and a write waits until the disk holds a version
//! with its own bits before it is acknowledged (`persist_bitmap`, a group commit per
//! block). So a bitmap write holds up only writes to its own block, never other blocks'
//! allocations and bitmaps nor the loop's fast path ([`Image::direct_map`]).
//!
//! A write to an allocated block whose bitmap is cached does not need a thread for its
//! data, nor does a block's first write while the reserve has room ([`Image::direct_map`]
//! then allocates the block in memory: no I/O). `direct_map` maps it (flagged `commit`
//! when it sets new bits, or its block's bitmap or BAT sector is not on disk as in
//! memory), tapdisk's loop submits the data with asynchronous I/O, and after it completed
//! a worker calls [`Image::commit_writes`] for every such write that completed meanwhile
//! (`commit_chunks`: one barrier for all, then each block's bitmap and each changed BAT
//! sector once, those no other thread is writing all at once in one Linux AIO batch,
//! `persist_many`). A worker's [`VhdImage::write`] runs the same `commit_chunks` after its
//! own data pwrite, so both paths keep the same order. A write is acknowledged only once
//! the BAT on disk points at its block and its block's bitmap on disk has its bits.
//! Growing the allocation reserve (ftruncate + footer + fdatasync) runs outside the lock;
//! allocations that need the new space wait on a `Condvar` meanwhile, everything else
//! (reads, writes to allocated blocks, bitmap updates) proceeds.
//!
//! # Crash consistency (ordering argument)
//!
//! Invariants, each with the ordering that maintains it:
//!
//! 1. *A BAT entry never points at a block whose bitmap is not zero on disk.* Blocks are
//!    carved out of a **reserve** `[next_db, reserve_end)`. A reserve is created by
//!    `extend` (called from `ensure_allocated`): explicitly zero every bitmap sector of the
//!    blocks it will hold that lies inside the old file (stale data from a crashed session,
//!    an old footer), extend the file with `ftruncate` (the new range reads as zeros), write
//!    a valid footer at the new end, zero the alignment gaps before the new blocks (where
//!    the old footer usually is; libvhd and tapdisk zero them too), then **fdatasync**.
//!    Only after that sync returns are BAT entries for reserve blocks published (by a
//!    worker before the block's data, or by the commit of the block's first write from the
//!    loop, in any order with its bitmap), and they need no further sync: whatever
//!    subset of BAT/bitmap/data writes a crash keeps, a published entry points at a
//!    bitmap that is either zero (sectors read from the parent, i.e. the unflushed write is lost)
//!    or was written by us after the data it covers. Stale bytes in the *data* area of a
//!    reserve block are harmless: only sectors whose bit we set are ever read from it.
//! 2. *A bitmap bit is set on disk only after its data is durable.* A write whose chunk
//!    sets bits not yet set in its block's bitmap does: data write (a pwrite, or the loop's
//!    asynchronous write, completed before its commit starts), then a group-commit barrier
//!    (`data_barrier`: wait, without the image lock, for an fdatasync that *started* after
//!    the data write completed; concurrent writers and the writes of one commit batch
//!    share one), then under the lock
//!    set the bits in the cached bitmap, then (without the lock) wait until a bitmap write
//!    carrying them has completed, then acknowledge. Only bits whose data is durable are
//!    ever set in the cache, so every copy of it written is safe. Without the barrier a
//!    power cut could keep the bitmap write and lose the data (O_DIRECT into the reserve's
//!    sparse data area is an unwritten extent converted by a journaled change; any device
//!    may reorder): the sector would read the file's zeros, i.e. garbage through AES-XTS,
//!    zeros instead of the parent's data on a differencing leaf, or a reused reserve's
//!    old bytes. A failed barrier fails the write: the data stays unreferenced and the
//!    bitmap unchanged, and the failure is sticky like a failed flush. Writes whose bits
//!    are already set (including every AIO fast-path write, see `direct_map`) pay no
//!    barrier: the bit already guards durable data (old or new, either is a valid outcome
//!    of an unflushed write). They wait only while their block's bitmap is not on disk as
//!    cached (a write of it running, or one that failed, which they then redo); the fast
//!    path maps a write to such a block only to be committed. `flush()` (fdatasync) then
//!    makes every acknowledged write durable, so each write acknowledged before a
//!    completed flush survives.
//! 3. *There is always a valid footer at EOF-512 or at offset 0.* The footer's content does
//!    not change when blocks are allocated (only its position), so the backup at 0 stays
//!    valid; it is rewritten only by explicit metadata updates (hidden, resize), after the
//!    primary. Extension writes the new primary before syncing; close writes the final
//!    footer at the end of data, syncs, *then* truncates the unused reserve and syncs again.
//!    Open falls back to the backup whenever the primary is invalid, and an RW open of such a
//!    file rewrites the primary first.
//! 4. *The batmap is a hint that only ever understates fullness on disk.* It is written at
//!    close after a sync (so the full bitmaps it summarises are durable first), and when a
//!    discard (or `coalesce -a`, [`VhdImage::clear_bitmap_bits_batch`], for a whole layer at
//!    once) clears bits of a block marked full, the batmap is rewritten and synced before
//!    the bitmap changes, and synced before it too when the in-memory map marks a block
//!    full whose full bitmap was written since (it is marked once written, not synced). Its checksum is verified on open; a bad
//!    one is treated as "nothing full" and rewritten at close.
//!
//! Compared with the C driver there is no one-allocation-at-a-time BAT lock and no
//! synchronous zero-fill of each 2 MiB block: one fdatasync covers `prealloc_blocks` blocks,
//! and the invariant 2 barrier orders data before bitmap where C relies on the zero-filled
//! block plus O_DIRECT (which does not hold for a disk with a volatile cache).
//! There is no "kill footer" on RW open either: the primary footer stays valid throughout a
//! session (invariant 3), and the BAT, not the footer position, defines the end of data.
//!
//! `tests/vhd_crash.rs` checks these invariants against the simulated file
//! ([`crate::image::file::MemFile`]): crash images made of the synced state plus any
//! subset/prefix of the unsynced writes, and runs stopped after N writes, must open cleanly
//! and return every write acknowledged before the last completed flush; on encrypted and
//! differencing images, crashes that lose any one unsynced write (among them a data write
//! whose bitmap write survives) check invariant 2.
//!
//! # Discard
//!
//! Fixed disks punch holes. Dynamic/differencing disks clear the sector bitmap bits (the
//! range then reads from the parent, or zeros at the root); blocks stay allocated (VHD cannot
//! return space from the middle of the file) and the data area is not punched.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use super::format::*;
use crate::image::crypto::{KeyHash, XtsCipher};
use crate::image::file::{BlockFile, OsFile, SysOpener, XATTR_KEYHASH, XATTR_MARKER};
use crate::image::{
    check_range, check_sectors, check_usable, DirectMap, Extent, Image, ImageError, ImageFormat,
    ImageInfo, LayerInfo, SECTOR_SIZE,
};

/// Largest encrypted write served from the per-thread bounce buffer.
const ENCRYPT_BUF_MAX: usize = 1 << 20;

thread_local! {
    /// Per-thread bounce buffer for encrypted writes of up to `ENCRYPT_BUF_MAX` bytes.
    static ENCRYPT_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Cached sector bitmaps kept per image (each one sector): 8192 x 512 B = 4 MiB.
const BITMAP_CACHE: usize = 8192;
/// Default number of blocks reserved per extension (16 MiB with 2 MiB blocks).
pub const DEFAULT_PREALLOC_BLOCKS: u32 = 8;
/// Largest BAT accepted (64 MiB in memory; 32 TiB of 2 MiB blocks, far above the 2 TiB
/// format limit): bounds what an absurd header can make us allocate.
pub const MAX_BAT_ENTRIES: u64 = 1 << 24;
/// Highest sector a block may end at (BAT entries are 32-bit sector numbers).
const MAX_SECTOR: u64 = u32::MAX as u64;

/// Options for opening one VHD file.
#[derive(Clone, Copy, Debug)]
pub struct VhdOpenOptions {
    pub read_only: bool,
    /// Read the footer from the backup copy at offset 0 (libvhd USE_BKP_FOOTER).
    pub use_backup_footer: bool,
    /// Blocks reserved per file extension (at least 1).
    pub prealloc_blocks: u32,
    /// Open the file with `O_DIRECT` where possible ([`OsFile::open_with`]).
    pub direct: bool,
}

impl Default for VhdOpenOptions {
    fn default() -> Self {
        VhdOpenOptions {
            read_only: true,
            use_backup_footer: false,
            prealloc_blocks: DEFAULT_PREALLOC_BLOCKS,
            direct: false,
        }
    }
}

/// Where the footer that was used came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FooterSource {
    /// At EOF-512.
    Primary,
    /// The 511-byte short footer at EOF-511.
    Short,
    /// The backup copy at offset 0.
    Backup,
}

#[derive(Clone, Debug)]
struct BatmapState {
    hdr_off: u64,
    hdr: BatmapHeader,
    map: Vec<u8>,
    /// The checksum on disk verified.
    valid: bool,
    dirty: bool,
    /// `map` marks a block full whose full bitmap was written since the last sync of
    /// [`VhdImage::rewrite_batmap`]'s, so may not be durable yet.
    ahead: bool,
}

#[derive(Debug)]
struct Meta {
    footer: Footer,
    header: Option<DynHeader>,
    bat: Vec<u32>,
    allocated: u32,
    bitmaps: HashMap<u32, CachedBitmap>,
    /// The last bitmap or BAT sector version handed out (see [`CachedBitmap`]).
    bm_seq: u64,
    /// BAT sectors (128 entries each, by index) changed this session whose write may not
    /// be done: an allocation changes the in-memory BAT and leaves its sector to be
    /// written with the commit of the block's first write ([`VhdImage::persist_many`]).
    /// A sector not listed is on disk as in memory.
    bat_secs: HashMap<u32, BatSector>,
    /// First sector after all metadata and allocated blocks.
    next_db: u64,
    /// End of the durable zeroed reserve (sector); `next_db <= reserve_end` when active.
    reserve_end: u64,
    extending: bool,
    batmap: Option<BatmapState>,
    /// Blocks were allocated or metadata changed: close must rewrite footer/batmap.
    dirty: bool,
}

/// One block's sector bitmap as this process knows it. `bits` is the latest state (reads
/// and writes go by it); the disk may lag behind while a thread writes it outside the image
/// lock, or after such a write failed. Every change bumps `version`; `on_disk` is the
/// newest version a completed bitmap write carried. Versions come from one counter per
/// image ([`Meta::bm_seq`]), so they stay ordered across eviction. An entry that is not
/// [clean](CachedBitmap::clean) is never evicted.
#[derive(Debug)]
struct CachedBitmap {
    bits: Vec<u8>,
    version: u64,
    on_disk: u64,
    /// A thread is writing a copy of `bits` to the disk (the lock is not held meanwhile).
    writing: bool,
}

impl CachedBitmap {
    /// A bitmap the disk holds as it is (just read, or known zero); `seq` is
    /// [`Meta::bm_seq`], so that no earlier change's version is newer than this entry.
    fn loaded(bits: Vec<u8>, seq: u64) -> CachedBitmap {
        CachedBitmap {
            bits,
            version: seq,
            on_disk: seq,
            writing: false,
        }
    }

    /// Whether the disk holds `bits` (no change waiting to be written, no write running).
    fn clean(&self) -> bool {
        self.on_disk == self.version && !self.writing
    }
}

/// One BAT sector's write state, as [`CachedBitmap`]'s for a bitmap: `version` is the
/// last change of its entries ([`Meta::bm_seq`]), `on_disk` the newest version a completed
/// write carried, `writing` while a thread writes it without the image lock.
#[derive(Clone, Copy, Debug, Default)]
struct BatSector {
    version: u64,
    on_disk: u64,
    writing: bool,
}

impl BatSector {
    fn clean(&self) -> bool {
        self.on_disk == self.version && !self.writing
    }
}

/// What [`VhdImage::persist_many`] gives back: the lock, and the results for the bitmaps
/// and for the BAT sectors.
type Persisted<'a> = (
    MutexGuard<'a, Meta>,
    Vec<Result<(), ImageError>>,
    Vec<Result<(), ImageError>>,
);

/// BAT entries per BAT sector.
const BAT_PER_SECTOR: u32 = 128;

/// Clears the `writing` flag of the bitmap entries being written and wakes their waiters
/// should the write panic (a `BlockFile` that panics): they would wait for ever. Disarmed
/// once the write returns.
struct Writing<'a> {
    img: &'a VhdImage,
    blks: Vec<u32>,
    /// BAT sectors being written.
    secs: Vec<u32>,
    armed: bool,
}

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        if self.armed {
            let mut m = self.img.lock();
            for blk in &self.blks {
                if let Some(c) = m.bitmaps.get_mut(blk) {
                    c.writing = false;
                }
            }
            for sec in &self.secs {
                if let Some(b) = m.bat_secs.get_mut(sec) {
                    b.writing = false;
                }
            }
            drop(m);
            self.img.bm_cond.notify_all();
        }
    }
}

/// Should the `fdatasync` of [`VhdImage::data_barrier`] panic (a `BlockFile` that panics),
/// marks it finished and failed (sticky, like a failed sync: nothing it was to make durable
/// is known to be) and wakes its waiters, who would otherwise wait for ever. Disarmed once
/// the sync returns.
struct SyncRunning<'a> {
    img: &'a VhdImage,
    seq: u64,
    armed: bool,
}

impl Drop for SyncRunning<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.img.sync_failed.store(true, Ordering::Release);
            let gate = &self.img.gate;
            let mut st = gate.st.lock().unwrap_or_else(|e| e.into_inner());
            st.done = self.seq;
            st.running = false;
            gate.cond.notify_all();
        }
    }
}

/// Make room in the bitmap cache for one more entry: drop one the disk holds as it is
/// (dropping another would lose a change, or a write's claim that its bits are on the way).
fn make_room(m: &mut Meta) {
    if m.bitmaps.len() >= BITMAP_CACHE {
        if let Some(k) = m.bitmaps.iter().find(|(_, c)| c.clean()).map(|(&k, _)| k) {
            m.bitmaps.remove(&k);
        }
    }
}

/// Allocate block `blk` from the reserve, in memory only: its BAT entry points at the next
/// reserve block, whose bitmap is known zero on disk (invariant 1), and its BAT sector is
/// left to be written (a new version in [`Meta::bat_secs`]). Returns the block's first
/// sector, or `None` when the reserve has no room for it.
fn take_reserve(m: &mut Meta, blk: u32, g: Geom) -> Option<u64> {
    let s = align_block_start(m.next_db, g.bm_secs);
    let end = s + u64::from(g.bm_secs) + u64::from(g.spb);
    if end > m.reserve_end {
        return None;
    }
    // s <= end <= reserve_end <= MAX_SECTOR (checked when reserving).
    *m.bat.get_mut(blk as usize)? = s as u32;
    m.next_db = end;
    m.allocated += 1;
    m.dirty = true;
    let v = m.bat_changed(blk / BAT_PER_SECTOR);
    make_room(m);
    let zero = vec![0u8; g.bm_secs as usize * SECTOR_SIZE as usize];
    m.bitmaps.insert(blk, CachedBitmap::loaded(zero, v));
    Some(s)
}

impl Meta {
    /// BAT sector `sec` changed in memory: a new version for it in [`Meta::bat_secs`],
    /// which the disk must reach ([`VhdImage::persist_many`]); returns it.
    fn bat_changed(&mut self, sec: u32) -> u64 {
        self.bm_seq += 1;
        self.bat_secs.entry(sec).or_default().version = self.bm_seq;
        self.bm_seq
    }

    /// Apply `f` to block `blk`'s cached bitmap; returns the version the disk must reach
    /// for the change to be on it ([`VhdImage::persist_bitmap`]), None when not cached.
    fn change_bitmap(&mut self, blk: u32, f: impl FnOnce(&mut [u8])) -> Option<u64> {
        let c = self.bitmaps.get_mut(&blk)?;
        self.bm_seq += 1;
        f(&mut c.bits);
        c.version = self.bm_seq;
        Some(self.bm_seq)
    }
}

/// One block's part of a write: `cnt` sectors at `off` in block `blk`, whose BAT entry
/// (first sector) is `entry`.
#[derive(Clone, Copy, Debug)]
struct Chunk {
    blk: u32,
    entry: u32,
    off: u64,
    cnt: u64,
}

/// Static geometry of a dynamic/differencing disk.
#[derive(Clone, Copy, Debug)]
struct Geom {
    spb: u32,
    bm_secs: u32,
    bat_off: u64,
    max_bat: u32,
}

impl Geom {
    /// Whether BAT sectors may be written outside the image lock: each is then one whole
    /// 512-byte unit of the file. A BAT at an offset that is not (no tool makes one) puts
    /// every BAT sector across two units, which an `O_DIRECT` file writes by
    /// read-modify-write, so two sectors written at once could undo each other: all its
    /// BAT writes then stay under the lock (no allocation on the loop).
    fn bat_aligned(&self) -> bool {
        self.bat_off.is_multiple_of(SECTOR_SIZE)
    }
}

/// One open VHD file. Unallocated sectors of a differencing disk read from `parent` (set
/// by the chain opener), or as zeros when there is none.
pub struct VhdImage {
    path: PathBuf,
    file: Arc<dyn BlockFile>,
    read_only: bool,
    kind: DiskType,
    size_sectors: u64,
    geom: Option<Geom>,
    footer_source: FooterSource,
    prealloc_blocks: u32,
    meta: Mutex<Meta>,
    /// Allocations waiting for a reserve being extended.
    cond: Condvar,
    /// Writes waiting for their block's bitmap write ([`VhdImage::persist_bitmap`]).
    bm_cond: Condvar,
    parent: Option<Box<dyn Image>>,
    cipher: Option<Arc<XtsCipher>>,
    closed: AtomicBool,
    /// An `fdatasync` of the file failed: see [`VhdImage::sync`].
    sync_failed: AtomicBool,
    /// Group commit for data writes that set new bitmap bits (invariant 2).
    gate: SyncGate,
}

/// Group commit of `fdatasync`s: [`VhdImage::data_barrier`] waits for one that started
/// after the call; concurrent callers share one.
#[derive(Debug, Default)]
struct SyncGate {
    st: Mutex<GateState>,
    cond: Condvar,
}

#[derive(Debug, Default)]
struct GateState {
    /// Sequence number of the last `fdatasync` started (the first is 1).
    started: u64,
    /// Sequence number of the last one finished (successfully or not).
    done: u64,
    running: bool,
}

impl fmt::Debug for VhdImage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VhdImage")
            .field("path", &self.path)
            .field("kind", &self.kind)
            .field("size_sectors", &self.size_sectors)
            .field("read_only", &self.read_only)
            .field("parent", &self.parent)
            .field("encrypted", &self.cipher.is_some())
            .finish()
    }
}

fn corrupt(path: &Path, what: impl Into<String>) -> ImageError {
    ImageError::Corrupt {
        path: path.display().to_string(),
        what: what.into(),
    }
}

/// Read and validate a footer of `n` bytes at `off` (511: the short footer, last byte 0).
fn read_footer_at(file: &dyn BlockFile, off: u64, n: usize) -> Result<Footer, String> {
    let mut b = [0u8; FOOTER_SIZE];
    file.read_at(&mut b[..n], off).map_err(|e| e.to_string())?;
    let f = Footer::decode(&b);
    f.validate().map_err(|e| e.to_string())?;
    Ok(f)
}

/// Find the footer: EOF-512, then the short footer at EOF-511, then the backup at 0.
pub fn find_footer(
    path: &Path,
    file: &dyn BlockFile,
    use_backup: bool,
) -> Result<(Footer, FooterSource), ImageError> {
    let len = file.len().map_err(|e| ImageError::io(path, "stat", e))?;
    if len < FOOTER_SIZE as u64 {
        return Err(corrupt(path, format!("file too small ({len} bytes)")));
    }
    let mut why = String::new();
    if !use_backup {
        match read_footer_at(file, len - FOOTER_SIZE as u64, FOOTER_SIZE) {
            Ok(f) => return Ok((f, FooterSource::Primary)),
            Err(e) => why = e,
        }
        if len % 512 == 511 {
            if let Ok(f) = read_footer_at(file, len - 511, 511) {
                return Ok((f, FooterSource::Short));
            }
        }
    }
    match read_footer_at(file, 0, FOOTER_SIZE) {
        // A fixed disk has no backup: sector 0 is guest data.
        Ok(f) if f.kind() != Some(DiskType::Fixed) => Ok((f, FooterSource::Backup)),
        _ if use_backup => Err(corrupt(path, "no valid backup footer")),
        _ => Err(corrupt(path, format!("no valid footer ({why})"))),
    }
}

/// Whether a VHD with this footer carries a batmap (libvhd's rule); `None` = only if the
/// header validates (creator tap 1.1).
fn batmap_rule(f: &Footer) -> Option<bool> {
    if f.kind() == Some(DiskType::Fixed) || !f.creator_is_tap() {
        return Some(false);
    }
    if f.crtr_ver >= 0x0001_0002 {
        Some(true)
    } else if f.crtr_ver == 0x0001_0001 {
        None
    } else {
        Some(false)
    }
}

/// Where a block (bitmap of `bm_secs` sectors, then data) may start at or after sector
/// `pos` so that its data is 4 KiB aligned: `(s + bm_secs) % 8 == 0`.
pub fn align_block_start(pos: u64, bm_secs: u32) -> u64 {
    let bm = u64::from(bm_secs);
    let r = (pos + bm) % 8;
    if r == 0 {
        pos
    } else {
        pos + (8 - r)
    }
}

impl VhdImage {
    /// Open one VHD file (no parent attached: unallocated sectors read as zeros).
    pub fn open(path: &Path, opts: &VhdOpenOptions) -> Result<VhdImage, ImageError> {
        let f = OsFile::open_with(path, !opts.read_only, opts.direct, &SysOpener)
            .map_err(|e| ImageError::io(path, "open", e))?;
        VhdImage::open_file(path, Arc::new(f), opts)
    }

    /// Open a VHD from an already open file.
    pub fn open_file(
        path: &Path,
        file: Arc<dyn BlockFile>,
        opts: &VhdOpenOptions,
    ) -> Result<VhdImage, ImageError> {
        let len = file.len().map_err(|e| ImageError::io(path, "stat", e))?;
        let (footer, footer_source) = find_footer(path, file.as_ref(), opts.use_backup_footer)?;
        let kind = footer
            .kind()
            .ok_or_else(|| corrupt(path, "bad disk type"))?;
        if !footer.curr_size.is_multiple_of(SECTOR_SIZE) && kind != DiskType::Fixed {
            return Err(corrupt(
                path,
                "virtual size is not a whole number of sectors",
            ));
        }
        let size_sectors = footer.curr_size / SECTOR_SIZE;
        let mut meta = Meta {
            footer,
            header: None,
            bat: Vec::new(),
            allocated: 0,
            bitmaps: HashMap::new(),
            bm_seq: 0,
            bat_secs: HashMap::new(),
            next_db: 0,
            reserve_end: 0,
            extending: false,
            batmap: None,
            dirty: false,
        };
        let mut geom = None;
        if kind == DiskType::Fixed {
            // Data [0, curr_size), then the (possibly 511-byte) footer.
            if footer.curr_size.checked_add(511).is_none_or(|e| e > len) {
                return Err(corrupt(path, "fixed disk is larger than its file"));
            }
        } else {
            let g = Self::load_dynamic(path, file.as_ref(), &mut meta, len, opts.read_only)?;
            geom = Some(g);
        }
        let img = VhdImage {
            path: path.to_path_buf(),
            file,
            read_only: opts.read_only,
            kind,
            size_sectors,
            geom,
            footer_source,
            prealloc_blocks: opts.prealloc_blocks.max(1),
            meta: Mutex::new(meta),
            cond: Condvar::new(),
            bm_cond: Condvar::new(),
            parent: None,
            cipher: None,
            closed: AtomicBool::new(false),
            sync_failed: AtomicBool::new(false),
            gate: SyncGate::default(),
        };
        if !img.read_only && footer_source != FooterSource::Primary {
            img.rewrite_primary_footer()?;
        }
        Ok(img)
    }

    fn load_dynamic(
        path: &Path,
        file: &dyn BlockFile,
        meta: &mut Meta,
        len: u64,
        read_only: bool,
    ) -> Result<Geom, ImageError> {
        let footer = meta.footer;
        let hoff = footer.data_offset;
        if hoff.checked_add(HEADER_SIZE as u64).is_none_or(|e| e > len) {
            return Err(corrupt(path, "dynamic header is past the end of the file"));
        }
        let mut hb = [0u8; HEADER_SIZE];
        file.read_at(&mut hb, hoff)
            .map_err(|e| ImageError::io(path, "read header", e))?;
        let header = DynHeader::decode(&hb);
        header
            .validate()
            .map_err(|e| corrupt(path, e.to_string()))?;
        let kind = footer.kind();
        let null_parent = header.prt_uuid == [0; 16];
        if kind == Some(DiskType::Dynamic) && !null_parent {
            // Allowed by libvhd (ignored); nothing to do.
        }
        let bs = u64::from(header.block_size);
        let max_bat = header.max_bat_size;
        let need = footer.curr_size.div_ceil(bs);
        if u64::from(max_bat) < need {
            return Err(corrupt(
                path,
                format!("BAT of {max_bat} entries is too small for the disk size"),
            ));
        }
        if u64::from(max_bat) * bs > MAX_SECTOR.saturating_add(1) * SECTOR_SIZE {
            return Err(corrupt(
                path,
                format!("BAT of {max_bat} blocks of {bs} bytes exceeds 2 TiB"),
            ));
        }
        if u64::from(max_bat) > MAX_BAT_ENTRIES {
            return Err(ImageError::Unsupported {
                path: path.display().to_string(),
                what: format!("BAT of {max_bat} entries of {bs} bytes"),
            });
        }
        let bat_bytes = u64::from(max_bat) * 4;
        let bat_off = header.table_offset;
        if bat_off.checked_add(bat_bytes).is_none_or(|e| e > len) {
            return Err(corrupt(path, "BAT is past the end of the file"));
        }
        // bat_bytes <= len, and reading it into memory is bounded by the file size.
        let nbytes = usize::try_from(bat_bytes).map_err(|_| corrupt(path, "BAT too large"))?;
        let mut raw = vec![0u8; nbytes];
        file.read_at(&mut raw, bat_off)
            .map_err(|e| ImageError::io(path, "read BAT", e))?;
        let spb = header.spb();
        let bm_secs = header.bitmap_sectors();
        let blk_secs = u64::from(spb) + u64::from(bm_secs);
        let mut bat = Vec::with_capacity(raw.len() / 4);
        let mut next_db = (bat_off + bat_bytes_padded(max_bat)) / SECTOR_SIZE;
        next_db = next_db.max((hoff + HEADER_SIZE as u64).div_ceil(SECTOR_SIZE));
        let mut allocated = 0u32;
        for (i, e) in decode_bat(&raw).into_iter().enumerate() {
            if e != BAT_UNUSED {
                let end = u64::from(e) + blk_secs;
                if end * SECTOR_SIZE > len {
                    return Err(corrupt(
                        path,
                        format!("BAT entry {i} ({e:#x}) points past the end of the file"),
                    ));
                }
                if u64::from(e) * SECTOR_SIZE < bat_off + bat_bytes
                    && u64::from(e) * SECTOR_SIZE + blk_secs * SECTOR_SIZE > bat_off
                {
                    return Err(corrupt(path, format!("BAT entry {i} overlaps the BAT")));
                }
                next_db = next_db.max(end);
                allocated += 1;
            }
            bat.push(e);
        }
        // Parent locators occupy space too.
        for l in &header.loc {
            if l.code == PLAT_NONE {
                continue;
            }
            if let Some(sp) = l.space_bytes() {
                let end = l.data_offset.saturating_add(sp);
                if end <= len {
                    next_db = next_db.max(end.div_ceil(SECTOR_SIZE));
                }
            }
        }
        // Batmap.
        let rule = batmap_rule(&footer);
        if rule != Some(false) {
            let hdr_off = bat_off + bat_bytes_padded(max_bat);
            let mut st = None;
            if hdr_off + BATMAP_HEADER_SIZE as u64 <= len {
                let mut b = [0u8; BATMAP_HEADER_SIZE];
                file.read_at(&mut b, hdr_off)
                    .map_err(|e| ImageError::io(path, "read batmap header", e))?;
                let h = BatmapHeader::decode(&b);
                let need_secs = batmap_sectors(max_bat);
                let ok = h.validate().is_ok()
                    && h.batmap_size >= need_secs
                    && h.batmap_size <= need_secs.saturating_mul(2).saturating_add(8)
                    && h.batmap_offset >= hdr_off + BATMAP_HEADER_SIZE as u64
                    && h.batmap_offset
                        .checked_add(u64::from(h.batmap_size) * SECTOR_SIZE)
                        .is_some_and(|e| e <= len);
                if ok {
                    let mlen = u64::from(h.batmap_size) * SECTOR_SIZE;
                    let mut map = vec![
                        0u8;
                        usize::try_from(mlen)
                            .map_err(|_| corrupt(path, "batmap too large"))?
                    ];
                    file.read_at(&mut map, h.batmap_offset)
                        .map_err(|e| ImageError::io(path, "read batmap", e))?;
                    let valid =
                        batmap_checksum(&map, footer.curr_size, h.batmap_version) == h.checksum;
                    if !valid {
                        // A hint only: forget it, rewrite at close.
                        map.iter_mut().for_each(|b| *b = 0);
                    }
                    next_db = next_db.max((h.batmap_offset + mlen).div_ceil(SECTOR_SIZE));
                    st = Some(BatmapState {
                        hdr_off,
                        hdr: h,
                        map,
                        valid,
                        dirty: !valid,
                        ahead: false,
                    });
                } else if rule == Some(true) && !read_only {
                    return Err(corrupt(path, "bad batmap header"));
                }
            } else if rule == Some(true) && !read_only {
                return Err(corrupt(path, "batmap header is past the end of the file"));
            }
            meta.batmap = st;
        }
        meta.header = Some(header);
        meta.bat = bat;
        meta.allocated = allocated;
        meta.next_db = next_db;
        meta.reserve_end = next_db;
        Ok(Geom {
            spb,
            bm_secs,
            bat_off,
            max_bat,
        })
    }

    // ----- accessors (for vhd-util and the chain opener) -----

    /// The path this image was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// The underlying file.
    pub fn file(&self) -> &Arc<dyn BlockFile> {
        &self.file
    }
    /// Disk type.
    pub fn disk_type(&self) -> DiskType {
        self.kind
    }
    /// Where the footer was found at open.
    pub fn footer_source(&self) -> FooterSource {
        self.footer_source
    }
    /// The current footer.
    pub fn footer(&self) -> Footer {
        self.lock().footer
    }
    /// The dynamic header (None for fixed disks).
    pub fn header(&self) -> Option<DynHeader> {
        self.lock().header.clone()
    }
    /// A copy of the BAT (empty for fixed disks).
    pub fn bat(&self) -> Vec<u32> {
        self.lock().bat.clone()
    }
    /// Number of allocated blocks.
    pub fn allocated_blocks(&self) -> u32 {
        self.lock().allocated
    }
    /// Sectors per block (0 for fixed disks).
    pub fn sectors_per_block(&self) -> u32 {
        self.geom.map_or(0, |g| g.spb)
    }
    /// Bytes up to the end of metadata and data plus the footer (libvhd "physical size").
    pub fn physical_size(&self) -> u64 {
        match self.kind {
            DiskType::Fixed => self.size_sectors * SECTOR_SIZE + FOOTER_SIZE as u64,
            _ => self.lock().next_db * SECTOR_SIZE + FOOTER_SIZE as u64,
        }
    }
    /// The batmap header and map, when the image has a (valid-cookie) batmap.
    pub fn batmap(&self) -> Option<(BatmapHeader, Vec<u8>)> {
        self.lock().batmap.as_ref().map(|b| (b.hdr, b.map.clone()))
    }
    /// Whether the on-disk batmap checksum verified at open.
    pub fn batmap_valid(&self) -> Option<bool> {
        self.lock().batmap.as_ref().map(|b| b.valid)
    }
    /// Whether the image has a parent (differencing disk).
    pub fn is_differencing(&self) -> bool {
        self.kind == DiskType::Differencing
    }
    /// The attached parent image, if any.
    pub fn parent(&self) -> Option<&dyn Image> {
        self.parent.as_deref()
    }

    /// The sector bitmap of block `blk` (None when unallocated or fixed).
    pub fn block_bitmap(&self, blk: u32) -> Result<Option<Vec<u8>>, ImageError> {
        let mut m = self.lock();
        match m.bat.get(blk as usize).copied() {
            Some(e) if e != BAT_UNUSED => Ok(Some(self.load_bitmap(&mut m, blk, e)?.bits.clone())),
            _ => Ok(None),
        }
    }

    /// Read the raw payload of a parent locator (bounded by its declared length).
    pub fn locator_data(&self, loc: &Locator) -> Result<Vec<u8>, ImageError> {
        let len = self.file_len()?;
        let space = loc
            .space_bytes()
            .ok_or_else(|| corrupt(&self.path, "bad parent locator data space"))?;
        let n = u64::from(loc.data_len);
        if n > space || n > 64 * 1024 || loc.data_offset.checked_add(n).is_none_or(|e| e > len) {
            return Err(corrupt(&self.path, "parent locator out of bounds"));
        }
        let mut b = vec![0u8; n as usize];
        self.file
            .read_at(&mut b, loc.data_offset)
            .map_err(|e| ImageError::io(&self.path, "read parent locator", e))?;
        Ok(b)
    }

    /// The keyhash: from the batmap header, or the xattr when there is no batmap.
    pub fn keyhash(&self) -> Result<KeyHash, ImageError> {
        if let Some(b) = self.lock().batmap.as_ref() {
            return Ok(KeyHash::from_bytes(&b.hdr.keyhash));
        }
        match self
            .file
            .get_xattr(XATTR_KEYHASH)
            .map_err(|e| ImageError::io(&self.path, "get keyhash xattr", e))?
        {
            Some(v) if v.len() == KeyHash::LEN => {
                let mut a = [0u8; KeyHash::LEN];
                a.copy_from_slice(&v);
                Ok(KeyHash::from_bytes(&a))
            }
            Some(v) => Err(corrupt(
                &self.path,
                format!("keyhash xattr has {} bytes", v.len()),
            )),
            None => Ok(KeyHash::default()),
        }
    }

    /// The marker byte: from the batmap header, or the xattr when there is no batmap.
    pub fn marker(&self) -> Result<u8, ImageError> {
        if let Some(b) = self.lock().batmap.as_ref() {
            return Ok(b.hdr.marker);
        }
        match self
            .file
            .get_xattr(XATTR_MARKER)
            .map_err(|e| ImageError::io(&self.path, "get marker xattr", e))?
        {
            Some(v) => Ok(v.first().copied().unwrap_or(0)),
            None => Ok(0),
        }
    }

    /// Store the keyhash (batmap header, or xattr) durably.
    pub fn set_keyhash(&self, kh: &KeyHash) -> Result<(), ImageError> {
        self.writable()?;
        let mut m = self.lock();
        let curr = m.footer.curr_size;
        if let Some(b) = m.batmap.as_mut() {
            b.hdr.keyhash = kh.to_bytes();
            self.write_batmap_header(b, curr)?;
            return self.sync();
        }
        drop(m);
        self.file
            .set_xattr(XATTR_KEYHASH, &kh.to_bytes())
            .map_err(|e| ImageError::io(&self.path, "set keyhash xattr", e))
    }

    /// Store the marker byte (batmap header, or xattr) durably.
    pub fn set_marker(&self, v: u8) -> Result<(), ImageError> {
        self.writable()?;
        let mut m = self.lock();
        let curr = m.footer.curr_size;
        if let Some(b) = m.batmap.as_mut() {
            b.hdr.marker = v;
            self.write_batmap_header(b, curr)?;
            return self.sync();
        }
        drop(m);
        self.file
            .set_xattr(XATTR_MARKER, &[v])
            .map_err(|e| ImageError::io(&self.path, "set marker xattr", e))
    }

    /// Set the footer's hidden byte (primary and backup rewritten, synced).
    pub fn set_hidden(&self, v: u8) -> Result<(), ImageError> {
        self.update_footer(|f| f.hidden = v)
    }

    /// Change footer fields and write both copies durably.
    pub fn update_footer(&self, f: impl FnOnce(&mut Footer)) -> Result<(), ImageError> {
        self.writable()?;
        let mut m = self.lock();
        let old_size = m.footer.curr_size;
        f(&mut m.footer);
        let curr = m.footer.curr_size;
        if curr != old_size {
            // The batmap checksum covers a length derived from the virtual size.
            if let Some(b) = m.batmap.as_mut() {
                self.write_batmap_header(b, curr)?;
            }
        }
        let b = m.footer.encode();
        let len = self.file_len()?;
        self.pwrite(&b, len - FOOTER_SIZE as u64, "write footer")?;
        if self.kind != DiskType::Fixed {
            self.sync()?;
            self.pwrite(&b, 0, "write backup footer")?;
        }
        self.sync()
    }

    /// Change header fields and write the header durably.
    pub fn update_header(&self, f: impl FnOnce(&mut DynHeader)) -> Result<(), ImageError> {
        self.writable()?;
        let mut m = self.lock();
        let off = m.footer.data_offset;
        let Some(h) = m.header.as_mut() else {
            return Err(ImageError::Invalid("fixed disks have no header".into()));
        };
        f(h);
        let b = h.encode();
        self.pwrite(&b, off, "write header")?;
        self.sync()
    }

    /// Write the footer at the end of data (dropping anything after it) and, for dynamic
    /// disks, the backup copy at offset 0; synced (vhd-util repair).
    pub fn rewrite_footers(&self) -> Result<(), ImageError> {
        self.writable()?;
        self.rewrite_primary_footer()?;
        if self.kind != DiskType::Fixed {
            let mut f = self.lock().footer;
            self.pwrite(&f.encode(), 0, "write backup footer")?;
            self.sync()?;
        }
        Ok(())
    }

    /// Put the footer at `bytes - 512` (vhd-util modify -s); `bytes` must cover all data.
    pub fn set_physical_size(&self, bytes: u64) -> Result<(), ImageError> {
        self.writable()?;
        if !self.file.resizable() {
            return Err(ImageError::Invalid("cannot resize a block device".into()));
        }
        let mut m = self.lock();
        if bytes < m.next_db * SECTOR_SIZE + FOOTER_SIZE as u64
            || !bytes.is_multiple_of(SECTOR_SIZE)
        {
            return Err(ImageError::Invalid(format!(
                "physical size {bytes} is below the end of data or not sector aligned"
            )));
        }
        let mut f = m.footer;
        self.pwrite(&f.encode(), bytes - FOOTER_SIZE as u64, "write footer")?;
        self.sync()?;
        self.file
            .set_len(bytes)
            .map_err(|e| ImageError::io(&self.path, "truncate", e))?;
        m.reserve_end = m.next_db;
        self.sync()
    }

    /// Mark every block unallocated (vhd-util modify -z); data becomes unreachable.
    pub fn zero_bat(&self) -> Result<(), ImageError> {
        self.writable()?;
        let g = self.geom_or_err()?;
        let mut m = self.lock();
        m.bat.iter_mut().for_each(|e| *e = BAT_UNUSED);
        m.bitmaps.clear();
        m.allocated = 0;
        // Invariant 4: the emptied batmap is durable before the BAT drops the blocks, so
        // the batmap never marks a block full that the BAT no longer holds.
        let curr = m.footer.curr_size;
        if let Some(b) = m.batmap.as_mut() {
            b.map.iter_mut().for_each(|x| *x = 0);
            self.write_batmap(b, curr)?;
            self.sync()?;
        }
        let raw = encode_bat(&m.bat);
        self.pwrite(&raw, g.bat_off, "write BAT")?;
        m.bat_secs.clear(); // the whole BAT is on disk as in memory
        m.dirty = true;
        self.sync()
    }

    /// Clear, in block `blk`'s sector bitmap, every bit that is set in `mask` (a bitmap of
    /// the same block size), as `vhd-util coalesce -a` does on the layers between child
    /// and ancestor: those sectors then read from below. Like a discard, the batmap's
    /// "full" bit is cleared durably before the bitmap loses bits. Returns whether the
    /// bitmap changed (false for an unallocated block).
    pub fn clear_bitmap_bits(&self, blk: u32, mask: &[u8]) -> Result<bool, ImageError> {
        self.writable()?;
        let mut m = self.lock();
        let Some(e) = m
            .bat
            .get(blk as usize)
            .copied()
            .filter(|&e| e != BAT_UNUSED)
        else {
            return Ok(false);
        };
        let mut nbm = self.load_bitmap(&mut m, blk, e)?.bits.clone();
        let mut changed = false;
        for (b, &k) in nbm.iter_mut().zip(mask) {
            if *b & k != 0 {
                *b &= !k;
                changed = true;
            }
        }
        if !changed {
            return Ok(false);
        }
        let curr = m.footer.curr_size;
        if let Some(b) = m.batmap.as_mut() {
            if bit_test(&b.map, u64::from(blk)) {
                bit_set(&mut b.map, u64::from(blk), false);
                self.rewrite_batmap(b, curr)?;
            }
        }
        let ver = m
            .change_bitmap(blk, |bm| bm.copy_from_slice(&nbm))
            .ok_or_else(|| corrupt(&self.path, "bitmap cache"))?;
        let (_m, r) = self.persist_bitmap(m, blk, e, ver);
        r?;
        self.sync()?;
        Ok(true)
    }

    /// [`VhdImage::clear_bitmap_bits`] for a whole layer at once, with two syncs instead of
    /// one or two per block. `mask_of(blk)` gives the mask for each allocated block of this
    /// layer (`None`: leave the block alone); it is called up to twice per block, must
    /// return the same mask each time, and must not use this image (our lock is held).
    /// Returns the number of bitmaps changed.
    ///
    /// Crash ordering (the same states the per-block path allows, module doc invariant 4):
    /// the caller has made the sectors being uncovered durable below (`vhd-util coalesce -a`
    /// flushes the ancestor first). Pass 1 finds the blocks whose bitmap loses bits and
    /// clears their "full" batmap bits in memory; the batmap is written once and **synced**
    /// before any bitmap is touched, so on disk the batmap never claims a block full whose
    /// bitmap has lost bits (a crash before that sync leaves the old batmap, or one with a
    /// bad checksum, which reads as "nothing full"). Pass 2 writes every changed bitmap,
    /// then **syncs** once. Any subset of those bitmap writes reaching the disk is a
    /// consistent chain: a cleared bit only makes the sector read from below, which
    /// already holds the same data durably, and a bit not yet cleared reads this layer's
    /// old sector as before. Bits are only ever cleared, never set, so no BAT/bitmap
    /// invariant (1) is at stake. An error mid-way can leave the in-memory batmap with
    /// bits cleared that are not on disk yet: it then understates fullness, which is safe.
    /// For an image nobody writes meanwhile (`vhd-util coalesce` has it to itself): pass
    /// 2 lets go of the lock while each bitmap is written, and a concurrent write filling
    /// a block of `changed` could mark it full in the batmap again.
    pub fn clear_bitmap_bits_batch(
        &self,
        mask_of: &mut dyn FnMut(u32) -> Result<Option<Vec<u8>>, ImageError>,
    ) -> Result<u64, ImageError> {
        self.writable()?;
        let mut m = self.lock();
        let mut changed: Vec<u32> = Vec::new();
        let mut batmap_changed = false;
        for i in 0..m.bat.len() {
            let e = m.bat[i];
            if e == BAT_UNUSED {
                continue;
            }
            let blk = u32::try_from(i).map_err(|_| corrupt(&self.path, "block number"))?;
            let Some(mask) = mask_of(blk)? else {
                continue;
            };
            let bm = &self.load_bitmap(&mut m, blk, e)?.bits;
            if !bm.iter().zip(&mask).any(|(&b, &k)| b & k != 0) {
                continue;
            }
            changed.push(blk);
            if let Some(b) = m.batmap.as_mut() {
                if bit_test(&b.map, u64::from(blk)) {
                    bit_set(&mut b.map, u64::from(blk), false);
                    batmap_changed = true;
                }
            }
        }
        if changed.is_empty() {
            return Ok(0);
        }
        if batmap_changed {
            let curr = m.footer.curr_size;
            if let Some(b) = m.batmap.as_mut() {
                self.rewrite_batmap(b, curr)?;
            }
        }
        let mut n = 0u64;
        for &blk in &changed {
            let e = m.bat[blk as usize];
            let Some(mask) = mask_of(blk)? else {
                continue;
            };
            self.load_bitmap(&mut m, blk, e)?;
            let ver = m
                .change_bitmap(blk, |bm| {
                    bm.iter_mut().zip(&mask).for_each(|(b, &k)| *b &= !k);
                })
                .ok_or_else(|| corrupt(&self.path, "bitmap cache"))?;
            let (g, r) = self.persist_bitmap(m, blk, e, ver);
            m = g;
            r?;
            n += 1;
        }
        self.sync()?;
        Ok(n)
    }

    /// Return once the disk holds block `blk`'s bitmap (the block starts at sector
    /// `entry`) at version `ver` or newer ([`CachedBitmap`]). The write runs without the
    /// image lock, so reads, allocations, other blocks' bitmap updates and the loop's
    /// [`Image::direct_map`] go on meanwhile. One write per block at a time, each carrying
    /// the latest bits: callers that change the same bitmap meanwhile wait, and the next
    /// write covers all of them (group commit per block); no older copy can land after a
    /// newer one. A failed write leaves the entry dirty (the disk may hold either copy,
    /// the sectors being written may even be torn): the next caller that needs the bitmap
    /// on disk writes it again, as does close, and until then no write to those sectors
    /// is acknowledged (the loop maps one only to be committed). A successful write of a
    /// full bitmap marks the block full in the in-memory batmap (written at close,
    /// invariant 4). [`VhdImage::persist_many`] for one bitmap.
    fn persist_bitmap<'a>(
        &'a self,
        m: MutexGuard<'a, Meta>,
        blk: u32,
        entry: u32,
        ver: u64,
    ) -> (MutexGuard<'a, Meta>, Result<(), ImageError>) {
        let (m, mut r, _) = self.persist_many(m, &[(blk, entry, ver)], &[]);
        (m, r.pop().unwrap_or(Ok(())))
    }

    /// After `snap` was written as block `blk`'s bitmap: a full bitmap, and still full in
    /// the cache (a discard may have cleared bits since the copy was taken; it holds the
    /// lock from its batmap check to its change), marks the block full in the in-memory
    /// batmap (written at close, invariant 4).
    fn mark_if_full(&self, m: &mut Meta, blk: u32, snap: &[u8]) {
        let spb = self.geom.map_or(0, |g| u64::from(g.spb));
        let full_now = m
            .bitmaps
            .get(&blk)
            .is_some_and(|c| bits_all(&c.bits, 0, spb, true));
        if bits_all(snap, 0, spb, true) && full_now {
            if let Some(b) = m.batmap.as_mut() {
                if !bit_test(&b.map, u64::from(blk)) {
                    bit_set(&mut b.map, u64::from(blk), true);
                    b.dirty = true;
                    b.ahead = true;
                }
            }
        }
    }

    /// Return once the disk holds each bitmap `(blk, entry, version)` and each BAT sector
    /// `(index, version)` at that version or newer, with one result each (bitmaps, then
    /// BAT sectors), as [`VhdImage::persist_bitmap`] does for one bitmap. Every one of them
    /// that is neither there yet nor being written by another thread is written, all at
    /// once ([`BlockFile::write_many`]: one Linux AIO batch on an `O_DIRECT` file), each
    /// from a copy of its latest state taken under the lock; then the ones another thread
    /// was writing are waited for (and written again if that write did not reach their
    /// version). A write that fails is that item's error (the entry stays dirty, to be
    /// written again by the next caller that needs it, or at close). The order among the
    /// writes does not matter: a BAT entry may point at its block before or after the
    /// block's bitmap is written (invariant 1: a reserve block's bitmap is zero on disk,
    /// and bits are set in the cache only after their data is durable, invariant 2).
    fn persist_many<'a>(
        &'a self,
        mut m: MutexGuard<'a, Meta>,
        bitmaps: &[(u32, u32, u64)],
        secs: &[(u32, u64)],
    ) -> Persisted<'a> {
        let nb = bitmaps.len();
        let mut res: Vec<Option<Result<(), ImageError>>> =
            (0..nb + secs.len()).map(|_| None).collect();
        loop {
            // (item, the copy to write, its offset, its version)
            let mut claimed: Vec<(usize, Vec<u8>, u64, u64)> = Vec::new();
            let mut busy = false;
            // BAT sectors first: the order does not matter to the disk, but a file that
            // writes one after another (the simulation, fault injection) then knows the
            // block before its bitmap.
            for (k, &(sec, ver)) in secs.iter().enumerate() {
                let i = nb + k;
                if res[i].is_some() {
                    continue;
                }
                let Some(b) = m.bat_secs.get(&sec).copied() else {
                    res[i] = Some(Ok(()));
                    continue;
                };
                if b.on_disk >= ver {
                    res[i] = Some(Ok(()));
                } else if b.writing {
                    busy = true;
                } else {
                    match self.bat_sector(&m, sec) {
                        Ok((bytes, off)) => {
                            if let Some(b) = m.bat_secs.get_mut(&sec) {
                                b.writing = true;
                            }
                            claimed.push((i, bytes, off, b.version));
                        }
                        Err(e) => res[i] = Some(Err(e)),
                    }
                }
            }
            for (i, &(blk, entry, ver)) in bitmaps.iter().enumerate() {
                if res[i].is_some() {
                    continue;
                }
                // An entry is evicted only when clean, i.e. once a write reached its version.
                match m.bitmaps.get_mut(&blk) {
                    Some(c) if c.on_disk < ver && c.writing => busy = true,
                    Some(c) if c.on_disk < ver => {
                        c.writing = true;
                        let off = u64::from(entry) * SECTOR_SIZE;
                        claimed.push((i, c.bits.clone(), off, c.version));
                    }
                    _ => res[i] = Some(Ok(())),
                }
            }
            if claimed.is_empty() {
                if !busy {
                    break;
                }
                m = self.bm_cond.wait(m).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            drop(m);
            let mut unwind = Writing {
                img: self,
                blks: claimed
                    .iter()
                    .filter(|c| c.0 < nb)
                    .map(|c| bitmaps[c.0].0)
                    .collect(),
                secs: claimed
                    .iter()
                    .filter(|c| c.0 >= nb)
                    .map(|c| secs[c.0 - nb].0)
                    .collect(),
                armed: true,
            };
            let writes: Vec<(&[u8], u64)> = claimed
                .iter()
                .map(|(_, bytes, off, _)| (bytes.as_slice(), *off))
                .collect();
            let results = self.file.write_many(&writes);
            unwind.armed = false;
            m = self.lock();
            for ((i, bytes, _, v), r) in claimed.iter().zip(results) {
                if *i < nb {
                    let blk = bitmaps[*i].0;
                    if let Some(c) = m.bitmaps.get_mut(&blk) {
                        c.writing = false;
                        if r.is_ok() {
                            c.on_disk = c.on_disk.max(*v);
                        }
                    }
                    if r.is_ok() {
                        self.mark_if_full(&mut m, blk, bytes);
                    }
                } else if let Some(b) = m.bat_secs.get_mut(&secs[*i - nb].0) {
                    b.writing = false;
                    if r.is_ok() {
                        b.on_disk = b.on_disk.max(*v);
                    }
                }
                if let Err(e) = r {
                    let what = if *i < nb { "write bitmap" } else { "write BAT" };
                    res[*i] = Some(Err(ImageError::io(&self.path, what, e)));
                }
            }
            self.bm_cond.notify_all();
        }
        // A BAT sector on disk as in memory needs no entry any more.
        m.bat_secs.retain(|_, b| !b.clean());
        let mut res = res.into_iter().map(|r| r.unwrap_or(Ok(())));
        let rb: Vec<_> = res.by_ref().take(nb).collect();
        (m, rb, res.collect())
    }

    /// BAT sector `sec` as it is in memory, and its offset in the file.
    fn bat_sector(&self, m: &Meta, sec: u32) -> Result<(Vec<u8>, u64), ImageError> {
        let g = self.geom_or_err()?;
        let first = sec * BAT_PER_SECTOR;
        let last = (first + BAT_PER_SECTOR).min(g.max_bat);
        let entries = m
            .bat
            .get(first as usize..last as usize)
            .ok_or_else(|| corrupt(&self.path, "BAT sector out of range"))?;
        Ok((encode_bat(entries), g.bat_off + u64::from(first) * 4))
    }

    /// Write raw bytes into the metadata area (locators); used by snapshot/reparent.
    pub(crate) fn write_raw(&self, buf: &[u8], off: u64) -> Result<(), ImageError> {
        self.writable()?;
        self.pwrite(buf, off, "write")
    }

    /// Attach the parent image (chain opener).
    pub(crate) fn set_parent(&mut self, parent: Box<dyn Image>) {
        self.parent = Some(parent);
    }

    /// Install the cipher for this layer's data (chain opener).
    pub(crate) fn set_cipher(&mut self, cipher: Option<Arc<XtsCipher>>) {
        self.cipher = cipher;
    }

    // ----- internals -----

    fn lock(&self) -> MutexGuard<'_, Meta> {
        self.meta.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn file_len(&self) -> Result<u64, ImageError> {
        self.file
            .len()
            .map_err(|e| ImageError::io(&self.path, "stat", e))
    }

    fn pwrite(&self, buf: &[u8], off: u64, op: &'static str) -> Result<(), ImageError> {
        self.file
            .write_at(buf, off)
            .map_err(|e| ImageError::io(&self.path, op, e))
    }

    fn pread(&self, buf: &mut [u8], off: u64, op: &'static str) -> Result<(), ImageError> {
        self.file
            .read_at(buf, off)
            .map_err(|e| ImageError::io(&self.path, op, e))
    }

    /// `fdatasync` the file. Once one has failed, every later one fails too (EIO) until
    /// the image is reopened: after a writeback error Linux may have dropped the dirty
    /// data and reports the error only once, so a later `fdatasync` that succeeds proves
    /// nothing about the writes before it (PostgreSQL's "fsyncgate"). Hence no flush is
    /// answered with success, no block is allocated (a reserve needs a trusted sync,
    /// invariant 1), no new bitmap bit is set (invariant 2) and close fails, while reads
    /// and writes to sectors already marked present go on (they claim no durability). A
    /// reopen reads the disk as it is.
    fn sync(&self) -> Result<(), ImageError> {
        crate::image::sticky_sync(self.file.as_ref(), &self.path, &self.sync_failed)
    }

    /// Return once an `fdatasync` that *started after this call* has finished successfully,
    /// so every write completed before the call is durable (invariant 2). Concurrent
    /// callers share one `fdatasync`: a caller waits for the one running if it started
    /// after the call, else for the next, which the first waiter to find none running
    /// starts. No image lock is held. Fails if that sync (or any earlier one) failed:
    /// [`VhdImage::sync`] makes the failure sticky.
    fn data_barrier(&self) -> Result<(), ImageError> {
        let gate = &self.gate;
        let lock = || gate.st.lock().unwrap_or_else(|e| e.into_inner());
        let mut st = lock();
        let need = st.started + 1;
        while st.done < need {
            if st.running {
                st = gate.cond.wait(st).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            // Nothing running and done < need: started == done < need, so the sync we
            // start now has a sequence number >= need.
            st.started += 1;
            st.running = true;
            let seq = st.started;
            drop(st);
            let mut unwind = SyncRunning {
                img: self,
                seq,
                armed: true,
            };
            let r = self.sync();
            unwind.armed = false;
            st = lock();
            st.done = seq;
            st.running = false;
            gate.cond.notify_all();
            r?;
        }
        drop(st);
        if self.sync_failed.load(Ordering::Acquire) {
            // The sync we waited for, or a later one, failed: the data may not be durable.
            return Err(ImageError::io(
                &self.path,
                "fdatasync before a bitmap update (one failed: durability unknown until reopened)",
                std::io::Error::from_raw_os_error(libc::EIO),
            ));
        }
        Ok(())
    }

    fn live(&self) -> Result<(), ImageError> {
        check_usable(&self.closed, self.read_only, false)
    }

    fn writable(&self) -> Result<(), ImageError> {
        check_usable(&self.closed, self.read_only, true)
    }

    /// RW open after recovering from the backup/short footer: put a valid primary back.
    fn rewrite_primary_footer(&self) -> Result<(), ImageError> {
        let mut m = self.lock();
        m.reserve_end = m.next_db;
        let mut f = m.footer;
        let b = f.encode();
        if self.kind == DiskType::Fixed || !self.file.resizable() {
            let len = self.file_len()?;
            let off = if self.kind == DiskType::Fixed {
                self.size_sectors * SECTOR_SIZE
            } else {
                len - FOOTER_SIZE as u64
            };
            self.pwrite(&b, off, "write footer")?;
            if self.kind == DiskType::Fixed && self.file.resizable() {
                self.file
                    .set_len(off + FOOTER_SIZE as u64)
                    .map_err(|e| ImageError::io(&self.path, "truncate", e))?;
            }
            return self.sync();
        }
        let end = m.next_db * SECTOR_SIZE;
        self.pwrite(&b, end, "write footer")?;
        self.sync()?;
        self.file
            .set_len(end + FOOTER_SIZE as u64)
            .map_err(|e| ImageError::io(&self.path, "truncate", e))?;
        self.sync()
    }

    fn load_bitmap<'a>(
        &self,
        m: &'a mut Meta,
        blk: u32,
        entry: u32,
    ) -> Result<&'a mut CachedBitmap, ImageError> {
        if !m.bitmaps.contains_key(&blk) {
            let g = self.geom_or_err()?;
            make_room(m);
            let mut b = vec![0u8; g.bm_secs as usize * SECTOR_SIZE as usize];
            self.pread(&mut b, u64::from(entry) * SECTOR_SIZE, "read bitmap")?;
            let seq = m.bm_seq;
            m.bitmaps.insert(blk, CachedBitmap::loaded(b, seq));
        }
        m.bitmaps
            .get_mut(&blk)
            .ok_or_else(|| corrupt(&self.path, "bitmap cache"))
    }

    fn geom_or_err(&self) -> Result<Geom, ImageError> {
        self.geom
            .ok_or_else(|| ImageError::Invalid("not a dynamic disk".into()))
    }

    fn write_batmap_header(&self, b: &mut BatmapState, curr: u64) -> Result<(), ImageError> {
        b.hdr.batmap_version = BATMAP_VERSION;
        b.hdr.checksum = batmap_checksum(&b.map, curr, BATMAP_VERSION);
        self.pwrite(&b.hdr.encode(), b.hdr_off, "write batmap header")
    }

    fn write_batmap(&self, b: &mut BatmapState, curr: u64) -> Result<(), ImageError> {
        self.pwrite(&b.map, b.hdr.batmap_offset, "write batmap")?;
        self.write_batmap_header(b, curr)?;
        b.dirty = false;
        Ok(())
    }

    /// Write the batmap before a bitmap loses bits (invariant 4), then sync, so that it is
    /// durable before the caller clears any bit. When the in-memory map marks blocks full
    /// whose full bitmaps were written but maybe not synced yet (`ahead`:
    /// [`VhdImage::persist_bitmap`] marks them once written), sync first too: the bitmaps
    /// the batmap summarises must be durable before it. The caller holds the image lock,
    /// so no block is marked meanwhile.
    fn rewrite_batmap(&self, b: &mut BatmapState, curr: u64) -> Result<(), ImageError> {
        if b.ahead {
            self.sync()?;
            b.ahead = false;
        }
        self.write_batmap(b, curr)?;
        self.sync()
    }

    /// Return the start sector of block `blk`, allocating it if needed (see module doc):
    /// from the reserve, growing it first when it has no room, and writing its BAT sector
    /// (as allocations on the loop, [`Image::direct_map`], leave it to their commit).
    fn ensure_allocated(&self, blk: u32) -> Result<u64, ImageError> {
        let g = self.geom_or_err()?;
        let mut m = self.lock();
        loop {
            let e = m.bat[blk as usize];
            if e != BAT_UNUSED {
                return Ok(u64::from(e));
            }
            if let Some(s) = take_reserve(&mut m, blk, g) {
                // On a worker the BAT sector is written right away, under the lock, before
                // the data (unless another thread is writing it: then the commit does).
                let sec = blk / BAT_PER_SECTOR;
                if m.bat_secs.get(&sec).is_some_and(|b| b.writing) {
                    return Ok(s);
                }
                let r = self
                    .bat_sector(&m, sec)
                    .and_then(|(bytes, off)| self.pwrite(&bytes, off, "write BAT"));
                match r {
                    Ok(()) => {
                        m.bat_secs.remove(&sec); // on disk as in memory
                        return Ok(s);
                    }
                    Err(err) => {
                        // The failed write may have landed, whole or in part: the BAT on
                        // disk may point at `s`. Never give `s` to another block (two
                        // entries on one block); skip it. Its bitmap is zero on disk, so an
                        // entry left pointing at it reads as unwritten (invariant 1), and
                        // the sector stays dirty: the next commit in it, or close, writes it
                        // again without the entry.
                        m.bat[blk as usize] = BAT_UNUSED;
                        m.allocated -= 1;
                        m.bitmaps.remove(&blk);
                        if g.bat_aligned() {
                            m.bat_changed(sec);
                        } else {
                            // Written again, under the lock, by the next allocation in it.
                            m.bat_secs.remove(&sec);
                        }
                        return Err(err);
                    }
                }
            }
            if m.extending {
                m = self.cond.wait(m).unwrap_or_else(|e| e.into_inner());
                continue;
            }
            m.extending = true;
            let from = m.next_db;
            let want = self.prealloc_blocks.min(g.max_bat - m.allocated).max(1);
            drop(m);
            let r = self.extend(from, want, g);
            m = self.lock();
            m.extending = false;
            self.cond.notify_all();
            match r {
                Ok(new_end) => m.reserve_end = new_end,
                Err(e) => return Err(e),
            }
        }
    }

    /// Make `[from, end)` a durable zeroed reserve for up to `want` blocks; returns `end`.
    fn extend(&self, from: u64, want: u32, g: Geom) -> Result<u64, ImageError> {
        let len = self.file_len()?;
        let limit = if self.file.resizable() {
            MAX_SECTOR
        } else {
            (len / SECTOR_SIZE).saturating_sub(1).min(MAX_SECTOR)
        };
        let mut bitmaps = Vec::new();
        let mut pos = from;
        for _ in 0..want {
            let s = align_block_start(pos, g.bm_secs);
            let end = s + u64::from(g.bm_secs) + u64::from(g.spb);
            if end > limit {
                break;
            }
            bitmaps.push(s);
            pos = end;
        }
        if bitmaps.is_empty() {
            return Err(ImageError::NoSpace(format!(
                "{}: no room for another block",
                self.path.display()
            )));
        }
        let zero = vec![0u8; g.bm_secs as usize * SECTOR_SIZE as usize];
        for &s in &bitmaps {
            if s * SECTOR_SIZE < len {
                self.pwrite(&zero, s * SECTOR_SIZE, "zero bitmap")?;
            }
        }
        let end_b = pos * SECTOR_SIZE;
        // `>=`: an earlier attempt that failed after extending the file left no footer at
        // the end; write it now.
        if self.file.resizable() && end_b + FOOTER_SIZE as u64 >= len {
            if end_b + FOOTER_SIZE as u64 > len {
                self.file
                    .set_len(end_b + FOOTER_SIZE as u64)
                    .map_err(|e| ImageError::io(&self.path, "extend", e))?;
            }
            let mut f = self.lock().footer;
            if let Err(e) = self.pwrite(&f.encode(), end_b, "write footer") {
                // No valid footer at the new end: give the file its old end back, where
                // the old footer still is (nothing has zeroed it yet).
                if end_b + FOOTER_SIZE as u64 > len {
                    let _ = self.file.set_len(len);
                }
                return Err(e);
            }
        }
        // The alignment gaps before the new blocks may hold stale bytes of the old file,
        // typically the old footer at the old end of data: zero them as libvhd and
        // tapdisk do, after the new footer is written (the sync below covers both).
        let mut prev = from;
        for &s in &bitmaps {
            let (lo, hi) = (prev * SECTOR_SIZE, (s * SECTOR_SIZE).min(len));
            if hi > lo {
                let z = vec![0u8; usize::try_from(hi - lo).unwrap_or(0)];
                self.pwrite(&z, lo, "zero gap")?;
            }
            prev = s + u64::from(g.bm_secs) + u64::from(g.spb);
        }
        // An old footer further out (the end of an earlier session's reserve) may sit in
        // a new block's data area: zero it too.
        if let Some(old) = len.checked_sub(FOOTER_SIZE as u64) {
            if old >= from * SECTOR_SIZE && old + FOOTER_SIZE as u64 <= end_b {
                self.pwrite(&[0u8; FOOTER_SIZE], old, "zero old footer")?;
            }
        }
        self.sync()?;
        Ok(pos)
    }

    fn read_parent(&self, sector: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        let Some(p) = &self.parent else {
            buf.fill(0);
            return Ok(());
        };
        let psize = p.info().size_sectors;
        let n = (buf.len() as u64 / SECTOR_SIZE).min(psize.saturating_sub(sector));
        // n <= buf.len() / 512.
        let nb = (n * SECTOR_SIZE) as usize;
        if n > 0 {
            p.read(sector, &mut buf[..nb])?;
        }
        buf[nb..].fill(0);
        Ok(())
    }

    fn parent_status(&self, sector: u64, n: u64, out: &mut Vec<Extent>) -> Result<(), ImageError> {
        let psize = self.parent.as_ref().map_or(0, |p| p.info().size_sectors);
        let inp = n.min(psize.saturating_sub(sector));
        if inp > 0 {
            if let Some(p) = &self.parent {
                for e in p.block_status(sector, inp)? {
                    push_extent(out, e.sector, e.nsectors, e.allocated);
                }
            }
        }
        if inp < n {
            push_extent(out, sector + inp, n - inp, false);
        }
        Ok(())
    }

    /// Split `[sector, sector+n)` into per-block chunks: (block, offset in block, count).
    fn chunks(&self, sector: u64, n: u64) -> impl Iterator<Item = (u32, u32, u64)> + '_ {
        let spb = u64::from(self.geom.map_or(1, |g| g.spb));
        let mut cur = sector;
        let end = sector + n;
        std::iter::from_fn(move || {
            if cur >= end {
                return None;
            }
            let blk = cur / spb;
            let off = cur % spb;
            let cnt = (spb - off).min(end - cur);
            cur += cnt;
            // blk < max_bat (u32) because the disk size is covered by the BAT; off < spb.
            Some((blk as u32, off as u32, cnt))
        })
    }

    /// For `cnt` sectors at offset `off` of block `blk`: `None` when the block is not
    /// allocated, else its BAT entry and the runs `(present, first, len)` of its bitmap
    /// (`first` relative to `off`).
    fn block_runs(
        &self,
        blk: u32,
        off: u32,
        cnt: u64,
    ) -> Result<Option<(u32, Vec<Run>)>, ImageError> {
        let mut m = self.lock();
        let e = m.bat[blk as usize];
        if e == BAT_UNUSED {
            return Ok(None);
        }
        let bm = &self.load_bitmap(&mut m, blk, e)?.bits;
        let mut runs = Vec::new();
        let mut i = 0u64;
        while i < cnt {
            let (v, r) = bit_run(bm, u64::from(off) + i, cnt - i);
            runs.push((v, i, r));
            i += r;
        }
        Ok(Some((e, runs)))
    }

    fn read_dynamic(&self, sector: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        let g = self.geom_or_err()?;
        let mut done = 0usize;
        for (blk, off, cnt) in self.chunks(sector, buf.len() as u64 / SECTOR_SIZE) {
            let csec = u64::from(blk) * u64::from(g.spb) + u64::from(off);
            let nb = (cnt * SECTOR_SIZE) as usize;
            let chunk = &mut buf[done..done + nb];
            done += nb;
            let Some((entry, runs)) = self.block_runs(blk, off, cnt)? else {
                self.read_parent(csec, chunk)?;
                continue;
            };
            let data0 = u64::from(entry) + u64::from(g.bm_secs) + u64::from(off);
            for (set, i, r) in runs {
                let sub = &mut chunk[(i * SECTOR_SIZE) as usize..((i + r) * SECTOR_SIZE) as usize];
                if set {
                    self.pread(sub, (data0 + i) * SECTOR_SIZE, "read")?;
                    if let Some(c) = &self.cipher {
                        c.decrypt_sectors(csec + i, sub);
                    }
                } else {
                    self.read_parent(csec + i, sub)?;
                }
            }
        }
        Ok(())
    }

    /// Write bytes as they are to be stored (already encrypted when the layer is keyed).
    fn write_plain(&self, sector: u64, data: &[u8]) -> Result<(), ImageError> {
        if self.kind == DiskType::Fixed {
            return self.pwrite(data, sector * SECTOR_SIZE, "write");
        }
        self.write_dynamic(sector, data)
    }

    fn write_dynamic(&self, sector: u64, buf: &[u8]) -> Result<(), ImageError> {
        let g = self.geom_or_err()?;
        let mut done = 0usize;
        for (blk, off, cnt) in self.chunks(sector, buf.len() as u64 / SECTOR_SIZE) {
            let nb = (cnt * SECTOR_SIZE) as usize;
            let chunk = &buf[done..done + nb];
            done += nb;
            let s = self.ensure_allocated(blk)?;
            let entry = s as u32; // s <= MAX_SECTOR (a BAT entry)
            let data0 = s + u64::from(g.bm_secs) + u64::from(off);
            self.pwrite(chunk, data0 * SECTOR_SIZE, "write")?;
            let c = Chunk {
                blk,
                entry,
                off: u64::from(off),
                cnt,
            };
            for r in self.commit_chunks(&[c]) {
                r?;
            }
        }
        Ok(())
    }

    /// The second half of writes whose data is in the file (a worker's [`VhdImage::write`],
    /// or the loop's asynchronous writes through [`Image::commit_writes`]): make each
    /// chunk read as written, and return one result per chunk. Chunks whose bits are all
    /// set already only wait until their block's bitmap is on disk as cached. For the
    /// others, the data must be durable before the bitmap sector that exposes it is
    /// written (invariant 2): one [`VhdImage::data_barrier`] for all of them, then their
    /// bits are set in the cache (on failure the data stays unreferenced, the bits clear).
    /// Then each block's bitmap is written once, carrying every chunk's bits, with the BAT
    /// sector of each block a loop allocation changed ([`VhdImage::persist_many`]); a
    /// failed write fails the chunks of its block (or BAT sector) only.
    fn commit_chunks(&self, chunks: &[Chunk]) -> Vec<Result<(), ImageError>> {
        enum St {
            /// The bitmap version the disk must reach.
            Ver(u64),
            /// New bits, waiting for the barrier.
            New,
            Failed(ImageError),
        }
        // Bits present already: their data is durable (they were set after a barrier),
        // but their bitmap write may still be running or have failed: the version to
        // wait for.
        let present = |m: &mut Meta, c: &Chunk| -> Result<Option<u64>, ImageError> {
            let b = self.load_bitmap(m, c.blk, c.entry)?;
            Ok(bits_all(&b.bits, c.off, c.cnt, true).then_some(b.version))
        };
        let mut m = self.lock();
        let mut st: Vec<St> = chunks
            .iter()
            .map(|c| match present(&mut m, c) {
                Ok(Some(v)) => St::Ver(v),
                Ok(None) => St::New,
                Err(e) => St::Failed(e),
            })
            .collect();
        if st.iter().any(|s| matches!(s, St::New)) {
            drop(m);
            let mut barrier = self.data_barrier().err();
            let errno = barrier.as_ref().map(ImageError::errno);
            m = self.lock();
            for (s, c) in st.iter_mut().zip(chunks) {
                if !matches!(s, St::New) {
                    continue;
                }
                *s =
                    if let Some(errno) = errno {
                        St::Failed(barrier.take().unwrap_or_else(|| {
                            self.again(errno, "fdatasync before a bitmap update")
                        }))
                    } else {
                        match present(&mut m, c) {
                            Ok(Some(v)) => St::Ver(v),
                            Ok(None) => match m.change_bitmap(c.blk, |bm| {
                                (c.off..c.off + c.cnt).for_each(|i| bit_set(bm, i, true));
                            }) {
                                Some(v) => St::Ver(v),
                                None => St::Failed(corrupt(&self.path, "bitmap cache")),
                            },
                            Err(e) => St::Failed(e),
                        }
                    };
            }
        }
        // Each block's bitmap once, up to the newest version one of its chunks needs.
        let mut blocks: Vec<(u32, u32, u64)> = Vec::new();
        for (s, c) in st.iter().zip(chunks) {
            if let St::Ver(v) = *s {
                match blocks.iter_mut().find(|b| b.0 == c.blk) {
                    Some(b) => b.2 = b.2.max(v),
                    None => blocks.push((c.blk, c.entry, v)),
                }
            }
        }
        // And the BAT sector of each block, when an allocation changed it since it was last
        // written: a write is acknowledged only once the BAT points at its block on disk.
        let mut secs: Vec<(u32, u64)> = Vec::new();
        for &(blk, _, _) in &blocks {
            let sec = blk / BAT_PER_SECTOR;
            if let Some(b) = m.bat_secs.get(&sec).filter(|b| !b.clean()) {
                if !secs.iter().any(|s| s.0 == sec) {
                    secs.push((sec, b.version));
                }
            }
        }
        let (g, results, sec_results) = self.persist_many(m, &blocks, &secs);
        drop(g);
        // Per block: the error of its bitmap write, else of its BAT sector's write. The
        // first chunk of a block gets the error itself, the others one like it.
        let mut sec_errs: Vec<(u32, i32, Option<ImageError>)> = secs
            .iter()
            .zip(sec_results)
            .filter_map(|(s, r)| r.err().map(|e| (s.0, e.errno(), Some(e))))
            .collect();
        let mut failed: Vec<(u32, i32, &'static str, Option<ImageError>)> = blocks
            .iter()
            .zip(results)
            .filter_map(|(b, r)| match r {
                Err(e) => Some((b.0, e.errno(), "write bitmap", Some(e))),
                Ok(()) => sec_errs
                    .iter_mut()
                    .find(|f| f.0 == b.0 / BAT_PER_SECTOR)
                    .map(|f| (b.0, f.1, "write BAT", f.2.take())),
            })
            .collect();
        st.into_iter()
            .zip(chunks)
            .map(|(s, c)| match s {
                St::Failed(e) => Err(e),
                St::New => Err(corrupt(&self.path, "bitmap commit")),
                St::Ver(_) => match failed.iter_mut().find(|f| f.0 == c.blk) {
                    None => Ok(()),
                    Some((_, errno, op, first)) => {
                        Err(first.take().unwrap_or_else(|| self.again(*errno, op)))
                    }
                },
            })
            .collect()
    }

    /// An I/O error like one already reported (`errno`), for the other requests the same
    /// failed call (a shared sync or bitmap write) fails.
    fn again(&self, errno: i32, op: &'static str) -> ImageError {
        ImageError::io(&self.path, op, std::io::Error::from_raw_os_error(errno))
    }

    fn discard_dynamic(&self, sector: u64, n: u64) -> Result<(), ImageError> {
        for (blk, off, cnt) in self.chunks(sector, n) {
            let mut m = self.lock();
            let e = m.bat[blk as usize];
            if e == BAT_UNUSED {
                continue;
            }
            let off = u64::from(off);
            let c = self.load_bitmap(&mut m, blk, e)?;
            if bits_all(&c.bits, off, cnt, false) {
                // Clear already; a bitmap write that failed may have left them set on
                // the disk: write it again.
                let ver = c.version;
                self.persist_bitmap(m, blk, e, ver).1?;
                continue;
            }
            // Invariant 4: the on-disk batmap must not claim "full" once bits are cleared.
            let curr = m.footer.curr_size;
            if let Some(b) = m.batmap.as_mut() {
                if bit_test(&b.map, u64::from(blk)) {
                    bit_set(&mut b.map, u64::from(blk), false);
                    if let Err(err) = self.rewrite_batmap(b, curr) {
                        // The disk may still say "full": keep saying so here, so that the
                        // next discard rewrites the batmap before it clears any bit.
                        bit_set(&mut b.map, u64::from(blk), true);
                        return Err(err);
                    }
                }
            }
            let ver = m
                .change_bitmap(blk, |bm| {
                    (off..off + cnt).for_each(|i| bit_set(bm, i, false));
                })
                .ok_or_else(|| corrupt(&self.path, "bitmap cache"))?;
            self.persist_bitmap(m, blk, e, ver).1?;
        }
        Ok(())
    }

    fn status_dynamic(&self, sector: u64, n: u64) -> Result<Vec<Extent>, ImageError> {
        let g = self.geom_or_err()?;
        let mut out = Vec::new();
        for (blk, off, cnt) in self.chunks(sector, n) {
            let csec = u64::from(blk) * u64::from(g.spb) + u64::from(off);
            let runs = match self.block_runs(blk, off, cnt)? {
                Some((_, runs)) => runs,
                None => vec![(false, 0, cnt)],
            };
            for (set, i, r) in runs {
                if set {
                    push_extent(&mut out, csec + i, r, true);
                } else {
                    self.parent_status(csec + i, r, &mut out)?;
                }
            }
        }
        Ok(out)
    }

    /// Final metadata at close: batmap, footer at the end of data, trimmed reserve.
    fn finish(&self) -> Result<(), ImageError> {
        let mut m = self.lock();
        if self.kind == DiskType::Fixed {
            return self.sync();
        }
        // No allocation from here on (the loop's `direct_map` could take the reserve while
        // the writes below run without the lock; the footer goes after `next_db`).
        m.reserve_end = m.next_db;
        // Bitmaps and BAT sectors not written yet, or whose last write failed: write them
        // (the sync below covers them).
        let unwritten: Vec<(u32, u32, u64)> = m
            .bitmaps
            .iter()
            .filter(|(_, c)| !c.clean())
            .map(|(&blk, c)| (blk, m.bat[blk as usize], c.version))
            .collect();
        let secs: Vec<(u32, u64)> = m
            .bat_secs
            .iter()
            .filter(|(_, b)| !b.clean())
            .map(|(&sec, b)| (sec, b.version))
            .collect();
        let (g, rb, rs) = self.persist_many(m, &unwritten, &secs);
        m = g;
        for r in rb.into_iter().chain(rs) {
            r?;
        }
        let dirty = m.dirty || m.batmap.as_ref().is_some_and(|b| b.dirty);
        if !dirty {
            return self.sync();
        }
        // Bitmaps durable before the batmap that summarises them.
        self.sync()?;
        let curr = m.footer.curr_size;
        if let Some(b) = m.batmap.as_mut() {
            if b.dirty {
                self.write_batmap(b, curr)?;
            }
        }
        let mut f = m.footer;
        let fb = f.encode();
        if self.file.resizable() {
            let end = m.next_db * SECTOR_SIZE;
            self.pwrite(&fb, end, "write footer")?;
            self.sync()?;
            let len = self.file_len()?;
            if len != end + FOOTER_SIZE as u64 {
                self.file
                    .set_len(end + FOOTER_SIZE as u64)
                    .map_err(|e| ImageError::io(&self.path, "truncate", e))?;
            }
        } else {
            let len = self.file_len()?;
            self.pwrite(&fb, len - FOOTER_SIZE as u64, "write footer")?;
        }
        self.sync()?;
        m.reserve_end = m.next_db;
        m.dirty = false;
        Ok(())
    }
}

/// A run of sectors with the same bitmap bit: (present, first, len).
type Run = (bool, u64, u64);

fn push_extent(out: &mut Vec<Extent>, sector: u64, n: u64, allocated: bool) {
    if n == 0 {
        return;
    }
    if let Some(l) = out.last_mut() {
        if l.allocated == allocated && l.sector + l.nsectors == sector {
            l.nsectors += n;
            return;
        }
    }
    out.push(Extent {
        sector,
        nsectors: n,
        allocated,
    });
}

impl Image for VhdImage {
    fn info(&self) -> ImageInfo {
        ImageInfo {
            size_sectors: self.size_sectors,
            sector_size: SECTOR_SIZE as u32,
            read_only: self.read_only,
        }
    }

    fn read(&self, sector: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        self.live()?;
        check_range(sector, buf.len(), self.size_sectors)?;
        if self.kind == DiskType::Fixed {
            self.pread(buf, sector * SECTOR_SIZE, "read")?;
            if let Some(c) = &self.cipher {
                c.decrypt_sectors(sector, buf);
            }
            return Ok(());
        }
        self.read_dynamic(sector, buf)
    }

    fn write(&self, sector: u64, buf: &[u8]) -> Result<(), ImageError> {
        self.writable()?;
        check_range(sector, buf.len(), self.size_sectors)?;
        let Some(c) = &self.cipher else {
            return self.write_plain(sector, buf);
        };
        // Ciphertext goes into a bounce buffer (never the caller's buffer), written in one pass
        // by the cipher. Requests up to ENCRYPT_BUF_MAX reuse a per-thread buffer; larger ones
        // (rare: big NBD writes) get their own, so no thread keeps a large buffer alive.
        if buf.len() > ENCRYPT_BUF_MAX {
            let mut out = vec![0u8; buf.len()];
            c.encrypt_sectors_to(sector, buf, &mut out);
            return self.write_plain(sector, &out);
        }
        ENCRYPT_BUF.with(|cell| {
            let mut bounce = cell.borrow_mut();
            if bounce.len() < buf.len() {
                bounce.resize(buf.len(), 0);
            }
            let out = &mut bounce[..buf.len()];
            c.encrypt_sectors_to(sector, buf, out);
            self.write_plain(sector, out)
        })
    }

    fn write_in_place(&self, sector: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        self.writable()?;
        check_range(sector, buf.len(), self.size_sectors)?;
        if let Some(c) = &self.cipher {
            c.encrypt_sectors(sector, buf);
        }
        self.write_plain(sector, buf)
    }

    fn flush(&self) -> Result<(), ImageError> {
        self.live()?;
        if self.read_only {
            return Ok(());
        }
        self.sync()
    }

    fn memory_backed(&self) -> bool {
        self.file.memory_backed() && self.parent.as_ref().is_none_or(|p| p.memory_backed())
    }

    fn direct_map(&self, sector: u64, nsectors: u64, write: bool) -> Option<DirectMap> {
        if nsectors == 0 || self.closed.load(Ordering::Acquire) || (write && self.read_only) {
            return None;
        }
        check_sectors(sector, nsectors, self.size_sectors).ok()?;
        self.file.aio_fd()?;
        let mut commit = false;
        let offset = match self.geom {
            None => sector * SECTOR_SIZE,
            Some(g) => {
                let spb = u64::from(g.spb);
                let (blk, off) = (sector / spb, sector % spb);
                if off + nsectors > spb {
                    return None;
                }
                let blk = u32::try_from(blk).ok()?;
                // The loop calls this: never wait for the metadata lock, which a worker may
                // hold across disk I/O (a bitmap write, a discard's fdatasync). Busy: the
                // request goes to the workers instead.
                let mut m = match self.meta.try_lock() {
                    Ok(m) => m,
                    Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
                    Err(std::sync::TryLockError::WouldBlock) => return None,
                };
                let mut e = *m.bat.get(blk as usize)?;
                if e == BAT_UNUSED && write && g.bat_aligned() {
                    // A block's first write: allocated here, in memory, when the reserve
                    // has room (growing it is I/O: a worker's `ensure_allocated`); its BAT
                    // sector and bitmap are written by the commit.
                    e = take_reserve(&mut m, blk, g)? as u32;
                }
                // Only a cached bitmap: loading one is I/O, which the caller must not wait
                // for. A read needs every bit set: the data is here (no parent). A write
                // changes no metadata when every bit is set and the bitmap and the BAT
                // sector are on disk as cached; else it is mapped to be committed after its
                // data lands (`commit_writes`: the barrier and bitmap write of invariant 2,
                // the BAT sector of a new block, or the wait for a write of them still
                // running, or the redo of one that failed).
                let c = m.bitmaps.get(&blk)?;
                if e == BAT_UNUSED {
                    return None;
                }
                let all = bits_all(&c.bits, off, nsectors, true);
                if !all && !write {
                    return None;
                }
                let bat_clean = m
                    .bat_secs
                    .get(&(blk / BAT_PER_SECTOR))
                    .is_none_or(BatSector::clean);
                commit = write && !(all && c.clean() && bat_clean);
                (u64::from(e) + u64::from(g.bm_secs) + off) * SECTOR_SIZE
            }
        };
        Some(DirectMap {
            file: Arc::clone(&self.file),
            offset,
            cipher: self.cipher.clone(),
            commit,
        })
    }

    /// Each range lies in one allocated block: [`Image::direct_map`] maps no other. One
    /// that does not (a caller's mistake) fails; its data stays unreferenced.
    fn commit_writes(&self, ranges: &[(u64, u64)]) -> Vec<Result<(), ImageError>> {
        let mut out: Vec<Result<(), ImageError>> = ranges
            .iter()
            .map(|&(s, n)| {
                self.writable()?;
                check_sectors(s, n, self.size_sectors)
            })
            .collect();
        if self.geom.is_none() {
            return out; // a fixed disk has no metadata to change
        }
        let mut chunks = Vec::new();
        let mut owner = Vec::new();
        {
            let m = self.lock();
            for (i, &(s, n)) in ranges.iter().enumerate() {
                if out[i].is_err() {
                    continue;
                }
                let mut mine = self.chunks(s, n);
                let one = match (mine.next(), mine.next()) {
                    (Some((blk, off, cnt)), None) => m
                        .bat
                        .get(blk as usize)
                        .filter(|&&e| e != BAT_UNUSED)
                        .map(|&entry| Chunk {
                            blk,
                            entry,
                            off: u64::from(off),
                            cnt,
                        }),
                    _ => None,
                };
                match one {
                    Some(c) => {
                        chunks.push(c);
                        owner.push(i);
                    }
                    None => {
                        out[i] = Err(ImageError::Invalid(format!(
                            "{}: commit of a write ({s}, +{n}) outside one allocated block",
                            self.path.display()
                        )))
                    }
                }
            }
        }
        for (r, i) in self.commit_chunks(&chunks).into_iter().zip(owner) {
            out[i] = r;
        }
        out
    }

    fn discard(&self, sector: u64, nsectors: u64) -> Result<(), ImageError> {
        self.writable()?;
        check_sectors(sector, nsectors, self.size_sectors)?;
        if self.kind == DiskType::Fixed {
            return self
                .file
                .punch_hole(sector * SECTOR_SIZE, nsectors * SECTOR_SIZE)
                .map_err(|e| ImageError::io(&self.path, "punch hole", e));
        }
        self.discard_dynamic(sector, nsectors)
    }

    fn block_status(&self, sector: u64, nsectors: u64) -> Result<Vec<Extent>, ImageError> {
        self.live()?;
        check_sectors(sector, nsectors, self.size_sectors)?;
        if self.kind == DiskType::Fixed {
            return Ok(if nsectors == 0 {
                Vec::new()
            } else {
                vec![Extent {
                    sector,
                    nsectors,
                    allocated: true,
                }]
            });
        }
        self.status_dynamic(sector, nsectors)
    }

    fn close(&self) -> Result<(), ImageError> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let r = if self.read_only {
            Ok(())
        } else {
            self.finish()
        };
        let pr = match &self.parent {
            Some(p) => p.close(),
            None => Ok(()),
        };
        r.and(pr)
    }

    fn layers(&self) -> Vec<LayerInfo> {
        let mut v = vec![LayerInfo {
            path: self.path.clone(),
            format: ImageFormat::Vhd,
        }];
        if let Some(p) = &self.parent {
            v.extend(p.layers());
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::fault::{Access, FaultFile, Injector};
    use crate::image::file::MemFile;
    use std::time::Duration;

    fn mem_vhd(size: u64) -> Arc<MemFile> {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.vhd");
        super::super::ops::create(&p, &super::super::ops::CreateOptions::dynamic(size)).unwrap();
        Arc::new(MemFile::from_bytes(std::fs::read(&p).unwrap()))
    }

    /// Invariant 2: a write that sets new bits syncs its data first; when that fdatasync
    /// fails the write fails, its bit stays clear (the data is unreferenced), and the
    /// failure is sticky: no later flush or new bit, while writes to present sectors go on.
    #[test]
    fn failed_data_barrier_fails_the_write_leaves_the_bit_clear_and_sticks() {
        use crate::image::fault::{Fault, FaultFile, Injector, Point};
        let mem = mem_vhd(8 << 20);
        let inj = Injector::new();
        let ff: Arc<dyn BlockFile> = Arc::new(FaultFile::new(mem.clone(), inj.clone()).unwrap());
        let ro = VhdOpenOptions {
            read_only: false,
            ..Default::default()
        };
        let img = VhdImage::open_file(Path::new("x.vhd"), ff, &ro).unwrap();
        let a = vec![0xa5u8; 512];
        let syncs = inj.seen(Point::Sync);
        img.write(0, &a).unwrap();
        assert!(
            inj.seen(Point::Sync) > syncs,
            "a new bit waits for an fdatasync"
        );
        assert_eq!(mem.pending_ops(), 1, "only the bitmap write is unsynced");
        // Rewriting a present sector costs no sync.
        let syncs = inj.seen(Point::Sync);
        img.write(0, &a).unwrap();
        assert_eq!(inj.seen(Point::Sync), syncs);
        inj.arm_n(Point::Sync, Fault::Eio, 0, Some(1));
        assert!(img.write(1, &[0x5au8; 512]).is_err(), "barrier failed");
        assert_eq!(inj.injected(Point::Sync), 1);
        let bm = img.block_bitmap(0).unwrap().unwrap();
        assert_eq!(bm[0], 0x80, "sector 1's bit stays clear, sector 0's is set");
        let mut b = vec![1u8; 512];
        img.read(1, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0), "sector 1 reads as never written");
        inj.clear();
        let syncs = inj.seen(Point::Sync);
        assert!(img.write(2, &a).is_err(), "no new bit after a failed sync");
        assert!(img.flush().is_err(), "no flush after a failed sync");
        assert_eq!(inj.seen(Point::Sync), syncs, "the file is not even asked");
        img.write(0, &[0x33u8; 512]).unwrap();
        img.read(0, &mut b).unwrap();
        assert_eq!(b, vec![0x33u8; 512]);
    }

    /// An fdatasync that panics (a `BlockFile` that panics) in the barrier fails the
    /// barriers waiting for it and later ones, as a failed sync does, instead of leaving
    /// them waiting for ever.
    #[test]
    fn a_panicking_barrier_sync_fails_later_writes_instead_of_hanging_them() {
        use crate::image::fault::{FaultFile, Injector};
        let mem = mem_vhd(8 << 20);
        let inj = Injector::new();
        let ff: Arc<dyn BlockFile> = Arc::new(FaultFile::new(mem, inj.clone()).unwrap());
        let rw = VhdOpenOptions {
            read_only: false,
            ..Default::default()
        };
        let img = Arc::new(VhdImage::open_file(Path::new("x.vhd"), ff, &rw).unwrap());
        img.write(0, &[1u8; 512]).unwrap();
        let armed = Arc::new(AtomicBool::new(true));
        let a = armed.clone();
        inj.watch(move |x| {
            if x.sync && a.swap(false, Ordering::SeqCst) {
                panic!("test: the fdatasync panics");
            }
        });
        let i = img.clone();
        let first = std::thread::spawn(move || i.write(1, &[2u8; 512]));
        assert!(
            first.join().is_err(),
            "the first new bit's barrier panicked"
        );
        let (tx, rx) = std::sync::mpsc::channel();
        let i = img.clone();
        std::thread::spawn(move || tx.send(i.write(2, &[3u8; 512]).is_err()));
        assert_eq!(
            rx.recv_timeout(std::time::Duration::from_secs(10)),
            Ok(true),
            "the next new bit fails at once"
        );
    }

    /// Concurrent first writes to different sectors share fdatasyncs (group commit) and
    /// all land.
    #[test]
    fn concurrent_new_bits_share_barriers() {
        let mem = mem_vhd(8 << 20);
        let ro = VhdOpenOptions {
            read_only: false,
            ..Default::default()
        };
        let img = Arc::new(VhdImage::open_file(Path::new("x.vhd"), mem.clone(), &ro).unwrap());
        std::thread::scope(|sc| {
            for t in 0..4u64 {
                let img = img.clone();
                sc.spawn(move || {
                    for i in 0..50u64 {
                        let lba = (t * 50 + i) * 3;
                        img.write(lba, &[(t * 50 + i) as u8 | 1; 512]).unwrap();
                    }
                });
            }
        });
        let mut b = vec![0u8; 512];
        for k in 0..200u64 {
            img.read(k * 3, &mut b).unwrap();
            assert!(b.iter().all(|&x| x == (k as u8 | 1)), "sector {}", k * 3);
        }
        let g = img.gate.st.lock().unwrap();
        assert!(!g.running && g.started == g.done && g.done >= 1);
        assert!(g.done <= 200, "at most one sync per write: {}", g.done);
    }

    /// Writes at one offset wait, once held, until released (the test's view of a slow
    /// bitmap write): an [`Injector`] watcher.
    #[derive(Debug, Default)]
    struct Hold {
        /// (offset held, writes waiting there, released)
        st: Mutex<(Option<u64>, usize, bool)>,
        cond: Condvar,
    }

    impl Hold {
        fn hold(&self, off: u64) {
            *self.st.lock().unwrap() = (Some(off), 0, false);
        }
        fn wait_for_holders(&self, n: usize) {
            let mut st = self.st.lock().unwrap();
            while st.1 < n {
                st = self.cond.wait(st).unwrap();
            }
        }
        fn release(&self) {
            self.st.lock().unwrap().2 = true;
            self.cond.notify_all();
        }
        /// The watcher: a write at the held offset waits for `release`.
        fn watch(&self, a: Access) {
            let mut st = self.st.lock().unwrap();
            if a.write && st.0 == Some(a.offset) && !st.2 {
                st.1 += 1;
                self.cond.notify_all();
                while !st.2 {
                    st = self.cond.wait(st).unwrap();
                }
            }
        }
    }

    /// A bitmap write runs without the image lock: while one block's bitmap write hangs,
    /// a first write to another block (allocation, data, barrier, its own bitmap) and the
    /// loop's fast path to a third go on. A second write setting bits in the held block
    /// is not acknowledged before the held write is done; the bitmap that lands carries
    /// the bits of both writes. (Before, the bitmap write held the image lock: everything
    /// here but the fast-path read waited for it.)
    #[test]
    fn a_bitmap_write_holds_up_only_writes_to_its_own_block() {
        let d = tempfile::tempdir_in("/var/tmp").unwrap();
        let p = d.path().join("x.vhd");
        super::super::ops::create(&p, &super::super::ops::CreateOptions::dynamic(8 << 20)).unwrap();
        let hf = Arc::new(Hold::default());
        let file: Arc<dyn BlockFile> =
            Arc::new(OsFile::open_with(&p, true, true, &SysOpener).unwrap());
        let inj = Injector::new();
        let h = hf.clone();
        inj.watch(move |a| h.watch(a));
        let watched = Arc::new(FaultFile::new(file.clone(), inj).unwrap());
        let rw = VhdOpenOptions {
            read_only: false,
            ..Default::default()
        };
        let img = Arc::new(VhdImage::open_file(&p, watched, &rw).unwrap());
        let spb = u64::from(img.sectors_per_block());
        img.write(0, &[1u8; 512]).unwrap(); // allocates block 0
        img.write(2 * spb, &[2u8; 4096]).unwrap(); // block 2, sectors 0-7 present
        let bm0 = u64::from(img.bat()[0]) * SECTOR_SIZE;
        hf.hold(bm0);
        let (tx, rx) = std::sync::mpsc::channel();
        let w = |sector: u64, byte: u8, tag: &'static str| {
            let (img, tx) = (img.clone(), tx.clone());
            std::thread::spawn(move || {
                let r = img.write(sector, &[byte; 512]);
                tx.send((tag, r.is_ok())).unwrap();
            })
        };
        let t1 = w(1, 3, "block 0, sector 1");
        hf.wait_for_holders(1);
        let t2 = w(spb + 5, 4, "block 1, a new block");
        let t3 = w(2, 5, "block 0, sector 2");
        let first = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("a write finished");
        assert_eq!(first, ("block 1, a new block", true));
        // The loop's fast path never waits for the image lock: it passes (None) while
        // another thread holds it for a moment, so ask until it answers.
        let eventually = |what: &str, f: &dyn Fn() -> bool| {
            let t0 = std::time::Instant::now();
            while !f() {
                assert!(t0.elapsed() < Duration::from_secs(60), "{what}");
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        eventually("fast path, block 2", &|| {
            img.direct_map(2 * spb, 8, true).is_some_and(|m| !m.commit)
        });
        eventually("reads of block 0 go on", &|| {
            img.direct_map(0, 1, false).is_some()
        });
        assert!(!img.lock().bitmaps[&0].clean());
        eventually("block 0's writes map only to be committed", &|| {
            img.direct_map(0, 1, true).is_some_and(|m| m.commit)
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(300)).is_err(),
            "nothing in block 0 is acknowledged before its bitmap write is done"
        );
        hf.release();
        let next = || {
            rx.recv_timeout(Duration::from_secs(60))
                .expect("acknowledged")
        };
        let mut rest = vec![next(), next()];
        rest.sort();
        assert_eq!(
            rest,
            vec![("block 0, sector 1", true), ("block 0, sector 2", true)]
        );
        for t in [t1, t2, t3] {
            t.join().unwrap();
        }
        let mut ondisk = [0u8; 1];
        file.read_at(&mut ondisk, bm0).unwrap();
        assert_eq!(ondisk[0], 0xe0, "sectors 0, 1 and 2 present on disk");
        assert!(img.lock().bitmaps[&0].clean());
        eventually("fast path again", &|| {
            img.direct_map(0, 3, true).is_some_and(|m| !m.commit)
        });
        img.close().unwrap();
    }

    /// Invariant 4 with the batmap's "full" marks set when a full bitmap is written (not
    /// synced): a discard that rewrites the batmap must not let it reach the disk before
    /// those bitmaps. A process that stops after any number of the discard's writes, then
    /// a crash that drops any one unsynced write: wherever the batmap says "full", the
    /// bitmap on disk is full. (Before the sync ahead of the batmap write, dropping block
    /// 1's bitmap write left a valid batmap calling block 1 full over an empty bitmap.)
    #[test]
    fn a_discard_never_lets_the_batmap_claim_a_bitmap_the_disk_lacks() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("x.vhd");
        let opts = super::super::ops::CreateOptions {
            block_size: 1 << 20,
            ..super::super::ops::CreateOptions::dynamic(4 << 20)
        };
        super::super::ops::create(&p, &opts).unwrap();
        let rw = VhdOpenOptions {
            read_only: false,
            ..Default::default()
        };
        let spb = 2048u64;
        // Block 0 full, closed: the batmap on disk says so.
        let first = Arc::new(MemFile::from_bytes(std::fs::read(&p).unwrap()));
        let img = VhdImage::open_file(&p, first.clone(), &rw).unwrap();
        img.write(0, &vec![1u8; (spb * 512) as usize]).unwrap();
        img.close().unwrap();
        let closed = first.contents();
        let mut checked = 0;
        for stop in 0..8u64 {
            let mem = Arc::new(MemFile::from_bytes(closed.clone()));
            let img = VhdImage::open_file(&p, mem.clone(), &rw).unwrap();
            img.write(spb, &vec![2u8; (spb * 512) as usize]).unwrap(); // block 1 full
            mem.fail_after(stop);
            let _ = img.discard(0, 1);
            let n = mem.pending_ops();
            for drop_one in (0..n).map(Some).chain([None]) {
                let bytes = mem.crash_image(&mut |i| Some(i) != drop_one);
                let ro = VhdOpenOptions::default();
                let Ok(c) = VhdImage::open_file(&p, Arc::new(MemFile::from_bytes(bytes)), &ro)
                else {
                    continue;
                };
                let Some((_, map)) = c.batmap() else {
                    panic!("the image has a batmap")
                };
                if c.batmap_valid() != Some(true) {
                    continue;
                }
                for blk in 0..2u32 {
                    if bit_test(&map, u64::from(blk)) {
                        let bm = c.block_bitmap(blk).unwrap().unwrap();
                        assert!(
                            bits_all(&bm, 0, spb, true),
                            "stop {stop}, dropped {drop_one:?}: batmap says block {blk} full"
                        );
                        checked += 1;
                    }
                }
            }
        }
        assert!(
            checked > 0,
            "some crash image had a batmap marking a block full"
        );
    }

    /// A bitmap write that failed is written again before any later write to those
    /// sectors is acknowledged, although their bits are already set in the cache; until
    /// then the loop maps a write there only to be committed. Close writes what is still
    /// unwritten.
    #[test]
    fn a_failed_bitmap_write_is_redone_before_the_next_write_is_acknowledged() {
        use crate::image::fault::{Fault, FaultFile, Injector, Point};
        let mem = mem_vhd(8 << 20);
        let inj = Injector::new();
        let ff: Arc<dyn BlockFile> = Arc::new(FaultFile::new(mem.clone(), inj.clone()).unwrap());
        let rw = VhdOpenOptions {
            read_only: false,
            ..Default::default()
        };
        let img = VhdImage::open_file(Path::new("x.vhd"), ff, &rw).unwrap();
        inj.arm_n(Point::Bitmap, Fault::Eio, 0, Some(1));
        assert!(img.write(0, &[7u8; 512]).is_err(), "bitmap write failed");
        assert!(
            !img.lock().bitmaps[&0].clean(),
            "dirty: a write to block 0 must be committed until it is written again"
        );
        inj.clear();
        let before = inj.seen(Point::Bitmap);
        img.write(0, &[8u8; 512]).unwrap();
        assert_eq!(
            inj.seen(Point::Bitmap),
            before + 1,
            "the bitmap is written again"
        );
        assert!(img.lock().bitmaps[&0].clean());
        img.write(0, &[9u8; 512]).unwrap();
        assert_eq!(inj.seen(Point::Bitmap), before + 1, "and then no more");
        // A failed discard: close writes the bitmap that is still unwritten.
        img.write(1, &[6u8; 512]).unwrap();
        inj.arm_n(Point::Bitmap, Fault::Eio, 0, Some(1));
        assert!(img.discard(1, 1).is_err());
        inj.clear();
        img.close().unwrap();
        let reopened = VhdImage::open_file(
            Path::new("x.vhd"),
            Arc::new(MemFile::from_bytes(mem.contents())),
            &rw,
        )
        .unwrap();
        let mut b = vec![0u8; 1024];
        reopened.read(0, &mut b).unwrap();
        assert!(b[..512].iter().all(|&x| x == 9), "sector 0 present");
        assert!(
            b[512..].iter().all(|&x| x == 0),
            "sector 1 discarded on disk"
        );
    }

    #[test]
    fn alignment_puts_data_on_4k() {
        for bm in [1u32, 8, 9] {
            for pos in 0..32 {
                let a = align_block_start(pos, bm);
                let d = a + u64::from(bm);
                assert!(a >= pos && a < pos + 8 && d.is_multiple_of(8));
            }
        }
    }

    fn reference_encrypt(key: &[u8; 32], lba: u64, data: &mut [u8]) {
        use aes::cipher::{Array, KeyInit};
        let k1 = aes::Aes128::new(&Array::try_from(&key[..16]).unwrap());
        let k2 = aes::Aes128::new(&Array::try_from(&key[16..]).unwrap());
        let x = xts_mode::Xts128::new(k1, k2);
        // blktap "plain" IV: low 32 bits of the virtual sector, little-endian.
        x.encrypt_area(
            data,
            512,
            u128::from(lba as u32),
            xts_mode::get_tweak_default,
        );
    }

    #[test]
    fn encryption_covers_only_bitmap_set_sectors_and_never_the_callers_buffer() {
        let key = [0x42u8; 32];
        let rw = VhdOpenOptions {
            read_only: false,
            ..Default::default()
        };
        // Parent: keyed. Leaf: plaintext on top.
        let pf = mem_vhd(4 << 20);
        let mut parent = VhdImage::open_file(Path::new("p.vhd"), pf.clone(), &rw).unwrap();
        parent.set_cipher(Some(Arc::new(XtsCipher::new(&key).unwrap())));
        let plain: Vec<u8> = (0..1024u32).map(|i| (i % 251) as u8).collect();
        let copy = plain.clone();
        parent.write(5, &plain).unwrap();
        assert_eq!(plain, copy, "caller's buffer untouched");
        let s = u64::from(parent.bat()[0]);
        let mut on_disk = vec![0u8; 1024];
        pf.read_at(&mut on_disk, (s + 1 + 5) * 512).unwrap();
        let mut expect = plain.clone();
        reference_encrypt(&key, 5, &mut expect);
        assert_eq!(
            on_disk, expect,
            "AES-128-XTS with the plain IV of the virtual sector"
        );
        let mut back = vec![0u8; 4096];
        parent.read(0, &mut back).unwrap();
        assert!(
            back[..2560].iter().all(|&b| b == 0),
            "unwritten sectors are not decrypted"
        );
        assert_eq!(&back[2560..3584], &plain[..]);
        // In place (the engine's owned buffers): the same bytes on disk, no bounce.
        let mut owned = plain.clone();
        parent.write_in_place(5 + 4096, &mut owned).unwrap();
        assert_ne!(owned, plain, "encrypted in the caller's (given up) buffer");
        let s1 = u64::from(parent.bat()[1]);
        let mut on_disk1 = vec![0u8; 1024];
        pf.read_at(&mut on_disk1, (s1 + 1 + 5) * 512).unwrap();
        let mut expect1 = plain.clone();
        reference_encrypt(&key, 5 + 4096, &mut expect1);
        assert_eq!(on_disk1, expect1);
        assert_eq!(owned, expect1);
        let mut back1 = vec![0u8; 1024];
        parent.read(5 + 4096, &mut back1).unwrap();
        assert_eq!(back1, plain);
        let lf = mem_vhd(4 << 20);
        let mut leaf = VhdImage::open_file(Path::new("l.vhd"), lf.clone(), &rw).unwrap();
        leaf.set_parent(Box::new(parent));
        leaf.write(0, &[9u8; 512]).unwrap();
        let mut b = vec![0u8; 4096];
        leaf.read(0, &mut b).unwrap();
        assert!(b[..512].iter().all(|&x| x == 9));
        assert_eq!(
            &b[2560..3584],
            &plain[..],
            "parent decrypts with its own key"
        );
        let s = u64::from(leaf.bat()[0]);
        let mut raw = [0u8; 512];
        lf.read_at(&mut raw, (s + 1) * 512).unwrap();
        assert_eq!(raw, [9u8; 512], "plaintext leaf stores plaintext");
    }

    /// A commit of writes to four blocks on an `O_DIRECT` file writes their four bitmaps
    /// in one Linux AIO batch; every bit reaches the disk (a reopen reads the data back).
    #[test]
    fn a_commit_writes_the_bitmaps_of_several_blocks_in_one_batch() {
        use crate::image::chain::{open_vhd_chain, OpenOptions};
        let d = tempfile::tempdir_in("/var/tmp").unwrap();
        let p = d.path().join("c.vhd");
        super::super::ops::create(&p, &super::super::ops::CreateOptions::dynamic(16 << 20))
            .unwrap();
        let opts = OpenOptions {
            read_only: false,
            direct: true,
            ..Default::default()
        };
        let img = open_vhd_chain(&p, &opts).unwrap();
        let spb = img.sectors_per_block() as u64;
        let blocks = [0u64, 1, 3, 5];
        for b in blocks {
            img.write(b * spb, &[1u8; 512]).unwrap(); // allocated, bitmap cached
        }
        let data = |b: u64| vec![(b as u8) + 7; 4096];
        let mut ranges = Vec::new();
        for b in blocks {
            let s = b * spb + 8;
            let m = img.direct_map(s, 8, true).unwrap();
            assert!(m.commit);
            img.file().write_at(&data(b), m.offset).unwrap(); // the loop's data write
            ranges.push((s, 8));
        }
        let before = crate::image::file::batched_writes();
        assert!(img.commit_writes(&ranges).iter().all(|r| r.is_ok()));
        assert_eq!(
            crate::image::file::batched_writes(),
            before + 4,
            "the four bitmaps in one batch"
        );
        img.close().unwrap();
        let back = open_vhd_chain(&p, &OpenOptions::default()).unwrap();
        for b in blocks {
            let mut got = vec![0u8; 4096];
            back.read(b * spb + 8, &mut got).unwrap();
            assert_eq!(got, data(b), "block {b}");
        }
    }

    /// VHD metadata (footer, header, BAT, bitmaps, batmap, the short footer) through
    /// `O_DIRECT` on a real disk filesystem, checked against a buffered reopen.
    #[test]
    fn vhd_metadata_and_data_through_direct_io() {
        use crate::image::chain::{open_vhd_chain, OpenOptions};
        let d = tempfile::tempdir_in("/var/tmp").unwrap();
        let base = d.path().join("base.vhd");
        super::super::ops::create(&base, &super::super::ops::CreateOptions::dynamic(16 << 20))
            .unwrap();
        let leaf = d.path().join("leaf.vhd");
        super::super::ops::snapshot(&leaf, &base, &Default::default()).unwrap();
        let direct = |read_only| OpenOptions {
            read_only,
            direct: true,
            ..Default::default()
        };
        let data: Vec<u8> = (0..3 * 512u32).map(|i| (i * 7 % 253) as u8).collect();
        {
            // Write through the base first (a parent layer), then the leaf.
            let b = open_vhd_chain(&base, &direct(false)).unwrap();
            assert!(b.file().dio_align().is_some(), "ext4 takes O_DIRECT");
            b.write(4095, &data).unwrap(); // straddles blocks 0 and 1 (2 MiB blocks)
            b.close().unwrap();
            let l = open_vhd_chain(&leaf, &direct(false)).unwrap();
            l.write(10_000, &data[..512]).unwrap();
            l.flush().unwrap();
            l.close().unwrap();
        }
        let plain = open_vhd_chain(&leaf, &OpenOptions::default()).unwrap();
        let mut got = vec![0u8; data.len()];
        plain.read(4095, &mut got).unwrap();
        assert_eq!(got, data, "parent data through the buffered chain");
        plain.read(10_000, &mut got[..512]).unwrap();
        assert_eq!(got[..512], data[..512]);
        assert_eq!(plain.allocated_blocks(), 1);
        // The short footer: a file cut one byte short opens from EOF-511, read directly.
        let len = std::fs::metadata(&base).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&base)
            .unwrap()
            .set_len(len - 1)
            .unwrap();
        let ro = VhdImage::open(
            &base,
            &VhdOpenOptions {
                direct: true,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(ro.footer_source(), FooterSource::Short);
        assert!(ro.file().dio_align().is_some());
        let mut back = vec![0u8; data.len()];
        ro.read(4095, &mut back).unwrap();
        assert_eq!(back, data);
        // A read-write direct open puts the primary footer back.
        let rw = VhdImage::open(
            &base,
            &VhdOpenOptions {
                direct: true,
                read_only: false,
                ..Default::default()
            },
        )
        .unwrap();
        rw.close().unwrap();
        assert_eq!(
            VhdImage::open(&base, &VhdOpenOptions::default())
                .unwrap()
                .footer_source(),
            FooterSource::Primary
        );
    }

    #[test]
    fn block_start_alignment_puts_data_on_4k() {
        for pos in 0..64u64 {
            let s = align_block_start(pos, 1);
            assert!(s >= pos && s < pos + 8);
            assert_eq!((s + 1) % 8, 0);
        }
    }
}
