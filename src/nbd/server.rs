//! One NBD client connection over a non-blocking Unix stream socket.
//!
//! The connection turns readable bytes into [`Event`]s (validated commands with their write
//! payloads) and queues replies, which [`Connection::flush`] writes with `writev` as the
//! socket accepts them. It never blocks: a slow client only grows its own output queue (the
//! caller stops reading from it when [`Connection::backlogged`] says so), and the caller can
//! bound the data buffers new requests take ([`Connection::set_mem_allowance`]). Images,
//! in-flight accounting and the event loop are the caller's business (tapdisk's NBD glue).

use std::collections::{HashMap, VecDeque};
use std::io::{self, IoSlice, Read};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::proto::{self, Command, ExportInfo, Handshake, Negotiated, Outcome, RequestHeader};
use super::NbdError;
use crate::util::AlignedBuf;

/// Input buffer size (headers and small payloads are read through it).
const RBUF: usize = 64 << 10;
/// Output queued beyond this marks the connection backlogged (stop taking requests). Kept
/// small: a client that does not keep up gains nothing from more queued replies, and
/// replies sent soon after their data was read are still in the CPU cache (64 MiB here cost
/// nbdcopy a tenth of its throughput).
const OUT_HIGH_WATER: usize = 4 << 20;
/// iovecs per writev.
const MAX_IOV: usize = 64;
/// Socket bytes read per [`Connection::on_readable`] call: a client streaming payload that
/// produces no event (a refused WRITE's data, a skipped option) cannot hold the loop.
const READ_BUDGET: usize = 4 << 20;
/// Data buffers kept for reuse per connection (bytes), and the smallest worth keeping.
const POOL_MAX_BYTES: usize = 16 << 20;
const POOL_MIN_BUF: usize = 4096;

/// A decoded client request.
#[derive(Debug)]
pub enum Event {
    /// A valid command; `data` is the payload of a WRITE, read from the socket straight
    /// into a page-aligned buffer that can go to the disk as it is (direct I/O).
    Request {
        cookie: u64,
        cmd: Command,
        data: Option<AlignedBuf>,
    },
    /// NBD_CMD_DISC: finish what is in flight, then close.
    Disconnect,
}

/// Whether the peer is still there after reading.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadStatus {
    Open,
    /// End of file, DISC, or a fatal protocol error: stop reading; flush and close.
    Done,
}

#[derive(Debug)]
enum Phase {
    Handshake(Box<Handshake>),
    Header,
    Payload {
        cookie: u64,
        cmd: Command,
        buf: AlignedBuf,
        filled: usize,
    },
    Skip {
        cookie: u64,
        err: u32,
        remaining: u64,
    },
    Closed,
}

#[derive(Debug)]
struct OutChunk {
    buf: OutBuf,
    start: usize,
    end: usize,
}

/// Queued output: protocol bytes, or a read's data buffer (recycled once written).
#[derive(Debug)]
enum OutBuf {
    Proto(Vec<u8>),
    Data(AlignedBuf),
}

impl OutBuf {
    fn bytes(&self) -> &[u8] {
        match self {
            OutBuf::Proto(v) => v,
            OutBuf::Data(b) => b,
        }
    }
}

/// A client connection (handshake and transmission phases).
#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
    export: ExportInfo,
    phase: Phase,
    neg: Negotiated,
    rbuf: Vec<u8>,
    rstart: usize,
    rend: usize,
    out: VecDeque<OutChunk>,
    out_bytes: usize,
    /// Data buffers by length, for reuse without zeroing. Per connection, so a buffer only
    /// ever carries data this client could read anyway.
    pool: HashMap<usize, Vec<AlignedBuf>>,
    pool_bytes: usize,
    /// The last socket read came up short: wait for epoll before reading again.
    drained: bool,
    /// Buffer bytes the next requests may take (READ and WRITE lengths), set by the caller
    /// before [`Connection::on_readable`]: a request needing more waits, undecoded.
    mem_allowance: usize,
    /// Buffer bytes the request at the head of the input needs, when it is waiting for
    /// [`Connection::set_mem_allowance`] to allow them.
    mem_wait: Option<usize>,
    /// Why the connection is ending, once it is.
    pub close_reason: Option<NbdError>,
    /// When the client last moved bytes (we read from it or wrote to it), or the output
    /// queue last ran empty: see [`Connection::stalled_for`].
    last_progress: Instant,
}

