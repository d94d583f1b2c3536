//! vhd-util end to end: every command's happy path, output format and error paths, run
//! against the built binary on temp files. Expected strings come from blktap's
//! `vhd/vhd-util.c` and `vhd/lib/vhd-util-*.c` printf formats and libvhd's layout rules
//! (blktap-c-reference.md §7), not from our own output.

mod common;
use common::vhd_util::*;

const COMMANDS_LINE: &str = "COMMAND := { create | snapshot | query | read | set | repair | resize | fill | coalesce | modify | scan | check | revert | key }\n";

#[test]
fn top_level_usage_and_invalid_command() {
    expect_stdout(
        &[],
        0,
        &format!("usage: vhd-util COMMAND [OPTIONS]\n{COMMANDS_LINE}"),
    );
    let o = run(&["frobnicate"]);
    assert_eq!(o.status, 0);
    assert_eq!(o.stderr, "invalid COMMAND frobnicate\n");
    assert!(o.stdout.ends_with(COMMANDS_LINE));
}

#[test]
fn every_command_has_help() {
    for cmd in [
        "create", "snapshot", "query", "read", "set", "repair", "resize", "fill", "coalesce",
        "modify", "scan", "check", "revert", "key", "copy",
    ] {
        let o = run(&[cmd, "--help"]);
        assert_eq!(o.status, 0, "{cmd} --help");
        let text = format!("{}{}", o.stdout, o.stderr);
        assert!(
            !text.contains("invalid COMMAND") && !text.contains("COMMAND :="),
            "{cmd} is not a command: {text:?}"
        );
        assert!(
            text.contains("options") || text.contains("usage"),
            "{cmd} --help printed {text:?}"
        );
    }
}

#[test]
fn create_usage_errors() {
    let d = tmpdir();
    let f = p(d.path(), "a.vhd");
    // Missing -n, missing -s: usage on stdout, EINVAL.
    let o = run(&["create", "-s", "10"]);
    assert_eq!(o.status, 22);
    assert!(o
        .stdout
        .starts_with("options: <-n name> <-s size (MB)> [-r reserve]"));
    let o = run(&["create", "-n", &f]);
    assert_eq!(o.status, 22);
    assert!(!path(d.path(), "a.vhd").exists());
    // Unknown option: glibc's getopt message, then usage.
    expect_stderr(
        &["create", "-n", &f, "-s", "10", "-q"],
        22,
        "create: invalid option -- 'q'\n",
    );
    // -S smaller than -s.
    expect_stdout(
        &["create", "-n", &f, "-s", "10", "-S", "4"],
        22,
        "Error: <-S size> must be greater than <-s size>\n",
    );
    // A size that is not a number is refused (blktap would silently use 0).
    let o = run(&["create", "-n", &f, "-s", "10M"]);
    assert_eq!(o.status, 22);
    assert!(!path(d.path(), "a.vhd").exists());
    // Too big for the VHD format (2040 GiB).
    let o = run(&["create", "-n", &f, "-s", "4194304"]);
    assert_ne!(o.status, 0);
    assert!(!path(d.path(), "a.vhd").exists());
}

#[test]
fn create_dynamic_and_query_every_field() {
    let d = tmpdir();
    let f = p(d.path(), "a.vhd");
    assert_eq!(ok(&["create", "-n", &f, "-s", "10"]), "");
    // Layout: footer copy, header @512, BAT @1536 (5 entries, padded), batmap header
    // @2048, map @2560 (1 sector), footer @3072.
    let bytes = std::fs::read(&f).unwrap();
    assert_eq!(bytes.len(), 3584);
    assert_eq!(&bytes[0..8], b"conectix");
    assert_eq!(&bytes[3072..3080], b"conectix");
    assert_eq!(&bytes[512..520], b"cxsparse");
    assert_eq!(&bytes[2048..2056], b"tdbatmap");
    assert_eq!(be32(&bytes, 3072 + 60), 3, "dynamic");
    assert_eq!(be64(&bytes, 3072 + 48), 10 << 20);

    assert_eq!(ok(&["query", "-n", &f, "-v"]), "10\n");
    assert_eq!(ok(&["query", "-n", &f, "-s"]), "3584\n");
    assert_eq!(
        ok(&["query", "-n", &f, "-p"]),
        format!("{f} has no parent\n")
    );
    assert_eq!(ok(&["query", "-n", &f, "-f"]), "hidden: 0\n");
    assert_eq!(ok(&["query", "-n", &f, "-m"]), "marker: 0\n");
    assert_eq!(ok(&["query", "-n", &f, "-d"]), "chain depth: 1\n");
    assert_eq!(ok(&["query", "-n", &f, "-a"]), "0\n");
    assert_eq!(ok(&["query", "-n", &f, "-S"]), "10\n");
    // Several at once: fixed order v, s, p, f, m, d, a, S regardless of argument order.
    assert_eq!(
        ok(&["query", "-n", &f, "-S", "-a", "-d", "-m", "-f", "-s", "-v"]),
        "10\n3584\nhidden: 0\nmarker: 0\nchain depth: 1\n0\n10\n"
    );
}

