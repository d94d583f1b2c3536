//! Crash consistency of the VHD engine, on the simulated file (`MemFile`).
//!
//! Model: after a crash the file holds everything synced plus any subset (in issue order)
//! of the writes issued since the last sync. Properties checked at many crash points:
//! - the image opens cleanly (read-only, and read-write followed by close and reopen);
//! - every sector whose last write was acknowledged before the last completed flush and
//!   not written since reads back exactly;
//! - every other sector reads as its flushed value or one of the values written since
//!   (never garbage).

mod common;
use common::data::XorShift64;

use std::path::Path;
use std::sync::Arc;

use blktap3::image::chain::{open_vhd_chain_file, OpenOptions};
use blktap3::image::crypto::{KeyBytes, KeyHash, KeySource};
use blktap3::image::file::{BlockFile, MemFile};
use blktap3::image::vhd::ops::{create, snapshot, CreateOptions, SnapshotOptions};
use blktap3::image::vhd::VhdImage;
use blktap3::image::Image;

/// Sector content for write `tag` at `lba` (tag 0 = zeros).
fn sector(tag: u32, lba: u64) -> [u8; 512] {
    let mut b = [0u8; 512];
    if tag != 0 {
        for (i, c) in b.chunks_exact_mut(8).enumerate() {
            c.copy_from_slice(&((u64::from(tag) << 32) ^ (lba << 8) ^ i as u64).to_le_bytes());
        }
    }
    b
}

fn fresh_image(size: u64, block: u32) -> Vec<u8> {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("c.vhd");
    create(
        &p,
        &CreateOptions {
            size,
            fixed: false,
            block_size: block,
            max_size: None,
        },
    )
    .unwrap();
    std::fs::read(&p).unwrap()
}

fn opts(ro: bool) -> OpenOptions {
    OpenOptions {
        read_only: ro,
        prealloc_blocks: 2,
        ..Default::default()
    }
}

struct Model {
    flushed: Vec<u32>,
    since: Vec<Vec<u32>>,
}

impl Model {
    fn new(n: usize) -> Model {
        Model {
            flushed: vec![0; n],
            since: vec![Vec::new(); n],
        }
    }
    fn write(&mut self, lba: u64, tag: u32) {
        self.since[lba as usize].push(tag);
    }
    fn flush(&mut self) {
        for (f, s) in self.flushed.iter_mut().zip(self.since.iter_mut()) {
            if let Some(&t) = s.last() {
                *f = t;
            }
            s.clear();
        }
    }
    fn check(&self, img: &dyn Image, what: &str) {
        let n = self.flushed.len();
        let mut buf = vec![0u8; n * 512];
        img.read(0, &mut buf).unwrap();
        for lba in 0..n {
            let got = &buf[lba * 512..(lba + 1) * 512];
            let ok = got == sector(self.flushed[lba], lba as u64)
                || self.since[lba]
                    .iter()
                    .any(|&t| got == sector(t, lba as u64));
            assert!(
                ok,
                "{what}: sector {lba} holds neither its flushed value (tag {}) nor a later one {:?}",
                self.flushed[lba], self.since[lba]
            );
        }
    }
}

impl Model {
    /// The state with every issued write applied (what the page cache shows).
    fn latest(&self) -> Model {
        let mut m = Model::new(self.flushed.len());
        for (i, (f, s)) in self.flushed.iter().zip(&self.since).enumerate() {
            m.flushed[i] = s.last().copied().unwrap_or(*f);
        }
        m
    }
}

fn verify_crash_image(bytes: Vec<u8>, model: &Model, what: &str) {
    verify_crash_image_with(bytes, model, what, Path::new("crash.vhd"), &opts(false));
}

