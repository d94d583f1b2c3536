//! Simulated guest memory and grant tables.

use std::collections::HashMap;
use std::io;
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::sys::mman::{mmap, mmap_anonymous, MapFlags, ProtFlags};

use super::evtchn::EvtHub;
use super::SimEvtchn;
use crate::blkif::SharedMem;
use crate::xen::gntdev::first_failure;
use crate::xen::mem::MappedRegion;
use crate::xen::{
    check_copy_segs, CopyBuf, CopyError, CopySeg, DomId, GrantCopier, GrantMapper, GrantRef,
    GrantStatus, GuestCopy, XEN_PAGE_SIZE,
};

/// First grant ref handed out (Linux reserves the first 8 entries).
const FIRST_GREF: u32 = 8;

#[derive(Clone, Copy, Debug)]
struct GrantEntry {
    page: usize,
    to: DomId,
    readonly: bool,
    maps: u32,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A simulated domain: `pages` pages of memfd-backed memory and a grant table.
#[derive(Debug)]
pub struct SimDomain {
    dom: DomId,
    memfd: OwnedFd,
    mem: MappedRegion,
    pages: usize,
    table: Mutex<Vec<Option<GrantEntry>>>,
    free_pages: Mutex<Vec<usize>>,
}

impl SimDomain {
    fn new(dom: DomId, pages: usize) -> io::Result<SimDomain> {
        let memfd = memfd_create(c"simdomain", MFdFlags::MFD_CLOEXEC)?;
        let len = pages
            .checked_mul(XEN_PAGE_SIZE)
            .ok_or(io::ErrorKind::InvalidInput)?;
        nix::unistd::ftruncate(
            &memfd,
            libc::off_t::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?,
        )?;
        let mem = MappedRegion::map_fd(memfd.as_fd(), 0, len, true)?;
        Ok(SimDomain {
            dom,
            memfd,
            mem,
            pages,
            table: Mutex::new(Vec::new()),
            free_pages: Mutex::new((0..pages).rev().collect()),
        })
    }

    /// The domain id.
    pub fn dom(&self) -> DomId {
        self.dom
    }

    /// The domain's whole memory (the guest's own view).
    pub fn mem(&self) -> &MappedRegion {
        &self.mem
    }

    /// Number of pages.
    pub fn pages(&self) -> usize {
        self.pages
    }

    /// Take a free page (zeroed).
    pub fn alloc_page(&self) -> Option<usize> {
        let p = lock(&self.free_pages).pop()?;
        self.mem.write_at(p * XEN_PAGE_SIZE, &[0u8; XEN_PAGE_SIZE]);
        Some(p)
    }

    /// Return a page to the free list.
    pub fn free_page(&self, page: usize) {
        lock(&self.free_pages).push(page);
    }

    /// Byte offset of a page in [`mem`](Self::mem).
    pub fn page_offset(page: usize) -> usize {
        page * XEN_PAGE_SIZE
    }

    /// Grant `page` to `to` (`gnttab_grant_foreign_access`).
    pub fn grant(&self, page: usize, to: DomId, readonly: bool) -> GrantRef {
        assert!(page < self.pages, "page {page} outside the domain");
        let mut t = lock(&self.table);
        let entry = GrantEntry {
            page,
            to,
            readonly,
            maps: 0,
        };
        if let Some(i) = t.iter().position(Option::is_none) {
            t[i] = Some(entry);
            return GrantRef(FIRST_GREF + i as u32);
        }
        t.push(Some(entry));
        GrantRef(FIRST_GREF + (t.len() - 1) as u32)
    }

    /// End a grant (`gnttab_end_foreign_access`); false if it is unknown or still mapped.
    pub fn revoke(&self, gref: GrantRef) -> bool {
        let mut t = lock(&self.table);
        match gref
            .0
            .checked_sub(FIRST_GREF)
            .and_then(|i| t.get_mut(i as usize))
        {
            Some(slot @ Some(_)) if slot.as_ref().is_some_and(|e| e.maps == 0) => {
                *slot = None;
                true
            }
            _ => false,
        }
    }

    fn lookup(&self, gref: GrantRef) -> Option<GrantEntry> {
        lookup_in(&lock(&self.table), gref)
    }

