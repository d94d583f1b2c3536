//! Request parsing: every validation rule, both ABIs, and random slot bytes (never panics,
//! every outcome is a well-formed Parsed/Rejected).

use blktap3::blkif::abi::{op, MAX_REQUEST_SIZE};
use blktap3::blkif::request::{encode_indirect_segments, INDIRECT_PAGE_DATA};
use blktap3::blkif::*;
use proptest::prelude::*;

const ABIS: [Abi; 2] = [Abi::X86_32, Abi::X86_64];

fn seg(gref: u32, first: u8, last: u8) -> Segment {
    Segment {
        gref,
        first_sect: first,
        last_sect: last,
    }
}

fn slot(abi: Abi, r: &WireRequest<'_>) -> Vec<u8> {
    let mut b = vec![0u8; MAX_REQUEST_SIZE];
    r.encode(abi, &mut b);
    b.truncate(abi.request_size());
    b
}

fn direct(op: u8, nr: u8, sector: u64, segs: &[Segment]) -> WireRequest<'_> {
    WireRequest::Direct {
        op,
        nr_segments: nr,
        handle: 7,
        id: 0xdead_beef_0000_0001,
        sector,
        segments: segs,
    }
}

fn parse(abi: Abi, r: &WireRequest<'_>, cfg: &ParseConfig) -> Result<Parsed, Rejected> {
    parse_request(abi, &slot(abi, r), cfg)
}

fn ready(p: Result<Parsed, Rejected>) -> Request {
    match p {
        Ok(Parsed::Ready(r)) => r,
        other => panic!("expected ready request, got {other:?}"),
    }
}

fn err(p: Result<Parsed, Rejected>) -> Rejected {
    match p {
        Err(e) => e,
        other => panic!("expected rejection, got {other:?}"),
    }
}

#[test]
fn read_with_eleven_segments_parses_in_both_abis() {
    let segs: Vec<Segment> = (0..11).map(|i| seg(100 + i, 0, 7)).collect();
    let cfg = ParseConfig::new(1 << 20);
    for abi in ABIS {
        let r = ready(parse(abi, &direct(op::READ, 11, 64, &segs), &cfg));
        assert_eq!(r.id, 0xdead_beef_0000_0001);
        assert_eq!(r.op, Operation::Read);
        assert_eq!(r.sector, 64);
        assert_eq!(r.handle, 7);
        assert_eq!(r.segments(), &segs[..]);
        assert_eq!(r.nr_sectors(), 88);
        assert_eq!(r.data_len(), 88 * 512);
        assert!(!r.indirect);
    }
}

#[test]
fn zero_or_twelve_segments_rejected_for_read_write() {
    let segs: Vec<Segment> = (0..11).map(|i| seg(i, 0, 7)).collect();
    let cfg = ParseConfig::new(1 << 20);
    for abi in ABIS {
        for (o, n) in [
            (op::READ, 0),
            (op::WRITE, 0),
            (op::READ, 12),
            (op::WRITE, 255),
        ] {
            let e = err(parse(abi, &direct(o, n, 0, &segs), &cfg));
            assert_eq!(
                e.error,
                RequestError::BadSegmentCount {
                    op: o,
                    count: u32::from(n)
                }
            );
            assert_eq!(e.status(), Status::Error);
            assert_eq!(e.op, o);
            assert_eq!(e.id, 0xdead_beef_0000_0001);
        }
    }
}

#[test]
fn barrier_and_flush_allow_zero_segments() {
    let cfg = ParseConfig::new(100);
    for abi in ABIS {
        let r = ready(parse(abi, &direct(op::WRITE_BARRIER, 0, 0, &[]), &cfg));
        assert_eq!(r.op, Operation::WriteBarrier);
        assert!(r.segments().is_empty());
        let r = ready(parse(abi, &direct(op::FLUSH_DISKCACHE, 0, 0, &[]), &cfg));
        assert_eq!(r.op, Operation::Flush);
        // With data they are writes.
        let r = ready(parse(
            abi,
            &direct(op::FLUSH_DISKCACHE, 1, 8, &[seg(1, 0, 7)]),
            &cfg,
        ));
        assert_eq!(r.nr_sectors(), 8);
    }
}

#[test]
fn segment_sector_rules() {
    let cfg = ParseConfig::new(1 << 20);
    for abi in ABIS {
        for (f, l) in [(3, 2), (0, 8), (8, 8), (7, 255)] {
            let segs = [seg(1, 0, 7), seg(2, f, l)];
            let e = err(parse(abi, &direct(op::WRITE, 2, 0, &segs), &cfg));
            assert_eq!(
                e.error,
                RequestError::BadSegment {
                    index: 1,
                    first: f,
                    last: l
                }
            );
        }
        let r = ready(parse(abi, &direct(op::WRITE, 1, 0, &[seg(1, 7, 7)]), &cfg));
        assert_eq!(r.segments()[0].page_offset(), 3584);
        assert_eq!(r.segments()[0].len(), 512);
    }
}

