//! A VBD (virtual block device): one attached minor, its open image, its lifecycle and its
//! I/O accounting.
//!
//! Lifecycle ([`Lifecycle`]; the control handlers in `daemon/control.rs` drive it, the wire
//! state of LIST is derived from it by [`Vbd::wire_state`]):
//!
//! ```text
//!  ATTACH ─► Closed ─OPEN─► Opening ─ok─► Open ─PAUSE─► Pausing ─drained, closed─► Paused
//!              ▲  ◄──failed──┘            │  ▲                                      │  ▲
//!              │                          │  └───────ok─── Resuming ◄──RESUME──────┘  │
//!              │                        CLOSE                └──failed (RESUME_FAILED)┘
//!              └──drained, closed── Closing ◄──────CLOSE (from Open or Paused)
//! ```
//!
//! Opening, Pausing, Resuming and Closing hold the control request's reply channel: the VBD
//! is busy (other requests get EBUSY) until the I/O they wait for completes.

use std::path::PathBuf;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::control::minors::MarkerLock;
use crate::control::msg::{OpenFlags, Reply, VbdState};
use crate::image::{Image, ImageFormat};

use super::io::{IoEngine, Op};
use super::tag::{Door, IoAcct, Tag};

/// `VDISK_READONLY` in the `info` field of OPEN_RSP / DISK_INFO_RSP.
pub const VDISK_READONLY: u32 = 0x4;

pub use crate::control::msg::DiskInfo;

/// Disk types tapdisk knows (`type:` prefix of the params) with blktap's numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskType {
    Aio,
    Vhd,
}

/// Why a `"type:/path"` params string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParamsError {
    #[error("no \"type:\" prefix")]
    NoType,
    #[error("no path after the type")]
    NoPath,
    /// A blktap type this tapdisk does not implement (ENOSYS, as blktap answers).
    #[error("disk type {0:?} is not implemented")]
    Unimplemented(String),
    #[error("unknown disk type {0:?}")]
    Unknown(String),
}

impl ParamsError {
    pub fn errno(&self) -> i32 {
        match self {
            ParamsError::Unimplemented(_) => libc::ENOSYS,
            ParamsError::NoType | ParamsError::NoPath | ParamsError::Unknown(_) => libc::EINVAL,
        }
    }
}

impl DiskType {
    /// Parse a `type` name. Known-but-unimplemented blktap types are
    /// [`ParamsError::Unimplemented`].
    pub fn parse(name: &str) -> Result<DiskType, ParamsError> {
        match name {
            "aio" => Ok(DiskType::Aio),
            "vhd" => Ok(DiskType::Vhd),
            "sync" | "vmdk" | "vhdsync" | "ram" | "qcow" | "bc" | "vhdi" | "log" | "remus"
            | "lc" | "lle" | "llp" | "valve" | "nbd" => {
                Err(ParamsError::Unimplemented(name.to_string()))
            }
            _ => Err(ParamsError::Unknown(name.to_string())),
        }
    }

    /// The image format this driver opens.
    pub fn format(self) -> ImageFormat {
        match self {
            DiskType::Aio => ImageFormat::Raw,
            DiskType::Vhd => ImageFormat::Vhd,
        }
    }

    pub fn name(self) -> &'static str {
        self.format().driver_name()
    }

    /// blktap's driver number (stats JSON `driver.type`).
    pub fn number(self) -> u32 {
        self.format().driver_type()
    }
}

/// Split `"type:/path"`.
pub fn parse_params(params: &str) -> Result<(DiskType, PathBuf), ParamsError> {
    let (t, p) = params.split_once(':').ok_or(ParamsError::NoType)?;
    if p.is_empty() {
        return Err(ParamsError::NoPath);
    }
    Ok((DiskType::parse(t)?, PathBuf::from(p)))
}

/// A request for a VBD that has no image (closed or paused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("minor {0} has no open image")]
pub struct NoImage(pub u16);

/// Per-VBD counters (stats JSON).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub rd_secs: u64,
    pub wr_secs: u64,
    pub hits: [u64; 2],
    pub fail: [u64; 2],
}

/// An open image and how it was opened.
#[derive(Debug, Clone)]
pub struct OpenImage {
    pub image: Arc<dyn Image>,
    pub kind: DiskType,
    pub path: PathBuf,
}

