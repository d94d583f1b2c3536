//! End-to-end behaviour of the VHD engine on real files.

mod common;
use common::data::pattern;
use common::image::{create_fixed, rw};

use std::path::Path;

use blktap3::image::chain::{open_vhd_chain, OpenOptions};
use blktap3::image::vhd::format::{DiskType, BAT_UNUSED};
use blktap3::image::vhd::ops::{create, snapshot, CreateOptions, SnapshotOptions};
use blktap3::image::vhd::{VhdImage, VhdOpenOptions};
use blktap3::image::{Image, ImageError};

#[test]
fn create_dynamic_layout_matches_libvhd() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("a.vhd");
    create(&p, &CreateOptions::dynamic(10 << 20)).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    // footer copy @0, header @512, BAT @1536 (5 entries, one sector), batmap header @2048,
    // map @2560, footer @3072.
    assert_eq!(bytes.len(), 3072 + 512);
    assert_eq!(&bytes[0..8], b"conectix");
    assert_eq!(&bytes[512..520], b"cxsparse");
    assert_eq!(&bytes[1536..1556], &[0xff; 20]);
    assert_eq!(&bytes[2048..2056], b"tdbatmap");
    assert_eq!(&bytes[3072..3080], b"conectix");
    assert_eq!(&bytes[0..512], &bytes[3072..3584]);
    let img = VhdImage::open(&p, &VhdOpenOptions::default()).unwrap();
    assert_eq!(img.disk_type(), DiskType::Dynamic);
    assert_eq!(img.info().size_sectors, 20480);
    assert_eq!(img.allocated_blocks(), 0);
}

#[test]
fn dynamic_write_read_reopen() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("a.vhd");
    create(&p, &CreateOptions::dynamic(8 << 20)).unwrap();
    let img = open_vhd_chain(&p, &rw()).unwrap();
    let data = pattern(8192, 3);
    img.write(4095, &data).unwrap(); // spans blocks 0 and 1
    let mut back = vec![0u8; 8192];
    img.read(4095, &mut back).unwrap();
    assert_eq!(back, data);
    let mut z = vec![1u8; 512];
    img.read(0, &mut z).unwrap();
    assert!(z.iter().all(|&b| b == 0));
    img.close().unwrap();
    let img = open_vhd_chain(&p, &OpenOptions::default()).unwrap();
    let mut back = vec![0u8; 8192];
    img.read(4095, &mut back).unwrap();
    assert_eq!(back, data);
    assert_eq!(img.allocated_blocks(), 2);
    // Data blocks 4 KiB aligned.
    for e in img.bat() {
        if e != BAT_UNUSED {
            assert_eq!((u64::from(e) + 1) % 8, 0);
        }
    }
    assert_eq!(std::fs::metadata(&p).unwrap().len(), img.physical_size());
}

#[test]
fn snapshot_chain_reads_through_and_validates() {
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base.vhd");
    create(&base, &CreateOptions::dynamic(4 << 20)).unwrap();
    let img = open_vhd_chain(&base, &rw()).unwrap();
    img.write(0, &pattern(4096, 1)).unwrap();
    img.write(100, &pattern(512, 2)).unwrap();
    img.close().unwrap();
    let snap = d.path().join("snap.vhd");
    let linked = snapshot(&snap, &base, &SnapshotOptions::default()).unwrap();
    assert_eq!(linked, base);
    let img = open_vhd_chain(&snap, &rw()).unwrap();
    img.write(2, &pattern(512, 9)).unwrap();
    let mut b = vec![0u8; 4096];
    img.read(0, &mut b).unwrap();
    let mut expect = pattern(4096, 1);
    expect[1024..1536].copy_from_slice(&pattern(512, 9));
    assert_eq!(b, expect);
    let st = img.block_status(0, 8192).unwrap();
    assert!(st[0].allocated && st[0].nsectors == 8);
    img.close().unwrap();
    // Wrong parent uuid: replace base with a fresh disk.
    std::fs::remove_file(&base).unwrap();
    create(&base, &CreateOptions::dynamic(4 << 20)).unwrap();
    let e = open_vhd_chain(&snap, &OpenOptions::default()).unwrap_err();
    assert!(matches!(e, ImageError::Corrupt { .. }), "{e}");
}

