//! tapdisk: the daemon serving VBDs (virtual block devices) over NBD (and, later, blkif rings).
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
//! ```
//!
//! Using it (what `src/bin/tapdisk.rs` does):
//!
//! ```text
//! let mut cfg = Config::new(control::control_dir());   // pid, io_threads, opener, keys, rings
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
//! Plugging in the blkif ring code: implement [`RingHost`] and set `Config::rings`. CONNECT
//! and DISCONNECT are forwarded to it from the loop thread. The ring implementation should
//! become part of the loop: a `Token` kind for its event-channel fd, requests submitted to the
//! same `IoEngine` against the VBD's `Arc<dyn Image>` (the `Vbd` keeps it, PAUSE drains
//! `Vbd::inflight` which ring requests must count too, and `Vbd::accepts_io` says when new
//! requests may be taken from the ring).

pub mod ctl;
pub mod daemon;
pub mod io;
pub mod mem;
pub mod reactor;
pub mod vbd;

pub use ctl::{CtlHandle, Reply, Request};
pub use daemon::{Config, ImageOpener, OpenSpec, RingHost, Tapdisk};

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
