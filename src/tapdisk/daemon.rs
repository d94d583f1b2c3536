//! The tapdisk event loop: control requests, VBD lifecycle, NBD exports and I/O completions.
//!
//! ```text
//!            control thread ──CtlHandle::call──► [channel] + eventfd ─┐
//!                                                 control.rs handlers ▼
//!  NBD clients ◄─► Connection (nbd::server) ◄──► Tapdisk::run (epoll, one thread) ◄─► xenio rings
//!                                                    │  ▲
//!                     Vbd::begin_io: Job{Tag::Io,Op} ▼  │ Completion + eventfd: Vbd::end_io, door
//!                                               IoEngine workers ──► Image (Arc<dyn Image>)
//! ```
//!
//! Every blocking image call (open, read, write, flush, discard, block status, close) runs on
//! the I/O engine's workers; the loop only moves bytes between sockets and buffers, and runs
//! the reads and writes of memory-backed images itself (see `io.rs`): their completions are
//! handled in the same loop pass, and an NBD read's reply is sent right away, while its data
//! is still in the CPU cache. A connection that
//! disappears while its requests are in flight is dropped at once; their completions still
//! update the VBD's counters and are then discarded (connection ids are never reused).

use std::collections::{BTreeMap, HashMap};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use nix::sys::signal::Signal;
use nix::sys::signalfd::SignalFd;

use crate::image::chain::OpenOptions as ChainOptions;
use crate::image::crypto::KeySource;
use crate::image::open::open as open_image;
use crate::image::{Extent, Image, ImageError, SECTOR_SIZE};
use crate::nbd::proto::{self, Command, ExportInfo};
use crate::nbd::server::{Connection, Event, ReadStatus};

use super::ctl::{CtlHandle, CtlMsg};
use super::io::{EngineChoice, IoEngine, Op, Output};
use super::reactor::{Interest, Reactor, Ready, Ticker, Token};
use super::tag::{Door, NbdReq, NbdTag, Tag};
use super::vbd::{parse_params, DiskInfo, DiskType, OpenImage, Vbd, VDISK_READONLY};
use super::xenio::{DevXenOpener, Rings, XenOpener};
use super::TapdiskError;

mod control;
mod nbd_export;

pub use control::VbdError;

use crate::control::msg::{ListEntry, OpenFlags, Reply, Request};
use crate::control::{minors, nbd_socket_path};

/// Requests in flight per NBD connection before the loop stops reading from it.
const MAX_CONN_INFLIGHT: u32 = 128;
/// Buffer bytes in flight per NBD connection before the loop stops reading from it (so 128
/// reads of 32 MiB cannot make a client pin 4 GiB of dom0 memory).
const MAX_CONN_INFLIGHT_BYTES: u64 = 64 << 20;
/// Buffer memory all NBD connections together may hold (requests in flight, replies queued
/// for clients that do not read them, WRITE payloads being received, recycled buffers)
/// before a connection may start only requests that fit in what is left. Without it, every
/// client that never reads its replies pins `MAX_CONN_INFLIGHT_BYTES` plus its queue, and
/// every client that sends a 32 MiB WRITE header and stalls pins 32 MiB: RSS grew with
/// the number of hostile connections (scripts/hostile-peers.sh).
pub const NBD_MEM_LIMIT: u64 = 256 << 20;
/// A connection holding at most this much may always start a request of up to the rest
/// (so small-I/O clients keep being served while others exhaust `NBD_MEM_LIMIT`).
const NBD_MEM_FLOOR: u64 = 1 << 20;
/// What light connections may take past [`NBD_MEM_LIMIT`] together through the floor.
const NBD_MEM_RESERVE: u64 = 32 << 20;
/// Rounds of inline completions handled per loop pass before polling again.
const INLINE_ROUNDS: usize = 4;
/// Requests taken from one connection per readiness event before serving others.
const READ_BATCH: usize = 64;
/// A client still negotiating after this long is dropped (default of
/// [`Config::handshake_timeout`]; the C tapdisk tolerates 40 s during SXM).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);
/// A client that holds replies it does not read, or stops sending a WRITE payload part-way,
/// for this long with no byte moved is dropped (default of [`Config::nbd_stall_timeout`]):
/// what it holds counts against [`NBD_MEM_LIMIT`], which other clients' large requests
/// wait for. A client that reads or sends anything at all keeps its connection.
pub const NBD_STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Requests pending this long without any completion on their VBD get logged (once).
const WATCHDOG: Duration = Duration::from_secs(10);
/// OPEN/RESUME flags we honour or that need nothing from us. The layers blktap stacks on
/// request (log, caches, secondary/mirror, parent reuse, VHD index) are refused with
/// EOPNOTSUPP rather than silently left out.
const SUPPORTED_OPEN_FLAGS: OpenFlags = OpenFlags(
    OpenFlags::SHARED.0
        | OpenFlags::RDONLY.0
        | OpenFlags::NO_O_DIRECT.0
        | OpenFlags::OPEN_ENCRYPTED.0,
);
/// RESUME retries the reopen this many times, a second apart (as tapdisk does).
const RESUME_TRIES: u32 = 10;

