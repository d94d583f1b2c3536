//! One vbd3 device: the XenbusState machine between blkfront and a tapdisk.
//!
//! [`Device::evaluate`] looks at the current frontend state and the device's keys and does
//! whatever is due; it is idempotent (it writes nothing when nothing changed), so every
//! trigger (a backend key written, the frontend state changing, a retry timer) simply calls
//! it again and the order in which keys arrive does not matter.
//!
//! | frontend state | action |
//! |---|---|
//! | absent, never seen | wait |
//! | absent after being seen (frontend vanished) | disconnect the ring, Closed (the dir stays: it is the toolstack's) |
//! | Unknown / InitWait | nothing |
//! | Initialising | clear a device error; disconnect a ring left over from a frontend reset; InitWait (unless `online = 0`) |
//! | Initialised / Connected | unless connected or failed or `online = 0`: locate the tapdisk, read and check the frontend's ring keys, disconnect a different ring connected before, XENBLKIF_CONNECT (`EALREADY` = fine), DISK_INFO, write the features in one transaction, Connected |
//! | Closing | Closing |
//! | Closed | XENBLKIF_DISCONNECT (a dead tapdisk is fine), Closed |
//! | Reconfiguring / Reconfigured | logged (EINVAL) |

use std::time::{Duration, Instant};

use crate::blkif::xenbus::{
    keys, negotiate_ring_order, parse_protocol, parse_uint, queue_prefix, ring_ref_key,
};
use crate::blkif::{Abi, XenbusState};
use crate::control::msg::{Blkif, BlkifProto, DiskInfo, MAX_RING_PAGES};
use crate::control::ControlError;
use crate::tapback::locate::{
    locate_tapdisk, LocatorKeys, TapLocation, TapdiskOps, KEY_PHYSICAL_DEVICE,
    KEY_PHYSICAL_DEVICE_PATH, KEY_TAPDISK_PARAMS,
};
use crate::tapback::{
    max_indirect_segments, BackendConfig, Result, TapbackError, DISCARD_GRANULARITY,
};
use crate::util::error_chain;
use crate::xen::xenstore::{transaction, Access, Perm, Tx, XenStore};
use crate::xen::DomId;

/// VDISK_* bits (`info`).
use crate::blkif::xenbus::vdisk;

/// A device: frontend domain and device id (the two last components of its directory).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId {
    pub domid: u16,
    pub devid: u32,
}

impl std::fmt::Display for DeviceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.domid, self.devid)
    }
}

/// A ring tapback connected to a tapdisk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RingConn {
    pub pid: i32,
    pub minor: u16,
    /// The blkif parameters it was connected with (queue 0's).
    pub blkif: Blkif,
    /// Queues connected (`multi-queue-num-queues`, 1 without it).
    pub queues: u32,
}

/// What a device looks like from outside (tests, logs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceStatus {
    /// The backend state tapback last wrote (`Unknown` before the first write).
    pub state: XenbusState,
    /// The connected ring, if any.
    pub ring: Option<RingConn>,
    /// The fatal error the device is stuck in until the frontend resets.
    pub failed: Option<String>,
    /// The last transient error (retried).
    pub pending: Option<String>,
    /// When the next retry is due.
    pub retry_at: Option<Instant>,
}

/// What the caller must do after an evaluation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Keep the device.
    Keep,
    /// The device is gone (its directory was removed): forget it.
    Remove,
}

/// Everything an evaluation needs besides the device itself.
pub struct Ctx<'a, X: XenStore + ?Sized, T: TapdiskOps + ?Sized> {
    pub xs: &'a X,
    pub tap: &'a T,
    pub cfg: &'a BackendConfig,
    /// The backend's own domain.
    pub self_dom: DomId,
}

/// First retry delay after a transient failure; doubles up to [`RETRY_MAX`].
pub const RETRY_INITIAL: Duration = Duration::from_millis(500);
/// Longest retry delay.
pub const RETRY_MAX: Duration = Duration::from_secs(10);

/// Watch token prefix of frontend state watches (`tapback-front-<domid>-<devid>`).
pub const FRONT_TOKEN_PREFIX: &str = "tapback-front-";

