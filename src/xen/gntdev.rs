//! `/dev/xen/gntdev`: grant copy for request data and grant mapping for ring pages.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::mem::MappedRegion;
use super::sys::{
    GntCopyForeign, GntCopyPtr, GntdevGrantCopySegment, GntdevGrantRef, IoctlGntdevGrantCopy,
    IoctlGntdevMapGrantRef, IoctlGntdevUnmapGrantRef, GNTCOPY_DEST_GREF, GNTCOPY_SOURCE_GREF,
    IOCTL_GNTDEV_GRANT_COPY, IOCTL_GNTDEV_MAP_GRANT_REF, IOCTL_GNTDEV_UNMAP_GRANT_REF,
};
use super::{
    check_copy_segs, CopyBuf, CopyError, CopySeg, DomId, GrantCopier, GrantMapper, GrantRef,
    GrantStatus, GuestCopy, MAX_BATCH_SEGS, XEN_PAGE_SIZE,
};
use crate::blkif::SharedMem;

/// Default device path.
pub const GNTDEV_PATH: &str = "/dev/xen/gntdev";

/// An open gntdev handle.
#[derive(Debug, Clone)]
pub struct GntDev {
    fd: Arc<OwnedFd>,
}

impl GntDev {
    /// Open [`GNTDEV_PATH`].
    pub fn open() -> io::Result<GntDev> {
        GntDev::open_path(Path::new(GNTDEV_PATH))
    }

    /// Open a gntdev node at `path` (read-write, close-on-exec).
    pub fn open_path(path: &Path) -> io::Result<GntDev> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC)
            .open(path)?;
        Ok(GntDev {
            fd: Arc::new(f.into()),
        })
    }

    fn copy(
        &self,
        dom: DomId,
        segs: &[CopySeg],
        buf: *mut u8,
        to_guest: bool,
    ) -> Result<(), CopyError> {
        let mut ksegs = Vec::with_capacity(segs.len());
        push_ksegs(&mut ksegs, dom, segs, buf, to_guest);
        self.ioctl_copy(&mut ksegs)?;
        first_failure(ksegs.iter().map(|k| k.status))
    }

    /// One `IOCTL_GNTDEV_GRANT_COPY` over `ksegs` (statuses filled in).
    fn ioctl_copy(&self, ksegs: &mut [GntdevGrantCopySegment]) -> Result<(), CopyError> {
        let count = u32::try_from(ksegs.len())
            .map_err(|_| CopyError::Io(io::Error::from(io::ErrorKind::InvalidInput)))?;
        let mut arg = IoctlGntdevGrantCopy {
            count,
            segments: ksegs.as_mut_ptr(),
        };
        // SAFETY: `arg` points at `count` initialised segments that live until the call returns;
        // each local address lies inside a buffer of the caller (bounds checked before), which
        // is borrowed (mutably for reads from the guest) for the whole call.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), IOCTL_GNTDEV_GRANT_COPY, &mut arg) };
        if rc < 0 {
            return Err(CopyError::Io(io::Error::last_os_error()));
        }
        Ok(())
    }
}

/// Append the kernel segments of one copy (`buf`: the local buffer, bounds already checked).
fn push_ksegs(
    ksegs: &mut Vec<GntdevGrantCopySegment>,
    dom: DomId,
    segs: &[CopySeg],
    buf: *mut u8,
    to_guest: bool,
) {
    ksegs.extend(segs.iter().map(|s| {
        let foreign = GntCopyPtr {
            foreign: GntCopyForeign {
                gref: s.gref.0,
                offset: s.page_off,
                domid: dom.0,
            },
        };
        // `buf_off + len <= buf.len()` was checked by the caller (check_copy_segs), so
        // this stays inside the caller's buffer; wrapping_add avoids any UB question.
        let local = GntCopyPtr {
            virt: buf.wrapping_add(s.buf_off).cast(),
        };
        let (source, dest, flags) = if to_guest {
            (local, foreign, GNTCOPY_DEST_GREF)
        } else {
            (foreign, local, GNTCOPY_SOURCE_GREF)
        };
        GntdevGrantCopySegment {
            source,
            dest,
            len: s.len,
            flags,
            status: 0,
        }
    }));
}

