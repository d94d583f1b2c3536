//! Request decoding and validation ("parse, then act").
//!
//! [`parse_request`] takes the *private copy* of one ring slot (see
//! [`BackRing::next_request`](crate::blkif::ring::BackRing::next_request)) and returns either a
//! validated [`Request`], an [`IndirectRequest`] whose segment pages the caller must copy in
//! (grant copy) before calling [`IndirectRequest::complete`], or a [`Rejected`] carrying the
//! `id`/`operation` to answer with and the reason, which maps to the response status.

use super::abi::{
    self, op, rd_u16, rd_u32, rd_u64, wr_u16, wr_u32, wr_u64, Abi, DISCARD_SECURE,
    MAX_INDIRECT_PAGES_PER_REQUEST, MAX_INDIRECT_SEGMENTS_ABI, MAX_SEGMENTS_PER_REQUEST, PAGE_SIZE,
    SECTORS_PER_PAGE, SECTOR_SIZE, SEGMENTS_PER_INDIRECT_PAGE, SEGMENT_SIZE,
};

/// Response status (`BLKIF_RSP_*`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    /// `BLKIF_RSP_OKAY` (0).
    Okay,
    /// `BLKIF_RSP_ERROR` (-1).
    Error,
    /// `BLKIF_RSP_EOPNOTSUPP` (-2).
    NotSupported,
}

impl Status {
    /// The wire value.
    pub const fn to_i16(self) -> i16 {
        match self {
            Status::Okay => 0,
            Status::Error => -1,
            Status::NotSupported => -2,
        }
    }

    /// Decode a wire value; anything unknown is `None`.
    pub const fn from_i16(v: i16) -> Option<Status> {
        match v {
            0 => Some(Status::Okay),
            -1 => Some(Status::Error),
            -2 => Some(Status::NotSupported),
            _ => None,
        }
    }
}

/// One data segment: a granted page and the inclusive sector range used in it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Segment {
    /// Grant reference of the guest page.
    pub gref: u32,
    /// First 512-byte sector within the page (0..=7).
    pub first_sect: u8,
    /// Last sector within the page, inclusive (first_sect..=7).
    pub last_sect: u8,
}

impl Segment {
    /// Number of sectors (valid segments only: `1..=8`).
    pub fn sectors(&self) -> u32 {
        u32::from(self.last_sect) - u32::from(self.first_sect) + 1
    }
    /// Byte offset of the data within the guest page.
    pub fn page_offset(&self) -> u16 {
        u16::from(self.first_sect) * 512
    }
    /// Byte length of the data (`sectors * 512`, at most 4096).
    pub fn len(&self) -> u16 {
        // At most 8 * 512 = 4096 for a validated segment.
        (self.sectors() * 512) as u16
    }
    /// Never true for a validated segment (kept for clippy's `len_without_is_empty`).
    pub fn is_empty(&self) -> bool {
        self.last_sect < self.first_sect
    }

    fn decode(b: &[u8]) -> Segment {
        Segment {
            gref: rd_u32(b, 0),
            first_sect: b[4],
            last_sect: b[5],
        }
    }

    /// Encode as `struct blkif_request_segment` (8 bytes, pad zeroed).
    pub fn encode(&self, out: &mut [u8]) {
        wr_u32(out, 0, self.gref);
        out[4] = self.first_sect;
        out[5] = self.last_sect;
        wr_u16(out, 6, 0);
    }
}

/// What a validated request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Operation {
    /// Read into the segments.
    Read,
    /// Write the segments.
    Write,
    /// `WRITE_BARRIER`: write (possibly no data), ordered after every earlier request.
    WriteBarrier,
    /// `FLUSH_DISKCACHE`: make earlier writes durable; segments, if any, are written first.
    Flush,
    /// Discard `nr_sectors` at `sector`.
    Discard {
        /// `BLKIF_DISCARD_SECURE` was set.
        secure: bool,
        /// Sectors to discard.
        nr_sectors: u64,
    },
}

impl Operation {
    /// The `operation` byte echoed in the response (for indirect requests blkback echoes
    /// the inner `indirect_op`, and so do we).
    pub fn wire_op(&self) -> u8 {
        match self {
            Operation::Read => op::READ,
            Operation::Write => op::WRITE,
            Operation::WriteBarrier => op::WRITE_BARRIER,
            Operation::Flush => op::FLUSH_DISKCACHE,
            Operation::Discard { .. } => op::DISCARD,
        }
    }

    /// Whether the operation moves data from the guest to the disk.
    pub fn is_write(&self) -> bool {
        !matches!(self, Operation::Read)
    }
}

