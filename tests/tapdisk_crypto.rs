//! Encrypted VHDs through tapdisk: keys from TAPDISK3_CRYPTO_KEYDIR (inherited by the spawned
//! daemon) and from the OPEN key trailer (`tap-ctl open -E`). Data written over NBD lands
//! encrypted in the file and reads back as plaintext with the right key only.

mod common;
use common::cmd::run_ok;

use std::path::{Path, PathBuf};
use std::process::Command;

use blktap3::control::client::Client;
use blktap3::control::msg::{OpenRequest, SecretKey};

/// A 16 MiB dynamic VHD keyed with a fresh 512-bit key; returns (vhd, keydir, key).
fn keyed_vhd(dir: &Path) -> (PathBuf, PathBuf, Vec<u8>) {
    let vhd = dir.join("enc.vhd");
    run_ok(
        Command::new(env!("CARGO_BIN_EXE_vhd-util"))
            .args(["create", "-n"])
            .arg(&vhd)
            .args(["-s", "16"]),
    );
    let keydir = dir.join("keys");
    std::fs::create_dir(&keydir).unwrap();
    let key: Vec<u8> = (0..64u8)
        .map(|i| i.wrapping_mul(37).wrapping_add(11))
        .collect();
    let keyfile = keydir.join("enc,aes-xts-plain,512.key");
    std::fs::write(&keyfile, &key).unwrap();
    run_ok(
        Command::new(env!("CARGO_BIN_EXE_vhd-util"))
            .args(["key", "-s", "-n"])
            .arg(&vhd)
            .arg("-k")
            .arg(&keyfile),
    );
    (vhd, keydir, key)
}

fn qemu_io(devname: &Path, cmds: &[&str]) -> String {
    let uri = format!("nbd+unix:///?socket={}", devname.display());
    run_ok(&mut common::cmd::qemu_io(&uri, cmds))
}

#[test]
fn encrypted_vhd_with_keydir_and_with_explicit_key() {
    let dir = tempfile::tempdir().unwrap();
    let (vhd, keydir, key) = keyed_vhd(dir.path());
    let params = format!("vhd:{}", vhd.display());
    let ctl = dir.path().join("ctl");

    // 1. Key directory from the environment the daemon inherits.
    std::env::set_var("TAPDISK3_CRYPTO_KEYDIR", &keydir);
    let c = Client::with_dir(&ctl).with_tapdisk(env!("CARGO_BIN_EXE_tapdisk"));
    let created = c.create(OpenRequest::new(0, params.clone()), None).unwrap();
    std::env::remove_var("TAPDISK3_CRYPTO_KEYDIR");
    let out = qemu_io(
        &created.devname,
        &["write -P 0x6b 0 1M", "read -P 0x6b 0 1M", "flush"],
    );
    assert!(!out.contains("verification failed"), "{out}");
    c.destroy(created.pid, created.minor, false, None).unwrap();
    // The plaintext pattern is nowhere in the file.
    let raw = std::fs::read(&vhd).unwrap();
    assert!(!raw.windows(4096).any(|w| w.iter().all(|b| *b == 0x6b)));

    // 2. No key at all: the open fails and nothing is left behind.
    let e = c
        .create(OpenRequest::new(0, params.clone()), None)
        .unwrap_err();
    assert_ne!(e.errno(), 0);

    // 3. A wrong key in the trailer is refused (keyhash mismatch).
    let mut o = OpenRequest::new(0, params.clone());
    o.key = Some(SecretKey::new(&[0x55u8; 64]));
    assert!(c.create(o, None).is_err());

    // 4. The key handed over in the OPEN trailer.
    let mut o = OpenRequest::new(0, params);
    o.key = Some(SecretKey::new(&key));
    let created = c.create(o, None).unwrap();
    let out = qemu_io(&created.devname, &["read -P 0x6b 0 1M", "read -P 0 1M 1M"]);
    assert!(!out.contains("verification failed"), "{out}");
    c.destroy(created.pid, created.minor, false, None).unwrap();
}
