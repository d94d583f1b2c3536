//! tapdisk: the daemon serving VBDs (virtual block devices) over NBD and blkif rings.
//!
//! Modules, top (the loop) to bottom (the OS); each uses only those below it:
//!
//! ```text
//!  daemon.rs   Tapdisk: the single-threaded event loop; dispatch, I/O completions, timer,
//!              signals, shutdown
//!  daemon/control.rs     control request handlers (one per message), VbdError (errno
//!                        only at the reply), completions of OPEN/PAUSE/RESUME/CLOSE
//!  daemon/nbd_export.rs  NBD front door: listeners and connections inside the loop
//!  xenio/      blkif front door: mod.rs Rings (CONNECT/DISCONNECT, events, re-poll and
//!              publish), ring.rs one ring connection (service, start, grant copy,
//!              completion), env.rs Xen devices (real; simulated with feature `sim`),
//!              segs.rs copy lists
//!  vbd.rs      Vbd: Lifecycle enum + transitions, wire state for LIST, I/O context
//!              (begin_io/end_io: in-flight and stats), stats JSON, DiskType/params
//!  tag.rs      completion tags (Tag, Door, IoAcct): what a job routes back to
//!  io.rs       IoEngine: worker pool running blocking Image calls, completions via eventfd
//!  ctl.rs      typed control API (Request/Reply) + CtlHandle used by the control thread
//!  reactor.rs  epoll with typed tokens, eventfd waker, timerfd ticker
//!  mem.rs      in-memory image (simulation backend for tests; feature `sim`)
//! ```
//!
//! Safe Rust only (`forbid(unsafe_code)`, set on the module in `src/lib.rs`): the Xen
//! devices are reached through the safe traits of [`crate::xen`].
//!
//! Using it (what `src/bin/tapdisk.rs` does):
//!
//! ```text
//! let mut cfg = Config::new(control::control_dir());   // pid, io_threads, opener, keys, xen
//! let mut td = Tapdisk::new(cfg)?;
//! let h: CtlHandle = td.handle();                        // Send + Clone
//! thread: serve_connection(stream, &mut |req| h.call(req))   // control::server glue
//! td.run()?;                                             // until the last DETACH or SIGTERM
//! ```
//!
//! Every VBD operation is a `control::msg::Request` sent with [`CtlHandle::call`] (ATTACH,
//! OPEN, PAUSE, RESUME, CLOSE, FORCE_SHUTDOWN, DETACH, LIST, STATS, DISK_INFO, PID,
//! XENBLKIF_CONNECT/DISCONNECT); the answer is the matching `Reply` or `Reply::Error(errno)`.
//!
//! blkif rings (`xenio/`): XENBLKIF_CONNECT maps the ring through the [`XenOpener`] of
//! `Config::xen` (real `/dev/xen` devices by default, opened at the first CONNECT;
//! `SimXenOpener` in tests, feature `sim`), the event-channel fd is a `Token::Evtchn` of the
//! loop, ring requests go to the same `IoEngine` as NBD through `Vbd::begin_io`/
//! `Vbd::end_io`, which count them in flight (so PAUSE and CLOSE drain them) and in the VBD's
//! stats, and rings are only consumed while `Vbd::accepts_io`.

pub mod ctl;
pub mod daemon;
pub mod io;
#[cfg(any(test, feature = "sim"))]
pub mod mem;
pub mod reactor;
pub(crate) mod tag;
pub mod vbd;
pub mod xenio;

pub use ctl::{CtlHandle, Reply, Request};
pub use daemon::{Config, ImageOpener, OpenSpec, Tapdisk};
#[cfg(any(test, feature = "sim"))]
pub use xenio::SimXenOpener;
pub use xenio::{DevXenOpener, XenEnv, XenOpener};

/// Errors that stop the daemon (per-request failures are errno replies instead).
#[derive(Debug, thiserror::Error)]
pub enum TapdiskError {
    #[error("{op}")]
    Sys {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
}

#[cfg(test)]
mod tests;
