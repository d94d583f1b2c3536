//! The NBD side of the event loop: per-VBD listening sockets, client connections, turning
//! decoded commands into I/O engine jobs and completions into replies.
//!
//! A connection reads only while its VBD accepts I/O (not pausing, paused or closing), it has
//! fewer than `MAX_CONN_INFLIGHT` requests in the engine and its output queue is not
//! backlogged; otherwise its epoll interest drops EPOLLIN and the client waits in the socket.
//! All connections together hold at most `NBD_MEM_LIMIT` of buffers (requests in flight,
//! queued replies, WRITE payloads being received, recycled buffers, and the requests of
//! connections already gone); past it a READ or WRITE starts only if it fits in what is left,
//! or, for a connection holding under `NBD_MEM_FLOOR`, within that floor; otherwise it waits
//! undecoded (`Connection::waiting_for_memory`) and `retry_mem_waiters` settles it once it fits.
//! An `accept` that fails (out of descriptors) takes the listener out of the epoll set until
//! the next tick or until a client leaves.

use super::*;
use crate::util::AlignedBuf;

/// Bytes one BLOCK_STATUS request describes at most (the reply may cover less than asked,
/// NBD spec): bounds the extent list the image builds and the reply (a raw file fragmented
/// by its guest at 4 KiB could otherwise yield a million extents for one 4 GiB request).
const MAX_BLOCK_STATUS_LEN: u32 = proto::MAX_PAYLOAD;

impl Tapdisk {
    pub(super) fn listen(&mut self, minor: u16) -> std::io::Result<()> {
        let path = self.cfg.nbd_path(minor);
        // A stale socket from a killed tapdisk with a recycled pid.
        let _ = std::fs::remove_file(&path);
        let sock = UnixListener::bind(&path)?;
        sock.set_nonblocking(true)?;
        self.reactor
            .add(&sock, Token::Listener(minor), Interest::READ)
            .map_err(std::io::Error::from)?;
        self.listeners.insert(
            minor,
            Listener {
                sock,
                path,
                registered: true,
                wanted: true,
                starved: false,
            },
        );
        Ok(())
    }

    pub(super) fn set_listening(&mut self, minor: u16, on: bool) {
        if let Some(l) = self.listeners.get_mut(&minor) {
            l.wanted = on;
        }
        self.apply_listening(minor);
    }

    /// Put the listener in the epoll set or take it out, as wanted and not starved.
    fn apply_listening(&mut self, minor: u16) {
        let Some(l) = self.listeners.get_mut(&minor) else {
            return;
        };
        let on = l.wanted && !l.starved;
        if l.registered == on {
            return;
        }
        let r = if on {
            self.reactor
                .add(&l.sock, Token::Listener(minor), Interest::READ)
        } else {
            self.reactor.delete(&l.sock)
        };
        if let Err(e) = r {
            warn!("minor {minor}: epoll_ctl on listener: {e}");
        }
        l.registered = on;
    }

    /// Listen again on the listeners an accept failure starved (from the timer and when a
    /// client leaves, freeing its descriptor).
    pub(super) fn unstarve_listeners(&mut self) {
        if !std::mem::take(&mut self.accept_starved) {
            return;
        }
        let minors: Vec<u16> = self
            .listeners
            .iter()
            .filter(|(_, l)| l.starved)
            .map(|(m, _)| *m)
            .collect();
        for m in minors {
            if let Some(l) = self.listeners.get_mut(&m) {
                l.starved = false;
            }
            self.apply_listening(m);
        }
    }

    pub(super) fn remove_listener(&mut self, minor: u16) {
        if let Some(l) = self.listeners.remove(&minor) {
            let _ = std::fs::remove_file(&l.path);
        }
    }