    fn adjust_maps(&self, gref: GrantRef, delta: i32) {
        let mut t = lock(&self.table);
        if let Some(Some(e)) = gref
            .0
            .checked_sub(FIRST_GREF)
            .and_then(|i| t.get_mut(i as usize))
        {
            e.maps = e.maps.saturating_add_signed(delta);
        }
    }
}

fn lookup_in(table: &[Option<GrantEntry>], gref: GrantRef) -> Option<GrantEntry> {
    let i = gref.0.checked_sub(FIRST_GREF)? as usize;
    table.get(i).copied().flatten()
}

/// Xen's checks of one copy segment against the granting domain's table: the ref is in use
/// and granted to `me`, a read-only grant is never written, `off + len` stays in the page.
/// The byte offset of the data in the domain's memory.
fn check_grant(
    table: &[Option<GrantEntry>],
    me: DomId,
    gref: GrantRef,
    off: u16,
    len: u16,
    write: bool,
) -> Result<usize, GrantStatus> {
    let e = lookup_in(table, gref).ok_or(GrantStatus::BadGntRef)?;
    if e.to != me {
        return Err(GrantStatus::PermissionDenied);
    }
    if write && e.readonly {
        return Err(GrantStatus::PermissionDenied);
    }
    if usize::from(off) + usize::from(len) > XEN_PAGE_SIZE {
        return Err(GrantStatus::BadCopyArg);
    }
    Ok(e.page * XEN_PAGE_SIZE + usize::from(off))
}

/// One side of a simulated copy: a local buffer range or a foreign grant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimCopyPtr {
    /// Offset into the local buffer.
    Local(usize),
    /// `(domain, gref, offset in page)`.
    Foreign(DomId, GrantRef, u16),
}

/// One `GNTTABOP_copy` operation as the hypervisor sees it; `status` is filled in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimCopyOp {
    pub source: SimCopyPtr,
    pub dest: SimCopyPtr,
    pub len: u16,
    pub status: GrantStatus,
}

#[derive(Debug, Default)]
struct HubState {
    domains: HashMap<DomId, Arc<SimDomain>>,
}

/// The simulated hypervisor: domains, grant tables and event channels.
#[derive(Debug, Clone, Default)]
pub struct SimXen {
    state: Arc<Mutex<HubState>>,
    evt: Arc<EvtHub>,
}

impl SimXen {
    /// An empty machine.
    pub fn new() -> SimXen {
        SimXen::default()
    }

    /// Create a domain with `pages` pages of memory.
    pub fn create_domain(&self, dom: DomId, pages: usize) -> io::Result<Arc<SimDomain>> {
        let d = Arc::new(SimDomain::new(dom, pages)?);
        lock(&self.state).domains.insert(dom, Arc::clone(&d));
        Ok(d)
    }

    /// Look a domain up.
    pub fn domain(&self, dom: DomId) -> Option<Arc<SimDomain>> {
        lock(&self.state).domains.get(&dom).cloned()
    }

    /// Remove a domain (its grants become invalid for new operations).
    pub fn destroy_domain(&self, dom: DomId) {
        lock(&self.state).domains.remove(&dom);
    }

    /// The grant interface of `backend` (what it gets by opening gntdev).
    pub fn grants(&self, backend: DomId) -> SimGrants {
        SimGrants {
            xen: self.clone(),
            me: backend,
        }
    }

    /// An event-channel handle for `dom` (what it gets by opening evtchn).
    pub fn evtchn(&self, dom: DomId) -> io::Result<SimEvtchn> {
        SimEvtchn::new(Arc::clone(&self.evt), dom)
    }

    /// `GNTTABOP_copy` issued by domain `me` on `buf`: every op gets a status; bad ops do not
    /// stop the others. Checks, as Xen: the domain exists, the ref is in use and granted to
    /// `me`, a read-only grant is never written, `offset + len` stays inside the page.
    pub fn grant_copy(&self, me: DomId, ops: &mut [SimCopyOp], buf: &mut [u8]) {
        self.copy_ops(me, ops, &mut LocalBuf::Rw(buf));
    }

    fn copy_ops(&self, me: DomId, ops: &mut [SimCopyOp], buf: &mut LocalBuf<'_>) {
        for op in ops.iter_mut() {
            op.status = self.copy_one(me, op, buf);
        }
    }

    fn resolve(
        &self,
        me: DomId,
        dom: DomId,
        gref: GrantRef,
        off: u16,
        len: u16,
        write: bool,
    ) -> Result<(Arc<SimDomain>, usize), GrantStatus> {
        let d = self.domain(dom).ok_or(GrantStatus::BadDomain)?;
        let at = check_grant(&lock(&d.table), me, gref, off, len, write)?;
        Ok((d, at))
    }

