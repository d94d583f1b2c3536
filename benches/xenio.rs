//! The REAL tapdisk blkif request path, end to end, on the simulated Xen: a frontend (this
//! thread) fills the ring with requests on pre-granted guest pages, notifies, waits for the
//! response event and refills. Behind the ring: the tapdisk event loop (its own thread),
//! parsing, grant copy (simulated: memcpy between memfd-backed guest pages and private
//! buffers), the I/O worker pool and a RAM-disk image (one more memcpy), responses and
//! notifications. Next to it: a plain memcpy of the same bytes per request, in this thread.
//!
//! `cargo bench --bench xenio` (about 1 s per side and case, in 3 alternating slices;
//! `XENIO_BENCH_SECS=3` for longer, `XENIO_BENCH_CASE="44 KiB write Pool"` for one row;
//! `XENIO_BENCH_STATS=1` prints the VBD's stats JSON after each run). Each case runs twice:
//! the requests walking the whole 256 MiB image (its side of every copy misses the caches)
//! and walking only 32 requests' worth, the footprint of the memcpy side's pool.
//! Reported: M requests/s, GB/s of guest data, and ring ÷ memcpy.

use std::hint::black_box;
use std::os::fd::AsFd;
use std::sync::mpsc::channel;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blktap3::blkif::request::encode_indirect_segments;
use blktap3::blkif::{op, Abi, FrontRing, Segment, WireRequest};
use blktap3::control::msg::{Blkif, BlkifProto, OpenRequest, Reply, Request};
use blktap3::image::{Image, ImageError};
use blktap3::tapdisk::daemon::{Config, ImageOpener, OpenSpec};
use blktap3::tapdisk::mem::MemImage;
use blktap3::tapdisk::{SimXenOpener, Tapdisk};
use blktap3::xen::sim::{SimDomain, SimXen};
use blktap3::xen::{DomId, EventChannel};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

const BE: DomId = DomId(0);
const FE: DomId = DomId(1);
const DISK_SECTORS: u64 = 256 << 11; // 256 MiB
const PAGE: usize = 4096;
/// Alternating slices of each side per case.
const REPS: u32 = 3;

#[derive(Debug)]
struct MemOpener;

impl ImageOpener for MemOpener {
    fn open(&self, _spec: &OpenSpec) -> Result<Arc<dyn Image>, ImageError> {
        // Touch every page once, as a disk that was ever written: a fresh allocation would
        // make the first write of each page a page fault (and reads of it the zero page).
        let img = MemImage::new(DISK_SECTORS, false);
        let chunk = vec![0u8; 1 << 20];
        let per = (chunk.len() / 512) as u64;
        for s in (0..DISK_SECTORS).step_by(per as usize) {
            img.write(s, &chunk)?;
        }
        Ok(Arc::new(img))
    }
}

/// How much of the memory image the requests walk through.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Span {
    /// The whole 256 MiB: the image side of every copy misses the caches (a disk-sized
    /// working set), while the memcpy side stays in them.
    Disk,
    /// As many requests as the memcpy side's pool (QD32): both sides copy within the same
    /// footprint, so the ratio is the path's cost against memcpy's, not DRAM against cache.
    Pool,
}

struct Case {
    name: &'static str,
    pages: usize,
    write: bool,
}