/// Segments of a request: inline for direct requests, on the heap for indirect ones.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Segments {
    /// Up to 11 segments stored inline.
    Inline {
        len: u8,
        segs: [Segment; MAX_SEGMENTS_PER_REQUEST],
    },
    /// Segments from indirect pages.
    Heap(Vec<Segment>),
}

impl Segments {
    fn empty() -> Segments {
        Segments::Inline {
            len: 0,
            segs: [Segment::default(); MAX_SEGMENTS_PER_REQUEST],
        }
    }

    /// The segments as a slice.
    pub fn as_slice(&self) -> &[Segment] {
        match self {
            Segments::Inline { len, segs } => &segs[..usize::from(*len)],
            Segments::Heap(v) => v,
        }
    }
}

/// A validated request, owned by the backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Frontend cookie, echoed in the response.
    pub id: u64,
    /// What to do.
    pub op: Operation,
    /// First sector (512-byte units) on the virtual disk.
    pub sector: u64,
    /// The vdev `handle` field (informational).
    pub handle: u16,
    /// Data segments, in order; data are contiguous on disk starting at `sector`.
    pub segments: Segments,
    /// The request came through `BLKIF_OP_INDIRECT`.
    pub indirect: bool,
}

impl Request {
    /// The segments as a slice.
    pub fn segments(&self) -> &[Segment] {
        self.segments.as_slice()
    }

    /// Total data sectors (sum over segments; for discard, the discard length).
    pub fn nr_sectors(&self) -> u64 {
        match self.op {
            Operation::Discard { nr_sectors, .. } => nr_sectors,
            _ => self.segments().iter().map(|s| u64::from(s.sectors())).sum(),
        }
    }

    /// Data bytes carried by the segments.
    pub fn data_len(&self) -> u64 {
        self.segments()
            .iter()
            .map(|s| u64::from(s.len()))
            .sum::<u64>()
    }

    /// The `operation` byte to echo in the response.
    pub fn wire_op(&self) -> u8 {
        self.op.wire_op()
    }
}

/// What the backend supports and what the disk looks like; parsing checks against it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ParseConfig {
    /// Disk size in 512-byte sectors.
    pub disk_sectors: u64,
    /// Writes, barriers with data, flushes with data and discards are rejected.
    pub read_only: bool,
    /// Advertised `feature-max-indirect-segments`; 0 = indirect not supported (EOPNOTSUPP).
    pub max_indirect_segments: u32,
    /// `feature-barrier` advertised (else WRITE_BARRIER → EOPNOTSUPP).
    pub barrier: bool,
    /// `feature-flush-cache` advertised (else FLUSH_DISKCACHE → EOPNOTSUPP).
    pub flush: bool,
    /// `feature-discard` advertised (else DISCARD → EOPNOTSUPP).
    pub discard: bool,
}

impl ParseConfig {
    /// A read/write disk of `disk_sectors` supporting every operation, with 256 indirect
    /// segments (1 MiB requests).
    pub fn new(disk_sectors: u64) -> ParseConfig {
        ParseConfig {
            disk_sectors,
            read_only: false,
            max_indirect_segments: 256,
            barrier: true,
            flush: true,
            discard: true,
        }
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The operation byte is not a blkif operation we know.
    #[error("unknown operation {0}")]
    UnknownOp(u8),
    /// A known operation that this backend does not offer.
    #[error("operation {0} not supported")]
    NotSupported(u8),
    /// `nr_segments` out of range for the operation.
    #[error("bad segment count {count} for operation {op}")]
    BadSegmentCount {
        /// Operation byte (the inner op for indirect requests).
        op: u8,
        /// The count the frontend sent.
        count: u32,
    },
    /// A segment's sector range is empty or leaves the page.
    #[error("segment {index} has bad sector range {first}..={last}")]
    BadSegment {
        /// Segment index within the request.
        index: usize,
        first: u8,
        last: u8,
    },
    /// The request reaches past the end of the disk (or overflows).
    #[error(
        "request at sector {sector} for {sectors} sectors is beyond the disk end {disk_sectors}"
    )]
    OutOfRange {
        sector: u64,
        sectors: u64,
        disk_sectors: u64,
    },
    /// A write-type request on a read-only disk.
    #[error("write to a read-only disk")]
    ReadOnly,
    /// An indirect request whose inner operation is not READ/WRITE.
    #[error("bad indirect operation {0}")]
    BadIndirectOp(u8),
    /// The caller passed fewer indirect page bytes than the request needs.
    #[error("indirect pages too short: need {need} bytes, got {got}")]
    IndirectPagesShort { need: usize, got: usize },
}

