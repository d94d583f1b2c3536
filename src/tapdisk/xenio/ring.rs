//! One ring connection: its per-ring state and everything done on it (take requests,
//! start them on the VBD, grant copy, complete, respond, publish). The set of rings and
//! their shared environment live in `mod.rs`; what a ring needs from them comes in a
//! borrowed [`Ctx`].

use std::collections::BTreeMap;

use log::{debug, info, warn};

use crate::blkif::{
    BackRing, IndirectRequest, Operation, ParseConfig, Parsed, Request, RingError, Status, Taken,
};
use crate::image::ImageError;
use crate::xen::{DomId, Port, XEN_PAGE_SIZE};

use super::env::{RingMem, XenEnv};
use super::segs::{indirect_copy_segs, request_copy_segs, BufLayout};
use super::{MAX_INDIRECT_SEGMENTS, MAX_RING_BYTES};
use crate::tapdisk::io::{IoEngine, Op, Output};
use crate::tapdisk::tag::{Door, RingKind, RingTag, Tag};
use crate::tapdisk::vbd::{Vbd, VDISK_READONLY};
use crate::util::AlignedBuf;

/// Buffers kept for re-use.
const POOL_BUFFERS: usize = 64;

/// Per-ring counters (stats JSON `"xenbus"`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingStats {
    /// Requests taken from the ring.
    pub reqs_in: u64,
    /// Responses written.
    pub reqs_out: u64,
    /// Events received.
    pub kicks_in: u64,
    /// Notifications sent.
    pub kicks_out: u64,
    /// Bad requests and ring protocol violations.
    pub err_msg: u64,
    /// Grant-copy failures.
    pub err_map: u64,
    /// Requests the VBD could not take (no image).
    pub err_vbd: u64,
    /// Image I/O errors.
    pub err_img: u64,
}

/// Private data buffers, re-used across requests of all rings.
#[derive(Debug, Default)]
pub(super) struct BufPool(Vec<AlignedBuf>);

impl BufPool {
    fn take(&mut self, len: usize) -> AlignedBuf {
        let mut b = self.0.pop().unwrap_or_default();
        b.set_len(len);
        b
    }

    fn give(&mut self, b: AlignedBuf) {
        if self.0.len() < POOL_BUFFERS {
            self.0.push(b);
        }
    }
}

/// What a ring borrows from its environment while it works.
pub(super) struct Ctx<'a> {
    pub env: &'a dyn XenEnv,
    pub io: &'a IoEngine<Tag>,
    pub bufs: &'a mut BufPool,
    /// Rings to service again at the end of the loop pass.
    pub repoll: &'a mut Vec<u64>,
    /// Rings with responses to publish at the end of the loop pass.
    pub dirty: &'a mut Vec<u64>,
}

pub(super) fn push_unique(v: &mut Vec<u64>, x: u64) {
    if !v.contains(&x) {
        v.push(x);
    }
}

/// A flush or barrier waiting for the ring to drain.
#[derive(Debug)]
struct SyncReq {
    id: u64,
    op: u8,
    sector: u64,
    data: Option<AlignedBuf>,
    submitted: bool,
}

/// The parse configuration of a VBD (None when it has no open image).
pub fn parse_config(vbd: &Vbd) -> Option<ParseConfig> {
    let info = vbd.info()?;
    let bytes = info.sectors.checked_mul(u64::from(info.sector_size))?;
    let mut cfg = ParseConfig::new(bytes / crate::blkif::SECTOR_SIZE);
    cfg.read_only = info.info & VDISK_READONLY != 0 || vbd.read_only();
    cfg.max_indirect_segments = MAX_INDIRECT_SEGMENTS;
    Some(cfg)
}

/// One connected (or, after DISCONNECT, draining) ring.
pub(super) struct Ring {
    /// Its id in `Rings` (completion tags name it).
    pub id: u64,
    pub minor: u16,
    pub domid: u32,
    pub devid: u32,
    dom: DomId,
    pub port: Port,
    ring: BackRing<RingMem>,
    /// Jobs in the I/O engine.
    pub jobs: u32,
    bytes: usize,
    /// Disconnected: completions are dropped, the ring goes with the last one.
    pub dead: bool,
    sync: Option<SyncReq>,
    overflow_logged: bool,
    pub stats: RingStats,
}

