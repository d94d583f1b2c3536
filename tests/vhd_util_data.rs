//! vhd-util data commands end to end: create -> snapshot -> write (through the library)
//! -> coalesce -> compare, on plain and encrypted chains, raw parents, fill, copy, and
//! qemu-img as the independent reader of what we write.

mod common;
use common::data::pattern;
use common::image::{read_all, read_range, write};
use common::vhd_util::*;

use std::path::{Path, PathBuf};

use blktap3::image::chain::{open_vhd_chain, OpenOptions};
use blktap3::image::Image;

const MIB: usize = 1 << 20;

/// qemu-img's view of a dynamic VHD as raw bytes.
fn qemu_raw(vhd: &str, dir: &Path) -> Option<Vec<u8>> {
    if !have("qemu-img") {
        return None;
    }
    let out = dir.join("qemu-out.raw");
    let _ = std::fs::remove_file(&out);
    let (st, msg) = peer(
        "qemu-img",
        &[
            "convert",
            "-f",
            "vpc",
            "-O",
            "raw",
            vhd,
            &out.to_string_lossy(),
        ],
    );
    assert_eq!(st, 0, "qemu-img convert: {msg}");
    Some(std::fs::read(&out).unwrap())
}

fn qemu_virtual_size(vhd: &str) -> Option<u64> {
    if !have("qemu-img") {
        return None;
    }
    let (st, out) = peer("qemu-img", &["info", "-f", "vpc", vhd]);
    assert_eq!(st, 0, "{out}");
    // "virtual size: 10 MiB (10485760 bytes)"
    let line = out.lines().find(|l| l.starts_with("virtual size:"))?;
    let i = line.find('(')? + 1;
    let j = line.find(" bytes)")?;
    line[i..j].parse().ok()
}

#[test]
fn coalesce_plain_chain_and_compare() {
    let d = tmpdir();
    let base = p(d.path(), "base.vhd");
    let leaf = p(d.path(), "leaf.vhd");
    ok(&["create", "-n", &base, "-s", "8"]);
    let a = pattern(3 * MIB, 1);
    write(&base, None, 0, &a);
    ok(&["snapshot", "-n", &leaf, "-p", &base]);
    // Leaf writes: a partial run inside block 0, a run crossing blocks 1/2, a lone
    // sector in block 3.
    let b1 = pattern(8 * 512, 7);
    let b2 = pattern(64 * 512, 9);
    let b3 = pattern(512, 11);
    write(&leaf, None, 100, &b1);
    write(&leaf, None, 4096 - 32, &b2);
    write(&leaf, None, 3 * 4096 + 5, &b3);
    let mut expect = vec![0u8; 8 * MIB];
    expect[..a.len()].copy_from_slice(&a);
    for (s, buf) in [(100usize, &b1), (4096 - 32, &b2), (3 * 4096 + 5, &b3)] {
        expect[s * 512..s * 512 + buf.len()].copy_from_slice(buf);
    }
    assert_eq!(read_all(&leaf, None), expect, "leaf view before coalesce");
    // Blocks 0 (two runs), 1 and 3.
    assert_eq!(ok(&["query", "-n", &leaf, "-a"]), "3\n");

    // Exactly the sectors the leaf holds are copied; no newline after the message.
    assert_eq!(ok(&["coalesce", "-n", &leaf]), "Coalesced 73 sectors");
    assert_eq!(read_all(&base, None), expect, "base after coalesce");
    assert_eq!(ok(&["check", "-n", &base]), format!("{base} is valid\n"));
    assert_eq!(
        ok(&["check", "-n", &leaf, "-p"]),
        format!("{leaf} is valid\n{base} is valid\n")
    );
    if let Some(q) = qemu_raw(&base, d.path()) {
        assert_eq!(q, expect, "qemu-img reads the coalesced base");
    }
    assert_eq!(qemu_virtual_size(&base).unwrap_or(8 << 20), 8 << 20);

    // blktap's -p progress on stdout, then the message.
    let o = ok(&["coalesce", "-n", &leaf, "-p"]);
    assert!(o.starts_with("\r  0.00%"), "{o:?}");
    assert!(o.ends_with("\r100.00%\nCoalesced 73 sectors"), "{o:?}");

    // Not a differencing disk.
    expect_stdout(
        &["coalesce", "-n", &base],
        22,
        "coalescing of non-differencing disks is not supported\nerror coalescing: -22\n",
    );
    let o = run(&["coalesce"]);
    assert_eq!(o.status, 22);
    assert_eq!(o.stdout, COALESCE_USAGE);
}

