//! The blkif data path: tapdisk serves a guest's xen-blkfront directly over the shared ring,
//! moving data by grant copy.
//!
//! ```text
//!  XENBLKIF_CONNECT ─► map ring (GrantMapper, contiguous) ─► BackRing(ABI) ─► bind evtchn
//!
//!  evtchn fd readable (Token::Evtchn)
//!   └► pending → unmask → service(ring)
//!        take slot (copied once) ─► parse (ParseConfig of the VBD)
//!          ├ rejected ───────────────────────────────► response ERROR / EOPNOTSUPP
//!          ├ indirect: grant-copy ≤ 8 pages in ─► complete() ─┐
//!          ├ READ:  private buffer ─► IoEngine ─► (completion) grant copy to guest ─► response
//!          ├ WRITE: grant copy from guest into a private buffer ─► IoEngine ─► response
//!          ├ DISCARD ─► IoEngine (Image::discard) ─► response
//!          └ FLUSH / WRITE_BARRIER: stop taking requests; once every earlier request of the
//!            ring has completed: (own data write +) Image::flush ─► response; take again
//!   end of every loop iteration: re-poll rings whose requests completed, copy the completed
//!   reads to the guest (one grant-copy call per ring), then one
//!   RING_PUSH_RESPONSES_AND_CHECK_NOTIFY (+ notify) per ring that has new responses
//! ```
//!
//! Batching: a wake-up takes every request the ring holds (at most one ring's worth, up to
//! the memory cap, and up to and including a flush or barrier); the indirect segment pages
//! of the batch come in with one grant-copy call ([`GrantCopier::copy_batch`], one
//! `IOCTL_GNTDEV_GRANT_COPY`), the data of all its writes with one more, and then every
//! request goes to the engine in ring order. Responses are published and the guest notified
//! once per ring per loop pass.
//!
//! Multi-queue: a device whose blkfront uses N queues has N rings, each connected by its own
//! XENBLKIF_CONNECT (same domid/devid, `queue` 0..N, same minor) with its own event channel.
//! Every queue is a ring (`ring.rs` `Ring`) of the VBD: serviced when its port fires, at
//! most one ring's worth per service before it goes to the back of the re-poll list, so one
//! busy queue cannot starve another (round robin over the rings with work). PAUSE and CLOSE are per
//! VBD: no queue is serviced while the VBD does not accept I/O and the VBD's in-flight count
//! covers every queue. A flush or barrier drains only its own queue, as in Linux blkback
//! (each ring has its own in-flight count and flush wait): blk-mq gives the guest no
//! ordering between hardware queues either, and the flush makes durable every write that
//! completed before it, whichever queue carried it (the image's `flush` covers the file).
//! XENBLKIF_DISCONNECT removes every queue of the device.
//!
//! Decisions (see also blktap-c-reference §6 and the project's "decisions already taken"):
//! - Guest data is never mapped: writes are copied into private memory *before* they are
//!   queued (the guest cannot change validated data), reads land in private memory and are
//!   copied to the guest at completion. A failed grant-copy segment fails the request
//!   (`BLKIF_RSP_ERROR`).
//! - `FLUSH_DISKCACHE` and `WRITE_BARRIER` are both drain points: no later request is taken
//!   from the ring until every earlier request completed and the flush (after the request's own
//!   data, if any) completed. For a flush this is stricter than needed (later requests could
//!   overlap it) but simple and obviously correct; for the barrier it is the C semantics, with
//!   the barrier's write issued after the earlier requests rather than together with them,
//!   and made durable with a real `Image::flush` (the C tapdisk issues no fsync at all).
//! - Secure discard is not offered (`EOPNOTSUPP`).
//! - A `req_prod` more than a ring ahead is a protocol violation: the ring is left alone
//!   until the next event (nothing is consumed, an error is counted); nothing crashes.
//! - Private buffer memory per ring is capped ([`MAX_RING_BYTES`]); when the cap is reached
//!   the ring is not re-armed and is re-polled after completions (as tapdisk does when its
//!   request slots run out).
//! - Pause: rings of a paused (or pausing) VBD are not consumed; requests stay in the guest's
//!   ring and are picked up at resume.
//! - Disconnect with requests in flight: the ring becomes "dead": its event channel is
//!   unbound at once, completions are dropped (never written to the ring) and the mapping is
//!   released with the last completion.
//! - One context for all rings (`td-xenio-default`): one evtchn handle and one gntdev handle,
//!   opened at the first CONNECT, so tapdisk runs without `/dev/xen`. The pool name is
//!   advisory.
//!
//! Files: `mod.rs` the set of rings of a tapdisk ([`Rings`]: CONNECT/DISCONNECT, event
//! dispatch, end-of-pass re-poll and publish), `ring.rs` one ring connection (service,
//! start, grant copy, completion, responses), `env.rs` the Xen devices they use (real or
//! simulated), `segs.rs` the grant-copy segment lists of a request.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::Arc;
use std::time::Duration;