    fn copy_one(&self, me: DomId, op: &SimCopyOp, buf: &mut LocalBuf<'_>) -> GrantStatus {
        let len = usize::from(op.len);
        let buf_len = buf.len();
        let local = |off: usize| off.checked_add(len).filter(|&e| e <= buf_len).map(|_| off);
        match (op.source, op.dest) {
            (SimCopyPtr::Foreign(dom, gref, off), SimCopyPtr::Local(b)) => {
                let Some(b) = local(b) else {
                    return GrantStatus::BadVirtAddr;
                };
                let LocalBuf::Rw(dst) = buf else {
                    // The local side is read-only: as if the page were not writable.
                    return GrantStatus::BadVirtAddr;
                };
                match self.resolve(me, dom, gref, off, op.len, false) {
                    Ok((d, at)) => {
                        d.mem.read_at(at, &mut dst[b..b + len]);
                        GrantStatus::Okay
                    }
                    Err(s) => s,
                }
            }
            (SimCopyPtr::Local(b), SimCopyPtr::Foreign(dom, gref, off)) => {
                let Some(b) = local(b) else {
                    return GrantStatus::BadVirtAddr;
                };
                match self.resolve(me, dom, gref, off, op.len, true) {
                    Ok((d, at)) => {
                        d.mem.write_at(at, &buf.as_slice()[b..b + len]);
                        GrantStatus::Okay
                    }
                    Err(s) => s,
                }
            }
            // Local↔local is EINVAL in gntdev; foreign↔foreign is not used by backends.
            _ => GrantStatus::GeneralError,
        }
    }
}

/// The caller's buffer in a simulated copy.
enum LocalBuf<'a> {
    Ro(&'a [u8]),
    Rw(&'a mut [u8]),
}

impl LocalBuf<'_> {
    fn len(&self) -> usize {
        self.as_slice().len()
    }
    fn as_slice(&self) -> &[u8] {
        match self {
            LocalBuf::Ro(b) => b,
            LocalBuf::Rw(b) => b,
        }
    }
}

/// A backend domain's grant interface on a [`SimXen`].
///
/// Differences from gntdev: copies are plain memcpy (no page pinning, no hypercall batching);
/// a read-only grant written gives `PermissionDenied` (Xen reports a general error).
#[derive(Debug, Clone)]
pub struct SimGrants {
    xen: SimXen,
    me: DomId,
}

impl SimGrants {
    fn run(
        &self,
        dom: DomId,
        segs: &[CopySeg],
        mut buf: LocalBuf<'_>,
        to_guest: bool,
    ) -> Result<(), CopyError> {
        let mut ops: Vec<SimCopyOp> = segs
            .iter()
            .map(|s| {
                let foreign = SimCopyPtr::Foreign(dom, s.gref, s.page_off);
                let local = SimCopyPtr::Local(s.buf_off);
                let (source, dest) = if to_guest {
                    (local, foreign)
                } else {
                    (foreign, local)
                };
                SimCopyOp {
                    source,
                    dest,
                    len: s.len,
                    status: GrantStatus::Okay,
                }
            })
            .collect();
        self.xen.copy_ops(self.me, &mut ops, &mut buf);
        first_failure(ops.iter().map(|o| o.status.to_i16()))
    }
}

impl GrantCopier for SimGrants {
    fn copy_from_guest(
        &self,
        dom: DomId,
        segs: &[CopySeg],
        dst: &mut [u8],
    ) -> Result<(), CopyError> {
        check_copy_segs(segs, dst.len())?;
        self.run(dom, segs, LocalBuf::Rw(dst), false)
    }

    fn copy_to_guest(&self, dom: DomId, segs: &[CopySeg], src: &[u8]) -> Result<(), CopyError> {
        check_copy_segs(segs, src.len())?;
        self.run(dom, segs, LocalBuf::Ro(src), true)
    }