#[test]
fn create_with_metadata_preallocation_and_fixed() {
    let d = tmpdir();
    let f = p(d.path(), "pre.vhd");
    ok(&["create", "-n", &f, "-s", "10", "-S", "100"]);
    assert_eq!(ok(&["query", "-n", &f, "-v", "-S"]), "10\n100\n");
    let bytes = std::fs::read(&f).unwrap();
    assert_eq!(be32(&bytes, 512 + 28), 50, "max_bat_size covers 100 MiB");

    let r = p(d.path(), "fixed.vhd");
    ok(&["create", "-n", &r, "-s", "4", "-r"]);
    let len = std::fs::metadata(&r).unwrap().len();
    assert_eq!(len, (4 << 20) + 512);
    assert_eq!(ok(&["query", "-n", &r, "-v"]), "4\n");
    assert_eq!(ok(&["query", "-n", &r, "-s"]), format!("{len}\n"));
    let bytes = std::fs::read(&r).unwrap();
    assert_eq!(be32(&bytes, (4 << 20) + 60), 2, "fixed");
}

#[test]
fn query_errors() {
    let d = tmpdir();
    let missing = p(d.path(), "missing.vhd");
    expect_stdout(
        &["query", "-n", &missing, "-v"],
        2,
        &format!("error opening {missing}: -2\n"),
    );
    // Not a VHD at all.
    let junk = p(d.path(), "junk.vhd");
    std::fs::write(&junk, vec![0x5au8; 8192]).unwrap();
    expect_stdout(
        &["query", "-n", &junk, "-v"],
        22,
        &format!("error opening {junk}: -22\n"),
    );
    // No -n.
    let o = run(&["query", "-v"]);
    assert_eq!(o.status, 22);
    assert!(o
        .stdout
        .starts_with("options: <-n name> [-v print virtual size (in MB)]"));
    // -h is not an error for query.
    assert_eq!(run(&["query", "-h"]).status, 0);
}

#[test]
fn set_hidden_and_marker() {
    let d = tmpdir();
    let f = p(d.path(), "a.vhd");
    ok(&["create", "-n", &f, "-s", "10"]);
    assert_eq!(ok(&["set", "-n", &f, "-f", "hidden", "-v", "1"]), "");
    assert_eq!(ok(&["query", "-n", &f, "-f"]), "hidden: 1\n");
    // Both footer copies carry it.
    let bytes = std::fs::read(&f).unwrap();
    assert_eq!(bytes[85], 1);
    assert_eq!(bytes[bytes.len() - 512 + 85], 1);
    ok(&["set", "-n", &f, "-f", "marker", "-v", "1"]);
    assert_eq!(ok(&["query", "-n", &f, "-m"]), "marker: 1\n");
    assert_eq!(
        std::fs::read(&f).unwrap()[2048 + 28],
        1,
        "marker in batmap header"
    );
    assert_eq!(ok(&["check", "-n", &f]), format!("{f} is valid\n"));

    expect_stdout(
        &["set", "-n", &f, "-f", "bogus", "-v", "1"],
        22,
        "invalid field bogus\noptions: <-n name> <-f field> <-v value> [-h help]\n",
    );
    expect_stdout_start(
        &["set", "-n", &f, "-f", "hidden", "-v", "300"],
        22,
        "invalid value 300\n",
    );
    let o = run(&["set", "-n", &f, "-f", "hidden"]);
    assert_eq!(o.status, 22);
    let missing = p(d.path(), "nope.vhd");
    expect_stdout(
        &["set", "-n", &missing, "-f", "hidden", "-v", "1"],
        2,
        &format!("error opening {missing}: -2\n"),
    );
}

