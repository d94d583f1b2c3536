//! Blocking xenstore client over the xenstored Unix socket or `/dev/xen/xenbus`.
//!
//! One request at a time (a mutex serialises callers). While waiting for a reply, `WATCH_EVENT`
//! messages are queued, never mistaken for the reply and never lost. The queue is bounded:
//! past [`MAX_QUEUED_EVENT_BYTES`], further events are folded into one event per watch token
//! whose path is the watched path itself ("something at or below here changed"), so a
//! domain flooding xenstore with writes under a watched node cannot grow this process's
//! memory without bound. Consumers re-read what they watch anyway, so nothing is missed.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Mutex;

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::wire::{self, Message, MsgType};
use super::{Committed, Perm, Tx, WatchEvent, XenStore, XsError};

/// Socket paths tried by [`XsClient::open`], then the xenbus device.
pub const SOCKET_PATHS: &[&str] = &["/run/xenstored/socket", "/var/run/xenstored/socket"];
/// The kernel xenbus device.
pub const XENBUS_PATH: &str = "/dev/xen/xenbus";
/// Environment variable naming the xenstored socket (or a xenbus device node) to use
/// instead of the defaults, as libxenstore honours it.
pub const XENSTORED_PATH_ENV: &str = "XENSTORED_PATH";

/// The non-empty value of [`XENSTORED_PATH_ENV`], if set.
pub fn xenstored_path_from_env() -> Option<std::path::PathBuf> {
    std::env::var_os(XENSTORED_PATH_ENV)
        .filter(|p| !p.is_empty())
        .map(std::path::PathBuf::from)
}

/// Bytes of event paths and tokens queued before further events are folded per token (and
/// after which [`XenStore::take_watch_events`] stops reading the socket and returns a batch).
pub const MAX_QUEUED_EVENT_BYTES: usize = 256 * 1024;

#[derive(Debug)]
struct Inner {
    next_req: u32,
    rbuf: Vec<u8>,
    events: VecDeque<WatchEvent>,
    /// Path and token bytes in `events`.
    queued_bytes: usize,
    /// Registered watches: token → watched path.
    watches: HashMap<String, String>,
    /// Tokens whose folded event is queued.
    folded: HashSet<String>,
}

/// A blocking xenstore connection.
#[derive(Debug)]
pub struct XsClient {
    fd: OwnedFd,
    inner: Mutex<Inner>,
}

impl XsClient {
    /// Connect to `$XENSTORED_PATH` if set (see [`XsClient::open_path`]), else to the first
    /// available of [`SOCKET_PATHS`], else open [`XENBUS_PATH`].
    pub fn open() -> io::Result<XsClient> {
        if let Some(p) = xenstored_path_from_env() {
            return XsClient::open_path(&p);
        }
        for p in SOCKET_PATHS {
            if let Ok(s) = UnixStream::connect(p) {
                return Ok(XsClient::from_fd(s.into()));
            }
        }
        XsClient::open_xenbus(Path::new(XENBUS_PATH))
    }

    /// Connect to the xenstored socket at `path`, or open it as a xenbus device node when
    /// it exists and is not a socket.
    pub fn open_path(path: &Path) -> io::Result<XsClient> {
        use std::os::unix::fs::FileTypeExt;
        let is_socket = std::fs::metadata(path).map_or(true, |m| m.file_type().is_socket());
        if is_socket {
            UnixStream::connect(path).map(|s| XsClient::from_fd(s.into()))
        } else {
            XsClient::open_xenbus(path)
        }
    }

    /// Open a xenbus device node.
    pub fn open_xenbus(path: &Path) -> io::Result<XsClient> {
        let f = OpenOptions::new().read(true).write(true).open(path)?;
        Ok(XsClient::from_fd(f.into()))
    }

