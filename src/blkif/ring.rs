//! The shared ring protocol (`io/ring.h`) over an abstract shared-memory view.
//!
//! ```text
//!   frontend (guest)                         backend (us)
//!   writes slots, then req_prod  ──────────► reads req_prod (Acquire), copies each slot once
//!   reads rsp_prod (Acquire)     ◄────────── writes responses, then rsp_prod (Release)
//!   req_event / rsp_event: "notify me when the producer index passes this value"
//! ```
//!
//! Indices are free-running `u32`s ([`Wrapping`]); a slot is `index & (entries - 1)`.
//! Everything the guest writes is untrusted: `req_prod` is bounds-checked against the number of
//! slots we have not answered yet, and each slot is copied exactly once into private memory.

use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};

use super::abi::{sring, Abi, MAX_REQUEST_SIZE, SRING_HEADER_SIZE};
use super::request::{parse_request, ParseConfig, Parsed, Rejected, Response, Status, WireRequest};

/// Shared memory holding a ring (a grant mapping, or simulated pages).
///
/// Implementations must perform every access on the shared memory itself (no caching) and must
/// never create Rust references to it: the other side may change any byte at any time. Offsets
/// passed by the ring code are always in bounds and 4-aligned for `u32` accesses; an
/// implementation may panic otherwise (a programming error, never guest-controlled).
pub trait SharedMem {
    /// Size in bytes.
    fn size(&self) -> usize;
    /// Atomic load of the `u32` at `off`.
    fn load_u32(&self, off: usize, order: Ordering) -> u32;
    /// Atomic store of the `u32` at `off`.
    fn store_u32(&self, off: usize, val: u32, order: Ordering);
    /// Copy `buf.len()` bytes starting at `off` out of the shared memory.
    fn read_bytes(&self, off: usize, buf: &mut [u8]);
    /// Copy `data` into the shared memory at `off`.
    fn write_bytes(&self, off: usize, data: &[u8]);
}

/// `SharedMem` through a reference or a shared pointer: every method forwards.
macro_rules! forward_shared_mem {
    ($($ptr:ty),*) => {$(
        impl<T: SharedMem + ?Sized> SharedMem for $ptr {
            fn size(&self) -> usize {
                (**self).size()
            }
            fn load_u32(&self, off: usize, order: Ordering) -> u32 {
                (**self).load_u32(off, order)
            }
            fn store_u32(&self, off: usize, val: u32, order: Ordering) {
                (**self).store_u32(off, val, order)
            }
            fn read_bytes(&self, off: usize, buf: &mut [u8]) {
                (**self).read_bytes(off, buf)
            }
            fn write_bytes(&self, off: usize, data: &[u8]) {
                (**self).write_bytes(off, data)
            }
        }
    )*};
}
forward_shared_mem!(&T, std::sync::Arc<T>);

/// A plain, safe, in-process [`SharedMem`] (atomics per 32-bit word). Used by tests, fuzzing
/// and anything that needs a ring without an OS mapping; slower than a real mapping.
#[derive(Debug)]
pub struct HeapMem {
    words: Box<[std::sync::atomic::AtomicU32]>,
}

impl HeapMem {
    /// `len` zeroed bytes (rounded up to a multiple of 4).
    pub fn new(len: usize) -> HeapMem {
        HeapMem {
            words: (0..len.div_ceil(4))
                .map(|_| std::sync::atomic::AtomicU32::new(0))
                .collect(),
        }
    }
}

