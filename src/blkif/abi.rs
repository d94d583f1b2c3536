//! Wire layouts of the blkif shared ring (Xen `io/blkif.h`, `io/ring.h`).
//!
//! The ring is one or more 4 KiB pages shared with the guest: a 64-byte header holding four
//! `u32` indices, then `entries` slots, each large enough for one request or one response
//! (a union in C). Two ABIs exist on x86:
//!
//! | field            | x86_64 (natural alignment) | x86_32 (`u64` aligned to 4) |
//! |------------------|----------------------------|-----------------------------|
//! | request size     | 112                        | 108                         |
//! | `id`             | 8                          | 4                           |
//! | `sector_number`  | 16                         | 12                          |
//! | `seg[11]`        | 24                         | 20                          |
//! | response size    | 16                         | 12                          |
//! | response op / status | 8 / 10                 | 8 / 10                      |
//!
//! Offsets are little-endian byte offsets inside a slot; all decoding in this crate goes through
//! the [`RequestLayout`] tables below, which are checked at compile time and, in the tests,
//! against `#[repr(C)]` mirrors of the C structs on the build target.
//!
//! "Native" follows Linux blkback: it is the ABI of the backend's own architecture, i.e. the
//! layout the C header produces when compiled for dom0. On an x86_64 dom0 that is
//! [`Abi::X86_64`]; on an i686 dom0 (OpenXT 8) it is [`Abi::X86_32`]. A frontend that writes
//! no `protocol` key is assumed to use the native ABI (see [`crate::blkif::xenbus::parse_protocol`]).

/// Size of a Xen page (grant granularity) and the blkif sector unit.
pub use crate::{PAGE_SIZE, SECTOR_SIZE};
/// Sectors in one page: a segment's `last_sect` is at most `SECTORS_PER_PAGE - 1`.
pub const SECTORS_PER_PAGE: u8 = 8;
/// `BLKIF_MAX_SEGMENTS_PER_REQUEST`: segments carried inline in a direct request.
pub const MAX_SEGMENTS_PER_REQUEST: usize = 11;
/// `BLKIF_MAX_INDIRECT_PAGES_PER_REQUEST`: grant refs inline in an indirect request.
pub const MAX_INDIRECT_PAGES_PER_REQUEST: usize = 8;
/// Size of `struct blkif_request_segment` (in a slot and in an indirect page).
pub const SEGMENT_SIZE: usize = 8;
/// Segments per indirect page (`PAGE_SIZE / sizeof(struct blkif_request_segment)`).
pub const SEGMENTS_PER_INDIRECT_PAGE: usize = PAGE_SIZE / SEGMENT_SIZE;
/// Upper bound on indirect segments any request can describe (8 pages of 512).
pub const MAX_INDIRECT_SEGMENTS_ABI: usize =
    MAX_INDIRECT_PAGES_PER_REQUEST * SEGMENTS_PER_INDIRECT_PAGE;
/// Size of the shared ring header (`struct blkif_sring` before `ring[]`).
pub const SRING_HEADER_SIZE: usize = 64;
/// Largest ring-page order this crate accepts (16 pages, 512 entries).
pub const MAX_RING_PAGE_ORDER: u32 = 4;

/// Byte offsets of the four indices in the shared ring header (`DEFINE_RING_TYPES`).
pub mod sring {
    /// `req_prod`: written by the frontend.
    pub const REQ_PROD: usize = 0;
    /// `req_event`: written by the backend (notify me when `req_prod` passes this).
    pub const REQ_EVENT: usize = 4;
    /// `rsp_prod`: written by the backend.
    pub const RSP_PROD: usize = 8;
    /// `rsp_event`: written by the frontend.
    pub const RSP_EVENT: usize = 12;
}

/// Operation codes (`BLKIF_OP_*`).
pub mod op {
    pub const READ: u8 = 0;
    pub const WRITE: u8 = 1;
    pub const WRITE_BARRIER: u8 = 2;
    pub const FLUSH_DISKCACHE: u8 = 3;
    /// Reserved for the (never used) trace op.
    pub const RESERVED_1: u8 = 4;
    pub const DISCARD: u8 = 5;
    pub const INDIRECT: u8 = 6;
}

/// `BLKIF_DISCARD_SECURE` bit of a discard request's `flag` byte.
pub const DISCARD_SECURE: u8 = 1;

/// Byte offsets of every field of a ring slot in one ABI. Offsets common to both ABIs
/// (`operation` @0, `nr_segments`/`flag`/`indirect_op` @1, `handle` @2) are not repeated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestLayout {
    /// Size of one request slot.
    pub size: usize,
    /// `id` of read/write, discard and "other" requests.
    pub id: usize,
    /// `sector_number` of read/write and discard requests.
    pub sector: usize,
    /// `seg[0]` of a read/write request.
    pub seg: usize,
    /// `nr_sectors` of a discard request.
    pub discard_nr_sectors: usize,
    /// `nr_segments` (u16) of an indirect request.
    pub indirect_nr_segments: usize,
    /// `id` of an indirect request.
    pub indirect_id: usize,
    /// `sector_number` of an indirect request.
    pub indirect_sector: usize,
    /// `handle` of an indirect request.
    pub indirect_handle: usize,
    /// `indirect_grefs[0]` of an indirect request.
    pub indirect_grefs: usize,
    /// Size of one response slot.
    pub response_size: usize,
}

