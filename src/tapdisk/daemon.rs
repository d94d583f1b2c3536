//! The tapdisk event loop: control requests, VBD lifecycle, NBD exports and I/O completions.
//!
//! ```text
//!            control thread ──CtlHandle::call──► [channel] + eventfd ─┐
//!                                                                     ▼
//!  NBD clients ◄─► Connection (nbd::server) ◄──► Tapdisk::run (epoll, one thread)
//!                                                    │  ▲
//!                                        Job{Tag,Op} ▼  │ Completion + eventfd
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
use super::io::{IoEngine, Op, Output};
use super::reactor::{Interest, Reactor, Ready, Ticker, Token};
use super::tag::{Door, NbdReq, NbdTag, Tag};
use super::vbd::{parse_params, state, DiskInfo, DiskType, OpenImage, Vbd, VDISK_READONLY};
use super::xenio::{DevXenOpener, Rings, XenOpener};
use super::TapdiskError;

mod nbd_export;

use crate::control::msg::{ListEntry, OpenFlags, Reply, Request, VbdState};
use crate::control::{minors, nbd_socket_path};

/// Requests in flight per NBD connection before the loop stops reading from it.
const MAX_CONN_INFLIGHT: u32 = 128;
/// Buffer bytes in flight per NBD connection before the loop stops reading from it (so 128
/// reads of 32 MiB cannot make a client pin 4 GiB of dom0 memory).
const MAX_CONN_INFLIGHT_BYTES: u64 = 64 << 20;
/// Rounds of inline completions handled per loop pass before polling again.
const INLINE_ROUNDS: usize = 4;
/// Requests taken from one connection per readiness event before serving others.
const READ_BATCH: usize = 64;
/// A client still negotiating after this long is dropped (default of
/// [`Config::handshake_timeout`]; the C tapdisk tolerates 40 s during SXM).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);
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
}

/// The opener used by the daemon: the image engine's factory (`aio:` raw files, `vhd:`
/// chains with their keys).
#[derive(Debug, Default)]
pub struct DefaultOpener;

impl ImageOpener for DefaultOpener {
    fn open(&self, spec: &OpenSpec) -> Result<Arc<dyn Image>, ImageError> {
        let format = spec.kind.format();
        let opts = ChainOptions {
            read_only: spec.read_only,
            keys: spec.keys.clone(),
            ..ChainOptions::default()
        };
        Ok(Arc::from(open_image(&spec.path, format, &opts)?))
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
    pub opener: Arc<dyn ImageOpener>,
    /// Keys for OPENs without a key trailer (`TAPDISK3_CRYPTO_KEYDIR`).
    pub keys: KeySource,
    /// Opens the Xen devices at the first XENBLKIF_CONNECT (real: `/dev/xen`; tests: SimXen).
    pub xen: Arc<dyn XenOpener>,
    /// Require (and flock) the minor's marker file at ATTACH.
    pub lock_markers: bool,
    /// Drop NBD clients that have not finished the handshake after this long.
    pub handshake_timeout: Duration,
}

impl Config {
    pub fn new(ctl_dir: impl Into<PathBuf>) -> Self {
        Config {
            ctl_dir: ctl_dir.into(),
            pid: i32::try_from(std::process::id()).unwrap_or(i32::MAX),
            io_threads: super::io::DEFAULT_THREADS,
            inline_io: true,
            opener: Arc::new(DefaultOpener),
            keys: KeySource::None,
            xen: Arc::new(DevXenOpener),
            lock_markers: true,
            handshake_timeout: HANDSHAKE_TIMEOUT,
        }
    }

