//! Opening, writing and reading images through the library's VHD chain.

use std::path::Path;

use blktap3::image::chain::{open_vhd_chain, OpenOptions};
use blktap3::image::crypto::KeySource;
use blktap3::image::vhd::ops::{create, CreateOptions};
use blktap3::image::Image;

/// Read-write, everything else default.
pub fn rw() -> OpenOptions {
    OpenOptions {
        read_only: false,
        ..Default::default()
    }
}

/// Read-write, reserving `blocks` blocks per extension of the leaf.
pub fn rw_prealloc(blocks: u32) -> OpenOptions {
    OpenOptions {
        prealloc_blocks: blocks,
        ..rw()
    }
}

/// Keys from `dir`, or none.
pub fn keys(dir: Option<&Path>) -> KeySource {
    dir.map_or(KeySource::None, |d| KeySource::Dirs(vec![d.to_path_buf()]))
}

/// Writes `data` at `sector` of the chain whose leaf is `path`, then closes it.
pub fn write(path: &str, keydir: Option<&Path>, sector: u64, data: &[u8]) {
    let opts = OpenOptions {
        keys: keys(keydir),
        ..rw()
    };
    let img = open_vhd_chain(Path::new(path), &opts).expect("open chain");
    img.write(sector, data).unwrap();
    img.close().unwrap();
}

/// `len` bytes from `sector` of the chain whose leaf is `path`, opened read-only.
pub fn read_range(path: &str, keydir: Option<&Path>, sector: u64, len: usize) -> Vec<u8> {
    let opts = OpenOptions {
        keys: keys(keydir),
        ..Default::default()
    };
    let img = open_vhd_chain(Path::new(path), &opts).expect("open chain");
    let mut buf = vec![0u8; len];
    img.read(sector, &mut buf).unwrap();
    img.close().unwrap();
    buf
}

/// The whole virtual disk of the chain whose leaf is `path`, opened read-only.
pub fn read_all(path: &str, keydir: Option<&Path>) -> Vec<u8> {
    let opts = OpenOptions {
        keys: keys(keydir),
        ..Default::default()
    };
    let img = open_vhd_chain(Path::new(path), &opts).expect("open chain");
    let mut buf = vec![0u8; (img.info().size_sectors * 512) as usize];
    img.read(0, &mut buf).unwrap();
    img.close().unwrap();
    buf
}

/// Creates a fixed VHD of `size` bytes at `p`.
pub fn create_fixed(p: &Path, size: u64) {
    create(
        p,
        &CreateOptions {
            size,
            fixed: true,
            block_size: 0,
            max_size: None,
        },
    )
    .unwrap();
}

/// A sparse raw file `dir/name` of `len` bytes; returns its tapdisk params, `aio:<path>`.
pub fn aio_raw(dir: &Path, name: &str, len: u64) -> String {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().set_len(len).unwrap();
    format!("aio:{}", p.display())
}
