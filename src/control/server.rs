//! The daemon side of the control socket.
//!
//! # Contract for tapdisk
//!
//! ```text
//! let server = ControlServer::bind(&control_dir(), std::process::id() as i32)?; // <dir>/ctl<pid>
//! // either: on a dedicated thread, one connection at a time
//! server.run(&mut |req: Request| -> Reply { forward_to_event_loop(req) })?;
//! // or: one thread per connection (at most MAX_CONNECTIONS at once), handler shared
//! server.run_concurrent(Arc::new(|req| ...))?;
//! // or: poll server.listener() in your own loop and call serve_connection(stream, &mut h)
//! ```
//!
//! Per connection the server reads exactly one request (message plus trailers) within
//! [`RECV_TIMEOUT`] (short reads are looped over), decodes it with [`msg::read_request`], hands
//! the typed [`Request`] to the handler and writes the [`Reply`] with the request's cookie
//! echoed, within [`SEND_TIMEOUT`] (LIST replies stream any number of entries, STATS writes its
//! payload after the header). A request that does not decode gets an ERROR reply with its errno
//! (EINVAL for malformed input, EPROTONOSUPPORT for a bad blkif protocol) and never reaches the
//! handler. A client that disappears mid-message is dropped without a reply. Writes never raise
//! SIGPIPE. The handler maps every failure to [`Reply::Error`] with a positive errno; it is
//! never called for a request that did not fully arrive.
//!
//! The reply to `Request::Close` and `Request::ForceShutdown` is [`Reply::Close`]; every other
//! request has the reply of the same name ([`Request::reply_type`]).
//!
//! [`msg::read_request`]: super::msg::read_request

use std::fs;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::msg::{read_request, WireLayout};
pub use super::msg::{Reply, Request};
use super::transport::{DeadlineReader, NoSigPipeWriter};
use super::{socket_path, ControlError, Result};

/// Time a client has to deliver its whole request.
pub const RECV_TIMEOUT: Duration = Duration::from_secs(2);
/// Time the server allows for writing the whole reply.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once by [`ControlServer::run_concurrent`].
pub const MAX_CONNECTIONS: usize = 10;

/// What happened on one connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Served {
    /// The handler ran and its reply was sent (or the peer left before it could be).
    Handled {
        /// The request's wire type.
        request: super::msg::MsgType,
        /// Whether the reply was written completely.
        replied: bool,
    },
    /// The request was malformed: answered with ERROR and this errno, handler not called.
    Rejected(i32),
    /// The client vanished or timed out before a whole request arrived.
    Dropped,
}

/// Serve one connection: read one request, call `handler`, write the reply.
pub fn serve_connection(stream: UnixStream, handler: &mut dyn FnMut(Request) -> Reply) -> Served {
    serve_connection_with(stream, handler, WireLayout::NATIVE, RECV_TIMEOUT)
}

/// [`serve_connection`] with an explicit layout and receive timeout (tests).
pub fn serve_connection_with(
    stream: UnixStream,
    handler: &mut dyn FnMut(Request) -> Reply,
    layout: WireLayout,
    recv_timeout: Duration,
) -> Served {
    let incoming = {
        let mut r = DeadlineReader::new(&stream, Some(recv_timeout));
        read_request(&mut r, layout)
    };
    let (cookie, reply, ty) = match incoming {
        Ok((cookie, req)) => {
            let ty = req.msg_type();
            log::debug!("control: {} cookie {cookie}", ty.name());
            (cookie, handler(req), Some(ty))
        }
        Err((_, ControlError::Closed)) | Err((_, ControlError::Timeout)) => {
            log::debug!("control: client left before a whole request arrived");
            return Served::Dropped;
        }
        Err((_, ControlError::Io { op, source })) => {
            log::debug!("control: {op}: {source}");
            return Served::Dropped;
        }
        Err((cookie, e)) => {
            log::warn!("control: bad request: {}", crate::util::error_chain(&e));
            (cookie, Reply::error(e.errno()), None)
        }
    };
    let mut w = NoSigPipeWriter::new(&stream, Some(SEND_TIMEOUT));
    let replied = match reply.write_to(&mut w, cookie, layout) {
        Ok(()) => true,
        Err(e) => {
            log::debug!(
                "control: reply not delivered: {}",
                crate::util::error_chain(&e)
            );
            false
        }
    };
    match (ty, &reply) {
        (Some(request), _) => Served::Handled { request, replied },
        (None, Reply::Error(e)) => Served::Rejected(*e),
        (None, _) => Served::Rejected(libc::EINVAL),
    }
}