/// Whether a completion left a dead ring with nothing in flight (it can go).
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Drained {
    Yes,
    No,
}

impl Ring {
    pub fn new(
        id: u64,
        minor: u16,
        (domid, devid): (u32, u32),
        dom: DomId,
        port: Port,
        ring: BackRing<RingMem>,
    ) -> Ring {
        Ring {
            id,
            minor,
            domid,
            devid,
            dom,
            port,
            ring,
            jobs: 0,
            bytes: 0,
            dead: false,
            sync: None,
            overflow_logged: false,
            stats: RingStats::default(),
        }
    }

    /// Stop serving: no more requests or responses; a waiting flush is forgotten.
    pub fn kill(&mut self) {
        self.dead = true;
        self.sync = None;
    }

    /// Write a response into the ring (published later, at the end of the loop pass).
    fn respond(&mut self, ctx: &mut Ctx<'_>, id: u64, op: u8, status: Status) {
        if self.dead {
            return;
        }
        match self.ring.push_response(id, op, status) {
            Ok(()) => {
                self.stats.reqs_out += 1;
                push_unique(ctx.dirty, self.id);
            }
            Err(e) => warn!("ring {}/{}: response: {e}", self.domid, self.devid),
        }
    }

    /// Make the written responses visible to the guest, notifying it if it asked to be.
    pub fn publish(&mut self, env: &dyn XenEnv) {
        if self.dead {
            return;
        }
        if self.ring.push_responses_and_check_notify() {
            self.stats.kicks_out += 1;
            if let Err(e) = env.evtchn().notify(self.port) {
                debug!("ring {}/{}: notify: {e}", self.domid, self.devid);
            }
        }
    }

    fn overflow(&mut self, e: &RingError) {
        self.stats.err_msg += 1;
        if !self.overflow_logged {
            warn!("ring {}/{}: {e}", self.domid, self.devid);
            self.overflow_logged = true;
        }
    }

    /// Take and start requests while the VBD accepts I/O.
    pub fn service(&mut self, ctx: &mut Ctx<'_>, vbds: &mut BTreeMap<u16, Vbd>) {
        if self.dead {
            return;
        }
        let Some(vbd) = vbds.get_mut(&self.minor) else {
            return;
        };
        // Paused, pausing or closed: leave the requests in the guest's ring.
        if !vbd.accepts_io() {
            return;
        }
        let Some(cfg) = parse_config(vbd) else {
            return;
        };
        // At most one ring's worth per call: a guest answering itself cannot hold the loop.
        let mut budget = self.ring.entries();
        loop {
            if budget == 0 {
                push_unique(ctx.repoll, self.id);
                return;
            }
            budget -= 1;
            if self.sync.is_some() {
                self.try_sync(ctx, vbd);
                return;
            }
            if self.bytes >= MAX_RING_BYTES {
                return; // re-polled when completions free memory
            }
            let taken = match self.ring.next_request(&cfg) {
                Ok(Some(t)) => t,
                Ok(None) => match self.ring.final_check_for_requests() {
                    Ok(true) => continue,
                    Ok(false) => return,
                    Err(e) => {
                        self.overflow(&e);
                        return;
                    }
                },
                Err(e) => {
                    self.overflow(&e);
                    return;
                }
            };
            self.stats.reqs_in += 1;
            self.start(ctx, taken, &cfg, vbd);
        }
    }

    fn start(&mut self, ctx: &mut Ctx<'_>, taken: Taken, cfg: &ParseConfig, vbd: &mut Vbd) {
        let req = match taken {
            Err(rej) => {
                debug!("ring request rejected: {}", rej.error);
                self.stats.err_msg += 1;
                self.respond(ctx, rej.id, rej.op, rej.status());
                return;
            }
            Ok(Parsed::Ready(req)) => req,
            Ok(Parsed::Indirect(hdr)) => match self.indirect(ctx, &hdr, cfg) {
                Some(req) => req,
                None => return,
            },
        };
        self.start_request(ctx, req, vbd);
    }