#[test]
fn coalesce_into_raw_parent() {
    let d = tmpdir();
    let raw = p(d.path(), "disk.img");
    let a = pattern(4 * MIB, 3);
    std::fs::write(&raw, &a).unwrap();
    let leaf = p(d.path(), "leaf.vhd");
    ok(&["snapshot", "-n", &leaf, "-p", &raw, "-m"]);
    let b = pattern(1024, 5);
    write(&leaf, None, 4000, &b);
    assert_eq!(ok(&["coalesce", "-n", &leaf]), "Coalesced 2 sectors");
    let mut expect = a.clone();
    expect[4000 * 512..4000 * 512 + 1024].copy_from_slice(&b);
    assert_eq!(std::fs::read(&raw).unwrap(), expect);
}

fn keyfile_for(dir: &Path, vhd_base: &str, bytes: usize, seed: u8) -> PathBuf {
    let bits = bytes * 8;
    let f = dir.join(format!("{vhd_base},aes-xts-plain,{bits}.key"));
    std::fs::write(&f, pattern(bytes, seed)).unwrap();
    f
}

#[test]
fn coalesce_encrypted_chain_same_and_different_keys() {
    let d = tmpdir();
    let keys = d.path().join("keys");
    std::fs::create_dir(&keys).unwrap();
    let kd = keys.to_string_lossy().into_owned();
    let base = p(d.path(), "base.vhd");
    let leaf = p(d.path(), "leaf.vhd");
    ok(&["create", "-n", &base, "-s", "4"]);
    let bk = keyfile_for(&keys, "base", 64, 1);
    ok(&["key", "-s", "-n", &base, "-k", &bk.to_string_lossy()]);
    let a = pattern(MIB, 21);
    write(&base, Some(&keys), 0, &a);
    // Ciphertext on disk: the plaintext pattern is not in the file.
    let raw = std::fs::read(&base).unwrap();
    assert!(!raw.windows(64).any(|w| w == &a[512..576]));

    // OpenXT 8: the snapshot has no keyhash and uses the base's key.
    ok(&["snapshot", "-n", &leaf, "-p", &base]);
    assert_eq!(ok(&["key", "-p", "-n", &leaf]), "none\n");
    let b = pattern(4096, 33);
    write(&leaf, Some(&keys), 10, &b);

    // Without keys nothing is written and the error is ENOKEY.
    let before = std::fs::read(&base).unwrap();
    let o = run(&["coalesce", "-n", &leaf]);
    assert_eq!(o.status, 126, "{} {}", o.stdout, o.stderr);
    assert!(
        o.stdout.ends_with("error coalescing: -126\n"),
        "{}",
        o.stdout
    );
    assert_eq!(std::fs::read(&base).unwrap(), before);

    let env = [("TAPDISK3_CRYPTO_KEYDIR", kd.as_str())];
    let o = run_env(&["coalesce", "-n", &leaf], &env);
    assert_eq!(o.status, 0, "{} {}", o.stdout, o.stderr);
    assert_eq!(o.stdout, "Coalesced 8 sectors");
    let mut expect = vec![0u8; 4 * MIB];
    expect[..a.len()].copy_from_slice(&a);
    expect[10 * 512..10 * 512 + b.len()].copy_from_slice(&b);
    assert_eq!(read_all(&base, Some(&keys)), expect);

    // A second snapshot with its own key (xenmgr's temporary snapshots): data written
    // with the leaf key, coalesced into the base under the base key.
    let leaf2 = p(d.path(), "snap_x.vhd");
    ok(&["snapshot", "-n", &leaf2, "-p", &base]);
    let lk = keyfile_for(&keys, "snap_x", 32, 9);
    ok(&["key", "-s", "-n", &leaf2, "-k", &lk.to_string_lossy()]);
    let c = pattern(2048, 77);
    write(&leaf2, Some(&keys), 2048, &c);
    let o = run_env(&["coalesce", "-n", &leaf2], &env);
    assert_eq!(o.status, 0, "{} {}", o.stdout, o.stderr);
    assert_eq!(o.stdout, "Coalesced 4 sectors");
    expect[2048 * 512..2048 * 512 + c.len()].copy_from_slice(&c);
    assert_eq!(read_all(&base, Some(&keys)), expect);
    assert_eq!(ok(&["check", "-n", &base]), format!("{base} is valid\n"));

    // read -r prints the stored (encrypted) bytes, as blktap; -D decrypts through the
    // image layer.
    let o = run_env(&["read", "-n", &base, "-r", "10", "-c", "8", "-D"], &env);
    assert_eq!(o.status, 0);
    assert_eq!(o.raw, b);
    let o = run(&["read", "-n", &base, "-r", "10", "-c", "8"]);
    assert_eq!(o.status, 0, "{}", o.stderr);
    assert_eq!(o.raw.len(), b.len());
    assert_ne!(o.raw, b);
}