impl RequestError {
    /// The response status this error maps to.
    pub fn status(&self) -> Status {
        match self {
            RequestError::UnknownOp(_) | RequestError::NotSupported(_) => Status::NotSupported,
            _ => Status::Error,
        }
    }
}

/// A request that was refused: answer it with `(id, op, error.status())`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("request {id} (operation {op}) rejected")]
pub struct Rejected {
    /// The frontend's cookie, to echo.
    pub id: u64,
    /// The operation byte to echo.
    pub op: u8,
    /// The reason.
    #[source]
    pub error: RequestError,
}

impl Rejected {
    /// The response status.
    pub fn status(&self) -> Status {
        self.error.status()
    }
}

/// The header of a validated indirect request; its segments live in guest pages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndirectRequest {
    /// Frontend cookie.
    pub id: u64,
    /// Inner operation ([`Operation::Read`] or [`Operation::Write`]).
    pub op: Operation,
    /// First sector.
    pub sector: u64,
    /// vdev handle.
    pub handle: u16,
    /// Number of segments (1..=max_indirect_segments).
    pub nr_segments: u16,
    /// Grant refs of the indirect pages actually used (`ceil(nr_segments / 512)` of them).
    pub grefs: Vec<u32>,
}

impl IndirectRequest {
    /// Bytes of indirect-page data needed (`nr_segments * 8`).
    pub fn pages_len(&self) -> usize {
        usize::from(self.nr_segments) * SEGMENT_SIZE
    }

    /// Finish parsing from a *private copy* of the indirect pages, concatenated in `grefs`
    /// order. Only the first [`pages_len`](Self::pages_len) bytes are looked at.
    pub fn complete(&self, pages: &[u8], cfg: &ParseConfig) -> Result<Request, Rejected> {
        let reject = |error| Rejected {
            id: self.id,
            op: self.op.wire_op(),
            error,
        };
        let need = self.pages_len();
        if pages.len() < need {
            return Err(reject(RequestError::IndirectPagesShort {
                need,
                got: pages.len(),
            }));
        }
        let segs: Vec<Segment> = pages[..need]
            .chunks_exact(SEGMENT_SIZE)
            .map(Segment::decode)
            .collect();
        check_segments(&segs).map_err(reject)?;
        let req = Request {
            id: self.id,
            op: self.op,
            sector: self.sector,
            handle: self.handle,
            segments: Segments::Heap(segs),
            indirect: true,
        };
        check_request(&req, cfg).map_err(reject)?;
        Ok(req)
    }
}

/// Outcome of parsing one slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Fully validated.
    Ready(Request),
    /// Header validated; copy `grefs` pages in and call [`IndirectRequest::complete`].
    Indirect(IndirectRequest),
}

fn check_segments(segs: &[Segment]) -> Result<(), RequestError> {
    for (index, s) in segs.iter().enumerate() {
        if s.first_sect > s.last_sect || s.last_sect >= SECTORS_PER_PAGE {
            return Err(RequestError::BadSegment {
                index,
                first: s.first_sect,
                last: s.last_sect,
            });
        }
    }
    Ok(())
}

fn check_range(sector: u64, sectors: u64, disk_sectors: u64) -> Result<(), RequestError> {
    match sector.checked_add(sectors) {
        Some(end) if end <= disk_sectors => Ok(()),
        _ => Err(RequestError::OutOfRange {
            sector,
            sectors,
            disk_sectors,
        }),
    }
}

fn check_request(req: &Request, cfg: &ParseConfig) -> Result<(), RequestError> {
    let writes_data = match req.op {
        Operation::Read => false,
        Operation::Write | Operation::Discard { .. } => true,
        Operation::WriteBarrier | Operation::Flush => !req.segments().is_empty(),
    };
    if writes_data && cfg.read_only {
        return Err(RequestError::ReadOnly);
    }
    // A request without data has no range: Linux blkfront sends an empty flush with
    // sector_number = u64::MAX (an unset `blk_rq_pos`), and answering that with an error
    // makes it switch flushes off for good. Like blkback, only data is range-checked.
    match req.nr_sectors() {
        0 => Ok(()),
        n => check_range(req.sector, n, cfg.disk_sectors),
    }
}