/// What opens images (the image engine's factory; a trait so tests can simulate).
pub trait ImageOpener: Send + Sync + std::fmt::Debug {
    fn open(&self, spec: &OpenSpec) -> Result<Arc<dyn Image>, ImageError>;
}

/// An image to open.
#[derive(Clone, Debug)]
pub struct OpenSpec {
    pub kind: DiskType,
    pub path: PathBuf,
    pub read_only: bool,
    pub keys: KeySource,
    /// Open the image files with `O_DIRECT` where the filesystem allows it.
    pub direct: bool,
}

impl OpenSpec {
    /// The image layer's options for this open (read-only, keys, O_DIRECT).
    pub fn chain_options(&self) -> ChainOptions {
        ChainOptions {
            read_only: self.read_only,
            keys: self.keys.clone(),
            direct: self.direct,
            ..ChainOptions::default()
        }
    }
}

/// The opener used by the daemon: the image engine's factory (`aio:` raw files, `vhd:`
/// chains with their keys).
#[derive(Debug, Default)]
pub struct DefaultOpener;

impl ImageOpener for DefaultOpener {
    fn open(&self, spec: &OpenSpec) -> Result<Arc<dyn Image>, ImageError> {
        let format = spec.kind.format();
        Ok(Arc::from(open_image(
            &spec.path,
            format,
            &spec.chain_options(),
        )?))
    }
}

/// Daemon configuration.
#[derive(Debug)]
pub struct Config {
    /// Control directory (`ctl<pid>`, `nbd<pid>.<minor>`, `tapdisk/tapdisk-<minor>` markers).
    pub ctl_dir: PathBuf,
    /// The pid used in socket names.
    pub pid: i32,
    pub io_threads: usize,
    /// Run small I/O on memory-backed images on the loop itself (see [`IoEngine::submit`]).
    pub inline_io: bool,
    /// Open images with `O_DIRECT` (`TAPDISK3_DIRECT_IO`; an OPEN's `NO_O_DIRECT` flag,
    /// tap-ctl's `-D`, turns it off for that image).
    pub direct_io: bool,
    /// Which engine submits reads and writes that need no metadata work from the loop:
    /// io_uring or Linux AIO, falling back to the worker threads (`TAPDISK3_IO`,
    /// `TAPDISK3_AIO`).
    pub io_engine: EngineChoice,
    pub opener: Arc<dyn ImageOpener>,
    /// Keys for OPENs without a key trailer (`TAPDISK3_CRYPTO_KEYDIR`).
    pub keys: KeySource,
    /// Opens the Xen devices at the first XENBLKIF_CONNECT (real: `/dev/xen`; tests: SimXen).
    pub xen: Arc<dyn XenOpener>,
    /// Require (and flock) the minor's marker file at ATTACH.
    pub lock_markers: bool,
    /// Drop NBD clients that have not finished the handshake after this long.
    pub handshake_timeout: Duration,
    /// Poll a blkif ring this long after its last request before re-arming it
    /// (`TAPDISK3_POLL_US`; zero, the default, turns polling off). See [`Rings::set_poll`].
    pub ring_poll: Duration,
    /// Buffer memory all NBD clients together may hold (default `NBD_MEM_LIMIT`).
    pub nbd_mem_limit: u64,
    /// Drop NBD clients stalled this long (default [`NBD_STALL_TIMEOUT`]).
    pub nbd_stall_timeout: Duration,
}

