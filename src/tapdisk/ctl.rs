//! Control requests into the event loop.
//!
//! The control socket server (`control::server`) runs on its own thread and decodes each
//! 544-byte message into a typed [`Request`]. Its handler calls [`CtlHandle::call`], which
//! queues the request for the event loop, wakes the loop through an eventfd and blocks until
//! the loop answers. Requests that wait for I/O to drain (PAUSE, CLOSE) or for an image to
//! open (OPEN, RESUME) are answered later; the loop serves everything else meanwhile.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;

pub use crate::control::msg::{Reply, Request};

use super::reactor::Waker;

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
