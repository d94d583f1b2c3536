//! VHD engine throughput next to the same I/O on a raw file, as a ratio.
//!
//! `cargo bench --bench vhd` (default run well under a minute). Environment:
//! `VHD_BENCH_MIB` (working set, default 256), `VHD_BENCH_OPS` (4 KiB ops, default 20000),
//! `VHD_BENCH_DIR` (where the files go, default a temp dir under /var/tmp).
//! All I/O goes through the page cache (no O_DIRECT) for both, so the ratio measures the
//! engine's own overhead: block allocation, bitmap updates, metadata locking.

use std::sync::Arc;
use std::time::Instant;

use blktap3::image::chain::{open_vhd_chain, OpenOptions};
use blktap3::image::raw::RawImage;
use blktap3::image::vhd::ops::{create, CreateOptions};
use blktap3::image::Image;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Returns MiB/s for each of: seq write, seq read, rand write, rand read, 4-thread rand write.
fn run(img: Arc<dyn Image>, mib: u64, ops: u64) -> [f64; 5] {
    let bytes = mib << 20;
    let chunk = vec![0x5au8; 1 << 20];
    let mut out = [0f64; 5];
    let t = Instant::now();
    for i in 0..mib {
        img.write(i * 2048, &chunk).unwrap();
    }
    img.flush().unwrap();
    out[0] = mib as f64 / t.elapsed().as_secs_f64();
    let mut rbuf = vec![0u8; 1 << 20];
    let t = Instant::now();
    for i in 0..mib {
        img.read(i * 2048, &mut rbuf).unwrap();
    }
    out[1] = mib as f64 / t.elapsed().as_secs_f64();
    let small = vec![0xa5u8; 4096];
    let mut r = Rng(0x1234_5678_9abc_def1);
    let slots = bytes / 4096;
    let t = Instant::now();
    for _ in 0..ops {
        img.write((r.next() % slots) * 8, &small).unwrap();
    }
    img.flush().unwrap();
    out[2] = (ops * 4096) as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64();
    let mut sbuf = vec![0u8; 4096];
    let t = Instant::now();
    for _ in 0..ops {
        img.read((r.next() % slots) * 8, &mut sbuf).unwrap();
    }
    out[3] = (ops * 4096) as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    std::thread::scope(|s| {
        for th in 0..4u64 {
            let img = img.clone();
            let small = small.clone();
            s.spawn(move || {
                let mut r = Rng(0x9e37_79b9_7f4a_7c15 ^ th);
                for _ in 0..ops / 4 {
                    img.write((r.next() % slots) * 8, &small).unwrap();
                }
            });
        }
    });
    img.flush().unwrap();
    out[4] = (ops * 4096) as f64 / (1 << 20) as f64 / t.elapsed().as_secs_f64();
    out
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` would pass other flags: run anyway.
    let mib = env("VHD_BENCH_MIB", 256);
    let ops = env("VHD_BENCH_OPS", 20000);
    let base = std::env::var("VHD_BENCH_DIR").unwrap_or_else(|_| "/var/tmp".into());
    let dir = tempfile::tempdir_in(&base).unwrap();
    // Two rounds, alternating raw and VHD on fresh files; the best of each is kept so that
    // background writeback from one run penalises neither side systematically.
    let mut r = [0f64; 5];
    let mut v = [0f64; 5];
    for round in 0..2 {
        let raw_p = dir.path().join(format!("raw{round}.img"));
        std::fs::File::create(&raw_p)
            .unwrap()
            .set_len(mib << 20)
            .unwrap();
        let vhd_p = dir.path().join(format!("d{round}.vhd"));
        create(&vhd_p, &CreateOptions::dynamic(mib << 20)).unwrap();
        let raw: Arc<dyn Image> = Arc::new(RawImage::open(&raw_p, false).unwrap());
        let vhd: Arc<dyn Image> = Arc::new(
            open_vhd_chain(
                &vhd_p,
                &OpenOptions {
                    read_only: false,
                    ..Default::default()
                },
            )
            .unwrap(),
        );
        let (a, b) = if round == 0 {
            let a = run(raw.clone(), mib, ops);
            (a, run(vhd.clone(), mib, ops))
        } else {
            let b = run(vhd.clone(), mib, ops);
            (run(raw.clone(), mib, ops), b)
        };
        for i in 0..5 {
            r[i] = r[i].max(a[i]);
            v[i] = v[i].max(b[i]);
        }
        vhd.close().unwrap();
        raw.close().unwrap();
        std::fs::remove_file(&raw_p).unwrap();
        std::fs::remove_file(&vhd_p).unwrap();
    }
    let names = [
        "seq write 1M (alloc)",
        "seq read 1M",
        "rand write 4K",
        "rand read 4K",
        "rand write 4K x4 thr",
    ];
    println!("VHD engine vs raw file ({mib} MiB working set, {ops} 4 KiB ops, page cache)");
    println!(
        "{:<22} {:>10} {:>10} {:>7}",
        "test", "raw MiB/s", "vhd MiB/s", "vhd/raw"
    );
    for i in 0..5 {
        println!(
            "{:<22} {:>10.1} {:>10.1} {:>7.2}",
            names[i],
            r[i],
            v[i],
            v[i] / r[i]
        );
    }
}