impl SharedMem for HeapMem {
    fn size(&self) -> usize {
        self.words.len() * 4
    }
    fn load_u32(&self, off: usize, order: Ordering) -> u32 {
        assert!(off.is_multiple_of(4), "unaligned ring index access");
        self.words[off / 4].load(order)
    }
    fn store_u32(&self, off: usize, val: u32, order: Ordering) {
        assert!(off.is_multiple_of(4), "unaligned ring index access");
        self.words[off / 4].store(val, order)
    }
    fn read_bytes(&self, off: usize, buf: &mut [u8]) {
        for (i, b) in buf.iter_mut().enumerate() {
            let a = off + i;
            let w = self.words[a / 4].load(Ordering::Relaxed);
            *b = w.to_le_bytes()[a % 4];
        }
    }
    fn write_bytes(&self, off: usize, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            let a = off + i;
            let shift = (a % 4) * 8;
            let word = &self.words[a / 4];
            // Byte-wise read-modify-write of a word only the writer side touches at this time.
            let mut cur = word.load(Ordering::Relaxed);
            loop {
                let new = (cur & !(0xff << shift)) | (u32::from(*b) << shift);
                match word.compare_exchange_weak(cur, new, Ordering::Relaxed, Ordering::Relaxed) {
                    Ok(_) => break,
                    Err(x) => cur = x,
                }
            }
        }
    }
}

/// Ring-level failures. All of them mean the frontend broke the protocol (or the ring was set
/// up wrongly): the backend should stop serving the ring.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// The shared memory is smaller than `2^order` pages.
    #[error("shared ring memory is {have} bytes, need {need}")]
    TooSmall { have: usize, need: usize },
    /// The ring-page order is beyond what we support.
    #[error("ring page order {0} not supported")]
    BadOrder(u32),
    /// `req_prod` claims more outstanding requests than the ring has slots.
    #[error("req_prod {req_prod} is more than {entries} ahead of rsp_prod {rsp_prod}")]
    Overflow {
        req_prod: u32,
        rsp_prod: u32,
        entries: u32,
    },
    /// A response was pushed with no consumed, unanswered request (backend bug).
    #[error("no outstanding request to respond to")]
    NoOutstandingRequest,
    /// The frontend produced a response count beyond its requests (frontend side).
    #[error("rsp_prod {rsp_prod} is more than {entries} ahead of rsp_cons {rsp_cons}")]
    ResponseOverflow {
        rsp_prod: u32,
        rsp_cons: u32,
        entries: u32,
    },
    /// No free request slot (frontend side).
    #[error("ring is full")]
    Full,
}

fn check_geometry<M: SharedMem>(mem: &M, abi: Abi, order: u32) -> Result<u32, RingError> {
    let entries = abi.ring_entries(order).ok_or(RingError::BadOrder(order))?;
    let need = Abi::ring_bytes(order);
    if mem.size() < need {
        return Err(RingError::TooSmall {
            have: mem.size(),
            need,
        });
    }
    Ok(entries)
}

/// One item taken from the ring by [`BackRing::next_request`].
pub type Taken = Result<Parsed, Rejected>;

/// The second half of `RING_FINAL_CHECK_FOR_{REQUESTS,RESPONSES}`: nothing was pending, so
/// ask for a notification at `cons + 1` (the event field at `event_off`) and look again, so
/// an entry produced concurrently is never missed (either it is seen now, or the producer
/// sees the new event index and notifies).
fn final_check<M: SharedMem>(
    mem: &M,
    event_off: usize,
    cons: Wrapping<u32>,
    unconsumed: impl Fn() -> Result<u32, RingError>,
) -> Result<bool, RingError> {
    if unconsumed()? > 0 {
        return Ok(true);
    }
    mem.store_u32(event_off, (cons + Wrapping(1)).0, Ordering::Relaxed);
    // mb(): the event index store before re-reading the producer index.
    fence(Ordering::SeqCst);
    Ok(unconsumed()? > 0)
}

/// The backend end of a blkif ring (`BACK_RING_ATTACH`).
#[derive(Debug)]
pub struct BackRing<M> {
    mem: M,
    abi: Abi,
    entries: u32,
    req_cons: Wrapping<u32>,
    rsp_prod_pvt: Wrapping<u32>,
}