    /// Copy an indirect request's segment pages in and finish parsing.
    fn indirect(
        &mut self,
        ctx: &mut Ctx<'_>,
        hdr: &IndirectRequest,
        cfg: &ParseConfig,
    ) -> Option<Request> {
        let segs = indirect_copy_segs(hdr);
        let mut pages = vec![0u8; segs.len() * XEN_PAGE_SIZE];
        if let Err(e) = ctx
            .env
            .grants()
            .copy_from_guest(self.dom, &segs, &mut pages)
        {
            debug!("ring {}/{}: indirect pages: {e}", self.domid, self.devid);
            self.stats.err_map += 1;
            self.respond(ctx, hdr.id, hdr.op.wire_op(), Status::Error);
            return None;
        }
        match hdr.complete(&pages, cfg) {
            Ok(req) => Some(req),
            Err(rej) => {
                self.stats.err_msg += 1;
                self.respond(ctx, rej.id, rej.op, rej.status());
                None
            }
        }
    }

    /// Copy a write's data from the guest into a private buffer (None: copy failed and the
    /// request was answered).
    fn copy_in(&mut self, ctx: &mut Ctx<'_>, req: &Request) -> Option<AlignedBuf> {
        // data_len <= 256 * 4096 (validated), fits usize.
        let mut buf = ctx.bufs.take(req.data_len() as usize);
        let segs = request_copy_segs(req, BufLayout::Packed);
        if let Err(e) = ctx.env.grants().copy_from_guest(self.dom, &segs, &mut buf) {
            debug!("ring {}/{}: write data: {e}", self.domid, self.devid);
            self.stats.err_map += 1;
            ctx.bufs.give(buf);
            self.respond(ctx, req.id, req.wire_op(), Status::Error);
            return None;
        }
        Some(buf)
    }

    /// Hand a request to the VBD ([`Vbd::begin_io`]); counted in this ring until it completes.
    fn submit(&mut self, ctx: &mut Ctx<'_>, vbd: &mut Vbd, tag: RingTag, op: Op) {
        let (id, wire_op, bytes) = (tag.id, tag.op, tag.bytes);
        let acct = tag.kind.acct();
        let is_sync = matches!(tag.kind, RingKind::Sync { .. });
        match vbd.begin_io(ctx.io, Door::Ring(tag), acct, op) {
            Ok(()) => {
                self.jobs += 1;
                self.bytes += bytes;
            }
            // Not reached: rings are only serviced while the VBD accepts I/O.
            Err(e) => {
                debug!("ring {}/{}: {e}", self.domid, self.devid);
                self.stats.err_vbd += 1;
                // An answered flush/barrier must not hold the ring back (`service` waits
                // while one is pending).
                if is_sync {
                    self.sync = None;
                }
                self.respond(ctx, id, wire_op, Status::Error);
            }
        }
    }

    fn start_request(&mut self, ctx: &mut Ctx<'_>, req: Request, vbd: &mut Vbd) {
        let wire_op = req.wire_op();
        let tag = |ring: &Ring, kind, bytes| RingTag {
            ring: ring.id,
            id: req.id,
            op: wire_op,
            kind,
            bytes,
        };
        match req.op {
            Operation::Read => {
                let len = req.data_len() as usize;
                let buf = ctx.bufs.take(len);
                let kind = RingKind::Read {
                    segs: request_copy_segs(&req, BufLayout::Packed),
                    sectors: req.nr_sectors(),
                };
                let t = tag(self, kind, len);
                let op = Op::Read {
                    sector: req.sector,
                    buf,
                };
                self.submit(ctx, vbd, t, op);
            }
            Operation::Write => {
                let Some(buf) = self.copy_in(ctx, &req) else {
                    return;
                };
                let kind = RingKind::Write {
                    sectors: req.nr_sectors(),
                };
                let t = tag(self, kind, buf.len());
                let op = Op::Write {
                    sector: req.sector,
                    buf,
                    fua: false,
                };
                self.submit(ctx, vbd, t, op);
            }
            Operation::WriteBarrier | Operation::Flush => {
                let data = if req.segments().is_empty() {
                    None
                } else {
                    match self.copy_in(ctx, &req) {
                        Some(b) => Some(b),
                        None => return,
                    }
                };
                self.sync = Some(SyncReq {
                    id: req.id,
                    op: wire_op,
                    sector: req.sector,
                    data,
                    submitted: false,
                });
                self.try_sync(ctx, vbd);
            }
            Operation::Discard { secure: true, .. } => {
                self.respond(ctx, req.id, wire_op, Status::NotSupported);
            }
            Operation::Discard { nr_sectors, .. } => {
                if nr_sectors == 0 {
                    self.respond(ctx, req.id, wire_op, Status::Okay);
                    return;
                }
                let t = tag(self, RingKind::Discard, 0);
                let op = Op::Discard {
                    sector: req.sector,
                    nsectors: nr_sectors,
                    fua: false,
                };
                self.submit(ctx, vbd, t, op);
            }
        }
    }

