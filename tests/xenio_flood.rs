//! A guest flooding its ring against the real tapdisk request path (simulated Xen), while
//! another guest's VBD in the same tapdisk keeps doing verified I/O.
//!
//! The flooding guest (domain 8, ring order 4 = 512 slots, x86_64) keeps its ring full all
//! the time: every free slot gets an indirect request of 256 segments (1 MiB, reads and
//! writes), ids are re-used while the earlier request with the same id is still in flight,
//! and it notifies tapdisk on every pass whether or not tapdisk asked. Uncapped, one such ring
//! would have 512 MiB of private buffers in flight.
//!
//! The other guest (domain 7) writes random data, flushes and reads it back, first alone
//! and then during the flood. Checked: every one of its requests succeeds with the right
//! data, the disk holds exactly what it wrote, every flooding request gets a response, and
//! the process's resident memory (this test binary, which is the tapdisk) grows by less
//! than [`RSS_GROWTH_BOUND_MIB`] over the whole run. Printed: the good guest's round latency
//! alone and under the flood, its share of the bytes served, and the peak RSS.
//!
//! `scripts/hostile-xen.sh` runs it with `--nocapture` for the figures.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use blktap3::blkif::request::{encode_indirect_segments, Segment, WireRequest};
use blktap3::blkif::{op, Abi};
use blktap3::control::msg::{Reply, Request};
use blktap3::xen::sim::SimDomain;
use blktap3::xen::xenstore::{Tx, XenStore};
use blktap3::xen::{EventChannel, Port};
use common::tapback_bin::status_kib;
use common::xenio::*;

const GOOD_DISK: usize = 8 << 20;
const FLOOD_DISK: u64 = 64 << 20;
const SEGS: usize = 256;

/// tapdisk holds at most `MAX_RING_BYTES` (32 MiB) of private buffers in flight per ring
/// and keeps at most as much again in its buffer pool for re-use: 64 MiB. Another 32 MiB
/// for the I/O threads' stacks, allocator slack and the page tables of the simulated guest
/// memory the flood touches. An uncapped ring (512 slots of 1 MiB) would exceed it.
const RSS_GROWTH_BOUND_MIB: u64 = 96;

fn rss_kib() -> u64 {
    status_kib(std::process::id() as i32, "VmRSS:").unwrap_or(0)
}

/// One verified round of the good guest: write `len` random bytes, flush, read them back.
fn good_round(
    front: &mut blktap3::xen::sim::SimBlkfront<blktap3::xen::sim::MemXsConn>,
    model: &mut [u8],
    rng: &mut Rng,
) -> Duration {
    let len = 64 << 10;
    let sectors = (model.len() - len) as u64 / 512;
    let sector = rng.below(sectors / 8) * 8;
    let off = sector as usize * 512;
    let mut data = vec![0u8; len];
    rng.fill(&mut data);
    let start = Instant::now();
    front.submit_write(sector, &data).unwrap();
    front.kick().unwrap();
    let c = wait(front, 1);
    assert_eq!(c[0].status, 0, "write failed: {c:?}");
    model[off..off + len].copy_from_slice(&data);
    front.submit_sync(op::FLUSH_DISKCACHE, 0, &[]).unwrap();
    front.kick().unwrap();
    let c = wait(front, 1);
    assert_eq!(c[0].status, 0, "flush failed: {c:?}");
    front.submit_read(sector, (len / 512) as u32).unwrap();
    front.kick().unwrap();
    let c = wait(front, 1);
    assert_eq!(c[0].status, 0, "read failed");
    assert!(
        c[0].data.as_deref() == Some(&model[off..off + len]),
        "read back wrong data at sector {sector}"
    );
    start.elapsed()
}

struct FloodCounts {
    sent: AtomicU64,
    done: AtomicU64,
    bad: AtomicU64,
    notifies: AtomicU64,
}