impl Config {
    pub fn new(ctl_dir: impl Into<PathBuf>) -> Self {
        Config {
            ctl_dir: ctl_dir.into(),
            pid: i32::try_from(std::process::id()).unwrap_or(i32::MAX),
            io_threads: super::io::DEFAULT_THREADS,
            inline_io: true,
            direct_io: true,
            io_engine: EngineChoice::Auto,
            opener: Arc::new(DefaultOpener),
            keys: KeySource::None,
            xen: Arc::new(DevXenOpener),
            lock_markers: true,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            ring_poll: Duration::ZERO,
            nbd_mem_limit: NBD_MEM_LIMIT,
            nbd_stall_timeout: NBD_STALL_TIMEOUT,
        }
    }

    /// `<ctl_dir>/nbd<pid>.<minor>`.
    pub fn nbd_path(&self, minor: u16) -> PathBuf {
        nbd_socket_path(&self.ctl_dir, self.pid, minor)
    }
}

#[derive(Debug)]
struct Listener {
    sock: UnixListener,
    path: PathBuf,
    /// In the epoll set.
    registered: bool,
    /// The VBD takes new clients (not pausing or paused).
    wanted: bool,
    /// accept failed (out of file descriptors): out of the epoll set, or the level-triggered
    /// listener would wake the loop for ever, until the next tick or a client leaves.
    starved: bool,
}

#[derive(Debug)]
struct NbdConn {
    conn: Connection,
    minor: u16,
    inflight: u32,
    /// Sum of [`NbdReq::mem_bytes`] in flight.
    inflight_bytes: u64,
    interest: Interest,
    /// No more requests: DISC, EOF, protocol error or VBD closing.
    ending: bool,
    since: Instant,
    /// What [`NbdConn::held`] was when last added to [`Tapdisk::nbd_mem`].
    counted: u64,
}

impl NbdConn {
    /// Buffer memory held for this client: requests in flight and the connection's own.
    fn held(&self) -> u64 {
        self.inflight_bytes + self.conn.held_bytes() as u64
    }

    /// Whether [`Tapdisk::read_conn`] reads from this client now: its VBD takes I/O
    /// (`accepts`), it is within its limits, and a request waiting for memory fits in
    /// `allowance`.
    fn readable_by_us(&self, accepts: bool, allowance: u64) -> bool {
        accepts
            && !self.ending
            && self.inflight < MAX_CONN_INFLIGHT
            && self.inflight_bytes < MAX_CONN_INFLIGHT_BYTES
            && !self.conn.backlogged()
            && self
                .conn
                .waiting_for_memory()
                .is_none_or(|need| need as u64 <= allowance)
    }
}

/// The data buffer bytes a connection holding `held` may take for its next requests when
/// all connections hold `total` of `limit` and `reserved` of what is left is kept for a
/// waiting connection: what is left of the limit, or, for a light connection, up to
/// [`NBD_MEM_FLOOR`] out of a shared [`NBD_MEM_RESERVE`] above the limit (so the floor
/// cannot multiply with the number of connections, and a waiter does not take it away).
fn mem_allowance(limit: u64, total: u64, reserved: u64, held: u64) -> u64 {
    let reserve_left = limit.saturating_add(NBD_MEM_RESERVE).saturating_sub(total);
    limit
        .saturating_sub(total.saturating_add(reserved))
        .max(NBD_MEM_FLOOR.saturating_sub(held).min(reserve_left))
}

/// Memory kept for the first connection waiting for it (by connection id, so the oldest),
/// from everyone but that connection: a large request is not starved by others' smaller
/// ones taking each freed byte first.
fn reserved_for_waiter(waiters: &BTreeMap<u64, u64>, id: u64) -> u64 {
    match waiters.first_key_value() {
        Some((w, need)) if *w != id => *need,
        _ => 0,
    }
}

/// A tapdisk: any number of VBDs served by one event loop.
pub struct Tapdisk {
    cfg: Config,
    reactor: Reactor,
    io: IoEngine<Tag>,
    ctl: CtlHandle,
    ctl_rx: Receiver<CtlMsg>,
    ticker: Ticker,
    vbds: BTreeMap<u16, Vbd>,
    listeners: HashMap<u16, Listener>,
    conns: HashMap<u64, NbdConn>,
    next_conn: u64,
    /// Sum of every connection's [`NbdConn::counted`], plus the buffers of requests still
    /// in flight for connections already gone.
    nbd_mem: u64,
    /// Connections whose next request waits for memory (`NBD_MEM_LIMIT`), with its need.
    mem_waiters: BTreeMap<u64, u64>,
    /// A connection started waiting for memory: drop the recycled buffers of all.
    trim_pools: bool,
    /// Some listener is starved (see [`Listener::starved`]).
    accept_starved: bool,
    rings: Rings,
    /// Connections and VBDs whose I/O completed while a connection was being read (inline
    /// I/O): settled and progressed once the loop pass is through with the reading.
    deferred: (Vec<u64>, Vec<u16>),
    exit: bool,
    signals: Option<SignalFd>,
    /// Stop when the last VBD is detached (the daemon); tests may keep an empty loop.
    exit_when_empty: bool,
}

