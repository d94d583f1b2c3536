//! The device set of one tapback instance: watch dispatch, scans and retry timers.
//!
//! [`Backend::new`] reads the backend's own domain id (`domid`, absent = 0), watches
//! `backend/<name>` (or `backend/<name>/<domid>` with `-x`) and scans it; devices found
//! then are "inherited" (a previous tapback may have connected their rings). After that the
//! caller feeds it watch events ([`Backend::handle_events`]) and timer ticks
//! ([`Backend::tick`]) until it exits.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::blkif::xenbus::parse_uint;
use crate::tapback::device::{Ctx, Device, DeviceId, DeviceStatus, Outcome, FRONT_TOKEN_PREFIX};
use crate::tapback::locate::TapdiskOps;
use crate::tapback::{Result, TapbackError, DEFAULT_MAX_QUEUES, DEFAULT_NAME, MAX_RING_ORDER};
use crate::util::error_chain;
use crate::xen::xenstore::{Tx, WatchEvent, XenStore, XsError};
use crate::xen::DomId;

/// Token of the watch on the backend root.
pub const ROOT_TOKEN: &str = "tapback-master-back";

/// What a tapback instance serves and advertises.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendConfig {
    /// Backend type name (`-n`, default `vbd3`).
    pub name: String,
    /// Serve only this frontend domain (`-x`).
    pub only_domid: Option<u16>,
    /// Advertise `feature-barrier=1` (`-b` clears it).
    pub barrier: bool,
    /// `max-ring-page-order` to advertise (and accept).
    pub max_ring_order: u32,
    /// `multi-queue-max-queues` to advertise (and accept), 1..=[`MAX_QUEUES`](crate::control::msg::MAX_QUEUES).
    pub max_queues: u32,
}

impl Default for BackendConfig {
    fn default() -> Self {
        BackendConfig {
            name: DEFAULT_NAME.to_owned(),
            only_domid: None,
            barrier: true,
            max_ring_order: MAX_RING_ORDER,
            max_queues: DEFAULT_MAX_QUEUES,
        }
    }
}

/// Whether `name` is usable as one xenstore path component.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-".contains(&b))
}

/// The tapback core, generic over the xenstore and the tapdisk operations.
#[derive(Debug)]
pub struct Backend<X: XenStore, T: TapdiskOps> {
    xs: X,
    tap: T,
    cfg: BackendConfig,
    self_dom: DomId,
    /// `backend/<name>`.
    base: String,
    /// What is watched: `base` or `base/<domid>`.
    root: String,
    devices: BTreeMap<DeviceId, Device>,
    /// [`Backend::handle_events`] stopped with events possibly still queued.
    more_events: bool,
    /// A scan failed: scan everything again then (the events it stood for are gone, and
    /// some may have been folded into it by the xenstore client).
    rescan_at: Option<Instant>,
}

/// How long after a failed scan the next one runs.
const RESCAN_DELAY: Duration = Duration::from_secs(1);

/// Event batches [`Backend::handle_events`] handles before returning to its caller (so that
/// a flood of watch events cannot keep the caller from its timers and signals).
pub const MAX_EVENT_BATCHES: usize = 16;

enum Work {
    ScanAll,
    ScanDomain(u16),
    Device(DeviceId),
}

impl<X: XenStore, T: TapdiskOps> Backend<X, T> {
    /// Read our domid, watch the backend root and take over the devices already there.
    pub fn new(xs: X, tap: T, cfg: BackendConfig, now: Instant) -> Result<Self> {
        if !valid_name(&cfg.name) {
            return Err(TapbackError::Usage(format!(
                "bad backend name {:?}",
                cfg.name
            )));
        }
        let self_dom = match xs.read(Tx::NONE, "domid")? {
            None => DomId(0),
            Some(v) => {
                let s = String::from_utf8_lossy(&v).into_owned();
                DomId(
                    parse_uint::<u16>(&s)
                        .map_err(|_| TapbackError::config("domid", format!("bad value {s:?}")))?,
                )
            }
        };
        let base = format!("backend/{}", cfg.name);
        let root = match cfg.only_domid {
            Some(d) => format!("{base}/{d}"),
            None => base.clone(),
        };
        xs.watch(&root, ROOT_TOKEN)?;
        log::info!(
            "tapback: domain {}, watching {root}, max-ring-page-order {}, \
             multi-queue-max-queues {}, barrier {}",
            self_dom.0,
            cfg.max_ring_order,
            cfg.max_queues,
            cfg.barrier
        );
        let mut b = Backend {
            xs,
            tap,
            cfg,
            self_dom,
            base,
            root,
            devices: BTreeMap::new(),
            more_events: false,
            rescan_at: None,
        };
        b.run(vec![Work::ScanAll], true, now);
        Ok(b)
    }

