//! Xen OS interfaces: grant copy/map (`/dev/xen/gntdev`), event channels (`/dev/xen/evtchn`)
//! and xenstore, each as a trait with a real implementation and an in-process simulation
//! (`sim`, only with the cargo feature `sim`: tests and benchmarks turn it on, release
//! builds leave it out).
//!
//! With `capi`, this is the only module of the crate allowed to use `unsafe` (ioctls, mmap,
//! raw shared memory). Every `unsafe` block carries a `// SAFETY:` comment.
//!
//! ```text
//!  traits (this file)      real                           sim
//!  GrantCopier ─────────── gntdev::GntDev (GRANT_COPY) ── sim::SimGrants (memcpy + checks)
//!  GrantMapper ─────────── gntdev::GntDev (MAP + mmap) ── sim::SimGrants (memfd page aliasing)
//!  EventChannel ────────── evtchn::EvtchnDev ──────────── sim::SimEvtchn (eventfd)
//!  xenstore::XenStore ──── xenstore::XsClient (wire) ──── sim::MemXenStore / MemXsConn
//!                                                         sim::SimBlkfront (drives all of them)
//! ```

pub mod evtchn;
pub mod gntdev;
pub mod mem;
#[cfg(any(test, feature = "sim"))]
pub mod sim;
pub mod sys;
pub mod xenstore;

use std::io;
use std::os::fd::AsFd;

pub use mem::MappedRegion;
pub use xenstore::{transaction, Tx, WatchEvent, XenStore, XsError};

use crate::blkif::SharedMem;

/// A Xen domain id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DomId(pub u16);

/// A grant reference.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GrantRef(pub u32);

/// An event-channel port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Port(pub u32);

/// The Xen page size used by grants: the crate's one page constant under Xen's name.
pub use crate::PAGE_SIZE as XEN_PAGE_SIZE;

/// One grant-copy segment: `len` bytes at `page_off` in the granted page `gref`, to or from
/// `buf[buf_off..buf_off + len]` in the caller's buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CopySeg {
    pub gref: GrantRef,
    pub page_off: u16,
    pub len: u16,
    pub buf_off: usize,
}

/// `GNTST_*` status codes of a grant operation (`grant_table.h`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GrantStatus {
    /// `GNTST_okay` (0).
    Okay,
    /// `GNTST_general_error` (-1).
    GeneralError,
    /// `GNTST_bad_domain` (-2).
    BadDomain,
    /// `GNTST_bad_gntref` (-3).
    BadGntRef,
    /// `GNTST_bad_handle` (-4).
    BadHandle,
    /// `GNTST_bad_virt_addr` (-5).
    BadVirtAddr,
    /// `GNTST_bad_dev_addr` (-6).
    BadDevAddr,
    /// `GNTST_no_device_space` (-7).
    NoDeviceSpace,
    /// `GNTST_permission_denied` (-8).
    PermissionDenied,
    /// `GNTST_bad_page` (-9).
    BadPage,
    /// `GNTST_bad_copy_arg` (-10): copy extends past the page.
    BadCopyArg,
    /// `GNTST_address_too_big` (-11).
    AddressTooBig,
    /// `GNTST_eagain` (-12).
    Eagain,
    /// `GNTST_no_space` (-13).
    NoSpace,
    /// A value not in the table.
    Other(i16),
}

impl GrantStatus {
    /// From the wire value.
    pub fn from_i16(v: i16) -> GrantStatus {
        use GrantStatus::*;
        match v {
            0 => Okay,
            -1 => GeneralError,
            -2 => BadDomain,
            -3 => BadGntRef,
            -4 => BadHandle,
            -5 => BadVirtAddr,
            -6 => BadDevAddr,
            -7 => NoDeviceSpace,
            -8 => PermissionDenied,
            -9 => BadPage,
            -10 => BadCopyArg,
            -11 => AddressTooBig,
            -12 => Eagain,
            -13 => NoSpace,
            o => Other(o),
        }
    }

    /// The wire value.
    pub fn to_i16(self) -> i16 {
        use GrantStatus::*;
        match self {
            Okay => 0,
            GeneralError => -1,
            BadDomain => -2,
            BadGntRef => -3,
            BadHandle => -4,
            BadVirtAddr => -5,
            BadDevAddr => -6,
            NoDeviceSpace => -7,
            PermissionDenied => -8,
            BadPage => -9,
            BadCopyArg => -10,
            AddressTooBig => -11,
            Eagain => -12,
            NoSpace => -13,
            Other(v) => v,
        }
    }
}

/// Grant-copy failures.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// A segment does not fit the caller's buffer or the 4 KiB page; nothing was copied.
    #[error("grant copy segment {index} is out of bounds")]
    OutOfBounds {
        /// Index of the offending segment.
        index: usize,
    },
    /// Some segments failed; the others were copied.
    #[error("grant copy segment {index} failed with {status:?} ({failed} segments failed)")]
    Segment {
        /// The first failed segment.
        index: usize,
        /// Its status.
        status: GrantStatus,
        /// Number of failed segments.
        failed: usize,
    },
    /// The copy call itself failed (statuses undefined).
    #[error("grant copy failed")]
    Io(#[source] io::Error),
}