impl<M: SharedMem> BackRing<M> {
    /// Attach to an initialised shared ring of `2^order` pages. Like `BACK_RING_ATTACH`, private
    /// indices start at the current `rsp_prod` (0 on a fresh ring), so re-attaching after a
    /// backend restart does not replay answered requests.
    pub fn attach(mem: M, abi: Abi, order: u32) -> Result<Self, RingError> {
        let entries = check_geometry(&mem, abi, order)?;
        let start = Wrapping(mem.load_u32(sring::RSP_PROD, Ordering::Acquire));
        Ok(BackRing {
            mem,
            abi,
            entries,
            req_cons: start,
            rsp_prod_pvt: start,
        })
    }

    /// The ring ABI.
    pub fn abi(&self) -> Abi {
        self.abi
    }
    /// Number of slots (`RING_SIZE`).
    pub fn entries(&self) -> u32 {
        self.entries
    }
    /// Private consumer index.
    pub fn req_cons(&self) -> u32 {
        self.req_cons.0
    }
    /// Private response producer index.
    pub fn rsp_prod_pvt(&self) -> u32 {
        self.rsp_prod_pvt.0
    }
    /// The shared memory.
    pub fn mem(&self) -> &M {
        &self.mem
    }
    /// Requests taken and not yet answered.
    pub fn in_flight(&self) -> u32 {
        (self.req_cons - self.rsp_prod_pvt).0
    }

    fn slot_off(&self, idx: Wrapping<u32>, stride: usize) -> usize {
        SRING_HEADER_SIZE + (idx.0 & (self.entries - 1)) as usize * stride
    }

    /// `RING_HAS_UNCONSUMED_REQUESTS`, after checking `req_prod` for overflow
    /// (`RING_REQUEST_PROD_OVERFLOW`). Reads `req_prod` with Acquire ordering: this is the
    /// `rmb()` after reading `req_prod` in ring.h, so slot reads that follow see the requests.
    pub fn unconsumed_requests(&self) -> Result<u32, RingError> {
        let req_prod = Wrapping(self.mem.load_u32(sring::REQ_PROD, Ordering::Acquire));
        if (req_prod - self.rsp_prod_pvt).0 > self.entries {
            return Err(RingError::Overflow {
                req_prod: req_prod.0,
                rsp_prod: self.rsp_prod_pvt.0,
                entries: self.entries,
            });
        }
        // req_cons never passes req_prod when the check above held at every previous call,
        // except if the guest moved req_prod backwards: then nothing is unconsumed.
        let unconsumed = (req_prod - self.req_cons).0;
        if unconsumed > self.entries {
            return Ok(0);
        }
        Ok(unconsumed)
    }

    /// Take the next request, if any: copy its slot once into private memory, then decode and
    /// validate that copy against `cfg`. `Ok(None)` when the ring is empty.
    pub fn next_request(&mut self, cfg: &ParseConfig) -> Result<Option<Taken>, RingError> {
        let mut slot = [0u8; MAX_REQUEST_SIZE];
        if !self.take_slot(&mut slot)? {
            return Ok(None);
        }
        Ok(Some(parse_request(
            self.abi,
            &slot[..self.abi.request_size()],
            cfg,
        )))
    }

    /// Take the next slot's raw bytes (one copy) without parsing. Returns false when the
    /// ring is empty. `buf` must hold at least `abi.request_size()` bytes.
    pub fn take_slot(&mut self, buf: &mut [u8]) -> Result<bool, RingError> {
        if self.unconsumed_requests()? == 0 {
            return Ok(false);
        }
        let size = self.abi.request_size();
        let off = self.slot_off(self.req_cons, size);
        // The single read of this slot's shared bytes.
        self.mem.read_bytes(off, &mut buf[..size]);
        self.req_cons += 1;
        Ok(true)
    }

