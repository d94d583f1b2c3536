//! A simulated blkfront: negotiates with a backend over xenstore the way Linux xen-blkfront
//! does, grants ring and data pages from its [`SimDomain`], and drives the ring in any ABI.
//!
//! Sequence (frontend dir `F`, backend dir `B`):
//! 1. `F/state = 1` (Initialising); wait for `B/state = 2` (InitWait).
//! 2. Read `B/max-ring-page-order`, allocate and grant `2^order` ring pages, initialise the
//!    shared ring, allocate an unbound event channel for the backend domain.
//! 3. In one transaction write `F/ring-ref` (or `ring-ref0..n-1` and `ring-page-order`),
//!    `F/event-channel`, `F/protocol`, `F/feature-persistent = 0`, then `F/state = 3`.
//! 4. Wait for `B/state = 4`; read `sectors`, `info`, `sector-size` and the `feature-*` keys;
//!    `F/state = 4`.
//!
//! Multi-queue: with `BlkfrontOptions::queues` > 1 and a backend that advertises
//! `multi-queue-max-queues`, `min(queues, max)` rings are set up, each with its own pages and
//! event channel, written as `F/multi-queue-num-queues` and `F/queue-<i>/ring-ref*` +
//! `F/queue-<i>/event-channel` (`ring-page-order` and `protocol` stay at the top level), as
//! Linux blkfront does. Requests go to the queue chosen with
//! [`SimBlkfront::set_queue`]; completions are taken from every queue.
//!
//! Differences from Linux blkfront: no persistent grants, data pages are granted per request
//! and revoked at completion, segments always start at sector 0 of their page.

use std::collections::HashMap;
use std::io;
use std::os::fd::AsFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::{SimDomain, SimEvtchn, SimXen};
use crate::blkif::request::{encode_indirect_segments, Response, Segment, WireRequest};
use crate::blkif::xenbus::{
    frontend_ring_order, keys, parse_uint, queue_prefix, ring_ref_key, XenbusState,
};
use crate::blkif::{op, Abi, FrontRing, RingError, SharedMem};
use crate::xen::xenstore::{transaction, Access, Perm, Tx, XenStore, XsError};
use crate::xen::{DomId, EventChannel, GrantRef, Port, XEN_PAGE_SIZE};

/// The sector_number of an empty flush or barrier, as Linux xen-blkfront sends it (a flush
/// request's position is never set, and the block layer initialises it to -1).
pub const EMPTY_SYNC_SECTOR: u64 = u64::MAX;

