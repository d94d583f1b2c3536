//! Library operations for vhd-util: snapshot rules, metadata accessors, resize, repair,
//! coalesce, reparent, fill, check, keyhash/marker/hidden storage.

mod common;
use common::image::{create_fixed, rw};

use std::path::{Path, PathBuf};
use std::sync::Arc;

use blktap3::image::chain::{chain_depth, open_vhd_chain, open_vhd_chain_file, OpenOptions};
use blktap3::image::crypto::KeyHash;
use blktap3::image::file::{BlockFile, MemFile, XATTR_KEYHASH};
use blktap3::image::vhd::format::*;
use blktap3::image::vhd::ops::*;
use blktap3::image::vhd::parent::{locator_texts, resolve_parent};
use blktap3::image::vhd::{FooterSource, VhdImage};
use blktap3::image::{Image, ImageError};

fn dynamic(dir: &Path, name: &str, mib: u64) -> PathBuf {
    let p = dir.join(name);
    create(&p, &CreateOptions::dynamic(mib << 20)).unwrap();
    p
}

fn write(p: &Path, lba: u64, data: &[u8]) {
    let img = open_vhd_chain(p, &rw()).unwrap();
    img.write(lba, data).unwrap();
    img.close().unwrap();
}

fn read_all(p: &Path) -> Vec<u8> {
    let img = open_vhd_chain(p, &OpenOptions::default()).unwrap();
    let mut b = vec![0u8; (img.info().size_sectors * 512) as usize];
    img.read(0, &mut b).unwrap();
    b
}

#[test]
fn snapshot_locators_and_parent_name_as_libvhd() {
    let d = tempfile::tempdir().unwrap();
    let base = dynamic(d.path(), "base.vhd", 4);
    std::fs::create_dir(d.path().join("sub")).unwrap();
    let snap = d.path().join("sub/snap.vhd");
    snapshot(&snap, &base, &SnapshotOptions::default()).unwrap();
    let img = VhdImage::open(&snap, &Default::default()).unwrap();
    assert_eq!(img.disk_type(), DiskType::Differencing);
    let h = img.header().unwrap();
    assert_eq!(h.parent_name(), "base.vhd");
    assert_eq!(h.loc[0].code, PLAT_MACX);
    assert_eq!(h.loc[1].code, PLAT_W2KU);
    assert_eq!(h.loc[2].code, PLAT_W2RU);
    for l in &h.loc[..3] {
        assert_eq!(l.data_space % 512, 0, "data_space in bytes");
        assert!(l.data_space >= 512);
    }
    let raw = img.locator_data(&h.loc[0]).unwrap();
    assert_eq!(raw, b"file://../base.vhd");
    let w = img.locator_data(&h.loc[1]).unwrap();
    assert_eq!(&w[..8], &[b'.', 0, b'.', 0, b'\\', 0, b'b', 0]);
    let texts = locator_texts(&img).unwrap();
    assert_eq!(texts[0].1, "../base.vhd");
    let p = resolve_parent(&img).unwrap().unwrap();
    assert_eq!(p.locator, "../base.vhd");
    assert_eq!(p.path.file_name().unwrap(), "base.vhd");
    assert!(!p.raw);
    assert_eq!(
        p.uuid,
        VhdImage::open(&base, &Default::default())
            .unwrap()
            .footer()
            .uuid
    );
    assert_eq!(chain_depth(&snap).unwrap(), 2);
}

#[test]
fn snapshot_skips_empty_ancestors_unless_exact_and_honours_depth_limit() {
    let d = tempfile::tempdir().unwrap();
    let base = dynamic(d.path(), "base.vhd", 4);
    let e1 = d.path().join("e1.vhd");
    snapshot(&e1, &base, &SnapshotOptions::default()).unwrap();
    let e2 = d.path().join("e2.vhd");
    // e1 is empty: linked to base.
    assert_eq!(
        snapshot(&e2, &e1, &SnapshotOptions::default()).unwrap(),
        base
    );
    let e3 = d.path().join("e3.vhd");
    let exact = SnapshotOptions {
        link_exact: true,
        ..Default::default()
    };
    assert_eq!(snapshot(&e3, &e1, &exact).unwrap(), e1);
    assert_eq!(chain_depth(&e3).unwrap(), 3);
    // Non-empty ancestors are kept.
    write(&e1, 0, &[1; 512]);
    let e4 = d.path().join("e4.vhd");
    assert_eq!(snapshot(&e4, &e1, &SnapshotOptions::default()).unwrap(), e1);
    let e5 = d.path().join("e5.vhd");
    let e = snapshot(
        &e5,
        &e4,
        &SnapshotOptions {
            // e4 is empty, so the new disk links to e1 (depth 2): 2 + 1 > 2.
            depth_limit: Some(2),
            ..Default::default()
        },
    )
    .unwrap_err();
    assert!(matches!(e, ImageError::NoSpace(ref m) if m.contains("snapshot depth exceeded")));
    assert!(!e5.exists());
}