/// Errnos from a tapdisk that mean "it is gone" when disconnecting.
fn is_gone(errno: i32) -> bool {
    matches!(
        errno,
        libc::ESRCH | libc::ENOENT | libc::ENODEV | libc::ECONNREFUSED
    )
}

/// Errnos from a tapdisk that are worth retrying (busy, paused, restarting, slow).
fn is_transient(errno: i32) -> bool {
    matches!(
        errno,
        libc::ETIMEDOUT
            | libc::EBUSY
            | libc::EAGAIN
            | libc::EINTR
            | libc::ECONNREFUSED
            | libc::ENOENT
            | libc::ENODEV
            | libc::ESRCH
            | libc::EIO
            | libc::ENOMEM
    )
}

enum Step {
    Done,
    Removed,
}

/// The frontend's ring description, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FrontendRing {
    order: u32,
    /// Per queue: the ring's grant refs and event channel (one entry without multi-queue).
    queues: Vec<(Vec<u32>, u32)>,
    proto: BlkifProto,
}

/// One vbd3 device.
#[derive(Debug)]
pub struct Device {
    id: DeviceId,
    bpath: String,
    errpath: String,
    fpath: Option<String>,
    front_watch: Option<(String, String)>,
    frontend_seen: bool,
    advertised: bool,
    state: XenbusState,
    ring: Option<RingConn>,
    inherited: bool,
    failed: Option<String>,
    pending: Option<String>,
    retry_at: Option<Instant>,
    backoff: Duration,
    reconfig_logged: bool,
}

fn text(key: &str, v: Vec<u8>) -> Result<String> {
    String::from_utf8(v).map_err(|_| TapbackError::frontend(key, "not utf-8"))
}

impl Device {
    /// A device under `root` (`backend/<name>`). `inherited`: it existed before tapback
    /// started, so a ring may already be connected in its tapdisk.
    pub fn new(root: &str, id: DeviceId, inherited: bool) -> Device {
        let bpath = format!("{root}/{}/{}", id.domid, id.devid);
        Device {
            id,
            errpath: format!("error/{bpath}"),
            bpath,
            fpath: None,
            front_watch: None,
            frontend_seen: false,
            advertised: false,
            state: XenbusState::Unknown,
            ring: None,
            inherited,
            failed: None,
            pending: None,
            retry_at: None,
            backoff: RETRY_INITIAL,
            reconfig_logged: false,
        }
    }

    /// The device id.
    pub fn id(&self) -> DeviceId {
        self.id
    }

    /// The backend directory (relative to the backend domain).
    pub fn backend_path(&self) -> &str {
        &self.bpath
    }

    /// The frontend state watch token.
    pub fn front_token(&self) -> String {
        format!("{FRONT_TOKEN_PREFIX}{}-{}", self.id.domid, self.id.devid)
    }

    /// When a retry is due.
    pub fn retry_at(&self) -> Option<Instant> {
        self.retry_at
    }

    /// Externally visible state.
    pub fn status(&self) -> DeviceStatus {
        DeviceStatus {
            state: self.state,
            ring: self.ring.clone(),
            failed: self.failed.clone(),
            pending: self.pending.clone(),
            retry_at: self.retry_at,
        }
    }