impl std::fmt::Debug for Tapdisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tapdisk")
            .field("vbds", &self.vbds.keys().collect::<Vec<_>>())
            .field("conns", &self.conns.len())
            .finish()
    }
}

fn sys(op: &'static str) -> impl Fn(nix::Error) -> TapdiskError {
    move |e| TapdiskError::Sys {
        op,
        source: std::io::Error::from(e),
    }
}

impl Tapdisk {
    pub fn new(cfg: Config) -> Result<Self, TapdiskError> {
        let reactor = Reactor::new().map_err(sys("epoll_create"))?;
        let mut io = IoEngine::with_engine(cfg.io_threads, cfg.io_engine).map_err(|source| {
            TapdiskError::Sys {
                op: "start i/o threads",
                source,
            }
        })?;
        io.set_inline(cfg.inline_io);
        let (ctl, ctl_rx) = CtlHandle::new().map_err(sys("eventfd"))?;
        let ticker = Ticker::new(Duration::from_secs(1)).map_err(sys("timerfd"))?;
        reactor
            .add(ctl.waker(), Token::Control, Interest::READ)
            .map_err(sys("epoll_ctl"))?;
        reactor
            .add(io.waker(), Token::IoDone, Interest::READ)
            .map_err(sys("epoll_ctl"))?;
        reactor
            .add(&ticker, Token::Timer, Interest::READ)
            .map_err(sys("epoll_ctl"))?;
        Ok(Tapdisk {
            rings: {
                let mut r = Rings::new(Arc::clone(&cfg.xen));
                r.set_poll(cfg.ring_poll);
                r
            },
            cfg,
            reactor,
            io,
            ctl,
            ctl_rx,
            ticker,
            vbds: BTreeMap::new(),
            listeners: HashMap::new(),
            conns: HashMap::new(),
            nbd_mem: 0,
            mem_waiters: BTreeMap::new(),
            trim_pools: false,
            accept_starved: false,
            deferred: (Vec::new(), Vec::new()),
            next_conn: 1,
            exit: false,
            signals: None,
            exit_when_empty: true,
        })
    }

    /// A handle for the control server thread.
    pub fn handle(&self) -> CtlHandle {
        self.ctl.clone()
    }

    /// Keep running when the last VBD is detached (default: exit, like tapdisk).
    pub fn keep_running_when_empty(&mut self) {
        self.exit_when_empty = false;
    }

    /// Take the daemon's signalfd (its signals already blocked in every thread).
    /// SIGTERM/SIGINT: close everything and return from `run`. SIGHUP: nothing to reopen
    /// (we log to syslog). SIGUSR1: log the state of every VBD.
    pub fn set_signal_fd(&mut self, fd: SignalFd) -> Result<(), TapdiskError> {
        self.reactor
            .add(&fd, Token::Signal, Interest::READ)
            .map_err(sys("epoll_ctl"))?;
        self.signals = Some(fd);
        Ok(())
    }

    fn signal_ready(&mut self) {
        let Some(fd) = &self.signals else {
            return;
        };
        while let Ok(Some(si)) = fd.read_signal() {
            let signo = i32::try_from(si.ssi_signo).unwrap_or(0);
            match Signal::try_from(signo) {
                Ok(Signal::SIGTERM | Signal::SIGINT) => {
                    info!("signal {signo}: shutting down");
                    self.exit = true;
                }
                Ok(Signal::SIGUSR1) => {
                    for v in self.vbds.values() {
                        info!(
                            "minor {} state {:#x} {:?} params {:?} inflight {} stats {:?}",
                            v.minor(),
                            v.wire_state().0,
                            v.lifecycle(),
                            v.params(),
                            v.inflight(),
                            v.stats()
                        );
                    }
                    info!("{} nbd clients", self.conns.len());
                }
                _ => info!("signal {signo} ignored"),
            }
        }
    }

