//! Completion tags: what a job in the [I/O engine](super::io) carries so that the event loop
//! can route its result.
//!
//! Neutral ground between the two front doors (blkif rings in `xenio`, NBD in
//! `daemon/nbd_export.rs`) and the loop: both build a [`Door`] here, [`Vbd::begin_io`]
//! wraps it into a [`Tag::Io`] and the loop hands the completion back to the door that made it,
//! after [`Vbd::end_io`] counted it. Nothing here depends on either door.
//!
//! [`Vbd::begin_io`]: super::vbd::Vbd::begin_io
//! [`Vbd::end_io`]: super::vbd::Vbd::end_io

use crate::blkif::Segments;
use crate::image::SECTOR_SIZE;

/// Routing of an I/O completion.
#[derive(Debug)]
pub(crate) enum Tag {
    /// A guest request on VBD `minor`, counted in its in-flight and stats.
    Io {
        minor: u16,
        acct: IoAcct,
        door: Door,
    },
    /// The image of an OPEN.
    Open { minor: u16 },
    /// The image of a RESUME.
    Resume { minor: u16 },
    /// The VBD's image closed (PAUSE or CLOSE).
    CloseImage { minor: u16 },
    /// An image nobody uses closed (a failed OPEN's, a mismatching RESUME's).
    CloseUnused,
}

/// How a guest request counts in the VBD's stats (blktap's JSON: `secs`, `hits`, `fail`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct IoAcct {
    /// Counts in the write column (`[1]`), else the read column (`[0]`).
    pub write: bool,
    /// Sectors added to `secs` when it succeeds.
    pub sectors: u64,
}

/// The front door a guest request came through, and what it needs at completion.
#[derive(Debug)]
pub(crate) enum Door {
    Ring(RingTag),
    Nbd(NbdTag),
}

/// A blkif ring request (`xenio`).
#[derive(Debug)]
pub(crate) struct RingTag {
    /// The ring's id in `Rings`.
    pub ring: u64,
    /// The guest's request id and wire operation (echoed in the response).
    pub id: u64,
    pub op: u8,
    pub kind: RingKind,
    /// Private buffer bytes the request holds.
    pub bytes: usize,
}

#[derive(Debug)]
pub(crate) enum RingKind {
    /// The data goes to the guest at completion, into these segments (packed in the buffer).
    Read {
        segs: Segments,
        sectors: u64,
    },
    Write {
        sectors: u64,
    },
    /// FLUSH_DISKCACHE or WRITE_BARRIER (with its own data, if any).
    Sync {
        sectors: u64,
    },
    Discard,
}

impl RingKind {
    pub fn acct(&self) -> IoAcct {
        match *self {
            RingKind::Read { sectors, .. } => IoAcct {
                write: false,
                sectors,
            },
            RingKind::Write { sectors } | RingKind::Sync { sectors } => IoAcct {
                write: true,
                sectors,
            },
            RingKind::Discard => IoAcct {
                write: true,
                sectors: 0,
            },
        }
    }
}

/// An NBD request (`daemon/nbd_export.rs`).
#[derive(Debug)]
pub(crate) struct NbdTag {
    /// The connection (ids are never reused).
    pub conn: u64,
    pub cookie: u64,
    pub req: NbdReq,
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum NbdReq {
    Read {
        offset: u64,
        len: u32,
        skip: usize,
    },
    /// WRITE (`payload`: a data buffer is held) or WRITE_ZEROES.
    Write {
        nsectors: u64,
        payload: bool,
    },
    Other,
    BlockStatus {
        offset: u64,
        len: u32,
        req_one: bool,
    },
}

impl NbdReq {
    /// Buffer memory the request holds while in flight.
    pub fn mem_bytes(&self) -> u64 {
        match *self {
            NbdReq::Read { len, .. } => u64::from(len),
            NbdReq::Write {
                nsectors,
                payload: true,
            } => nsectors * SECTOR_SIZE,
            _ => 0,
        }
    }

    /// Writes and zeroing count as writes; everything else (flush, trim, block status)
    /// counts in the read column with no sectors.
    pub fn acct(&self) -> IoAcct {
        match *self {
            NbdReq::Read { len, .. } => IoAcct {
                write: false,
                sectors: u64::from(len).div_ceil(SECTOR_SIZE),
            },
            NbdReq::Write { nsectors, .. } => IoAcct {
                write: true,
                sectors: nsectors,
            },
            NbdReq::Other | NbdReq::BlockStatus { .. } => IoAcct {
                write: false,
                sectors: 0,
            },
        }
    }
}
