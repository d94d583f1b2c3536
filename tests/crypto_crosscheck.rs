//! Cross-checks of the batched XTS against independent implementations: the xts-mode
//! crate (one block at a time, custom tweak function) over random keys, data, sector
//! numbers and request sizes, and the `openssl` CLI's AES-ECB (the tweak arithmetic done
//! here, as the OpenXT vectors were produced).

mod common;
use common::data::Rng;

use aes::cipher::KeyInit;
use blktap3::image::crypto::{to_hex, XtsCipher, CHUNK_SECTORS};
use std::io::Write;
use std::process::{Command, Stdio};

fn plain_tweak(lba: u64) -> aes::Block {
    let mut t = [0u8; 16];
    t[..4].copy_from_slice(&(lba as u32).to_le_bytes());
    aes::Block::from(t)
}

/// Reference encryption/decryption of whole sectors with xts-mode.
fn reference(key: &[u8], lba: u64, data: &mut [u8], encrypt: bool) {
    let tw = |i: u128| plain_tweak(lba.wrapping_add(i as u64));
    let h = key.len() / 2;
    macro_rules! run {
        ($c:ty) => {{
            let x = xts_mode::Xts128::new(
                <$c>::new_from_slice(&key[..h]).unwrap(),
                <$c>::new_from_slice(&key[h..]).unwrap(),
            );
            if encrypt {
                x.encrypt_area(data, 512, 0, tw)
            } else {
                x.decrypt_area(data, 512, 0, tw)
            }
        }};
    }
    match key.len() {
        32 => run!(aes::Aes128),
        64 => run!(aes::Aes256),
        _ => unreachable!(),
    }
}

#[test]
fn matches_xts_mode_for_random_requests() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let chunk = CHUNK_SECTORS;
    // Sizes around the batch boundaries plus 64 KiB and beyond.
    let mut sizes = vec![
        1,
        2,
        7,
        8,
        chunk - 1,
        chunk,
        chunk + 1,
        2 * chunk + 3,
        128,
        129,
        200,
    ];
    for _ in 0..10 {
        sizes.push(1 + (rng.next() % 160) as usize);
    }
    for (n, &nsec) in sizes.iter().enumerate() {
        let klen = if n % 2 == 0 { 64 } else { 32 };
        let key = rng.bytes(klen);
        let c = XtsCipher::new(&key).unwrap();
        let lba = match n % 4 {
            0 => rng.next() % (1u64 << 32),
            1 => (1u64 << 32) - 1 - (rng.next() % 8), // crosses the 32-bit wrap
            2 => rng.next(),                          // any u64, truncated to 32 bits
            _ => rng.next() % 4096,
        };
        let plain = rng.bytes(nsec * 512);
        let mut ours = plain.clone();
        c.encrypt_sectors(lba, &mut ours);
        let mut theirs = plain.clone();
        reference(&key, lba, &mut theirs, true);
        assert!(
            ours == theirs,
            "encrypt mismatch: {nsec} sectors at {lba:#x}, {klen}-byte key"
        );
        // Buffer-to-buffer variant gives the same and leaves the source alone.
        let mut out = vec![0u8; plain.len()];
        c.encrypt_sectors_to(lba, &plain, &mut out);
        assert!(out == theirs);
        // Decrypt (in place and b2b) against the reference.
        let mut back = ours.clone();
        c.decrypt_sectors(lba, &mut back);
        assert!(
            back == plain,
            "decrypt mismatch: {nsec} sectors at {lba:#x}"
        );
        let mut back2 = vec![0u8; plain.len()];
        c.decrypt_sectors_to(lba, &ours, &mut back2);
        assert!(back2 == plain);
        let mut rd = theirs.clone();
        reference(&key, lba, &mut rd, false);
        assert!(rd == plain);
    }
}

