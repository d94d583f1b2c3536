//! `vhd-util coalesce -a`: clearing the bits of the layers between child and ancestor,
//! batched per layer (`VhdImage::clear_bitmap_bits_batch`).
//!
//! Chain base <- mid <- leaf. The leaf's sectors are copied into base first (as the tool
//! does, ending with a flush), then mid's bits for those sectors are cleared on a simulated
//! file (`MemFile`) wrapped to count syncs and, at every sync, to record crash images: the
//! synced state plus every prefix and a number of random subsets of the unsynced writes.
//! Each crash image, opened as mid's chain (parent base on disk), must open cleanly, keep
//! the batmap an understatement of its bitmaps, have only lost bits that the leaf's mask
//! covers, and read every sector as mid's old data or the coalesced data.

mod common;
use common::data::{pattern, XorShift64};
use common::image::{read_all, rw, write};

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use blktap3::image::chain::{open_vhd_chain, open_vhd_chain_file, OpenOptions};
use blktap3::image::file::{BlockFile, MemFile};
use blktap3::image::vhd::format::bit_test;
use blktap3::image::vhd::ops::{coalesce_onto, create, snapshot, CreateOptions, SnapshotOptions};
use blktap3::image::vhd::{VhdImage, VhdOpenOptions};
use blktap3::image::Image;

const MIB: u64 = 1 << 20;

/// A `MemFile` that counts syncs and, while `capture` is on, records crash images at each.
#[derive(Debug)]
struct Probe {
    inner: Arc<MemFile>,
    syncs: AtomicU64,
    capture: AtomicBool,
    images: Mutex<Vec<(u64, Vec<u8>)>>,
}

impl Probe {
    fn new(bytes: Vec<u8>) -> Arc<Probe> {
        Arc::new(Probe {
            inner: Arc::new(MemFile::from_bytes(bytes)),
            syncs: AtomicU64::new(0),
            capture: AtomicBool::new(false),
            images: Mutex::new(Vec::new()),
        })
    }
}