#[test]
fn fill_allocates_everything_and_keeps_content() {
    let d = tmpdir();
    let base = p(d.path(), "base.vhd");
    let leaf = p(d.path(), "leaf.vhd");
    ok(&["create", "-n", &base, "-s", "6"]);
    let a = pattern(MIB, 2);
    write(&base, None, 4096, &a);
    ok(&["snapshot", "-n", &leaf, "-p", &base]);
    let before = read_all(&leaf, None);
    assert_eq!(ok(&["fill", "-n", &leaf]), "");
    assert_eq!(ok(&["query", "-n", &leaf, "-a"]), "3\n");
    assert_eq!(read_all(&leaf, None), before);
    assert_eq!(ok(&["check", "-n", &leaf]), format!("{leaf} is valid\n"));

    // -b: BAT and bitmaps only.
    let e = p(d.path(), "empty.vhd");
    ok(&["create", "-n", &e, "-s", "6"]);
    assert_eq!(
        ok(&["fill", "-n", &e, "-b", "-f", "4096", "-t", "8191"]),
        ""
    );
    assert_eq!(ok(&["query", "-n", &e, "-a"]), "1\n");
    assert_eq!(ok(&["fill", "-n", &e, "-b"]), "");
    assert_eq!(ok(&["query", "-n", &e, "-a"]), "3\n");
    assert_eq!(ok(&["check", "-n", &e, "-b"]), format!("{e} is valid\n"));
    assert_eq!(read_all(&e, None), vec![0u8; 6 * MIB]);
    if let Some(q) = qemu_raw(&e, d.path()) {
        assert_eq!(q, vec![0u8; 6 * MIB]);
    }
    expect_stdout_start(
        &["fill", "-n", &e, "-f", "10"],
        22,
        "-f/-t can only be used with -b\n",
    );
}

#[test]
fn copy_flattens_and_optionally_encrypts() {
    let d = tmpdir();
    let base = p(d.path(), "base.vhd");
    let leaf = p(d.path(), "leaf.vhd");
    ok(&["create", "-n", &base, "-s", "4"]);
    write(&base, None, 0, &pattern(MIB, 4));
    ok(&["snapshot", "-n", &leaf, "-p", &base]);
    write(&leaf, None, 3000, &pattern(4096, 6));
    let want = read_all(&leaf, None);

    let plain = p(d.path(), "copy.vhd");
    assert_eq!(ok(&["copy", "-n", &leaf, "-N", &plain]), "");
    assert_eq!(
        ok(&["query", "-n", &plain, "-p"]),
        format!("{plain} has no parent\n")
    );
    assert_eq!(read_all(&plain, None), want);
    if let Some(q) = qemu_raw(&plain, d.path()) {
        assert_eq!(q, want);
    }

    let keys = d.path().join("keys");
    std::fs::create_dir(&keys).unwrap();
    let kf = keyfile_for(&keys, "enc", 64, 8);
    let enc = p(d.path(), "enc.vhd");
    ok(&["copy", "-n", &leaf, "-N", &enc, "-k", &kf.to_string_lossy()]);
    assert_ne!(ok(&["key", "-p", "-n", &enc]), "none\n");
    ok(&["key", "-c", "-n", &enc, "-k", &kf.to_string_lossy()]);
    assert_eq!(read_all(&enc, Some(&keys)), want);

    expect_stdout(
        &["copy", "-n", &leaf, "-N", &enc],
        22,
        &format!("VHD file {enc} already exists, chose a different name\n"),
    );
}