    /// Use an already connected stream (a Unix socket, or a socketpair in tests).
    pub fn from_fd(fd: OwnedFd) -> XsClient {
        XsClient {
            fd,
            inner: Mutex::new(Inner {
                next_req: 1,
                rbuf: Vec::new(),
                events: VecDeque::new(),
                queued_bytes: 0,
                watches: HashMap::new(),
                folded: HashSet::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent state (buffers only): keep going.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn write_all(&self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            match nix::unistd::write(&self.fd, buf) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => buf = &buf[n..],
                Err(Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Read one whole message (blocking).
    fn read_message(&self, inner: &mut Inner) -> Result<Message, XsError> {
        loop {
            if let Some((msg, used)) = wire::decode(&inner.rbuf)? {
                inner.rbuf.drain(..used);
                return Ok(msg);
            }
            let mut chunk = [0u8; 4096 + wire::HEADER_SIZE];
            match nix::unistd::read(&self.fd, &mut chunk) {
                Ok(0) => return Err(XsError::Io(io::ErrorKind::UnexpectedEof.into())),
                Ok(n) => inner.rbuf.extend_from_slice(&chunk[..n]),
                Err(Errno::EINTR) => {}
                Err(e) => return Err(XsError::Io(e.into())),
            }
        }
    }

    /// Queue an event; `fold`: past the byte budget, fold it into its token's folded event
    /// (while waiting for a reply, when the stream cannot be left unread).
    fn queue_event(inner: &mut Inner, msg: &Message, fold: bool) -> Result<(), XsError> {
        let parts = wire::split_strings(&msg.payload)?;
        if parts.len() < 2 {
            return Err(XsError::Protocol(wire::WireError::BadStrings));
        }
        let (path, token) = (parts[0], parts[1]);
        let size = path.len() + token.len();
        if !fold || inner.queued_bytes + size <= MAX_QUEUED_EVENT_BYTES {
            inner.queued_bytes += size;
            inner.events.push_back(WatchEvent {
                path: path.to_owned(),
                token: token.to_owned(),
            });
        } else if !inner.folded.contains(token) {
            let path = inner
                .watches
                .get(token)
                .cloned()
                .unwrap_or_else(|| path.to_owned());
            inner.queued_bytes += path.len() + token.len();
            inner.folded.insert(token.to_owned());
            inner.events.push_back(WatchEvent {
                path,
                token: token.to_owned(),
            });
        }
        Ok(())
    }

    /// Send one request and wait for its reply payload.
    pub fn call(&self, ty: MsgType, tx: Tx, payload: Vec<u8>) -> Result<Vec<u8>, XsError> {
        let mut inner = self.lock();
        let req_id = inner.next_req;
        inner.next_req = inner.next_req.wrapping_add(1);
        let bytes = Message::new(ty, req_id, tx.0, payload).encode()?;
        self.write_all(&bytes).map_err(XsError::Io)?;
        loop {
            let msg = self.read_message(&mut inner)?;
            if msg.ty == MsgType::WatchEvent {
                Self::queue_event(&mut inner, &msg, true)?;
                continue;
            }
            if msg.req_id != req_id {
                log::warn!("xenstore: dropping reply to unknown request {}", msg.req_id);
                continue;
            }
            if msg.ty == MsgType::Error {
                return Err(XsError::Errno(wire::parse_error(&msg.payload)?));
            }
            return Ok(msg.payload);
        }
    }

    fn path_call(&self, ty: MsgType, tx: Tx, path: &str) -> Result<Vec<u8>, XsError> {
        self.call(ty, tx, wire::join_strings(&[path]))
    }
}

impl AsFd for XsClient {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl XenStore for XsClient {
    fn read(&self, tx: Tx, path: &str) -> Result<Option<Vec<u8>>, XsError> {
        match self.path_call(MsgType::Read, tx, path) {
            Ok(v) => Ok(Some(v)),
            Err(XsError::Errno(Errno::ENOENT)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn write(&self, tx: Tx, path: &str, value: &[u8]) -> Result<(), XsError> {
        self.call(MsgType::Write, tx, wire::write_payload(path, value))
            .map(drop)
    }

    fn directory(&self, tx: Tx, path: &str) -> Result<Vec<String>, XsError> {
        let reply = self.path_call(MsgType::Directory, tx, path)?;
        Ok(wire::split_strings(&reply)?
            .into_iter()
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect())
    }

    fn mkdir(&self, tx: Tx, path: &str) -> Result<(), XsError> {
        self.path_call(MsgType::Mkdir, tx, path).map(drop)
    }

    fn rm(&self, tx: Tx, path: &str) -> Result<(), XsError> {
        self.path_call(MsgType::Rm, tx, path).map(drop)
    }

    fn get_perms(&self, tx: Tx, path: &str) -> Result<Vec<Perm>, XsError> {
        let reply = self.path_call(MsgType::GetPerms, tx, path)?;
        wire::split_strings(&reply)?
            .into_iter()
            .map(|s| Perm::parse(s).map_err(XsError::Protocol))
            .collect()
    }

    fn set_perms(&self, tx: Tx, path: &str, perms: &[Perm]) -> Result<(), XsError> {
        let mut parts = vec![path.to_owned()];
        parts.extend(perms.iter().map(Perm::to_wire));
        self.call(MsgType::SetPerms, tx, wire::join_strings(&parts))
            .map(drop)
    }

    fn begin(&self) -> Result<Tx, XsError> {
        let reply = self.call(MsgType::TransactionStart, Tx::NONE, vec![0])?;
        Ok(Tx(wire::parse_tx_id(&reply)?))
    }

    fn end(&self, tx: Tx, commit: bool) -> Result<Committed, XsError> {
        let arg = if commit { "T" } else { "F" };
        match self.call(MsgType::TransactionEnd, tx, wire::join_strings(&[arg])) {
            Ok(_) => Ok(Committed::Done),
            Err(XsError::Errno(Errno::EAGAIN)) => Ok(Committed::Retry),
            Err(e) => Err(e),
        }
    }

    fn watch(&self, path: &str, token: &str) -> Result<(), XsError> {
        self.call(MsgType::Watch, Tx::NONE, wire::join_strings(&[path, token]))?;
        self.lock()
            .watches
            .insert(token.to_owned(), path.to_owned());
        Ok(())
    }

    fn unwatch(&self, path: &str, token: &str) -> Result<(), XsError> {
        self.call(
            MsgType::Unwatch,
            Tx::NONE,
            wire::join_strings(&[path, token]),
        )?;
        self.lock().watches.remove(token);
        Ok(())
    }

    fn has_pending_events(&self) -> bool {
        let inner = self.lock();
        !inner.events.is_empty() || !inner.rbuf.is_empty()
    }

    fn take_watch_events(&self) -> Result<Vec<WatchEvent>, XsError> {
        let mut inner = self.lock();
        // Drain whatever is already readable without blocking. No request is outstanding
        // while we hold the lock, so only watch events can arrive.
        loop {
            if inner.queued_bytes >= MAX_QUEUED_EVENT_BYTES {
                // A full batch: leave the rest (buffered or in the socket) for the next call.
                break;
            }
            if let Some((msg, used)) = wire::decode(&inner.rbuf)? {
                inner.rbuf.drain(..used);
                if msg.ty == MsgType::WatchEvent {
                    Self::queue_event(&mut inner, &msg, false)?;
                } else {
                    log::warn!("xenstore: unexpected {:?} outside a request", msg.ty);
                }
                continue;
            }
            let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::ZERO) {
                Ok(0) => break,
                Ok(_) => {}
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(XsError::Io(e.into())),
            }
            let mut chunk = [0u8; 4096 + wire::HEADER_SIZE];
            match nix::unistd::read(&self.fd, &mut chunk) {
                Ok(0) => return Err(XsError::Io(io::ErrorKind::UnexpectedEof.into())),
                Ok(n) => inner.rbuf.extend_from_slice(&chunk[..n]),
                Err(Errno::EINTR | Errno::EAGAIN) => {}
                Err(e) => return Err(XsError::Io(e.into())),
            }
        }
        inner.queued_bytes = 0;
        inner.folded.clear();
        Ok(inner.events.drain(..).collect())
    }
}