use log::{debug, info, warn};

use crate::blkif::{Abi, BackRing};
use crate::control::msg::{Blkif, BlkifProto, MAX_RING_ORDER};
use crate::image::ImageError;
#[cfg(doc)]
use crate::xen::GrantCopier;
use crate::xen::{DomId, GrantRef, Port};

use super::io::{IoEngine, Output};
use super::reactor::{Interest, Reactor, Token};
use super::tag::{RingTag, Tag};
use super::vbd::Vbd;

pub mod env;
mod ring;
pub mod segs;

pub use env::{DevXen, DevXenOpener, RingMem, XenEnv, XenOpener};
#[cfg(any(test, feature = "sim"))]
pub use env::{SimXenEnv, SimXenOpener};
pub use ring::{parse_config, RingStats};

use ring::{push_unique, BufPool, Ctx, Drained, Ring};

/// Private buffer bytes (read/write data) in flight per ring before the ring is left alone
/// until completions free some (256 slots of 1 MiB would otherwise pin 256 MiB).
pub const MAX_RING_BYTES: usize = 32 << 20;
/// Queues (rings) one device may connect: the control message's limit.
pub const MAX_QUEUES: u32 = crate::control::msg::MAX_QUEUES;
/// Indirect segments advertised by tapback (`feature-max-indirect-segments`).
pub const MAX_INDIRECT_SEGMENTS: u32 = 256;
/// The only context name tapdisk has (`pool` is advisory).
pub const DEFAULT_POOL: &str = "td-xenio-default";
/// Event-channel notifications taken per wake-up of the evtchn fd. Ports are unmasked as
/// they are read, so a guest notifying in a tight loop could otherwise keep the loop reading
/// its port forever; what is left stays pending (the fd stays readable) for the next
/// iteration, after the control socket and NBD clients had their turn.
const MAX_EVENTS_PER_WAKE: usize = 1024;

/// Why XENBLKIF_CONNECT or XENBLKIF_DISCONNECT failed.
#[derive(Debug, thiserror::Error)]
pub enum RingConnError {
    #[error("ring {domid}/{devid} queue {queue} is already connected")]
    AlreadyConnected { domid: u32, devid: u32, queue: u32 },
    #[error("ring {domid}/{devid}: its other queues are on minor {other}, not {minor}")]
    QueueMinor {
        domid: u32,
        devid: u32,
        minor: u16,
        other: u16,
    },
    #[error("ring {domid}/{devid}: queue {queue} is beyond {max}")]
    Queue {
        domid: u32,
        devid: u32,
        queue: u32,
        max: u32,
    },
    #[error("ring page order {0} is above {MAX_RING_ORDER}")]
    Order(u32),
    #[error("domain id {0} out of range")]
    DomId(u32),
    #[error("cannot open the xen devices")]
    OpenDevices(#[source] io::Error),
    #[error("cannot watch the event channel")]
    Watch(#[source] nix::Error),
    #[error("ring {domid}/{devid}: map")]
    Map {
        domid: u32,
        devid: u32,
        #[source]
        source: io::Error,
    },
    #[error("ring {domid}/{devid}")]
    Attach {
        domid: u32,
        devid: u32,
        #[source]
        source: crate::blkif::RingError,
    },
    #[error("ring {domid}/{devid}: bind port {port}")]
    Bind {
        domid: u32,
        devid: u32,
        port: u32,
        #[source]
        source: io::Error,
    },
    #[error("ring {domid}/{devid} is not connected")]
    NotConnected { domid: u32, devid: u32 },
}

impl RingConnError {
    /// The errno of the control reply.
    pub fn errno(&self) -> i32 {
        let os = |e: &io::Error| e.raw_os_error().unwrap_or(libc::EIO);
        match self {
            RingConnError::AlreadyConnected { .. } => libc::EALREADY,
            RingConnError::Order(_)
            | RingConnError::DomId(_)
            | RingConnError::Attach { .. }
            | RingConnError::QueueMinor { .. }
            | RingConnError::Queue { .. } => libc::EINVAL,
            RingConnError::OpenDevices(e) => os(e),
            RingConnError::Watch(e) => *e as i32,
            RingConnError::Map { source, .. } | RingConnError::Bind { source, .. } => os(source),
            RingConnError::NotConnected { .. } => libc::ENODEV,
        }
    }
}

/// Every ring of a tapdisk, and their environment.
pub struct Rings {
    opener: Arc<dyn XenOpener>,
    env: Option<Box<dyn XenEnv>>,
    rings: BTreeMap<u64, Ring>,
    by_port: HashMap<u32, u64>,
    next_id: u64,
    /// Rings with responses written but not published.
    dirty: Vec<u64>,
    /// Rings to service at the end of the loop pass (completions freed room, budget ran out).
    repoll: Vec<u64>,
    buffers: BufPool,
    /// Ring polling after a request ([`Rings::set_poll`]).
    poll: Duration,
}

impl std::fmt::Debug for Rings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rings")
            .field("rings", &self.rings.len())
            .field("open", &self.env.is_some())
            .finish()
    }
}