#[test]
fn qemu_reads_created_snapshotted_and_resized_disks() {
    if !have("qemu-img") {
        return;
    }
    let d = tmpdir();
    let base = p(d.path(), "base.vhd");
    ok(&["create", "-n", &base, "-s", "10", "-S", "64"]);
    assert_eq!(qemu_virtual_size(&base), Some(10 << 20));
    assert_eq!(qemu_raw(&base, d.path()).unwrap(), vec![0u8; 10 * MIB]);
    ok(&["resize", "-n", &base, "-s", "40", "-f"]);
    assert_eq!(qemu_virtual_size(&base), Some(40 << 20));
    write(&base, None, 70_000, &pattern(4096, 1));
    let q = qemu_raw(&base, d.path()).unwrap();
    assert_eq!(&q[70_000 * 512..70_000 * 512 + 4096], &pattern(4096, 1)[..]);
    let leaf = p(d.path(), "leaf.vhd");
    ok(&["snapshot", "-n", &leaf, "-p", &base]);
    // qemu opens our differencing disk's metadata (it does not follow VHD parents).
    assert_eq!(qemu_virtual_size(&leaf), Some(40 << 20));
    let fixed = p(d.path(), "fixed.vhd");
    ok(&["create", "-n", &fixed, "-s", "6", "-r"]);
    assert_eq!(qemu_virtual_size(&fixed), Some(6 << 20));
}

#[test]
fn progress_only_on_a_terminal() {
    let d = tmpdir();
    let base = p(d.path(), "base.vhd");
    let leaf = p(d.path(), "leaf.vhd");
    ok(&["create", "-n", &base, "-s", "8"]);
    ok(&["snapshot", "-n", &leaf, "-p", &base]);
    // Not a terminal: silent, stdout exactly blktap's.
    let o = run(&["fill", "-n", &leaf]);
    assert_eq!(o.status, 0);
    assert_eq!(o.stdout, "");
    assert_eq!(o.stderr, "");
    let o = run(&["coalesce", "-n", &leaf]);
    assert_eq!(
        (o.stdout.as_str(), o.stderr.as_str()),
        ("Coalesced 16384 sectors", "")
    );
    // Under a pseudo-terminal (util-linux script), qemu-img style redraws on stderr.
    if !have("script") {
        return;
    }
    let cmd = format!("'{}' coalesce -n '{leaf}'", bin());
    let (st, out) = peer("script", &["-qec", &cmd, "/dev/null"]);
    assert_eq!(st, 0, "{out}");
    assert!(out.contains("    (0.00/100%)\r"), "{out:?}");
    assert!(out.contains("    (50.00/100%)\r"), "{out:?}");
    assert!(out.contains("    (100.00/100%)"), "{out:?}");
    assert!(out.ends_with("Coalesced 16384 sectors"), "{out:?}");
}

#[test]
fn modify_zero_discards_all_data() {
    let d = tmpdir();
    let f = p(d.path(), "z.vhd");
    ok(&["create", "-n", &f, "-s", "6"]);
    write(&f, None, 0, &pattern(3 * MIB, 1));
    assert_eq!(ok(&["query", "-n", &f, "-a"]), "2\n");
    assert_eq!(ok(&["modify", "-n", &f, "-z"]), "");
    assert_eq!(ok(&["query", "-n", &f, "-a"]), "0\n");
    // Truncated right after the metadata, as freshly created.
    assert_eq!(std::fs::metadata(&f).unwrap().len(), 3584);
    assert_eq!(read_all(&f, None), vec![0u8; 6 * MIB]);
    assert_eq!(ok(&["check", "-n", &f]), format!("{f} is valid\n"));
    assert_eq!(ok(&["read", "-n", &f, "-b", "0", "-c", "3"]),
        "block: 0: offset: not allocated\nblock: 1: offset: not allocated\nblock: 2: offset: not allocated\n");
}