#[test]
fn snapshot_chain_query_and_depth_limit() {
    let d = tmpdir();
    let base = p(d.path(), "base.vhd");
    let s1 = p(d.path(), "s1.vhd");
    let s2 = p(d.path(), "s2.vhd");
    ok(&["create", "-n", &base, "-s", "10"]);
    assert_eq!(ok(&["snapshot", "-n", &s1, "-p", &base]), "");
    // Differencing disk with three 512-byte locators after the batmap.
    let bytes = std::fs::read(&s1).unwrap();
    assert_eq!(bytes.len(), 5120);
    assert_eq!(be32(&bytes, bytes.len() - 512 + 60), 4);
    assert_eq!(ok(&["query", "-n", &s1, "-p"]), format!("{base}\n"));
    assert_eq!(ok(&["query", "-n", &s1, "-p", "-u"]), "./base.vhd\n");
    assert_eq!(
        ok(&["query", "-n", &s1, "-d", "-v"]),
        "10\nchain depth: 2\n"
    );
    assert_eq!(ok(&["query", "-n", &s1, "-s"]), "5120\n");

    // s1 is empty, so a snapshot of s1 links to base unless -e is given.
    ok(&["snapshot", "-n", &s2, "-p", &s1]);
    assert_eq!(ok(&["query", "-n", &s2, "-p"]), format!("{base}\n"));
    std::fs::remove_file(&s2).unwrap();
    ok(&["snapshot", "-n", &s2, "-p", &s1, "-e"]);
    assert_eq!(ok(&["query", "-n", &s2, "-p"]), format!("{s1}\n"));
    assert_eq!(ok(&["query", "-n", &s2, "-d"]), "chain depth: 3\n");

    // Depth limit: s2 has depth 3, a child would have 4.
    let s3 = p(d.path(), "s3.vhd");
    let o = run(&["snapshot", "-n", &s3, "-p", &s2, "-e", "-l", "3"]);
    assert_eq!(o.status, 28, "ENOSPC");
    assert_eq!(
        o.stdout,
        "snapshot depth exceeded: current depth: 3, limit: 3\n"
    );
    assert!(!path(d.path(), "s3.vhd").exists());
    ok(&["snapshot", "-n", &s3, "-p", &s2, "-e", "-l", "4"]);

    // Raw parent.
    let raw = p(d.path(), "raw.img");
    std::fs::write(&raw, vec![0u8; 4 << 20]).unwrap();
    let rs = p(d.path(), "rawsnap.vhd");
    ok(&["snapshot", "-n", &rs, "-p", &raw, "-m"]);
    assert_eq!(ok(&["query", "-n", &rs, "-p", "-v"]), format!("4\n{raw}\n"));
    assert_eq!(ok(&["query", "-n", &rs, "-d"]), "chain depth: 2\n");

    // Errors.
    expect_stdout_start(
        &["snapshot", "-n", &s3],
        22,
        "options: <-n name> <-p parent name>",
    );
    let o = run(&[
        "snapshot",
        "-n",
        &p(d.path(), "x.vhd"),
        "-p",
        &p(d.path(), "none.vhd"),
    ]);
    assert_eq!(o.status, 2);
}

