//! `vhd-util key`: calculate, set, print, check, refusals, the on-disk layout of the key
//! hash (OpenXT reference §1.2 hex dump), `snapshot -K`, and the passphrase extra.
//! Expected hashes are SHA-256(nonce || key) computed independently (Python hashlib).

mod common;
use common::vhd_util::*;

/// SHA-256(32 zero bytes || 00..3f), as in the reference's verified hex dump.
const H64: &str = "dc7a48014fc1fac8b52af39bc7ea5cafafabf8bb81fb8f880fdf3b4a4566795c";
/// SHA-256(32 zero bytes || 00..1f).
const H32: &str = "bb2275c49f28ad52cae6d55e34a974a58c7a3ba26f976e8ecbbe7a536918dc73";
/// SHA-256(32 x 0xaa || 00..1f).
const H32_AA: &str = "fd34888fbc1a85f80096c761ca8fd60b0bebd718dafc85b97751640e89332295";
/// SHA-256(32 zero bytes || 00..1f || "\n").
const H33: &str = "650079f21c7c6d34f60bbee3efa8cf84a933042a2dfcfd28c1555c39a96e6287";

fn zeros() -> String {
    "00".repeat(32)
}

#[test]
fn calculate() {
    let d = tmpdir();
    let k64 = keyfile(d.path(), "a,aes-xts-plain,512.key", 64);
    let k32 = keyfile(d.path(), "b,aes-xts-plain,256.key", 32);
    assert_eq!(ok(&["key", "-C", "-k", &k64]), format!("{H64}\n"));
    assert_eq!(ok(&["key", "-C", "-k", &k32]), format!("{H32}\n"));
    assert_eq!(
        ok(&["key", "-C", "-k", &k32, "-N", &"aA".repeat(32)]),
        format!("{H32_AA}\n")
    );
    // -C hashes the whole file, trailing newline included.
    let mut v: Vec<u8> = (0..32).collect();
    v.push(b'\n');
    let nl = p(d.path(), "nl.key");
    std::fs::write(&nl, v).unwrap();
    assert_eq!(ok(&["key", "-C", "-k", &nl]), format!("{H33}\n"));
    // Bad nonce.
    let o = run(&["key", "-C", "-k", &k32, "-N", "abc"]);
    assert_eq!(o.status, 22);
    let o = run(&["key", "-C", "-k", &p(d.path(), "missing.key")]);
    assert_eq!(o.status, 2);
}

#[test]
fn set_print_check_and_layout() {
    let d = tmpdir();
    let vhd = p(d.path(), "disk.vhd");
    ok(&["create", "-n", &vhd, "-s", "10"]);
    assert_eq!(ok(&["key", "-p", "-n", &vhd]), "none\n");
    let k = keyfile(d.path(), "disk,aes-xts-plain,512.key", 64);
    assert_eq!(ok(&["key", "-s", "-n", &vhd, "-k", &k]), "");
    assert_eq!(
        ok(&["key", "-p", "-n", &vhd]),
        format!("{} {H64}\n", zeros())
    );
    // Layout: batmap header at 0x800, cookie 1 at 0x81d, nonce, hash at 0x83e.
    let b = std::fs::read(&vhd).unwrap();
    assert_eq!(&b[0x800..0x808], b"tdbatmap");
    assert_eq!(b[0x81d], 1);
    assert!(b[0x81e..0x83e].iter().all(|&x| x == 0));
    let hash: String = b[0x83e..0x85e].iter().map(|x| format!("{x:02x}")).collect();
    assert_eq!(hash, H64);
    assert!(b[0x85e..0xa00].iter().all(|&x| x == 0));

    assert_eq!(ok(&["key", "-c", "-n", &vhd, "-k", &k]), "");
    // -s and -p together.
    let v2 = p(d.path(), "two.vhd");
    ok(&["create", "-n", &v2, "-s", "10"]);
    let k32 = keyfile(d.path(), "two,aes-xts-plain,256.key", 32);
    assert_eq!(
        ok(&["key", "-s", "-p", "-n", &v2, "-k", &k32]),
        format!("{} {H32}\n", zeros())
    );
    // Shown by read -p and scan -M.
    let o = ok(&["read", "-n", &vhd, "-p"]);
    assert!(o.contains(&format!(
        "Batmap keyhash nonce: {}\nBatmap keyhash hash : {H64}\n",
        zeros()
    )));
    assert_eq!(
        ok(&["scan", "-M", &vhd]),
        format!("vhd=disk.vhd capacity=10485760 size=3584 hidden=0 marker=0 keyhash={H64} parent=none\n")
    );
    assert_eq!(ok(&["check", "-n", &vhd]), format!("{vhd} is valid\n"));

    // Wrong key.
    let other = keyfile(d.path(), "other,aes-xts-plain,256.key", 32);
    expect_stderr(
        &["key", "-c", "-n", &vhd, "-k", &other],
        22,
        "vhd_util_check_key: vhd hash doesn't match key hash\nkey check failed: -22\n",
    );
    // No keyhash.
    let plain = p(d.path(), "plain.vhd");
    ok(&["create", "-n", &plain, "-s", "10"]);
    expect_stderr(
        &["key", "-c", "-n", &plain, "-k", &k],
        22,
        "vhd_util_check_key: this vhd has no keyhash\nkey check failed: -22\n",
    );
}

