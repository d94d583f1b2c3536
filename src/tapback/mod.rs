//! `tapback`: the xenstore backend daemon for `backend/vbd3` devices.
//!
//! tapback never touches guest data. For every device directory
//! `backend/<name>/<domid>/<devid>` (relative to the backend's own domain) it drives the
//! XenbusState handshake with the guest's blkfront, and when the frontend has published its
//! ring it tells the tapdisk serving the disk to map that ring (`XENBLKIF_CONNECT`), then
//! advertises the disk geometry and features.
//!
//! ```text
//!  daemon (options, pid file, syslog, signals, poll loop)
//!     └─ Backend<X: XenStore, T: TapdiskOps>     device set, watch dispatch, retry timers
//!          └─ Device                             one vbd3 device: the state machine
//!               ├─ locate::locate_tapdisk         physical-device-path / physical-device /
//!               │                                  tapdisk-params → (pid, minor)
//!               └─ TapdiskOps                      connect / disconnect / disk info
//!                    ├─ ControlTapdisks (real: control::client::Client)
//!                    └─ a fake in the tests
//! ```
//!
//! # Process model
//!
//! One process serves every frontend domain (the C tapback forks one slave per domain; that
//! buys nothing here because each device's work is a handful of xenstore operations and one
//! control request). `-x <domid>` is kept for compatibility: it restricts this process to
//! one frontend domain and watches only `backend/<name>/<domid>`.
//!
//! # Behaviour (differences from the C tapback on purpose)
//!
//! - `hotplug-status` is not waited for; `mode` and `device-type` are read when connecting.
//! - A missing `protocol` means the native ABI (as in blkback), not x86_32.
//! - `max-ring-page-order` advertises the smaller of what the ring code maps
//!   ([`crate::blkif::abi::MAX_RING_PAGE_ORDER`]) and what a control message can carry
//!   ([`crate::control::msg::MAX_RING_ORDER`]): 4 (16 pages, 512 slots), like Linux blkback's
//!   `XENBUS_MAX_RING_GRANT_ORDER`. Order 4 needs the control message's `gref_ext` extension
//!   (see [`crate::control::msg`]), which only our tapdisk understands; a C tapdisk answers an
//!   order-4 connect with EINVAL (a fatal device error, as for any ring tapdisk refuses).
//! - `multi-queue-max-queues` is advertised ([`DEFAULT_MAX_QUEUES`], `-q N`; kernel blkback
//!   does the same, the C tapback does not): a frontend that writes
//!   `multi-queue-num-queues` N (1..=max) has each queue's `queue-<i>/ring-ref*` and
//!   `queue-<i>/event-channel` read and connected by its own XENBLKIF_CONNECT (queue `i`);
//!   `ring-page-order` and `protocol` stay at the top level. A failed queue disconnects the
//!   queues already connected. N above the maximum, or 0, is a fatal frontend error.
//! - `feature-flush-cache`, `feature-discard` (+ `discard-*`) and
//!   `feature-max-indirect-segments` are advertised; `physical-sector-size` is written.
//! - After a restart every existing device is re-linked from `physical-device-path`
//!   (the C code only re-reads the legacy `physical-device`), and a frontend in Connected
//!   gets its ring connected again (`EALREADY` from tapdisk = already connected = fine).
//! - A frontend value that is garbage (non-numeric ring-ref, order above the advertised
//!   maximum, bad protocol, bad feature-persistent) is a fatal device error, like
//!   `xenbus_dev_fatal`: the reason goes to `error/backend/<name>/<domid>/<devid>/error`, the
//!   backend switches to Closing, nothing is connected; the device recovers when the frontend
//!   closes and initialises again.
//! - Transient failures (tapdisk not found yet, control timeout, `EBUSY`/`EAGAIN` while a
//!   tapdisk is paused, xenstore errors) are retried on every trigger and on a back-off timer.
//! - `online = 0` (the toolstack is removing the device) stops tapback from connecting or
//!   going back to InitWait.
//! - SIGTERM/SIGINT exit at once and leave devices as they are: rings keep running in their
//!   tapdisks and the next tapback reconnects idempotently (the C tapback refuses to exit
//!   while it has devices).