#[test]
fn scan_plain_markers_tree_and_errors() {
    let d = tmpdir();
    let base = p(d.path(), "base.vhd");
    let leaf = p(d.path(), "leaf.vhd");
    ok(&["create", "-n", &base, "-s", "10"]);
    ok(&["snapshot", "-n", &leaf, "-p", &base]);
    ok(&["set", "-n", &base, "-f", "hidden", "-v", "1"]);

    assert_eq!(
        ok(&["scan", &base, &leaf]),
        "vhd=base.vhd capacity=10485760 size=3584 hidden=1 parent=none\n\
         vhd=leaf.vhd capacity=10485760 size=5120 hidden=0 parent=base.vhd\n"
    );
    assert_eq!(
        ok(&["scan", "-v", &leaf]),
        format!("vhd={leaf} capacity=10485760 size=5120 hidden=0 parent={base}\n")
    );
    assert_eq!(
        ok(&["scan", "-M", &leaf]),
        "vhd=leaf.vhd capacity=10485760 size=5120 hidden=0 marker=0 keyhash= parent=base.vhd\n"
    );
    // -f (fast): the parent name comes from the header.
    assert_eq!(
        ok(&["scan", "-f", &leaf]),
        "vhd=leaf.vhd capacity=10485760 size=5120 hidden=0 parent=base.vhd\n"
    );
    // Tree: the hidden root first, children indented by 3.
    assert_eq!(
        ok(&["scan", "-p", &leaf, &base]),
        "vhd=base.vhd capacity=10485760 size=3584 hidden=1 parent=none\n   \
         vhd=leaf.vhd capacity=10485760 size=5120 hidden=0 parent=base.vhd\n"
    );
    assert_eq!(
        ok(&["scan", "-p", &leaf]),
        "vhd=leaf.vhd capacity=10485760 size=5120 hidden=0 parent=base.vhd (not found in scan)\n"
    );
    // -a adds parents to the scan.
    assert_eq!(
        ok(&["scan", "-p", "-a", &leaf]),
        "vhd=base.vhd capacity=10485760 size=3584 hidden=1 parent=none\n   \
         vhd=leaf.vhd capacity=10485760 size=5120 hidden=0 parent=base.vhd\n"
    );
    // -m glob filter.
    let pattern = p(d.path(), "*.vhd");
    assert_eq!(
        ok(&["scan", "-m", &pattern]),
        "vhd=base.vhd capacity=10485760 size=3584 hidden=1 parent=none\n\
         vhd=leaf.vhd capacity=10485760 size=5120 hidden=0 parent=base.vhd\n"
    );

    // -a with a raw parent: raw targets are reported hidden, capacity = file size.
    let raw = p(d.path(), "disk.img");
    std::fs::write(&raw, vec![0u8; 4 << 20]).unwrap();
    let rs = p(d.path(), "rawsnap.vhd");
    ok(&["snapshot", "-n", &rs, "-p", &raw, "-m"]);
    assert_eq!(
        ok(&["scan", "-a", &rs]),
        "vhd=rawsnap.vhd capacity=4194304 size=5120 hidden=0 parent=disk.img\n\
         vhd=disk.img capacity=4194304 size=4194304 hidden=1 parent=none\n"
    );
    assert_eq!(
        ok(&["scan", "-p", "-a", &rs]),
        "vhd=disk.img capacity=4194304 size=4194304 hidden=1 parent=none\n   \
         vhd=rawsnap.vhd capacity=4194304 size=5120 hidden=0 parent=disk.img\n"
    );

    // A missing target.
    let missing = p(d.path(), "gone.vhd");
    let o = run(&["scan", &missing]);
    assert_eq!(o.status, 2);
    assert_eq!(
        o.stdout,
        format!(
            "vhd={missing} scan-error=-2 error-message='failure scanning target'\n\
             scan failed: -2\n"
        )
    );
    assert_eq!(o.stderr, "");
    // A target that is not a VHD; -c continues and exits 0.
    let junk = p(d.path(), "junk.vhd");
    std::fs::write(&junk, vec![1u8; 4096]).unwrap();
    expect_stdout(
        &["scan", "-c", &junk, &base],
        0,
        &format!(
            "vhd={junk} scan-error=-22 error-message='opening file'\n\
             vhd=base.vhd capacity=10485760 size=3584 hidden=1 parent=none\n"
        ),
    );
    expect_stdout(
        &["scan", &junk, &base],
        22,
        &format!("vhd={junk} scan-error=-22 error-message='opening file'\n"),
    );
    // No targets.
    expect_stdout_start(&["scan"], 22, "usage: [OPTIONS] FILES\n");
    // LVM is not supported.
    let o = run(&["scan", "-l", "VG_XenStorage", "-m", "VHD-*"]);
    assert_ne!(o.status, 0);
    assert!(o.stderr.contains("not supported"), "{}", o.stderr);
}