#[test]
fn disk_end_enforced_including_overflow() {
    let cfg = ParseConfig::new(100);
    for abi in ABIS {
        // 92 + 8 = 100: fits exactly.
        ready(parse(abi, &direct(op::READ, 1, 92, &[seg(1, 0, 7)]), &cfg));
        let e = err(parse(abi, &direct(op::READ, 1, 93, &[seg(1, 0, 7)]), &cfg));
        assert!(matches!(
            e.error,
            RequestError::OutOfRange {
                sector: 93,
                sectors: 8,
                disk_sectors: 100
            }
        ));
        let e = err(parse(
            abi,
            &direct(op::READ, 1, u64::MAX - 3, &[seg(1, 0, 7)]),
            &cfg,
        ));
        assert!(matches!(e.error, RequestError::OutOfRange { .. }));
        // A flush or barrier with data is range-checked like a write ...
        for o in [op::FLUSH_DISKCACHE, op::WRITE_BARRIER] {
            let e = err(parse(abi, &direct(o, 1, 93, &[seg(1, 0, 7)]), &cfg));
            assert!(matches!(e.error, RequestError::OutOfRange { .. }));
        }
        // ... one without data has no range: Linux blkfront's empty flush carries
        // sector_number u64::MAX (blk_rq_pos of a flush request is unset).
        for sector in [101, u64::MAX] {
            for o in [op::FLUSH_DISKCACHE, op::WRITE_BARRIER] {
                let r = ready(parse(abi, &direct(o, 0, sector, &[]), &cfg));
                assert_eq!(r.nr_sectors(), 0);
            }
        }
    }
}

#[test]
fn read_only_disk_rejects_writes_but_not_reads_or_empty_flush() {
    let mut cfg = ParseConfig::new(100);
    cfg.read_only = true;
    for abi in ABIS {
        ready(parse(abi, &direct(op::READ, 1, 0, &[seg(1, 0, 7)]), &cfg));
        ready(parse(abi, &direct(op::FLUSH_DISKCACHE, 0, 0, &[]), &cfg));
        for o in [op::WRITE, op::WRITE_BARRIER, op::FLUSH_DISKCACHE] {
            let e = err(parse(abi, &direct(o, 1, 0, &[seg(1, 0, 7)]), &cfg));
            assert_eq!(e.error, RequestError::ReadOnly);
            assert_eq!(e.status(), Status::Error);
        }
        let d = WireRequest::Discard {
            flag: 0,
            handle: 0,
            id: 5,
            sector: 0,
            nr_sectors: 8,
        };
        assert_eq!(err(parse(abi, &d, &cfg)).error, RequestError::ReadOnly);
    }
}

#[test]
fn unknown_and_unsupported_ops_get_eopnotsupp() {
    let mut cfg = ParseConfig::new(100);
    cfg.barrier = false;
    cfg.flush = false;
    cfg.discard = false;
    cfg.max_indirect_segments = 0;
    for abi in ABIS {
        for o in [4u8, 7, 200, 255] {
            let e = err(parse(abi, &direct(o, 1, 0, &[seg(1, 0, 7)]), &cfg));
            assert_eq!(e.error, RequestError::UnknownOp(o));
            assert_eq!(e.status(), Status::NotSupported);
            assert_eq!(e.status().to_i16(), -2);
        }
        for o in [op::WRITE_BARRIER, op::FLUSH_DISKCACHE] {
            let e = err(parse(abi, &direct(o, 0, 0, &[]), &cfg));
            assert_eq!(e.error, RequestError::NotSupported(o));
        }
        let d = WireRequest::Discard {
            flag: 1,
            handle: 0,
            id: 9,
            sector: 0,
            nr_sectors: 8,
        };
        let e = err(parse(abi, &d, &cfg));
        assert_eq!(
            (e.id, e.op, e.status()),
            (9, op::DISCARD, Status::NotSupported)
        );
        let i = WireRequest::Indirect {
            indirect_op: op::READ,
            nr_segments: 16,
            handle: 0,
            id: 3,
            sector: 0,
            grefs: &[1],
        };
        let e = err(parse(abi, &i, &cfg));
        assert_eq!(
            (e.id, e.op, e.status()),
            (3, op::INDIRECT, Status::NotSupported)
        );
    }
}

