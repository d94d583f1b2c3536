//! Random ring slot bytes in each ABI, then (for indirect headers) random indirect-page bytes;
//! plus the same bytes pushed through a real BackRing. Invariants as in tests/blkif_parse.rs.
#![no_main]

use blktap3::blkif::*;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 10 {
        return;
    }
    let disk = u64::from_le_bytes(data[..8].try_into().unwrap_or([0; 8]));
    let flags = data[8];
    let mut cfg = ParseConfig::new(disk);
    cfg.read_only = flags & 1 != 0;
    cfg.barrier = flags & 2 != 0;
    cfg.flush = flags & 4 != 0;
    cfg.discard = flags & 8 != 0;
    cfg.max_indirect_segments = u32::from(data[9]) * 16;
    let body = &data[10..];
    for abi in [Abi::X86_32, Abi::X86_64] {
        match parse_request(abi, body, &cfg) {
            Ok(Parsed::Ready(r)) => {
                assert!(r.segments().len() <= 11);
                for s in r.segments() {
                    assert!(s.first_sect <= s.last_sect && s.last_sect <= 7);
                }
                // Requests carrying data lie inside the disk. Empty ones are not range-checked
                // (blkfront's empty flush has sector u64::MAX; blkback does the same).
                if r.nr_sectors() > 0 {
                    assert!(r
                        .sector
                        .checked_add(r.nr_sectors())
                        .is_some_and(|e| e <= disk));
                }
            }
            Ok(Parsed::Indirect(h)) => {
                assert!(
                    h.nr_segments >= 1 && u32::from(h.nr_segments) <= cfg.max_indirect_segments
                );
                let pages: Vec<u8> = body.iter().cycle().take(h.pages_len()).copied().collect();
                if let Ok(r) = h.complete(&pages, &cfg) {
                    assert_eq!(r.segments().len(), usize::from(h.nr_segments));
                    assert!(r
                        .sector
                        .checked_add(r.nr_sectors())
                        .is_some_and(|e| e <= disk));
                }
            }
            Err(rej) => {
                let _ = rej.status().to_i16();
            }
        }
        // The same bytes as ring slots, with a hostile req_prod taken from the input.
        let mem = HeapMem::new(4096);
        mem.write_bytes(64, &body[..body.len().min(4096 - 64)]);
        let prod = u32::from(data[0]) | (u32::from(data[1]) << 8);
        mem.store_u32(0, prod, std::sync::atomic::Ordering::Release);
        if let Ok(mut ring) = BackRing::attach(&mem, abi, 0) {
            for _ in 0..40 {
                match ring.next_request(&cfg) {
                    Ok(Some(item)) => {
                        let (id, o, st) = match item {
                            Ok(Parsed::Ready(r)) => (r.id, r.wire_op(), Status::Okay),
                            Ok(Parsed::Indirect(h)) => (h.id, 6, Status::Error),
                            Err(e) => (e.id, e.op, e.status()),
                        };
                        ring.push_response(id, o, st).unwrap();
                    }
                    Ok(None) | Err(_) => break,
                }
            }
            ring.push_responses_and_check_notify();
        }
    }
});