    /// Start a waiting flush/barrier once the ring has nothing else in flight.
    fn try_sync(&mut self, ctx: &mut Ctx<'_>, vbd: &mut Vbd) {
        if self.jobs > 0 || !vbd.accepts_io() {
            return;
        }
        let Some(s) = self.sync.as_mut() else {
            return;
        };
        if s.submitted {
            return;
        }
        s.submitted = true;
        let (id, op, sector) = (s.id, s.op, s.sector);
        let (kind, bytes, job) = match s.data.take() {
            Some(buf) => (
                RingKind::Sync {
                    sectors: buf.len() as u64 / crate::blkif::SECTOR_SIZE,
                },
                buf.len(),
                Op::Write {
                    sector,
                    buf,
                    fua: true,
                },
            ),
            None => (RingKind::Sync { sectors: 0 }, 0, Op::Flush),
        };
        let tag = RingTag {
            ring: self.id,
            id,
            op,
            kind,
            bytes,
        };
        self.submit(ctx, vbd, tag, job);
    }

    /// A job of this ring finished (the VBD has counted it already): copy read data to the
    /// guest and respond, or drop the result of a dead ring.
    pub fn complete(
        &mut self,
        ctx: &mut Ctx<'_>,
        tag: RingTag,
        result: Result<Output, ImageError>,
    ) -> Drained {
        self.jobs = self.jobs.saturating_sub(1);
        self.bytes = self.bytes.saturating_sub(tag.bytes);
        if self.dead {
            let drained = if self.jobs == 0 {
                info!(
                    "ring {}/{}: drained after disconnect",
                    self.domid, self.devid
                );
                Drained::Yes
            } else {
                Drained::No
            };
            if let Ok(Output::Data(b)) = result {
                ctx.bufs.give(b);
            }
            return drained;
        }
        if matches!(tag.kind, RingKind::Sync { .. }) {
            self.sync = None;
        }
        let status = match result {
            Ok(Output::Data(buf)) => {
                let mut st = Status::Okay;
                if let RingKind::Read { segs, .. } = &tag.kind {
                    if let Err(e) = ctx.env.grants().copy_to_guest(self.dom, segs, &buf) {
                        debug!("ring {}/{}: read data: {e}", self.domid, self.devid);
                        self.stats.err_map += 1;
                        st = Status::Error;
                    }
                }
                ctx.bufs.give(buf);
                st
            }
            Ok(_) => Status::Okay,
            Err(e) => {
                debug!("ring request failed: {e}");
                self.stats.err_img += 1;
                if e.errno() == libc::EOPNOTSUPP {
                    Status::NotSupported
                } else {
                    Status::Error
                }
            }
        };
        self.respond(ctx, tag.id, tag.op, status);
        push_unique(ctx.repoll, self.id);
        Drained::No
    }

    /// This ring's part of the `"xenbus"` stats member.
    pub fn stats_json(&self) -> String {
        let s = &self.stats;
        format!(
            "\"pool\": \"{}\", \"domid\": {}, \"devid\": {}, \
             \"reqs\": [ {}, {} ], \"kicks\": [ {}, {} ], \"errors\": {{ \"msg\": {}, \
             \"map\": {}, \"vbd\": {}, \"img\": {} }}",
            super::DEFAULT_POOL,
            self.domid,
            self.devid,
            s.reqs_in,
            s.reqs_out,
            s.kicks_in,
            s.kicks_out,
            s.err_msg,
            s.err_map,
            s.err_vbd,
            s.err_img
        )
    }
}