impl Connection {
    /// Wrap an accepted socket and queue the greeting.
    pub fn new(stream: UnixStream, export: ExportInfo) -> io::Result<Self> {
        stream.set_nonblocking(true)?;
        let hs = Handshake::new(export.clone());
        let greeting = hs.greeting();
        let mut c = Connection {
            stream,
            export,
            phase: Phase::Handshake(Box::new(hs)),
            neg: Negotiated::default(),
            rbuf: vec![0u8; RBUF],
            rstart: 0,
            rend: 0,
            out: VecDeque::new(),
            out_bytes: 0,
            pool: HashMap::new(),
            pool_bytes: 0,
            drained: false,
            mem_allowance: usize::MAX,
            mem_wait: None,
            close_reason: None,
            last_progress: Instant::now(),
        };
        c.queue(greeting);
        Ok(c)
    }

    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Still negotiating.
    pub fn in_handshake(&self) -> bool {
        matches!(self.phase, Phase::Handshake(_))
    }

    /// Input bytes read from the socket but not decoded yet (a request limit was hit).
    /// The socket will not signal them again: the caller must come back for them.
    pub fn has_buffered_input(&self) -> bool {
        self.rstart < self.rend && !matches!(self.phase, Phase::Closed)
    }

    /// Output waiting to be written.
    pub fn wants_write(&self) -> bool {
        self.out_bytes > 0
    }

    /// Too much output queued: stop reading requests until it drains.
    pub fn backlogged(&self) -> bool {
        self.out_bytes > OUT_HIGH_WATER
    }

    /// How long the client has held us up: replies queued that it does not read, or a WRITE
    /// payload it stopped sending part-way, with no byte moved for that long. `None` while
    /// it owes us nothing (an idle client, or a request waiting for our memory).
    pub fn stalled_for(&self, now: Instant) -> Option<Duration> {
        let mid_payload = matches!(self.phase, Phase::Payload { .. });
        (self.out_bytes > 0 || mid_payload)
            .then(|| now.saturating_duration_since(self.last_progress))
    }

    /// We are not reading from this client for reasons of our own (its VBD paused, our
    /// limits): the time it spends part-way through a WRITE payload is not its stall. Output
    /// it does not read still counts.
    pub fn hold_clock(&mut self, now: Instant) {
        if self.out_bytes == 0 {
            self.last_progress = now;
        }
    }

    /// Bytes of output queued and not yet written.
    pub fn queued_bytes(&self) -> usize {
        self.out_bytes
    }

    /// Allow the next requests `bytes` of data buffers in total (default: no limit). A
    /// READ or WRITE needing more stays undecoded ([`Connection::waiting_for_memory`]) until
    /// a later allowance covers it; other requests are not held back.
    pub fn set_mem_allowance(&mut self, bytes: usize) {
        self.mem_allowance = bytes;
    }

    /// The buffer bytes the next request needs, if it is waiting for an allowance.
    pub fn waiting_for_memory(&self) -> Option<usize> {
        self.mem_wait
    }

    /// Memory this connection holds for its client: queued output, recycled buffers and a
    /// WRITE payload being received (requests in the engine are the caller's to count).
    pub fn held_bytes(&self) -> usize {
        let payload = match &self.phase {
            Phase::Payload { buf, .. } => buf.len(),
            _ => 0,
        };
        self.out_bytes + self.pool_bytes + payload
    }

    /// Drop the recycled buffers.
    pub fn clear_pool(&mut self) {
        self.pool.clear();
        self.pool_bytes = 0;
    }

    /// A buffer of exactly `len` bytes (old contents if recycled: the caller overwrites it).
    pub fn take_buf(&mut self, len: usize) -> AlignedBuf {
        if let Some(b) = self.pool.get_mut(&len).and_then(Vec::pop) {
            self.pool_bytes -= len;
            return b;
        }
        AlignedBuf::zeroed(len)
    }