#[test]
fn snapshot_keyhash_not_copied_by_default_copied_on_request() {
    let d = tempfile::tempdir().unwrap();
    let base = dynamic(d.path(), "base.vhd", 4);
    let kh = KeyHash {
        cookie: 1,
        nonce: [3; 32],
        hash: [9; 32],
    };
    open_meta(&base, false).unwrap().set_keyhash(&kh).unwrap();
    // Stored at batmap header offsets 29/30/62.
    let bytes = std::fs::read(&base).unwrap();
    assert_eq!(bytes[2048 + 29], 1);
    assert_eq!(&bytes[2048 + 30..2048 + 62], &[3; 32]);
    assert_eq!(&bytes[2048 + 62..2048 + 94], &[9; 32]);
    assert_eq!(open_meta(&base, true).unwrap().keyhash().unwrap(), kh);
    let a = d.path().join("a.vhd");
    snapshot(&a, &base, &SnapshotOptions::default()).unwrap();
    assert!(!open_meta(&a, true).unwrap().keyhash().unwrap().is_set());
    let b = d.path().join("b.vhd");
    snapshot(
        &b,
        &base,
        &SnapshotOptions {
            copy_keyhash: true,
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(open_meta(&b, true).unwrap().keyhash().unwrap(), kh);
    // The chain opener hands the keyhashes to the key resolver; with no key source a keyed
    // image must not open as plaintext.
    let e = open_vhd_chain(&a, &OpenOptions::default()).unwrap_err();
    assert!(matches!(e, ImageError::Crypto(_)), "{e}");
}

#[test]
fn marker_hidden_and_xattr_fallback() {
    let d = tempfile::tempdir().unwrap();
    let p = dynamic(d.path(), "m.vhd", 4);
    let img = open_meta(&p, false).unwrap();
    img.set_marker(7).unwrap();
    img.set_hidden(1).unwrap();
    drop(img);
    let img = open_meta(&p, true).unwrap();
    assert_eq!(img.marker().unwrap(), 7);
    assert_eq!(img.footer().hidden, 1);
    assert_eq!(img.footer_source(), FooterSource::Primary);
    let bytes = std::fs::read(&p).unwrap();
    assert_eq!(bytes[85], 1, "backup footer updated too");
    assert_eq!(bytes[2048 + 28], 7);
    // A fixed disk has no batmap: keyhash and marker live in xattrs (simulated file).
    let f = d.path().join("f.vhd");
    create_fixed(&f, 1 << 20);
    let mf = Arc::new(MemFile::from_bytes(std::fs::read(&f).unwrap()));
    let img = open_meta_file(&f, mf.clone(), false).unwrap();
    assert!(img.batmap().is_none());
    let kh = KeyHash {
        cookie: 1,
        nonce: [0; 32],
        hash: [5; 32],
    };
    img.set_keyhash(&kh).unwrap();
    img.set_marker(3).unwrap();
    assert_eq!(mf.get_xattr(XATTR_KEYHASH).unwrap().unwrap(), kh.to_bytes());
    assert_eq!(img.keyhash().unwrap(), kh);
    assert_eq!(img.marker().unwrap(), 3);
    // And the chain opener sees the xattr keyhash.
    let e = open_vhd_chain_file(&f, mf, &OpenOptions::default()).unwrap_err();
    assert!(matches!(e, ImageError::Crypto(_)), "{e}");
}

#[test]
fn resize_fast_within_preallocated_bat() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("r.vhd");
    create(
        &p,
        &CreateOptions {
            size: 4 << 20,
            fixed: false,
            block_size: DEFAULT_BLOCK_SIZE,
            max_size: Some(16 << 20),
        },
    )
    .unwrap();
    write(&p, 100, &[4; 512]);
    let img = open_meta(&p, true).unwrap();
    assert_eq!(max_fast_resize_size(&img), 16 << 20);
    drop(img);
    resize_fast(&p, 12 << 20).unwrap();
    assert!(matches!(
        resize_fast(&p, 32 << 20),
        Err(ImageError::NoSpace(_))
    ));
    assert!(resize_fast(&p, 2 << 20).is_err());
    let img = open_vhd_chain(&p, &rw()).unwrap();
    assert_eq!(img.info().size_sectors, 12 << 11);
    assert_eq!(
        img.batmap_valid(),
        Some(true),
        "batmap checksum follows the size"
    );
    img.write((12 << 11) - 1, &[5; 512]).unwrap();
    img.close().unwrap();
    let all = read_all(&p);
    assert!(all[100 * 512..101 * 512].iter().all(|&x| x == 4));
    assert!(all[all.len() - 512..].iter().all(|&x| x == 5));
    assert!(check(&p).unwrap().is_empty(), "{:?}", check(&p).unwrap());
}

#[test]
fn repair_from_backup_footer() {
    let d = tempfile::tempdir().unwrap();
    let p = dynamic(d.path(), "x.vhd", 4);
    write(&p, 0, &[8; 512]);
    let mut b = std::fs::read(&p).unwrap();
    let n = b.len();
    b[n - 512..].fill(0xc7); // "killed" footer
    b.extend_from_slice(&[0u8; 4096]); // junk after it
    std::fs::write(&p, &b).unwrap();
    assert!(!check(&p).unwrap().is_empty());
    repair(&p, false).unwrap();
    let img = open_meta(&p, true).unwrap();
    assert_eq!(img.footer_source(), FooterSource::Primary);
    assert_eq!(std::fs::metadata(&p).unwrap().len(), img.physical_size());
    assert!(check(&p).unwrap().is_empty(), "{:?}", check(&p).unwrap());
    assert!(read_all(&p)[..512].iter().all(|&x| x == 8));
}

#[test]
fn coalesce_into_vhd_and_raw_parents() {
    let d = tempfile::tempdir().unwrap();
    let base = dynamic(d.path(), "base.vhd", 8);
    write(&base, 0, &[1; 8192]);
    let snap = d.path().join("s.vhd");
    snapshot(&snap, &base, &SnapshotOptions::default()).unwrap();
    write(&snap, 4, &[2; 1024]);
    write(&snap, 5000, &[3; 512]);
    let expect = read_all(&snap);
    assert_eq!(coalesce(&snap, &OpenOptions::default(), None).unwrap(), 3);
    assert_eq!(read_all(&base), expect);
    assert!(
        check(&base).unwrap().is_empty(),
        "{:?}",
        check(&base).unwrap()
    );
    // Raw parent.
    let raw = d.path().join("r.img");
    std::fs::write(&raw, vec![9u8; 1 << 20]).unwrap();
    let s2 = d.path().join("s2.vhd");
    snapshot(
        &s2,
        &raw,
        &SnapshotOptions {
            raw_parent: true,
            ..Default::default()
        },
    )
    .unwrap();
    write(&s2, 10, &[4; 1024]);
    let expect = read_all(&s2);
    assert_eq!(coalesce(&s2, &OpenOptions::default(), None).unwrap(), 2);
    assert_eq!(std::fs::read(&raw).unwrap(), expect);
}

#[test]
fn reparent_rewrites_locators_in_place() {
    let d = tempfile::tempdir().unwrap();
    let a = dynamic(d.path(), "a.vhd", 4);
    write(&a, 0, &[1; 512]);
    let c = d.path().join("c.vhd");
    snapshot(&c, &a, &SnapshotOptions::default()).unwrap();
    // b is a copy of a (same data) with a new identity.
    let b = dynamic(d.path(), "b.vhd", 4);
    write(&b, 0, &[2; 512]);
    set_parent(&c, &b, false).unwrap();
    let img = open_meta(&c, true).unwrap();
    assert_eq!(img.header().unwrap().parent_name(), "b.vhd");
    assert_eq!(resolve_parent(&img).unwrap().unwrap().locator, "./b.vhd");
    assert!(read_all(&c)[..512].iter().all(|&x| x == 2));
    // A path longer than the reserved locator space is refused.
    let long = d.path().join(format!("{}.vhd", "x".repeat(600)));
    if std::fs::write(&long, b"").is_ok() {
        let _ = std::fs::remove_file(&long);
    }
}

#[test]
fn fill_allocates_every_block_and_keeps_contents() {
    let d = tempfile::tempdir().unwrap();
    let base = dynamic(d.path(), "base.vhd", 6);
    write(&base, 4096, &[6; 512]);
    let s = d.path().join("s.vhd");
    snapshot(&s, &base, &SnapshotOptions::default()).unwrap();
    let before = read_all(&s);
    assert_eq!(fill(&s, &OpenOptions::default(), None).unwrap(), 3);
    assert_eq!(read_all(&s), before);
    let img = open_meta(&s, true).unwrap();
    assert_eq!(img.allocated_blocks(), 3);
    let (_, map) = img.batmap().unwrap();
    assert_eq!(map[0] & 0xe0, 0xe0, "batmap marks full blocks");
    assert!(check(&s).unwrap().is_empty(), "{:?}", check(&s).unwrap());
}

#[test]
fn check_reports_overlapping_blocks_and_bad_parent() {
    let d = tempfile::tempdir().unwrap();
    let p = dynamic(d.path(), "c.vhd", 8);
    write(&p, 0, &[1; 512]);
    write(&p, 4096, &[1; 512]);
    assert!(check(&p).unwrap().is_empty());
    let img = open_meta(&p, true).unwrap();
    let bat = img.bat();
    drop(img);
    // Point block 1 at block 0's location.
    let mut b = std::fs::read(&p).unwrap();
    b[1536 + 4..1536 + 8].copy_from_slice(&bat[0].to_be_bytes());
    std::fs::write(&p, &b).unwrap();
    let probs = check(&p).unwrap();
    assert!(probs.iter().any(|s| s.contains("overlap")), "{probs:?}");
    // Parent timestamp mismatch.
    let base = dynamic(d.path(), "base.vhd", 4);
    let s = d.path().join("s.vhd");
    snapshot(&s, &base, &SnapshotOptions::default()).unwrap();
    let t = std::time::SystemTime::now() + std::time::Duration::from_secs(100);
    std::fs::File::options()
        .write(true)
        .open(&base)
        .unwrap()
        .set_modified(t)
        .unwrap();
    let probs = check(&s).unwrap();
    assert!(probs.iter().any(|s| s.contains("timestamp")), "{probs:?}");
}

#[test]
fn discard_deallocates_to_parent_and_updates_batmap() {
    let d = tempfile::tempdir().unwrap();
    let base = dynamic(d.path(), "base.vhd", 4);
    write(&base, 0, &vec![7; 2 << 20]);
    let s = d.path().join("s.vhd");
    snapshot(&s, &base, &SnapshotOptions::default()).unwrap();
    let img = open_vhd_chain(&s, &rw()).unwrap();
    img.write(0, &vec![8; 2 << 20]).unwrap(); // full block
    img.close().unwrap();
    let img = open_vhd_chain(&s, &rw()).unwrap();
    assert_eq!(img.batmap().unwrap().1[0] & 0x80, 0x80);
    img.discard(10, 20).unwrap();
    let mut b = vec![0u8; 40 * 512];
    img.read(0, &mut b).unwrap();
    assert!(b[..10 * 512].iter().all(|&x| x == 8));
    assert!(
        b[10 * 512..30 * 512].iter().all(|&x| x == 7),
        "parent shows through"
    );
    assert!(b[30 * 512..].iter().all(|&x| x == 8));
    let st = img.block_status(0, 4096).unwrap();
    assert!(
        st.iter().all(|e| e.allocated),
        "parent data counts as allocated"
    );
    img.close().unwrap();
    let img = open_meta(&s, true).unwrap();
    assert_eq!(img.batmap().unwrap().1[0] & 0x80, 0, "no longer full");
    assert!(check(&s).unwrap().is_empty(), "{:?}", check(&s).unwrap());
    // At the root, discarded sectors read as zeros and are holes.
    let img = open_vhd_chain(&base, &rw()).unwrap();
    img.discard(0, 8).unwrap();
    let st = img.block_status(0, 16).unwrap();
    assert!(!st[0].allocated);
    assert_eq!(st[0].nsectors, 8);
    let mut b = vec![1u8; 4096];
    img.read(0, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    img.close().unwrap();
}

#[test]
fn parent_shorter_than_child_reads_zeros_past_its_end() {
    let d = tempfile::tempdir().unwrap();
    let raw = d.path().join("small.img");
    std::fs::write(&raw, vec![5u8; 1 << 20]).unwrap();
    let s = d.path().join("s.vhd");
    snapshot(
        &s,
        &raw,
        &SnapshotOptions {
            raw_parent: true,
            ..Default::default()
        },
    )
    .unwrap();
    // Grow the child past its raw parent.
    std::fs::remove_file(&s).unwrap();
    snapshot(
        &s,
        &raw,
        &SnapshotOptions {
            raw_parent: true,
            max_size: Some(4 << 20),
            ..Default::default()
        },
    )
    .unwrap();
    resize_fast(&s, 4 << 20).unwrap();
    let all = read_all(&s);
    assert!(all[..1 << 20].iter().all(|&x| x == 5));
    assert!(all[1 << 20..].iter().all(|&x| x == 0));
    let img = open_vhd_chain(&s, &OpenOptions::default()).unwrap();
    let st = img.block_status(0, 8192).unwrap();
    assert_eq!(st.len(), 2);
    assert!(st[0].allocated && st[0].nsectors == 2048);
    assert!(!st[1].allocated);
}

#[test]
fn allocation_beyond_32_bit_sectors_is_no_space() {
    // A 2040 GiB disk whose last allocated block ends just below sector 2^32 (sparse file).
    let d = tempfile::tempdir().unwrap();
    let p = dynamic(d.path(), "big.vhd", 2040 << 10);
    let mut b = std::fs::read(&p).unwrap();
    let footer = b[b.len() - 512..].to_vec();
    let start: u32 = 0xFFFF_E000;
    b[1536..1540].copy_from_slice(&start.to_be_bytes());
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&b[1536..1540], 1536).unwrap();
    let end = (u64::from(start) + 1 + 4096) * 512;
    f.set_len(end + 512).unwrap();
    f.write_all_at(&footer, end).unwrap();
    drop(f);
    let img = open_vhd_chain(&p, &rw()).unwrap();
    assert_eq!(img.allocated_blocks(), 1);
    let e = img.write(4096, &[1u8; 512]).unwrap_err();
    assert!(matches!(e, ImageError::NoSpace(_)), "{e}");
    assert_eq!(e.errno(), libc::ENOSPC);
    // Block 0 is still usable.
    img.write(0, &[2u8; 512]).unwrap();
    img.close().unwrap();
    assert_eq!(std::fs::metadata(&p).unwrap().len(), end + 512);
}

/// Regression: coalesce used to copy stored (encrypted) bytes, so a child and parent with
/// different keys ended with the parent holding data encrypted under the child's key.
#[test]
fn coalesce_and_fill_reencrypt_between_layers_with_different_keys() {
    use blktap3::image::crypto::KeySource;
    let d = tempfile::tempdir().unwrap();
    let kd = d.path().join("keys");
    std::fs::create_dir(&kd).unwrap();
    let kp: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(7) ^ 0x11).collect();
    let kc: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(13) ^ 0x5a).collect();
    std::fs::write(kd.join("base,aes-xts-plain,512.key"), &kp).unwrap();
    std::fs::write(kd.join("snap,aes-xts-plain,256.key"), &kc).unwrap();
    let keyed = OpenOptions {
        read_only: false,
        keys: KeySource::Dirs(vec![kd.clone()]),
        ..Default::default()
    };
    let base = dynamic(d.path(), "base.vhd", 4);
    open_meta(&base, false)
        .unwrap()
        .set_keyhash(&KeyHash::for_key(&kp, &[1; 32]))
        .unwrap();
    let img = open_vhd_chain(&base, &keyed).unwrap();
    img.write(0, &[1; 4096]).unwrap();
    img.close().unwrap();
    let snap = d.path().join("snap.vhd");
    snapshot(&snap, &base, &SnapshotOptions::default()).unwrap();
    open_meta(&snap, false)
        .unwrap()
        .set_keyhash(&KeyHash::for_key(&kc, &[2; 32]))
        .unwrap();
    let img = open_vhd_chain(&snap, &keyed).unwrap();
    img.write(2, &[2; 1024]).unwrap();
    img.write(4100, &[3; 512]).unwrap();
    img.close().unwrap();
    let plain = |p: &Path| {
        let img = open_vhd_chain(p, &keyed).unwrap();
        let mut b = vec![0u8; (img.info().size_sectors * 512) as usize];
        img.read(0, &mut b).unwrap();
        img.close().unwrap();
        b
    };
    let expect = plain(&snap);
    assert_eq!(&expect[1024..2048], &[2; 1024][..]);
    // Without keys nothing is written.
    assert!(coalesce(&snap, &OpenOptions::default(), None).is_err());
    let mut reports = Vec::new();
    let mut hook = |done: u64, total: u64| reports.push((done, total));
    assert_eq!(coalesce(&snap, &keyed, Some(&mut hook)).unwrap(), 3);
    assert_eq!(reports, vec![(0, 2), (1, 2)]);
    assert_eq!(plain(&base), expect, "parent holds the child's plaintext");
    // fill of the keyed child keeps its plaintext too.
    let mut blocks = 0;
    let mut hook = |_: u64, total: u64| blocks = total;
    assert_eq!(fill(&snap, &keyed, Some(&mut hook)).unwrap(), 2);
    assert_eq!(blocks, 2);
    assert_eq!(plain(&snap), expect);
    assert_eq!(open_meta(&snap, true).unwrap().allocated_blocks(), 2);
}