/// Check every segment against the buffer and the page before anything is copied (shared by
/// the real and simulated copiers).
pub fn check_copy_segs(segs: &[CopySeg], buf_len: usize) -> Result<(), CopyError> {
    for (index, s) in segs.iter().enumerate() {
        let len = usize::from(s.len);
        let page_ok = usize::from(s.page_off) + len <= XEN_PAGE_SIZE;
        let buf_ok = s.buf_off.checked_add(len).is_some_and(|end| end <= buf_len);
        if !page_ok || !buf_ok {
            return Err(CopyError::OutOfBounds { index });
        }
    }
    Ok(())
}

/// Data movement between guest pages and local buffers (`IOCTL_GNTDEV_GRANT_COPY`).
pub trait GrantCopier {
    /// Guest pages → `dst[seg.buf_off..][..seg.len]`. Fails before copying anything if a
    /// segment is out of bounds; otherwise reports the first segment whose status is not okay.
    fn copy_from_guest(
        &self,
        dom: DomId,
        segs: &[CopySeg],
        dst: &mut [u8],
    ) -> Result<(), CopyError>;
    /// `src[seg.buf_off..][..seg.len]` → guest pages.
    fn copy_to_guest(&self, dom: DomId, segs: &[CopySeg], src: &[u8]) -> Result<(), CopyError>;
    /// Several copies with `dom` at once, each with its own buffer, direction and result
    /// (`GuestCopy::result`): the real device issues one `IOCTL_GNTDEV_GRANT_COPY` for all
    /// of them (split only beyond [`MAX_BATCH_SEGS`] segments), so a ring's batch of requests
    /// costs one call instead of one per request. A copy whose segments are out of bounds
    /// fails alone, before anything is copied for it; the others go ahead. The default runs
    /// them one by one.
    fn copy_batch(&self, dom: DomId, copies: &mut [GuestCopy<'_>]) {
        for c in copies.iter_mut() {
            c.result = match &mut c.buf {
                CopyBuf::FromGuest(b) => self.copy_from_guest(dom, c.segs, b),
                CopyBuf::ToGuest(b) => self.copy_to_guest(dom, c.segs, b),
            };
        }
    }
}

/// Segments per grant-copy call of [`GrantCopier::copy_batch`]: a batch with more is split
/// (between copies; a single bigger copy goes alone). 4096 segments of 24/32 bytes is a
/// 96/128 KiB argument array, 16 MiB of data.
pub const MAX_BATCH_SEGS: usize = 4096;

/// The local buffer of one copy in a batch, and the direction.
#[derive(Debug)]
pub enum CopyBuf<'a> {
    /// Guest pages → this buffer.
    FromGuest(&'a mut [u8]),
    /// This buffer → guest pages.
    ToGuest(&'a [u8]),
}

impl CopyBuf<'_> {
    /// The buffer's length.
    pub fn len(&self) -> usize {
        match self {
            CopyBuf::FromGuest(b) => b.len(),
            CopyBuf::ToGuest(b) => b.len(),
        }
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One copy of a [`GrantCopier::copy_batch`]: its segments (offsets into `buf`), its buffer
/// and, after the call, its result.
#[derive(Debug)]
pub struct GuestCopy<'a> {
    pub segs: &'a [CopySeg],
    pub buf: CopyBuf<'a>,
    pub result: Result<(), CopyError>,
}

impl<'a> GuestCopy<'a> {
    /// A copy not yet done (`result` is `Ok` until the batch runs).
    pub fn new(segs: &'a [CopySeg], buf: CopyBuf<'a>) -> GuestCopy<'a> {
        GuestCopy {
            segs,
            buf,
            result: Ok(()),
        }
    }
}

/// Grant mapping of ring pages (`IOCTL_GNTDEV_MAP_GRANT_REF` + `mmap`).
pub trait GrantMapper {
    /// The mapping; dropping it unmaps.
    type Mapping: SharedMem + Send + Sync + 'static;
    /// Map `refs` of `dom`, in order, into one contiguous range.
    fn map(&self, dom: DomId, refs: &[GrantRef], writable: bool) -> io::Result<Self::Mapping>;
}

/// Interdomain event channels (`/dev/xen/evtchn`). The fd becomes readable when a bound
/// port has a pending event; poll it, then call [`pending`](Self::pending).
pub trait EventChannel: AsFd {
    /// Bind a local port to `(dom, remote)`. The new port starts with one pending event
    /// (Xen marks it pending on bind): treat spurious events as normal.
    fn bind_interdomain(&self, dom: DomId, remote: Port) -> io::Result<Port>;
    /// Unbind a local port.
    fn unbind(&self, local: Port) -> io::Result<()>;
    /// Signal the remote end of `local`.
    fn notify(&self, local: Port) -> io::Result<()>;
    /// Next port with a delivered event, or `None` (non-blocking). The port stays masked until
    /// [`unmask`](Self::unmask).
    fn pending(&self) -> io::Result<Option<Port>>;
    /// Re-enable delivery on `local`.
    fn unmask(&self, local: Port) -> io::Result<()>;
}