#[test]
fn discard_parses_range_and_secure_flag() {
    let cfg = ParseConfig::new(1000);
    for abi in ABIS {
        let d = WireRequest::Discard {
            flag: 1,
            handle: 2,
            id: 77,
            sector: 10,
            nr_sectors: 990,
        };
        let r = ready(parse(abi, &d, &cfg));
        assert_eq!(
            r.op,
            Operation::Discard {
                secure: true,
                nr_sectors: 990
            }
        );
        assert_eq!((r.id, r.sector, r.nr_sectors()), (77, 10, 990));
        assert_eq!(r.wire_op(), op::DISCARD);
        let d = WireRequest::Discard {
            flag: 0,
            handle: 2,
            id: 78,
            sector: 10,
            nr_sectors: 991,
        };
        assert!(matches!(
            err(parse(abi, &d, &cfg)).error,
            RequestError::OutOfRange { .. }
        ));
    }
}

fn indirect_pages(segs: &[Segment]) -> Vec<u8> {
    let n = segs.len().div_ceil(512) * 4096;
    let mut b = vec![0u8; n];
    encode_indirect_segments(segs, &mut b);
    b
}

#[test]
fn indirect_request_two_stage_parse() {
    let cfg = ParseConfig::new(1 << 30);
    let segs: Vec<Segment> = (0..256).map(|i| seg(1000 + i, 0, 7)).collect();
    for abi in ABIS {
        let w = WireRequest::Indirect {
            indirect_op: op::WRITE,
            nr_segments: 256,
            handle: 3,
            id: 42,
            sector: 2048,
            grefs: &[11, 12, 13],
        };
        let Ok(Parsed::Indirect(h)) = parse(abi, &w, &cfg) else {
            panic!("indirect expected")
        };
        assert_eq!(
            (h.id, h.op, h.sector, h.handle, h.nr_segments),
            (42, Operation::Write, 2048, 3, 256)
        );
        // One page holds 512 segments: only the first gref is used.
        assert_eq!(h.grefs, vec![11]);
        assert_eq!(h.pages_len(), 2048);
        let r = h.complete(&indirect_pages(&segs), &cfg).unwrap();
        assert!(r.indirect);
        assert_eq!(r.segments(), &segs[..]);
        assert_eq!(r.data_len(), 1 << 20);
        assert_eq!(r.wire_op(), op::WRITE);
        // Short page data is refused.
        let e = h.complete(&[0u8; 100], &cfg).unwrap_err();
        assert_eq!(
            e.error,
            RequestError::IndirectPagesShort {
                need: 2048,
                got: 100
            }
        );
        // A bad segment inside the indirect page.
        let mut bad = segs.clone();
        bad[200] = seg(5, 4, 2);
        let e = h.complete(&indirect_pages(&bad), &cfg).unwrap_err();
        assert_eq!(
            e.error,
            RequestError::BadSegment {
                index: 200,
                first: 4,
                last: 2
            }
        );
        assert_eq!(e.op, op::WRITE);
    }
}

#[test]
fn indirect_limits() {
    let mut cfg = ParseConfig::new(1 << 30);
    cfg.max_indirect_segments = 1024;
    for abi in ABIS {
        let mk = |iop: u8, n: u16| WireRequest::Indirect {
            indirect_op: iop,
            nr_segments: n,
            handle: 0,
            id: 1,
            sector: 0,
            grefs: &[1, 2, 3, 4, 5, 6, 7, 8],
        };
        let Ok(Parsed::Indirect(h)) = parse(abi, &mk(op::READ, 1024), &cfg) else {
            panic!()
        };
        assert_eq!(h.grefs, vec![1, 2]);
        let Ok(Parsed::Indirect(h)) = parse(abi, &mk(op::READ, 513), &cfg) else {
            panic!()
        };
        assert_eq!(h.grefs.len(), 2);
        for n in [0u16, 1025, 4097, u16::MAX] {
            let e = err(parse(abi, &mk(op::READ, n), &cfg));
            assert_eq!(
                e.error,
                RequestError::BadSegmentCount {
                    op: op::READ,
                    count: u32::from(n)
                }
            );
        }
        for iop in [
            op::WRITE_BARRIER,
            op::FLUSH_DISKCACHE,
            op::DISCARD,
            op::INDIRECT,
            99,
        ] {
            let e = err(parse(abi, &mk(iop, 8), &cfg));
            assert_eq!(e.error, RequestError::BadIndirectOp(iop));
            assert_eq!(e.status(), Status::Error);
        }
        let mut ro = cfg;
        ro.read_only = true;
        assert_eq!(
            err(parse(abi, &mk(op::WRITE, 8), &ro)).error,
            RequestError::ReadOnly
        );
        // Even minimal segments past the end are refused at header time.
        let mut small = cfg;
        small.disk_sectors = 10;
        assert!(matches!(
            err(parse(abi, &mk(op::READ, 11), &small)).error,
            RequestError::OutOfRange { .. }
        ));
    }
    assert_eq!(INDIRECT_PAGE_DATA, 2 << 20);
}