/// One entry of the stats JSON `"images"` list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageStats {
    pub name: String,
    pub hits: [u64; 2],
    pub fail: [u64; 2],
    pub driver_type: u32,
    pub driver_name: &'static str,
}

impl ImageStats {
    /// `{ "name": .., "hits": [ r, w ], "fail": [ r, w ], "driver": { .. } }` (reference §3.1).
    pub fn json(&self) -> String {
        format!(
            "{{ \"name\": {}, \"hits\": [ {}, {} ], \"fail\": [ {}, {} ], \
             \"driver\": {{ \"type\": {}, \"name\": {}, \"status\": null }} }}",
            json_str(&self.name),
            self.hits[0],
            self.hits[1],
            self.fail[0],
            self.fail[1],
            self.driver_type,
            json_str(self.driver_name),
        )
    }
}

impl OpenImage {
    /// The chain's images, leaf first. Requests are counted per VBD, not per layer: the
    /// leaf carries the VBD's hits and failures (every request enters the chain there),
    /// parents report zeros. An image that does not list its layers is described by the
    /// path and type it was opened with.
    pub fn image_stats(&self, stats: &Stats) -> Vec<ImageStats> {
        let layers = self.image.layers();
        if layers.is_empty() {
            return vec![ImageStats {
                name: self.path.to_string_lossy().into_owned(),
                hits: stats.hits,
                fail: stats.fail,
                driver_type: self.kind.number(),
                driver_name: self.kind.name(),
            }];
        }
        layers
            .into_iter()
            .enumerate()
            .map(|(i, l)| ImageStats {
                name: l.path.to_string_lossy().into_owned(),
                hits: if i == 0 { stats.hits } else { [0; 2] },
                fail: if i == 0 { stats.fail } else { [0; 2] },
                driver_type: l.format.driver_type(),
                driver_name: l.format.driver_name(),
            })
            .collect()
    }
}

/// What an OPEN or RESUME opens.
#[derive(Debug, Clone)]
pub struct OpenTarget {
    /// `"type:/path"` as given.
    pub params: String,
    pub kind: DiskType,
    pub path: PathBuf,
}

/// Where a VBD is in its life (see the module doc). The states that wait for I/O hold the
/// reply channel of the control request that started them.
#[derive(Debug)]
pub enum Lifecycle {
    /// Attached, no image.
    Closed,
    /// OPEN: the image is being opened.
    Opening {
        target: OpenTarget,
        reply: Sender<Reply>,
    },
    /// Serving I/O.
    Open,
    /// PAUSE: draining in-flight requests, then (`closing`) closing the image.
    Pausing { reply: Sender<Reply>, closing: bool },
    /// The image is closed, the guest's requests wait in its ring or socket.
    Paused { resume_failed: bool },
    /// RESUME: the image is being reopened.
    Resuming {
        target: OpenTarget,
        resume_failed: bool,
        reply: Sender<Reply>,
    },
    /// CLOSE: draining, then (`closing`) closing the image. `paused`: it was paused (and
    /// whether its last resume had failed), kept for LIST.
    Closing {
        paused: Option<bool>,
        reply: Sender<Reply>,
        closing: bool,
    },
}

/// How a PAUSE or CLOSE goes on once its VBD has nothing in flight.
#[derive(Debug)]
pub enum Drained {
    /// Close this image (None: it was closed already, a paused VBD being closed).
    CloseImage(Option<OpenImage>),
    /// Nothing to do (not draining, or requests still in flight).
    Wait,
}

/// One attached minor.
#[derive(Debug)]
pub struct Vbd {
    minor: u16,
    life: Lifecycle,
    /// The minor's marker file, flocked while attached.
    _marker: Option<MarkerLock>,
    /// Open flags of the last OPEN.
    flags: u32,
    /// `"type:/path"` of the open (or paused) image; empty when closed.
    params: String,
    image: Option<OpenImage>,
    /// Geometry cached at OPEN; DISK_INFO answers from it, RESUME must match it.
    info: Option<DiskInfo>,
    stats: Stats,
    /// Last completion (or first submission after idling), for the stuck-I/O watchdog.
    last_progress: Instant,
    /// The watchdog already warned about the current stall.
    stalled_logged: bool,
    /// Requests submitted to the I/O engine and not completed yet.
    inflight: u32,
}