/// Check a crash image of the leaf at `path` (its parents are found from there), opened
/// with `base` (keys, reserve size; `read_only` is set as needed).
fn verify_crash_image_with(
    bytes: Vec<u8>,
    model: &Model,
    what: &str,
    path: &Path,
    base: &OpenOptions,
) {
    let ro = OpenOptions {
        read_only: true,
        ..base.clone()
    };
    let rw = OpenOptions {
        read_only: false,
        ..base.clone()
    };
    // Read-only open must not modify the file.
    let f = Arc::new(MemFile::from_bytes(bytes.clone()));
    let img = open_vhd_chain_file(path, f.clone(), &ro)
        .unwrap_or_else(|e| panic!("{what}: crash image does not open: {e}"));
    model.check(&img, what);
    img.close().unwrap();
    assert_eq!(
        f.contents(),
        bytes,
        "{what}: read-only open changed the file"
    );
    // Read-write open, a write, close, reopen: recovery leaves a clean image.
    let f = Arc::new(MemFile::from_bytes(bytes));
    let img = open_vhd_chain_file(path, f.clone(), &rw)
        .unwrap_or_else(|e| panic!("{what}: crash image does not open rw: {e}"));
    model.check(&img, what);
    // Allocate every block (new blocks land in the old reserve, which may hold stale
    // bitmaps of a crashed session): the rest of each block must keep its value.
    let n = model.flushed.len() as u64;
    let spb = u64::from(img.sectors_per_block());
    let mut after = Model::new(n as usize);
    after.flushed = model.flushed.clone();
    for (lba, s) in model.since.iter().enumerate() {
        if !s.is_empty() {
            after.since[lba] = s.clone();
        }
    }
    let mut lba = spb - 1;
    while lba < n {
        img.write(lba, &sector(0xffff_fff0, lba)).unwrap();
        after.flushed[lba as usize] = 0xffff_fff0;
        after.since[lba as usize].clear();
        lba += spb;
    }
    img.close().unwrap();
    let f2 = Arc::new(MemFile::from_bytes(f.contents()));
    let img = open_vhd_chain_file(path, f2, &ro).unwrap();
    assert_eq!(
        img.footer_source(),
        blktap3::image::vhd::FooterSource::Primary,
        "{what}: close leaves a primary footer"
    );
    after.check(&img, what);
}

fn run_sequence(seed: u64, size: u64, block: u32, steps: usize) {
    let mut rng = XorShift64(seed | 1);
    let bytes = fresh_image(size, block);
    let f = Arc::new(MemFile::from_bytes(bytes));
    let img = open_vhd_chain_file(Path::new("c.vhd"), f.clone(), &opts(false)).unwrap();
    let nsec = size / 512;
    let mut model = Model::new(nsec as usize);
    let mut tag = 1u32;
    for step in 0..steps {
        match rng.below(10) {
            0 | 1 => {
                img.flush().unwrap();
                model.flush();
            }
            _ => {
                let n = 1 + rng.below(24);
                let lba = rng.below(nsec - n);
                let mut buf = Vec::with_capacity((n * 512) as usize);
                for i in 0..n {
                    buf.extend_from_slice(&sector(tag, lba + i));
                }
                img.write(lba, &buf).unwrap();
                for i in 0..n {
                    model.write(lba + i, tag);
                }
                tag += 1;
            }
        }
        // Crash here: nothing unsynced survives / everything / random subsets / prefixes.
        if step % 3 == 0 {
            let pending = f.pending_ops();
            verify_crash_image(f.crash_image(&mut |_| false), &model, "drop all");
            // Every acknowledged write has issued its data *and* bitmap: with all issued
            // writes kept, each sector shows its latest value exactly.
            verify_crash_image(f.crash_image(&mut |_| true), &model.latest(), "keep all");
            for _ in 0..3 {
                let mut r = XorShift64(rng.next() | 1);
                verify_crash_image(f.crash_image(&mut |_| r.below(2) == 0), &model, "subset");
            }
            if pending > 0 {
                let k = rng.below(pending as u64) as usize;
                verify_crash_image(f.crash_image(&mut |i| i < k), &model, "prefix");
            }
        }
    }
    img.close().unwrap();
    model.flush();
    verify_crash_image(f.crash_image(&mut |_| false), &model, "after close");
}

