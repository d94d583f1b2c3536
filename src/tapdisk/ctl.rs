//! The daemon's typed control API: what the control socket server forwards to the event loop.
//!
//! The control server runs on its own thread. It decodes 544-byte messages (module
//! `control`), turns each into a [`Request`] and calls [`CtlHandle::call`], which queues the
//! request for the event loop, wakes it through an eventfd and blocks until the loop
//! answers. Requests that must wait for I/O to drain (PAUSE, CLOSE) or for an image to open
//! (OPEN, RESUME) are answered later; the loop keeps serving everything else meanwhile.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;

use crate::image::crypto::KeyBytes;

use super::reactor::Waker;
use super::vbd::DiskInfo;

/// OPEN flags (`params.flags`) tapdisk looks at.
pub mod open_flags {
    pub const SHARED: u32 = 0x001;
    pub const RDONLY: u32 = 0x002;
    pub const ADD_LOG: u32 = 0x010;
    pub const SECONDARY: u32 = 0x080;
    pub const NO_O_DIRECT: u32 = 0x200;
    pub const OPEN_ENCRYPTED: u32 = 0x400;
}

/// XENBLKIF_CONNECT parameters (the `blkif` union member), for the ring code.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlkifParams {
    pub domid: u32,
    pub devid: u32,
    /// Ring page grant references (`1 << order` of them).
    pub grefs: Vec<u32>,
    pub order: u32,
    /// 1 native, 2 x86_32, 3 x86_64.
    pub proto: u32,
    pub pool: String,
    pub port: u32,
    pub poll_duration: u32,
    pub poll_idle_threshold: u32,
}

/// A control request, decoded and validated by the control server.
#[derive(Clone, Debug)]
pub enum Request {
    Pid,
    Attach {
        minor: u16,
    },
    Open {
        minor: u16,
        /// `"type:/path"`.
        params: String,
        /// [`open_flags`].
        flags: u32,
        /// Key trailer of OPEN_ENCRYPTED (`tap-ctl open -E`).
        key: Option<KeyBytes>,
    },
    Pause {
        minor: u16,
    },
    Resume {
        minor: u16,
        /// New `"type:/path"`; `None` reopens the current one.
        params: Option<String>,
    },
    /// CLOSE (`force: false`) or FORCE_SHUTDOWN (`force: true`).
    Close {
        minor: u16,
        force: bool,
    },
    Detach {
        minor: u16,
    },
    List,
    /// One VBD, or all of them (cookie 0xFFFF).
    Stats {
        minor: Option<u16>,
    },
    DiskInfo {
        minor: u16,
    },
    XenblkifConnect {
        minor: u16,
        blkif: BlkifParams,
    },
    XenblkifDisconnect {
        domid: u32,
        devid: u32,
    },
}

/// One VBD in a LIST reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListEntry {
    pub minor: u16,
    pub state: u32,
    pub params: String,
}

/// The loop's answer. `Error` carries a positive errno.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Ok,
    Error(i32),
    Pid(i32),
    /// OPEN_RSP / DISK_INFO_RSP.
    Image(DiskInfo),
    List(Vec<ListEntry>),
    /// STATS_RSP payload (JSON).
    Stats(String),
}

/// A queued request and where its answer goes.
pub(crate) type CtlMsg = (Request, Sender<Reply>);

/// A cloneable handle to a running [`super::Tapdisk`] (for the control server thread).
#[derive(Clone, Debug)]
pub struct CtlHandle {
    tx: Sender<CtlMsg>,
    waker: Arc<Waker>,
}

impl CtlHandle {
    pub(crate) fn new() -> nix::Result<(CtlHandle, Receiver<CtlMsg>)> {
        let (tx, rx) = channel();
        let waker = Arc::new(Waker::new()?);
        Ok((CtlHandle { tx, waker }, rx))
    }

    pub(crate) fn waker(&self) -> &Waker {
        &self.waker
    }

    /// Send `req` to the event loop and wait for its answer. If the daemon has gone away
    /// the answer is `Error(ESHUTDOWN)`.
    pub fn call(&self, req: Request) -> Reply {
        let (tx, rx) = channel();
        if self.tx.send((req, tx)).is_err() {
            return Reply::Error(libc::ESHUTDOWN);
        }
        self.waker.wake();
        rx.recv().unwrap_or(Reply::Error(libc::ESHUTDOWN))
    }
}