#[test]
fn check_valid_corrupt_and_parents() {
    let d = tmpdir();
    let base = p(d.path(), "base.vhd");
    let leaf = p(d.path(), "leaf.vhd");
    ok(&["create", "-n", &base, "-s", "10"]);
    ok(&["snapshot", "-n", &leaf, "-p", &base]);
    assert_eq!(ok(&["check", "-n", &base]), format!("{base} is valid\n"));
    assert_eq!(ok(&["check", "-n", &leaf]), format!("{leaf} is valid\n"));
    assert_eq!(
        ok(&["check", "-n", &leaf, "-p"]),
        format!("{leaf} is valid\n{base} is valid\n")
    );
    let fixed = p(d.path(), "fixed.vhd");
    ok(&["create", "-n", &fixed, "-s", "2", "-r"]);
    // blktap checks only the footer of fixed disks and prints nothing.
    assert_eq!(ok(&["check", "-n", &fixed]), "");

    // Corrupt the primary footer's checksum.
    let bad = p(d.path(), "bad.vhd");
    std::fs::copy(&base, &bad).unwrap();
    let mut b = std::fs::read(&bad).unwrap();
    let n = b.len();
    b[n - 512 + 64] ^= 0xff;
    std::fs::write(&bad, &b).unwrap();
    let o = run(&["check", "-n", &bad]);
    assert_eq!(o.status, 22);
    assert!(
        o.stdout.starts_with(&format!(
            "primary footer invalid: invalid checksum\n{bad} appears invalid; dumping metadata\n"
        )),
        "{}",
        o.stdout
    );
    assert!(o.stdout.contains("VHD Footer Summary:"));
    // -i ignores the missing primary footer (the backup is good).
    assert_eq!(
        ok(&["check", "-n", &bad, "-i"]),
        format!("{bad} is valid\n")
    );

    // BAT entry pointing into the headers.
    let clobber = p(d.path(), "clobber.vhd");
    std::fs::copy(&base, &clobber).unwrap();
    let mut b = std::fs::read(&clobber).unwrap();
    b[1536..1540].copy_from_slice(&2u32.to_be_bytes());
    std::fs::write(&clobber, &b).unwrap();
    expect_stdout_start(
        &["check", "-n", &clobber],
        22,
        "block 0 (offset 0x2) clobbers headers\n",
    );

    // Stats mode.
    let o = ok(&["check", "-n", &base, "-s"]);
    assert_eq!(
        o,
        "base.vhd: secs allocated: 0x0 secs written: 0x0 (0.00%)\n"
    );

    // A differencing disk whose parent is gone.
    let orphan_base = p(d.path(), "gone-base.vhd");
    let orphan = p(d.path(), "orphan.vhd");
    ok(&["create", "-n", &orphan_base, "-s", "10"]);
    ok(&["snapshot", "-n", &orphan, "-p", &orphan_base]);
    std::fs::remove_file(&orphan_base).unwrap();
    expect_stdout_start(
        &["check", "-n", &orphan],
        2,
        "error resolving ./gone-base.vhd: -2\n",
    );

    let missing = p(d.path(), "none.vhd");
    expect_stdout(
        &["check", "-n", &missing],
        2,
        &format!("cannot stat {missing}: 2\n"),
    );
    let o = run(&["check", "-n", &base, "-B", "-s"]);
    assert_eq!(o.status, 22);
}