/// Turn per-segment statuses into a result (first failure reported).
pub(crate) fn first_failure(statuses: impl Iterator<Item = i16>) -> Result<(), CopyError> {
    let mut first = None;
    let mut failed = 0;
    for (i, st) in statuses.enumerate() {
        if st != 0 {
            failed += 1;
            first.get_or_insert((i, st));
        }
    }
    match first {
        None => Ok(()),
        Some((index, st)) => Err(CopyError::Segment {
            index,
            status: GrantStatus::from_i16(st),
            failed,
        }),
    }
}

impl GrantCopier for GntDev {
    fn copy_from_guest(
        &self,
        dom: DomId,
        segs: &[CopySeg],
        dst: &mut [u8],
    ) -> Result<(), CopyError> {
        check_copy_segs(segs, dst.len())?;
        self.copy(dom, segs, dst.as_mut_ptr(), false)
    }

    fn copy_to_guest(&self, dom: DomId, segs: &[CopySeg], src: &[u8]) -> Result<(), CopyError> {
        check_copy_segs(segs, src.len())?;
        // The kernel only reads through this pointer (it is the copy source).
        self.copy(dom, segs, src.as_ptr().cast_mut(), true)
    }

    /// One ioctl for the whole batch (per [`MAX_BATCH_SEGS`] segments).
    fn copy_batch(&self, dom: DomId, copies: &mut [GuestCopy<'_>]) {
        let mut ksegs: Vec<GntdevGrantCopySegment> = Vec::new();
        // Copies in the current call: (index, first kernel segment, segment count).
        let mut spans: Vec<(usize, usize, usize)> = Vec::new();
        let mut i = 0;
        while i < copies.len() {
            ksegs.clear();
            spans.clear();
            while i < copies.len() {
                let c = &mut copies[i];
                if !spans.is_empty() && ksegs.len() + c.segs.len() > MAX_BATCH_SEGS {
                    break;
                }
                c.result = check_copy_segs(c.segs, c.buf.len());
                if c.result.is_ok() {
                    let (ptr, to_guest) = match &mut c.buf {
                        CopyBuf::FromGuest(b) => (b.as_mut_ptr(), false),
                        // The kernel only reads through this pointer (the copy source).
                        CopyBuf::ToGuest(b) => (b.as_ptr().cast_mut(), true),
                    };
                    spans.push((i, ksegs.len(), c.segs.len()));
                    push_ksegs(&mut ksegs, dom, c.segs, ptr, to_guest);
                }
                i += 1;
            }
            if ksegs.is_empty() {
                continue;
            }
            match self.ioctl_copy(&mut ksegs) {
                Ok(()) => {
                    for &(ci, at, n) in &spans {
                        copies[ci].result =
                            first_failure(ksegs[at..at + n].iter().map(|k| k.status));
                    }
                }
                Err(e) => {
                    let errno = match &e {
                        CopyError::Io(io) => io.raw_os_error().unwrap_or(libc::EIO),
                        _ => libc::EIO,
                    };
                    for &(ci, _, _) in &spans {
                        copies[ci].result = Err(CopyError::Io(io::Error::from_raw_os_error(errno)));
                    }
                }
            }
        }
    }
}

/// A grant mapping of ring pages; dropping it unmaps (`munmap`, then `UNMAP_GRANT_REF`).
#[derive(Debug)]
pub struct GntMapping {
    region: Option<MappedRegion>,
    fd: Arc<OwnedFd>,
    index: u64,
    count: u32,
}

impl GntMapping {
    fn region(&self) -> &MappedRegion {
        // Present from construction until drop.
        self.region.as_ref().expect("mapping present until drop")
    }
}

impl Drop for GntMapping {
    fn drop(&mut self) {
        drop(self.region.take());
        let mut arg = IoctlGntdevUnmapGrantRef {
            index: self.index,
            count: self.count,
            pad: 0,
        };
        // SAFETY: `arg` is a valid, initialised struct for the duration of the call.
        let rc =
            unsafe { libc::ioctl(self.fd.as_raw_fd(), IOCTL_GNTDEV_UNMAP_GRANT_REF, &mut arg) };
        if rc < 0 {
            log::error!("gntdev unmap failed: {}", io::Error::last_os_error());
        }
    }
}

impl SharedMem for GntMapping {
    fn size(&self) -> usize {
        self.region().size()
    }
    fn load_u32(&self, off: usize, order: Ordering) -> u32 {
        self.region().load_u32(off, order)
    }
    fn store_u32(&self, off: usize, val: u32, order: Ordering) {
        self.region().store_u32(off, val, order)
    }
    fn read_bytes(&self, off: usize, buf: &mut [u8]) {
        self.region().read_bytes(off, buf)
    }
    fn write_bytes(&self, off: usize, data: &[u8]) {
        self.region().write_bytes(off, data)
    }
}

impl GrantMapper for GntDev {
    type Mapping = GntMapping;