#[test]
fn crash_at_any_point_keeps_flushed_writes_2m_blocks() {
    for seed in 1..3u64 {
        run_sequence(seed * 7919, 12 << 20, 2 << 20, 50);
    }
}

#[test]
fn crash_at_any_point_keeps_flushed_writes_small_blocks() {
    for seed in 1..3u64 {
        run_sequence(seed * 104729, 1 << 20, 16 << 10, 80);
    }
}

#[test]
fn stop_after_write_n_then_reopen() {
    // The process stops (every later mutation fails) after N file writes; what was
    // flushed before must survive, whatever subset of the rest made it to disk.
    for n in 0..40u64 {
        let bytes = fresh_image(8 << 20, 1 << 20);
        let f = Arc::new(MemFile::from_bytes(bytes));
        let img = open_vhd_chain_file(Path::new("c.vhd"), f.clone(), &opts(false)).unwrap();
        let mut model = Model::new(16384);
        let mut rng = XorShift64(n * 31 + 5);
        // A flushed baseline.
        for t in 1..4u32 {
            let lba = rng.below(16000);
            img.write(lba, &sector(t, lba)).unwrap();
            model.write(lba, t);
        }
        img.flush().unwrap();
        model.flush();
        f.fail_after(n);
        for t in 10..40u32 {
            let lba = rng.below(16000);
            if img.write(lba, &sector(t, lba)).is_ok() {
                model.write(lba, t);
            } else {
                // A failed write may still have partially reached the file.
                model.write(lba, t);
                break;
            }
            if t % 7 == 0 && img.flush().is_ok() {
                model.flush();
            }
        }
        let _ = img.close();
        verify_crash_image(f.crash_image(&mut |_| false), &model, "stopped");
        verify_crash_image(f.crash_image(&mut |_| true), &model, "stopped+all");
    }
}

#[test]
fn close_truncates_reserve_and_footer_is_valid_at_every_stage() {
    let bytes = fresh_image(64 << 20, 2 << 20);
    let f = Arc::new(MemFile::from_bytes(bytes));
    let img = open_vhd_chain_file(
        Path::new("c.vhd"),
        f.clone(),
        &OpenOptions {
            read_only: false,
            prealloc_blocks: 8,
            ..Default::default()
        },
    )
    .unwrap();
    img.write(0, &sector(1, 0)).unwrap();
    // The reserve for 8 blocks exists now.
    assert!(f.len().unwrap() > 8 * (2 << 20));
    img.close().unwrap();
    let len = f.len().unwrap();
    assert!(len < 2 * (2 << 20), "reserve trimmed at close: {len}");
    let c = f.contents();
    assert_eq!(&c[c.len() - 512..c.len() - 504], b"conectix");
}

