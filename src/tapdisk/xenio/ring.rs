//! One ring connection: its per-ring state and everything done on it (take requests,
//! start them on the VBD, grant copy, complete, respond, publish). The set of rings and
//! their shared environment live in `mod.rs`; what a ring needs from them comes in a
//! borrowed [`Ctx`].

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use log::{debug, info, warn};

use crate::blkif::{
    BackRing, Operation, ParseConfig, Parsed, Request, RingError, Segments, Status,
};
use crate::image::ImageError;
use crate::xen::{CopyBuf, CopySeg, DomId, GuestCopy, Port, XEN_PAGE_SIZE};

use super::env::{RingMem, XenEnv};
use super::segs::{push_copy_segs, push_indirect_copy_segs, BufLayout};
use super::{MAX_INDIRECT_SEGMENTS, MAX_RING_BYTES};
use crate::tapdisk::io::{IoEngine, Op, Output};
use crate::tapdisk::tag::{Door, RingKind, RingTag, Tag};
use crate::tapdisk::vbd::{Vbd, VDISK_READONLY};
use crate::util::AlignedBuf;

/// Buffer capacity kept for re-use: what one ring may have in flight ([`MAX_RING_BYTES`]),
/// so a busy ring (32 requests of 1 MiB, 128 of 44 KiB) allocates nothing per request. It
/// used to be 64 buffers of any size, up to 64 MiB.
const POOL_BYTES: usize = MAX_RING_BYTES;

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
pub(super) struct BufPool {
    bufs: Vec<AlignedBuf>,
    /// Capacity held in `bufs`.
    bytes: usize,
}

impl BufPool {
    fn take(&mut self, len: usize) -> AlignedBuf {
        let mut b = match self.bufs.pop() {
            Some(b) => {
                self.bytes -= b.capacity();
                b
            }
            None => AlignedBuf::default(),
        };
        b.set_len(len);
        b
    }