impl Vbd {
    pub fn new(minor: u16, marker: Option<MarkerLock>) -> Self {
        Vbd {
            minor,
            life: Lifecycle::Closed,
            _marker: marker,
            flags: 0,
            params: String::new(),
            image: None,
            info: None,
            stats: Stats::default(),
            last_progress: Instant::now(),
            stalled_logged: false,
            inflight: 0,
        }
    }

    pub fn minor(&self) -> u16 {
        self.minor
    }

    pub fn lifecycle(&self) -> &Lifecycle {
        &self.life
    }

    /// Open flags of the last OPEN.
    pub fn flags(&self) -> u32 {
        self.flags
    }

    /// Whether the last OPEN asked for read-only.
    pub fn read_only(&self) -> bool {
        self.flags & OpenFlags::RDONLY.0 != 0
    }

    /// `"type:/path"` of the open or paused image (empty when closed).
    pub fn params(&self) -> &str {
        &self.params
    }

    pub fn image(&self) -> Option<&OpenImage> {
        self.image.as_ref()
    }

    /// Geometry of the open (or paused) image.
    pub fn info(&self) -> Option<DiskInfo> {
        self.info
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Requests in the I/O engine.
    pub fn inflight(&self) -> u32 {
        self.inflight
    }

    /// The state bits LIST reports (blktap's `TD_VBD_*`).
    pub fn wire_state(&self) -> VbdState {
        let paused = |resume_failed: bool| {
            if resume_failed {
                VbdState::PAUSED | VbdState::RESUME_FAILED
            } else {
                VbdState::PAUSED
            }
        };
        match &self.life {
            Lifecycle::Closed | Lifecycle::Opening { .. } => VbdState::CLOSED,
            Lifecycle::Open => VbdState(0),
            Lifecycle::Pausing { .. } => VbdState::PAUSE_REQUESTED,
            Lifecycle::Paused { resume_failed } | Lifecycle::Resuming { resume_failed, .. } => {
                paused(*resume_failed)
            }
            Lifecycle::Closing { paused: None, .. } => VbdState::SHUTDOWN_REQUESTED,
            Lifecycle::Closing {
                paused: Some(rf), ..
            } => paused(*rf) | VbdState::SHUTDOWN_REQUESTED,
        }
    }

    /// An OPEN, PAUSE, RESUME or CLOSE is in progress (other requests get EBUSY).
    pub fn is_busy(&self) -> bool {
        matches!(
            self.life,
            Lifecycle::Opening { .. }
                | Lifecycle::Pausing { .. }
                | Lifecycle::Resuming { .. }
                | Lifecycle::Closing { .. }
        )
    }

    /// Open or paused (not closed): DETACH is refused.
    pub fn is_open(&self) -> bool {
        !matches!(self.life, Lifecycle::Closed | Lifecycle::Opening { .. })
    }

    pub fn is_paused(&self) -> bool {
        matches!(self.life, Lifecycle::Paused { .. })
    }

    /// Whether guest requests (ring or NBD) may be started now.
    pub fn accepts_io(&self) -> bool {
        matches!(self.life, Lifecycle::Open) && self.image.is_some()
    }

    // ---- transitions (the control handlers check the preconditions first) ------------

    /// Closed -> Opening.
    pub fn begin_open(&mut self, target: OpenTarget, flags: u32, reply: &Sender<Reply>) {
        self.flags = flags;
        self.life = Lifecycle::Opening {
            target,
            reply: reply.clone(),
        };
    }

    /// Open -> Pausing.
    pub fn begin_pause(&mut self, reply: &Sender<Reply>) {
        self.life = Lifecycle::Pausing {
            reply: reply.clone(),
            closing: false,
        };
    }

    /// Paused -> Resuming.
    pub fn begin_resume(&mut self, target: OpenTarget, reply: &Sender<Reply>) {
        let resume_failed = matches!(
            self.life,
            Lifecycle::Paused {
                resume_failed: true
            }
        );
        self.life = Lifecycle::Resuming {
            target,
            resume_failed,
            reply: reply.clone(),
        };
    }

    /// Open or Paused -> Closing.
    pub fn begin_close(&mut self, reply: &Sender<Reply>) {
        let paused = match self.life {
            Lifecycle::Paused { resume_failed } => Some(resume_failed),
            _ => None,
        };
        self.life = Lifecycle::Closing {
            paused,
            reply: reply.clone(),
            closing: false,
        };
    }

    /// The target of the OPEN (`resume` false) or RESUME in progress.
    pub fn opening(&self, resume: bool) -> Option<&OpenTarget> {
        match &self.life {
            Lifecycle::Opening { target, .. } if !resume => Some(target),
            Lifecycle::Resuming { target, .. } if resume => Some(target),
            _ => None,
        }
    }

    /// Opening or Resuming -> Open, with its image. Returns the reply channel.
    pub fn open_succeeded(&mut self, image: OpenImage, info: DiskInfo) -> Option<Sender<Reply>> {
        let (target, reply) = match std::mem::replace(&mut self.life, Lifecycle::Open) {
            Lifecycle::Opening { target, reply } | Lifecycle::Resuming { target, reply, .. } => {
                (target, reply)
            }
            other => {
                self.life = other;
                return None;
            }
        };
        self.image = Some(image);
        self.params = target.params;
        self.info = Some(info);
        Some(reply)
    }

    /// Opening -> Closed, or Resuming -> Paused (with RESUME_FAILED when `resume_failed`;
    /// otherwise as it was). Returns the reply channel.
    pub fn open_failed(&mut self, resume_failed: bool) -> Option<Sender<Reply>> {
        match std::mem::replace(&mut self.life, Lifecycle::Closed) {
            Lifecycle::Opening { reply, .. } => Some(reply),
            Lifecycle::Resuming {
                resume_failed: was,
                reply,
                ..
            } => {
                self.life = Lifecycle::Paused {
                    resume_failed: was || resume_failed,
                };
                Some(reply)
            }
            other => {
                self.life = other;
                None
            }
        }
    }

    /// Pausing or Closing with nothing in flight: start closing the image (once).
    pub fn drained(&mut self) -> Drained {
        if self.inflight > 0 {
            return Drained::Wait;
        }
        match &mut self.life {
            Lifecycle::Pausing { closing, .. } | Lifecycle::Closing { closing, .. }
                if !*closing =>
            {
                *closing = true;
                Drained::CloseImage(self.image.take())
            }
            _ => Drained::Wait,
        }
    }

    /// The image of a draining PAUSE or CLOSE is closed: Pausing -> Paused, Closing ->
    /// Closed (params and geometry forgotten). Returns whether it was a pause, and the reply
    /// channel.
    pub fn image_closed(&mut self) -> Option<(bool, Sender<Reply>)> {
        match std::mem::replace(&mut self.life, Lifecycle::Closed) {
            Lifecycle::Pausing {
                reply,
                closing: true,
            } => {
                self.life = Lifecycle::Paused {
                    resume_failed: false,
                };
                Some((true, reply))
            }
            Lifecycle::Closing {
                reply,
                closing: true,
                ..
            } => {
                self.params.clear();
                self.info = None;
                Some((false, reply))
            }
            other => {
                self.life = other;
                None
            }
        }
    }

    /// Tear down: the image (to close) and the reply channel of a request in progress.
    pub fn shut_down(&mut self) -> (Option<OpenImage>, Option<Sender<Reply>>) {
        let reply = match std::mem::replace(&mut self.life, Lifecycle::Closed) {
            Lifecycle::Opening { reply, .. }
            | Lifecycle::Pausing { reply, .. }
            | Lifecycle::Resuming { reply, .. }
            | Lifecycle::Closing { reply, .. } => Some(reply),
            Lifecycle::Closed | Lifecycle::Open | Lifecycle::Paused { .. } => None,
        };
        (self.image.take(), reply)
    }

    /// The stuck-I/O watchdog (every tick): the time since the last progress when requests
    /// have been pending longer than `limit` (once per stall).
    pub fn stalled(&mut self, limit: Duration) -> Option<Duration> {
        if self.inflight == 0 {
            self.stalled_logged = false;
            return None;
        }
        let idle = self.last_progress.elapsed();
        if self.stalled_logged || idle <= limit {
            return None;
        }
        self.stalled_logged = true;
        Some(idle)
    }

    /// Start a guest request (from a ring or an NBD client) on the image: it counts in
    /// flight, so PAUSE and CLOSE wait for it, until [`end_io`](Self::end_io) is called with
    /// its completion. The only way the front doors submit guest I/O.
    pub(crate) fn begin_io(
        &mut self,
        io: &IoEngine<Tag>,
        door: Door,
        acct: IoAcct,
        op: Op,
    ) -> Result<(), NoImage> {
        let Some(img) = &self.image else {
            return Err(NoImage(self.minor));
        };
        if self.inflight == 0 {
            self.last_progress = std::time::Instant::now();
        }
        self.inflight += 1;
        let tag = Tag::Io {
            minor: self.minor,
            acct,
            door,
        };
        io.submit(tag, Arc::clone(&img.image), op);
        Ok(())
    }

    /// A request started by [`begin_io`](Self::begin_io) completed (`ok`: without error):
    /// no longer in flight, counted in the stats.
    pub(crate) fn end_io(&mut self, acct: IoAcct, ok: bool) {
        self.inflight = self.inflight.saturating_sub(1);
        self.last_progress = std::time::Instant::now();
        let dir = usize::from(acct.write);
        if ok {
            self.stats.hits[dir] += 1;
            if acct.write {
                self.stats.wr_secs += acct.sectors;
            } else {
                self.stats.rd_secs += acct.sectors;
            }
        } else {
            self.stats.fail[dir] += 1;
        }
    }

    /// The stats object in blktap's exact formatting (reference §3.1).
    pub fn stats_json(&self) -> String {
        self.stats_json_with(None)
    }

    /// As [`stats_json`](Self::stats_json), with the `"xenbus"` object of connected rings.
    pub fn stats_json_with(&self, xenbus: Option<&str>) -> String {
        let mut s = String::from("{ ");
        s += &format!("\"name\": {}, ", json_str(&self.params));
        s += &format!(
            "\"secs\": [ {}, {} ], ",
            self.stats.rd_secs, self.stats.wr_secs
        );
        s += "\"images\": [ ";
        if let Some(img) = &self.image {
            s += &img
                .image_stats(&self.stats)
                .iter()
                .map(ImageStats::json)
                .collect::<Vec<_>>()
                .join(", ");
            s += " ";
        }
        s += "], ";
        if let Some(x) = xenbus {
            s += &format!("\"xenbus\": {x}, ");
        }
        s += "\"FIXME_enospc_redirect_count\": 0, \"nbd_mirror_failed\": 0, ";
        s += &format!("\"reqs_outstanding\": {}, ", self.inflight);
        s += "\"read_caching\": \"false\" }";
        s
    }
}

/// A JSON string literal.
pub fn json_str(v: &str) -> String {
    let mut s = String::with_capacity(v.len() + 2);
    s.push('"');
    for c in v.chars() {
        match c {
            '"' => s += "\\\"",
            '\\' => s += "\\\\",
            '\n' => s += "\\n",
            c if (c as u32) < 0x20 => s += &format!("\\u{:04x}", c as u32),
            c => s.push(c),
        }
    }
    s.push('"');
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tapdisk::mem::MemImage;

    #[test]
    fn params_parse_and_errors() {
        assert_eq!(
            parse_params("aio:/x"),
            Ok((DiskType::Aio, PathBuf::from("/x")))
        );
        assert_eq!(
            parse_params("vhd:/a:b"),
            Ok((DiskType::Vhd, PathBuf::from("/a:b")))
        );
        let errno = |p: &str| parse_params(p).map_err(|e| e.errno());
        assert_eq!(errno("qcow:/x"), Err(libc::ENOSYS));
        assert_eq!(errno("foo:/x"), Err(libc::EINVAL));
        assert_eq!(errno("/x"), Err(libc::EINVAL));
        assert_eq!(errno("aio:"), Err(libc::EINVAL));
        assert_eq!(
            parse_params("sync:/x"),
            Err(ParamsError::Unimplemented("sync".into()))
        );
    }

    #[test]
    fn lifecycle_transitions_give_blktaps_list_bits() {
        let (tx, rx) = std::sync::mpsc::channel();
        let target = |p: &str| OpenTarget {
            params: p.into(),
            kind: DiskType::Aio,
            path: p.into(),
        };
        let image = || OpenImage {
            image: Arc::new(MemImage::new(8, false)),
            kind: DiskType::Aio,
            path: "/a".into(),
        };
        let info = DiskInfo {
            sectors: 8,
            sector_size: 512,
            info: 0,
        };
        let mut v = Vbd::new(2, None);
        assert_eq!(
            (v.wire_state(), v.is_busy(), v.is_open()),
            (VbdState::CLOSED, false, false)
        );
        v.begin_open(target("aio:/a"), OpenFlags::RDONLY.0, &tx);
        assert_eq!(
            (v.wire_state(), v.is_busy(), v.is_open()),
            (VbdState::CLOSED, true, false)
        );
        assert!(v.read_only());
        assert!(v.open_failed(false).is_some());
        assert_eq!((v.wire_state(), v.is_busy()), (VbdState::CLOSED, false));
        v.begin_open(target("aio:/a"), 0, &tx);
        assert!(v.open_succeeded(image(), info).is_some());
        assert_eq!((v.wire_state(), v.params()), (VbdState(0), "aio:/a"));
        assert!(v.accepts_io() && !v.is_busy());
        v.begin_pause(&tx);
        assert_eq!(v.wire_state(), VbdState::PAUSE_REQUESTED);
        assert!(!v.accepts_io() && v.is_busy());
        v.inflight = 1;
        assert!(matches!(v.drained(), Drained::Wait));
        v.inflight = 0;
        assert!(matches!(v.drained(), Drained::CloseImage(Some(_))));
        assert!(matches!(v.drained(), Drained::Wait), "closes once");
        assert!(matches!(v.image_closed(), Some((true, _))));
        assert_eq!((v.wire_state(), v.is_paused()), (VbdState::PAUSED, true));
        v.begin_resume(target("aio:/b"), &tx);
        assert_eq!((v.wire_state(), v.is_busy()), (VbdState::PAUSED, true));
        assert_eq!(v.opening(true).map(|t| t.params.as_str()), Some("aio:/b"));
        assert!(v.opening(false).is_none());
        assert!(v.open_failed(true).is_some());
        let failed = VbdState::PAUSED | VbdState::RESUME_FAILED;
        assert_eq!(v.wire_state(), failed);
        v.begin_close(&tx);
        assert_eq!(v.wire_state(), failed | VbdState::SHUTDOWN_REQUESTED);
        assert!(matches!(v.drained(), Drained::CloseImage(None)));
        assert!(matches!(v.image_closed(), Some((false, _))));
        assert_eq!(
            (v.wire_state(), v.params(), v.info()),
            (VbdState::CLOSED, "", None)
        );
        // A closed VBD has nothing to answer.
        assert!(v.image_closed().is_none() && v.open_failed(true).is_none());
        assert!(v.shut_down().1.is_none());
        // Tearing down a busy VBD gives back the reply channel of its request.
        v.begin_open(target("aio:/a"), 0, &tx);
        assert!(v.shut_down().1.is_some());
        assert_eq!(v.wire_state(), VbdState::CLOSED);
        drop(rx);
    }

    #[test]
    fn stats_json_has_blktap_shape() {
        let mut v = Vbd::new(3, None);
        v.params = "vhd:/p/leaf.vhd".into();
        v.life = Lifecycle::Open;
        v.image = Some(OpenImage {
            image: Arc::new(MemImage::new(8, false)),
            kind: DiskType::Vhd,
            path: "/p/leaf.vhd".into(),
        });
        v.stats = Stats {
            rd_secs: 8,
            wr_secs: 16,
            hits: [1, 2],
            fail: [0, 1],
        };
        assert_eq!(
            v.stats_json(),
            "{ \"name\": \"vhd:/p/leaf.vhd\", \"secs\": [ 8, 16 ], \"images\": [ { \"name\": \
             \"/p/leaf.vhd\", \"hits\": [ 1, 2 ], \"fail\": [ 0, 1 ], \"driver\": { \"type\": 4, \
             \"name\": \"vhd\", \"status\": null } } ], \"FIXME_enospc_redirect_count\": 0, \
             \"nbd_mirror_failed\": 0, \"reqs_outstanding\": 0, \"read_caching\": \"false\" }"
        );
        assert!(v.accepts_io());
        v.begin_pause(&std::sync::mpsc::channel().0);
        assert_eq!(v.wire_state(), VbdState::PAUSE_REQUESTED);
        assert!(!v.accepts_io());
        assert_eq!(json_str("a\"b\\\n"), "\"a\\\"b\\\\\\n\"");
    }

    #[test]
    fn stats_json_lists_the_whole_chain_leaf_first() {
        use crate::image::vhd::ops::{snapshot, SnapshotOptions};
        use crate::image::{open, ImageFormat, OpenOptions};
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join("base.raw");
        std::fs::write(&base, vec![0u8; 2 << 20]).unwrap();
        let mid = d.path().join("mid.vhd");
        let opts = SnapshotOptions {
            raw_parent: true,
            ..Default::default()
        };
        snapshot(&mid, &base, &opts).unwrap();
        let leaf = d.path().join("leaf.vhd");
        let exact = SnapshotOptions {
            link_exact: true,
            ..Default::default()
        };
        snapshot(&leaf, &mid, &exact).unwrap();
        let image = open(&leaf, ImageFormat::Vhd, &OpenOptions::default()).unwrap();
        let (b, m, l) = (base.display(), mid.display(), leaf.display());
        let mut v = Vbd::new(1, None);
        v.params = format!("vhd:{l}");
        v.life = Lifecycle::Open;
        v.image = Some(OpenImage {
            image: Arc::from(image),
            kind: DiskType::Vhd,
            path: leaf.clone(),
        });
        v.stats = Stats {
            rd_secs: 3,
            wr_secs: 5,
            hits: [7, 2],
            fail: [1, 0],
        };
        let img = |name: &std::path::Display<'_>, hits: &str, fail: &str, t: u32, n: &str| {
            format!(
                "{{ \"name\": \"{name}\", \"hits\": [ {hits} ], \"fail\": [ {fail} ], \
                 \"driver\": {{ \"type\": {t}, \"name\": \"{n}\", \"status\": null }} }}"
            )
        };
        let expect = format!(
            "{{ \"name\": \"vhd:{l}\", \"secs\": [ 3, 5 ], \"images\": [ {}, {}, {} ], \
             \"FIXME_enospc_redirect_count\": 0, \"nbd_mirror_failed\": 0, \
             \"reqs_outstanding\": 0, \"read_caching\": \"false\" }}",
            img(&l, "7, 2", "1, 0", 4, "vhd"),
            img(&m, "0, 0", "0, 0", 4, "vhd"),
            img(&b, "0, 0", "0, 0", 0, "aio"),
        );
        assert_eq!(v.stats_json(), expect);
        // Two deep: a VHD over a raw parent.
        let two = open(&mid, ImageFormat::Vhd, &OpenOptions::default()).unwrap();
        v.params = format!("vhd:{m}");
        v.image = Some(OpenImage {
            image: Arc::from(two),
            kind: DiskType::Vhd,
            path: mid.clone(),
        });
        let expect = format!(
            "{{ \"name\": \"vhd:{m}\", \"secs\": [ 3, 5 ], \"images\": [ {}, {} ], \
             \"FIXME_enospc_redirect_count\": 0, \"nbd_mirror_failed\": 0, \
             \"reqs_outstanding\": 0, \"read_caching\": \"false\" }}",
            img(&m, "7, 2", "1, 0", 4, "vhd"),
            img(&b, "0, 0", "0, 0", 0, "aio"),
        );
        assert_eq!(v.stats_json(), expect);
        // A raw leaf alone is one aio image.
        let raw = open(&base, ImageFormat::Raw, &OpenOptions::default()).unwrap();
        v.image = Some(OpenImage {
            image: Arc::from(raw),
            kind: DiskType::Aio,
            path: base.clone(),
        });
        let one = v.image.as_ref().unwrap().image_stats(&v.stats);
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].json(), img(&b, "7, 2", "1, 0", 0, "aio"));
    }
}