pub mod backend;
pub mod daemon;
pub mod device;
pub mod locate;

use crate::control::ControlError;
use crate::xen::XsError;

pub use backend::{Backend, BackendConfig};
pub use device::{DeviceId, DeviceStatus};
pub use locate::{ControlTapdisks, TapLocation, TapdiskOps};

/// The default backend name (`-n`).
pub const DEFAULT_NAME: &str = "vbd3";

/// The `max-ring-page-order` tapback advertises: what both the ring code and the control
/// message (16 grant refs with the `gref_ext` extension) can handle: 4.
pub const MAX_RING_ORDER: u32 = {
    let a = crate::blkif::abi::MAX_RING_PAGE_ORDER;
    let b = crate::control::msg::MAX_RING_ORDER;
    if a < b {
        a
    } else {
        b
    }
};

/// `multi-queue-max-queues` advertised by default (`-q` changes it): Linux blkfront's own
/// default cap (`xen_blkif_max_queues` = 4). blkfront opens min(vCPUs, this) rings; tapdisk
/// serves all of a VBD's rings on its one event loop, so more queues do not add dom0 threads
/// (unlike blkback, one kernel thread per ring), they spare the guest's vCPUs the contention
/// on one ring.
pub const DEFAULT_MAX_QUEUES: u32 = 4;

/// `feature-max-indirect-segments`: the limit the request parser applies by default.
pub fn max_indirect_segments() -> u32 {
    crate::blkif::ParseConfig::new(0).max_indirect_segments
}

/// `discard-granularity` advertised (bytes).
pub const DISCARD_GRANULARITY: u32 = 4096;

/// tapback failures. [`TapbackError::errno`] gives the errno logged and used as exit code.
#[derive(Debug, thiserror::Error)]
pub enum TapbackError {
    /// A xenstore operation failed.
    #[error("xenstore")]
    Xs(#[from] XsError),
    /// A tapdisk control request failed.
    #[error("tapdisk control")]
    Control(#[from] ControlError),
    /// The frontend published a value we refuse (fatal for the device until it resets).
    #[error("frontend {key}: {reason}")]
    Frontend {
        key: String,
        reason: String,
        errno: i32,
    },
    /// A toolstack-written backend value is missing or bad (retried on the next trigger).
    #[error("backend {key}: {reason}")]
    Config {
        key: String,
        reason: String,
        errno: i32,
    },
    /// No tapdisk serves this device (yet).
    #[error("no tapdisk found: {0}")]
    NoTapdisk(String),
    /// The tapdisk reported something impossible.
    #[error("tapdisk {pid} minor {minor}: {reason}")]
    BadTapdisk {
        pid: i32,
        minor: u16,
        reason: String,
    },
    /// An operating-system call failed (daemon set-up).
    #[error("{op}")]
    Io {
        op: String,
        #[source]
        source: std::io::Error,
    },
    /// Bad command line.
    #[error("{0}")]
    Usage(String),
}

impl TapbackError {
    /// The positive errno of this error.
    pub fn errno(&self) -> i32 {
        match self {
            TapbackError::Xs(e) => e.errno() as i32,
            TapbackError::Control(e) => e.errno(),
            TapbackError::Frontend { errno, .. } | TapbackError::Config { errno, .. } => *errno,
            TapbackError::NoTapdisk(_) => libc::ESRCH,
            TapbackError::BadTapdisk { .. } => libc::EINVAL,
            TapbackError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            TapbackError::Usage(_) => libc::EINVAL,
        }
    }

    /// A bad frontend value (EINVAL).
    pub fn frontend(key: &str, reason: impl Into<String>) -> Self {
        TapbackError::Frontend {
            key: key.to_owned(),
            reason: reason.into(),
            errno: libc::EINVAL,
        }
    }

    /// A missing or bad backend value (EINVAL).
    pub fn config(key: &str, reason: impl Into<String>) -> Self {
        TapbackError::Config {
            key: key.to_owned(),
            reason: reason.into(),
            errno: libc::EINVAL,
        }
    }

    /// Whether this error is the frontend's fault (the device goes to its error state).
    pub fn is_fatal(&self) -> bool {
        matches!(self, TapbackError::Frontend { .. })
    }
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, TapbackError>;
