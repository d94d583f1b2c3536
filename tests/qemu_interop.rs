//! Interoperability with the real peer: qemu-img / qemu-io (format "vpc").
//!
//! These tests fail loudly when qemu-img is missing (the test script installs it).
//! Note: `qemu-img check` does not support the vpc format ("This image format does not
//! support checks", exit 63), so the peer check is `qemu-img info` (full open and header
//! parse) plus `qemu-img compare` against the raw data written.

mod common;
use common::cmd::success;
use common::data::XorShift64;
use common::image::{create_fixed, rw_prealloc};

use std::path::Path;
use std::process::Command;

use blktap3::image::chain::{open_vhd_chain, OpenOptions};
use blktap3::image::vhd::ops::{create, CreateOptions};
use blktap3::image::Image;

fn run(cmd: &str, args: &[&str]) -> std::process::Output {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| {
        panic!("{cmd} is required for this test (apt-get install qemu-utils): {e}")
    });
    out
}

fn ok(cmd: &str, args: &[&str]) -> String {
    success(format_args!("{cmd} {args:?}"), &run(cmd, args))
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Write a deterministic scatter of data through the engine and into a raw mirror.
fn scatter(img: &dyn Image, raw: &mut [u8]) {
    let size = img.info().size_sectors;
    let mut rng = XorShift64(0x9e3779b97f4a7c15);
    for i in 0..40u64 {
        let x = rng.next();
        let n = 1 + (x % 64);
        let sec = (x >> 20) % (size - n);
        let buf: Vec<u8> = (0..n * 512)
            .map(|j| (j as u8) ^ (i as u8).wrapping_mul(7) ^ 0x5a)
            .collect();
        img.write(sec, &buf).unwrap();
        raw[(sec * 512) as usize..((sec + n) * 512) as usize].copy_from_slice(&buf);
    }
}

fn check_against_qemu(vhd: &Path, raw: &[u8], dir: &Path) {
    let rawp = dir.join("expect.raw");
    std::fs::write(&rawp, raw).unwrap();
    let info = ok("qemu-img", &["info", "-f", "vpc", "--output=json", s(vhd)]);
    assert!(
        info.contains(&format!("\"virtual-size\": {}", raw.len())),
        "qemu sees a different size: {info}"
    );
    ok(
        "qemu-img",
        &["compare", "-f", "vpc", "-F", "raw", s(vhd), s(&rawp)],
    );
    // And a negative control: one flipped byte must be detected.
    let mut bad = raw.to_vec();
    bad[raw.len() / 2] ^= 0xff;
    std::fs::write(&rawp, &bad).unwrap();
    let out = run(
        "qemu-img",
        &["compare", "-f", "vpc", "-F", "raw", s(vhd), s(&rawp)],
    );
    assert_eq!(
        out.status.code(),
        Some(1),
        "compare must see the difference"
    );
}

/// Writes scattered data into our image at `p` (of `size` bytes) and checks qemu reads the
/// same.
fn scatter_and_check(p: &Path, size: u64, dir: &Path) {
    let img = open_vhd_chain(p, &rw_prealloc(3)).unwrap();
    let mut raw = vec![0u8; size as usize];
    scatter(&img, &mut raw);
    img.close().unwrap();
    check_against_qemu(p, &raw, dir);
}

#[test]
fn our_dynamic_vhd_reads_back_in_qemu() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("d.vhd");
    let size = 37u64 << 20; // not a multiple of the block size
    create(&p, &CreateOptions::dynamic(size)).unwrap();
    scatter_and_check(&p, size, d.path());
}

#[test]
fn our_small_block_and_presized_vhd_reads_back_in_qemu() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("d.vhd");
    let size = 9u64 << 20;
    create(
        &p,
        &CreateOptions {
            size,
            fixed: false,
            block_size: 64 << 10,
            max_size: Some(64 << 20),
        },
    )
    .unwrap();
    scatter_and_check(&p, size, d.path());
}

#[test]
fn our_fixed_vhd_reads_back_in_qemu() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("f.vhd");
    let size = 6u64 << 20;
    create_fixed(&p, size);
    scatter_and_check(&p, size, d.path());
}

fn qemu_made(d: &Path, name: &str, fixed: bool) -> std::path::PathBuf {
    let p = d.join(name);
    let mut args = vec!["create", "-f", "vpc"];
    if fixed {
        args.extend(["-o", "subformat=fixed"]);
    }
    args.extend([s(&p), "10M"]);
    ok("qemu-img", &args);
    ok(
        "qemu-io",
        &["-f", "vpc", "-c", "write -P 0xab 1M 64k", s(&p)],
    );
    p
}

fn assert_qemu_pattern(p: &Path) {
    let img = open_vhd_chain(p, &OpenOptions::default()).unwrap();
    let n = img.info().size_sectors;
    assert!(n >= 20480, "qemu rounds the size up to CHS geometry: {n}");
    let mut b = vec![0u8; (n * 512) as usize];
    img.read(0, &mut b).unwrap();
    let (a, c) = (1usize << 20, (1usize << 20) + (64 << 10));
    assert!(b[..a].iter().all(|&x| x == 0));
    assert!(b[a..c].iter().all(|&x| x == 0xab));
    assert!(b[c..].iter().all(|&x| x == 0));
    img.close().unwrap();
}

#[test]
fn qemu_dynamic_vhd_reads_in_our_engine() {
    let d = tempfile::tempdir().unwrap();
    let p = qemu_made(d.path(), "q.vhd", false);
    assert_qemu_pattern(&p);
}

#[test]
fn qemu_fixed_vhd_reads_in_our_engine() {
    let d = tempfile::tempdir().unwrap();
    let p = qemu_made(d.path(), "qf.vhd", true);
    assert_qemu_pattern(&p);
}

#[test]
fn our_writes_into_qemu_vhd_read_back_in_qemu() {
    let d = tempfile::tempdir().unwrap();
    let p = qemu_made(d.path(), "q.vhd", false);
    let img = open_vhd_chain(&p, &rw_prealloc(3)).unwrap();
    let n = img.info().size_sectors;
    let mut raw = vec![0u8; (n * 512) as usize];
    img.read(0, &mut raw).unwrap();
    scatter(&img, &mut raw);
    img.close().unwrap();
    check_against_qemu(&p, &raw, d.path());
}