#[test]
fn large_disks_and_fast_resize_past_8_gib() {
    let d = tmpdir();
    // The largest size libvhd creates: 2040 GiB.
    let big = p(d.path(), "big.vhd");
    ok(&["create", "-n", &big, "-s", "2088960"]);
    assert_eq!(ok(&["query", "-n", &big, "-v", "-S"]), "2088960\n2088960\n");
    assert_eq!(ok(&["check", "-n", &big]), format!("{big} is valid\n"));
    assert_eq!(
        qemu_virtual_size(&big).unwrap_or(2088960 << 20),
        2088960 << 20
    );
    // Growing past 8 GiB changes what the batmap checksum covers.
    let f = p(d.path(), "grow.vhd");
    ok(&["create", "-n", &f, "-s", "10", "-S", "20480"]);
    write(&f, None, 0, &pattern(MIB, 5));
    ok(&["resize", "-n", &f, "-s", "16384", "-f"]);
    assert_eq!(ok(&["query", "-n", &f, "-v"]), "16384\n");
    assert_eq!(ok(&["check", "-n", &f]), format!("{f} is valid\n"));
    let opts = OpenOptions::default();
    let img = open_vhd_chain(Path::new(&f), &opts).unwrap();
    assert_eq!(img.info().size_sectors, 16384 * 2048);
    let mut buf = vec![0u8; MIB];
    img.read(0, &mut buf).unwrap();
    assert_eq!(buf, pattern(MIB, 5));
}

#[test]
fn read_dumps_of_allocated_data() {
    let d = tmpdir();
    let f = p(d.path(), "r.vhd");
    ok(&["create", "-n", &f, "-s", "8"]);
    let b1 = pattern(8 * 512, 3);
    write(&f, None, 100, &b1);
    write(&f, None, 2 * 4096, &pattern(512, 4));
    let file = std::fs::read(&f).unwrap();
    let e0 = u64::from(be32(&file, 1536));
    let e2 = u64::from(be32(&file, 1536 + 8));
    assert_ne!(e0, 0xFFFF_FFFF);
    assert_eq!((e0 + 1) % 8, 0, "data 4 KiB aligned");
    assert_eq!(
        ok(&["read", "-n", &f, "-b", "0", "-c", "3"]),
        format!(
            "block: 0: offset: {}\nblock: 1: offset: not allocated\nblock: 2: offset: {}\n",
            e0 * 512,
            e2 * 512
        )
    );
    assert_eq!(
        ok(&["read", "-n", &f, "-b", "0", "-x"]),
        format!("block: 0: offset: {:#x}\n", e0 * 512)
    );
    assert_eq!(
        ok(&["read", "-n", &f, "-t", "100"]),
        format!(
            "logical sector 100: block number: 0, sector offset: 100, file offset: {}\n",
            (e0 + 101) * 512
        )
    );
    assert_eq!(
        ok(&["read", "-n", &f, "-i", "99", "-c", "3"]),
        "block 0: sec: 99: 0\nblock 0: sec: 100: 1\nblock 0: sec: 101: 1\n"
    );
    assert_eq!(
        ok(&["read", "-n", &f, "-e", "0", "-c", "16384"]),
        "100 8\n8192 1\n"
    );
    let o = run(&["read", "-n", &f, "-m", "0", "-c", "2"]);
    assert_eq!(o.status, 0);
    assert_eq!(o.raw.len(), 512 + "block 1 not allocated\n".len());
    assert_eq!(&o.raw[12..14], &[0x0f, 0xf0]);
    assert!(o.raw[..12].iter().all(|&b| b == 0));
    assert!(o.raw[14..512].iter().all(|&b| b == 0));
    assert_eq!(&o.raw[512..], b"block 1 not allocated\n");
    let o = run(&["read", "-n", &f, "-d", "0"]);
    assert_eq!(o.raw.len(), 2 * MIB);
    assert_eq!(&o.raw[100 * 512..108 * 512], &b1[..]);
    let o = run(&["read", "-n", &f, "-B"]);
    assert_eq!(o.raw, vec![0b1010_0000]);
    let o = run(&["read", "-n", &f, "-R", "51250", "-c", "10"]);
    assert_eq!(o.raw, &b1[50..60]);
    // blktap (OpenXT) prints the batmap test on stdout.
    let o = run(&["read", "-n", &f, "-j", "0", "-c", "2"]);
    assert_eq!(o.stdout, "batmap for block 0: 0\nbatmap for block 1: 0\n");
    assert_eq!(o.stderr, "");
}