/// Response field offsets (identical in both ABIs; only the slot size differs).
pub mod rsp {
    pub const ID: usize = 0;
    pub const OPERATION: usize = 8;
    pub const STATUS: usize = 10;
}

const X86_64: RequestLayout = RequestLayout {
    size: 112,
    id: 8,
    sector: 16,
    seg: 24,
    discard_nr_sectors: 24,
    indirect_nr_segments: 2,
    indirect_id: 8,
    indirect_sector: 16,
    indirect_handle: 24,
    indirect_grefs: 28,
    response_size: 16,
};

const X86_32: RequestLayout = RequestLayout {
    size: 108,
    id: 4,
    sector: 12,
    seg: 20,
    discard_nr_sectors: 20,
    indirect_nr_segments: 2,
    indirect_id: 4,
    indirect_sector: 12,
    indirect_handle: 20,
    indirect_grefs: 24,
    response_size: 12,
};

// Compile-time checks of the tables above against the C headers' structure:
// the segment array ends the slot, the indirect gref array fits, ids are u64 followed by sectors.
const _: () = {
    assert!(X86_64.seg + MAX_SEGMENTS_PER_REQUEST * SEGMENT_SIZE == X86_64.size);
    assert!(X86_32.seg + MAX_SEGMENTS_PER_REQUEST * SEGMENT_SIZE == X86_32.size);
    assert!(X86_64.sector == X86_64.id + 8 && X86_32.sector == X86_32.id + 8);
    // x86_64 indirect: handle u16 @24, pad u16, grefs[8] u32 @28..60, padded to 64.
    assert!(X86_64.indirect_grefs + 4 * MAX_INDIRECT_PAGES_PER_REQUEST + 4 == 64);
    // x86_32 indirect: grefs @24..56, then a u64 pad: 64 bytes.
    assert!(X86_32.indirect_grefs + 4 * MAX_INDIRECT_PAGES_PER_REQUEST + 8 == 64);
    assert!(X86_64.discard_nr_sectors + 8 <= X86_64.size);
    assert!(X86_32.discard_nr_sectors + 8 <= X86_32.size);
    assert!(SEGMENTS_PER_INDIRECT_PAGE == 512);
};

/// Largest slot of any ABI; private slot copies use a buffer of this size.
pub const MAX_REQUEST_SIZE: usize = 112;

/// A ring ABI, selected by the frontend's `protocol` key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Abi {
    /// `x86_32-abi`: i386 guests (packed, `u64` aligned to 4).
    X86_32,
    /// `x86_64-abi`: x86_64 guests (natural alignment).
    X86_64,
}

impl Abi {
    /// The backend's own ABI (what blkback calls `BLKIF_PROTOCOL_NATIVE`).
    pub const NATIVE: Abi = if cfg!(target_arch = "x86") {
        Abi::X86_32
    } else {
        Abi::X86_64
    };

    /// The slot layout of this ABI.
    pub const fn layout(self) -> &'static RequestLayout {
        match self {
            Abi::X86_32 => &X86_32,
            Abi::X86_64 => &X86_64,
        }
    }

    /// Bytes of one request slot (112 or 108).
    pub const fn request_size(self) -> usize {
        self.layout().size
    }

    /// Bytes of one response (16 or 12).
    pub const fn response_size(self) -> usize {
        self.layout().response_size
    }

    /// The `protocol` string a frontend writes for this ABI (`XEN_IO_PROTO_ABI_*`).
    pub const fn protocol_name(self) -> &'static str {
        match self {
            Abi::X86_32 => "x86_32-abi",
            Abi::X86_64 => "x86_64-abi",
        }
    }

    /// Number of slots in a ring of `2^order` pages (`__RING_SIZE`): the largest power of two
    /// that fits after the header. `None` if `order > MAX_RING_PAGE_ORDER`.
    pub const fn ring_entries(self, order: u32) -> Option<u32> {
        if order > MAX_RING_PAGE_ORDER {
            return None;
        }
        let bytes = (PAGE_SIZE << order) - SRING_HEADER_SIZE;
        let fit = bytes / self.request_size();
        // Round down to a power of two (fit >= 36 for order 0).
        let pow = 1usize << (usize::BITS - 1 - fit.leading_zeros());
        Some(pow as u32)
    }

    /// Bytes of shared memory a ring of `2^order` pages occupies.
    pub const fn ring_bytes(order: u32) -> usize {
        PAGE_SIZE << order
    }
}

/// Little-endian field readers over a private slot copy. Callers guarantee the range is in
/// bounds (offsets come from the layout tables and slices of at least the slot size).
pub(crate) fn rd_u16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

pub(crate) fn rd_u32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

pub(crate) fn rd_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

pub(crate) fn wr_u16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}

pub(crate) fn wr_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

pub(crate) fn wr_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}