fn run_ring(case: &Case, order: u32, span: Span, dur: Duration) -> (u64, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let xen = SimXen::new();
    let mut cfg = Config::new(dir.path());
    cfg.lock_markers = false;
    cfg.io_threads = 2;
    cfg.opener = Arc::new(MemOpener);
    cfg.xen = Arc::new(SimXenOpener {
        xen: xen.clone(),
        dom: BE,
    });
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        let mut td = Tapdisk::new(cfg).unwrap();
        td.keep_running_when_empty();
        tx.send(td.handle()).unwrap();
        td.run().unwrap();
    });
    let h = rx.recv().unwrap();
    assert_eq!(h.call(Request::Attach { minor: 0 }), Reply::Attach);
    assert!(matches!(
        h.call(Request::Open(OpenRequest::new(0, "aio:/mem"))),
        Reply::Open(_)
    ));

    let abi = Abi::X86_64;
    let entries = abi.ring_entries(order).unwrap() as usize;
    // QD32 on every case: the depth of the memcpy side's buffer pool.
    let depth = entries.min(32);
    let indirect = case.pages > 11;
    let per_slot = case.pages + usize::from(indirect);
    let npages = (1 << order) + depth * per_slot;
    let dom = xen.create_domain(FE, npages).unwrap();
    let mut ring_refs = [0u32; 16];
    let first = dom.alloc_page().unwrap();
    ring_refs[0] = dom.grant(first, BE, false).0;
    for r in ring_refs.iter_mut().take(1 << order).skip(1) {
        let p = dom.alloc_page().unwrap();
        *r = dom.grant(p, BE, false).0;
    }
    assert_eq!(first, 0);
    let mut front = FrontRing::init(dom.mem(), abi, order, 0).unwrap();
    let evt = xen.evtchn(FE).unwrap();
    let port = evt.alloc_unbound(BE).unwrap();
    let blkif = Blkif {
        domid: u32::from(FE.0),
        devid: 51712,
        gref: ring_refs,
        order,
        proto: BlkifProto::X86_64,
        pool: String::new(),
        port: port.0,
        poll_duration: 0,
        poll_idle_threshold: 0,
        queue: 0,
    };
    assert_eq!(
        h.call(Request::XenblkifConnect { minor: 0, blkif }),
        Reply::XenblkifConnect
    );
    // Pages per slot, granted once (writable: reads write into them).
    let mut slots: Vec<(Vec<Segment>, Option<u32>)> = Vec::new();
    for _ in 0..depth {
        let segs: Vec<Segment> = (0..case.pages)
            .map(|_| {
                let p = dom.alloc_page().unwrap();
                dom.mem().write_at(SimDomain::page_offset(p), &[0x5a; PAGE]);
                Segment {
                    gref: dom.grant(p, BE, false).0,
                    first_sect: 0,
                    last_sect: 7,
                }
            })
            .collect();
        let ind = indirect.then(|| {
            let p = dom.alloc_page().unwrap();
            let mut b = vec![0u8; PAGE];
            encode_indirect_segments(&segs, &mut b);
            dom.mem().write_at(SimDomain::page_offset(p), &b);
            dom.grant(p, BE, true).0
        });
        slots.push((segs, ind));
    }
    let opc = if case.write { op::WRITE } else { op::READ };
    let sectors_per_req = (case.pages * 8) as u64;
    // The image range the requests walk through, sequentially and wrapping.
    let walk = match span {
        Span::Disk => DISK_SECTORS - sectors_per_req,
        Span::Pool => depth as u64 * sectors_per_req,
    };
    let mut next_sector = 0u64;
    let mut free: Vec<usize> = (0..depth).collect();
    let mut done = 0u64;
    let start = Instant::now();
    loop {
        while let Some(s) = free.pop() {
            let (segs, ind) = &slots[s];
            let sector = next_sector;
            next_sector = (next_sector + sectors_per_req) % walk;
            let r = match ind {
                None => WireRequest::Direct {
                    op: opc,
                    nr_segments: segs.len() as u8,
                    handle: 0,
                    id: s as u64,
                    sector,
                    segments: segs,
                },
                Some(g) => WireRequest::Indirect {
                    indirect_op: opc,
                    nr_segments: segs.len() as u16,
                    handle: 0,
                    id: s as u64,
                    sector,
                    grefs: std::slice::from_ref(g),
                },
            };
            front.push_request(&r).unwrap();
        }
        if front.push_requests_and_check_notify() {
            evt.notify(port).unwrap();
        }
        if start.elapsed() >= dur {
            break;
        }
        loop {
            while let Some(rsp) = front.take_response().unwrap() {
                assert_eq!(rsp.status, 0);
                free.push(rsp.id as usize);
                done += 1;
            }
            if !free.is_empty() || front.final_check_for_responses().unwrap() {
                if free.is_empty() {
                    continue;
                }
                break;
            }
            let mut fds = [PollFd::new(evt.as_fd(), PollFlags::POLLIN)];
            let _ = poll(&mut fds, PollTimeout::from(1000u16));
            while let Some(p) = evt.pending().unwrap() {
                evt.unmask(p).unwrap();
            }
        }
    }
    let el = start.elapsed();
    if std::env::var_os("XENIO_BENCH_STATS").is_some() {
        if let Reply::Stats(j) = h.call(Request::Stats { minor: Some(0) }) {
            eprintln!("{}", String::from_utf8_lossy(&j));
        }
    }
    (done, el)
}