#[test]
fn split_requests_equal_one_request() {
    // Encrypting a request in arbitrary pieces (at the matching LBAs) gives the same
    // bytes as one call: the chunking is invisible.
    let mut rng = Rng(42);
    let key = rng.bytes(64);
    let c = XtsCipher::new(&key).unwrap();
    let nsec = 3 * CHUNK_SECTORS + 5;
    let plain = rng.bytes(nsec * 512);
    let mut whole = plain.clone();
    c.encrypt_sectors(1000, &mut whole);
    let mut pieces = plain.clone();
    let mut s = 0;
    while s < nsec {
        let n = (1 + (rng.next() % 20) as usize).min(nsec - s);
        c.encrypt_sectors(1000 + s as u64, &mut pieces[s * 512..(s + n) * 512]);
        s += n;
    }
    assert!(pieces == whole);
}

#[test]
fn concurrent_use_from_threads() {
    // The tweak scratch is per thread: parallel calls on one shared cipher agree.
    let key: Vec<u8> = (0u8..64).collect();
    let c = std::sync::Arc::new(XtsCipher::new(&key).unwrap());
    let mut expect = vec![0u8; 40 * 512];
    c.encrypt_sectors(77, &mut expect);
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let c = c.clone();
            std::thread::spawn(move || {
                let mut v = Vec::new();
                for _ in 0..50 {
                    let mut d = vec![0u8; 40 * 512];
                    c.encrypt_sectors(77, &mut d);
                    v.push(d);
                }
                v
            })
        })
        .collect();
    for h in handles {
        for d in h.join().unwrap() {
            assert!(d == expect);
        }
    }
}

/// AES-ECB of whole blocks through the openssl CLI (None if openssl is unavailable).
fn openssl_ecb(key: &[u8], data: &[u8]) -> Option<Vec<u8>> {
    let cipher = match key.len() {
        16 => "-aes-128-ecb",
        32 => "-aes-256-ecb",
        _ => return None,
    };
    let mut child = Command::new("openssl")
        .args(["enc", cipher, "-e", "-nopad", "-K", &to_hex(key)])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    child.stdin.take()?.write_all(data).ok()?;
    let out = child.wait_with_output().ok()?;
    out.status.success().then_some(out.stdout)
}

fn mul_x(t: u128) -> u128 {
    (t << 1) ^ if t >> 127 == 1 { 0x87 } else { 0 }
}

#[test]
fn matches_openssl_cli_aes_ecb_assembly() {
    let mut rng = Rng(7);
    let mut checked = 0;
    for (klen, lba) in [
        (64usize, 0u64),
        (64, 1),
        (32, 123_456),
        (64, (1u64 << 32) + 9),
        (32, 0xffff_ffff),
    ] {
        let key = rng.bytes(klen);
        let (k1, k2) = key.split_at(klen / 2);
        let plain = rng.bytes(512);
        // T0 = E_K2(plain IV).
        let iv = plain_tweak(lba).0;
        let Some(t0) = openssl_ecb(k2, &iv) else {
            eprintln!("openssl enc not available; skipping cross-check");
            return;
        };
        let mut t = u128::from_le_bytes(t0[..16].try_into().unwrap());
        let mut tweaks = Vec::new();
        let mut pp = Vec::with_capacity(512);
        for blk in plain.chunks(16) {
            tweaks.push(t);
            let x = u128::from_le_bytes(blk.try_into().unwrap()) ^ t;
            pp.extend_from_slice(&x.to_le_bytes());
            t = mul_x(t);
        }
        let cc = openssl_ecb(k1, &pp).expect("openssl enc ran once already");
        let mut expect = Vec::with_capacity(512);
        for (blk, t) in cc.chunks(16).zip(&tweaks) {
            let x = u128::from_le_bytes(blk.try_into().unwrap()) ^ t;
            expect.extend_from_slice(&x.to_le_bytes());
        }
        let mut ours = plain.clone();
        XtsCipher::new(&key)
            .unwrap()
            .encrypt_sectors(lba, &mut ours);
        assert_eq!(
            to_hex(&ours),
            to_hex(&expect),
            "{klen}-byte key, lba {lba:#x}"
        );
        checked += 1;
    }
    assert_eq!(checked, 5);
}