#[test]
fn read_headers_bat_and_batmap() {
    let d = tmpdir();
    let base = p(d.path(), "base.vhd");
    let leaf = p(d.path(), "leaf.vhd");
    ok(&["create", "-n", &base, "-s", "10"]);
    ok(&["snapshot", "-n", &leaf, "-p", &base]);
    let o = ok(&["read", "-n", &base, "-p"]);
    assert!(
        o.starts_with("VHD Footer Summary:\n-------------------\nCookie              : conectix\n")
    );
    for want in [
        "Features            : (0x00000002) <RESV>\n",
        "File format version : Major: 1, Minor: 0\n",
        "Data offset         : 512\n",
        "Creator Application : 'tap'\n",
        "Creator version     : Major: 1, Minor: 3\n",
        "Current disk size   : 10 MB (10485760 Bytes)\n",
        "Disk type           : Dynamic hard disk\n",
        "Hidden              : 0\n\nVHD Header Summary:\n-------------------\nCookie              : cxsparse\n",
        "Data offset (unusd) : 18446744073709551615\n",
        "Table offset        : 1536\n",
        "Header version      : 0x00010000\n",
        "Max BAT size        : 5\n",
        "Block size          : 2097152 (2 MB)\n",
        "Parent UUID         : 00000000-0000-0000-0000-000000000000\n",
        "VHD Batmap Summary:\n-------------------\nBatmap offset       : 2560\nBatmap size (secs)  : 1\nBatmap version      : 0x00010002\n",
    ] {
        assert!(o.contains(want), "missing {want:?} in\n{o}");
    }
    assert!(!o.contains("Bad!"), "{o}");
    assert!(!o.contains("VHD Parent Locators"));
    let x = ok(&["read", "-n", &base, "-p", "-x"]);
    assert!(x.contains("Table offset        : 0x600\n"));

    let o = ok(&["read", "-n", &leaf, "-p"]);
    assert!(o.contains("Disk type           : Differencing hard disk\n"));
    assert!(o.contains("Parent name         : base.vhd\n"));
    assert!(o.contains(
        "VHD Parent Locators:\n--------------------\nlocator:            : 0\n       code         : PLAT_CODE_MACX\n"
    ));
    assert!(o.contains("       decoded name : ./base.vhd\n"));
    assert!(o.contains("       code         : PLAT_CODE_W2KU\n"));
    assert!(o.contains("       code         : PLAT_CODE_W2RU\n"));

    assert_eq!(
        ok(&["read", "-n", &base, "-b", "0", "-c", "2"]),
        "block: 0: offset: not allocated\nblock: 1: offset: not allocated\n"
    );
    assert_eq!(
        ok(&["read", "-n", &base, "-t", "4097"]),
        "logical sector 4097: block number: 1, sector offset: 1, file offset: not allocated\n"
    );
    assert_eq!(
        ok(&["read", "-n", &base, "-i", "5"]),
        "block 0: sec: 5: 0\n"
    );
    assert_eq!(
        ok(&["read", "-n", &base, "-m", "0"]),
        "block 0 not allocated\n"
    );
    assert_eq!(ok(&["read", "-n", &base, "-e", "0", "-c", "100"]), "");
    let o = run(&["read", "-n", &base, "-a"]);
    assert_eq!(o.status, 0);
    assert_eq!(o.raw, vec![0u8; 512]);
    let o = run(&["read", "-n", &base, "-B"]);
    assert_eq!(o.raw, vec![0u8; 1]);
    let o = run(&["read", "-n", &base, "-r", "0", "-c", "2"]);
    assert_eq!(o.raw, vec![0u8; 1024]);
    let o = run(&["read", "-n", &base, "-b", "9"]);
    assert_eq!(o.status, 34, "ERANGE");
    assert_eq!(o.stderr, "block 9 past end of file\n");
    expect_stdout_start(&["read", "-p"], 22, "options:\n-h          help\n");

    // A file that does not open: the headers are dumped anyway.
    let junk = p(d.path(), "junk.vhd");
    std::fs::write(&junk, vec![0u8; 4096]).unwrap();
    let o = run(&["read", "-n", &junk, "-p"]);
    assert_eq!(o.status, 22);
    assert!(o.stdout.starts_with(&format!(
        "Failed to open {junk}: -22\n\n{junk} appears invalid; dumping headers\n\n"
    )));
}