    /// Ask the loop to stop (from inside; tests use a control request instead).
    pub fn request_exit(&mut self) {
        self.exit = true;
    }

    /// Run until the last VBD is detached or a signal arrives; then tear everything down.
    pub fn run(&mut self) -> Result<(), TapdiskError> {
        let mut ready = Vec::with_capacity(256);
        while !self.exit {
            ready.clear();
            let deferred = !(self.deferred.0.is_empty() && self.deferred.1.is_empty());
            let busy = self.rings.busy() || self.io.has_inline() || deferred;
            let timeout = busy.then_some(Duration::ZERO);
            self.reactor
                .wait(timeout, &mut ready)
                .map_err(sys("epoll_wait"))?;
            for r in &ready {
                self.dispatch(*r);
            }
            // I/O run inline (memory-backed images) is answered in the same pass. Handling
            // results can start more requests; after a few rounds the rest waits for the next
            // pass (zero timeout) so a busy client cannot keep other fds waiting.
            self.settle_deferred();
            for _ in 0..INLINE_ROUNDS {
                if !self.io.has_inline() {
                    break;
                }
                self.io_ready();
            }
            self.retry_mem_waiters();
            // Re-poll rings and publish their responses: one notify per ring per iteration.
            self.rings.repoll_and_publish(&self.io, &mut self.vbds);
        }
        self.shutdown();
        Ok(())
    }

    fn dispatch(&mut self, r: Ready) {
        match r.token {
            Token::Control => self.control_ready(),
            Token::IoDone => self.io_ready(),
            Token::Timer => self.tick(),
            Token::Signal => self.signal_ready(),
            Token::Listener(minor) => self.accept(minor),
            Token::Conn(id) => self.conn_ready(id, r),
            Token::Evtchn => self.rings.on_event(&self.io, &mut self.vbds),
        }
    }

    // ---- I/O completions ------------------------------------------------------------------

    fn io_ready(&mut self) {
        self.take_completions();
        self.settle_deferred();
    }

    /// Settle the connections and progress the VBDs that completions touched.
    fn settle_deferred(&mut self) {
        let (touched, minors) = std::mem::take(&mut self.deferred);
        for id in touched {
            self.settle(id);
        }
        for m in minors {
            self.progress(m);
        }
    }

    /// Hand every waiting completion to its owner (replies are queued, ring responses
    /// written); the connections and VBDs touched are left in `deferred`.
    fn take_completions(&mut self) {
        let done = self.io.completions();
        let (mut touched, mut minors) = std::mem::take(&mut self.deferred);
        for c in done {
            match c.tag {
                Tag::Io { minor, acct, door } => {
                    if let Some(v) = self.vbds.get_mut(&minor) {
                        v.end_io(acct, c.result.is_ok());
                    }
                    if !minors.contains(&minor) {
                        minors.push(minor);
                    }
                    match door {
                        Door::Ring(t) => self.rings.complete(&self.io, t, c.result),
                        Door::Nbd(t) => {
                            if !touched.contains(&t.conn) {
                                touched.push(t.conn);
                            }
                            self.nbd_done(minor, t, c.result);
                        }
                    }
                }
                Tag::Open { minor } => self.opened(minor, false, c.result),
                Tag::Resume { minor } => self.opened(minor, true, c.result),
                Tag::CloseImage { minor } => self.closed(minor, c.result),
                Tag::CloseUnused => {
                    if let Err(e) = c.result {
                        warn!("closing an unused image: {e}");
                    }
                }
            }
        }
        self.deferred = (touched, minors);
    }

    // ---- timer and shutdown -----------------------------------------------------------------