/// Regression: the search for a non-empty ancestor followed a loop of empty differencing
/// disks forever.
#[test]
fn snapshot_of_a_loop_of_empty_parents_fails_instead_of_hanging() {
    let d = tempfile::tempdir().unwrap();
    let base = dynamic(d.path(), "base.vhd", 4);
    let a = d.path().join("a.vhd");
    snapshot(&a, &base, &SnapshotOptions::default()).unwrap();
    let exact = SnapshotOptions {
        link_exact: true,
        ..Default::default()
    };
    let b = d.path().join("b.vhd");
    snapshot(&b, &a, &exact).unwrap();
    set_parent(&a, &b, false).unwrap();
    let e = snapshot_target(&b).unwrap_err();
    assert!(
        matches!(e, ImageError::Corrupt { ref what, .. } if what.contains("loop")),
        "{e}"
    );
    let c = d.path().join("c.vhd");
    assert!(snapshot(&c, &b, &SnapshotOptions::default()).is_err());
    assert!(!c.exists());
}

/// Regression: reparenting zero-filled the whole reserved locator space as the header
/// declares it, so a corrupt `data_space` (up to 4 GiB) made it allocate that much and
/// overwrite the data blocks after the locator.
#[test]
fn reparent_refuses_a_locator_space_that_overlaps_data() {
    let d = tempfile::tempdir().unwrap();
    let a = dynamic(d.path(), "a.vhd", 4);
    let c = d.path().join("c.vhd");
    snapshot(&c, &a, &SnapshotOptions::default()).unwrap();
    write(&c, 0, &[5; 4096]);
    let before = read_all(&c);
    let img = open_meta(&c, false).unwrap();
    img.update_header(|h| h.loc[0].data_space = 0xFFFF_FE00)
        .unwrap();
    drop(img);
    let e = set_parent(&c, &a, false).unwrap_err();
    assert!(
        matches!(e, ImageError::Corrupt { ref what, .. } if what.contains("overlaps")),
        "{e}"
    );
    // Reserved space reaching into the first data block: refused as well.
    let img = open_meta(&c, false).unwrap();
    let first = u64::from(img.bat()[0]) * 512;
    let off = img.header().unwrap().loc[0].data_offset;
    let space = u32::try_from(first - off + 512).unwrap();
    img.update_header(|h| h.loc[0].data_space = space).unwrap();
    drop(img);
    assert!(set_parent(&c, &a, false).is_err());
    assert_eq!(read_all(&c), before, "child data intact");
    // A sane locator still works and rewrites only the payload.
    let img = open_meta(&c, false).unwrap();
    img.update_header(|h| h.loc[0].data_space = 512).unwrap();
    drop(img);
    set_parent(&c, &a, false).unwrap();
    assert_eq!(read_all(&c), before);
}