#[test]
fn set_with_explicit_hash_and_nonce() {
    let d = tmpdir();
    let vhd = p(d.path(), "h.vhd");
    ok(&["create", "-n", &vhd, "-s", "10"]);
    let nonce = "0123456789abcdef".repeat(4);
    let hash = "FEDCBA9876543210".repeat(4);
    ok(&["key", "-s", "-n", &vhd, "-H", &hash, "-N", &nonce]);
    assert_eq!(
        ok(&["key", "-p", "-n", &vhd]),
        format!("{nonce} {}\n", hash.to_lowercase())
    );
    let o = run(&["key", "-s", "-n", &vhd, "-H", "12"]);
    assert_eq!(o.status, 22);
    assert!(o.stderr.contains("setting key failed: -22"));
}

#[test]
fn refusals_and_usage() {
    let d = tmpdir();
    let k = keyfile(d.path(), "x,aes-xts-plain,512.key", 64);
    // Fixed disks.
    let fixed = p(d.path(), "fixed.vhd");
    ok(&["create", "-n", &fixed, "-s", "2", "-r"]);
    expect_stderr(
        &["key", "-s", "-n", &fixed, "-k", &k],
        22,
        "vhd_util_set_key: can't save key hashes for fixed vhds\nsetting key failed: -22\n",
    );
    // Disks with data.
    let full = p(d.path(), "full.vhd");
    ok(&["create", "-n", &full, "-s", "4"]);
    ok(&["fill", "-n", &full, "-b", "-t", "0"]);
    expect_stderr(
        &["key", "-s", "-n", &full, "-k", &k],
        22,
        "vhd_util_set_key: can't save key hashes for non-empty vhds\nsetting key failed: -22\n",
    );
    assert_eq!(ok(&["key", "-p", "-n", &full]), "none\n");
    // An empty differencing disk is allowed.
    let base = p(d.path(), "base.vhd");
    let leaf = p(d.path(), "leaf.vhd");
    ok(&["create", "-n", &base, "-s", "4"]);
    ok(&["snapshot", "-n", &leaf, "-p", &base]);
    ok(&["key", "-s", "-n", &leaf, "-k", &k]);
    // A key file that is not 32/64 bytes (trailing newline) is refused for -s.
    let mut v: Vec<u8> = (0..32).collect();
    v.push(b'\n');
    let nl = p(d.path(), "nl.key");
    std::fs::write(&nl, v).unwrap();
    let o = run(&["key", "-s", "-n", &base, "-k", &nl]);
    assert_eq!(o.status, 22);
    assert_eq!(ok(&["key", "-p", "-n", &base]), "none\n");
    // Usage: both -k and -H, neither, -c with -N, no mode; usage goes to stderr.
    let o = run(&["key", "-s", "-n", &base, "-k", &k, "-H", &"00".repeat(32)]);
    assert_eq!(o.status, 22);
    assert!(o.stderr.starts_with("usage:\n-C -k KEYPATH [-N NONCE]"));
    assert!(o.stdout.is_empty());
    assert_eq!(run(&["key", "-s", "-n", &base]).status, 22);
    assert_eq!(
        run(&["key", "-c", "-n", &base, "-k", &k, "-N", &"00".repeat(32)]).status,
        22
    );
    assert_eq!(run(&["key", "-n", &base]).status, 22);
    assert_eq!(run(&["key", "-h"]).status, 0);
    let missing = p(d.path(), "missing.vhd");
    expect_stderr(
        &["key", "-p", "-n", &missing],
        2,
        &format!("failed to open {missing}: -2\n"),
    );
}

#[test]
fn snapshot_keyhash_default_and_opt_in_copy() {
    let d = tmpdir();
    let base = p(d.path(), "base.vhd");
    ok(&["create", "-n", &base, "-s", "4"]);
    let k = keyfile(d.path(), "base,aes-xts-plain,512.key", 64);
    ok(&["key", "-s", "-n", &base, "-k", &k]);
    let s1 = p(d.path(), "s1.vhd");
    ok(&["snapshot", "-n", &s1, "-p", &base]);
    assert_eq!(ok(&["key", "-p", "-n", &s1]), "none\n");
    let s2 = p(d.path(), "s2.vhd");
    ok(&["snapshot", "-n", &s2, "-p", &base, "-K"]);
    assert_eq!(
        ok(&["key", "-p", "-n", &s2]),
        format!("{} {H64}\n", zeros())
    );
}