#[test]
fn abis_are_not_interchangeable() {
    // An x86_64 slot read as x86_32 sees different id/sector: the protocol choice matters.
    let segs = [seg(9, 0, 7)];
    let cfg = ParseConfig::new(u64::MAX);
    let s = slot(Abi::X86_64, &direct(op::READ, 1, 0x1234, &segs));
    let id32 = match parse_request(Abi::X86_32, &s, &cfg) {
        Ok(Parsed::Ready(r)) => r.id,
        Ok(Parsed::Indirect(h)) => h.id,
        Err(e) => e.id,
    };
    assert_eq!(
        id32, 0x0000_0001_0000_0000,
        "x86_32 reads pad + low half of the x86_64 id"
    );
    assert_ne!(id32, 0xdead_beef_0000_0001);
}

#[test]
fn response_encoding_both_abis() {
    for abi in ABIS {
        let r = Response {
            id: 0x0102_0304_0506_0708,
            op: op::WRITE,
            status: Status::NotSupported.to_i16(),
        };
        let mut b = [0xffu8; 16];
        r.encode(abi, &mut b);
        assert_eq!(&b[..8], &0x0102_0304_0506_0708u64.to_le_bytes());
        assert_eq!(b[8], 1);
        assert_eq!(b[9], 0);
        assert_eq!(&b[10..12], &(-2i16).to_le_bytes());
        if abi == Abi::X86_64 {
            assert_eq!(&b[12..16], &[0, 0, 0, 0]);
        } else {
            assert_eq!(&b[12..16], &[0xff; 4], "x86_32 response is 12 bytes");
        }
        assert_eq!(Response::decode(abi, &b), r);
    }
    assert_eq!(Status::from_i16(-1), Some(Status::Error));
    assert_eq!(Status::from_i16(5), None);
}

/// What the fuzz target checks on every input (kept here so CI runs it on stable).
pub fn check_any_slot(abi: Abi, bytes: &[u8], cfg: &ParseConfig) {
    match parse_request(abi, bytes, cfg) {
        Ok(Parsed::Ready(r)) => {
            assert!(r.segments().len() <= 11);
            for s in r.segments() {
                assert!(s.first_sect <= s.last_sect && s.last_sect <= 7);
            }
            assert!(r
                .sector
                .checked_add(r.nr_sectors())
                .is_some_and(|e| e <= cfg.disk_sectors));
            if cfg.read_only {
                let harmless = r.op == Operation::Read
                    || (matches!(r.op, Operation::Flush | Operation::WriteBarrier)
                        && r.segments().is_empty());
                assert!(
                    harmless,
                    "write-type request accepted on a read-only disk: {r:?}"
                );
            }
        }
        Ok(Parsed::Indirect(h)) => {
            assert!(h.nr_segments >= 1 && u32::from(h.nr_segments) <= cfg.max_indirect_segments);
            assert_eq!(h.grefs.len(), usize::from(h.nr_segments).div_ceil(512));
            // Finish with arbitrary page bytes too.
            let pages: Vec<u8> = bytes.iter().cycle().take(h.pages_len()).copied().collect();
            if let Ok(r) = h.complete(&pages, cfg) {
                assert_eq!(r.segments().len(), usize::from(h.nr_segments));
            }
        }
        Err(rej) => {
            let st = rej.status();
            assert!(st == Status::Error || st == Status::NotSupported);
        }
    }
}

proptest! {
    #[test]
    fn random_slots_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..130), sectors in any::<u64>(), ro in any::<bool>(), max_ind in 0u32..5000) {
        let mut cfg = ParseConfig::new(sectors);
        cfg.read_only = ro;
        cfg.max_indirect_segments = max_ind;
        for abi in ABIS {
            check_any_slot(abi, &bytes, &cfg);
        }
    }

    #[test]
    fn encode_then_parse_round_trips(op_rw in 0u8..2, nseg in 1usize..=11, sector in 0u64..1_000_000, id in any::<u64>(), firsts in proptest::collection::vec(0u8..8, 11), lens in proptest::collection::vec(0u8..8, 11)) {
        let segs: Vec<Segment> = (0..nseg).map(|i| {
            let f = firsts[i];
            let l = (f + lens[i]).min(7);
            seg(i as u32 + 8, f, l)
        }).collect();
        let cfg = ParseConfig::new(2_000_000);
        for abi in ABIS {
            let w = WireRequest::Direct { op: op_rw, nr_segments: nseg as u8, handle: 1, id, sector, segments: &segs };
            let r = ready(parse(abi, &w, &cfg));
            prop_assert_eq!(r.id, id);
            prop_assert_eq!(r.sector, sector);
            prop_assert_eq!(r.segments(), &segs[..]);
        }
    }
}
