//! Ring protocol: produce/consume/notify, hostile indices, wrap-around over 2^32, the final
//! check (no lost wakeups), and copy-once semantics under concurrent slot mutation.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use blktap3::blkif::abi::{op, sring, SRING_HEADER_SIZE};
use blktap3::blkif::*;
use proptest::prelude::*;

const ABIS: [Abi; 2] = [Abi::X86_32, Abi::X86_64];

fn read_req(id: u64, sector: u64) -> WireRequest<'static> {
    static SEG: [Segment; 1] = [Segment {
        gref: 9,
        first_sect: 0,
        last_sect: 7,
    }];
    WireRequest::Direct {
        op: op::READ,
        nr_segments: 1,
        handle: 0,
        id,
        sector,
        segments: &SEG,
    }
}

fn rings(abi: Abi, order: u32, start: u32) -> (FrontRing<Arc<HeapMem>>, BackRing<Arc<HeapMem>>) {
    let mem = Arc::new(HeapMem::new(Abi::ring_bytes(order)));
    let front = FrontRing::init(Arc::clone(&mem), abi, order, start).unwrap();
    let back = BackRing::attach(mem, abi, order).unwrap();
    (front, back)
}

fn take_ready<M: SharedMem>(back: &mut BackRing<M>, cfg: &ParseConfig) -> Option<Request> {
    match back.next_request(cfg).unwrap() {
        None => None,
        Some(Ok(Parsed::Ready(r))) => Some(r),
        Some(other) => panic!("unexpected {other:?}"),
    }
}

#[test]
fn produce_consume_respond_in_every_abi_and_order() {
    let cfg = ParseConfig::new(1 << 30);
    for abi in ABIS {
        for order in 0..=4 {
            let (mut f, mut b) = rings(abi, order, 0);
            let n = f.entries();
            assert_eq!(n, b.entries());
            for i in 0..n {
                f.push_request(&read_req(u64::from(i) + 1, u64::from(i) * 8))
                    .unwrap();
            }
            assert_eq!(f.push_request(&read_req(0, 0)), Err(RingError::Full));
            assert!(
                f.push_requests_and_check_notify(),
                "first push notifies (req_event = 1)"
            );
            assert_eq!(b.unconsumed_requests().unwrap(), n);
            for i in 0..n {
                let r = take_ready(&mut b, &cfg).unwrap();
                assert_eq!((r.id, r.sector), (u64::from(i) + 1, u64::from(i) * 8));
            }
            assert!(take_ready(&mut b, &cfg).is_none());
            assert_eq!(b.in_flight(), n);
            for i in 0..n {
                b.push_response(u64::from(i) + 1, op::READ, Status::Okay)
                    .unwrap();
            }
            assert_eq!(
                b.push_response(1, 0, Status::Okay),
                Err(RingError::NoOutstandingRequest)
            );
            assert!(b.push_responses_and_check_notify());
            for i in 0..n {
                let rsp = f.take_response().unwrap().unwrap();
                assert_eq!(
                    (rsp.id, rsp.op, rsp.status),
                    (u64::from(i) + 1, op::READ, 0)
                );
            }
            assert_eq!(f.take_response().unwrap(), None);
            assert_eq!(f.free_requests(), n);
        }
    }
}

#[test]
fn req_prod_beyond_the_ring_is_a_broken_ring() {
    for abi in ABIS {
        let (f, b) = rings(abi, 0, 0);
        let mem = f.mem();
        // Exactly a full ring is fine...
        mem.store_u32(sring::REQ_PROD, 32, Ordering::Release);
        assert_eq!(b.unconsumed_requests().unwrap(), 32);
        // ...one more is not, nor is a huge jump, nor "negative" (wrapped) values.
        for bad in [33u32, 1000, u32::MAX, u32::MAX / 2] {
            mem.store_u32(sring::REQ_PROD, bad, Ordering::Release);
            assert!(
                matches!(b.unconsumed_requests(), Err(RingError::Overflow { req_prod, entries: 32, .. }) if req_prod == bad)
            );
        }
    }
}

#[test]
fn unanswered_requests_count_against_req_prod() {
    let cfg = ParseConfig::new(1 << 30);
    let (mut f, mut b) = rings(Abi::X86_64, 0, 0);
    for i in 0..32 {
        f.push_request(&read_req(i, 0)).unwrap();
    }
    f.push_requests_and_check_notify();
    for _ in 0..32 {
        take_ready(&mut b, &cfg).unwrap();
    }
    // A hostile frontend advances req_prod although nothing was answered: overflow.
    f.mem().store_u32(sring::REQ_PROD, 33, Ordering::Release);
    assert!(matches!(
        b.next_request(&cfg),
        Err(RingError::Overflow { .. })
    ));
}