#[test]
fn passphrase_derived_key_file() {
    let d = tmpdir();
    let pass = p(d.path(), "pass.txt");
    std::fs::write(&pass, b"correct horse\n").unwrap();
    let salt: String = (0u8..16).map(|b| format!("{b:02x}")).collect();
    let k = p(d.path(), "disk,aes-xts-plain,512.key");
    assert_eq!(
        ok(&["key", "-P", &pass, "-k", &k, "-S", &salt, "-i", "1000"]),
        ""
    );
    // PBKDF2-HMAC-SHA256("correct horse", 00..0f, 1000, 64), from Python hashlib.
    let want = "c914cc4f06cc6e8f46d157e3a1b5aa7abceebb17bb0444cd4c4ac16ca2ae986415ca4818a855241833d2aa66a69660e8f75817d4967af4b816889b859264fe51";
    let got: String = std::fs::read(&k)
        .unwrap()
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect();
    assert_eq!(got, want);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&k).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let k256 = p(d.path(), "disk2,aes-xts-plain,256.key");
    ok(&["key", "-P", &pass, "-k", &k256, "-S", &salt, "-i", "1000"]);
    assert_eq!(std::fs::read(&k256).unwrap().len(), 32);
    // Never overwrites; needs a salt of at least 16 bytes and a key file name with a size.
    let o = run(&["key", "-P", &pass, "-k", &k, "-S", &salt]);
    assert_eq!(o.status, 17, "EEXIST");
    assert!(o.stderr.contains("already exists"), "{}", o.stderr);
    assert_eq!(
        run(&[
            "key",
            "-P",
            &pass,
            "-k",
            &p(d.path(), "x,aes-xts-plain,512.key"),
            "-S",
            "0011"
        ])
        .status,
        22
    );
    assert_eq!(
        run(&[
            "key",
            "-P",
            &pass,
            "-k",
            &p(d.path(), "plain.key"),
            "-S",
            &salt,
            "-i",
            "10"
        ])
        .status,
        22
    );
    // The derived key file works with -s.
    let vhd = p(d.path(), "disk.vhd");
    ok(&["create", "-n", &vhd, "-s", "4"]);
    ok(&["key", "-s", "-n", &vhd, "-k", &k]);
    ok(&["key", "-c", "-n", &vhd, "-k", &k]);
}

/// OpenXT reference §1.11 vector C (nonce 40 41 .. 5f) and vectors A/B (ciphertext of
/// zero sectors), checked through files vhd-util creates and keys.
#[test]
fn openxt_reference_vectors() {
    let d = tmpdir();
    let nonce: String = (0x40u8..0x60).map(|b| format!("{b:02x}")).collect();
    let k64 = keyfile(d.path(), "vm,aes-xts-plain,512.key", 64);
    let k32 = keyfile(d.path(), "vm2,aes-xts-plain,256.key", 32);
    assert_eq!(
        ok(&["key", "-C", "-k", &k64, "-N", &nonce]),
        "719d5171dfedaddfb9c79d66ef5e789b0b2219fbd68bbb1d0f09a901cdfcce09\n"
    );
    assert_eq!(
        ok(&["key", "-C", "-k", &k32, "-N", &nonce]),
        "7fcae223fa8aa951b003ef172fb37bd1a758a42cc3b7f6c528461da6f26aae7c\n"
    );

    let dir = d.path().to_string_lossy().into_owned();
    let env = [("TAPDISK3_CRYPTO_KEYDIR", dir.as_str())];
    for (name, key, c0, c1) in [
        (
            "vm",
            &k64,
            "cd6b103236fbd87dba93e9001e29bc3d5e885d6abd1577e3e0e0a5f49e444894",
            "0c22ed7e2168a8500b30154c2ec00d26f8f158f9af844bffaf0387b64c761a1e",
        ),
        (
            "vm2",
            &k32,
            "f071a2b402c105ea37024133e24d6ef6212e8cc0175e1b6b32657d54f159daf6",
            "a8ce33a288a211258599d867beceaf25af22ac0c12e00c7d57fe1dcd3273c74b",
        ),
    ] {
        let vhd = p(d.path(), &format!("{name}.vhd"));
        ok(&["create", "-n", &vhd, "-s", "4"]);
        ok(&["key", "-s", "-n", &vhd, "-k", key]);
        // Allocate block 0 through the image layer with the key (fill writes the
        // zeros it reads back, encrypted), then dump the raw block.
        let o = run_env(&["fill", "-n", &vhd], &env);
        assert_eq!(o.status, 0, "{}", o.stderr);
        let o = run(&["read", "-n", &vhd, "-d", "0"]);
        assert_eq!(o.status, 0);
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        assert_eq!(hex(&o.raw[..32]), c0, "{name} sector 0");
        assert_eq!(hex(&o.raw[512..544]), c1, "{name} sector 1");
        // And -r -D decrypts it back.
        let o = run_env(&["read", "-n", &vhd, "-r", "0", "-c", "2", "-D"], &env);
        assert_eq!(o.raw, vec![0u8; 1024]);
        // status-tool's spelling.
        assert_eq!(ok(&["check", "-iItn", &vhd]), format!("{vhd} is valid\n"));
    }
}