#[test]
fn snapshot_with_metadata_preallocation() {
    let d = tmpdir();
    let base = p(d.path(), "base.vhd");
    let leaf = p(d.path(), "leaf.vhd");
    ok(&["create", "-n", &base, "-s", "10"]);
    ok(&["snapshot", "-n", &leaf, "-p", &base, "-S", "100"]);
    assert_eq!(ok(&["query", "-n", &leaf, "-v", "-S"]), "10\n100\n");
    ok(&["resize", "-n", &leaf, "-s", "100", "-f"]);
    assert_eq!(ok(&["query", "-n", &leaf, "-v"]), "100\n");
    assert_eq!(ok(&["check", "-n", &leaf]), format!("{leaf} is valid\n"));
}

#[test]
fn coalesce_refuses_data_beyond_the_parent() {
    let d = tmpdir();
    let base = p(d.path(), "base.vhd");
    let leaf = p(d.path(), "leaf.vhd");
    ok(&["create", "-n", &base, "-s", "4"]);
    ok(&["snapshot", "-n", &leaf, "-p", &base, "-S", "16"]);
    ok(&["resize", "-n", &leaf, "-s", "8", "-f"]);
    write(&leaf, None, 10, &pattern(512, 1));
    write(&leaf, None, 12_000, &pattern(512, 2));
    let before = std::fs::read(&base).unwrap();
    let o = run(&["coalesce", "-n", &leaf]);
    assert_eq!(o.status, 22);
    assert_eq!(o.stdout, "error coalescing: -22\n");
    assert!(o.stderr.contains("outside the disk"), "{}", o.stderr);
    assert_eq!(std::fs::read(&base).unwrap(), before, "nothing written");
}

#[test]
fn fill_and_copy_encrypted_images() {
    let d = tmpdir();
    let keys = d.path().join("keys");
    std::fs::create_dir(&keys).unwrap();
    let kd = keys.to_string_lossy().into_owned();
    let env = [("TAPDISK3_CRYPTO_KEYDIR", kd.as_str())];
    let base = p(d.path(), "vm.vhd");
    ok(&["create", "-n", &base, "-s", "4"]);
    let k = keyfile_for(&keys, "vm", 32, 5);
    ok(&["key", "-s", "-n", &base, "-k", &k.to_string_lossy()]);
    let a = pattern(MIB, 8);
    write(&base, Some(&keys), 2048, &a);
    let want = read_all(&base, Some(&keys));

    // Without the key directory: ENOKEY, nothing changed.
    let before = std::fs::read(&base).unwrap();
    let o = run(&["fill", "-n", &base]);
    assert_eq!(o.status, 126, "{} {}", o.stdout, o.stderr);
    assert_eq!(std::fs::read(&base).unwrap(), before);
    // With it: every block allocated, content (decrypted) unchanged.
    let o = run_env(&["fill", "-n", &base], &env);
    assert_eq!(o.status, 0, "{} {}", o.stdout, o.stderr);
    assert_eq!(ok(&["query", "-n", &base, "-a"]), "2\n");
    assert_eq!(read_all(&base, Some(&keys)), want);

    // copy decrypts the source (plain copy) when no key is given for the target.
    let plain = p(d.path(), "plain.vhd");
    let o = run_env(&["copy", "-n", &base, "-N", &plain], &env);
    assert_eq!(o.status, 0, "{} {}", o.stdout, o.stderr);
    assert_eq!(ok(&["key", "-p", "-n", &plain]), "none\n");
    assert_eq!(read_all(&plain, None), want);
    let raw = std::fs::read(&plain).unwrap();
    assert!(
        raw.windows(512).any(|w| w == &a[..512]),
        "plaintext on disk"
    );
}