/// Decode and validate the private copy of one ring slot (`slot.len() >= abi.request_size()`;
/// shorter input is treated as zero-padded, so arbitrary bytes never panic).
pub fn parse_request(abi: Abi, slot: &[u8], cfg: &ParseConfig) -> Result<Parsed, Rejected> {
    let l = abi.layout();
    let mut buf = [0u8; abi::MAX_REQUEST_SIZE];
    let n = slot.len().min(l.size);
    buf[..n].copy_from_slice(&slot[..n]);
    let b = &buf[..l.size];

    let operation = b[0];
    if operation == op::INDIRECT {
        return parse_indirect(abi, b, cfg);
    }
    // `id` sits at the same offset in read/write, discard and "other" requests.
    let id = rd_u64(b, l.id);
    let reject = |error| Rejected {
        id,
        op: operation,
        error,
    };
    let handle = rd_u16(b, 2);
    let sector = rd_u64(b, l.sector);
    let op = match operation {
        op::READ => Operation::Read,
        op::WRITE => Operation::Write,
        op::WRITE_BARRIER if cfg.barrier => Operation::WriteBarrier,
        op::FLUSH_DISKCACHE if cfg.flush => Operation::Flush,
        op::DISCARD if cfg.discard => Operation::Discard {
            secure: b[1] & DISCARD_SECURE != 0,
            nr_sectors: rd_u64(b, l.discard_nr_sectors),
        },
        op::WRITE_BARRIER | op::FLUSH_DISKCACHE | op::DISCARD => {
            return Err(reject(RequestError::NotSupported(operation)))
        }
        other => return Err(reject(RequestError::UnknownOp(other))),
    };

    let mut segments = Segments::empty();
    if !matches!(op, Operation::Discard { .. }) {
        let nr = b[1];
        let min = match op {
            Operation::Read | Operation::Write => 1,
            _ => 0,
        };
        if nr < min || usize::from(nr) > MAX_SEGMENTS_PER_REQUEST {
            return Err(reject(RequestError::BadSegmentCount {
                op: operation,
                count: u32::from(nr),
            }));
        }
        if let Segments::Inline { len, segs } = &mut segments {
            *len = nr;
            for (i, s) in segs.iter_mut().take(usize::from(nr)).enumerate() {
                let off = l.seg + i * SEGMENT_SIZE;
                *s = Segment::decode(&b[off..off + SEGMENT_SIZE]);
            }
        }
        check_segments(segments.as_slice()).map_err(reject)?;
    }
    let req = Request {
        id,
        op,
        sector,
        handle,
        segments,
        indirect: false,
    };
    check_request(&req, cfg).map_err(reject)?;
    Ok(Parsed::Ready(req))
}

fn parse_indirect(abi: Abi, b: &[u8], cfg: &ParseConfig) -> Result<Parsed, Rejected> {
    let l = abi.layout();
    let id = rd_u64(b, l.indirect_id);
    let inner = b[1];
    let reject = |op, error| Rejected { id, op, error };
    if cfg.max_indirect_segments == 0 {
        return Err(reject(
            op::INDIRECT,
            RequestError::NotSupported(op::INDIRECT),
        ));
    }
    let op = match inner {
        op::READ => Operation::Read,
        op::WRITE => Operation::Write,
        other => return Err(reject(op::INDIRECT, RequestError::BadIndirectOp(other))),
    };
    let nr_segments = rd_u16(b, l.indirect_nr_segments);
    let max = (cfg.max_indirect_segments as usize).min(MAX_INDIRECT_SEGMENTS_ABI);
    if nr_segments == 0 || usize::from(nr_segments) > max {
        return Err(reject(
            inner,
            RequestError::BadSegmentCount {
                op: inner,
                count: u32::from(nr_segments),
            },
        ));
    }
    let pages = usize::from(nr_segments).div_ceil(SEGMENTS_PER_INDIRECT_PAGE);
    debug_assert!(pages <= MAX_INDIRECT_PAGES_PER_REQUEST);
    let grefs = (0..pages)
        .map(|i| rd_u32(b, l.indirect_grefs + 4 * i))
        .collect();
    let sector = rd_u64(b, l.indirect_sector);
    if op.is_write() && cfg.read_only {
        return Err(reject(inner, RequestError::ReadOnly));
    }
    // The segment sizes are not known yet, but every segment has at least one sector.
    check_range(sector, u64::from(nr_segments), cfg.disk_sectors).map_err(|e| reject(inner, e))?;
    Ok(Parsed::Indirect(IndirectRequest {
        id,
        op,
        sector,
        handle: rd_u16(b, l.indirect_handle),
        nr_segments,
        grefs,
    }))
}