#[test]
fn stale_bitmap_in_reserve_after_crash_is_not_reused() {
    // Session 1 allocates block 5 and writes it; the crash loses the BAT write but keeps
    // the data and bitmap writes. (The engine syncs the BAT entry and the data before the
    // bitmap write, so it cannot produce that crash any more; a stale bitmap in the
    // reserve can still come from a bitmap written by an older engine, or a disk that
    // reorders, so the crash image is made by hand: block 5's BAT entry set back to
    // unused.) Session 2 allocates block 2 at the same place: the stale bitmap there
    // must not make block 2 show block 5's data.
    let bytes = fresh_image(16 << 20, 1 << 20);
    let f = Arc::new(MemFile::from_bytes(bytes));
    let img = open_vhd_chain_file(Path::new("c.vhd"), f.clone(), &opts(false)).unwrap();
    let spb = 2048u64;
    let mut buf = Vec::new();
    for i in 0..spb {
        buf.extend_from_slice(&sector(7, 5 * spb + i));
    }
    img.write(5 * spb, &buf).unwrap();
    assert_eq!(
        f.pending_ops(),
        1,
        "only the bitmap write since the data barrier"
    );
    let bat_off = img.header().unwrap().table_offset;
    let mut crashed = f.crash_image(&mut |_| true);
    let e = (bat_off + 5 * 4) as usize;
    assert_ne!(&crashed[e..e + 4], &[0xff; 4], "block 5 was allocated");
    crashed[e..e + 4].copy_from_slice(&[0xff; 4]);
    drop(img);
    let f = Arc::new(MemFile::from_bytes(crashed));
    let img = open_vhd_chain_file(Path::new("c.vhd"), f.clone(), &opts(false)).unwrap();
    let mut b = vec![0u8; 512];
    img.read(5 * spb, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0), "block 5 was never published");
    img.write(2 * spb, &sector(9, 2 * spb)).unwrap();
    let mut blk = vec![0u8; (spb * 512) as usize];
    img.read(2 * spb, &mut blk).unwrap();
    assert_eq!(&blk[..512], &sector(9, 2 * spb));
    assert!(
        blk[512..].iter().all(|&x| x == 0),
        "block 2 must not inherit a stale bitmap"
    );
    // Crash again just before session 2's bitmap write reached the disk: the published
    // BAT entry must point at a zeroed bitmap, not at block 5's stale one.
    let n = f.pending_ops();
    let again = f.crash_image(&mut |i| i + 1 < n);
    let f3 = Arc::new(MemFile::from_bytes(again));
    let img = open_vhd_chain_file(Path::new("c.vhd"), f3, &opts(true)).unwrap();
    img.read(2 * spb, &mut blk).unwrap();
    assert!(
        blk[512..].iter().all(|&x| x == 0),
        "published block must have a zero bitmap on disk"
    );
}

#[test]
fn block_device_vhd_allocates_in_place_until_full() {
    // An LVM-style VHD: the device is larger than the metadata; the footer sits at the
    // device end and never moves. Stale bytes fill the space between.
    let mut bytes = fresh_image(8 << 20, 1 << 20);
    let footer = bytes[bytes.len() - 512..].to_vec();
    let dev_len = 5 * (1 << 20) + 64 * 1024;
    bytes.truncate(bytes.len() - 512);
    bytes.resize(dev_len - 512, 0xee);
    bytes.extend_from_slice(&footer);
    let f = Arc::new(MemFile::block_device(bytes));
    let img = open_vhd_chain_file(Path::new("lv"), f.clone(), &opts(false)).unwrap();
    let mut written = Vec::new();
    let mut full = false;
    for blk in 0..8u64 {
        let lba = blk * 2048 + 3;
        match img.write(lba, &sector(blk as u32 + 1, lba)) {
            Ok(()) => written.push((lba, blk as u32 + 1)),
            Err(e) => {
                assert!(matches!(e, blktap3::image::ImageError::NoSpace(_)), "{e}");
                full = true;
                break;
            }
        }
    }
    assert!(full, "a 5 MiB device holds fewer than 8 blocks of 1 MiB");
    assert_eq!(
        written.len(),
        5,
        "5 blocks (with bitmaps and alignment gaps) fit"
    );
    img.close().unwrap();
    assert_eq!(f.len().unwrap(), dev_len as u64, "device size unchanged");
    let img = open_vhd_chain_file(Path::new("lv"), f.clone(), &opts(true)).unwrap();
    for (lba, t) in written {
        let mut b = [0u8; 512];
        img.read(lba, &mut b).unwrap();
        assert_eq!(b, sector(t, lba));
        // Stale 0xee bytes never show: the rest of each block reads as zeros.
        img.read(lba + 1, &mut b).unwrap();
        assert_eq!(b, [0u8; 512]);
    }
}