    /// Write a response at `rsp_prod_pvt` (not yet visible to the frontend: see
    /// [`push_responses_and_check_notify`](Self::push_responses_and_check_notify)).
    pub fn push_response(&mut self, id: u64, op: u8, status: Status) -> Result<(), RingError> {
        self.push_raw_response(&Response {
            id,
            op,
            status: status.to_i16(),
        })
    }

    /// As [`push_response`](Self::push_response) with a raw response.
    pub fn push_raw_response(&mut self, rsp: &Response) -> Result<(), RingError> {
        if self.in_flight() == 0 {
            return Err(RingError::NoOutstandingRequest);
        }
        let size = self.abi.response_size();
        let mut b = [0u8; 16];
        rsp.encode(self.abi, &mut b);
        // Slots are a C union of request and response: the stride is the request size.
        let off = self.slot_off(self.rsp_prod_pvt, self.abi.request_size());
        self.mem.write_bytes(off, &b[..size]);
        self.rsp_prod_pvt += 1;
        Ok(())
    }

    /// `RING_PUSH_RESPONSES_AND_CHECK_NOTIFY`: publish the responses written so far and return
    /// whether the frontend asked to be notified (`rsp_event` crossed).
    pub fn push_responses_and_check_notify(&mut self) -> bool {
        let old = Wrapping(self.mem.load_u32(sring::RSP_PROD, Ordering::Relaxed));
        let new = self.rsp_prod_pvt;
        // wmb(): response bodies before the new rsp_prod (Release store).
        self.mem
            .store_u32(sring::RSP_PROD, new.0, Ordering::Release);
        // mb(): the rsp_prod store before the rsp_event load.
        fence(Ordering::SeqCst);
        let event = Wrapping(self.mem.load_u32(sring::RSP_EVENT, Ordering::Relaxed));
        (new - event) < (new - old)
    }

    /// `RING_FINAL_CHECK_FOR_REQUESTS`: if nothing is pending, re-arm `req_event` to
    /// `req_cons + 1` and check again, so a request produced concurrently is never missed
    /// (either we see it now, or the frontend sees the new `req_event` and notifies us).
    pub fn final_check_for_requests(&mut self) -> Result<bool, RingError> {
        let cons = self.req_cons;
        final_check(&self.mem, sring::REQ_EVENT, cons, || {
            self.unconsumed_requests()
        })
    }
}

/// The frontend end of a blkif ring (`SHARED_RING_INIT` + `FRONT_RING_ATTACH`), used by the
/// simulated blkfront, tests and benchmarks.
#[derive(Debug)]
pub struct FrontRing<M> {
    mem: M,
    abi: Abi,
    entries: u32,
    req_prod_pvt: Wrapping<u32>,
    rsp_cons: Wrapping<u32>,
}

impl<M: SharedMem> FrontRing<M> {
    /// Initialise the shared header (all indices at `start`, events at `start + 1`, padding
    /// zeroed; `start = 0` is `SHARED_RING_INIT`) and attach.
    pub fn init(mem: M, abi: Abi, order: u32, start: u32) -> Result<Self, RingError> {
        let entries = check_geometry(&mem, abi, order)?;
        mem.write_bytes(0, &[0u8; SRING_HEADER_SIZE]);
        let ev = start.wrapping_add(1);
        mem.store_u32(sring::REQ_PROD, start, Ordering::Relaxed);
        mem.store_u32(sring::RSP_PROD, start, Ordering::Relaxed);
        mem.store_u32(sring::REQ_EVENT, ev, Ordering::Relaxed);
        mem.store_u32(sring::RSP_EVENT, ev, Ordering::Release);
        Ok(FrontRing {
            mem,
            abi,
            entries,
            req_prod_pvt: Wrapping(start),
            rsp_cons: Wrapping(start),
        })
    }

    /// Number of slots.
    pub fn entries(&self) -> u32 {
        self.entries
    }
    /// The ring ABI.
    pub fn abi(&self) -> Abi {
        self.abi
    }
    /// The shared memory.
    pub fn mem(&self) -> &M {
        &self.mem
    }
    /// Slots free for new requests.
    pub fn free_requests(&self) -> u32 {
        self.entries - (self.req_prod_pvt - self.rsp_cons).0
    }

