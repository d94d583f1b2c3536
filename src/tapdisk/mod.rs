//! tapdisk: the daemon serving VBDs (virtual block devices) over NBD and blkif rings.
//!
//! ```text
//!  daemon.rs   Tapdisk: the single-threaded event loop; control requests, VBD lifecycle
//!              (attach/open/pause/resume/close/detach), I/O completions, timer, shutdown
//!  daemon/nbd_export.rs  NBD listeners and connections inside the loop
//!  ctl.rs      typed control API (Request/Reply) + CtlHandle used by the control thread
//!  reactor.rs  epoll with typed tokens, eventfd waker, timerfd ticker
//!  io.rs       IoEngine: worker pool running blocking Image calls, completions via eventfd
//!  vbd.rs      Vbd: state flags, params, stats (blktap JSON), DiskType
//!  mem.rs      in-memory image (simulation backend for tests)
//!  xenio.rs    blkif rings: XENBLKIF_CONNECT/DISCONNECT, ring requests, grant copy
//! ```
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
//! blkif rings (`xenio.rs`): XENBLKIF_CONNECT maps the ring through the [`XenOpener`] of
//! `Config::xen` (real `/dev/xen` devices by default, opened at the first CONNECT; `SimXen`
//! in tests), the event-channel fd is a `Token::Evtchn` of the loop, ring requests go to the
//! same `IoEngine` as NBD against the VBD's image and count in `Vbd::inflight` (so PAUSE and
//! CLOSE drain them), and rings are only consumed while `Vbd::accepts_io`.

#![forbid(unsafe_code)]

pub mod ctl;
pub mod daemon;
pub mod io;
pub mod mem;
pub mod reactor;
pub(crate) mod tag;
pub mod vbd;
pub mod xenio;

pub use ctl::{CtlHandle, Reply, Request};
pub use daemon::{Config, ImageOpener, OpenSpec, Tapdisk};
pub use xenio::{DevXenOpener, SimXenOpener, XenEnv, XenOpener};

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