impl Rings {
    pub fn new(opener: Arc<dyn XenOpener>) -> Rings {
        Rings {
            opener,
            env: None,
            rings: BTreeMap::new(),
            by_port: HashMap::new(),
            next_id: 1,
            dirty: Vec::new(),
            repoll: Vec::new(),
            buffers: BufPool::default(),
            poll: Duration::ZERO,
        }
    }

    /// Poll each ring for `d` after its last request before re-arming its `req_event`
    /// (zero, the default: re-arm as soon as the ring is empty). While a ring is polled the
    /// loop does not sleep, and the guest, seeing no new `req_event`, does not notify: CPU
    /// in dom0 traded for fewer event-channel round trips (`TAPDISK3_POLL_US`).
    pub fn set_poll(&mut self, d: Duration) {
        self.poll = d;
    }

    /// Whether `minor` has a connected (live) ring.
    pub fn has_live(&self, minor: u16) -> bool {
        self.rings.values().any(|r| r.minor == minor && !r.dead)
    }

    /// Rings connected or draining (tests).
    pub fn count(&self) -> (usize, usize) {
        let dead = self.rings.values().filter(|r| r.dead).count();
        (self.rings.len() - dead, dead)
    }

    /// XENBLKIF_CONNECT.
    pub fn connect(
        &mut self,
        reactor: &Reactor,
        minor: u16,
        b: &Blkif,
    ) -> Result<(), RingConnError> {
        let (domid, devid, queue) = (b.domid, b.devid, b.queue);
        if queue >= MAX_QUEUES {
            return Err(RingConnError::Queue {
                domid,
                devid,
                queue,
                max: MAX_QUEUES,
            });
        }
        for r in self.rings.values() {
            if r.dead || r.domid != domid || r.devid != devid {
                continue;
            }
            if r.queue == queue {
                return Err(RingConnError::AlreadyConnected {
                    domid,
                    devid,
                    queue,
                });
            }
            if r.minor != minor {
                return Err(RingConnError::QueueMinor {
                    domid,
                    devid,
                    minor,
                    other: r.minor,
                });
            }
        }
        if b.order > MAX_RING_ORDER {
            return Err(RingConnError::Order(b.order));
        }
        let dom = DomId(u16::try_from(domid).map_err(|_| RingConnError::DomId(domid))?);
        let abi = match b.proto {
            BlkifProto::Native => Abi::NATIVE,
            BlkifProto::X86_32 => Abi::X86_32,
            BlkifProto::X86_64 => Abi::X86_64,
        };
        let env = match &mut self.env {
            Some(env) => env,
            slot @ None => {
                let env = self.opener.open().map_err(RingConnError::OpenDevices)?;
                reactor
                    .add(env.evtchn().as_fd(), Token::Evtchn, Interest::READ)
                    .map_err(RingConnError::Watch)?;
                slot.insert(env)
            }
        };
        let refs: Vec<GrantRef> = b.ring_refs().iter().map(|g| GrantRef(*g)).collect();
        let mem = env
            .map_ring(dom, &refs)
            .map_err(|source| RingConnError::Map {
                domid,
                devid,
                source,
            })?;
        let ring = BackRing::attach(mem, abi, b.order).map_err(|source| RingConnError::Attach {
            domid,
            devid,
            source,
        })?;
        let port = env
            .evtchn()
            .bind_interdomain(dom, Port(b.port))
            .map_err(|source| RingConnError::Bind {
                domid,
                devid,
                port: b.port,
                source,
            })?;
        let id = self.next_id;
        self.next_id += 1;
        self.by_port.insert(port.0, id);
        self.rings.insert(
            id,
            Ring::new(id, minor, (domid, devid, queue), dom, port, ring),
        );
        self.repoll.push(id);
        info!(
            "minor {minor}: ring {domid}/{devid} queue {queue} connected ({:?}, order {}, port {})",
            abi, b.order, port.0
        );
        Ok(())
    }

