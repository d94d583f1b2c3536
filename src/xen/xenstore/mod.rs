//! xenstore: the [`XenStore`] trait, permissions, watch events and the transaction helper.
//!
//! Implementations: [`client::XsClient`] (real, wire protocol over the xenstored socket or
//! `/dev/xen/xenbus`) and `xen::sim::MemXsConn` (in-memory, feature `sim`).

pub mod client;
pub mod wire;

use std::io;
use std::os::fd::AsFd;

use nix::errno::Errno;

use super::DomId;

pub use client::XsClient;

/// A transaction id; [`Tx::NONE`] (0) means "outside any transaction".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tx(pub u32);

impl Tx {
    /// No transaction.
    pub const NONE: Tx = Tx(0);
}

/// A fired watch: `path` changed (or the watch was just registered), `token` as registered.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct WatchEvent {
    pub path: String,
    pub token: String,
}

/// Access granted by one permission entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Access {
    /// `n`
    None,
    /// `r`
    Read,
    /// `w`
    Write,
    /// `b`
    Both,
}

/// One permission entry. In a node's list the first entry names the owner and gives the access
/// of every domain not listed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Perm {
    pub dom: DomId,
    pub access: Access,
}

impl Perm {
    /// Wire form: `r5`, `n0`, ...
    pub fn to_wire(&self) -> String {
        let c = match self.access {
            Access::None => 'n',
            Access::Read => 'r',
            Access::Write => 'w',
            Access::Both => 'b',
        };
        format!("{c}{}", self.dom.0)
    }

    /// Parse the wire form.
    pub fn parse(s: &str) -> Result<Perm, wire::WireError> {
        let bad = || wire::WireError::BadPerm(s.to_owned());
        let mut chars = s.chars();
        let access = match chars.next() {
            Some('n') => Access::None,
            Some('r') => Access::Read,
            Some('w') => Access::Write,
            Some('b') => Access::Both,
            _ => return Err(bad()),
        };
        let rest = chars.as_str();
        if rest.is_empty() || !rest.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let dom = rest.parse::<u16>().map_err(|_| bad())?;
        Ok(Perm {
            dom: DomId(dom),
            access,
        })
    }
}

/// Outcome of ending a transaction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Committed {
    /// Committed (or aborted, when `commit` was false).
    Done,
    /// Conflict (`EAGAIN`): nothing was applied; run the transaction again.
    Retry,
}

/// xenstore failures.
#[derive(Debug, thiserror::Error)]
pub enum XsError {
    /// The store answered with an error (`ENOENT`, `EACCES`, `EAGAIN`, ...).
    #[error("xenstore returned {}", wire::errno_name(*.0))]
    Errno(Errno),
    /// Talking to the store failed.
    #[error("xenstore connection failed")]
    Io(#[source] io::Error),
    /// The store sent something we cannot parse.
    #[error("xenstore protocol violation")]
    Protocol(#[source] wire::WireError),
    /// A transaction kept conflicting.
    #[error("transaction still conflicting after {0} attempts")]
    TooManyRetries(u32),
}

impl XsError {
    /// The errno this maps to (for exit codes and control replies).
    pub fn errno(&self) -> Errno {
        match self {
            XsError::Errno(e) => *e,
            XsError::Io(e) => e.raw_os_error().map_or(Errno::EIO, Errno::from_raw),
            XsError::Protocol(_) => Errno::EPROTO,
            XsError::TooManyRetries(_) => Errno::EAGAIN,
        }
    }
}

impl From<wire::WireError> for XsError {
    fn from(e: wire::WireError) -> XsError {
        XsError::Protocol(e)
    }
}

/// A xenstore connection. The fd becomes readable when watch events may be pending: call
/// [`take_watch_events`](Self::take_watch_events) after it polls readable and after any other
/// call (events that arrived while waiting for a reply are queued, not lost).
pub trait XenStore: AsFd {
    /// Value of `path`; `None` if it does not exist.
    fn read(&self, tx: Tx, path: &str) -> Result<Option<Vec<u8>>, XsError>;
    /// Create or replace `path` (missing parents are created).
    fn write(&self, tx: Tx, path: &str, value: &[u8]) -> Result<(), XsError>;
    /// Children names of `path` (`ENOENT` if it does not exist).
    fn directory(&self, tx: Tx, path: &str) -> Result<Vec<String>, XsError>;
    /// Create `path` with an empty value if it does not exist.
    fn mkdir(&self, tx: Tx, path: &str) -> Result<(), XsError>;
    /// Remove `path` and everything under it (fine if absent while the parent exists).
    fn rm(&self, tx: Tx, path: &str) -> Result<(), XsError>;
    /// Permissions of `path`.
    fn get_perms(&self, tx: Tx, path: &str) -> Result<Vec<Perm>, XsError>;
    /// Replace the permissions of `path` (first entry: owner and default).
    fn set_perms(&self, tx: Tx, path: &str, perms: &[Perm]) -> Result<(), XsError>;
    /// Start a transaction.
    fn begin(&self) -> Result<Tx, XsError>;
    /// Commit (`commit = true`) or abort a transaction.
    fn end(&self, tx: Tx, commit: bool) -> Result<Committed, XsError>;
    /// Watch `path` and everything under it. Fires once right away with `path` itself.
    fn watch(&self, path: &str, token: &str) -> Result<(), XsError>;
    /// Remove a watch.
    fn unwatch(&self, path: &str, token: &str) -> Result<(), XsError>;
    /// Take every queued watch event (non-blocking).
    fn take_watch_events(&self) -> Result<Vec<WatchEvent>, XsError>;

    /// Watch events already received (queued while a request waited for its reply, or
    /// bytes read past a reply) that the next [`XenStore::take_watch_events`] returns
    /// although the descriptor may not be readable any more: a caller about to sleep on the
    /// descriptor must not while this is true.
    fn has_pending_events(&self) -> bool {
        false
    }

    /// Read a value as UTF-8 text (`None` if absent); bad UTF-8 is a protocol error.
    fn read_string(&self, tx: Tx, path: &str) -> Result<Option<String>, XsError> {
        match self.read(tx, path)? {
            None => Ok(None),
            Some(v) => String::from_utf8(v)
                .map(Some)
                .map_err(|_| XsError::Protocol(wire::WireError::NotUtf8)),
        }
    }
}

/// Maximum attempts of [`transaction`].
pub const TRANSACTION_ATTEMPTS: u32 = 16;

/// Run `f` in a transaction, retrying the whole body on `EAGAIN` (from `f` or from the commit).
/// Any other error from `f` aborts the transaction and is returned.
pub fn transaction<X, T, F>(xs: &X, mut f: F) -> Result<T, XsError>
where
    X: XenStore + ?Sized,
    F: FnMut(Tx) -> Result<T, XsError>,
{
    for _ in 0..TRANSACTION_ATTEMPTS {
        let tx = xs.begin()?;
        match f(tx) {
            Ok(v) => match xs.end(tx, true)? {
                Committed::Done => return Ok(v),
                Committed::Retry => continue,
            },
            Err(XsError::Errno(Errno::EAGAIN)) => {
                let _ = xs.end(tx, false);
                continue;
            }
            Err(e) => {
                let _ = xs.end(tx, false);
                return Err(e);
            }
        }
    }
    Err(XsError::TooManyRetries(TRANSACTION_ATTEMPTS))
}
