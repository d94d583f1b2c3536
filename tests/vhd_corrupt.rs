//! Untrusted VHD metadata: every corruption gives a clear error (never a panic, never a
//! huge allocation) and leaves the file unchanged, even when opened read-write.

mod common;
use common::image::{create_fixed, rw};

use std::path::{Path, PathBuf};
use std::sync::Arc;

use blktap3::image::chain::{open_vhd_chain, OpenOptions};
use blktap3::image::file::MemFile;
use blktap3::image::vhd::format::*;
use blktap3::image::vhd::ops::{create, snapshot, CreateOptions, SnapshotOptions};
use blktap3::image::vhd::{FooterSource, VhdImage, VhdOpenOptions};
use blktap3::image::{Image, ImageError};
use proptest::prelude::*;

/// A 10 MiB dynamic VHD with two allocated blocks.
fn sample(dir: &Path) -> PathBuf {
    let p = dir.join("s.vhd");
    create(&p, &CreateOptions::dynamic(10 << 20)).unwrap();
    let img = open_vhd_chain(&p, &rw()).unwrap();
    img.write(0, &[0x11; 4096]).unwrap();
    img.write(4096 * 3, &[0x22; 512]).unwrap();
    img.close().unwrap();
    p
}

fn expect_corrupt(p: &Path, what: &str) -> String {
    let before = std::fs::read(p).unwrap();
    for ro in [true, false] {
        let e = open_vhd_chain(
            p,
            &OpenOptions {
                read_only: ro,
                ..Default::default()
            },
        )
        .map(|_| ())
        .expect_err(what);
        assert!(
            matches!(e, ImageError::Corrupt { .. }),
            "{what}: expected a corrupt-image error, got {e}"
        );
        assert_eq!(std::fs::read(p).unwrap(), before, "{what}: file changed");
    }
    open_vhd_chain(p, &OpenOptions::default())
        .map(|_| ())
        .unwrap_err()
        .to_string()
}

/// Inverts the byte at `off`: unlike writing a fixed value, this changes it whatever it held
/// (byte 70 of a footer is inside its random UUID).
fn flip(p: &Path, off: usize) {
    let mut b = std::fs::read(p).unwrap();
    b[off] ^= 0xff;
    std::fs::write(p, b).unwrap();
}

fn patch(p: &Path, off: usize, bytes: &[u8]) {
    let mut b = std::fs::read(p).unwrap();
    b[off..off + bytes.len()].copy_from_slice(bytes);
    std::fs::write(p, b).unwrap();
}

fn rewrite_header(p: &Path, f: impl FnOnce(&mut DynHeader)) {
    let b = std::fs::read(p).unwrap();
    let mut hb = [0u8; 1024];
    hb.copy_from_slice(&b[512..1536]);
    let mut h = DynHeader::decode(&hb);
    f(&mut h);
    patch(p, 512, &h.encode());
}

fn rewrite_footers(p: &Path, f: impl Fn(&mut Footer)) {
    let b = std::fs::read(p).unwrap();
    let mut fb = [0u8; 512];
    fb.copy_from_slice(&b[b.len() - 512..]);
    let mut ft = Footer::decode(&fb);
    f(&mut ft);
    let enc = ft.encode();
    patch(p, 0, &enc);
    patch(p, b.len() - 512, &enc);
}

#[test]
fn truncated_files_are_rejected() {
    let d = tempfile::tempdir().unwrap();
    let p = sample(d.path());
    let full = std::fs::read(&p).unwrap();
    for len in [0usize, 100, 511, 1024, 2000, full.len() / 2] {
        std::fs::write(&p, &full[..len]).unwrap();
        let msg = expect_corrupt(&p, &format!("truncated to {len}"));
        assert!(msg.contains("corrupt"), "{msg}");
    }
}

#[test]
fn bad_primary_footer_recovers_from_backup() {
    let d = tempfile::tempdir().unwrap();
    let p = sample(d.path());
    let len = std::fs::metadata(&p).unwrap().len() as usize;
    flip(&p, len - 512 + 70); // breaks the checksum
    let before = std::fs::read(&p).unwrap();
    let img = VhdImage::open(&p, &VhdOpenOptions::default()).unwrap();
    assert_eq!(img.footer_source(), FooterSource::Backup);
    let mut b = vec![0u8; 512];
    img.read(4096 * 3, &mut b).unwrap();
    assert_eq!(b, vec![0x22; 512]);
    drop(img);
    assert_eq!(
        std::fs::read(&p).unwrap(),
        before,
        "read-only open writes nothing"
    );
    // Read-write open repairs the primary.
    let img = open_vhd_chain(&p, &rw()).unwrap();
    img.close().unwrap();
    let img = VhdImage::open(&p, &VhdOpenOptions::default()).unwrap();
    assert_eq!(img.footer_source(), FooterSource::Primary);
}