    /// XENBLKIF_DISCONNECT: every queue of the device.
    pub fn disconnect(&mut self, domid: u32, devid: u32) -> Result<(), RingConnError> {
        let ids: Vec<u64> = self
            .rings
            .values()
            .filter(|r| !r.dead && r.domid == domid && r.devid == devid)
            .map(|r| r.id)
            .collect();
        if ids.is_empty() {
            return Err(RingConnError::NotConnected { domid, devid });
        }
        for id in ids {
            let Some(r) = self.rings.get_mut(&id) else {
                continue;
            };
            let queue = r.queue;
            if let Some(env) = &self.env {
                if let Err(e) = env.evtchn().unbind(r.port) {
                    warn!("ring {domid}/{devid} queue {queue}: unbind: {e}");
                }
            }
            self.by_port.remove(&r.port.0);
            r.kill();
            if r.jobs == 0 {
                self.rings.remove(&id);
                info!("ring {domid}/{devid} queue {queue} disconnected");
            } else {
                info!(
                    "ring {domid}/{devid} queue {queue} disconnected with {} requests in flight",
                    r.jobs
                );
            }
        }
        Ok(())
    }

    /// Rings wait for a re-poll: the loop must not block.
    pub fn busy(&self) -> bool {
        !self.repoll.is_empty()
    }

    /// Re-check every ring of `minor` (after OPEN or RESUME).
    pub fn wake_minor(&mut self, minor: u16) {
        for r in self.rings.values() {
            if r.minor == minor && !r.dead {
                push_unique(&mut self.repoll, r.id);
            }
        }
    }