    /// Run the state machine once.
    pub fn evaluate<X, T>(&mut self, cx: &Ctx<'_, X, T>, now: Instant) -> Outcome
    where
        X: XenStore + ?Sized,
        T: TapdiskOps + ?Sized,
    {
        match self.step(cx) {
            Ok(Step::Done) => {
                if let Some(p) = self.pending.take() {
                    log::info!("{}: recovered after: {p}", self.id);
                }
                self.retry_at = None;
                self.backoff = RETRY_INITIAL;
                Outcome::Keep
            }
            Ok(Step::Removed) => Outcome::Remove,
            Err(e) if e.is_fatal() => {
                self.fail(cx, &e);
                self.retry_at = None;
                Outcome::Keep
            }
            Err(e) => {
                let msg = error_chain(&e);
                if self.pending.as_deref() != Some(msg.as_str()) {
                    if matches!(e, TapbackError::NoTapdisk(_)) {
                        log::info!("{}: waiting: {msg}", self.id);
                    } else {
                        log::warn!("{}: {msg} (errno {}); will retry", self.id, e.errno());
                    }
                    self.pending = Some(msg);
                }
                self.retry_at = Some(now + self.backoff);
                self.backoff = (self.backoff * 2).min(RETRY_MAX);
                Outcome::Keep
            }
        }
    }

    /// The device directory is gone: drop the ring (a dead tapdisk is fine), the frontend
    /// watch and our error node.
    pub fn teardown<X, T>(&mut self, cx: &Ctx<'_, X, T>)
    where
        X: XenStore + ?Sized,
        T: TapdiskOps + ?Sized,
    {
        if let Err(e) = self.disconnect(cx) {
            log::error!(
                "{}: disconnect on removal failed: {}",
                self.id,
                error_chain(&e)
            );
        }
        self.unwatch_front(cx);
        let _ = cx.xs.rm(Tx::NONE, &self.errpath);
        log::info!("{}: removed", self.id);
    }

    fn unwatch_front<X: XenStore + ?Sized, T: TapdiskOps + ?Sized>(&mut self, cx: &Ctx<'_, X, T>) {
        if let Some((path, token)) = self.front_watch.take() {
            if let Err(e) = cx.xs.unwatch(&path, &token) {
                log::debug!("{}: unwatch {path}: {}", self.id, error_chain(&e));
            }
        }
    }

    fn perms(&self, cx_self: DomId) -> [Perm; 2] {
        [
            Perm {
                dom: cx_self,
                access: Access::None,
            },
            Perm {
                dom: DomId(self.id.domid),
                access: Access::Read,
            },
        ]
    }

    fn bkey(&self, key: &str) -> String {
        format!("{}/{key}", self.bpath)
    }

    fn read_b<X: XenStore + ?Sized>(&self, xs: &X, key: &str) -> Result<Option<String>> {
        match xs.read(Tx::NONE, &self.bkey(key))? {
            None => Ok(None),
            Some(v) => String::from_utf8(v)
                .map(|s| Some(s.trim_end_matches('\0').trim().to_owned()))
                .map_err(|_| TapbackError::config(key, "not utf-8")),
        }
    }

    fn read_f<X: XenStore + ?Sized>(&self, xs: &X, key: &str) -> Result<Option<String>> {
        let Some(f) = &self.fpath else {
            return Ok(None);
        };
        match xs.read(Tx::NONE, &format!("{f}/{key}"))? {
            None => Ok(None),
            Some(v) => text(key, v).map(Some),
        }
    }

    /// Write `B/state` unless already there; `false` if the device directory is gone.
    fn switch<X: XenStore + ?Sized>(&mut self, xs: &X, s: XenbusState) -> Result<bool> {
        if self.state == s {
            return Ok(true);
        }
        let b = &self.bpath;
        let key = format!("{b}/{}", keys::STATE);
        let alive = transaction(xs, |tx| {
            if xs.read(tx, b)?.is_none() {
                return Ok(false);
            }
            // Rewriting the state it already has (a restarted tapback taking over a
            // connected device) would fire blkfront's watch for nothing: Linux takes a
            // Connected written again as a capacity change and revalidates the disk.
            if xs.read(tx, &key)?.as_deref() != Some(s.as_str().as_bytes()) {
                xs.write(tx, &key, s.as_str().as_bytes())?;
            }
            Ok(true)
        })?;
        if alive {
            log::info!("{}: backend state {:?} -> {:?}", self.id, self.state, s);
            self.state = s;
        }
        Ok(alive)
    }

    fn step<X, T>(&mut self, cx: &Ctx<'_, X, T>) -> Result<Step>
    where
        X: XenStore + ?Sized,
        T: TapdiskOps + ?Sized,
    {
        if self.fpath.is_none() {
            let f = self
                .read_b(cx.xs, keys::FRONTEND)?
                .ok_or_else(|| TapbackError::config(keys::FRONTEND, "missing"))?;
            let ok = f.starts_with('/')
                && f.len() < 3072
                && f.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"/_-@".contains(&b));
            if !ok {
                return Err(TapbackError::config(
                    keys::FRONTEND,
                    format!("bad path {f:?}"),
                ));
            }
            // The ring refs and event channel are read there and handed to tapdisk as
            // this device's domain's: another domain's directory is not this device's
            // frontend.
            let home = format!("/local/domain/{}/", self.id.domid);
            if !f.starts_with(&home) {
                return Err(TapbackError::config(
                    keys::FRONTEND,
                    format!("{f:?} is not domain {}'s", self.id.domid),
                ));
            }
            let wpath = format!("{f}/{}", keys::STATE);
            let token = self.front_token();
            cx.xs.watch(&wpath, &token)?;
            self.front_watch = Some((wpath, token));
            self.fpath = Some(f);
        }
        // Checked every time (not just once) so that a device directory the toolstack
        // removed and re-created between two of our looks is advertised again.
        let order = cx.cfg.max_ring_order.to_string();
        let queues = cx.cfg.max_queues.to_string();
        if !self.advertised
            || self.read_b(cx.xs, keys::MAX_RING_PAGE_ORDER)?.as_deref() != Some(order.as_str())
            || self.read_b(cx.xs, keys::MULTI_QUEUE_MAX_QUEUES)?.as_deref() != Some(queues.as_str())
        {
            let adverts = [
                (self.bkey(keys::MAX_RING_PAGE_ORDER), order),
                (self.bkey(keys::MULTI_QUEUE_MAX_QUEUES), queues),
            ];
            let perms = self.perms(cx.self_dom);
            let b = &self.bpath;
            let alive = transaction(cx.xs, |tx| {
                if cx.xs.read(tx, b)?.is_none() {
                    return Ok(false);
                }
                for (key, v) in &adverts {
                    cx.xs.write(tx, key, v.as_bytes())?;
                    cx.xs.set_perms(tx, key, &perms)?;
                }
                Ok(true)
            })?;
            if !alive {
                return Ok(Step::Removed);
            }
            self.advertised = true;
        }
        let fstate = match self.read_f(cx.xs, keys::STATE)? {
            None if self.frontend_seen => return self.frontend_vanished(cx),
            None => return Ok(Step::Done),
            Some(s) => {
                self.frontend_seen = true;
                match XenbusState::parse(&s) {
                    Ok(st) => st,
                    Err(_) => {
                        log::warn!("{}: frontend state {s:?} is not a state (EINVAL)", self.id);
                        XenbusState::Unknown
                    }
                }
            }
        };
        let online = self.read_b(cx.xs, "online")?.as_deref() != Some("0");
        log::debug!(
            "{}: frontend {fstate:?}, backend {:?}, online {online}",
            self.id,
            self.state
        );
        let alive = match fstate {
            XenbusState::Unknown | XenbusState::InitWait => true,
            XenbusState::Initialising => {
                if self.failed.take().is_some() {
                    let _ = cx.xs.rm(Tx::NONE, &self.errpath);
                    log::info!("{}: frontend reset; error cleared", self.id);
                }
                self.reconfig_logged = false;
                if self.ring.is_some() || self.inherited {
                    // The frontend started over without closing: the old ring is stale.
                    self.disconnect(cx)?;
                }
                if !online {
                    return Ok(Step::Done);
                }
                self.switch(cx.xs, XenbusState::InitWait)?
            }
            XenbusState::Initialised | XenbusState::Connected => {
                if self.failed.is_some()
                    || !online
                    || (self.state == XenbusState::Connected && self.ring.is_some())
                {
                    return Ok(Step::Done);
                }
                if self.inherited && fstate == XenbusState::Initialised {
                    // Published a new ring while we were away: whatever tapdisk still has
                    // for this device is stale.
                    self.disconnect(cx)?;
                }
                self.connect(cx)?
            }
            XenbusState::Closing => self.switch(cx.xs, XenbusState::Closing)?,
            XenbusState::Closed => {
                if self.ring.is_some() || (self.inherited && self.state != XenbusState::Closed) {
                    self.disconnect(cx)?;
                }
                self.switch(cx.xs, XenbusState::Closed)?
            }
            XenbusState::Reconfiguring | XenbusState::Reconfigured => {
                if !self.reconfig_logged {
                    log::error!(
                        "{}: frontend state {fstate:?} not supported (EINVAL)",
                        self.id
                    );
                    self.reconfig_logged = true;
                }
                true
            }
        };
        Ok(if alive { Step::Done } else { Step::Removed })
    }

    /// Disconnect the ring, if tapdisk has one for us. A tapdisk that is gone is fine.
    fn disconnect<X, T>(&mut self, cx: &Ctx<'_, X, T>) -> Result<()>
    where
        X: XenStore + ?Sized,
        T: TapdiskOps + ?Sized,
    {
        let pid = match &self.ring {
            Some(r) => r.pid,
            None if self.inherited => match self.locate(cx) {
                Ok(loc) => loc.pid,
                Err(_) => {
                    self.inherited = false;
                    return Ok(());
                }
            },
            None => return Ok(()),
        };
        match cx
            .tap
            .disconnect(pid, u32::from(self.id.domid), self.id.devid)
        {
            Ok(()) => log::info!("{}: ring disconnected from tapdisk {pid}", self.id),
            Err(e) if is_gone(e.errno()) => {
                log::info!(
                    "{}: tapdisk {pid} has no ring for us: {}",
                    self.id,
                    error_chain(&e)
                )
            }
            Err(e) => return Err(e.into()),
        }
        self.ring = None;
        self.inherited = false;
        Ok(())
    }

    fn locate<X, T>(&self, cx: &Ctx<'_, X, T>) -> Result<TapLocation>
    where
        X: XenStore + ?Sized,
        T: TapdiskOps + ?Sized,
    {
        let keys = LocatorKeys {
            physical_device_path: self.read_b(cx.xs, KEY_PHYSICAL_DEVICE_PATH)?,
            physical_device: self.read_b(cx.xs, KEY_PHYSICAL_DEVICE)?,
            tapdisk_params: self.read_b(cx.xs, KEY_TAPDISK_PARAMS)?,
        };
        locate_tapdisk(cx.tap, &keys)
    }

    fn read_frontend_ring<X: XenStore + ?Sized>(
        &self,
        xs: &X,
        max_order: u32,
        max_queues: u32,
    ) -> Result<FrontendRing> {
        let order_v = self.read_f(xs, keys::RING_PAGE_ORDER)?;
        let order = negotiate_ring_order(order_v.as_deref(), max_order)
            .map_err(|e| TapbackError::frontend(keys::RING_PAGE_ORDER, e.to_string()))?;
        let nq = match self.read_f(xs, keys::MULTI_QUEUE_NUM_QUEUES)? {
            None => 1,
            Some(v) => {
                let key = keys::MULTI_QUEUE_NUM_QUEUES;
                let n = parse_uint::<u32>(&v)
                    .map_err(|e| TapbackError::frontend(key, e.to_string()))?;
                if n == 0 || n > max_queues {
                    return Err(TapbackError::frontend(
                        key,
                        format!("{n} queues (1..={max_queues} advertised)"),
                    ));
                }
                n
            }
        };
        let mut queues = Vec::with_capacity(nq as usize);
        for q in 0..nq {
            let pre = queue_prefix(nq, q);
            let mut refs = Vec::with_capacity(1 << order);
            for i in 0..(1u32 << order) {
                let key = format!("{pre}{}", ring_ref_key(order, i));
                let v = self
                    .read_f(xs, &key)?
                    .ok_or_else(|| TapbackError::frontend(&key, "missing"))?;
                let r = parse_uint::<u32>(&v)
                    .map_err(|e| TapbackError::frontend(&key, e.to_string()))?;
                refs.push(r);
            }
            let key = format!("{pre}{}", keys::EVENT_CHANNEL);
            let v = self
                .read_f(xs, &key)?
                .ok_or_else(|| TapbackError::frontend(&key, "missing"))?;
            let port =
                parse_uint::<u32>(&v).map_err(|e| TapbackError::frontend(&key, e.to_string()))?;
            if port == 0 {
                return Err(TapbackError::frontend(&key, "port 0"));
            }
            queues.push((refs, port));
        }
        let proto = match parse_protocol(self.read_f(xs, keys::PROTOCOL)?.as_deref()) {
            Ok(Abi::X86_32) => BlkifProto::X86_32,
            Ok(Abi::X86_64) => BlkifProto::X86_64,
            Err(e) => {
                return Err(TapbackError::Frontend {
                    key: keys::PROTOCOL.to_owned(),
                    reason: e.to_string(),
                    errno: libc::EPROTONOSUPPORT,
                })
            }
        };
        if let Some(v) = self.read_f(xs, keys::FEATURE_PERSISTENT)? {
            match v.trim_end_matches('\0').trim() {
                "0" | "1" => {}
                _ => {
                    return Err(TapbackError::frontend(
                        keys::FEATURE_PERSISTENT,
                        format!("{v:?} is not 0 or 1"),
                    ))
                }
            }
        }
        Ok(FrontendRing {
            order,
            queues,
            proto,
        })
    }

    /// `(read_only, cdrom)` from `B/mode` and `device-type` (backend first, then frontend;
    /// absent = disk).
    fn read_mode<X: XenStore + ?Sized>(&self, xs: &X) -> Result<(bool, bool)> {
        let ro = match self.read_b(xs, keys::MODE)?.as_deref() {
            Some("r") => true,
            Some("w") => false,
            Some(other) => {
                return Err(TapbackError::config(
                    keys::MODE,
                    format!("{other:?} is not r or w"),
                ))
            }
            None => return Err(TapbackError::config(keys::MODE, "missing")),
        };
        let (dt, from_frontend) = match self.read_b(xs, keys::DEVICE_TYPE)? {
            Some(v) => (Some(v), false),
            None => (self.read_f(xs, keys::DEVICE_TYPE)?, true),
        };
        let cdrom = match dt.as_deref().map(|s| s.trim_end_matches('\0').trim()) {
            None | Some("disk") => false,
            Some("cdrom") => true,
            Some(other) => {
                let reason = format!("{other:?} is not disk or cdrom");
                return Err(if from_frontend {
                    TapbackError::Frontend {
                        key: keys::DEVICE_TYPE.to_owned(),
                        reason,
                        errno: libc::EOPNOTSUPP,
                    }
                } else {
                    TapbackError::Config {
                        key: keys::DEVICE_TYPE.to_owned(),
                        reason,
                        errno: libc::EOPNOTSUPP,
                    }
                });
            }
        };
        Ok((ro, cdrom))
    }

    fn optional_u32<X: XenStore + ?Sized>(&self, xs: &X, key: &str) -> Result<u32> {
        Ok(match self.read_b(xs, key)? {
            None => 0,
            Some(v) => parse_uint::<u32>(&v).unwrap_or_else(|_| {
                log::warn!("{}: ignoring bad {key} {v:?}", self.id);
                0
            }),
        })
    }

    /// Connect the ring and advertise the disk. `Ok(false)`: the device directory is gone.
    fn connect<X, T>(&mut self, cx: &Ctx<'_, X, T>) -> Result<bool>
    where
        X: XenStore + ?Sized,
        T: TapdiskOps + ?Sized,
    {
        let loc = self.locate(cx)?;
        let ring = self.read_frontend_ring(cx.xs, cx.cfg.max_ring_order, cx.cfg.max_queues)?;
        let (read_only, cdrom) = self.read_mode(cx.xs)?;
        let poll_duration = self.optional_u32(cx.xs, "polling-duration")?;
        let poll_idle_threshold = self.optional_u32(cx.xs, "polling-idle-threshold")?;
        let nq = ring.queues.len() as u32;
        let blkifs: Vec<Blkif> = ring
            .queues
            .iter()
            .enumerate()
            .map(|(q, (refs, port))| {
                let mut gref = [0u32; MAX_RING_PAGES];
                for (slot, r) in gref.iter_mut().zip(refs) {
                    *slot = *r;
                }
                Blkif {
                    domid: u32::from(self.id.domid),
                    devid: self.id.devid,
                    gref,
                    order: ring.order,
                    proto: ring.proto,
                    pool: String::new(),
                    port: *port,
                    poll_duration,
                    poll_idle_threshold,
                    queue: q as u32,
                }
            })
            .collect();
        if let (Some(old), Some(new0)) = (self.ring.as_ref(), blkifs.first()) {
            if old.blkif != *new0
                || old.queues != nq
                || (old.pid, old.minor) != (loc.pid, loc.minor)
            {
                // We connected a different ring before (the frontend went Closing and straight
                // back to Initialised with a new one): disconnect it first, or tapdisk answers
                // EALREADY and keeps serving the stale ring.
                self.disconnect(cx)?;
            }
        }
        let mut first = None;
        for (q, blkif) in blkifs.into_iter().enumerate() {
            let port = blkif.port;
            match cx.tap.connect(loc.pid, loc.minor, &blkif) {
                Ok(()) => {
                    // "ring (order" for one queue (what the e2e tests look for), "ring Q/N
                    // (order" for each queue of a multi-queue device.
                    let which = if nq > 1 {
                        format!("ring {q}/{nq}")
                    } else {
                        "ring".to_owned()
                    };
                    log::info!(
                        "{}: {which} (order {}, port {port}, {:?}) connected to tapdisk {} \
                         minor {} (via {})",
                        self.id,
                        ring.order,
                        ring.proto,
                        loc.pid,
                        loc.minor,
                        loc.source
                    )
                }
                Err(e) if e.errno() == libc::EALREADY => log::info!(
                    "{}: tapdisk {} minor {} already has our ring {q}",
                    self.id,
                    loc.pid,
                    loc.minor
                ),
                Err(e) => {
                    if q > 0 {
                        // Do not leave a device half connected: its first queues go too.
                        if let Err(d) =
                            cx.tap
                                .disconnect(loc.pid, u32::from(self.id.domid), self.id.devid)
                        {
                            log::warn!(
                                "{}: disconnecting queues 0..{q}: {}",
                                self.id,
                                error_chain(&d)
                            );
                        }
                    }
                    return Err(connect_error(e));
                }
            }
            first.get_or_insert(blkif);
        }
        let Some(blkif) = first else {
            return Err(TapbackError::frontend(keys::EVENT_CHANNEL, "no queue"));
        };
        self.ring = Some(RingConn {
            pid: loc.pid,
            minor: loc.minor,
            blkif,
            queues: nq,
        });
        self.inherited = false;
        let info = cx.tap.disk_info(loc.pid, loc.minor)?;
        let adv = Advert::new(&info, read_only, cdrom, cx, self, &loc)?;
        let perms = self.perms(cx.self_dom);
        let b = &self.bpath;
        let alive = transaction(cx.xs, |tx| {
            if cx.xs.read(tx, b)?.is_none() {
                return Ok(false);
            }
            for (k, v) in &adv.keys {
                let p = format!("{b}/{k}");
                cx.xs.write(tx, &p, v.as_bytes())?;
                cx.xs.set_perms(tx, &p, &perms)?;
            }
            Ok(true)
        })?;
        if !alive {
            return Ok(false);
        }
        self.switch(cx.xs, XenbusState::Connected)
    }

    fn frontend_vanished<X, T>(&mut self, cx: &Ctx<'_, X, T>) -> Result<Step>
    where
        X: XenStore + ?Sized,
        T: TapdiskOps + ?Sized,
    {
        // Like OpenXT's tapback (and unlike XenServer's, which removed the backend dir):
        // the directory is the toolstack's. libxl reads `tapdisk-params` from it to destroy
        // the tapdisk, and waits for Closed when it removes the device.
        log::info!(
            "{}: frontend vanished; ring disconnected, backend Closed",
            self.id
        );
        self.disconnect(cx)?;
        self.frontend_seen = false;
        let alive = self.switch(cx.xs, XenbusState::Closed)?;
        Ok(if alive { Step::Done } else { Step::Removed })
    }

    /// The frontend gave us garbage: record why, go to Closing, connect nothing.
    fn fail<X, T>(&mut self, cx: &Ctx<'_, X, T>, e: &TapbackError)
    where
        X: XenStore + ?Sized,
        T: TapdiskOps + ?Sized,
    {
        let msg = error_chain(e);
        log::error!("{}: {msg} (errno {}); device failed", self.id, e.errno());
        let node = format!("{}/error", self.errpath);
        if let Err(we) = cx
            .xs
            .write(Tx::NONE, &node, format!("{} {msg}", e.errno()).as_bytes())
        {
            log::warn!("{}: cannot record the error: {we}", self.id);
        }
        self.failed = Some(msg);
        self.pending = None;
        if let Err(se) = self.switch(cx.xs, XenbusState::Closing) {
            log::warn!("{}: cannot switch to Closing: {se}", self.id);
        }
    }
}

fn connect_error(e: ControlError) -> TapbackError {
    let errno = e.errno();
    if is_transient(errno) {
        TapbackError::Control(e)
    } else {
        // tapdisk refused the ring itself (bad grant refs, bad port, ...): the frontend's
        // values are unusable.
        TapbackError::Frontend {
            key: "ring".to_owned(),
            reason: format!("tapdisk refused the ring: {}", error_chain(&e)),
            errno,
        }
    }
}

/// The keys written when connecting, in write order.
struct Advert {
    keys: Vec<(&'static str, String)>,
}

impl Advert {
    fn new<X: XenStore + ?Sized, T: TapdiskOps + ?Sized>(
        info: &DiskInfo,
        read_only: bool,
        cdrom: bool,
        cx: &Ctx<'_, X, T>,
        dev: &Device,
        loc: &TapLocation,
    ) -> Result<Advert> {
        let bad = |reason: String| TapbackError::BadTapdisk {
            pid: loc.pid,
            minor: loc.minor,
            reason,
        };
        let ss = info.sector_size;
        if ss < 512 || !ss.is_multiple_of(512) || ss > 65536 {
            return Err(bad(format!("sector size {ss}")));
        }
        // `sectors` is always in 512-byte units for blkfront.
        let sectors = info
            .sectors
            .checked_mul(u64::from(ss / 512))
            .ok_or_else(|| bad(format!("{} sectors of {ss} bytes overflow", info.sectors)))?;
        let ro = read_only || info.info & vdisk::READONLY != 0;
        let mut bits = 0;
        if cdrom {
            bits |= vdisk::CDROM;
        }
        if ro {
            bits |= vdisk::READONLY;
        }
        let discard_enabled = dev.read_b(cx.xs, "discard-enable")?.as_deref() != Some("0");
        let discard = discard_enabled && !ro && !cdrom;
        let flag = |b: bool| if b { "1" } else { "0" }.to_owned();
        let mut keys = vec![
            (keys::SECTORS, sectors.to_string()),
            (keys::SECTOR_SIZE, ss.to_string()),
            (keys::PHYSICAL_SECTOR_SIZE, ss.to_string()),
            (keys::INFO, bits.to_string()),
            (keys::FEATURE_BARRIER, flag(cx.cfg.barrier)),
            (keys::FEATURE_FLUSH_CACHE, flag(true)),
            (keys::FEATURE_DISCARD, flag(discard)),
        ];
        if discard {
            keys.push((keys::DISCARD_GRANULARITY, DISCARD_GRANULARITY.to_string()));
            keys.push((keys::DISCARD_ALIGNMENT, "0".to_owned()));
            keys.push(("discard-secure", "0".to_owned()));
        }
        keys.push((
            keys::FEATURE_MAX_INDIRECT_SEGMENTS,
            max_indirect_segments().to_string(),
        ));
        keys.push(("kthread-pid", loc.pid.to_string()));
        Ok(Advert { keys })
    }
}