    pub(super) fn accept(&mut self, minor: u16) {
        loop {
            let Some(l) = self.listeners.get(&minor) else {
                return;
            };
            let stream = match l.sock.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => continue,
                Err(e) => {
                    // Out of descriptors (EMFILE, ENFILE) or memory: the client stays in
                    // the backlog and the listener stays readable. Stop polling it until
                    // the next tick or until a client leaves, rather than spin.
                    warn!("minor {minor}: accept: {e}: not accepting for now");
                    if let Some(l) = self.listeners.get_mut(&minor) {
                        l.starved = true;
                    }
                    self.accept_starved = true;
                    self.apply_listening(minor);
                    return;
                }
            };
            let Some(info) = self.vbds.get(&minor).and_then(Vbd::info) else {
                return;
            };
            let Some(size) = info.sectors.checked_mul(u64::from(info.sector_size)) else {
                warn!("minor {minor}: disk size overflows u64: nbd client refused");
                continue;
            };
            let export = ExportInfo {
                size,
                read_only: info.info & VDISK_READONLY != 0,
                name: String::new(),
            };
            let conn = match Connection::new(stream, export) {
                Ok(c) => c,
                Err(e) => {
                    warn!("minor {minor}: nbd connection setup: {e}");
                    continue;
                }
            };
            let id = self.next_conn;
            self.next_conn += 1;
            let interest = Interest {
                read: true,
                write: true,
            };
            if let Err(e) = self.reactor.add(conn.stream(), Token::Conn(id), interest) {
                warn!("minor {minor}: epoll_ctl: {e}");
                continue;
            }
            debug!("minor {minor}: nbd client {id} connected");
            self.conns.insert(
                id,
                NbdConn {
                    conn,
                    minor,
                    inflight: 0,
                    inflight_bytes: 0,
                    interest,
                    ending: false,
                    since: Instant::now(),
                    counted: 0,
                },
            );
        }
    }

    pub(super) fn conn_ids(&self, minor: u16) -> Vec<u64> {
        self.conns
            .iter()
            .filter(|(_, c)| c.minor == minor)
            .map(|(id, _)| *id)
            .collect()
    }

    pub(super) fn drop_conn(&mut self, id: u64) {
        if let Some(c) = self.conns.remove(&id) {
            // Its requests in flight keep their buffers until they complete (`nbd_done`):
            // still counted, or reconnecting clients could pile them up without limit.
            self.nbd_mem = self.nbd_mem.saturating_sub(c.counted) + c.inflight_bytes;
            self.mem_waiters.remove(&id);
            let _ = self.reactor.delete(c.conn.stream());
            drop(c);
            self.unstarve_listeners();
            debug!("nbd client {id} closed");
        }
    }

    pub(super) fn refresh_conns(&mut self, minor: u16) {
        for id in self.conn_ids(minor) {
            self.settle(id);
        }
    }

    pub(super) fn conn_ready(&mut self, id: u64, r: Ready) {
        if r.hangup && !r.readable {
            self.drop_conn(id);
            return;
        }
        if r.readable {
            if let Some(c) = self.conns.get_mut(&id) {
                c.conn.mark_readable();
            }
            self.read_conn(id);
        }
        self.settle(id);
    }

    /// Decode and start requests one at a time while the connection is within its limits
    /// (count and bytes in flight), up to [`READ_BATCH`] per readiness for fairness.
    pub(super) fn read_conn(&mut self, id: u64) {
        let mut events = Vec::with_capacity(1);
        for _ in 0..READ_BATCH {
            let Some(c) = self.conns.get_mut(&id) else {
                return;
            };
            let accepts = self.vbds.get(&c.minor).is_some_and(Vbd::accepts_io);
            let reserved = reserved_for_waiter(&self.mem_waiters, id);
            let allowance =
                mem_allowance(self.cfg.nbd_mem_limit, self.nbd_mem, reserved, c.counted);
            if !c.readable_by_us(accepts, allowance) {
                return;
            }
            c.conn
                .set_mem_allowance(usize::try_from(allowance).unwrap_or(usize::MAX));
            events.clear();
            let queued = c.conn.queued_bytes();
            let status = c.conn.on_readable(1, &mut events);
            // An error reply to a refused request is progress too.
            let replied = c.conn.queued_bytes() > queued;
            let minor = c.minor;
            if status == ReadStatus::Done {
                c.ending = true;
                if let Some(e) = &c.conn.close_reason {
                    info!("minor {minor}: nbd client {id}: {e}");
                }
            }
            let got = !events.is_empty() || replied;
            for ev in events.drain(..) {
                match ev {
                    Event::Disconnect => {
                        if let Some(c) = self.conns.get_mut(&id) {
                            c.ending = true;
                        }
                    }
                    Event::Request { cookie, cmd, data } => {
                        self.start_request(id, minor, cookie, cmd, data);
                    }
                }
            }
            self.account(id);
            if self.io.has_inline() && !self.reply_now(id) {
                return;
            }
            if !got || status == ReadStatus::Done {
                return;
            }
        }
    }

    /// Queue the replies of requests that ran inline and send what the socket takes, while
    /// the data is still in the CPU cache (reading a whole batch first would leave up to 64
    /// filled buffers waiting). Settling is deferred to the end of the loop pass. False when
    /// the connection broke and was dropped.
    fn reply_now(&mut self, id: u64) -> bool {
        self.take_completions();
        let Some(c) = self.conns.get_mut(&id) else {
            return false;
        };
        if c.conn.wants_write() {
            if let Err(e) = c.conn.flush() {
                debug!("nbd client {id}: write: {e}");
                self.drop_conn(id);
                return false;
            }
        }
        true
    }

    pub(super) fn start_request(
        &mut self,
        id: u64,
        minor: u16,
        cookie: u64,
        cmd: Command,
        data: Option<AlignedBuf>,
    ) {
        if self.vbds.get(&minor).is_none_or(|v| v.image().is_none()) {
            if let Some(c) = self.conns.get_mut(&id) {
                c.conn.reply_error(cookie, true, proto::NBD_ESHUTDOWN);
            }
            return;
        }
        let ss = SECTOR_SIZE;
        let (op, req) = match cmd {
            Command::Read { offset, len } => {
                let sector = offset / ss;
                let end = (offset + u64::from(len)).div_ceil(ss);
                if len == 0 {
                    if let Some(c) = self.conns.get_mut(&id) {
                        c.conn
                            .reply_read(cookie, offset, AlignedBuf::default(), 0, 0);
                    }
                    return;
                }
                // end - sector <= (MAX_PAYLOAD + 1023) / 512 sectors: fits usize.
                let n = ((end - sector) * ss) as usize;
                let Some(c) = self.conns.get_mut(&id) else {
                    return;
                };
                let buf = c.conn.take_buf(n);
                let skip = (offset % ss) as usize;
                (Op::Read { sector, buf }, NbdReq::Read { offset, len, skip })
            }
            Command::Write { offset, len, fua } => {
                let buf = data.unwrap_or_default();
                (
                    Op::Write {
                        sector: offset / ss,
                        buf,
                        fua,
                    },
                    NbdReq::Write {
                        nsectors: u64::from(len) / ss,
                        payload: true,
                    },
                )
            }
            Command::Flush => (Op::Flush, NbdReq::Other),
            Command::Trim { offset, len, fua } => {
                // Only whole sectors can be dropped; trimming is advisory.
                let s = offset.div_ceil(ss);
                let e = (offset + u64::from(len)) / ss;
                if e <= s {
                    if let Some(c) = self.conns.get_mut(&id) {
                        c.conn.reply_ok(cookie);
                    }
                    return;
                }
                (
                    Op::Discard {
                        sector: s,
                        nsectors: e - s,
                        fua,
                    },
                    NbdReq::Other,
                )
            }
            Command::WriteZeroes {
                offset,
                len,
                fua,
                no_hole,
            } => (
                Op::WriteZeroes {
                    sector: offset / ss,
                    nsectors: u64::from(len) / ss,
                    fua,
                    no_hole,
                },
                NbdReq::Write {
                    nsectors: u64::from(len) / ss,
                    payload: false,
                },
            ),
            Command::BlockStatus {
                offset,
                len,
                req_one,
            } => {
                let len = len.min(MAX_BLOCK_STATUS_LEN);
                let s = offset / ss;
                let e = (offset + u64::from(len)).div_ceil(ss);
                (
                    Op::BlockStatus {
                        sector: s,
                        nsectors: e - s,
                    },
                    NbdReq::BlockStatus {
                        offset,
                        len,
                        req_one,
                    },
                )
            }
            Command::Disconnect => return,
        };
        let acct = req.acct();
        let door = Door::Nbd(NbdTag {
            conn: id,
            cookie,
            req,
        });
        let started = self
            .vbds
            .get_mut(&minor)
            .is_some_and(|v| v.begin_io(&self.io, door, acct, op).is_ok());
        if !started {
            // Not reached (the image was checked above); answer rather than leave the
            // client waiting.
            if let Some(c) = self.conns.get_mut(&id) {
                c.conn.reply_error(cookie, true, proto::NBD_ESHUTDOWN);
            }
            return;
        }
        if let Some(c) = self.conns.get_mut(&id) {
            c.inflight += 1;
            c.inflight_bytes += req.mem_bytes();
        }
    }

    /// Flush output, drop finished connections, and set epoll interest to match.
    pub(super) fn settle(&mut self, id: u64) {
        self.settle_inner(id);
        self.account(id);
    }

    /// Bring [`Tapdisk::nbd_mem`] up to date with connection `id`.
    pub(super) fn account(&mut self, id: u64) {
        if let Some(c) = self.conns.get_mut(&id) {
            // Idle recycled buffers must not keep a waiting request waiting.
            if !self.mem_waiters.is_empty() {
                c.conn.clear_pool();
            }
            let now = c.held();
            self.nbd_mem = self.nbd_mem.saturating_sub(c.counted) + now;
            c.counted = now;
        }
    }

    /// Settle the connections waiting for memory whose request now fits.
    pub(super) fn retry_mem_waiters(&mut self) {
        if self.mem_waiters.is_empty() {
            return;
        }
        if std::mem::take(&mut self.trim_pools) {
            self.clear_nbd_pools();
        }
        let ready: Vec<u64> = self
            .mem_waiters
            .iter()
            .filter(|(id, need)| {
                self.conns.get(id).is_none_or(|c| {
                    let reserved = reserved_for_waiter(&self.mem_waiters, **id);
                    **need
                        <= mem_allowance(self.cfg.nbd_mem_limit, self.nbd_mem, reserved, c.counted)
                })
            })
            .map(|(id, _)| *id)
            .collect();
        for id in ready {
            self.mem_waiters.remove(&id);
            self.settle(id);
        }
    }

    /// Over the memory limit: drop every connection's recycled buffers (once a second,
    /// from the timer).
    pub(super) fn trim_nbd_pools(&mut self) {
        if self.nbd_mem > self.cfg.nbd_mem_limit {
            self.clear_nbd_pools();
        }
    }

    /// Drop every connection's recycled buffers.
    fn clear_nbd_pools(&mut self) {
        let ids: Vec<u64> = self.conns.keys().copied().collect();
        for id in ids {
            if let Some(c) = self.conns.get_mut(&id) {
                c.conn.clear_pool();
            }
            self.account(id);
        }
    }

    fn settle_inner(&mut self, id: u64) {
        // Requests already buffered in the connection (read from the socket earlier, left
        // unprocessed when a limit was hit) produce no epoll event: decode them here as soon
        // as the connection may take requests again. Bounded: each pass starts requests or
        // stops at a limit.
        for _ in 0..4 {
            let Some(c) = self.conns.get_mut(&id) else {
                return;
            };
            if c.conn.wants_write() {
                if let Err(e) = c.conn.flush() {
                    debug!("nbd client {id}: write: {e}");
                    self.drop_conn(id);
                    return;
                }
            }
            if c.ending && c.inflight == 0 && !c.conn.wants_write() {
                self.drop_conn(id);
                return;
            }
            let accepts = self.vbds.get(&c.minor).is_some_and(Vbd::accepts_io);
            let mut read = !c.ending
                && accepts
                && c.inflight < MAX_CONN_INFLIGHT
                && c.inflight_bytes < MAX_CONN_INFLIGHT_BYTES
                && !c.conn.backlogged();
            // The next request waits for memory: stop reading (no busy loop on EPOLLIN)
            // until [`Tapdisk::retry_mem_waiters`] or this connection's own progress.
            let waiting = c.conn.waiting_for_memory().map(|n| n as u64);
            if let Some(need) = waiting.filter(|_| read) {
                let reserved = reserved_for_waiter(&self.mem_waiters, id);
                if need > mem_allowance(self.cfg.nbd_mem_limit, self.nbd_mem, reserved, c.counted) {
                    c.conn.clear_pool();
                    read = false;
                    if self.mem_waiters.insert(id, need).is_none() {
                        // A new waiter: the other connections' idle buffers go first.
                        self.trim_pools = true;
                    }
                } else {
                    self.mem_waiters.remove(&id);
                }
            } else if waiting.is_none() {
                self.mem_waiters.remove(&id);
            }
            let Some(c) = self.conns.get_mut(&id) else {
                return;
            };
            let want = Interest {
                read,
                write: c.conn.wants_write(),
            };
            if want != c.interest {
                if let Err(e) = self.reactor.modify(c.conn.stream(), Token::Conn(id), want) {
                    warn!("nbd client {id}: epoll_ctl: {e}");
                }
                c.interest = want;
            }
            if !(read && c.conn.has_buffered_input()) {
                return;
            }
            self.read_conn(id);
        }
    }

    /// An NBD request completed (the VBD has counted it already): queue its reply.
    pub(super) fn nbd_done(&mut self, minor: u16, t: NbdTag, res: Result<Output, ImageError>) {
        let NbdTag {
            conn: id,
            cookie,
            req,
        } = t;
        let Some(c) = self.conns.get_mut(&id) else {
            // The client went away: drop the result, and its buffer from the count.
            self.nbd_mem = self.nbd_mem.saturating_sub(req.mem_bytes());
            return;
        };
        c.inflight = c.inflight.saturating_sub(1);
        c.inflight_bytes = c.inflight_bytes.saturating_sub(req.mem_bytes());
        match (req, res) {
            (NbdReq::Read { offset, len, skip }, Ok(Output::Data(buf))) => {
                c.conn.reply_read(cookie, offset, buf, skip, len)
            }
            (
                NbdReq::BlockStatus {
                    offset,
                    len,
                    req_one,
                },
                Ok(Output::Extents(ext)),
            ) => {
                let e = nbd_extents(&ext, offset, len, req_one);
                c.conn.reply_block_status(cookie, &e);
            }
            (NbdReq::Read { .. } | NbdReq::BlockStatus { .. }, r) => {
                let errno = r.err().map_or(libc::EIO, |e| e.errno());
                c.conn.reply_error(cookie, true, proto::errno_to_nbd(errno));
            }
            (_, Ok(Output::Data(buf))) => {
                c.conn.give_buf(buf);
                c.conn.reply_ok(cookie)
            }
            (_, Ok(_)) => c.conn.reply_ok(cookie),
            (_, Err(e)) => {
                debug!("minor {minor}: request failed: {e}");
                c.conn
                    .reply_error(cookie, false, proto::errno_to_nbd(e.errno()));
            }
        }
    }
}