    /// Like one `GNTTABOP_copy` hypercall for the whole batch: the domain is looked up and
    /// its grant table locked once, then every segment is checked and copied as Xen does.
    fn copy_batch(&self, dom: DomId, copies: &mut [GuestCopy<'_>]) {
        let Some(d) = self.xen.domain(dom) else {
            for c in copies.iter_mut() {
                c.result = check_copy_segs(c.segs, c.buf.len()).and_then(|()| {
                    first_failure(c.segs.iter().map(|_| GrantStatus::BadDomain.to_i16()))
                });
            }
            return;
        };
        let table = lock(&d.table);
        for c in copies.iter_mut() {
            c.result = check_copy_segs(c.segs, c.buf.len());
            if c.result.is_err() {
                continue;
            }
            let mut first: Option<(usize, GrantStatus)> = None;
            let mut failed = 0;
            for (i, s) in c.segs.iter().enumerate() {
                let to_guest = matches!(c.buf, CopyBuf::ToGuest(_));
                let len = usize::from(s.len);
                let st = match check_grant(&table, self.me, s.gref, s.page_off, s.len, to_guest) {
                    Ok(at) => {
                        match &mut c.buf {
                            CopyBuf::FromGuest(b) => d.mem.read_at(at, &mut b[s.buf_off..][..len]),
                            CopyBuf::ToGuest(b) => d.mem.write_at(at, &b[s.buf_off..][..len]),
                        }
                        continue;
                    }
                    Err(st) => st,
                };
                failed += 1;
                first.get_or_insert((i, st));
            }
            if let Some((index, status)) = first {
                c.result = Err(CopyError::Segment {
                    index,
                    status,
                    failed,
                });
            }
        }
    }
}

/// Contiguous mapping of granted pages; dropping it unmaps and releases the grants.
#[derive(Debug)]
pub struct SimMapping {
    region: MappedRegion,
    dom: Arc<SimDomain>,
    refs: Vec<GrantRef>,
}

impl Drop for SimMapping {
    fn drop(&mut self) {
        for r in &self.refs {
            self.dom.adjust_maps(*r, -1);
        }
    }
}

impl SharedMem for SimMapping {
    fn size(&self) -> usize {
        self.region.size()
    }
    fn load_u32(&self, off: usize, order: Ordering) -> u32 {
        self.region.load_u32(off, order)
    }
    fn store_u32(&self, off: usize, val: u32, order: Ordering) {
        self.region.store_u32(off, val, order)
    }
    fn read_bytes(&self, off: usize, buf: &mut [u8]) {
        self.region.read_bytes(off, buf)
    }
    fn write_bytes(&self, off: usize, data: &[u8]) {
        self.region.write_bytes(off, data)
    }
}

fn errno(e: GrantStatus) -> io::Error {
    let code = match e {
        GrantStatus::BadDomain => libc::ESRCH,
        GrantStatus::PermissionDenied => libc::EPERM,
        _ => libc::EINVAL,
    };
    io::Error::from_raw_os_error(code)
}

impl GrantMapper for SimGrants {
    type Mapping = SimMapping;

    fn map(&self, dom: DomId, refs: &[GrantRef], writable: bool) -> io::Result<SimMapping> {
        if refs.is_empty() {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        let d = self
            .xen
            .domain(dom)
            .ok_or_else(|| errno(GrantStatus::BadDomain))?;
        let mut pages = Vec::with_capacity(refs.len());
        for r in refs {
            let e = d.lookup(*r).ok_or_else(|| errno(GrantStatus::BadGntRef))?;
            if e.to != self.me || (writable && e.readonly) {
                return Err(errno(GrantStatus::PermissionDenied));
            }
            pages.push(e.page);
        }
        let len = refs.len() * XEN_PAGE_SIZE;
        let nz = NonZeroUsize::new(len).ok_or(io::ErrorKind::InvalidInput)?;
        // SAFETY: a fresh PROT_NONE reservation; nothing aliases it.
        let base =
            unsafe { mmap_anonymous(None, nz, ProtFlags::PROT_NONE, MapFlags::MAP_PRIVATE) }?;
        // SAFETY: `base..base+len` is the mapping just created, owned by nobody else; the
        // region munmaps it (and the pages mapped over it below) on drop.
        let region = unsafe { MappedRegion::from_raw(base.cast(), len) };
        let mut prot = ProtFlags::PROT_READ;
        if writable {
            prot |= ProtFlags::PROT_WRITE;
        }
        for (i, page) in pages.iter().enumerate() {
            let at = NonZeroUsize::new(region.as_ptr() as usize + i * XEN_PAGE_SIZE)
                .ok_or(io::ErrorKind::InvalidInput)?;
            let off = libc::off_t::try_from(page * XEN_PAGE_SIZE)
                .map_err(|_| io::ErrorKind::InvalidInput)?;
            let one = NonZeroUsize::new(XEN_PAGE_SIZE).ok_or(io::ErrorKind::InvalidInput)?;
            // SAFETY: MAP_FIXED replaces one page of our own reservation (in bounds: i < n);
            // no Rust reference into the reservation exists.
            unsafe {
                mmap(
                    Some(at),
                    one,
                    prot,
                    MapFlags::MAP_SHARED | MapFlags::MAP_FIXED,
                    d.memfd.as_fd(),
                    off,
                )
            }?;
        }
        for r in refs {
            d.adjust_maps(*r, 1);
        }
        Ok(SimMapping {
            region,
            dom: d,
            refs: refs.to_vec(),
        })
    }
}
