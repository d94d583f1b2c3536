//! Opening a VHD from hostile bytes (footer, backup footer, dynamic header, BAT, batmap, parent
//! locators, keyhash), then using it.
//!
//! The input is the whole image file (MemFile, in memory). Invariants:
//! - open never panics, and whatever opens reads, reports block status, bitmaps, locators
//!   and its keyhash without panicking (errors are fine: the metadata is hostile);
//! - the header/footer/batmap structs round-trip through encode/decode;
//! - an image opened writable that accepts a write reads that data back, and so does a fresh
//!   open of the file after close (the metadata written for the allocation is consistent).
#![no_main]

use std::path::Path;
use std::sync::Arc;

use blktap3::image::file::{BlockFile, MemFile};
use blktap3::image::vhd::format::{decode_bat, decode_locator, encode_bat};
use blktap3::image::vhd::{VhdImage, VhdOpenOptions};
use blktap3::image::Image;
use libfuzzer_sys::fuzz_target;

/// Cap on what one execution reads (sectors), to keep executions fast on absurd geometries.
const READ_CAP: u64 = 1 << 12;

fn exercise(img: &VhdImage) {
    let size = img.info().size_sectors;
    let mut buf = vec![0u8; 8 * 512];
    let mut s = 0;
    let mut n = 0;
    while s + 8 <= size && n < 16 {
        let _ = img.read(s, &mut buf);
        s += (size / 16).max(8);
        n += 1;
    }
    if let Ok(ext) = img.block_status(0, size.min(READ_CAP * 64)) {
        let mut at = 0u64;
        for e in &ext {
            // Extents are contiguous and non-empty.
            assert_eq!(e.sector, at, "{ext:?}");
            assert!(e.nsectors > 0, "{ext:?}");
            at += e.nsectors;
        }
    }
    let _ = img.footer().validate();
    let mut f = img.footer();
    let enc = f.encode();
    assert_eq!(blktap3::image::vhd::Footer::decode(&enc).encode(), enc);
    if let Some(mut h) = img.header() {
        let enc = h.encode();
        assert_eq!(blktap3::image::vhd::DynHeader::decode(&enc).encode(), enc);
        let _ = h.parent_name();
        for loc in h.loc.iter().filter(|l| l.code != 0) {
            if let Ok(d) = img.locator_data(loc) {
                let _ = decode_locator(loc.code, &d);
            }
        }
    }
    let bat = img.bat();
    assert_eq!(decode_bat(&encode_bat(&bat)), bat);
    for (i, _) in bat
        .iter()
        .enumerate()
        .filter(|(_, e)| **e != u32::MAX)
        .take(8)
    {
        let _ = img.block_bitmap(i as u32);
    }
    let _ = img.batmap();
    let _ = img.batmap_valid();
    let _ = img.keyhash().map(|k| k.print_form());
    let _ = img.marker();
}

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz.vhd");
    for backup in [false, true] {
        let opts = VhdOpenOptions {
            use_backup_footer: backup,
            ..VhdOpenOptions::default()
        };
        let f = Arc::new(MemFile::from_bytes(data.to_vec()));
        if let Ok(img) = VhdImage::open_file(path, f, &opts) {
            exercise(&img);
        }
    }

    // Writable: a write that succeeds reads back, also after close and reopen.
    let f = Arc::new(MemFile::from_bytes(data.to_vec()));
    let wopts = VhdOpenOptions {
        read_only: false,
        ..VhdOpenOptions::default()
    };
    if let Ok(img) = VhdImage::open_file(path, f.clone(), &wopts) {
        let size = img.info().size_sectors;
        if size > 0 {
            let sector = u64::from(data.len() as u32) % size.min(1 << 20);
            let pattern: Vec<u8> = (0..512u32).map(|i| (i as u8) ^ 0xa5).collect();
            if img.write(sector, &pattern).is_ok() && img.flush().is_ok() {
                let mut back = vec![0u8; 512];
                img.read(sector, &mut back)
                    .expect("read after a successful write");
                assert_eq!(back, pattern, "sector {sector} after write");
                if img.close().is_ok() {
                    let bytes = f.contents();
                    let f2 = Arc::new(MemFile::from_bytes(bytes));
                    let img2 = VhdImage::open_file(path, f2, &VhdOpenOptions::default())
                        .expect("an image we wrote and closed reopens");
                    let mut back = vec![0u8; 512];
                    img2.read(sector, &mut back).expect("read after reopen");
                    assert_eq!(back, pattern, "sector {sector} after reopen");
                }
            }
        }
    }
    let _ = f.len();
});