fn run_memcpy(case: &Case, dur: Duration) -> (u64, Duration) {
    // The same bytes per request over a pool of the same depth (32 buffers); the direction
    // does not matter for a plain copy.
    let len = case.pages * PAGE;
    let pool = 32;
    let src = vec![0x5au8; len * pool];
    let mut dst = vec![0u8; len * pool];
    let mut n = 0u64;
    let start = Instant::now();
    while start.elapsed() < dur {
        for (s, d) in src.chunks(len).zip(dst.chunks_mut(len)) {
            d.copy_from_slice(s);
            black_box(&*d);
            n += 1;
        }
    }
    (n, start.elapsed())
}

fn main() {
    let secs: f64 = std::env::var("XENIO_BENCH_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1.0);
    let dur = Duration::from_secs_f64(secs);
    let cases = [
        Case {
            name: "4 KiB",
            pages: 1,
            write: true,
        },
        Case {
            name: "4 KiB",
            pages: 1,
            write: false,
        },
        Case {
            name: "44 KiB",
            pages: 11,
            write: true,
        },
        Case {
            name: "44 KiB",
            pages: 11,
            write: false,
        },
        Case {
            name: "1 MiB indirect",
            pages: 256,
            write: true,
        },
        Case {
            name: "1 MiB indirect",
            pages: 256,
            write: false,
        },
    ];
    println!("| request | dir | ring order | image span | tapdisk path M req/s | GB/s | memcpy M req/s | GB/s | ratio |");
    println!("|---|---|---|---|---|---|---|---|---|");
    let only = std::env::var("XENIO_BENCH_CASE").unwrap_or_default();
    let runs = cases
        .iter()
        .flat_map(|c| [(c, Span::Disk), (c, Span::Pool)])
        .filter(|(c, span)| {
            let label = format!(
                "{} {} {:?}",
                c.name,
                if c.write { "write" } else { "read" },
                span
            );
            label.contains(only.as_str())
        });
    for (c, span) in runs {
        let order = if c.pages > 11 { 0 } else { 2 };
        // Alternate the two, REPS slices each, so both see the same machine load.
        let slice = dur / REPS;
        let (mut n, mut el, mut m, mut mel) = (0, Duration::ZERO, 0, Duration::ZERO);
        for _ in 0..REPS {
            let (a, b) = run_ring(c, order, span, slice);
            let (x, y) = run_memcpy(c, slice);
            (n, el, m, mel) = (n + a, el + b, m + x, mel + y);
        }
        let bytes = (c.pages * PAGE) as f64;
        let rps = n as f64 / el.as_secs_f64();
        let mps = m as f64 / mel.as_secs_f64();
        println!(
            "| {} | {} | {} | {} | {:.3} | {:.2} | {:.3} | {:.2} | {:.3} |",
            c.name,
            if c.write { "write" } else { "read" },
            order,
            match span {
                Span::Disk => "256 MiB",
                Span::Pool => "32 requests",
            },
            rps / 1e6,
            rps * bytes / 1e9,
            mps / 1e6,
            mps * bytes / 1e9,
            rps / mps
        );
    }
}