    fn give(&mut self, b: AlignedBuf) {
        if self.bytes + b.capacity() <= POOL_BYTES {
            self.bytes += b.capacity();
            self.bufs.push(b);
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
    /// How long a ring is polled after its last request before it is re-armed
    /// (`Rings::set_poll`; zero: re-arm at once).
    pub poll: Duration,
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
    /// Queue index of a multi-queue device (0 otherwise).
    pub queue: u32,
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
    /// Reads whose data waits for the batched copy to the guest at publish.
    done_reads: Vec<DoneRead>,
    /// Re-used per-batch lists (a batch allocates nothing once they have grown).
    scratch: Scratch,
    /// Polling: until then the ring is checked every loop pass instead of re-arming
    /// `req_event`, so the guest need not notify (see [`Ctx::poll`]).
    poll_until: Option<Instant>,
}

/// A completed read: its data goes to the guest with the others of the loop pass.
#[derive(Debug)]
struct DoneRead {
    id: u64,
    op: u8,
    segs: Segments,
    buf: AlignedBuf,
}

/// The lists one batch works in.
#[derive(Debug, Default)]
struct Scratch {
    parsed: Vec<Parsed>,
    reqs: Vec<Request>,
    /// Data buffers of the batch's requests (`reqs[i]` ↔ `bufs[i]`).
    bufs: Vec<Option<AlignedBuf>>,
    segs: Vec<CopySeg>,
    /// `(first, end)` in `segs` per copy.
    spans: Vec<(usize, usize)>,
    /// Indirect segment pages of the batch, back to back.
    pages: Vec<u8>,
    ok: Vec<bool>,
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
        (domid, devid, queue): (u32, u32, u32),
        dom: DomId,
        port: Port,
        ring: BackRing<RingMem>,
    ) -> Ring {
        Ring {
            id,
            minor,
            domid,
            devid,
            queue,
            dom,
            port,
            ring,
            jobs: 0,
            bytes: 0,
            dead: false,
            sync: None,
            overflow_logged: false,
            stats: RingStats::default(),
            done_reads: Vec::new(),
            scratch: Scratch::default(),
            poll_until: None,
        }
    }

    /// Stop serving: no more requests or responses; a waiting flush is forgotten.
    pub fn kill(&mut self) {
        self.dead = true;
        self.sync = None;
        self.done_reads.clear();
    }

    /// Write a response into the ring (published later, at the end of the loop pass).
    fn respond(&mut self, ctx: &mut Ctx<'_>, id: u64, op: u8, status: Status) {
        if self.write_response(id, op, status) {
            push_unique(ctx.dirty, self.id);
        }
    }

    /// Write a response into the ring; false if nothing was written.
    fn write_response(&mut self, id: u64, op: u8, status: Status) -> bool {
        if self.dead {
            return false;
        }
        match self.ring.push_response(id, op, status) {
            Ok(()) => {
                self.stats.reqs_out += 1;
                true
            }
            Err(e) => {
                warn!("ring {}/{}: response: {e}", self.domid, self.devid);
                false
            }
        }
    }

    /// End of the loop pass: copy the completed reads' data to the guest (one grant-copy
    /// call for all of them), write their responses, make every written response visible
    /// and notify the guest once if it asked to be.
    pub fn publish(&mut self, ctx: &mut Ctx<'_>) {
        if self.dead {
            return;
        }
        self.finish_reads(ctx);
        if self.ring.push_responses_and_check_notify() {
            self.stats.kicks_out += 1;
            if let Err(e) = ctx.env.evtchn().notify(self.port) {
                debug!("ring {}/{}: notify: {e}", self.domid, self.devid);
            }
        }
    }

    /// Copy the data of every completed read to the guest in one batch and respond.
    fn finish_reads(&mut self, ctx: &mut Ctx<'_>) {
        if self.done_reads.is_empty() {
            return;
        }
        let mut done = std::mem::take(&mut self.done_reads);
        let sc = &mut self.scratch;
        sc.segs.clear();
        sc.spans.clear();
        for r in &done {
            let a = sc.segs.len();
            push_copy_segs(&mut sc.segs, r.segs.as_slice(), BufLayout::Packed);
            sc.spans.push((a, sc.segs.len()));
        }
        let mut copies: Vec<GuestCopy<'_>> = done
            .iter()
            .zip(&sc.spans)
            .map(|(r, &(a, b))| GuestCopy::new(&sc.segs[a..b], CopyBuf::ToGuest(&r.buf)))
            .collect();
        ctx.env.grants().copy_batch(self.dom, &mut copies);
        sc.ok.clear();
        sc.ok.extend(copies.iter().map(|c| {
            if let Err(e) = &c.result {
                debug!("ring {}/{}: read data: {e}", self.domid, self.devid);
            }
            c.result.is_ok()
        }));
        drop(copies);
        let ok = std::mem::take(&mut self.scratch.ok);
        for (r, &good) in done.drain(..).zip(&ok) {
            let st = if good {
                Status::Okay
            } else {
                self.stats.err_map += 1;
                Status::Error
            };
            self.write_response(r.id, r.op, st);
            ctx.bufs.give(r.buf);
        }
        self.scratch.ok = ok;
        self.done_reads = done;
    }

    fn overflow(&mut self, e: &RingError) {
        self.stats.err_msg += 1;
        if !self.overflow_logged {
            warn!("ring {}/{}: {e}", self.domid, self.devid);
            self.overflow_logged = true;
        }
    }

    /// Take every request the ring has (up to one ring's worth, the memory cap or a
    /// flush/barrier, which ends a batch) while the VBD accepts I/O, then start them as one
    /// batch: [`start_batch`](Self::start_batch).
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
        if self.sync.is_some() {
            self.try_sync(ctx, vbd);
            return;
        }
        let mut parsed = std::mem::take(&mut self.scratch.parsed);
        // At most one ring's worth per call: a guest answering itself cannot hold the loop.
        let mut budget = self.ring.entries();
        let mut bytes = self.bytes;
        loop {
            if budget == 0 {
                push_unique(ctx.repoll, self.id);
                break;
            }
            if bytes >= MAX_RING_BYTES {
                break; // re-polled when completions free memory
            }
            budget -= 1;
            let taken = match self.ring.next_request(&cfg) {
                Ok(Some(t)) => {
                    if !ctx.poll.is_zero() {
                        self.poll_until = Instant::now().checked_add(ctx.poll);
                    }
                    t
                }
                // Polling: look again next pass, leaving req_event where it is (the guest
                // sees no request to notify about).
                Ok(None) if self.poll_until.is_some_and(|t| Instant::now() < t) => {
                    push_unique(ctx.repoll, self.id);
                    break;
                }
                Ok(None) => match self.ring.final_check_for_requests() {
                    Ok(true) => continue,
                    Ok(false) => break,
                    Err(e) => {
                        self.overflow(&e);
                        break;
                    }
                },
                Err(e) => {
                    self.overflow(&e);
                    break;
                }
            };
            self.stats.reqs_in += 1;
            match taken {
                Err(rej) => {
                    debug!("ring request rejected: {}", rej.error);
                    self.stats.err_msg += 1;
                    self.respond(ctx, rej.id, rej.op, rej.status());
                }
                Ok(p) => {
                    let (len, sync) = match &p {
                        Parsed::Ready(r) => (
                            r.data_len(),
                            matches!(r.op, Operation::Flush | Operation::WriteBarrier),
                        ),
                        Parsed::Indirect(h) => {
                            (u64::from(h.nr_segments) * XEN_PAGE_SIZE as u64, false)
                        }
                    };
                    // data_len <= 256 * 4096 (validated), fits usize.
                    bytes += len as usize;
                    parsed.push(p);
                    if sync {
                        // Nothing after a flush or barrier is taken before it completed.
                        break;
                    }
                }
            }
        }
        self.start_batch(ctx, &mut parsed, &cfg, vbd);
        parsed.clear();
        self.scratch.parsed = parsed;
    }