    fn tick(&mut self) {
        self.ticker.reset();
        let stale: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                c.conn.in_handshake() && c.since.elapsed() > self.cfg.handshake_timeout
            })
            .map(|(id, _)| *id)
            .collect();
        for id in stale {
            info!("nbd client {id}: handshake timed out");
            self.drop_conn(id);
        }
        let now = Instant::now();
        for c in self.conns.values_mut() {
            let accepts = self.vbds.get(&c.minor).is_some_and(Vbd::accepts_io);
            if !c.readable_by_us(accepts, 0) {
                c.conn.hold_clock(now);
            }
        }
        let stalled: Vec<(u64, Duration, usize)> = self
            .conns
            .iter()
            .filter_map(|(id, c)| {
                let t = c.conn.stalled_for(now)?;
                (t > self.cfg.nbd_stall_timeout).then(|| (*id, t, c.conn.held_bytes()))
            })
            .collect();
        for (id, t, held) in stalled {
            warn!(
                "nbd client {id}: no progress for {}s, holding {held} bytes (unread replies or a \
                 part-sent write): dropped",
                t.as_secs()
            );
            self.drop_conn(id);
        }
        self.trim_nbd_pools();
        self.unstarve_listeners();
        for v in self.vbds.values_mut() {
            if let Some(idle) = v.stalled(WATCHDOG) {
                warn!(
                    "minor {}: {} requests pending with no progress for {}s",
                    v.minor(),
                    v.inflight(),
                    idle.as_secs()
                );
            }
        }
    }

    /// Drop clients, let queued I/O finish, close images, remove sockets, unlock markers.
    fn shutdown(&mut self) {
        let ids: Vec<u64> = self.conns.keys().copied().collect();
        for id in ids {
            self.drop_conn(id);
        }
        let minors: Vec<u16> = self.listeners.keys().copied().collect();
        for m in minors {
            self.remove_listener(m);
        }
        // Let the workers finish what was queued before closing the images under them.
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.vbds.values().any(|v| v.inflight() > 0) && Instant::now() < deadline {
            let mut ready = Vec::new();
            let _ = self
                .reactor
                .wait(Some(Duration::from_millis(100)), &mut ready);
            if self.io.has_inline() || ready.iter().any(|r| r.token == Token::IoDone) {
                self.io_ready();
            }
        }
        let mut replies = Vec::new();
        for v in self.vbds.values_mut() {
            let (image, reply) = v.shut_down();
            if let Some(img) = image {
                if let Err(e) = img.image.close() {
                    warn!("minor {}: close: {e}", v.minor());
                }
            }
            replies.extend(reply);
        }
        self.vbds.clear();
        for reply in replies {
            let _ = reply.send(Reply::Error(libc::ESHUTDOWN));
        }
    }
}

impl Drop for Tapdisk {
    fn drop(&mut self) {
        for l in self.listeners.values() {
            let _ = std::fs::remove_file(&l.path);
        }
    }
}

#[cfg(test)]
mod mem_tests {
    use super::*;

    #[test]
    fn the_floor_comes_out_of_one_shared_reserve() {
        let lim = 256 << 20;
        // Under the limit: what is left.
        assert_eq!(mem_allowance(lim, 100 << 20, 0, 0), 156 << 20);
        // Past it, a light connection still gets its floor...
        assert_eq!(mem_allowance(lim, lim, 0, 0), NBD_MEM_FLOOR);
        assert_eq!(
            mem_allowance(lim, lim, 0, 256 << 10),
            NBD_MEM_FLOOR - (256 << 10)
        );
        // ...out of the reserve, which any number of connections cannot exceed together.
        assert_eq!(mem_allowance(lim, lim + NBD_MEM_RESERVE - 4096, 0, 0), 4096);
        assert_eq!(mem_allowance(lim, lim + NBD_MEM_RESERVE, 0, 0), 0);
        assert_eq!(mem_allowance(lim, lim + 2 * NBD_MEM_RESERVE, 0, 0), 0);
        // Memory kept for a waiter comes out of what is left of the limit, not the reserve.
        assert_eq!(mem_allowance(lim, 100 << 20, 32 << 20, 0), 124 << 20);
        assert_eq!(mem_allowance(lim, lim, 32 << 20, 0), NBD_MEM_FLOOR);
        assert_eq!(
            mem_allowance(lim, lim - (16 << 20), 32 << 20, 0),
            NBD_MEM_FLOOR
        );
        // A heavy connection gets nothing past the limit.
        assert_eq!(mem_allowance(lim, lim, 0, NBD_MEM_FLOOR), 0);
    }

    #[test]
    fn the_first_waiter_is_reserved_its_need_from_everyone_else() {
        let mut w = BTreeMap::new();
        assert_eq!(reserved_for_waiter(&w, 1), 0);
        w.insert(5, 4 << 20);
        w.insert(9, 8 << 20);
        assert_eq!(reserved_for_waiter(&w, 5), 0, "the first waiter itself");
        assert_eq!(
            reserved_for_waiter(&w, 9),
            4 << 20,
            "a later waiter queues behind it"
        );
        assert_eq!(
            reserved_for_waiter(&w, 2),
            4 << 20,
            "a connection not waiting"
        );
    }
}