    /// Return a data buffer for reuse.
    pub fn give_buf(&mut self, buf: AlignedBuf) {
        let len = buf.len();
        if len >= POOL_MIN_BUF && self.pool_bytes + len <= POOL_MAX_BYTES {
            self.pool_bytes += len;
            self.pool.entry(len).or_default().push(buf);
        }
    }

    fn queue(&mut self, buf: Vec<u8>) {
        let end = buf.len();
        self.queue_range(OutBuf::Proto(buf), 0, end);
    }

    fn queue_range(&mut self, buf: OutBuf, start: usize, end: usize) {
        if end > start {
            if self.out_bytes == 0 {
                // The client owes us nothing until now: its time starts here.
                self.last_progress = Instant::now();
            }
            self.out_bytes += end - start;
            self.out.push_back(OutChunk { buf, start, end });
        }
    }

    /// The socket reported readable again (epoll): the next [`Connection::on_readable`]
    /// reads from it even if the last read came up short.
    pub fn mark_readable(&mut self) {
        self.drained = false;
    }

    /// Decode buffered input and read more from the socket, up to `max` events (error
    /// replies to refused requests count as events). A short read marks the socket drained:
    /// later calls only decode what is buffered until [`Connection::mark_readable`] (saves
    /// the EAGAIN read per request; level-triggered epoll reports any data that arrives
    /// meanwhile). Work per call is bounded: at most `max` events, `READ_BUDGET` bytes
    /// read, and nothing more once the output queue is backlogged.
    pub fn on_readable(&mut self, max: usize, events: &mut Vec<Event>) -> ReadStatus {
        let mut budget = max;
        let mut read = 0usize;
        loop {
            if let Err(e) = self.process(events, &mut budget) {
                self.fail(e);
                return ReadStatus::Done;
            }
            if matches!(self.phase, Phase::Closed) {
                return ReadStatus::Done;
            }
            if budget == 0
                || self.drained
                || self.backlogged()
                || self.mem_wait.is_some()
                || read >= READ_BUDGET
            {
                return ReadStatus::Open;
            }
            // Large write payloads are read straight into their buffer.
            let res = match &mut self.phase {
                Phase::Payload { buf, filled, .. } if self.rstart == self.rend => {
                    let want = buf.len() - *filled;
                    let r = self.stream.read(&mut buf[*filled..]);
                    if let Ok(n) = r {
                        *filled += n;
                        self.drained = n < want;
                    }
                    r
                }
                _ => {
                    if self.rstart == self.rend {
                        self.rstart = 0;
                        self.rend = 0;
                    } else if self.rend == self.rbuf.len() {
                        self.rbuf.copy_within(self.rstart..self.rend, 0);
                        self.rend -= self.rstart;
                        self.rstart = 0;
                    }
                    let want = self.rbuf.len() - self.rend;
                    let r = self.stream.read(&mut self.rbuf[self.rend..]);
                    if let Ok(n) = r {
                        self.rend += n;
                        self.drained = n < want;
                    }
                    r
                }
            };
            match res {
                Ok(0) => {
                    self.phase = Phase::Closed;
                    return ReadStatus::Done;
                }
                Ok(n) => {
                    read += n;
                    self.last_progress = Instant::now();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.drained = true;
                    return ReadStatus::Open;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.fail(NbdError::Io(e));
                    return ReadStatus::Done;
                }
            }
        }
    }

    fn fail(&mut self, e: NbdError) {
        self.phase = Phase::Closed;
        if self.close_reason.is_none() {
            self.close_reason = Some(e);
        }
    }