    fn map(&self, dom: DomId, refs: &[GrantRef], writable: bool) -> io::Result<GntMapping> {
        if refs.is_empty() || refs.len() > 1 << crate::blkif::abi::MAX_RING_PAGE_ORDER {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        // The header is followed by `count - 1` more refs: build it in a u64-aligned buffer.
        let hdr = size_of::<IoctlGntdevMapGrantRef>();
        let extra = (refs.len() - 1) * size_of::<GntdevGrantRef>();
        let mut words = vec![0u64; (hdr + extra).div_ceil(8)];
        let base = words.as_mut_ptr().cast::<u8>();
        let head = IoctlGntdevMapGrantRef {
            count: refs.len() as u32,
            pad: 0,
            index: 0,
            refs: [GntdevGrantRef::default()],
        };
        // SAFETY: `words` is large enough for the header plus all refs and 8-aligned, which
        // satisfies the alignment of both structs; the writes stay inside the allocation.
        unsafe {
            base.cast::<IoctlGntdevMapGrantRef>().write(head);
            let first = base.add(std::mem::offset_of!(IoctlGntdevMapGrantRef, refs));
            for (i, r) in refs.iter().enumerate() {
                first.cast::<GntdevGrantRef>().add(i).write(GntdevGrantRef {
                    domid: u32::from(dom.0),
                    gref: r.0,
                });
            }
        }
        // SAFETY: the buffer holds a valid variable-length map struct for `count` refs and
        // lives across the call; the kernel writes `index` inside it.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), IOCTL_GNTDEV_MAP_GRANT_REF, base) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: initialised above and updated by the kernel; aligned.
        let index = unsafe { base.cast::<IoctlGntdevMapGrantRef>().read().index };
        let len = refs.len() * XEN_PAGE_SIZE;
        let offset = libc::off_t::try_from(index)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidData))?;
        let mapped = MappedRegion::map_fd(self.fd.as_fd(), offset, len, writable);
        let region = match mapped {
            Ok(r) => r,
            Err(e) => {
                let mut arg = IoctlGntdevUnmapGrantRef {
                    index,
                    count: refs.len() as u32,
                    pad: 0,
                };
                // SAFETY: valid struct for the call; releases the grant map we just made.
                unsafe { libc::ioctl(self.fd.as_raw_fd(), IOCTL_GNTDEV_UNMAP_GRANT_REF, &mut arg) };
                return Err(e);
            }
        };
        Ok(GntMapping {
            region: Some(region),
            fd: Arc::clone(&self.fd),
            index,
            count: refs.len() as u32,
        })
    }
}