/// Regression: `zero_bat` (vhd-util modify -z) wrote the emptied BAT before the emptied
/// batmap, so a crash in between left the batmap marking blocks full that the BAT no
/// longer held (invariant 4: the batmap only ever understates fullness).
#[test]
fn zero_bat_never_leaves_the_batmap_claiming_unallocated_blocks_full() {
    let base = {
        let f = Arc::new(MemFile::from_bytes(fresh_image(4 << 20, 1 << 20)));
        let img = open_vhd_chain_file(Path::new("z.vhd"), f.clone(), &opts(false)).unwrap();
        img.write(0, &vec![7u8; 1 << 20]).unwrap();
        img.write(2048, &vec![8u8; 1 << 20]).unwrap();
        img.close().unwrap();
        f.contents()
    };
    let full_but_unallocated = |bytes: Vec<u8>| -> Vec<usize> {
        let img = VhdImage::open_file(
            Path::new("z.vhd"),
            Arc::new(MemFile::from_bytes(bytes)),
            &Default::default(),
        )
        .unwrap();
        let Some((_, map)) = img.batmap().filter(|_| img.batmap_valid() == Some(true)) else {
            return Vec::new();
        };
        img.bat()
            .iter()
            .enumerate()
            .filter(|&(i, &e)| e == u32::MAX && map[i / 8] & (0x80 >> (i % 8)) != 0)
            .map(|(i, _)| i)
            .collect()
    };
    assert!(full_but_unallocated(base.clone()).is_empty());
    let mut stopped_early = 0;
    for n in 0..16 {
        let f = Arc::new(MemFile::from_bytes(base.clone()));
        let img = VhdImage::open_file(
            Path::new("z.vhd"),
            f.clone(),
            &blktap3::image::vhd::VhdOpenOptions {
                read_only: false,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(img.allocated_blocks(), 2);
        f.fail_after(n);
        if img.zero_bat().is_err() {
            stopped_early += 1;
        }
        let pending = f.pending_ops();
        for keep in 0..=pending {
            let crashed = f.crash_image(&mut |i| i < keep);
            assert_eq!(
                full_but_unallocated(crashed),
                Vec::<usize>::new(),
                "stopped after {n} writes, crash keeping {keep} of {pending} unsynced"
            );
        }
    }
    assert!(stopped_early > 0);
}

/// A short write sequence with a crash after every write that loses exactly one of the
/// unsynced file writes (each in turn) and keeps all the others. When a write sets new
/// bitmap bits, one of these crashes keeps its bitmap sector but loses its data: the
/// sectors must then read their old content (the engine made the data durable before
/// the bitmap write), never the file's unwritten bytes under a set bit.
fn crash_dropping_each_write(
    bytes: Vec<u8>,
    path: &Path,
    base: &OpenOptions,
    mut model: Model,
    seed: u64,
) {
    let f = Arc::new(MemFile::from_bytes(bytes));
    let rw = OpenOptions {
        read_only: false,
        ..base.clone()
    };
    let img = open_vhd_chain_file(path, f.clone(), &rw).unwrap();
    let nsec = model.flushed.len() as u64;
    let mut rng = XorShift64(seed | 1);
    for tag in 1..=12u32 {
        if tag % 4 == 0 {
            img.flush().unwrap();
            model.flush();
        }
        // Up to 8 sectors, sometimes across a block boundary.
        let n = 1 + rng.below(8);
        let lba = rng.below(nsec - n);
        let mut buf = Vec::new();
        for i in 0..n {
            buf.extend_from_slice(&sector(tag, lba + i));
        }
        img.write(lba, &buf).unwrap();
        for i in 0..n {
            model.write(lba + i, tag);
        }
        let pending = f.pending_ops();
        for lost in 0..pending {
            verify_crash_image_with(
                f.crash_image(&mut |i| i != lost),
                &model,
                &format!("seed {seed} write {tag} (lba {lba}+{n}), crash losing unsynced write {lost} of {pending}"),
                path,
                base,
            );
        }
    }
    img.close().unwrap();
}

fn test_key() -> Vec<u8> {
    (0..64u8)
        .map(|i| i.wrapping_mul(37).wrapping_add(11))
        .collect()
}

#[test]
fn encrypted_vhd_never_shows_lost_data_under_a_set_bitmap_bit() {
    // Through AES-XTS, a sector whose bit is set but whose data never reached the disk
    // decrypts the file's zeros to noise: it must read zeros (never written) instead.
    let k = test_key();
    let bytes = fresh_image(1 << 20, 16 << 10);
    let f = Arc::new(MemFile::from_bytes(bytes));
    let img = VhdImage::open_file(
        Path::new("enc.vhd"),
        f.clone(),
        &blktap3::image::vhd::VhdOpenOptions {
            read_only: false,
            ..Default::default()
        },
    )
    .unwrap();
    img.set_keyhash(&KeyHash::for_key(&k, &[3u8; 32])).unwrap();
    img.close().unwrap();
    let base = OpenOptions {
        keys: KeySource::Explicit(KeyBytes::new(k)),
        ..opts(false)
    };
    // The key is in use: a sector written through it is not stored as plaintext.
    {
        let f2 = Arc::new(MemFile::from_bytes(f.contents()));
        let img = open_vhd_chain_file(Path::new("enc.vhd"), f2.clone(), &base).unwrap();
        img.write(0, &sector(99, 0)).unwrap();
        img.close().unwrap();
        let c = f2.contents();
        assert!(
            !c.windows(512).any(|w| w == sector(99, 0)),
            "image is encrypted"
        );
    }
    for seed in [1u64, 2, 3] {
        crash_dropping_each_write(
            f.contents(),
            Path::new("enc.vhd"),
            &base,
            Model::new(2048),
            seed,
        );
    }
}

#[test]
fn differencing_leaf_never_hides_parent_data_under_a_set_bitmap_bit() {
    // On a differencing leaf, a lost data write under a surviving bit would read the
    // file's zeros instead of the parent's data.
    const PTAG: u32 = 0x7777;
    let d = tempfile::tempdir().unwrap();
    let parent = d.path().join("parent.vhd");
    create(
        &parent,
        &CreateOptions {
            size: 1 << 20,
            fixed: false,
            block_size: 16 << 10,
            max_size: None,
        },
    )
    .unwrap();
    let nsec = 2048u64;
    {
        let p = blktap3::image::chain::open_vhd_chain(&parent, &opts(false)).unwrap();
        let mut buf = Vec::new();
        for lba in 0..nsec {
            buf.extend_from_slice(&sector(PTAG, lba));
        }
        p.write(0, &buf).unwrap();
        p.close().unwrap();
    }
    let leaf = d.path().join("leaf.vhd");
    snapshot(&leaf, &parent, &SnapshotOptions::default()).unwrap();
    let bytes = std::fs::read(&leaf).unwrap();
    let mut model = Model::new(nsec as usize);
    model.flushed = vec![PTAG; nsec as usize];
    for seed in [4u64, 5, 6] {
        crash_dropping_each_write(
            bytes.clone(),
            &leaf,
            &opts(false),
            Model {
                flushed: model.flushed.clone(),
                since: model.since.clone(),
            },
            seed,
        );
    }
}

/// A [`MemFile`] that offers a descriptor for asynchronous I/O (one on `/dev/null`, never
/// used), so that the image maps writes for tapdisk's loop ([`Image::direct_map`]); the
/// test then does what the loop does, with the simulated file.
#[derive(Debug)]
struct LoopFile {
    mem: Arc<MemFile>,
    null: std::fs::File,
}

impl BlockFile for LoopFile {
    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        self.mem.read_at(buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> std::io::Result<()> {
        self.mem.write_at(buf, off)
    }
    fn sync(&self) -> std::io::Result<()> {
        self.mem.sync()
    }
    fn len(&self) -> std::io::Result<u64> {
        self.mem.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.mem.set_len(len)
    }
    fn resizable(&self) -> bool {
        self.mem.resizable()
    }
    fn punch_hole(&self, off: u64, len: u64) -> std::io::Result<()> {
        self.mem.punch_hole(off, len)
    }
    fn get_xattr(&self, name: &str) -> std::io::Result<Option<Vec<u8>>> {
        self.mem.get_xattr(name)
    }
    fn set_xattr(&self, name: &str, value: &[u8]) -> std::io::Result<()> {
        self.mem.set_xattr(name, value)
    }
    fn aio_fd(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        Some(self.null.as_fd())
    }
}

/// The loop's path on a fresh image: a write the image maps goes to the file at the mapped
/// offset (the loop's asynchronous write), and writes mapped with `commit` wait, a few at a
/// time, for one `commit_writes` call (a worker's commit batch: one sync, then the blocks'
/// bitmaps and BAT sectors together), after which they count as acknowledged; first
/// writes to blocks are allocated by `direct_map` itself while the reserve has room (the
/// BAT sector then reaches the file with the commit), and the others go through
/// `Image::write` (a worker). Crashes at every step, dropping any subset or keeping any
/// prefix of the unsynced writes: every write acknowledged before the last flush survives
/// and nothing reads as garbage.
fn run_loop_sequence(seed: u64, size: u64, block: u32, steps: usize) {
    let mut rng = XorShift64(seed | 1);
    let mem = Arc::new(MemFile::from_bytes(fresh_image(size, block)));
    let file = Arc::new(LoopFile {
        mem: mem.clone(),
        null: std::fs::File::open("/dev/null").unwrap(),
    });
    let img = open_vhd_chain_file(Path::new("c.vhd"), file, &opts(false)).unwrap();
    let nsec = size / 512;
    let mut model = Model::new(nsec as usize);
    let mut tag = 1u32;
    let mut pending: Vec<(u64, u64)> = Vec::new();
    let (mut mapped, mut allocated_here) = (0, 0);
    // Requests of up to half a block (24 sectors at most): most lie in one block.
    let max_n = (u64::from(block) / 1024).clamp(1, 24);
    for step in 0..steps {
        let r = rng.below(10);
        if r < 2 || (r < 5 && !pending.is_empty()) {
            for res in img.commit_writes(&pending) {
                res.unwrap();
            }
            pending.clear();
            if r < 2 {
                img.flush().unwrap();
                model.flush();
            }
        } else {
            let n = 1 + rng.below(max_n);
            let lba = rng.below(nsec - n);
            let mut buf = Vec::with_capacity((n * 512) as usize);
            for i in 0..n {
                buf.extend_from_slice(&sector(tag, lba + i));
            }
            let before = img.allocated_blocks();
            match img.direct_map(lba, n, true) {
                Some(m) => {
                    mapped += 1;
                    if img.allocated_blocks() > before {
                        allocated_here += 1;
                    }
                    img.file().write_at(&buf, m.offset).unwrap();
                    if m.commit {
                        pending.push((lba, n));
                    }
                }
                None => img.write(lba, &buf).unwrap(),
            }
            for i in 0..n {
                model.write(lba + i, tag);
            }
            tag += 1;
        }
        if step % 2 == 1 {
            continue;
        }
        let pend = mem.pending_ops();
        verify_crash_image(mem.crash_image(&mut |_| false), &model, "loop: drop all");
        if pending.is_empty() {
            verify_crash_image(mem.crash_image(&mut |_| true), &model.latest(), "loop: all");
        }
        let mut r = XorShift64(rng.next() | 1);
        verify_crash_image(
            mem.crash_image(&mut |_| r.below(2) == 0),
            &model,
            "loop: subset",
        );
        if pend > 0 {
            let k = rng.below(pend as u64) as usize;
            verify_crash_image(mem.crash_image(&mut |i| i < k), &model, "loop: prefix");
        }
    }
    for res in img.commit_writes(&pending) {
        res.unwrap();
    }
    img.close().unwrap();
    model.flush();
    verify_crash_image(mem.crash_image(&mut |_| false), &model, "loop: after close");
    assert!(mapped > steps / 4, "{mapped} of {steps} writes mapped");
    assert!(allocated_here > 0, "no block allocated by direct_map");
}

#[test]
fn crash_at_any_point_on_the_loops_path() {
    run_loop_sequence(1, 24 << 20, 2 << 20, 100);
    run_loop_sequence(11, 4 << 20, 64 << 10, 100);
    // 256 blocks: two BAT sectors.
    run_loop_sequence(21, 4 << 20, 16 << 10, 100);
}