#[test]
fn flooding_guest_does_not_starve_or_bloat() {
    let rig = Rig::start();
    let good_path = rig.path("good.img");
    let mut model = make_raw(&good_path, GOOD_DISK, 11);
    let flood_path = rig.path("flood.img");
    std::fs::File::create(&flood_path)
        .unwrap()
        .set_len(FLOOD_DISK)
        .unwrap();
    rig.open(0, &format!("aio:{}", good_path.display()), None);
    rig.open(1, &format!("aio:{}", flood_path.display()), None);
    let mut good = rig.frontend(7, 51712, 0, Some(Abi::X86_64), 4);
    let mut flood = rig.frontend(8, 51712, 1, Some(Abi::X86_64), 4);

    // The flooding guest's 256 data pages (writable grants) and one indirect page
    // describing them, shared by every request.
    let dom = Arc::clone(flood.domain());
    let mut segs = Vec::with_capacity(SEGS);
    for _ in 0..SEGS {
        let p = dom.alloc_page().unwrap();
        segs.push(Segment {
            gref: dom.grant(p, BE, false).0,
            first_sect: 0,
            last_sect: 7,
        });
    }
    let ip = dom.alloc_page().unwrap();
    let mut page = vec![0u8; 4096];
    encode_indirect_segments(&segs, &mut page);
    dom.mem().write_at(SimDomain::page_offset(ip), &page);
    let ind = dom.grant(ip, BE, true).0;
    let fpath = flood
        .xs()
        .read_string(Tx::NONE, &format!("{}/frontend", flood.backend_path()))
        .unwrap()
        .unwrap();
    let port = Port(
        flood
            .xs()
            .read_string(Tx::NONE, &format!("{fpath}/event-channel"))
            .unwrap()
            .unwrap()
            .parse()
            .unwrap(),
    );
    let entries = flood.ring().unwrap().entries();
    assert_eq!(entries, 512);

    // The good guest alone.
    let mut rng = Rng(5);
    let rounds = 40;
    // Under the flood a debug build takes seconds per round (the flood's grant copies and
    // checksums run unoptimised); a release build does all 40 in a few seconds.
    let flood_rounds = if cfg!(debug_assertions) { 5 } else { rounds };
    let mut alone = Vec::new();
    for _ in 0..rounds {
        alone.push(good_round(&mut good, &mut model, &mut rng));
    }
    let base_rss = rss_kib();
    let peak_rss = Arc::new(AtomicU64::new(base_rss));
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, stop) = (Arc::clone(&peak_rss), Arc::clone(&stop));
        thread::spawn(move || {
            while !stop.load(Ordering::Acquire) {
                peak.fetch_max(rss_kib(), Ordering::Relaxed);
                thread::sleep(Duration::from_millis(5));
            }
        })
    };

    let counts = Arc::new(FloodCounts {
        sent: AtomicU64::new(0),
        done: AtomicU64::new(0),
        bad: AtomicU64::new(0),
        notifies: AtomicU64::new(0),
    });
    let flooder = {
        let (stop, counts) = (Arc::clone(&stop), Arc::clone(&counts));
        thread::spawn(move || {
            let mut rng = Rng(99);
            let mut slot = vec![0u8; Abi::X86_64.request_size()];
            let sectors = FLOOD_DISK / 512 - (SEGS as u64 * 8);
            let mut id = 0u64;
            let mut sent = 0u64;
            let mut done = 0u64;
            let mut full_passes = 0u64;
            while !stop.load(Ordering::Acquire) {
                let free = flood.ring().unwrap().free_requests();
                if free == 0 {
                    full_passes += 1;
                }
                for _ in 0..free {
                    // Ids cycle through 8 values: most are still in flight when re-used.
                    id = (id + 1) % 8;
                    let opc = if rng.below(2) == 0 {
                        op::READ
                    } else {
                        op::WRITE
                    };
                    WireRequest::Indirect {
                        indirect_op: opc,
                        nr_segments: SEGS as u16,
                        handle: 0,
                        id,
                        sector: rng.below(sectors / 8) * 8,
                        grefs: &[ind],
                    }
                    .encode(Abi::X86_64, &mut slot);
                    flood.submit_raw(id, &slot).unwrap();
                    sent += 1;
                }
                flood.kick().unwrap();
                // Notify whether or not tapdisk asked for it.
                flood.evtchn().notify(port).unwrap();
                counts.notifies.fetch_add(1, Ordering::Relaxed);
                for c in flood.poll_completions().unwrap() {
                    done += 1;
                    if c.status != 0 {
                        counts.bad.fetch_add(1, Ordering::Relaxed);
                    }
                }
                while let Some(p) = flood.evtchn().pending().unwrap() {
                    flood.evtchn().unmask(p).unwrap();
                }
                counts.sent.store(sent, Ordering::Relaxed);
                counts.done.store(done, Ordering::Relaxed);
            }
            // Every request gets its response.
            let rest = (sent - done) as usize;
            let got = flood
                .wait_completions(rest, Duration::from_secs(60))
                .unwrap();
            for c in &got {
                if c.status != 0 {
                    counts.bad.fetch_add(1, Ordering::Relaxed);
                }
            }
            counts
                .done
                .store(done + got.len() as u64, Ordering::Relaxed);
            assert!(full_passes > 0, "the ring was never full");
            flood
        })
    };

    // Wait for the flood to fill the ring, then the good guest works through it.
    until("flood running", || {
        counts.sent.load(Ordering::Relaxed) >= 2 * entries as u64
    });
    let flood_start = counts.done.load(Ordering::Relaxed);
    let t0 = Instant::now();
    let mut under = Vec::new();
    for _ in 0..flood_rounds {
        under.push(good_round(&mut good, &mut model, &mut rng));
    }
    let window = t0.elapsed();
    let flood_in_window = counts.done.load(Ordering::Relaxed) - flood_start;
    stop.store(true, Ordering::Release);
    let flood = flooder.join().unwrap();
    sampler.join().unwrap();
    let peak = peak_rss.load(Ordering::Relaxed).max(rss_kib());

    let sent = counts.sent.load(Ordering::Relaxed);
    assert_eq!(
        counts.bad.load(Ordering::Relaxed),
        0,
        "flood requests failed"
    );
    assert!(counts.done.load(Ordering::Relaxed) >= sent);

    // tapdisk is still serving both, and the good disk holds exactly what was written.
    let _ = good_round(&mut good, &mut model, &mut rng);
    for (domid, minor) in [(7, 0), (8, 1)] {
        assert_eq!(
            rig.call(Request::XenblkifDisconnect {
                domid,
                devid: 51712
            }),
            Reply::XenblkifDisconnect
        );
        assert_eq!(rig.call(Request::Close { minor }), Reply::Close);
    }
    drop(flood);
    assert!(
        std::fs::read(&good_path).unwrap() == model,
        "good disk differs from its model"
    );

    let ms = |v: &[Duration]| {
        let mut v: Vec<u128> = v.iter().map(|d| d.as_micros()).collect();
        v.sort_unstable();
        (
            v[v.len() / 2] as f64 / 1000.0,
            v[v.len() - 1] as f64 / 1000.0,
        )
    };
    let (a50, amax) = ms(&alone);
    let (u50, umax) = ms(&under);
    let good_bytes = flood_rounds as u64 * 2 * (64 << 10);
    let flood_bytes = flood_in_window * (SEGS as u64 * 4096);
    let share = good_bytes as f64 * 100.0 / (good_bytes + flood_bytes) as f64;
    let growth = peak.saturating_sub(base_rss);
    eprintln!(
        "good guest round (64 KiB write + flush + read, verified): alone median {a50:.1} ms \
         max {amax:.1} ms; under flood median {u50:.1} ms max {umax:.1} ms; flood served \
         {flood_in_window} x 1 MiB in the same {window:?} (good guest's byte share {share:.2} %); \
         flood sent {sent} requests, {} notifies; RSS {} -> peak {} MiB (+{} MiB)",
        counts.notifies.load(Ordering::Relaxed),
        base_rss / 1024,
        peak / 1024,
        growth / 1024
    );
    eprintln!(
        "HOSTILE-XEN|tapdisk: guest flooding its ring (512 slots x 1 MiB indirect, ids re-used \
         in flight, constant notifies)|1 guest, {sent} requests|{rounds} + {flood_rounds} verified \
         write+flush+read rounds (alone + under flood) all correct; round median {a50:.1} ms alone, {u50:.1} ms under flood (max \
         {umax:.1} ms)|{:.1} (+{:.1})|0",
        peak as f64 / 1024.0,
        growth as f64 / 1024.0
    );
    assert!(
        growth < RSS_GROWTH_BOUND_MIB * 1024,
        "RSS grew by {growth} KiB"
    );
}