/// Convert image extents (sectors) to NBD `base:allocation` descriptors clipped to the
/// requested byte range, merging neighbours with equal flags.
pub(super) fn nbd_extents(ext: &[Extent], offset: u64, len: u32, req_one: bool) -> Vec<(u32, u32)> {
    let end = offset + u64::from(len);
    let mut out: Vec<(u32, u32)> = Vec::new();
    for e in ext {
        // Saturating: an image reporting an extent near u64::MAX must not overflow.
        let a = e.sector.saturating_mul(SECTOR_SIZE).max(offset);
        let b = e
            .sector
            .saturating_add(e.nsectors)
            .saturating_mul(SECTOR_SIZE)
            .min(end);
        if b <= a {
            continue;
        }
        let flags = if e.allocated {
            0
        } else {
            proto::STATE_HOLE | proto::STATE_ZERO
        };
        // b - a <= len, a u32.
        let l = (b - a) as u32;
        match out.last_mut() {
            Some(last) if last.1 == flags => last.0 += l,
            _ => out.push((l, flags)),
        }
    }
    if out.is_empty() {
        out.push((len, 0));
    }
    if req_one {
        out.truncate(1);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn extents_are_clipped_merged_and_flagged() {
        let ext = [
            Extent {
                sector: 0,
                nsectors: 8,
                allocated: true,
            },
            Extent {
                sector: 8,
                nsectors: 8,
                allocated: true,
            },
            Extent {
                sector: 16,
                nsectors: 16,
                allocated: false,
            },
        ];
        assert_eq!(
            nbd_extents(&ext, 100, 10000, false),
            vec![(8092, 0), (1908, 3)]
        );
        assert_eq!(nbd_extents(&ext, 100, 10000, true), vec![(8092, 0)]);
    }

    #[test]
    fn extents_near_u64_max_do_not_overflow() {
        let ext = [
            Extent {
                sector: 0,
                nsectors: 4,
                allocated: true,
            },
            Extent {
                sector: 4,
                nsectors: u64::MAX,
                allocated: false,
            },
        ];
        assert_eq!(
            nbd_extents(&ext, 0, 4096, false),
            vec![(2048, 0), (2048, 3)]
        );
    }
}