#[test]
fn check_finds_data_and_batmap_inconsistencies() {
    let d = tmpdir();
    let f = p(d.path(), "c.vhd");
    ok(&["create", "-n", &f, "-s", "6"]);
    write(&f, None, 0, &pattern(512, 1));
    assert_eq!(ok(&["check", "-n", &f, "-b"]), format!("{f} is valid\n"));
    // Clear bit 0 of block 0's bitmap: sector 0 then holds data with its bit clear.
    let mut b = std::fs::read(&f).unwrap();
    let e0 = be32(&b, 1536) as usize;
    b[e0 * 512] &= 0x7f;
    std::fs::write(&f, &b).unwrap();
    assert_eq!(ok(&["check", "-n", &f]), format!("{f} is valid\n"));
    expect_stdout_start(
        &["check", "-n", &f, "-b"],
        22,
        "sector 0x0 of block 0x0 has data where bitmap is clear\n",
    );
    // Batmap marks an unallocated block full (with a correct checksum).
    let g = p(d.path(), "g.vhd");
    ok(&["create", "-n", &g, "-s", "6"]);
    let mut b = std::fs::read(&g).unwrap();
    b[2560] = 0x40; // block 1
    let sum: u32 = b[2560..3072].iter().map(|&x| u32::from(x)).sum();
    b[2048 + 24..2048 + 28].copy_from_slice(&(!sum).to_be_bytes());
    std::fs::write(&g, &b).unwrap();
    expect_stdout_start(
        &["check", "-n", &g],
        22,
        "batmap shows unallocated block 1 full\n",
    );
    // A bad batmap checksum.
    b[2048 + 24] ^= 1;
    std::fs::write(&g, &b).unwrap();
    // blktap's check fails computing the end of the metadata (libvhd validates the
    // batmap there) before it looks at the batmap itself.
    expect_stdout_start(
        &["check", "-n", &g],
        22,
        "error calculating end of metadata: -22\n",
    );
}

fn keyed_vm(d: &Path) -> (String, PathBuf, Vec<u8>) {
    let keys = d.join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    let f = p(d, "vm.vhd");
    ok(&["create", "-n", &f, "-s", "10"]);
    let k = keyfile_for(&keys, "vm", 64, 3);
    ok(&["key", "-s", "-n", &f, "-k", &k.to_string_lossy()]);
    // Something in every block, partial bitmaps.
    for blk in 0..5u64 {
        write(
            &f,
            Some(&keys),
            blk * 4096 + 7,
            &pattern(3 * 4096, blk as u8),
        );
    }
    let want = read_all(&f, Some(&keys));
    (f, keys, want)
}