#[test]
fn short_511_byte_footer_is_found() {
    let d = tempfile::tempdir().unwrap();
    let p = sample(d.path());
    let mut b = std::fs::read(&p).unwrap();
    let footer = b[b.len() - 512..].to_vec();
    b.truncate(b.len() - 512);
    b.extend_from_slice(&footer[..511]);
    // Make the backup useless so only the short footer can work.
    b[0..8].copy_from_slice(b"xxxxxxxx");
    std::fs::write(&p, &b).unwrap();
    let img = VhdImage::open(&p, &VhdOpenOptions::default()).unwrap();
    assert_eq!(img.footer_source(), FooterSource::Short);
}

#[test]
fn both_footers_bad_is_an_error() {
    let d = tempfile::tempdir().unwrap();
    let p = sample(d.path());
    let len = std::fs::metadata(&p).unwrap().len() as usize;
    flip(&p, len - 512 + 70);
    flip(&p, 70);
    let msg = expect_corrupt(&p, "both footers");
    assert!(msg.contains("footer"), "{msg}");
}

#[test]
fn bad_header_checksum_cookie_version() {
    let d = tempfile::tempdir().unwrap();
    let p = sample(d.path());
    patch(&p, 512 + 100, &[0x42]);
    assert!(expect_corrupt(&p, "header checksum").contains("checksum"));
    let p = d.path().join("s.vhd");
    std::fs::remove_file(&p).unwrap();
    let p = sample(d.path());
    rewrite_header(&p, |h| h.hdr_ver = 0x0002_0000);
    expect_corrupt(&p, "header version");
}

#[test]
fn bat_entry_past_eof_is_rejected() {
    let d = tempfile::tempdir().unwrap();
    let p = sample(d.path());
    patch(&p, 1536 + 4, &0x00ff_0000u32.to_be_bytes());
    assert!(expect_corrupt(&p, "bat past eof").contains("past the end"));
}

#[test]
fn absurd_header_values_are_rejected_without_huge_allocation() {
    let d = tempfile::tempdir().unwrap();
    let p = sample(d.path());
    rewrite_header(&p, |h| h.max_bat_size = u32::MAX);
    assert!(expect_corrupt(&p, "max_bat").contains("BAT"));
    std::fs::remove_file(&p).unwrap();
    let p = sample(d.path());
    rewrite_header(&p, |h| h.block_size = 3 << 20);
    assert!(expect_corrupt(&p, "block size").contains("block size"));
    std::fs::remove_file(&p).unwrap();
    let p = sample(d.path());
    rewrite_header(&p, |h| h.table_offset = u64::MAX - 10);
    expect_corrupt(&p, "table offset");
    std::fs::remove_file(&p).unwrap();
    let p = sample(d.path());
    rewrite_footers(&p, |f| f.curr_size = 1 << 50);
    assert!(expect_corrupt(&p, "huge size").contains("too small"));
    std::fs::remove_file(&p).unwrap();
    let p = sample(d.path());
    rewrite_footers(&p, |f| f.data_offset = u64::MAX - 100);
    expect_corrupt(&p, "data offset");
}

#[test]
fn fixed_disk_larger_than_file_is_rejected() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("f.vhd");
    create_fixed(&p, 1 << 20);
    let b = std::fs::read(&p).unwrap();
    let mut fb = [0u8; 512];
    fb.copy_from_slice(&b[b.len() - 512..]);
    let mut f = Footer::decode(&fb);
    f.curr_size = 4 << 20;
    patch(&p, b.len() - 512, &f.encode());
    expect_corrupt(&p, "fixed too large");
}

