//! Ring throughput: the real blkif ring + parse + response code with the simulated grant copy
//! (memcpy out of memfd-backed guest pages), next to a plain memcpy of the same bytes.
//!
//! `cargo bench --bench ring` (short default run). `RING_BENCH_SECS=2` for longer runs.
//! Each request is a WRITE: the backend copies the data out of the guest (the tapdisk write
//! path); 1 MiB requests are indirect (256 segments, one indirect page grant-copied first).

use std::hint::black_box;
use std::time::{Duration, Instant};

use blktap3::blkif::abi::{op, PAGE_SIZE};
use blktap3::blkif::request::encode_indirect_segments;
use blktap3::blkif::*;
use blktap3::tapdisk::xenio::segs::{indirect_copy_segs, request_copy_segs, BufLayout};
use blktap3::xen::sim::SimXen;
use blktap3::xen::*;

const BE: DomId = DomId(0);
const FE: DomId = DomId(1);
const DEPTH: usize = 32;

struct Case {
    name: &'static str,
    segs: usize,
}

fn run_ring(case: &Case, dur: Duration) -> (u64, u64, Duration) {
    let xen = SimXen::new();
    let indirect = case.segs > 11;
    let per_slot = case.segs + usize::from(indirect);
    let dom = xen.create_domain(FE, 1 + DEPTH * per_slot).unwrap();
    // Ring on page 0, granted and mapped by the backend like a real ring.
    let ring_page = dom.alloc_page().unwrap();
    assert_eq!(ring_page, 0);
    let ring_ref = dom.grant(ring_page, BE, false);
    let grants = xen.grants(BE);
    let mapping = grants.map(FE, &[ring_ref], true).unwrap();
    let mut front = FrontRing::init(dom.mem(), Abi::X86_64, 0, 0).unwrap();
    let mut back = BackRing::attach(mapping, Abi::X86_64, 0).unwrap();

    // Per slot: data pages (+ one indirect page), granted read-only once.
    let mut slots: Vec<(Vec<Segment>, Option<u32>)> = Vec::new();
    for _ in 0..DEPTH {
        let segs: Vec<Segment> = (0..case.segs)
            .map(|_| {
                let p = dom.alloc_page().unwrap();
                dom.mem().write_at(p * PAGE_SIZE, &[0x5a; PAGE_SIZE]);
                Segment {
                    gref: dom.grant(p, BE, true).0,
                    first_sect: 0,
                    last_sect: 7,
                }
            })
            .collect();
        let ind = indirect.then(|| {
            let p = dom.alloc_page().unwrap();
            let mut page = vec![0u8; PAGE_SIZE];
            encode_indirect_segments(&segs, &mut page);
            dom.mem().write_at(p * PAGE_SIZE, &page);
            dom.grant(p, BE, true).0
        });
        slots.push((segs, ind));
    }
    let cfg = ParseConfig::new(1 << 40);
    let bytes_per_req = (case.segs * PAGE_SIZE) as u64;
    let mut buf = vec![0u8; case.segs * PAGE_SIZE];
    let mut ipage = vec![0u8; PAGE_SIZE];
    let mut done = 0u64;
    let mut id = 0u64;
    let t0 = Instant::now();
    while t0.elapsed() < dur {
        for (segs, ind) in &slots {
            let req = match ind {
                Some(g) => WireRequest::Indirect {
                    indirect_op: op::WRITE,
                    nr_segments: segs.len() as u16,
                    handle: 0,
                    id,
                    sector: id * 8,
                    grefs: std::slice::from_ref(g),
                },
                None => WireRequest::Direct {
                    op: op::WRITE,
                    nr_segments: segs.len() as u8,
                    handle: 0,
                    id,
                    sector: id * 8,
                    segments: segs,
                },
            };
            front.push_request(&req).unwrap();
            id = (id + 1) % (1 << 20);
        }
        front.push_requests_and_check_notify();
        while let Some(item) = back.next_request(&cfg).unwrap() {
            let r = match item.unwrap() {
                Parsed::Ready(r) => r,
                Parsed::Indirect(h) => {
                    grants
                        .copy_from_guest(FE, &indirect_copy_segs(&h), &mut ipage)
                        .unwrap();
                    h.complete(&ipage, &cfg).unwrap()
                }
            };
            let cs = request_copy_segs(&r, BufLayout::Packed);
            grants.copy_from_guest(FE, &cs, &mut buf).unwrap();
            black_box(&buf);
            back.push_response(r.id, r.wire_op(), Status::Okay).unwrap();
        }
        back.push_responses_and_check_notify();
        while let Some(rsp) = front.take_response().unwrap() {
            assert_eq!(rsp.status, 0);
            done += 1;
        }
    }
    (done, done * bytes_per_req, t0.elapsed())
}

/// The same bytes with memcpy: from `DEPTH` distinct source buffers (the same working set as
/// the guest pages) into one destination buffer.
fn run_memcpy(bytes_per_req: usize, reqs: u64) -> Duration {
    let srcs: Vec<Vec<u8>> = (0..DEPTH).map(|_| vec![0x5au8; bytes_per_req]).collect();
    let mut dst = vec![0u8; bytes_per_req];
    let t0 = Instant::now();
    for i in 0..reqs {
        dst.copy_from_slice(black_box(&srcs[i as usize % DEPTH]));
        black_box(&mut dst);
    }
    t0.elapsed()
}

fn main() {
    let secs: f64 = std::env::var("RING_BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.5);
    let dur = Duration::from_secs_f64(secs);
    println!(
        "{:<24} {:>12} {:>10} {:>14} {:>8}",
        "case", "req/s", "GB/s", "memcpy GB/s", "ratio"
    );
    for case in [
        Case {
            name: "4 KiB direct",
            segs: 1,
        },
        Case {
            name: "44 KiB direct",
            segs: 11,
        },
        Case {
            name: "1 MiB indirect",
            segs: 256,
        },
    ] {
        let (reqs, bytes, el) = run_ring(&case, dur);
        let mc = run_memcpy(case.segs * PAGE_SIZE, reqs);
        let gbs = bytes as f64 / el.as_secs_f64() / 1e9;
        let mgbs = bytes as f64 / mc.as_secs_f64() / 1e9;
        println!(
            "{:<24} {:>12.0} {:>10.2} {:>14.2} {:>8.2}",
            case.name,
            reqs as f64 / el.as_secs_f64(),
            gbs,
            mgbs,
            gbs / mgbs
        );
    }
}