#[test]
fn journaled_resize_moves_metadata_and_blocks() {
    let d = tmpdir();
    let (f, keys, want) = keyed_vm(d.path());
    let j = p(d.path(), "resize.journal");
    // 512 MiB: 256 BAT entries no longer fit the BAT's sector, everything behind moves.
    assert_eq!(ok(&["resize", "-n", &f, "-s", "512", "-j", &j]), "");
    assert!(!Path::new(&j).exists(), "journal removed");
    assert_eq!(ok(&["query", "-n", &f, "-v", "-S", "-a"]), "512\n5\n512\n");
    assert_eq!(ok(&["check", "-n", &f]), format!("{f} is valid\n"));
    let kh = ok(&["key", "-p", "-n", &f]);
    assert_ne!(kh, "none\n", "keyhash kept");
    assert_eq!(read_range(&f, Some(&keys), 0, 10 * MIB), want);
    assert!(read_range(&f, Some(&keys), 20_480, 4 * MIB)
        .iter()
        .all(|&b| b == 0));
    // The grown disk takes writes past the old end.
    write(&f, Some(&keys), 1_000_000, &pattern(4096, 9));
    assert_eq!(
        read_range(&f, Some(&keys), 1_000_000, 4096),
        pattern(4096, 9)
    );
    assert_eq!(ok(&["check", "-n", &f]), format!("{f} is valid\n"));

    // A differencing disk: its parent locators move too.
    let base = p(d.path(), "base.vhd");
    let leaf = p(d.path(), "leaf.vhd");
    ok(&["create", "-n", &base, "-s", "10"]);
    write(&base, None, 0, &pattern(MIB, 1));
    ok(&["snapshot", "-n", &leaf, "-p", &base]);
    write(&leaf, None, 100, &pattern(8192, 2));
    let before = read_all(&leaf, None);
    ok(&["resize", "-n", &leaf, "-s", "600", "-j", &j]);
    assert_eq!(
        ok(&["query", "-n", &leaf, "-p", "-v"]),
        format!("600\n{base}\n")
    );
    assert_eq!(ok(&["check", "-n", &leaf]), format!("{leaf} is valid\n"));
    assert_eq!(read_range(&leaf, None, 0, 10 * MIB), before);
    assert_eq!(qemu_virtual_size(&base).unwrap_or(10 << 20), 10 << 20);
    let plain = p(d.path(), "plain.vhd");
    ok(&["create", "-n", &plain, "-s", "10"]);
    write(&plain, None, 9, &pattern(MIB, 6));
    let pw = read_all(&plain, None);
    ok(&["resize", "-n", &plain, "-s", "520", "-j", &j]);
    assert_eq!(qemu_virtual_size(&plain).unwrap_or(520 << 20), 520 << 20);
    if let Some(q) = qemu_raw(&plain, d.path()) {
        assert_eq!(&q[..10 * MIB], &pw[..]);
    }

    // Fixed disks grow by moving the footer.
    let fx = p(d.path(), "fixed.vhd");
    ok(&["create", "-n", &fx, "-s", "4", "-r"]);
    let mut raw = std::fs::read(&fx).unwrap();
    raw[..MIB].copy_from_slice(&pattern(MIB, 4));
    std::fs::write(&fx, &raw).unwrap();
    ok(&["resize", "-n", &fx, "-s", "6", "-j", &j]);
    assert_eq!(ok(&["query", "-n", &fx, "-v"]), "6\n");
    let all = read_all(&fx, None);
    assert_eq!(&all[..MIB], &pattern(MIB, 4)[..]);
    assert!(all[MIB..].iter().all(|&b| b == 0));
    assert_eq!(qemu_virtual_size(&fx).unwrap_or(6 << 20), 6 << 20);

    // An existing journal is never reused.
    std::fs::write(&j, b"someone else's").unwrap();
    expect_stdout(
        &["resize", "-n", &f, "-s", "600", "-j", &j],
        17,
        "creating journal failed: -17\n",
    );
    assert_eq!(std::fs::read(&j).unwrap(), b"someone else's");
    std::fs::remove_file(&j).unwrap();

    // Shrinking is refused like blktap.
    expect_stdout(
        &["resize", "-n", &f, "-s", "256", "-j", &j],
        38,
        "dynamic shrink not fully implemented\nresize failed: -38\n",
    );
}

#[test]
fn interrupted_journaled_resize_reverts_exactly() {
    for point in ["BEGIN", "DATA_MOVED", "METADATA_MOVED", "END"] {
        let d = tmpdir();
        let (f, keys, want) = keyed_vm(d.path());
        let original = std::fs::read(&f).unwrap();
        let j = p(d.path(), "j");
        let var = format!("VHD_UTIL_TEST_FAIL_RESIZE_{point}");
        let o = run_env(&["resize", "-n", &f, "-s", "512", "-j", &j], &[(&var, "1")]);
        assert_eq!(o.status, 22, "{point}");
        assert_eq!(o.stdout, format!("Failing at {var}\n"));
        assert!(Path::new(&j).exists(), "{point}: journal left");
        assert_eq!(ok(&["revert", "-n", &f, "-j", &j]), "");
        assert!(!Path::new(&j).exists());
        assert_eq!(
            std::fs::read(&f).unwrap(),
            original,
            "{point}: bytes restored"
        );
        assert_eq!(read_all(&f, Some(&keys)), want);
    }
    let d = tmpdir();
    let f = p(d.path(), "x.vhd");
    ok(&["create", "-n", &f, "-s", "4"]);
    let bogus = p(d.path(), "bogus");
    std::fs::write(&bogus, b"garbage").unwrap();
    expect_stdout(
        &["revert", "-n", &f, "-j", &bogus],
        22,
        "reverting journal failed: -22\n",
    );
    expect_stdout(
        &["revert", "-n", &f],
        22,
        "options: <-n name> <-j journal> [-h help]\n",
    );
}