    /// Write raw slot bytes (`bytes.len() <= request_size`, rest zeroed) at `req_prod_pvt`.
    pub fn push_raw_request(&mut self, bytes: &[u8]) -> Result<(), RingError> {
        if self.free_requests() == 0 {
            return Err(RingError::Full);
        }
        let size = self.abi.request_size();
        let mut slot = [0u8; MAX_REQUEST_SIZE];
        let n = bytes.len().min(size);
        slot[..n].copy_from_slice(&bytes[..n]);
        let off = SRING_HEADER_SIZE + (self.req_prod_pvt.0 & (self.entries - 1)) as usize * size;
        self.mem.write_bytes(off, &slot[..size]);
        self.req_prod_pvt += 1;
        Ok(())
    }

    /// Encode and write a request.
    pub fn push_request(&mut self, req: &WireRequest<'_>) -> Result<(), RingError> {
        let mut slot = [0u8; MAX_REQUEST_SIZE];
        req.encode(self.abi, &mut slot);
        self.push_raw_request(&slot[..self.abi.request_size()])
    }

    /// `RING_PUSH_REQUESTS_AND_CHECK_NOTIFY`.
    pub fn push_requests_and_check_notify(&mut self) -> bool {
        let old = Wrapping(self.mem.load_u32(sring::REQ_PROD, Ordering::Relaxed));
        let new = self.req_prod_pvt;
        // wmb(): request bodies before req_prod.
        self.mem
            .store_u32(sring::REQ_PROD, new.0, Ordering::Release);
        // mb(): req_prod store before the req_event load.
        fence(Ordering::SeqCst);
        let event = Wrapping(self.mem.load_u32(sring::REQ_EVENT, Ordering::Relaxed));
        (new - event) < (new - old)
    }

    /// Responses published and not yet taken (`RING_HAS_UNCONSUMED_RESPONSES`), checked
    /// against the requests we produced.
    pub fn unconsumed_responses(&self) -> Result<u32, RingError> {
        // Acquire: the rmb() after reading rsp_prod.
        let rsp_prod = Wrapping(self.mem.load_u32(sring::RSP_PROD, Ordering::Acquire));
        let n = (rsp_prod - self.rsp_cons).0;
        if n > (self.req_prod_pvt - self.rsp_cons).0 {
            return Err(RingError::ResponseOverflow {
                rsp_prod: rsp_prod.0,
                rsp_cons: self.rsp_cons.0,
                entries: self.entries,
            });
        }
        Ok(n)
    }

    /// Take the next response, if any.
    pub fn take_response(&mut self) -> Result<Option<Response>, RingError> {
        if self.unconsumed_responses()? == 0 {
            return Ok(None);
        }
        let size = self.abi.response_size();
        // Union slots: the stride is the request size (see BackRing::push_raw_response).
        let off = SRING_HEADER_SIZE
            + (self.rsp_cons.0 & (self.entries - 1)) as usize * self.abi.request_size();
        let mut b = [0u8; 16];
        self.mem.read_bytes(off, &mut b[..size]);
        self.rsp_cons += 1;
        Ok(Some(Response::decode(self.abi, &b)))
    }

    /// `RING_FINAL_CHECK_FOR_RESPONSES`.
    pub fn final_check_for_responses(&mut self) -> Result<bool, RingError> {
        let cons = self.rsp_cons;
        final_check(&self.mem, sring::RSP_EVENT, cons, || {
            self.unconsumed_responses()
        })
    }
}

/// Read one of the four header indices (diagnostics, stats, tests).
pub fn header_index<M: SharedMem>(mem: &M, off: usize) -> u32 {
    debug_assert!(off < 16 && off.is_multiple_of(4));
    mem.load_u32(off, Ordering::Acquire)
}