#[test]
fn repair_rewrites_a_damaged_footer() {
    let d = tmpdir();
    let f = p(d.path(), "a.vhd");
    ok(&["create", "-n", &f, "-s", "10"]);
    let good = std::fs::read(&f).unwrap();
    let mut b = good.clone();
    let n = b.len();
    b[n - 512 + 64] ^= 0xff;
    std::fs::write(&f, &b).unwrap();
    assert_eq!(run(&["check", "-n", &f]).status, 22);
    assert_eq!(ok(&["repair", "-n", &f]), "");
    assert_eq!(ok(&["check", "-n", &f]), format!("{f} is valid\n"));
    assert_eq!(std::fs::read(&f).unwrap(), good);
    expect_stdout(
        &["repair"],
        22,
        "options: <-n name> <-b use the back-up footer> [-h help]\n",
    );
}

#[test]
fn resize_fast_within_preallocation() {
    let d = tmpdir();
    let f = p(d.path(), "a.vhd");
    ok(&["create", "-n", &f, "-s", "10", "-S", "100"]);
    assert_eq!(ok(&["resize", "-n", &f, "-s", "50", "-f"]), "");
    assert_eq!(ok(&["query", "-n", &f, "-v"]), "50\n");
    assert_eq!(ok(&["check", "-n", &f]), format!("{f} is valid\n"));
    // Beyond the preallocated BAT.
    let o = run(&["resize", "-n", &f, "-s", "200", "-f"]);
    assert_eq!(o.status, 22);
    // Shrinking is refused by fast resize.
    expect_stdout(
        &["resize", "-n", &f, "-s", "20", "-f"],
        22,
        &format!("{f}: size (20971520) < curr size (52428800)\n"),
    );
    // Neither -f nor -j: usage.
    let o = run(&["resize", "-n", &f, "-s", "60"]);
    assert_eq!(o.status, 22);
    assert!(o
        .stdout
        .starts_with("options: <-n name> <-s size (in MB)> (<-j journal>|<-f fast>)"));
}

#[test]
fn modify_zero_and_physical_size_and_reparent() {
    let d = tmpdir();
    let base = p(d.path(), "base.vhd");
    let other = p(d.path(), "other.vhd");
    let leaf = p(d.path(), "leaf.vhd");
    ok(&["create", "-n", &base, "-s", "10"]);
    ok(&["create", "-n", &other, "-s", "10"]);
    ok(&["snapshot", "-n", &leaf, "-p", &base]);
    assert_eq!(ok(&["modify", "-n", &leaf, "-p", &other]), "");
    assert_eq!(ok(&["query", "-n", &leaf, "-p"]), format!("{other}\n"));
    assert_eq!(ok(&["check", "-n", &leaf]), format!("{leaf} is valid\n"));
    // -s: footer moved to new end; smaller than the data is refused.
    ok(&["modify", "-n", &base, "-s", "8192"]);
    assert_eq!(std::fs::metadata(&base).unwrap().len(), 8192);
    assert_eq!(ok(&["query", "-n", &base, "-v"]), "10\n");
    expect_stdout(
        &["modify", "-n", &base, "-s", "1024"],
        22,
        "failed to set physical size to 1024: -22\n",
    );
    // -z on a fixed disk is ENOSYS.
    let fixed = p(d.path(), "fixed.vhd");
    ok(&["create", "-n", &fixed, "-s", "2", "-r"]);
    expect_stdout(
        &["modify", "-n", &fixed, "-z"],
        38,
        "failed to zero VHD: -38\n",
    );
    // -t (OpenXT): flip the footer type and back.
    assert_eq!(ok(&["modify", "-n", &leaf, "-t", "dynamic"]), "");
    assert_eq!(
        ok(&["query", "-n", &leaf, "-p"]),
        format!("{leaf} has no parent\n")
    );
    assert_eq!(ok(&["modify", "-n", &leaf, "-t", "original"]), "");
    assert_eq!(ok(&["query", "-n", &leaf, "-p"]), format!("{other}\n"));
    expect_stdout(
        &["modify", "-n", &leaf, "-t", "weird"],
        22,
        "invalid type weird (must be 'differencing or dynamic')\n",
    );
    expect_stdout(
        &["modify", "-n", &fixed, "-t", "dynamic"],
        22,
        "changing fixed vhd type not supported\n",
    );
    let o = run(&["modify"]);
    assert_eq!(o.status, 22);
    assert!(o
        .stdout
        .starts_with("*** Dangerous operations, use with care ***\n"));
}