    /// Decode buffered input while `budget` (events and error replies) lasts and the output
    /// queue is not backlogged.
    fn process(&mut self, events: &mut Vec<Event>, budget: &mut usize) -> Result<(), NbdError> {
        loop {
            if *budget == 0 || self.backlogged() {
                return Ok(());
            }
            let avail = self.rend - self.rstart;
            match &mut self.phase {
                Phase::Closed => return Ok(()),
                Phase::Handshake(hs) => {
                    let mut out = Vec::new();
                    let (n, outcome) = hs.input(&self.rbuf[self.rstart..self.rend], &mut out);
                    self.rstart += n;
                    self.queue(out);
                    match outcome {
                        Outcome::NeedMore => return Ok(()),
                        Outcome::Transmission(neg) => {
                            self.neg = neg;
                            self.phase = Phase::Header;
                        }
                        Outcome::Close(e) => return Err(e),
                    }
                }
                Phase::Header => {
                    if avail < proto::REQUEST_LEN {
                        return Ok(());
                    }
                    let mut h = [0u8; proto::REQUEST_LEN];
                    h.copy_from_slice(&self.rbuf[self.rstart..self.rstart + proto::REQUEST_LEN]);
                    let hdr = match RequestHeader::parse(&h) {
                        Ok(hdr) => hdr,
                        Err(e) => {
                            self.rstart += proto::REQUEST_LEN;
                            return Err(e);
                        }
                    };
                    let v = proto::validate(&hdr, &self.export, &self.neg);
                    // The data buffer this request takes (its READ buffer is the caller's,
                    // taken when the request starts).
                    let need = match &v {
                        Ok(Command::Read { len, .. } | Command::Write { len, .. }) => *len as usize,
                        _ => 0,
                    };
                    if need > self.mem_allowance {
                        self.mem_wait = Some(need);
                        return Ok(());
                    }
                    self.mem_wait = None;
                    self.mem_allowance -= need;
                    self.rstart += proto::REQUEST_LEN;
                    if hdr.payload_len() > 0 {
                        match v {
                            Ok(cmd) => {
                                let buf = self.take_buf(hdr.length as usize);
                                self.phase = Phase::Payload {
                                    cookie: hdr.cookie,
                                    cmd,
                                    buf,
                                    filled: 0,
                                }
                            }
                            Err(err) => {
                                self.phase = Phase::Skip {
                                    cookie: hdr.cookie,
                                    err,
                                    remaining: u64::from(hdr.length),
                                }
                            }
                        }
                        continue;
                    }
                    *budget -= 1;
                    match v {
                        Ok(Command::Disconnect) => {
                            events.push(Event::Disconnect);
                            self.phase = Phase::Closed;
                            return Ok(());
                        }
                        Ok(cmd) => events.push(Event::Request {
                            cookie: hdr.cookie,
                            cmd,
                            data: None,
                        }),
                        Err(err) => {
                            let read_like =
                                matches!(hdr.typ, proto::CMD_READ | proto::CMD_BLOCK_STATUS);
                            self.reply_error(hdr.cookie, read_like, err);
                        }
                    }
                }
                Phase::Payload { buf, filled, .. } => {
                    let n = avail.min(buf.len() - *filled);
                    buf[*filled..*filled + n]
                        .copy_from_slice(&self.rbuf[self.rstart..self.rstart + n]);
                    *filled += n;
                    self.rstart += n;
                    if *filled < buf.len() {
                        return Ok(());
                    }
                    if let Phase::Payload {
                        cookie, cmd, buf, ..
                    } = std::mem::replace(&mut self.phase, Phase::Header)
                    {
                        *budget -= 1;
                        events.push(Event::Request {
                            cookie,
                            cmd,
                            data: Some(buf),
                        });
                    }
                }
                Phase::Skip {
                    cookie,
                    err,
                    remaining,
                } => {
                    let n = (avail as u64).min(*remaining);
                    self.rstart += n as usize;
                    *remaining -= n;
                    if *remaining > 0 {
                        return Ok(());
                    }
                    let (cookie, err) = (*cookie, *err);
                    self.phase = Phase::Header;
                    *budget -= 1;
                    self.reply_error(cookie, false, err);
                }
            }
        }
    }

    /// Reply with an NBD error; `read_like` commands use an error chunk when structured
    /// replies were negotiated.
    pub fn reply_error(&mut self, cookie: u64, read_like: bool, err: u32) {
        if read_like && self.neg.structured {
            self.queue(proto::error_chunk(cookie, err, ""));
        } else {
            self.queue(proto::simple_reply(cookie, err).to_vec());
        }
    }

    /// Reply success without data.
    pub fn reply_ok(&mut self, cookie: u64) {
        self.queue(proto::simple_reply(cookie, 0).to_vec());
    }