    /// Start a batch in ring order: the indirect requests' segment pages come in with one
    /// grant-copy call, then the data of every write (and barrier) with one more, then each
    /// request goes to the VBD. A request whose copy failed is answered with an error alone.
    fn start_batch(
        &mut self,
        ctx: &mut Ctx<'_>,
        parsed: &mut Vec<Parsed>,
        cfg: &ParseConfig,
        vbd: &mut Vbd,
    ) {
        if parsed.is_empty() {
            return;
        }
        let mut reqs = std::mem::take(&mut self.scratch.reqs);
        self.complete_indirect(ctx, parsed, cfg, &mut reqs);
        let mut bufs = std::mem::take(&mut self.scratch.bufs);
        self.copy_in(ctx, &reqs, &mut bufs);
        for (req, buf) in reqs.drain(..).zip(bufs.drain(..)) {
            let needs_data = req.op.is_write() && !req.segments().is_empty();
            if needs_data && buf.is_none() {
                continue; // copy failed, answered
            }
            self.start_request(ctx, req, buf, vbd);
        }
        self.scratch.reqs = reqs;
        self.scratch.bufs = bufs;
    }

    /// Turn the batch into validated requests, in order: indirect ones get their segment
    /// pages with one grant-copy call for all and are completed (failures are answered).
    fn complete_indirect(
        &mut self,
        ctx: &mut Ctx<'_>,
        parsed: &mut Vec<Parsed>,
        cfg: &ParseConfig,
        reqs: &mut Vec<Request>,
    ) {
        let sc = &mut self.scratch;
        sc.segs.clear();
        sc.spans.clear();
        for p in parsed.iter() {
            if let Parsed::Indirect(h) = p {
                let a = sc.segs.len();
                push_indirect_copy_segs(&mut sc.segs, h);
                sc.spans.push((a, sc.segs.len()));
            }
        }
        sc.ok.clear();
        if !sc.spans.is_empty() {
            let need = sc.segs.len() * XEN_PAGE_SIZE;
            if sc.pages.len() < need {
                sc.pages.resize(need, 0);
            }
            let mut rest = &mut sc.pages[..need];
            let mut copies = Vec::with_capacity(sc.spans.len());
            for &(a, b) in &sc.spans {
                let (mine, tail) = rest.split_at_mut((b - a) * XEN_PAGE_SIZE);
                rest = tail;
                copies.push(GuestCopy::new(&sc.segs[a..b], CopyBuf::FromGuest(mine)));
            }
            ctx.env.grants().copy_batch(self.dom, &mut copies);
            for c in &copies {
                if let Err(e) = &c.result {
                    debug!("ring {}/{}: indirect pages: {e}", self.domid, self.devid);
                }
            }
            sc.ok.extend(copies.iter().map(|c| c.result.is_ok()));
        }
        let ok = std::mem::take(&mut self.scratch.ok);
        let pages = std::mem::take(&mut self.scratch.pages);
        let mut k = 0;
        let mut at = 0;
        for p in parsed.drain(..) {
            let hdr = match p {
                Parsed::Ready(r) => {
                    reqs.push(r);
                    continue;
                }
                Parsed::Indirect(h) => h,
            };
            let len = hdr.grefs.len() * XEN_PAGE_SIZE;
            let mine = &pages[at..at + len];
            at += len;
            let good = ok.get(k).copied().unwrap_or(false);
            k += 1;
            if !good {
                self.stats.err_map += 1;
                self.respond(ctx, hdr.id, hdr.op.wire_op(), Status::Error);
                continue;
            }
            match hdr.complete(mine, cfg) {
                Ok(req) => reqs.push(req),
                Err(rej) => {
                    self.stats.err_msg += 1;
                    self.respond(ctx, rej.id, rej.op, rej.status());
                }
            }
        }
        self.scratch.ok = ok;
        self.scratch.pages = pages;
    }

