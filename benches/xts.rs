//! XTS throughput benchmark (harness = false).
//!
//! Prints MB/s (10^6 bytes per second) for XTS-AES-128 (32-byte key) and XTS-AES-256
//! (64-byte key), encrypt and decrypt, in place, for 512-byte single-sector calls,
//! 4 KiB requests (8 sectors), 64 KiB requests (128 sectors) and 1 MiB requests (2048
//! sectors), with blktap's 32-bit "plain" tweak. Requests walk a buffer of 256 KiB (or one
//! request, if larger) at consecutive LBAs; it stays in L2 like `openssl speed`'s re-used
//! buffer.
//!
//! Before timing it runs a known-answer check (OpenXT vector A/B sector 0, IEEE 1619
//! vector 10) and a cross-check against xts-mode; it exits non-zero on a mismatch.
//!
//! Output lines (parsed by scripts/bench-xts.sh):
//!   `result <aes-128-xts|aes-256-xts> <enc|dec> <bytes> <MB/s>`
//!
//! Options: `--seconds S` (per measurement, default 0.6), `--reps N` (median of N,
//! default 3). Cargo passes `--bench`, which is ignored.

use std::hint::black_box;
use std::time::{Duration, Instant};

use aes::cipher::KeyInit;
use blktap3::image::crypto::{parse_hex_vec, to_hex, XtsCipher};
use sha2::{Digest, Sha256};

/// Smallest buffer the requests walk.
const BUF: usize = 256 * 1024;
/// Request sizes measured, in bytes.
const SIZES: [usize; 4] = [512, 4096, 65536, 1 << 20];

fn self_check() -> Result<(), String> {
    let k64: Vec<u8> = (0u8..64).collect();
    let k32: Vec<u8> = (0u8..32).collect();
    let checks = [
        (
            &k64,
            "9943ddf45f593dcb9bcd2e3043ea706a3a7f0d35bfca0ddcfa7c0803e588601a",
        ),
        (
            &k32,
            "a27916ef0ecf96010e1fcc453238d4a06d3d9b24abaf14a4fe41f8d18528b06f",
        ),
    ];
    for (key, want) in checks {
        let c = XtsCipher::new(key).map_err(|e| e.to_string())?;
        let mut s = [0u8; 512];
        c.encrypt_sectors(0, &mut s);
        let got = to_hex(&Sha256::digest(s));
        if got != want {
            return Err(format!(
                "openxt vector ({} bits): {got} != {want}",
                key.len() * 8
            ));
        }
    }
    // IEEE 1619 vector 10 (XTS-AES-256, data unit 0xff) through the plain wrapper.
    let key = parse_hex_vec("27182818284590452353602874713526624977572470936999595749669676273141592653589793238462643383279502884197169399375105820974944592").map_err(|e| e.to_string())?;
    let c = XtsCipher::new(&key).map_err(|e| e.to_string())?;
    let mut s: Vec<u8> = (0..512).map(|i| i as u8).collect();
    c.encrypt_sectors(0xff, &mut s);
    if to_hex(&Sha256::digest(&s))
        != "e97e974fa393af794f7a4684395814cf820de60a01eaec677d87b452e316b364"
    {
        return Err("ieee 1619 vector 10 mismatch".into());
    }
    // Cross-check against xts-mode on a 64 KiB request for both key sizes.
    let mut seed = 0x1234_5678_9abc_def0u64;
    let mut rnd = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed as u8
    };
    for klen in [32usize, 64] {
        let key: Vec<u8> = (0..klen).map(|_| rnd()).collect();
        let data: Vec<u8> = (0..65536).map(|_| rnd()).collect();
        let lba = 0xffff_ff00u64;
        let mut ours = data.clone();
        XtsCipher::new(&key)
            .map_err(|e| e.to_string())?
            .encrypt_sectors(lba, &mut ours);
        let mut theirs = data.clone();
        let tw = |i: u128| aes::Block::from(((lba as u128 + i) as u32 as u128).to_le_bytes());
        if klen == 32 {
            let x = xts_mode::Xts128::new(
                aes::Aes128::new_from_slice(&key[..16]).map_err(|e| e.to_string())?,
                aes::Aes128::new_from_slice(&key[16..]).map_err(|e| e.to_string())?,
            );
            x.encrypt_area(&mut theirs, 512, 0, tw);
        } else {
            let x = xts_mode::Xts128::new(
                aes::Aes256::new_from_slice(&key[..32]).map_err(|e| e.to_string())?,
                aes::Aes256::new_from_slice(&key[32..]).map_err(|e| e.to_string())?,
            );
            x.encrypt_area(&mut theirs, 512, 0, tw);
        }
        if ours != theirs {
            return Err(format!("xts-mode cross-check failed ({} bits)", klen * 8));
        }
    }
    Ok(())
}