    /// Our own domain id.
    pub fn self_dom(&self) -> DomId {
        self.self_dom
    }

    /// The xenstore connection.
    pub fn xs(&self) -> &X {
        &self.xs
    }

    /// The tapdisk operations.
    pub fn tapdisks(&self) -> &T {
        &self.tap
    }

    /// The configuration.
    pub fn config(&self) -> &BackendConfig {
        &self.cfg
    }

    /// Known devices.
    pub fn devices(&self) -> Vec<DeviceId> {
        self.devices.keys().copied().collect()
    }

    /// One device's state.
    pub fn device(&self, id: DeviceId) -> Option<DeviceStatus> {
        self.devices.get(&id).map(Device::status)
    }

    /// The earliest retry due.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.devices
            .values()
            .filter_map(Device::retry_at)
            .chain(self.rescan_at)
            .min()
    }

    /// Take and handle watch events until none are queued, or [`MAX_EVENT_BATCHES`] batches
    /// (then [`Backend::more_events`] says so). Returns how many were handled.
    pub fn handle_events(&mut self, now: Instant) -> Result<usize> {
        let mut total = 0;
        self.more_events = true;
        for _ in 0..MAX_EVENT_BATCHES {
            let evs = self.xs.take_watch_events()?;
            if evs.is_empty() {
                self.more_events = false;
                break;
            }
            total += evs.len();
            self.handle(&evs, now);
        }
        Ok(total)
    }

    /// Whether the last [`Backend::handle_events`] left events to handle (poll without
    /// waiting: some may be queued in the client, where polling its fd does not see them).
    pub fn more_events(&self) -> bool {
        self.more_events
    }

    /// Handle a batch of watch events.
    pub fn handle(&mut self, evs: &[WatchEvent], now: Instant) {
        let mut work = Vec::new();
        for ev in evs {
            if let Some(w) = self.classify(ev) {
                work.push(w);
            }
        }
        self.run(work, false, now);
    }

    /// Re-evaluate every device whose retry is due.
    pub fn tick(&mut self, now: Instant) {
        let mut due: Vec<Work> = self
            .devices
            .values()
            .filter(|d| d.retry_at().is_some_and(|t| t <= now))
            .map(|d| Work::Device(d.id()))
            .collect();
        if self.rescan_at.is_some_and(|t| t <= now) {
            self.rescan_at = None;
            due.push(Work::ScanAll);
        }
        self.run(due, false, now);
    }

    fn relative<'a>(&self, path: &'a str) -> &'a str {
        let home = format!("/local/domain/{}/", self.self_dom.0);
        path.strip_prefix(home.as_str()).unwrap_or(path)
    }

    fn classify(&self, ev: &WatchEvent) -> Option<Work> {
        if ev.token == ROOT_TOKEN {
            let rel = self.relative(&ev.path);
            let rest = rel.strip_prefix(self.base.as_str())?;
            if rest.is_empty() {
                return Some(Work::ScanAll);
            }
            let mut comps = rest.strip_prefix('/')?.split('/');
            let domid = comps.next().and_then(|d| parse_uint::<u16>(d).ok())?;
            if self.cfg.only_domid.is_some_and(|x| x != domid) {
                return None;
            }
            return match comps.next() {
                None => Some(Work::ScanDomain(domid)),
                Some(v) => parse_uint::<u32>(v)
                    .ok()
                    .map(|devid| Work::Device(DeviceId { domid, devid })),
            };
        }
        let rest = ev.token.strip_prefix(FRONT_TOKEN_PREFIX)?;
        let (d, v) = rest.split_once('-')?;
        Some(Work::Device(DeviceId {
            domid: parse_uint(d).ok()?,
            devid: parse_uint(v).ok()?,
        }))
    }

    /// The device ids present in xenstore under `domid` (empty if the directory is gone).
    fn list_domain(&self, domid: u16) -> Result<Vec<DeviceId>> {
        let dir = format!("{}/{domid}", self.base);
        let names = match self.xs.directory(Tx::NONE, &dir) {
            Ok(n) => n,
            Err(XsError::Errno(nix::errno::Errno::ENOENT)) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        Ok(names
            .iter()
            .filter_map(|n| match parse_uint::<u32>(n) {
                Ok(devid) => Some(DeviceId { domid, devid }),
                Err(_) => {
                    log::warn!("ignoring {dir}/{n}: not a device id");
                    None
                }
            })
            .collect())
    }

    fn list_domains(&self) -> Result<Vec<u16>> {
        if let Some(d) = self.cfg.only_domid {
            return Ok(vec![d]);
        }
        let names = match self.xs.directory(Tx::NONE, &self.base) {
            Ok(n) => n,
            Err(XsError::Errno(nix::errno::Errno::ENOENT)) => return Ok(Vec::new()),
            Err(e) => return Err(e.into()),
        };
        Ok(names
            .iter()
            .filter_map(|n| parse_uint::<u16>(n).ok())
            .collect())
    }

    /// Reconcile the device set with a scan of `domains` (`None` = all).
    fn scan(&mut self, domains: Option<Vec<u16>>, dirty: &mut BTreeSet<DeviceId>) -> Result<()> {
        let (domains, all) = match domains {
            Some(d) => (d, false),
            None => (self.list_domains()?, true),
        };
        let mut present = BTreeSet::new();
        for d in &domains {
            present.extend(self.list_domain(*d)?);
        }
        let gone: Vec<DeviceId> = self
            .devices
            .keys()
            .filter(|id| (all || domains.contains(&id.domid)) && !present.contains(id))
            .copied()
            .collect();
        dirty.extend(gone);
        dirty.extend(present);
        Ok(())
    }

    fn run(&mut self, work: Vec<Work>, inherited: bool, now: Instant) {
        let mut dirty = BTreeSet::new();
        let mut scan_all = false;
        let mut scan_doms = BTreeSet::new();
        for w in work {
            match w {
                Work::ScanAll => scan_all = true,
                Work::ScanDomain(d) => {
                    scan_doms.insert(d);
                }
                Work::Device(id) => {
                    dirty.insert(id);
                }
            }
        }
        let scanned = if scan_all {
            self.scan(None, &mut dirty)
        } else if !scan_doms.is_empty() {
            self.scan(Some(scan_doms.into_iter().collect()), &mut dirty)
        } else {
            Ok(())
        };
        if let Err(e) = scanned {
            log::error!(
                "scan of {} failed: {} (again in {}s)",
                self.root,
                error_chain(&e),
                RESCAN_DELAY.as_secs()
            );
            self.rescan_at = Some(now + RESCAN_DELAY);
        }
        for id in dirty {
            self.refresh(id, inherited, now);
        }
    }

    /// Bring one device up to date: create, evaluate or tear down.
    fn refresh(&mut self, id: DeviceId, inherited: bool, now: Instant) {
        if self.cfg.only_domid.is_some_and(|x| x != id.domid) {
            return;
        }
        let path = format!("{}/{}/{}", self.base, id.domid, id.devid);
        let exists = match self.xs.read(Tx::NONE, &path) {
            Ok(v) => v.is_some(),
            Err(e) => {
                log::warn!("{id}: cannot read {path}: {}", error_chain(&e));
                return;
            }
        };
        let cx = Ctx {
            xs: &self.xs,
            tap: &self.tap,
            cfg: &self.cfg,
            self_dom: self.self_dom,
        };
        if !exists {
            if let Some(mut dev) = self.devices.remove(&id) {
                dev.teardown(&cx);
            }
            return;
        }
        let dev = self.devices.entry(id).or_insert_with(|| {
            log::info!(
                "{id}: new device{}",
                if inherited { " (existing)" } else { "" }
            );
            Device::new(&self.base, id, inherited)
        });
        if dev.evaluate(&cx, now) == Outcome::Remove {
            if let Some(mut dev) = self.devices.remove(&id) {
                dev.teardown(&cx);
            }
        }
    }
}