    /// Reply to a READ at `offset` with `data[start..start + len]` (an EIO error reply if
    /// `data` is too short, rather than a panic when the queue is written).
    pub fn reply_read(
        &mut self,
        cookie: u64,
        offset: u64,
        data: AlignedBuf,
        start: usize,
        len: u32,
    ) {
        let Some(end) = usize::try_from(len)
            .ok()
            .and_then(|l| start.checked_add(l))
            .filter(|&e| e <= data.len())
        else {
            self.reply_error(cookie, true, proto::NBD_EIO);
            return;
        };
        if self.neg.structured {
            if len == 0 {
                self.queue(proto::none_chunk(cookie));
                return;
            }
            self.queue(proto::offset_data_header(cookie, offset, len));
        } else {
            self.queue(proto::simple_reply(cookie, 0).to_vec());
        }
        self.queue_range(OutBuf::Data(data), start, end);
    }

    /// Reply to BLOCK_STATUS with `(length, flags)` extents.
    pub fn reply_block_status(&mut self, cookie: u64, extents: &[(u32, u32)]) {
        self.queue(proto::block_status_chunk(
            cookie,
            proto::META_BASE_ALLOCATION_ID,
            extents,
        ));
    }

    /// Write queued output. `Ok(true)` when everything is written.
    pub fn flush(&mut self) -> io::Result<bool> {
        while self.out_bytes > 0 {
            let iov: Vec<IoSlice<'_>> = self
                .out
                .iter()
                .take(MAX_IOV)
                .map(|c| IoSlice::new(&c.buf.bytes()[c.start..c.end]))
                .collect();
            let n = match nix::sys::uio::writev(&self.stream, &iov) {
                Ok(n) => n,
                Err(nix::errno::Errno::EAGAIN) => return Ok(false),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(io::Error::from(e)),
            };
            self.out_bytes -= n;
            if n > 0 {
                self.last_progress = Instant::now();
            }
            let mut left = n;
            while left > 0 {
                let Some(front) = self.out.front_mut() else {
                    break;
                };
                let len = front.end - front.start;
                if left >= len {
                    left -= len;
                    if let Some(OutChunk {
                        buf: OutBuf::Data(b),
                        ..
                    }) = self.out.pop_front()
                    {
                        self.give_buf(b);
                    }
                } else {
                    front.start += left;
                    left = 0;
                }
            }
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::proto::*;
    use std::io::Write;

    fn pair(read_only: bool) -> (Connection, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        let ex = ExportInfo {
            size: 1 << 20,
            read_only,
            name: String::new(),
        };
        (Connection::new(a, ex).unwrap(), b)
    }

    fn readable(c: &mut Connection, max: usize, ev: &mut Vec<Event>) -> ReadStatus {
        c.mark_readable();
        c.on_readable(max, ev)
    }

    fn handshake(c: &mut Connection, peer: &mut UnixStream) {
        let mut input = (CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES)
            .to_be_bytes()
            .to_vec();
        input.extend_from_slice(&IHAVEOPT.to_be_bytes());
        input.extend_from_slice(&OPT_EXPORT_NAME.to_be_bytes());
        input.extend_from_slice(&0u32.to_be_bytes());
        peer.write_all(&input).unwrap();
        let mut ev = Vec::new();
        assert_eq!(readable(c, 16, &mut ev), ReadStatus::Open);
        assert!(ev.is_empty());
        assert!(!c.in_handshake());
        assert!(c.flush().unwrap());
        let mut g = [0u8; 18 + 10];
        peer.read_exact(&mut g).unwrap();
    }

    #[test]
    fn pipelined_requests_and_write_payload_decode() {
        let (mut c, mut peer) = pair(false);
        handshake(&mut c, &mut peer);
        let mut input = Vec::new();
        let w = RequestHeader {
            flags: 0,
            typ: CMD_WRITE,
            cookie: 1,
            offset: 512,
            length: 1024,
        };
        input.extend_from_slice(&w.encode());
        input.extend_from_slice(&[0x5a; 1024]);
        let r = RequestHeader {
            typ: CMD_READ,
            cookie: 2,
            ..w
        };
        input.extend_from_slice(&r.encode());
        peer.write_all(&input).unwrap();
        let mut ev = Vec::new();
        assert_eq!(readable(&mut c, 16, &mut ev), ReadStatus::Open);
        assert_eq!(ev.len(), 2);
        match &ev[0] {
            Event::Request {
                cookie: 1,
                cmd:
                    Command::Write {
                        offset: 512,
                        len: 1024,
                        fua: false,
                    },
                data: Some(d),
            } => {
                assert!(d.iter().all(|b| *b == 0x5a) && d.len() == 1024);
                assert_eq!(
                    d.as_ptr() as usize % crate::PAGE_SIZE,
                    0,
                    "payload page-aligned"
                );
            }
            e => panic!("{e:?}"),
        }
        assert!(matches!(
            ev[1],
            Event::Request {
                cookie: 2,
                cmd: Command::Read { .. },
                data: None
            }
        ));
    }

    #[test]
    fn requests_beyond_the_limit_stay_buffered_and_are_reported() {
        let (mut c, mut peer) = pair(false);
        handshake(&mut c, &mut peer);
        let r = RequestHeader {
            flags: 0,
            typ: CMD_FLUSH,
            cookie: 1,
            offset: 0,
            length: 0,
        };
        let mut input = r.encode().to_vec();
        input.extend_from_slice(&RequestHeader { cookie: 2, ..r }.encode());
        peer.write_all(&input).unwrap();
        let mut ev = Vec::new();
        assert_eq!(readable(&mut c, 1, &mut ev), ReadStatus::Open);
        assert_eq!(ev.len(), 1);
        assert!(c.has_buffered_input());
        // Nothing more arrives on the socket, yet the buffered request is decoded.
        assert_eq!(c.on_readable(1, &mut ev), ReadStatus::Open);
        assert!(matches!(ev[1], Event::Request { cookie: 2, .. }));
        assert!(!c.has_buffered_input());
    }

    #[test]
    fn invalid_write_payload_is_skipped_and_refused() {
        let (mut c, mut peer) = pair(true);
        handshake(&mut c, &mut peer);
        let w = RequestHeader {
            flags: 0,
            typ: CMD_WRITE,
            cookie: 5,
            offset: 0,
            length: 4096,
        };
        let mut input = w.encode().to_vec();
        input.extend_from_slice(&[1u8; 4096]);
        input.extend_from_slice(
            &RequestHeader {
                typ: CMD_FLUSH,
                cookie: 6,
                length: 0,
                ..w
            }
            .encode(),
        );
        peer.write_all(&input).unwrap();
        let mut ev = Vec::new();
        readable(&mut c, 16, &mut ev);
        assert_eq!(ev.len(), 1);
        assert!(matches!(
            ev[0],
            Event::Request {
                cookie: 6,
                cmd: Command::Flush,
                ..
            }
        ));
        c.flush().unwrap();
        let mut rep = [0u8; 16];
        peer.read_exact(&mut rep).unwrap();
        assert_eq!(rep, simple_reply(5, NBD_EPERM));
    }

    #[test]
    fn bad_magic_ends_connection_and_eof_is_seen() {
        let (mut c, mut peer) = pair(false);
        handshake(&mut c, &mut peer);
        peer.write_all(&[0u8; 28]).unwrap();
        let mut ev = Vec::new();
        assert_eq!(readable(&mut c, 16, &mut ev), ReadStatus::Done);
        assert!(matches!(c.close_reason, Some(NbdError::RequestMagic(0))));
        let (mut c, mut peer) = pair(false);
        handshake(&mut c, &mut peer);
        drop(peer);
        assert_eq!(readable(&mut c, 16, &mut ev), ReadStatus::Done);
    }

    #[test]
    fn read_reply_sends_only_the_requested_range() {
        let (mut c, mut peer) = pair(false);
        handshake(&mut c, &mut peer);
        let data: Vec<u8> = (0..1024u32).map(|i| i as u8).collect();
        c.reply_read(9, 10, data.into(), 10, 100);
        assert!(c.flush().unwrap());
        let mut rep = [0u8; 116];
        peer.read_exact(&mut rep).unwrap();
        assert_eq!(rep[..16], simple_reply(9, 0));
        assert_eq!(rep[16], 10);
        assert_eq!(rep[115], 109);
    }

    #[test]
    fn refused_requests_count_against_the_event_limit() {
        // A client flooding refused requests (never reading the replies) used to be served in
        // one call until its socket ran dry: unbounded loop time and output queue.
        let (mut c, mut peer) = pair(false);
        handshake(&mut c, &mut peer);
        let bad = RequestHeader {
            flags: 0x8000,
            typ: CMD_READ,
            cookie: 1,
            offset: 0,
            length: 512,
        };
        let mut input = Vec::new();
        for _ in 0..100 {
            input.extend_from_slice(&bad.encode());
        }
        peer.write_all(&input).unwrap();
        let mut ev = Vec::new();
        assert_eq!(readable(&mut c, 1, &mut ev), ReadStatus::Open);
        assert!(ev.is_empty());
        assert_eq!(c.queued_bytes(), 16);
        assert!(c.has_buffered_input());
        assert_eq!(c.on_readable(10, &mut ev), ReadStatus::Open);
        assert_eq!(c.queued_bytes(), 16 * 11);
        // The rest is served by later calls, and every request gets its EINVAL reply.
        while c.has_buffered_input() {
            assert_eq!(c.on_readable(64, &mut ev), ReadStatus::Open);
        }
        assert!(ev.is_empty());
        assert_eq!(c.queued_bytes(), 16 * 100);
        assert!(c.flush().unwrap());
        let mut rep = [0u8; 16];
        for _ in 0..100 {
            peer.read_exact(&mut rep).unwrap();
            assert_eq!(rep, simple_reply(1, NBD_EINVAL));
        }
    }

    #[test]
    fn a_refused_write_payload_is_skipped_within_the_read_budget() {
        let (mut c, mut peer) = pair(true);
        handshake(&mut c, &mut peer);
        let len: u32 = 3 * READ_BUDGET as u32;
        let w = RequestHeader {
            flags: 0,
            typ: CMD_WRITE,
            cookie: 3,
            offset: 0,
            length: len,
        };
        let writer = std::thread::spawn(move || {
            peer.write_all(&w.encode()).unwrap();
            peer.write_all(&vec![0u8; len as usize]).unwrap();
            peer
        });
        let mut ev = Vec::new();
        let mut calls = 0;
        while c.queued_bytes() == 0 {
            c.mark_readable();
            assert_eq!(c.on_readable(16, &mut ev), ReadStatus::Open);
            if let Phase::Skip { remaining, .. } = c.phase {
                assert!(remaining + (READ_BUDGET + RBUF) as u64 * (calls + 1) >= u64::from(len));
            }
            calls += 1;
            if c.queued_bytes() == 0 {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        assert!(calls >= 3, "{calls}");
        let mut peer = writer.join().unwrap();
        assert!(ev.is_empty());
        assert!(c.flush().unwrap());
        let mut rep = [0u8; 16];
        peer.read_exact(&mut rep).unwrap();
        assert_eq!(rep, simple_reply(3, NBD_EPERM));
    }

    #[test]
    fn a_request_needing_more_than_the_allowance_waits_undecoded() {
        let (mut c, mut peer) = pair(false);
        handshake(&mut c, &mut peer);
        let r = RequestHeader {
            flags: 0,
            typ: CMD_READ,
            cookie: 1,
            offset: 0,
            length: 8192,
        };
        let mut input = r.encode().to_vec();
        input.extend_from_slice(&RequestHeader { cookie: 2, ..r }.encode());
        peer.write_all(&input).unwrap();
        c.set_mem_allowance(12288);
        let mut ev = Vec::new();
        assert_eq!(readable(&mut c, 16, &mut ev), ReadStatus::Open);
        assert_eq!(
            ev.len(),
            1,
            "the second 8 KiB read does not fit in the 4 KiB left"
        );
        assert_eq!(c.waiting_for_memory(), Some(8192));
        assert!(c.has_buffered_input());
        c.set_mem_allowance(8192);
        assert_eq!(c.on_readable(16, &mut ev), ReadStatus::Open);
        assert!(matches!(ev[1], Event::Request { cookie: 2, .. }));
        assert_eq!(c.waiting_for_memory(), None);
        // Requests without data buffers are not held back.
        peer.write_all(
            &RequestHeader {
                typ: CMD_FLUSH,
                cookie: 3,
                length: 0,
                ..r
            }
            .encode(),
        )
        .unwrap();
        c.set_mem_allowance(0);
        assert_eq!(readable(&mut c, 16, &mut ev), ReadStatus::Open);
        assert!(matches!(ev[2], Event::Request { cookie: 3, .. }));
        // A WRITE's payload buffer counts while it is being received.
        let w = RequestHeader {
            typ: CMD_WRITE,
            cookie: 4,
            ..r
        };
        peer.write_all(&w.encode()).unwrap();
        peer.write_all(&[7u8; 100]).unwrap();
        c.set_mem_allowance(8192);
        assert_eq!(readable(&mut c, 16, &mut ev), ReadStatus::Open);
        assert_eq!(c.held_bytes(), 8192);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]
        /// Any bytes after a valid handshake: no panic, bounded work per call, and the
        /// connection ends in events/error replies or a clean close.
        #[test]
        fn random_bytes_after_the_handshake_never_panic(
            data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..4096),
            valid in proptest::collection::vec((0u16..10, 0u16..16, 0u64..(2 << 20), 0u32..8192), 0..8),
            ro in proptest::prelude::any::<bool>(),
        ) {
            let (mut c, mut peer) = pair(ro);
            handshake(&mut c, &mut peer);
            // Well-formed headers with random fields, then garbage.
            let mut input = Vec::new();
            for (i, (typ, flags, offset, length)) in valid.iter().enumerate() {
                let h = RequestHeader { flags: *flags, typ: *typ, cookie: i as u64, offset: *offset, length: *length };
                input.extend_from_slice(&h.encode());
            }
            input.extend_from_slice(&data);
            peer.write_all(&input).unwrap();
            drop(peer);
            let mut ev = Vec::new();
            let mut status = ReadStatus::Open;
            for _ in 0..10_000 {
                let before = ev.len();
                c.mark_readable();
                status = c.on_readable(4, &mut ev);
                proptest::prop_assert!(ev.len() - before <= 4);
                for e in &ev[before..] {
                    if let Event::Request { cmd, data, .. } = e {
                        match cmd {
                            Command::Write { offset, len, .. } => {
                                proptest::prop_assert!(!ro);
                                proptest::prop_assert!(offset + u64::from(*len) <= 1 << 20);
                                proptest::prop_assert_eq!(data.as_ref().map(|d| d.len()), Some(*len as usize));
                            }
                            Command::Read { offset, len } | Command::Trim { offset, len, .. } | Command::BlockStatus { offset, len, .. } => {
                                proptest::prop_assert!(offset + u64::from(*len) <= 1 << 20);
                            }
                            _ => {}
                        }
                    }
                }
                if status == ReadStatus::Done {
                    break;
                }
            }
            // The peer closed: the connection must have noticed.
            proptest::prop_assert_eq!(status, ReadStatus::Done);
            // Replies can be written until the socket is gone; no panic either way.
            let _ = c.flush();
        }
    }

    #[test]
    fn a_read_reply_with_too_little_data_is_an_error_not_a_panic() {
        let (mut c, mut peer) = pair(false);
        handshake(&mut c, &mut peer);
        c.reply_read(4, 0, AlignedBuf::zeroed(100), 10, 100);
        assert!(c.flush().unwrap());
        let mut rep = [0u8; 16];
        peer.read_exact(&mut rep).unwrap();
        assert_eq!(rep, simple_reply(4, NBD_EIO));
    }

    #[test]
    fn buffers_are_recycled_by_length_within_limits() {
        let (mut c, _peer) = pair(false);
        c.give_buf(vec![7u8; 8192].into());
        c.give_buf(vec![1u8; 100].into()); // too small to keep
        assert_eq!(c.take_buf(8192), vec![7u8; 8192]);
        assert_eq!(c.take_buf(8192), vec![0u8; 8192]);
        assert_eq!(c.take_buf(100), vec![0u8; 100]);
        for _ in 0..100 {
            c.give_buf(vec![3u8; 1 << 20].into());
        }
        assert_eq!(c.pool_bytes, POOL_MAX_BYTES);
        assert!(c.pool_bytes <= POOL_MAX_BYTES);
    }
}