/// A bound control socket `<dir>/ctl<pid>`; removed again on drop.
#[derive(Debug)]
pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
}

impl ControlServer {
    /// Create `dir` (0755) if needed, remove a stale `ctl<pid>` and bind/listen on it.
    pub fn bind(dir: &Path, pid: i32) -> Result<ControlServer> {
        if !dir.is_dir() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(dir)
                .map_err(|e| ControlError::io(format!("create {}", dir.display()), e))?;
        }
        let path = socket_path(dir, pid);
        match fs::symlink_metadata(&path) {
            Ok(md) if md.file_type().is_socket() => {
                fs::remove_file(&path)
                    .map_err(|e| ControlError::io(format!("unlink {}", path.display()), e))?;
            }
            Ok(_) => {
                return Err(ControlError::os(
                    format!("{} exists and is not a socket", path.display()),
                    nix::errno::Errno::EEXIST,
                ))
            }
            Err(_) => {}
        }
        let listener = UnixListener::bind(&path)
            .map_err(|e| ControlError::io(format!("bind {}", path.display()), e))?;
        Ok(ControlServer { listener, path })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The listening socket (to poll it from an event loop).
    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }

    /// Accept one connection.
    pub fn accept(&self) -> Result<UnixStream> {
        loop {
            match self.listener.accept() {
                Ok((s, _)) => return Ok(s),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ControlError::io("accept", e)),
            }
        }
    }

    /// Accept and serve one connection.
    pub fn serve_one(&self, handler: &mut dyn FnMut(Request) -> Reply) -> Result<Served> {
        let s = self.accept()?;
        Ok(serve_connection(s, handler))
    }

    /// Serve connections one after the other until accept fails.
    pub fn run(&self, handler: &mut dyn FnMut(Request) -> Reply) -> Result<()> {
        loop {
            match self.accept() {
                Ok(s) => {
                    serve_connection(s, handler);
                }
                Err(e) if e.errno() == libc::ECONNABORTED => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Serve every connection on its own thread, at most [`MAX_CONNECTIONS`] at once, until
    /// accept fails. The handler is shared (forward to the event loop through a channel).
    pub fn run_concurrent(
        &self,
        handler: Arc<dyn Fn(Request) -> Reply + Send + Sync>,
    ) -> Result<()> {
        let active = Arc::new((Mutex::new(0usize), Condvar::new()));
        loop {
            {
                let (lock, cv) = &*active;
                let mut n = lock.lock().unwrap_or_else(|p| p.into_inner());
                while *n >= MAX_CONNECTIONS {
                    n = cv.wait(n).unwrap_or_else(|p| p.into_inner());
                }
            }
            let stream = match self.accept() {
                Ok(s) => s,
                Err(e) if e.errno() == libc::ECONNABORTED => continue,
                Err(e) => return Err(e),
            };
            {
                let mut n = active.0.lock().unwrap_or_else(|p| p.into_inner());
                *n += 1;
            }
            let h = Arc::clone(&handler);
            let act = Arc::clone(&active);
            let spawned = std::thread::Builder::new()
                .name("tapdisk-ctl".into())
                .spawn(move || {
                    serve_connection(stream, &mut |r| h(r));
                    let (lock, cv) = &*act;
                    let mut n = lock.lock().unwrap_or_else(|p| p.into_inner());
                    *n -= 1;
                    cv.notify_one();
                });
            if let Err(e) = spawned {
                log::warn!("control: cannot start connection thread: {e}");
                let mut n = active.0.lock().unwrap_or_else(|p| p.into_inner());
                *n -= 1;
            }
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}
