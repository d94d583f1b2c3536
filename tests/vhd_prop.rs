//! Model-based property tests: random write/read/flush/discard/reopen sequences against a
//! dynamic VHD and against a 3-deep chain behave like an in-memory disk; concurrent writers
//! from several threads end in the state the model predicts.

mod common;
use common::data::XorShift64;
use common::image::rw_prealloc;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use blktap3::image::chain::{open_vhd_chain, OpenOptions};
use blktap3::image::vhd::ops::{create, snapshot, CreateOptions, SnapshotOptions};
use blktap3::image::vhd::VhdImage;
use blktap3::image::Image;
use proptest::prelude::*;

const SIZE: u64 = 4 << 20;
const NSEC: u64 = SIZE / 512;
const BLOCK: u32 = 64 << 10;

#[derive(Clone, Debug)]
enum Op {
    Write { lba: u64, n: u64, seed: u8 },
    Read { lba: u64, n: u64 },
    Discard { lba: u64, n: u64 },
    Flush,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    let range = (0..NSEC).prop_flat_map(|lba| (Just(lba), 1..=(NSEC - lba).min(300)));
    prop_oneof![
        5 => (range.clone(), any::<u8>()).prop_map(|((lba, n), seed)| Op::Write { lba, n, seed }),
        3 => range.clone().prop_map(|(lba, n)| Op::Read { lba, n }),
        1 => range.prop_map(|(lba, n)| Op::Discard { lba, n }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reopen),
    ]
}

fn fill(seed: u8, lba: u64, n: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity((n * 512) as usize);
    for s in lba..lba + n {
        for i in 0..512u64 {
            v.push((s.wrapping_mul(131) ^ i ^ u64::from(seed) << 3) as u8 | 1);
        }
    }
    v
}

fn make(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    create(
        &p,
        &CreateOptions {
            size: SIZE,
            fixed: false,
            block_size: BLOCK,
            max_size: None,
        },
    )
    .unwrap();
    p
}

/// Run `ops` on the chain whose leaf is `leaf`; `below` is what the parent chain shows.
fn run(leaf: &Path, below: &[u8], ops: &[Op]) -> Result<(), TestCaseError> {
    let mut overlay: Vec<Option<Vec<u8>>> = vec![None; NSEC as usize];
    let view = |ov: &Vec<Option<Vec<u8>>>, lba: u64, n: u64| -> Vec<u8> {
        let mut v = Vec::new();
        for s in lba..lba + n {
            match &ov[s as usize] {
                Some(d) => v.extend_from_slice(d),
                None => v.extend_from_slice(&below[(s * 512) as usize..((s + 1) * 512) as usize]),
            }
        }
        v
    };
    let mut img = open_vhd_chain(leaf, &rw_prealloc(3)).unwrap();
    for o in ops {
        match *o {
            Op::Write { lba, n, seed } => {
                let d = fill(seed, lba, n);
                img.write(lba, &d).unwrap();
                for i in 0..n {
                    overlay[(lba + i) as usize] =
                        Some(d[(i * 512) as usize..((i + 1) * 512) as usize].to_vec());
                }
            }
            Op::Read { lba, n } => {
                let mut b = vec![0u8; (n * 512) as usize];
                img.read(lba, &mut b).unwrap();
                prop_assert!(b == view(&overlay, lba, n), "read {lba}+{n} differs");
                // block_status agrees with the overlay where the leaf owns data.
                let st = img.block_status(lba, n).unwrap();
                prop_assert_eq!(st.iter().map(|e| e.nsectors).sum::<u64>(), n);
                for e in st {
                    for s in e.sector..e.sector + e.nsectors {
                        if overlay[s as usize].is_some() {
                            prop_assert!(e.allocated, "sector {} written but reported as hole", s);
                        }
                    }
                }
            }
            Op::Discard { lba, n } => {
                img.discard(lba, n).unwrap();
                for i in 0..n {
                    overlay[(lba + i) as usize] = None;
                }
            }
            Op::Flush => img.flush().unwrap(),
            Op::Reopen => {
                img.close().unwrap();
                img = open_vhd_chain(leaf, &rw_prealloc(3)).unwrap();
            }
        }
    }
    let mut all = vec![0u8; SIZE as usize];
    img.read(0, &mut all).unwrap();
    prop_assert!(all == view(&overlay, 0, NSEC), "final contents differ");
    img.close().unwrap();
    // The file is a consistent VHD afterwards.
    let v = VhdImage::open(leaf, &Default::default()).unwrap();
    prop_assert!(v.physical_size() == std::fs::metadata(leaf).unwrap().len());
    Ok(())
}