/// Frontend failures.
#[derive(Debug, thiserror::Error)]
pub enum BlkfrontError {
    #[error("xenstore operation failed")]
    Xs(#[from] XsError),
    #[error("event channel or memory operation failed")]
    Io(#[from] io::Error),
    #[error("ring failure")]
    Ring(#[from] RingError),
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    #[error("backend value {key} is bad: {value:?}")]
    BadBackendValue { key: &'static str, value: String },
    #[error("out of guest pages")]
    NoMemory,
    #[error("not connected")]
    NotConnected,
    #[error("request of {0} segments not possible with this backend")]
    TooBig(usize),
    #[error("data length {0} is not a multiple of 512")]
    Unaligned(usize),
}

/// Frontend settings.
#[derive(Clone, Debug)]
pub struct BlkfrontOptions {
    /// Ring ABI to write as `protocol` and use.
    pub abi: Abi,
    /// Largest ring-page order the frontend wants.
    pub max_ring_order: u32,
    /// Use indirect requests when the backend offers them and a request needs > 11 segments.
    pub indirect: bool,
    /// Start value of the ring indices (to exercise wrap-around over 2^32).
    pub start_index: u32,
    /// Write the `protocol` key (false: leave it absent, meaning "native").
    pub write_protocol: bool,
    /// How long to wait for each backend state change.
    pub timeout: Duration,
    /// Queues wanted (used: the smaller of this and the backend's `multi-queue-max-queues`,
    /// 1 when it advertises none).
    pub queues: u32,
}

impl Default for BlkfrontOptions {
    fn default() -> Self {
        BlkfrontOptions {
            abi: Abi::X86_64,
            max_ring_order: 4,
            indirect: true,
            start_index: 0,
            write_protocol: true,
            timeout: Duration::from_secs(10),
            queues: 1,
        }
    }
}

/// What the backend advertised.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlkfrontInfo {
    pub sectors: u64,
    pub sector_size: u32,
    pub info: u32,
    pub ring_order: u32,
    pub max_indirect_segments: u32,
    pub barrier: bool,
    pub flush: bool,
    pub discard: bool,
    /// Queues (rings) in use.
    pub queues: u32,
}

/// A finished request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    pub id: u64,
    pub op: u8,
    pub status: i16,
    /// Data read (READ requests answered with status 0).
    pub data: Option<Vec<u8>>,
}

#[derive(Debug)]
struct Inflight {
    op: u8,
    len: usize,
    pages: Vec<(usize, GrantRef)>,
}

/// The frontend's view of its own ring pages (contiguous pages of its memory).
#[derive(Debug, Clone)]
pub struct RingView {
    dom: Arc<SimDomain>,
    base: usize,
    len: usize,
}

impl SharedMem for RingView {
    fn size(&self) -> usize {
        self.len
    }
    fn load_u32(&self, off: usize, order: Ordering) -> u32 {
        assert!(off + 4 <= self.len);
        self.dom.mem().load_u32(self.base + off, order)
    }
    fn store_u32(&self, off: usize, val: u32, order: Ordering) {
        assert!(off + 4 <= self.len);
        self.dom.mem().store_u32(self.base + off, val, order)
    }
    fn read_bytes(&self, off: usize, buf: &mut [u8]) {
        assert!(off + buf.len() <= self.len);
        self.dom.mem().read_at(self.base + off, buf)
    }
    fn write_bytes(&self, off: usize, data: &[u8]) {
        assert!(off + data.len() <= self.len);
        self.dom.mem().write_at(self.base + off, data)
    }
}

/// Create the toolstack's nodes for a vbd the way libxl / the e2e harness does: frontend
/// `/local/domain/<fe>/device/vbd/<devid>` and backend
/// `/local/domain/<be>/backend/<kind>/<fe>/<devid>`, each readable by the other side.
/// `xs` must be privileged (dom0). Returns `(frontend_path, backend_path)`.
pub fn toolstack_add_vbd<X: XenStore + ?Sized>(
    xs: &X,
    kind: &str,
    be: DomId,
    fe: DomId,
    devid: u32,
    read_only: bool,
) -> Result<(String, String), XsError> {
    let fpath = format!("/local/domain/{}/device/vbd/{devid}", fe.0);
    let bpath = format!("/local/domain/{}/backend/{kind}/{}/{devid}", be.0, fe.0);
    transaction(xs, |tx| {
        let w = |k: &str, v: &str| xs.write(tx, &format!("{fpath}/{k}"), v.as_bytes());
        w(keys::BACKEND, &bpath)?;
        w(keys::BACKEND_ID, &be.0.to_string())?;
        w(keys::STATE, XenbusState::Initialising.as_str())?;
        w(keys::VIRTUAL_DEVICE, &devid.to_string())?;
        w(keys::DEVICE_TYPE, "disk")?;
        let wb = |k: &str, v: &str| xs.write(tx, &format!("{bpath}/{k}"), v.as_bytes());
        wb(keys::FRONTEND, &fpath)?;
        wb(keys::FRONTEND_ID, &fe.0.to_string())?;
        wb("online", "1")?;
        wb(keys::STATE, XenbusState::Initialising.as_str())?;
        wb(keys::MODE, if read_only { "r" } else { "w" })?;
        wb(keys::DEVICE_TYPE, "disk")?;
        // Frontend dir: owned by the frontend, readable by the backend (and vice versa).
        let fe_perms = [
            Perm {
                dom: fe,
                access: Access::None,
            },
            Perm {
                dom: be,
                access: Access::Read,
            },
        ];
        let be_perms = [
            Perm {
                dom: be,
                access: Access::None,
            },
            Perm {
                dom: fe,
                access: Access::Read,
            },
        ];
        for k in xs.directory(tx, &fpath)? {
            xs.set_perms(tx, &format!("{fpath}/{k}"), &fe_perms)?;
        }
        xs.set_perms(tx, &fpath, &fe_perms)?;
        for k in xs.directory(tx, &bpath)? {
            xs.set_perms(tx, &format!("{bpath}/{k}"), &be_perms)?;
        }
        xs.set_perms(tx, &bpath, &be_perms)?;
        Ok(())
    })?;
    Ok((fpath, bpath))
}

/// One queue: its ring, ring pages and event channel.
#[derive(Debug)]
struct FrontQueue {
    ring: FrontRing<RingView>,
    pages: Vec<(usize, GrantRef)>,
    port: Port,
}

/// The simulated frontend. `X` is its own xenstore connection (acting as the guest domain).
#[derive(Debug)]
pub struct SimBlkfront<X: XenStore> {
    dom: Arc<SimDomain>,
    evt: SimEvtchn,
    xs: X,
    fe_path: String,
    be_path: String,
    be_dom: DomId,
    opts: BlkfrontOptions,
    /// One per queue once connected.
    queues: Vec<FrontQueue>,
    /// The queue requests go to.
    cur: usize,
    info: Option<BlkfrontInfo>,
    next_id: u64,
    inflight: HashMap<u64, Inflight>,
}

impl<X: XenStore> SimBlkfront<X> {
    /// A frontend for the vbd at `fe_path` in domain `dom` (which must exist in `xen`).
    pub fn new(
        xen: &SimXen,
        dom: DomId,
        xs: X,
        fe_path: &str,
        opts: BlkfrontOptions,
    ) -> Result<Self, BlkfrontError> {
        let d = xen
            .domain(dom)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ESRCH))?;
        let be_path = read_str(&xs, &format!("{fe_path}/{}", keys::BACKEND))?.ok_or(
            BlkfrontError::BadBackendValue {
                key: keys::BACKEND,
                value: String::new(),
            },
        )?;
        let be_id = read_str(&xs, &format!("{fe_path}/{}", keys::BACKEND_ID))?.unwrap_or_default();
        let be_dom = parse_uint::<u16>(&be_id).map_err(|_| BlkfrontError::BadBackendValue {
            key: keys::BACKEND_ID,
            value: be_id.clone(),
        })?;
        Ok(SimBlkfront {
            evt: xen.evtchn(dom)?,
            dom: d,
            xs,
            fe_path: fe_path.to_owned(),
            be_path,
            be_dom: DomId(be_dom),
            opts,
            queues: Vec::new(),
            cur: 0,
            info: None,
            next_id: 1,
            inflight: HashMap::new(),
        })
    }