#[test]
fn indices_wrap_around_2_pow_32() {
    let cfg = ParseConfig::new(1 << 30);
    for abi in ABIS {
        let start = u32::MAX - 40;
        let (mut f, mut b) = rings(abi, 0, start);
        let mut id = 0u64;
        for round in 0..10u64 {
            let batch = 1 + (round * 7) % 32;
            for _ in 0..batch {
                id += 1;
                f.push_request(&read_req(id, id)).unwrap();
            }
            f.push_requests_and_check_notify();
            let mut got = Vec::new();
            while let Some(r) = take_ready(&mut b, &cfg) {
                got.push(r.id);
                b.push_response(r.id, op::READ, Status::Okay).unwrap();
            }
            assert_eq!(got, ((id - batch + 1)..=id).collect::<Vec<_>>());
            b.push_responses_and_check_notify();
            for want in (id - batch + 1)..=id {
                assert_eq!(f.take_response().unwrap().unwrap().id, want);
            }
        }
        // We really crossed zero.
        assert!(
            b.req_cons() < 1000,
            "req_cons {} did not wrap",
            b.req_cons()
        );
        assert_eq!(b.req_cons(), start.wrapping_add(id as u32));
    }
}

#[test]
fn final_check_rearms_req_event_so_the_next_request_notifies() {
    let cfg = ParseConfig::new(1 << 30);
    let (mut f, mut b) = rings(Abi::X86_64, 0, 0);
    f.push_request(&read_req(1, 0)).unwrap();
    assert!(f.push_requests_and_check_notify());
    take_ready(&mut b, &cfg).unwrap();
    // Without re-arming, req_event is still 1: the next push would not notify.
    f.push_request(&read_req(2, 0)).unwrap();
    assert!(!f.push_requests_and_check_notify());
    take_ready(&mut b, &cfg).unwrap();
    assert!(!b.final_check_for_requests().unwrap());
    assert_eq!(f.mem().load_u32(sring::REQ_EVENT, Ordering::Acquire), 3);
    f.push_request(&read_req(3, 0)).unwrap();
    assert!(
        f.push_requests_and_check_notify(),
        "re-armed: the frontend must notify"
    );
    assert!(b.final_check_for_requests().unwrap());
}

type Racer = Box<dyn FnMut(&HeapMem) + Send>;

/// Shared memory that lets a "frontend" act at the exact moment the backend writes req_event
/// (the race the final check closes), or mutates slots right after the backend reads them.
struct Hooked {
    inner: Arc<HeapMem>,
    on_req_event: Mutex<Option<Racer>>,
    scribble_after_read: AtomicBool,
    slot_reads: AtomicUsize,
}

impl SharedMem for Hooked {
    fn size(&self) -> usize {
        self.inner.size()
    }
    fn load_u32(&self, off: usize, o: Ordering) -> u32 {
        self.inner.load_u32(off, o)
    }
    fn store_u32(&self, off: usize, v: u32, o: Ordering) {
        // The racing frontend acts just before our store lands.
        if off == sring::REQ_EVENT {
            if let Some(mut f) = self.on_req_event.lock().unwrap().take() {
                f(&self.inner);
            }
        }
        self.inner.store_u32(off, v, o)
    }
    fn read_bytes(&self, off: usize, buf: &mut [u8]) {
        self.inner.read_bytes(off, buf);
        if off >= SRING_HEADER_SIZE {
            self.slot_reads.fetch_add(1, Ordering::SeqCst);
            if self.scribble_after_read.load(Ordering::SeqCst) {
                // The guest rewrites the slot right after our copy: nr_segments 200, op 77.
                let garbage: Vec<u8> = (0..buf.len())
                    .map(|i| if i == 0 { 77 } else { 200 })
                    .collect();
                self.inner.write_bytes(off, &garbage);
            }
        }
    }
    fn write_bytes(&self, off: usize, data: &[u8]) {
        self.inner.write_bytes(off, data)
    }
}