fn write_random(img: &dyn Image, seed: u8, model: &mut [u8]) {
    let mut rng = XorShift64(u64::from(seed) * 0x9e37_79b9 + 1);
    for _ in 0..20 {
        let x = rng.next();
        let n = 1 + x % 200;
        let lba = (x >> 16) % (NSEC - n);
        let d = fill(seed ^ (x as u8), lba, n);
        img.write(lba, &d).unwrap();
        model[(lba * 512) as usize..((lba + n) * 512) as usize].copy_from_slice(&d);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn dynamic_vhd_matches_model(ops in proptest::collection::vec(op(), 1..40)) {
        let d = tempfile::tempdir().unwrap();
        let p = make(d.path(), "d.vhd");
        run(&p, &vec![0u8; SIZE as usize], &ops)?;
    }

    #[test]
    fn three_deep_chain_matches_model(ops in proptest::collection::vec(op(), 1..30), s1 in any::<u8>(), s2 in any::<u8>()) {
        let d = tempfile::tempdir().unwrap();
        let base = make(d.path(), "base.vhd");
        let mut model = vec![0u8; SIZE as usize];
        let img = open_vhd_chain(&base, &rw_prealloc(3)).unwrap();
        write_random(&img, s1, &mut model);
        img.close().unwrap();
        let mid = d.path().join("mid.vhd");
        snapshot(&mid, &base, &SnapshotOptions::default()).unwrap();
        let img = open_vhd_chain(&mid, &rw_prealloc(3)).unwrap();
        write_random(&img, s2, &mut model);
        img.close().unwrap();
        let leaf = d.path().join("leaf.vhd");
        snapshot(&leaf, &mid, &SnapshotOptions::default()).unwrap();
        run(&leaf, &model, &ops)?;
        // Parents were not modified by the leaf's I/O.
        let m = open_vhd_chain(&mid, &OpenOptions::default()).unwrap();
        let mut b = vec![0u8; SIZE as usize];
        m.read(0, &mut b).unwrap();
        prop_assert!(b == model);
    }
}

#[test]
fn concurrent_writers_match_model() {
    let d = tempfile::tempdir().unwrap();
    let base = make(d.path(), "base.vhd");
    let mut below = vec![0u8; SIZE as usize];
    let img = open_vhd_chain(&base, &rw_prealloc(3)).unwrap();
    write_random(&img, 77, &mut below);
    img.close().unwrap();
    let leaf = d.path().join("leaf.vhd");
    snapshot(&leaf, &base, &SnapshotOptions::default()).unwrap();
    let img = Arc::new(open_vhd_chain(&leaf, &rw_prealloc(3)).unwrap());
    const THREADS: u64 = 4;
    // Thread t owns sectors with lba % THREADS == t: every block is shared by all threads,
    // so allocation races, bitmap updates and reserve extensions interleave.
    let results: Vec<Vec<(u64, u8)>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..THREADS)
            .map(|t| {
                let img = img.clone();
                s.spawn(move || {
                    let mut log = Vec::new();
                    let mut rng = XorShift64(0x1234_5678u64 + t);
                    for i in 0..600u64 {
                        let x = rng.next();
                        let lba = ((x >> 8) % (NSEC / THREADS)) * THREADS + t;
                        let seed = (i as u8) ^ (t as u8);
                        img.write(lba, &fill(seed, lba, 1)).unwrap();
                        log.push((lba, seed));
                        if i % 50 == 0 {
                            img.flush().unwrap();
                        }
                        if i % 7 == 0 {
                            let mut b = vec![0u8; 512];
                            img.read(lba, &mut b).unwrap();
                            assert_eq!(b, fill(seed, lba, 1), "read own write");
                        }
                    }
                    log
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut model = below.clone();
    for log in &results {
        for &(lba, seed) in log {
            model[(lba * 512) as usize..((lba + 1) * 512) as usize]
                .copy_from_slice(&fill(seed, lba, 1));
        }
    }
    let mut all = vec![0u8; SIZE as usize];
    img.read(0, &mut all).unwrap();
    assert!(all == model, "concurrent result differs from model");
    img.close().unwrap();
    let img = open_vhd_chain(&leaf, &OpenOptions::default()).unwrap();
    img.read(0, &mut all).unwrap();
    assert!(all == model, "reopened result differs from model");
}