    /// The frontend's xenstore connection.
    pub fn xs(&self) -> &X {
        &self.xs
    }
    /// The frontend's memory.
    pub fn domain(&self) -> &Arc<SimDomain> {
        &self.dom
    }
    /// The frontend's event channel handle.
    pub fn evtchn(&self) -> &SimEvtchn {
        &self.evt
    }
    /// Backend directory.
    pub fn backend_path(&self) -> &str {
        &self.be_path
    }
    /// Negotiated parameters (after [`connect`](Self::connect)).
    pub fn info(&self) -> Option<BlkfrontInfo> {
        self.info
    }
    /// The front ring of the current queue (after [`connect`](Self::connect)).
    pub fn ring(&mut self) -> Option<&mut FrontRing<RingView>> {
        self.queues.get_mut(self.cur).map(|q| &mut q.ring)
    }
    /// Queues in use (0 before [`connect`](Self::connect)).
    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }
    /// Send the next requests (and [`kick`](Self::kick)) on queue `q`.
    pub fn set_queue(&mut self, q: usize) -> Result<(), BlkfrontError> {
        if q >= self.queues.len() {
            return Err(BlkfrontError::NotConnected);
        }
        self.cur = q;
        Ok(())
    }
    fn cur_ring(&mut self) -> Result<&mut FrontRing<RingView>, BlkfrontError> {
        self.ring().ok_or(BlkfrontError::NotConnected)
    }
    /// Requests submitted and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.inflight.len()
    }

    fn set_state(&self, s: XenbusState) -> Result<(), XsError> {
        self.xs.write(
            Tx::NONE,
            &format!("{}/{}", self.fe_path, keys::STATE),
            s.as_str().as_bytes(),
        )
    }

    fn backend_key(&self, key: &str) -> Result<Option<String>, XsError> {
        read_str(&self.xs, &format!("{}/{key}", self.be_path))
    }

    /// Current backend state (`Unknown` if absent or unparsable).
    pub fn backend_state(&self) -> Result<XenbusState, XsError> {
        Ok(self
            .backend_key(keys::STATE)?
            .and_then(|s| XenbusState::parse(&s).ok())
            .unwrap_or(XenbusState::Unknown))
    }

    /// Wait until the backend state satisfies `want`.
    pub fn wait_backend(
        &self,
        what: &'static str,
        want: impl Fn(XenbusState) -> bool,
    ) -> Result<XenbusState, BlkfrontError> {
        let token = "blkfront-be-state";
        let path = format!("{}/{}", self.be_path, keys::STATE);
        self.xs.watch(&path, token)?;
        let deadline = Instant::now() + self.opts.timeout;
        let r = loop {
            self.xs.take_watch_events()?;
            let s = self.backend_state()?;
            if want(s) {
                break Ok(s);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break Err(BlkfrontError::Timeout(what));
            }
            wait_fd(&self.xs, left)?;
        };
        let _ = self.xs.unwatch(&path, token);
        r
    }

    fn backend_flag(&self, key: &str) -> Result<bool, XsError> {
        Ok(self
            .backend_key(key)?
            .and_then(|v| parse_uint::<u32>(&v).ok())
            .is_some_and(|v| v != 0))
    }

    /// Run the whole handshake (steps 1-4 of the module docs).
    pub fn connect(&mut self) -> Result<BlkfrontInfo, BlkfrontError> {
        self.set_state(XenbusState::Initialising)?;
        self.wait_backend("backend InitWait", |s| s >= XenbusState::InitWait)?;

        let max = self.backend_key(keys::MAX_RING_PAGE_ORDER)?;
        let order = frontend_ring_order(max.as_deref(), self.opts.max_ring_order);
        let max_queues = self
            .backend_key(keys::MULTI_QUEUE_MAX_QUEUES)?
            .and_then(|v| parse_uint::<u32>(&v).ok())
            .unwrap_or(1);
        let nq = self.opts.queues.min(max_queues).max(1);
        let n = 1usize << order;
        for _ in 0..nq {
            let first = self.alloc_contiguous(n)?;
            let mut pages = Vec::with_capacity(n);
            for i in 0..n {
                let g = self.dom.grant(first + i, self.be_dom, false);
                pages.push((first + i, g));
            }
            let view = RingView {
                dom: Arc::clone(&self.dom),
                base: SimDomain::page_offset(first),
                len: n * XEN_PAGE_SIZE,
            };
            let ring = FrontRing::init(view, self.opts.abi, order, self.opts.start_index)?;
            let port = self.evt.alloc_unbound(self.be_dom)?;
            self.queues.push(FrontQueue { ring, pages, port });
        }
        self.cur = 0;

        let fe = self.fe_path.clone();
        let per_queue: Vec<(Vec<GrantRef>, Port)> = self
            .queues
            .iter()
            .map(|q| (q.pages.iter().map(|p| p.1).collect(), q.port))
            .collect();
        let abi = self.opts.abi;
        let write_protocol = self.opts.write_protocol;
        let multi = max.is_some();
        transaction(&self.xs, |tx| {
            for (qi, (refs, port)) in per_queue.iter().enumerate() {
                let pre = queue_prefix(nq, qi as u32);
                for (i, g) in refs.iter().enumerate() {
                    let key = ring_ref_key(order, i as u32);
                    self.xs
                        .write(tx, &format!("{fe}/{pre}{key}"), g.0.to_string().as_bytes())?;
                }
                self.xs.write(
                    tx,
                    &format!("{fe}/{pre}{}", keys::EVENT_CHANNEL),
                    port.0.to_string().as_bytes(),
                )?;
            }
            if nq > 1 {
                self.xs.write(
                    tx,
                    &format!("{fe}/{}", keys::MULTI_QUEUE_NUM_QUEUES),
                    nq.to_string().as_bytes(),
                )?;
            }
            if multi {
                self.xs.write(
                    tx,
                    &format!("{fe}/{}", keys::RING_PAGE_ORDER),
                    order.to_string().as_bytes(),
                )?;
            }
            if write_protocol {
                self.xs.write(
                    tx,
                    &format!("{fe}/{}", keys::PROTOCOL),
                    abi.protocol_name().as_bytes(),
                )?;
            }
            self.xs
                .write(tx, &format!("{fe}/{}", keys::FEATURE_PERSISTENT), b"0")?;
            self.xs.write(
                tx,
                &format!("{fe}/{}", keys::STATE),
                XenbusState::Initialised.as_str().as_bytes(),
            )
        })?;

        self.wait_backend("backend Connected", |s| s >= XenbusState::Connected)?;
        let num = |key: &'static str| -> Result<u64, BlkfrontError> {
            let v = self.backend_key(key)?.unwrap_or_default();
            parse_uint::<u64>(&v).map_err(|_| BlkfrontError::BadBackendValue { key, value: v })
        };
        let sectors = num(keys::SECTORS)?;
        let info = num(keys::INFO).unwrap_or(0) as u32;
        let sector_size = num(keys::SECTOR_SIZE).unwrap_or(512) as u32;
        let max_indirect = self
            .backend_key(keys::FEATURE_MAX_INDIRECT_SEGMENTS)?
            .and_then(|v| parse_uint::<u32>(&v).ok())
            .unwrap_or(0);
        let info = BlkfrontInfo {
            sectors,
            sector_size,
            info,
            ring_order: order,
            max_indirect_segments: if self.opts.indirect { max_indirect } else { 0 },
            barrier: self.backend_flag(keys::FEATURE_BARRIER)?,
            flush: self.backend_flag(keys::FEATURE_FLUSH_CACHE)?,
            discard: self.backend_flag(keys::FEATURE_DISCARD)?,
            queues: nq,
        };
        self.info = Some(info);
        self.set_state(XenbusState::Connected)?;
        Ok(info)
    }

    fn alloc_contiguous(&self, n: usize) -> Result<usize, BlkfrontError> {
        let mut got: Vec<usize> = Vec::with_capacity(n);
        for _ in 0..n {
            got.push(self.dom.alloc_page().ok_or(BlkfrontError::NoMemory)?);
        }
        got.sort_unstable();
        let contiguous = got.windows(2).all(|w| w[1] == w[0] + 1);
        if !contiguous {
            for p in got {
                self.dom.free_page(p);
            }
            return Err(BlkfrontError::NoMemory);
        }
        Ok(got[0])
    }

    fn alloc_granted(
        &self,
        n: usize,
        readonly: bool,
    ) -> Result<Vec<(usize, GrantRef)>, BlkfrontError> {
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            match self.dom.alloc_page() {
                Some(p) => v.push((p, self.dom.grant(p, self.be_dom, readonly))),
                None => {
                    self.release(&v);
                    return Err(BlkfrontError::NoMemory);
                }
            }
        }
        Ok(v)
    }

    fn release(&self, pages: &[(usize, GrantRef)]) {
        for (p, g) in pages {
            self.dom.revoke(*g);
            self.dom.free_page(*p);
        }
    }

    fn submit_data(
        &mut self,
        opcode: u8,
        sector: u64,
        len: usize,
        data: Option<&[u8]>,
    ) -> Result<u64, BlkfrontError> {
        if !len.is_multiple_of(512) {
            return Err(BlkfrontError::Unaligned(len));
        }
        let info = self.info.ok_or(BlkfrontError::NotConnected)?;
        let nseg = len.div_ceil(XEN_PAGE_SIZE);
        let indirect = nseg > crate::blkif::abi::MAX_SEGMENTS_PER_REQUEST;
        if indirect
            && (nseg > info.max_indirect_segments as usize
                || !matches!(opcode, op::READ | op::WRITE))
        {
            return Err(BlkfrontError::TooBig(nseg));
        }
        let readonly = opcode != op::READ;
        let mut pages = self.alloc_granted(nseg, readonly)?;
        let mut segs = Vec::with_capacity(nseg);
        for (i, (p, g)) in pages.iter().enumerate() {
            let chunk = (len - i * XEN_PAGE_SIZE).min(XEN_PAGE_SIZE);
            if let Some(d) = data {
                let off = i * XEN_PAGE_SIZE;
                self.dom
                    .mem()
                    .write_at(SimDomain::page_offset(*p), &d[off..off + chunk]);
            }
            segs.push(Segment {
                gref: g.0,
                first_sect: 0,
                last_sect: (chunk / 512 - 1) as u8,
            });
        }
        let id = self.next_id;
        self.next_id += 1;
        let ring = self.cur_ring()?;
        if ring.free_requests() == 0 {
            self.release(&pages);
            return Err(RingError::Full.into());
        }
        let result = if indirect {
            let npages = nseg.div_ceil(crate::blkif::abi::SEGMENTS_PER_INDIRECT_PAGE);
            let ipages = match self.alloc_granted(npages, true) {
                Ok(v) => v,
                Err(e) => {
                    self.release(&pages);
                    return Err(e);
                }
            };
            let mut bytes = vec![0u8; npages * XEN_PAGE_SIZE];
            encode_indirect_segments(&segs, &mut bytes);
            for (i, (p, _)) in ipages.iter().enumerate() {
                self.dom.mem().write_at(
                    SimDomain::page_offset(*p),
                    &bytes[i * XEN_PAGE_SIZE..(i + 1) * XEN_PAGE_SIZE],
                );
            }
            let grefs: Vec<u32> = ipages.iter().map(|p| p.1 .0).collect();
            let ring = self.cur_ring()?;
            let r = ring.push_request(&WireRequest::Indirect {
                indirect_op: opcode,
                nr_segments: nseg as u16,
                handle: 0,
                id,
                sector,
                grefs: &grefs,
            });
            pages.extend(ipages);
            r
        } else {
            let ring = self.cur_ring()?;
            ring.push_request(&WireRequest::Direct {
                op: opcode,
                nr_segments: nseg as u8,
                handle: 0,
                id,
                sector,
                segments: &segs,
            })
        };
        if let Err(e) = result {
            self.release(&pages);
            return Err(e.into());
        }
        self.inflight.insert(
            id,
            Inflight {
                op: opcode,
                len,
                pages,
            },
        );
        Ok(id)
    }

    /// Queue a read of `nr_sectors` at `sector` (indirect if more than 11 pages).
    pub fn submit_read(&mut self, sector: u64, nr_sectors: u32) -> Result<u64, BlkfrontError> {
        self.submit_data(op::READ, sector, nr_sectors as usize * 512, None)
    }

    /// Queue a write of `data` at `sector`.
    pub fn submit_write(&mut self, sector: u64, data: &[u8]) -> Result<u64, BlkfrontError> {
        self.submit_data(op::WRITE, sector, data.len(), Some(data))
    }

    /// Queue a FLUSH_DISKCACHE (no data) or WRITE_BARRIER (`opcode`), with optional data.
    /// Without data `sector` is not sent: like Linux blkfront, whose flush requests carry an
    /// unset `blk_rq_pos`, the request says [`EMPTY_SYNC_SECTOR`].
    pub fn submit_sync(
        &mut self,
        opcode: u8,
        sector: u64,
        data: &[u8],
    ) -> Result<u64, BlkfrontError> {
        if data.is_empty() {
            let id = self.next_id;
            self.next_id += 1;
            let ring = self.cur_ring()?;
            ring.push_request(&WireRequest::Direct {
                op: opcode,
                nr_segments: 0,
                handle: 0,
                id,
                sector: EMPTY_SYNC_SECTOR,
                segments: &[],
            })?;
            self.inflight.insert(
                id,
                Inflight {
                    op: opcode,
                    len: 0,
                    pages: Vec::new(),
                },
            );
            return Ok(id);
        }
        self.submit_data(opcode, sector, data.len(), Some(data))
    }

    /// Queue a discard.
    pub fn submit_discard(&mut self, sector: u64, nr_sectors: u64) -> Result<u64, BlkfrontError> {
        let id = self.next_id;
        self.next_id += 1;
        let ring = self.cur_ring()?;
        ring.push_request(&WireRequest::Discard {
            flag: 0,
            handle: 0,
            id,
            sector,
            nr_sectors,
        })?;
        self.inflight.insert(
            id,
            Inflight {
                op: op::DISCARD,
                len: 0,
                pages: Vec::new(),
            },
        );
        Ok(id)
    }

    /// Queue raw slot bytes (hostile-frontend tests); `id` is what the response should echo.
    pub fn submit_raw(&mut self, id: u64, bytes: &[u8]) -> Result<(), BlkfrontError> {
        let ring = self.cur_ring()?;
        ring.push_raw_request(bytes)?;
        self.inflight.insert(
            id,
            Inflight {
                op: bytes.first().copied().unwrap_or(0),
                len: 0,
                pages: Vec::new(),
            },
        );
        Ok(())
    }

    /// Publish queued requests and notify the backend if it asked for it. Returns whether a
    /// notification was sent.
    pub fn kick(&mut self) -> Result<bool, BlkfrontError> {
        let q = self
            .queues
            .get_mut(self.cur)
            .ok_or(BlkfrontError::NotConnected)?;
        let notify = q.ring.push_requests_and_check_notify();
        if notify {
            self.evt.notify(q.port)?;
        }
        Ok(notify)
    }

    /// Take every available response (non-blocking), releasing grants and reading data.
    pub fn poll_completions(&mut self) -> Result<Vec<Completion>, BlkfrontError> {
        if self.queues.is_empty() {
            return Err(BlkfrontError::NotConnected);
        }
        let mut out = Vec::new();
        for q in 0..self.queues.len() {
            self.poll_queue(q, &mut out)?;
        }
        Ok(out)
    }

    fn poll_queue(&mut self, q: usize, out: &mut Vec<Completion>) -> Result<(), BlkfrontError> {
        loop {
            let ring = &mut self
                .queues
                .get_mut(q)
                .ok_or(BlkfrontError::NotConnected)?
                .ring;
            let rsp: Response = match ring.take_response()? {
                Some(r) => r,
                None => {
                    if ring.final_check_for_responses()? {
                        continue;
                    }
                    break;
                }
            };
            let inf = self.inflight.remove(&rsp.id);
            let mut data = None;
            if let Some(inf) = &inf {
                if inf.op == op::READ && rsp.status == 0 {
                    let mut buf = vec![0u8; inf.len];
                    for (i, chunk) in buf.chunks_mut(XEN_PAGE_SIZE).enumerate() {
                        self.dom
                            .mem()
                            .read_at(SimDomain::page_offset(inf.pages[i].0), chunk);
                    }
                    data = Some(buf);
                }
                self.release(&inf.pages);
            }
            out.push(Completion {
                id: rsp.id,
                op: rsp.op,
                status: rsp.status,
                data,
            });
        }
        Ok(())
    }

    /// Wait until `n` completions have arrived (or the timeout passes).
    pub fn wait_completions(
        &mut self,
        n: usize,
        timeout: Duration,
    ) -> Result<Vec<Completion>, BlkfrontError> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        loop {
            got.extend(self.poll_completions()?);
            if got.len() >= n {
                return Ok(got);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(BlkfrontError::Timeout("completions"));
            }
            wait_fd(&self.evt, left.min(Duration::from_millis(50)))?;
            while let Some(p) = self.evt.pending()? {
                self.evt.unmask(p)?;
            }
        }
    }

    /// Close like blkfront on shutdown: Closing, wait for the backend's Closing, Closed, wait
    /// for the backend's Closed; then unbind and revoke the ring grants.
    pub fn disconnect(&mut self) -> Result<(), BlkfrontError> {
        self.set_state(XenbusState::Closing)?;
        self.wait_backend("backend Closing", |s| s >= XenbusState::Closing)?;
        self.set_state(XenbusState::Closed)?;
        // The backend unmaps and unbinds, then reports Closed (or removes its directory).
        self.wait_backend("backend Closed", |s| {
            s == XenbusState::Closed || s == XenbusState::Unknown
        })?;
        for q in std::mem::take(&mut self.queues) {
            let _ = self.evt.unbind(q.port);
            self.release(&q.pages);
        }
        self.cur = 0;
        self.info = None;
        Ok(())
    }
}

fn read_str<X: XenStore + ?Sized>(xs: &X, path: &str) -> Result<Option<String>, XsError> {
    xs.read_string(Tx::NONE, path)
}

fn wait_fd<F: AsFd>(f: &F, timeout: Duration) -> io::Result<()> {
    let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
    let mut fds = [PollFd::new(f.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::from(ms)) {
        Ok(_) | Err(nix::errno::Errno::EINTR) => Ok(()),
        Err(e) => Err(e.into()),
    }
}