/// A request as a frontend writes it into a slot (encoding side, used by the simulated
/// frontend, tests and benchmarks). Fields are raw: nothing is validated here, so tests can
/// build hostile requests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WireRequest<'a> {
    /// READ/WRITE/WRITE_BARRIER/FLUSH_DISKCACHE or any raw op byte with inline segments.
    /// `nr_segments` is written as given; at most 11 of `segments` are encoded.
    Direct {
        op: u8,
        nr_segments: u8,
        handle: u16,
        id: u64,
        sector: u64,
        segments: &'a [Segment],
    },
    /// DISCARD.
    Discard {
        flag: u8,
        handle: u16,
        id: u64,
        sector: u64,
        nr_sectors: u64,
    },
    /// INDIRECT: `grefs` (at most 8 encoded) name pages holding `nr_segments` segments.
    Indirect {
        indirect_op: u8,
        nr_segments: u16,
        handle: u16,
        id: u64,
        sector: u64,
        grefs: &'a [u32],
    },
}

impl WireRequest<'_> {
    /// Encode into `out[..abi.request_size()]` (the whole slot is written, padding zeroed).
    ///
    /// # Panics
    /// If `out` is shorter than the slot size.
    pub fn encode(&self, abi: Abi, out: &mut [u8]) {
        let l = abi.layout();
        let b = &mut out[..l.size];
        b.fill(0);
        match *self {
            WireRequest::Direct {
                op,
                nr_segments,
                handle,
                id,
                sector,
                segments,
            } => {
                b[0] = op;
                b[1] = nr_segments;
                wr_u16(b, 2, handle);
                wr_u64(b, l.id, id);
                wr_u64(b, l.sector, sector);
                for (i, s) in segments.iter().take(MAX_SEGMENTS_PER_REQUEST).enumerate() {
                    let off = l.seg + i * SEGMENT_SIZE;
                    s.encode(&mut b[off..off + SEGMENT_SIZE]);
                }
            }
            WireRequest::Discard {
                flag,
                handle,
                id,
                sector,
                nr_sectors,
            } => {
                b[0] = op::DISCARD;
                b[1] = flag;
                wr_u16(b, 2, handle);
                wr_u64(b, l.id, id);
                wr_u64(b, l.sector, sector);
                wr_u64(b, l.discard_nr_sectors, nr_sectors);
            }
            WireRequest::Indirect {
                indirect_op,
                nr_segments,
                handle,
                id,
                sector,
                grefs,
            } => {
                b[0] = op::INDIRECT;
                b[1] = indirect_op;
                wr_u16(b, l.indirect_nr_segments, nr_segments);
                wr_u64(b, l.indirect_id, id);
                wr_u64(b, l.indirect_sector, sector);
                wr_u16(b, l.indirect_handle, handle);
                for (i, g) in grefs
                    .iter()
                    .take(MAX_INDIRECT_PAGES_PER_REQUEST)
                    .enumerate()
                {
                    wr_u32(b, l.indirect_grefs + 4 * i, *g);
                }
            }
        }
    }
}

/// Encode segments into indirect pages (8 bytes each, 512 per page).
///
/// # Panics
/// If `out` is shorter than `segs.len() * 8`.
pub fn encode_indirect_segments(segs: &[Segment], out: &mut [u8]) {
    for (s, chunk) in segs.iter().zip(out.chunks_exact_mut(SEGMENT_SIZE)) {
        s.encode(chunk);
    }
}

/// A response as read from or written to a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Response {
    /// Echoed request id.
    pub id: u64,
    /// Echoed operation byte.
    pub op: u8,
    /// Raw status (`Status::to_i16` for values we produce).
    pub status: i16,
}

impl Response {
    /// Encode into `out[..abi.response_size()]` (padding zeroed).
    pub fn encode(&self, abi: Abi, out: &mut [u8]) {
        let b = &mut out[..abi.response_size()];
        b.fill(0);
        wr_u64(b, abi::rsp::ID, self.id);
        b[abi::rsp::OPERATION] = self.op;
        wr_u16(b, abi::rsp::STATUS, self.status as u16);
    }

    /// Decode from `b[..abi.response_size()]`.
    pub fn decode(_abi: Abi, b: &[u8]) -> Response {
        Response {
            id: rd_u64(b, abi::rsp::ID),
            op: b[abi::rsp::OPERATION],
            status: rd_u16(b, abi::rsp::STATUS) as i16,
        }
    }
}

/// Bytes of guest data one indirect page can describe (512 segments of one page each).
pub const INDIRECT_PAGE_DATA: u64 = (SEGMENTS_PER_INDIRECT_PAGE * PAGE_SIZE) as u64;

/// Sector count of a byte length (helper for frontends).
pub const fn bytes_to_sectors(bytes: u64) -> u64 {
    bytes / SECTOR_SIZE
}