/// CPU time of this thread, in seconds. `openssl speed` divides by CPU user time too
/// (unless `-elapsed`), so both sides of the ratio ignore time the shared machine gives
/// to other processes.
fn cpu_now() -> f64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID) {
        Ok(ts) => ts.tv_sec() as f64 + ts.tv_nsec() as f64 * 1e-9,
        Err(_) => 0.0,
    }
}

fn measure(c: &XtsCipher, buf: &mut [u8], req: usize, enc: bool, secs: f64) -> f64 {
    let per_pass = buf.len() / req;
    let mut bytes = 0u64;
    let mut lba = 0u64;
    let start = Instant::now();
    let cpu0 = cpu_now();
    let limit = Duration::from_secs_f64(secs);
    loop {
        for chunk in buf.chunks_exact_mut(req) {
            if enc {
                c.encrypt_sectors(lba, black_box(chunk));
            } else {
                c.decrypt_sectors(lba, black_box(chunk));
            }
            lba = lba.wrapping_add((req / 512) as u64);
        }
        bytes += (per_pass * req) as u64;
        if start.elapsed() >= limit {
            break;
        }
    }
    let cpu = cpu_now() - cpu0;
    let t = if cpu > 0.0 {
        cpu
    } else {
        start.elapsed().as_secs_f64()
    };
    bytes as f64 / t / 1e6
}

/// Diagnostic: plain AES-ECB over the same buffer (no tweaks), 4 KiB per call.
fn ecb_ceiling(buf: &mut [u8], secs: f64) {
    use aes::cipher::BlockCipherEncrypt;
    let k = aes::Aes256::new(&aes::cipher::Array::from([7u8; 32]));
    let (blocks, _) = aes::cipher::Array::<u8, aes::cipher::consts::U16>::slice_as_chunks_mut(buf);
    for per in [32usize, 64, 256] {
        let start = Instant::now();
        let cpu0 = cpu_now();
        let mut bytes = 0u64;
        while start.elapsed().as_secs_f64() < secs {
            for c in blocks.chunks_exact_mut(per) {
                k.encrypt_blocks(black_box(c));
            }
            bytes += (blocks.len() * 16) as u64;
        }
        let cpu = cpu_now() - cpu0;
        println!(
            "ecb aes-256 {} blocks/call {:.0} MB/s",
            per,
            bytes as f64 / cpu / 1e6
        );
    }
}

fn main() {
    let mut secs = 0.6f64;
    let mut reps = 3usize;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        match args[i].as_str() {
            "--seconds" => {
                secs = args.get(i + 1).and_then(|v| v.parse().ok()).unwrap_or(secs);
                i += 1;
            }
            "--reps" => {
                reps = args.get(i + 1).and_then(|v| v.parse().ok()).unwrap_or(reps);
                i += 1;
            }
            _ => {}
        }
        i += 1;
    }
    if let Err(e) = self_check() {
        eprintln!("xts bench: self-check failed: {e}");
        std::process::exit(1);
    }
    println!("self-check ok (openxt vectors A/B, ieee 1619 vector 10, xts-mode cross-check)");
    println!(
        "aes hardware acceleration: {}",
        if aes::hardware_accelerated() {
            "yes"
        } else {
            "no"
        }
    );
    let mut buf: Vec<u8> = (0..BUF.max(SIZES[SIZES.len() - 1]))
        .map(|i| (i * 31 + 7) as u8)
        .collect();
    if std::env::var_os("XTS_BENCH_ECB").is_some() {
        ecb_ceiling(&mut buf[..BUF], secs);
    }
    for (name, klen) in [("aes-128-xts", 32usize), ("aes-256-xts", 64)] {
        let key: Vec<u8> = (0..klen).map(|i| (i * 13 + 1) as u8).collect();
        let c = XtsCipher::new(&key).expect("valid key length");
        for req in SIZES {
            let walk = &mut buf[..BUF.max(req)];
            for enc in [true, false] {
                measure(&c, walk, req, enc, 0.05); // warm up
                let mut v: Vec<f64> = (0..reps.max(1))
                    .map(|_| measure(&c, walk, req, enc, secs))
                    .collect();
                v.sort_by(|a, b| a.total_cmp(b));
                let med = v[v.len() / 2];
                println!(
                    "result {name} {} {req} {med:.0}",
                    if enc { "enc" } else { "dec" }
                );
            }
        }
    }
}