#[test]
fn parent_chain_loop_and_depth_are_detected() {
    let d = tempfile::tempdir().unwrap();
    let x = d.path().join("x.vhd");
    create(&x, &CreateOptions::dynamic(1 << 20)).unwrap();
    let b = d.path().join("b.vhd");
    let c = d.path().join("c.vhd");
    let exact = SnapshotOptions {
        link_exact: true,
        ..Default::default()
    };
    snapshot(&b, &x, &exact).unwrap();
    snapshot(&c, &b, &exact).unwrap();
    std::fs::remove_file(&x).unwrap();
    std::os::unix::fs::symlink(&c, &x).unwrap();
    let e = open_vhd_chain(&c, &OpenOptions::default()).unwrap_err();
    assert!(e.to_string().contains("loop"), "{e}");
    // Depth limit.
    std::fs::remove_file(&x).unwrap();
    std::fs::remove_file(&b).unwrap();
    std::fs::remove_file(&c).unwrap();
    create(&x, &CreateOptions::dynamic(1 << 20)).unwrap();
    let mut prev = x.clone();
    for i in 0..5 {
        let n = d.path().join(format!("l{i}.vhd"));
        snapshot(&n, &prev, &exact).unwrap();
        prev = n;
    }
    let e = open_vhd_chain(
        &prev,
        &OpenOptions {
            max_depth: 4,
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(e.to_string().contains("deeper"), "{e}");
    assert!(open_vhd_chain(&prev, &OpenOptions::default()).is_ok());
    // Missing parent.
    std::fs::remove_file(&x).unwrap();
    let e = open_vhd_chain(&prev, &OpenOptions::default()).unwrap_err();
    assert!(e.to_string().contains("l0.vhd: parent ./x.vhd"), "{e}");
    assert_eq!(e.errno(), libc::ENOENT);
}

fn sample_bytes() -> Vec<u8> {
    static BYTES: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    BYTES
        .get_or_init(|| {
            let d = tempfile::tempdir().unwrap();
            std::fs::read(sample(d.path())).unwrap()
        })
        .clone()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]
    /// Random corruption of metadata bytes: open either fails cleanly or yields an image
    /// whose every read and block-status call returns without panicking.
    #[test]
    fn random_metadata_corruption_never_panics(
        flips in proptest::collection::vec((0usize..4096, any::<u8>()), 1..6),
        tail in proptest::collection::vec((0usize..512, any::<u8>()), 0..3),
        fix_checksums in any::<bool>(),
    ) {
        let mut b = sample_bytes();
        let n = b.len();
        for (o, v) in &flips { b[*o] = *v; }
        for (o, v) in &tail { b[n - 512 + *o] = *v; }
        if fix_checksums {
            // Make the damage pass the checksums so deeper validation is exercised.
            let mut hb = [0u8; 1024];
            hb.copy_from_slice(&b[512..1536]);
            let mut h = DynHeader::decode(&hb);
            b[512..1536].copy_from_slice(&h.encode());
            let mut fb = [0u8; 512];
            fb.copy_from_slice(&b[n - 512..]);
            let mut f = Footer::decode(&fb);
            let e = f.encode();
            b[n - 512..].copy_from_slice(&e);
            b[0..512].copy_from_slice(&e);
        }
        let f = Arc::new(MemFile::from_bytes(b.clone()));
        if let Ok(img) = VhdImage::open_file(Path::new("fuzz.vhd"), f.clone(), &VhdOpenOptions::default()) {
            let size = img.info().size_sectors.min(1 << 16);
            let mut buf = vec![0u8; 64 * 512];
            let mut s = 0;
            while s + 64 <= size {
                let _ = img.read(s, &mut buf);
                s += 4096;
            }
            let _ = img.block_status(0, size);
        }
        prop_assert_eq!(f.contents(), b);
    }
}

#[test]
fn oversized_bat_is_refused_before_allocation() {
    // A 2 GiB-range sparse file whose header claims 2^30 BAT entries.
    let d = tempfile::tempdir().unwrap();
    let p = sample(d.path());
    rewrite_header(&p, |h| {
        h.max_bat_size = 1 << 30;
        h.block_size = 512;
    });
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(5u64 << 30).unwrap();
    drop(f);
    let e = open_vhd_chain(&p, &OpenOptions::default()).unwrap_err();
    assert!(matches!(e, ImageError::Unsupported { .. }), "{e}");
    let _ = len;
    // And create refuses to make one.
    let q = d.path().join("q.vhd");
    let e = create(
        &q,
        &CreateOptions {
            size: 1 << 40,
            fixed: false,
            block_size: 512,
            max_size: None,
        },
    )
    .unwrap_err();
    assert!(matches!(e, ImageError::Invalid(_)), "{e}");
    assert!(!q.exists());
}