impl BlockFile for Probe {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.inner.read_at(buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.inner.write_at(buf, off)
    }
    fn sync(&self) -> io::Result<()> {
        let n = self.syncs.fetch_add(1, Ordering::SeqCst) + 1;
        if self.capture.load(Ordering::SeqCst) {
            let k = self.inner.pending_ops();
            let mut imgs = self.images.lock().unwrap();
            for p in 0..=k {
                imgs.push((n, self.inner.crash_image(&mut |i| i < p)));
            }
            let mut rng = XorShift64(0x9e37_79b9_7f4a_7c15 ^ n);
            for _ in 0..16 {
                imgs.push((n, self.inner.crash_image(&mut |_| rng.below(2) == 0)));
            }
        }
        self.inner.sync()
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn resizable(&self) -> bool {
        self.inner.resizable()
    }
    fn punch_hole(&self, off: u64, len: u64) -> io::Result<()> {
        self.inner.punch_hole(off, len)
    }
    fn get_xattr(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        self.inner.get_xattr(name)
    }
    fn set_xattr(&self, name: &str, value: &[u8]) -> io::Result<()> {
        self.inner.set_xattr(name, value)
    }
}

fn rw_meta() -> VhdOpenOptions {
    VhdOpenOptions {
        read_only: false,
        ..Default::default()
    }
}

/// base <- mid <- leaf, 32 MiB (16 blocks of 2 MiB). mid has partial blocks 0, 2, 5 and
/// full blocks 1, 4 (batmap bits set); the leaf overlaps mid in blocks 0, 1, 4, 5 (not 2)
/// and also writes block 7, which mid does not hold.
fn chain(dir: &Path) -> (String, String, String) {
    let p = |n: &str| dir.join(n).to_string_lossy().into_owned();
    let (base, mid, leaf) = (p("base.vhd"), p("mid.vhd"), p("leaf.vhd"));
    create(Path::new(&base), &CreateOptions::dynamic(32 * MIB)).unwrap();
    write(&base, None, 0, &pattern(64 * 512, 1));
    write(&base, None, 4096 * 5 + 100, &pattern(300 * 512, 2));
    let snap = SnapshotOptions {
        raw_parent: false,
        link_exact: true,
        depth_limit: None,
        max_size: None,
        copy_keyhash: false,
    };
    snapshot(Path::new(&mid), Path::new(&base), &snap).unwrap();
    write(&mid, None, 10, &pattern(100 * 512, 3));
    write(&mid, None, 4096, &pattern(4096 * 512, 4));
    write(&mid, None, 4096 * 2 + 7, &pattern(9 * 512, 5));
    write(&mid, None, 4096 * 4, &pattern(4096 * 512, 6));
    write(&mid, None, 4096 * 5 + 50, &pattern(200 * 512, 7));
    snapshot(Path::new(&leaf), Path::new(&mid), &snap).unwrap();
    write(&leaf, None, 60, &pattern(80 * 512, 8));
    write(&leaf, None, 4096 + 1000, &pattern(33 * 512, 9));
    write(&leaf, None, 4096 * 4 + 4000, &pattern(96 * 512, 10));
    write(&leaf, None, 4096 * 5, &pattern(100 * 512, 11));
    write(&leaf, None, 4096 * 7 + 3, &pattern(5 * 512, 12));
    (base, mid, leaf)
}

fn mask_of(leaf: &VhdImage, blk: u32) -> Option<Vec<u8>> {
    leaf.block_bitmap(blk).unwrap()
}

fn sector_in(mask: &Option<Vec<u8>>, s: u64) -> bool {
    mask.as_ref().is_some_and(|m| bit_test(m, s))
}

#[test]
fn coalesce_ancestor_clears_a_layer_with_two_syncs_and_every_crash_state_is_consistent() {
    let d = tempfile::tempdir().unwrap();
    let (base, mid, leaf) = chain(d.path());
    let leaf_view = read_all(&leaf, None);
    let mid_before = read_all(&mid, None);
    let mid_bytes = std::fs::read(&mid).unwrap();

    // The tool's first step: the leaf's sectors into base, flushed.
    {
        let child = open_vhd_chain(Path::new(&leaf), &OpenOptions::default()).unwrap();
        let target = open_vhd_chain(Path::new(&base), &rw()).unwrap();
        assert_eq!(
            coalesce_onto(&child, &target, None).unwrap(),
            80 + 33 + 96 + 100 + 5
        );
        target.close().unwrap();
        child.close().unwrap();
    }
    let leaf_img = VhdImage::open(Path::new(&leaf), &VhdOpenOptions::default()).unwrap();
    let spb = u64::from(leaf_img.sectors_per_block());
    let masks: Vec<Option<Vec<u8>>> = (0..16).map(|b| mask_of(&leaf_img, b)).collect();
    let masked = |s: u64| sector_in(&masks[(s / spb) as usize], s % spb);

    // What mid must read once its bits are cleared: the leaf's data where the leaf wrote.
    let mut mid_want = mid_before.clone();
    for s in 0..(mid_want.len() / 512) as u64 {
        if masked(s) {
            let r = s as usize * 512..(s as usize + 1) * 512;
            mid_want[r.clone()].copy_from_slice(&leaf_view[r]);
        }
    }

    // mid's own view of which blocks lose bits and which of them are marked full.
    let old = VhdImage::open_file(
        Path::new(&mid),
        Arc::new(MemFile::from_bytes(mid_bytes.clone())),
        &VhdOpenOptions::default(),
    )
    .unwrap();
    let full_map = old.batmap().map(|(_, m)| m).unwrap_or_default();
    let old_bitmaps: Vec<Option<Vec<u8>>> = (0..16).map(|b| old.block_bitmap(b).unwrap()).collect();
    let mut losing = 0u64;
    let mut losing_full = 0u64;
    for b in 0..16usize {
        if let (Some(bm), Some(m)) = (&old_bitmaps[b], &masks[b]) {
            if bm.iter().zip(m).any(|(&x, &k)| x & k != 0) {
                losing += 1;
                losing_full += u64::from(bit_test(&full_map, b as u64));
            }
        }
    }
    assert_eq!(
        (losing, losing_full),
        (4, 2),
        "blocks 0,1,4,5 lose bits; 1,4 are full"
    );

    // Before: one call per block, each with a sync (two when the block is marked full).
    let per_block = Probe::new(mid_bytes.clone());
    {
        let img = VhdImage::open_file(Path::new(&mid), per_block.clone(), &rw_meta()).unwrap();
        let opened = per_block.syncs.load(Ordering::SeqCst);
        for (b, m) in masks.iter().enumerate() {
            if let Some(m) = m {
                img.clear_bitmap_bits(b as u32, m).unwrap();
            }
        }
        assert_eq!(
            per_block.syncs.load(Ordering::SeqCst) - opened,
            losing + losing_full
        );
    }

    // After: one sync for the batmap, one for all bitmaps.
    let probe = Probe::new(mid_bytes.clone());
    let img = VhdImage::open_file(Path::new(&mid), probe.clone(), &rw_meta()).unwrap();
    let opened = probe.syncs.load(Ordering::SeqCst);
    probe.capture.store(true, Ordering::SeqCst);
    let n = img
        .clear_bitmap_bits_batch(&mut |b| Ok(mask_of(&leaf_img, b)))
        .unwrap();
    probe.capture.store(false, Ordering::SeqCst);
    assert_eq!(n, losing);
    assert_eq!(probe.syncs.load(Ordering::SeqCst) - opened, 2);
    // A second pass finds nothing left to clear and does not sync.
    assert_eq!(
        img.clear_bitmap_bits_batch(&mut |b| Ok(mask_of(&leaf_img, b)))
            .unwrap(),
        0
    );
    assert_eq!(probe.syncs.load(Ordering::SeqCst) - opened, 2);
    drop(img);
    // Same bytes on disk as the per-block path.
    assert!(probe.inner.contents() == per_block.inner.contents());

    let mut images = probe.images.lock().unwrap().clone();
    assert!(images.iter().any(|(n, _)| *n == opened + 1));
    assert!(images.iter().any(|(n, _)| *n == opened + 2));
    images.push((0, probe.inner.contents()));
    let last = images.len() - 1;
    for (k, (sync_no, bytes)) in images.into_iter().enumerate() {
        let ctx = format!("crash image {k} (at sync {sync_no})");
        // Metadata: the batmap understates, bits are only lost where the leaf wrote.
        let meta = VhdImage::open_file(
            Path::new(&mid),
            Arc::new(MemFile::from_bytes(bytes.clone())),
            &VhdOpenOptions::default(),
        )
        .unwrap_or_else(|e| panic!("{ctx}: open: {e}"));
        let full = match meta.batmap_valid() {
            Some(true) => meta.batmap().map(|(_, m)| m).unwrap_or_default(),
            _ => Vec::new(),
        };
        assert_eq!(meta.bat().len(), 16, "{ctx}");
        for b in 0..16u32 {
            let now = meta.block_bitmap(b).unwrap();
            assert_eq!(now.is_some(), old_bitmaps[b as usize].is_some(), "{ctx}");
            let (Some(now), Some(was)) = (now, &old_bitmaps[b as usize]) else {
                continue;
            };
            for s in 0..spb {
                let (n, w) = (bit_test(&now, s), bit_test(was, s));
                assert!(!n || w, "{ctx}: block {b} sector {s} gained a bit");
                if w && !n {
                    assert!(sector_in(&masks[b as usize], s), "{ctx}: {b}/{s} lost");
                }
                if !full.is_empty() && bit_test(&full, u64::from(b)) {
                    assert!(n, "{ctx}: block {b} marked full, sector {s} clear");
                }
            }
        }
        drop(meta);
        // Data: mid's chain reads its old data or the coalesced data, nothing else.
        let file = Arc::new(MemFile::from_bytes(bytes));
        let view = {
            let c = open_vhd_chain_file(Path::new(&mid), file.clone(), &OpenOptions::default())
                .unwrap_or_else(|e| panic!("{ctx}: chain open: {e}"));
            let mut v = vec![0u8; mid_before.len()];
            c.read(0, &mut v).unwrap();
            v
        };
        for s in 0..(view.len() / 512) {
            let r = s * 512..(s + 1) * 512;
            let ok = view[r.clone()] == mid_before[r.clone()]
                || (masked(s as u64) && view[r.clone()] == leaf_view[r]);
            assert!(ok, "{ctx}: sector {s} reads neither old nor coalesced data");
        }
        if k == last {
            assert_eq!(view, mid_want, "{ctx}: final state");
            assert!(full.is_empty() || !bit_test(&full, 1) && !bit_test(&full, 4));
        }
        // Recovery: a read-write open and close keeps the same view.
        let c = open_vhd_chain_file(Path::new(&mid), file.clone(), &rw())
            .unwrap_or_else(|e| panic!("{ctx}: rw open: {e}"));
        c.close().unwrap();
        let again = open_vhd_chain_file(
            Path::new(&mid),
            Arc::new(MemFile::from_bytes(file.contents())),
            &OpenOptions::default(),
        )
        .unwrap();
        let mut v = vec![0u8; view.len()];
        again.read(0, &mut v).unwrap();
        assert!(v == view, "{ctx}: view changed across rw open/close");
    }
}