    /// The evtchn fd is readable.
    pub(crate) fn on_event(&mut self, io: &IoEngine<Tag>, vbds: &mut BTreeMap<u16, Vbd>) {
        let Some(env) = &self.env else {
            return;
        };
        let mut todo = Vec::new();
        for _ in 0..MAX_EVENTS_PER_WAKE {
            match env.evtchn().pending() {
                Ok(Some(p)) => {
                    if let Err(e) = env.evtchn().unmask(p) {
                        debug!("unmask port {}: {e}", p.0);
                    }
                    if let Some(&id) = self.by_port.get(&p.0) {
                        if let Some(r) = self.rings.get_mut(&id) {
                            r.stats.kicks_in += 1;
                        }
                        push_unique(&mut todo, id);
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    warn!("evtchn pending: {e}");
                    break;
                }
            }
        }
        for id in todo {
            self.service(id, io, vbds);
        }
    }

    /// End of a loop pass: service the rings waiting for a re-poll, then publish the
    /// responses written meanwhile, with one notification per ring.
    pub(crate) fn repoll_and_publish(&mut self, io: &IoEngine<Tag>, vbds: &mut BTreeMap<u16, Vbd>) {
        for id in std::mem::take(&mut self.repoll) {
            self.service(id, io, vbds);
        }
        for id in std::mem::take(&mut self.dirty) {
            self.with_ring(id, io, |r, ctx| r.publish(ctx));
        }
        // Publishing only writes the responses it makes visible.
        self.dirty.clear();
    }

    /// Run `f` on ring `id` with its context borrowed from the set; `None` if there is no
    /// such ring (or no Xen environment).
    fn with_ring<R>(
        &mut self,
        id: u64,
        io: &IoEngine<Tag>,
        f: impl FnOnce(&mut Ring, &mut Ctx) -> R,
    ) -> Option<R> {
        let (Some(env), Some(r)) = (self.env.as_deref(), self.rings.get_mut(&id)) else {
            return None;
        };
        let mut ctx = Ctx {
            env,
            io,
            bufs: &mut self.buffers,
            repoll: &mut self.repoll,
            dirty: &mut self.dirty,
            poll: self.poll,
        };
        Some(f(r, &mut ctx))
    }

    /// Take and start requests from ring `id`.
    fn service(&mut self, id: u64, io: &IoEngine<Tag>, vbds: &mut BTreeMap<u16, Vbd>) {
        self.with_ring(id, io, |r, ctx| r.service(ctx, vbds));
    }

    /// An I/O job of a ring finished (already counted by its VBD).
    pub(crate) fn complete(
        &mut self,
        io: &IoEngine<Tag>,
        tag: RingTag,
        result: Result<Output, ImageError>,
    ) {
        let id = tag.ring;
        if self.with_ring(id, io, |r, ctx| r.complete(ctx, tag, result)) == Some(Drained::Yes) {
            self.rings.remove(&id);
        }
    }

    /// The `"xenbus"` stats member for `minor` (None without connected rings). With several
    /// rings their fields are concatenated into the one object, as blktap does.
    pub fn stats_json(&self, minor: u16) -> Option<String> {
        let parts: Vec<String> = self
            .rings
            .values()
            .filter(|r| r.minor == minor && !r.dead)
            .map(Ring::stats_json)
            .collect();
        if parts.is_empty() {
            None
        } else {
            Some(format!("{{ {} }}", parts.join(", ")))
        }
    }

    /// Counters of the live ring `(domid, devid)`, queue 0 (tests, diagnostics).
    pub fn ring_stats(&self, domid: u32, devid: u32) -> Option<RingStats> {
        self.queue_stats(domid, devid, 0)
    }

    /// Counters of queue `queue` of the live device `(domid, devid)`.
    pub fn queue_stats(&self, domid: u32, devid: u32, queue: u32) -> Option<RingStats> {
        self.rings
            .values()
            .find(|r| !r.dead && r.domid == domid && r.devid == devid && r.queue == queue)
            .map(|r| r.stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xen::sim::{SimEvtchn, SimGrants, SimXen};
    use crate::xen::{EventChannel, GrantCopier};
    use std::os::fd::{AsFd, BorrowedFd};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// An event channel whose guest never stops notifying: `pending` always has a port
    /// (up to a safety limit, so a regression fails instead of hanging).
    #[derive(Debug)]
    struct Storm {
        fd: SimEvtchn,
        reads: Arc<AtomicUsize>,
    }

    const STORM_LIMIT: usize = 1_000_000;

    impl AsFd for Storm {
        fn as_fd(&self) -> BorrowedFd<'_> {
            self.fd.as_fd()
        }
    }

    impl EventChannel for Storm {
        fn bind_interdomain(&self, _: DomId, remote: Port) -> io::Result<Port> {
            Ok(remote)
        }
        fn unbind(&self, _: Port) -> io::Result<()> {
            Ok(())
        }
        fn notify(&self, _: Port) -> io::Result<()> {
            Ok(())
        }
        fn pending(&self) -> io::Result<Option<Port>> {
            let n = self.reads.fetch_add(1, Ordering::Relaxed);
            Ok((n < STORM_LIMIT).then_some(Port(7)))
        }
        fn unmask(&self, _: Port) -> io::Result<()> {
            Ok(())
        }
    }

    struct StormEnv {
        evt: Storm,
        grants: SimGrants,
    }

    impl XenEnv for StormEnv {
        fn evtchn(&self) -> &dyn EventChannel {
            &self.evt
        }
        fn grants(&self) -> &dyn GrantCopier {
            &self.grants
        }
        fn map_ring(&self, _: DomId, _: &[GrantRef]) -> io::Result<RingMem> {
            Err(io::Error::from_raw_os_error(libc::ENOSYS))
        }
    }

    #[test]
    fn an_event_storm_is_taken_in_bounded_batches() {
        let xen = SimXen::new();
        let reads = Arc::new(AtomicUsize::new(0));
        let env = StormEnv {
            evt: Storm {
                fd: xen.evtchn(DomId(0)).unwrap(),
                reads: Arc::clone(&reads),
            },
            grants: xen.grants(DomId(0)),
        };
        let mut rings = Rings::new(Arc::new(SimXenOpener {
            xen: xen.clone(),
            dom: DomId(0),
        }));
        rings.env = Some(Box::new(env));
        let io = IoEngine::new(1).unwrap();
        let mut vbds = BTreeMap::new();
        rings.on_event(&io, &mut vbds);
        let n = reads.load(Ordering::Relaxed);
        assert!(n <= MAX_EVENTS_PER_WAKE, "{n} pending reads in one wake-up");
        assert!(n > 0);
        // The next wake-up takes the next batch.
        rings.on_event(&io, &mut vbds);
        assert_eq!(reads.load(Ordering::Relaxed), 2 * n);
    }
}