    /// `<ctl_dir>/nbd<pid>.<minor>`.
    pub fn nbd_path(&self, minor: u16) -> PathBuf {
        nbd_socket_path(&self.ctl_dir, self.pid, minor)
    }
}

/// A control operation waiting for I/O.
#[derive(Debug)]
enum Waiting {
    Open {
        params: String,
        kind: DiskType,
        path: PathBuf,
    },
    Resume {
        params: String,
        kind: DiskType,
        path: PathBuf,
    },
    PauseDrain,
    CloseDrain,
    Closing {
        pause: bool,
    },
}

#[derive(Debug)]
struct Pending {
    what: Waiting,
    reply: Sender<Reply>,
}

#[derive(Debug)]
struct Listener {
    sock: UnixListener,
    path: PathBuf,
    registered: bool,
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
    pending: HashMap<u16, Pending>,
    listeners: HashMap<u16, Listener>,
    conns: HashMap<u64, NbdConn>,
    next_conn: u64,
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
        let mut io = IoEngine::new(cfg.io_threads).map_err(|source| TapdiskError::Sys {
            op: "start i/o threads",
            source,
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
            rings: Rings::new(Arc::clone(&cfg.xen)),
            cfg,
            reactor,
            io,
            ctl,
            ctl_rx,
            ticker,
            vbds: BTreeMap::new(),
            pending: HashMap::new(),
            listeners: HashMap::new(),
            conns: HashMap::new(),
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
                            "minor {} state {:#x} params {:?} inflight {} busy {} stats {:?}",
                            v.minor, v.state, v.params, v.inflight, v.busy, v.stats
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

    // ---- control -------------------------------------------------------------------------

    fn control_ready(&mut self) {
        self.ctl.waker().reset();
        while let Ok((req, reply)) = self.ctl_rx.try_recv() {
            debug!("control request {req:?}");
            if let Some(r) = self.control(req, &reply) {
                let _ = reply.send(r);
            }
        }
    }

    /// Handle one request; `None` when the answer comes later (sent through `reply`).
    fn control(&mut self, req: Request, reply: &Sender<Reply>) -> Option<Reply> {
        let err = |e: i32| Some(Reply::Error(e));
        match req {
            Request::Pid => Some(Reply::Pid(self.cfg.pid)),
            Request::Attach { minor } => Some(self.attach(minor)),
            Request::Open(o) => {
                let minor = o.minor;
                let Some(vbd) = self.vbds.get_mut(&minor) else {
                    return err(libc::EINVAL);
                };
                if vbd.busy {
                    return err(libc::EBUSY);
                }
                if vbd.is_open() {
                    return err(libc::EALREADY);
                }
                let params = o.params;
                let flags = o.flags.0;
                if flags & !SUPPORTED_OPEN_FLAGS.0 != 0 || o.secondary.is_some() {
                    warn!("minor {minor}: open flags {flags:#x} not supported");
                    return err(libc::EOPNOTSUPP);
                }
                let (kind, path) = match parse_params(&params) {
                    Ok(v) => v,
                    Err(e) => return err(e),
                };
                let keys = match o.key {
                    Some(k) => KeySource::Explicit(k.into_key_bytes()),
                    None => self.cfg.keys.clone(),
                };
                let spec = OpenSpec {
                    kind,
                    path: path.clone(),
                    read_only: flags & OpenFlags::RDONLY.0 != 0,
                    keys,
                };
                vbd.flags = flags;
                self.begin(minor, Waiting::Open { params, kind, path }, reply);
                let opener = Arc::clone(&self.cfg.opener);
                self.io.run(
                    Tag::Open { minor },
                    Box::new(move || opener.open(&spec).map(Output::Image)),
                );
                None
            }
            Request::Pause { minor } => {
                let Some(vbd) = self.vbds.get_mut(&minor) else {
                    return err(libc::EINVAL);
                };
                if vbd.busy {
                    return err(libc::EBUSY);
                }
                if vbd.state & state::PAUSED != 0 {
                    return Some(Reply::Pause);
                }
                if !vbd.is_open() {
                    return err(libc::EINVAL);
                }
                vbd.state |= state::PAUSE_REQUESTED;
                self.begin(minor, Waiting::PauseDrain, reply);
                self.set_listening(minor, false);
                self.refresh_conns(minor);
                self.progress(minor);
                None
            }
            Request::Resume(r) => {
                if r.flags.0 & !SUPPORTED_OPEN_FLAGS.0 != 0 || r.secondary.is_some() {
                    return err(libc::EOPNOTSUPP);
                }
                let (minor, params) = (r.minor, r.params);
                let Some(vbd) = self.vbds.get_mut(&minor) else {
                    return err(libc::EINVAL);
                };
                if vbd.busy {
                    return err(libc::EBUSY);
                }
                if vbd.state & state::PAUSED == 0 {
                    return err(libc::EINVAL);
                }
                let params = params
                    .filter(|p| !p.is_empty())
                    .unwrap_or_else(|| vbd.params.clone());
                let (kind, path) = match parse_params(&params) {
                    Ok(v) => v,
                    Err(e) => return err(e),
                };
                let spec = OpenSpec {
                    kind,
                    path: path.clone(),
                    read_only: vbd.flags & OpenFlags::RDONLY.0 != 0,
                    keys: self.cfg.keys.clone(),
                };
                self.begin(minor, Waiting::Resume { params, kind, path }, reply);
                let opener = Arc::clone(&self.cfg.opener);
                self.io.run(
                    Tag::Resume { minor },
                    Box::new(move || {
                        let mut tries = 0;
                        loop {
                            tries += 1;
                            match opener.open(&spec) {
                                Ok(i) => return Ok(Output::Image(i)),
                                Err(e) if tries >= RESUME_TRIES => return Err(e),
                                Err(e) => {
                                    warn!("resume: reopen {} failed: {e}", spec.path.display());
                                    std::thread::sleep(Duration::from_secs(1));
                                }
                            }
                        }
                    }),
                );
                None
            }
            Request::Close { minor } | Request::ForceShutdown { minor } => {
                let force = matches!(req, Request::ForceShutdown { .. });
                let Some(vbd) = self.vbds.get_mut(&minor) else {
                    return err(libc::EINVAL);
                };
                if vbd.busy {
                    return err(libc::EBUSY);
                }
                if !vbd.is_open() {
                    return Some(Reply::Close);
                }
                vbd.state |= state::SHUTDOWN_REQUESTED;
                self.begin(minor, Waiting::CloseDrain, reply);
                self.remove_listener(minor);
                let ids = self.conn_ids(minor);
                for id in ids {
                    if force {
                        self.drop_conn(id);
                    } else if let Some(c) = self.conns.get_mut(&id) {
                        c.ending = true;
                    }
                }
                self.refresh_conns(minor);
                self.progress(minor);
                None
            }
            Request::Detach { minor } => {
                let Some(vbd) = self.vbds.get(&minor) else {
                    return err(libc::EINVAL);
                };
                if vbd.busy || vbd.is_open() || self.rings.has_live(minor) {
                    return err(libc::EBUSY);
                }
                self.vbds.remove(&minor);
                info!("minor {minor} detached");
                if self.vbds.is_empty() && self.exit_when_empty {
                    self.exit = true;
                }
                Some(Reply::Detach)
            }
            Request::List => Some(Reply::List(
                self.vbds
                    .values()
                    .map(|v| ListEntry {
                        minor: v.minor,
                        state: VbdState(v.state),
                        params: v.params.clone(),
                    })
                    .collect(),
            )),
            Request::Stats { minor: Some(m) } => match self.vbds.get(&m) {
                Some(v) => Some(Reply::Stats(
                    v.stats_json_with(self.rings.stats_json(m).as_deref())
                        .into_bytes(),
                )),
                None => err(libc::EINVAL),
            },
            Request::Stats { minor: None } => {
                let all: Vec<String> = self
                    .vbds
                    .values()
                    .map(|v| v.stats_json_with(self.rings.stats_json(v.minor).as_deref()))
                    .collect();
                Some(Reply::Stats(format!("[ {} ]", all.join(", ")).into_bytes()))
            }
            Request::DiskInfo { minor } => match self.vbds.get(&minor).and_then(|v| v.info) {
                Some(i) => Some(Reply::DiskInfo(i)),
                None => err(libc::EINVAL),
            },
            Request::XenblkifConnect { minor, blkif } => {
                if !self.vbds.contains_key(&minor) {
                    return err(libc::ENODEV);
                }
                Some(match self.rings.connect(&self.reactor, minor, &blkif) {
                    Ok(()) => Reply::XenblkifConnect,
                    Err(e) => {
                        warn!("minor {minor}: {}", crate::util::error_chain(&e));
                        Reply::Error(e.errno())
                    }
                })
            }
            Request::XenblkifDisconnect { domid, devid } => {
                Some(match self.rings.disconnect(domid, devid) {
                    Ok(()) => Reply::XenblkifDisconnect,
                    Err(e) => Reply::Error(e.errno()),
                })
            }
        }
    }

    fn attach(&mut self, minor: u16) -> Reply {
        if self.vbds.contains_key(&minor) {
            return Reply::Error(libc::EEXIST);
        }
        let marker = if self.cfg.lock_markers {
            match minors::lock_marker(&self.cfg.ctl_dir, minor, Duration::ZERO) {
                Ok(m) => Some(m),
                // blktap answers a missing marker with EPERM.
                Err(e) if e.errno() == libc::ENOENT => return Reply::Error(libc::EPERM),
                Err(e) => return Reply::Error(e.errno()),
            }
        } else {
            None
        };
        self.vbds.insert(minor, Vbd::new(minor, marker));
        info!("minor {minor} attached");
        Reply::Attach
    }

    /// A control operation on `minor` goes asynchronous: the VBD is busy (other requests get
    /// EBUSY) until [`Tapdisk::finish`] answers `reply`.
    fn begin(&mut self, minor: u16, what: Waiting, reply: &Sender<Reply>) {
        if let Some(v) = self.vbds.get_mut(&minor) {
            v.busy = true;
        }
        self.pending.insert(
            minor,
            Pending {
                what,
                reply: reply.clone(),
            },
        );
    }

    fn finish(&mut self, minor: u16, r: Reply) {
        if let Some(v) = self.vbds.get_mut(&minor) {
            v.busy = false;
        }
        if let Some(p) = self.pending.remove(&minor) {
            let _ = p.reply.send(r);
        }
    }

    /// Move a draining PAUSE/CLOSE on once nothing is in flight.
    fn progress(&mut self, minor: u16) {
        let Some(p) = self.pending.get(&minor) else {
            return;
        };
        let pause = match p.what {
            Waiting::PauseDrain => true,
            Waiting::CloseDrain => false,
            _ => return,
        };
        let Some(vbd) = self.vbds.get_mut(&minor) else {
            return;
        };
        if vbd.inflight > 0 {
            return;
        }
        if let Some(p) = self.pending.get_mut(&minor) {
            p.what = Waiting::Closing { pause };
        }
        match vbd.image.take() {
            Some(img) => self.io.run(
                Tag::CloseImage { minor },
                Box::new(move || img.image.close().map(|_| Output::Done)),
            ),
            // Closing a paused VBD: the image is already closed.
            None => self.closed(minor, Ok(Output::Done)),
        }
    }

    fn closed(&mut self, minor: u16, res: Result<Output, ImageError>) {
        let Some(Pending {
            what: Waiting::Closing { pause },
            ..
        }) = self.pending.get(&minor)
        else {
            return;
        };
        let pause = *pause;
        if let Err(e) = &res {
            warn!("minor {minor}: close failed: {e}");
        }
        if let Some(vbd) = self.vbds.get_mut(&minor) {
            if pause {
                vbd.state = (vbd.state & !state::PAUSE_REQUESTED) | state::PAUSED;
            } else {
                vbd.state = state::CLOSED;
                vbd.params.clear();
                vbd.info = None;
                let ids = self.conn_ids(minor);
                for id in ids {
                    self.drop_conn(id);
                }
            }
        }
        info!("minor {minor} {}", if pause { "paused" } else { "closed" });
        let r = match res {
            Ok(_) if pause => Reply::Pause,
            Ok(_) => Reply::Close,
            Err(e) => Reply::Error(e.errno()),
        };
        self.finish(minor, r);
    }

    fn opened(&mut self, minor: u16, resume: bool, res: Result<Output, ImageError>) {
        let what = match self.pending.get(&minor) {
            Some(Pending {
                what: Waiting::Open { params, kind, path },
                ..
            }) if !resume => (params.clone(), *kind, path.clone()),
            Some(Pending {
                what: Waiting::Resume { params, kind, path },
                ..
            }) if resume => (params.clone(), *kind, path.clone()),
            _ => {
                // Nobody waits (cannot happen); do not leak an open image.
                if let Ok(Output::Image(img)) = res {
                    self.io.run(
                        Tag::CloseUnused,
                        Box::new(move || img.close().map(|_| Output::Done)),
                    );
                }
                return;
            }
        };
        let (params, kind, path) = what;
        let image = match res {
            Ok(Output::Image(i)) => i,
            Ok(_) => {
                self.finish(minor, Reply::Error(libc::EIO));
                return;
            }
            Err(e) => {
                warn!("minor {minor}: open {params} failed: {e}");
                if resume {
                    if let Some(v) = self.vbds.get_mut(&minor) {
                        v.state |= state::RESUME_FAILED;
                    }
                }
                self.finish(minor, Reply::Error(e.errno()));
                return;
            }
        };
        let ii = image.info();
        let info = DiskInfo {
            sectors: ii.size_sectors,
            sector_size: ii.sector_size,
            info: if ii.read_only { VDISK_READONLY } else { 0 },
        };
        let discard = |s: &mut Self, img: Arc<dyn Image>| {
            s.io.run(
                Tag::CloseUnused,
                Box::new(move || img.close().map(|_| Output::Done)),
            );
        };
        if resume {
            let cached = self.vbds.get(&minor).and_then(|v| v.info);
            if cached
                .is_some_and(|c| c.sectors != info.sectors || c.sector_size != info.sector_size)
            {
                warn!("minor {minor}: resume onto {params}: disk geometry changed");
                discard(self, image);
                if let Some(v) = self.vbds.get_mut(&minor) {
                    v.state |= state::RESUME_FAILED;
                }
                self.finish(minor, Reply::Error(libc::EMEDIUMTYPE));
                return;
            }
        } else if let Err(e) = self.listen(minor) {
            warn!("minor {minor}: nbd listen: {e}");
            discard(self, image);
            self.finish(minor, Reply::Error(e.raw_os_error().unwrap_or(libc::EIO)));
            return;
        }
        if let Some(v) = self.vbds.get_mut(&minor) {
            v.image = Some(OpenImage { image, kind, path });
            v.params = params.clone();
            v.info = Some(info);
            v.state = 0;
        }
        if resume {
            self.set_listening(minor, true);
            self.refresh_conns(minor);
        }
        self.rings.wake_minor(minor);
        info!(
            "minor {minor} {} {params}: {} sectors",
            if resume { "resumed on" } else { "opened" },
            info.sectors
        );
        self.finish(
            minor,
            if resume {
                Reply::Resume
            } else {
                Reply::Open(info)
            },
        );
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
        for v in self.vbds.values_mut() {
            if v.inflight == 0 {
                v.stalled_logged = false;
            } else if !v.stalled_logged && v.last_progress.elapsed() > WATCHDOG {
                warn!(
                    "minor {}: {} requests pending with no progress for {}s",
                    v.minor,
                    v.inflight,
                    v.last_progress.elapsed().as_secs()
                );
                v.stalled_logged = true;
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
        while self.vbds.values().any(|v| v.inflight > 0) && Instant::now() < deadline {
            let mut ready = Vec::new();
            let _ = self
                .reactor
                .wait(Some(Duration::from_millis(100)), &mut ready);
            if self.io.has_inline() || ready.iter().any(|r| r.token == Token::IoDone) {
                self.io_ready();
            }
        }
        for v in self.vbds.values_mut() {
            if let Some(img) = v.image.take() {
                if let Err(e) = img.image.close() {
                    warn!("minor {}: close: {e}", v.minor);
                }
            }
        }
        self.vbds.clear();
        for (_, p) in self.pending.drain() {
            let _ = p.reply.send(Reply::Error(libc::ESHUTDOWN));
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