fn hooked(abi: Abi) -> (FrontRing<Arc<HeapMem>>, Arc<Hooked>) {
    let mem = Arc::new(HeapMem::new(4096));
    let front = FrontRing::init(Arc::clone(&mem), abi, 0, 0).unwrap();
    let h = Arc::new(Hooked {
        inner: mem,
        on_req_event: Mutex::new(None),
        scribble_after_read: AtomicBool::new(false),
        slot_reads: AtomicUsize::new(0),
    });
    (front, h)
}

#[test]
fn final_check_catches_a_request_produced_while_rearming() {
    let cfg = ParseConfig::new(1 << 30);
    for abi in ABIS {
        let (mut f, h) = hooked(abi);
        let mut b = BackRing::attach(Arc::clone(&h), abi, 0).unwrap();
        // The frontend's push happens between our "ring empty" check and the req_event store,
        // so it still sees the old req_event and does not notify.
        let mut slot = [0u8; 112];
        read_req(5, 0).encode(abi, &mut slot);
        *h.on_req_event.lock().unwrap() = Some(Box::new(move |m: &HeapMem| {
            m.write_bytes(SRING_HEADER_SIZE, &slot[..abi.request_size()]);
            m.store_u32(sring::REQ_PROD, 1, Ordering::Release);
        }));
        assert!(
            b.final_check_for_requests().unwrap(),
            "the re-check must see the racing request"
        );
        assert_eq!(take_ready(&mut b, &cfg).unwrap().id, 5);
        let _ = f.push_requests_and_check_notify();
    }
}

#[test]
fn slot_copied_once_even_if_the_guest_rewrites_it() {
    let cfg = ParseConfig::new(1 << 30);
    for abi in ABIS {
        let (mut f, h) = hooked(abi);
        let segs: Vec<Segment> = (0..11)
            .map(|i| Segment {
                gref: 50 + i,
                first_sect: 1,
                last_sect: 6,
            })
            .collect();
        for i in 0..8u64 {
            f.push_request(&WireRequest::Direct {
                op: op::WRITE,
                nr_segments: 11,
                handle: 0,
                id: 100 + i,
                sector: i * 100,
                segments: &segs,
            })
            .unwrap();
        }
        f.push_requests_and_check_notify();
        h.scribble_after_read.store(true, Ordering::SeqCst);
        let mut b = BackRing::attach(Arc::clone(&h), abi, 0).unwrap();
        for i in 0..8u64 {
            let r = take_ready(&mut b, &cfg).expect("request");
            assert_eq!((r.id, r.sector, r.op), (100 + i, i * 100, Operation::Write));
            assert_eq!(r.segments(), &segs[..]);
        }
        assert_eq!(
            h.slot_reads.load(Ordering::SeqCst),
            8,
            "exactly one read per slot"
        );
    }
}

#[test]
fn concurrent_scribbling_thread_never_breaks_validation() {
    // A thread keeps rewriting all slots with random-ish bytes while the backend consumes:
    // every outcome must be a valid request or a clean rejection.
    let cfg = ParseConfig::new(1 << 20);
    let mem = Arc::new(HeapMem::new(4096));
    let mut f = FrontRing::init(Arc::clone(&mem), Abi::X86_64, 0, 0).unwrap();
    let mut b = BackRing::attach(Arc::clone(&mem), Abi::X86_64, 0).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let t = {
        let mem = Arc::clone(&mem);
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut x = 0x1234_5678u32;
            while !stop.load(Ordering::Relaxed) {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let off = SRING_HEADER_SIZE + (x as usize % (32 * 112 - 8));
                mem.write_bytes(off, &x.to_le_bytes());
            }
        })
    };
    for round in 0..200u64 {
        for i in 0..8 {
            f.push_request(&read_req(round * 8 + i, 0)).unwrap();
        }
        f.push_requests_and_check_notify();
        while let Some(item) = b.next_request(&cfg).unwrap() {
            let (id, o, st) = match item {
                Ok(Parsed::Ready(r)) => {
                    assert!(r.segments().len() <= 11);
                    assert!(r
                        .segments()
                        .iter()
                        .all(|s| s.first_sect <= s.last_sect && s.last_sect < 8));
                    // Only data is range-checked: a flush (or a read or write without
                    // segments) may carry any sector, as with blkback.
                    if r.nr_sectors() > 0 {
                        let end = r.sector.checked_add(r.nr_sectors());
                        assert!(end.is_some_and(|e| e <= cfg.disk_sectors), "{r:?}");
                    }
                    (r.id, r.wire_op(), Status::Okay)
                }
                Ok(Parsed::Indirect(h)) => (h.id, op::INDIRECT, Status::Error),
                Err(rej) => (rej.id, rej.op, rej.status()),
            };
            b.push_response(id, o, st).unwrap();
        }
        b.push_responses_and_check_notify();
        while f.take_response().unwrap().is_some() {}
    }
    stop.store(true, Ordering::Relaxed);
    t.join().unwrap();
}