#[test]
fn raw_parent_snapshot() {
    let d = tempfile::tempdir().unwrap();
    let raw = d.path().join("base.img");
    let data = pattern(1 << 20, 5);
    std::fs::write(&raw, &data).unwrap();
    let snap = d.path().join("s.vhd");
    snapshot(
        &snap,
        &raw,
        &SnapshotOptions {
            raw_parent: true,
            ..Default::default()
        },
    )
    .unwrap();
    let img = open_vhd_chain(&snap, &rw()).unwrap();
    assert_eq!(img.info().size_sectors, 2048);
    img.write(10, &[7u8; 512]).unwrap();
    let mut b = vec![0u8; 1 << 20];
    img.read(0, &mut b).unwrap();
    let mut expect = data.clone();
    expect[5120..5632].fill(7);
    assert_eq!(b, expect);
    img.close().unwrap();
    assert_eq!(std::fs::read(&raw).unwrap(), data, "raw parent untouched");
    let _ = Path::new("");
}

#[test]
fn probe_and_open_entry_point() {
    use blktap3::image::{open, probe, ImageFormat};
    let d = tempfile::tempdir().unwrap();
    let v = d.path().join("a.vhd");
    create(&v, &CreateOptions::dynamic(2 << 20)).unwrap();
    let r = d.path().join("a.img");
    std::fs::write(&r, vec![3u8; 1 << 20]).unwrap();
    assert_eq!(probe(&v).unwrap(), ImageFormat::Vhd);
    assert_eq!(probe(&r).unwrap(), ImageFormat::Raw);
    assert_eq!(ImageFormat::from_driver("aio"), Some(ImageFormat::Raw));
    assert_eq!(ImageFormat::from_driver("vhd"), Some(ImageFormat::Vhd));
    assert_eq!(ImageFormat::from_driver("qcow2"), None);
    let img = open(&v, ImageFormat::Vhd, &rw()).unwrap();
    assert_eq!(img.info().size_sectors, 4096);
    img.write(0, &[1u8; 512]).unwrap();
    img.close().unwrap();
    assert!(matches!(img.write(0, &[1u8; 512]), Err(ImageError::Closed)));
    let img = open(&r, ImageFormat::Raw, &OpenOptions::default()).unwrap();
    assert!(img.info().read_only);
    let mut b = [0u8; 512];
    img.read(2047, &mut b).unwrap();
    assert_eq!(b, [3u8; 512]);
    assert!(matches!(img.write(0, &b), Err(ImageError::ReadOnly)));
    // Opening a raw file as VHD is a clear error.
    assert!(matches!(
        open(&r, ImageFormat::Vhd, &OpenOptions::default()),
        Err(ImageError::Corrupt { .. })
    ));
}

#[test]
fn fixed_vhd_io_and_discard() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("f.vhd");
    create_fixed(&p, 1 << 20);
    assert_eq!(std::fs::metadata(&p).unwrap().len(), (1 << 20) + 512);
    let img = open_vhd_chain(&p, &rw()).unwrap();
    assert_eq!(img.disk_type(), DiskType::Fixed);
    img.write(2047, &[6u8; 512]).unwrap();
    img.write(0, &[5u8; 4096]).unwrap();
    img.discard(0, 8).unwrap();
    let mut b = vec![1u8; 4096];
    img.read(0, &mut b).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    assert!(matches!(
        img.write(2048, &[0u8; 512]),
        Err(ImageError::OutOfRange { .. })
    ));
    img.close().unwrap();
    let bytes = std::fs::read(&p).unwrap();
    assert_eq!(&bytes[(1 << 20) - 512..1 << 20], &[6u8; 512]);
    assert_eq!(&bytes[1 << 20..(1 << 20) + 8], b"conectix");
}