    /// Copy the data of the batch's writes (and barriers/flushes with data) from the guest
    /// into private buffers, one grant-copy call for all: `bufs[i]` is `reqs[i]`'s buffer,
    /// `None` for a request without data or whose copy failed (answered here). From here on
    /// the guest cannot change the data.
    fn copy_in(&mut self, ctx: &mut Ctx<'_>, reqs: &[Request], bufs: &mut Vec<Option<AlignedBuf>>) {
        bufs.clear();
        let sc = &mut self.scratch;
        sc.segs.clear();
        sc.spans.clear();
        for req in reqs {
            if req.op.is_write() && !req.segments().is_empty() {
                // data_len <= 256 * 4096 (validated), fits usize.
                bufs.push(Some(ctx.bufs.take(req.data_len() as usize)));
                let a = sc.segs.len();
                push_copy_segs(&mut sc.segs, req.segments(), BufLayout::Packed);
                sc.spans.push((a, sc.segs.len()));
            } else {
                bufs.push(None);
            }
        }
        if sc.spans.is_empty() {
            return;
        }
        let mut copies: Vec<GuestCopy<'_>> = bufs
            .iter_mut()
            .flatten()
            .zip(&sc.spans)
            .map(|(b, &(a, e))| GuestCopy::new(&sc.segs[a..e], CopyBuf::FromGuest(b)))
            .collect();
        ctx.env.grants().copy_batch(self.dom, &mut copies);
        sc.ok.clear();
        sc.ok.extend(copies.iter().map(|c| {
            if let Err(e) = &c.result {
                debug!("ring {}/{}: write data: {e}", self.domid, self.devid);
            }
            c.result.is_ok()
        }));
        drop(copies);
        let ok = std::mem::take(&mut self.scratch.ok);
        let mut k = 0;
        for (req, slot) in reqs.iter().zip(bufs.iter_mut()) {
            if slot.is_none() {
                continue;
            }
            let good = ok.get(k).copied().unwrap_or(false);
            k += 1;
            if !good {
                if let Some(b) = slot.take() {
                    ctx.bufs.give(b);
                }
                self.stats.err_map += 1;
                self.respond(ctx, req.id, req.wire_op(), Status::Error);
            }
        }
        self.scratch.ok = ok;
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

    /// Start one validated request; `data`: its guest data, already copied in (writes,
    /// barriers and flushes with segments).
    fn start_request(
        &mut self,
        ctx: &mut Ctx<'_>,
        req: Request,
        data: Option<AlignedBuf>,
        vbd: &mut Vbd,
    ) {
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
                    sectors: req.nr_sectors(),
                    segs: req.segments,
                };
                let t = tag(self, kind, len);
                let op = Op::Read {
                    sector: req.sector,
                    buf,
                };
                self.submit(ctx, vbd, t, op);
            }
            Operation::Write => {
                let Some(buf) = data else {
                    return; // not reached: writes carry at least one segment
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
        push_unique(ctx.repoll, self.id);
        let status = match result {
            Ok(Output::Data(buf)) => {
                if let RingKind::Read { segs, .. } = tag.kind {
                    // Copied to the guest with the pass's other reads (publish).
                    self.done_reads.push(DoneRead {
                        id: tag.id,
                        op: tag.op,
                        segs,
                        buf,
                    });
                    push_unique(ctx.dirty, self.id);
                    return Drained::No;
                }
                ctx.bufs.give(buf);
                Status::Okay
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