#[test]
fn response_notification_respects_rsp_event() {
    let cfg = ParseConfig::new(1 << 30);
    let (mut f, mut b) = rings(Abi::X86_32, 1, 0);
    for i in 0..4 {
        f.push_request(&read_req(i, 0)).unwrap();
    }
    f.push_requests_and_check_notify();
    // The frontend only wants to hear about the 4th response.
    f.mem().store_u32(sring::RSP_EVENT, 4, Ordering::Release);
    for _ in 0..3 {
        let r = take_ready(&mut b, &cfg).unwrap();
        b.push_response(r.id, op::READ, Status::Okay).unwrap();
    }
    assert!(!b.push_responses_and_check_notify());
    let r = take_ready(&mut b, &cfg).unwrap();
    b.push_response(r.id, op::READ, Status::Error).unwrap();
    assert!(b.push_responses_and_check_notify());
    let got: Vec<i16> = std::iter::from_fn(|| f.take_response().unwrap())
        .map(|r| r.status)
        .collect();
    assert_eq!(got, vec![0, 0, 0, -1]);
}

#[test]
fn attach_resumes_after_answered_requests() {
    let cfg = ParseConfig::new(1 << 30);
    let (mut f, mut b) = rings(Abi::X86_64, 0, 7);
    f.push_request(&read_req(1, 0)).unwrap();
    f.push_requests_and_check_notify();
    let r = take_ready(&mut b, &cfg).unwrap();
    b.push_response(r.id, op::READ, Status::Okay).unwrap();
    b.push_responses_and_check_notify();
    // A new backend attaching to the same ring does not replay request 1.
    let mut b2 = BackRing::attach(Arc::clone(f.mem()), Abi::X86_64, 0).unwrap();
    assert!(take_ready(&mut b2, &cfg).is_none());
    assert_eq!(b2.req_cons(), 8);
}

#[test]
fn responses_share_the_request_slot_stride() {
    // ring.h slots are a union: response i sits at header + i * sizeof(request).
    let cfg = ParseConfig::new(1 << 30);
    for abi in ABIS {
        let (mut f, mut b) = rings(abi, 0, 0);
        for i in 0..3 {
            f.push_request(&read_req(10 + i, 0)).unwrap();
        }
        f.push_requests_and_check_notify();
        for _ in 0..3 {
            let r = take_ready(&mut b, &cfg).unwrap();
            b.push_response(r.id, op::READ, Status::Okay).unwrap();
        }
        b.push_responses_and_check_notify();
        let mut id = [0u8; 8];
        f.mem()
            .read_bytes(SRING_HEADER_SIZE + 2 * abi.request_size(), &mut id);
        assert_eq!(u64::from_le_bytes(id), 12);
    }
}

#[test]
fn geometry_errors() {
    let small = HeapMem::new(4096);
    assert!(matches!(
        BackRing::attach(&small, Abi::X86_64, 1),
        Err(RingError::TooSmall {
            have: 4096,
            need: 8192
        })
    ));
    assert!(matches!(
        BackRing::attach(&small, Abi::X86_64, 5),
        Err(RingError::BadOrder(5))
    ));
}

proptest! {
    #[test]
    fn any_start_index_and_batching_preserves_order(start in any::<u32>(), batches in proptest::collection::vec(1u32..=32, 1..20)) {
        let cfg = ParseConfig::new(1 << 30);
        let (mut f, mut b) = rings(Abi::X86_64, 0, start);
        let mut next = 0u64;
        let mut expect = 0u64;
        for n in batches {
            for _ in 0..n { f.push_request(&read_req(next, 0)).unwrap(); next += 1; }
            f.push_requests_and_check_notify();
            while let Some(r) = take_ready(&mut b, &cfg) {
                prop_assert_eq!(r.id, expect);
                expect += 1;
                b.push_response(r.id, op::READ, Status::Okay).unwrap();
            }
            b.push_responses_and_check_notify();
            while f.take_response().unwrap().is_some() {}
            prop_assert!(!b.final_check_for_requests().unwrap());
        }
        prop_assert_eq!(expect, next);
    }
}
