//! The Xen block-interface protocol: shared ring ABIs, request parsing and xenbus vocabulary.
//!
//! Pure protocol code: no OS calls, safe Rust only (`forbid(unsafe_code)`, set on the
//! module in `src/lib.rs`). Shared memory is reached through the [`SharedMem`] trait
//! (implemented by `xen` for grant mappings and simulated pages, and by [`HeapMem`] for
//! tests).
//!
//! ```text
//!  BackRing::next_request ──copy slot once──► parse_request ──► Parsed::Ready(Request)
//!        │                                                  └─► Parsed::Indirect(hdr) ──grant copy
//!        │                                                        pages──► hdr.complete()
//!        └─ push_response / push_responses_and_check_notify / final_check_for_requests
//! ```
//!
//! Differences from the C tapdisk, on purpose: direct requests carry at most 11 segments;
//! `last_sect <= 7` is enforced; the sector range and read-only checks happen at parse time;
//! FLUSH/DISCARD/INDIRECT are parsed (whether they are offered is a [`ParseConfig`] choice,
//! otherwise they get `EOPNOTSUPP`); a missing `protocol` means the native ABI.

pub mod abi;
pub mod request;
pub mod ring;
pub mod xenbus;

pub use abi::{op, Abi, PAGE_SIZE, SECTOR_SIZE};
pub use request::{
    encode_indirect_segments, parse_request, IndirectRequest, Operation, ParseConfig, Parsed,
    Rejected, Request, RequestError, Response, Segment, Segments, Status, WireRequest,
};
pub use ring::{BackRing, FrontRing, HeapMem, RingError, SharedMem, Taken};
pub use xenbus::{XenbusError, XenbusState};
