//! tapdisk: the daemon serving VBDs (virtual block devices) over NBD and blkif rings.
//!
//! ```text
//!  daemon.rs   Tapdisk: the single-threaded event loop; control requests, VBD lifecycle
//!              (attach/open/pause/resume/close/detach), NBD listeners and connections
//!  ctl.rs      typed control API (Request/Reply) + CtlHandle used by the control thread
//!  reactor.rs  epoll with typed tokens, eventfd waker, timerfd ticker
//!  io.rs       IoEngine: worker pool running blocking Image calls, completions via eventfd
//!  vbd.rs      Vbd: state flags, params, stats (blktap JSON), DiskType
//!  mem.rs      in-memory image (simulation backend for tests)
//!  xenio.rs    blkif rings: XENBLKIF_CONNECT/DISCONNECT, ring requests, grant copy
//! ```

pub mod ctl;
pub mod daemon;
pub mod io;
pub mod mem;
pub mod reactor;
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
