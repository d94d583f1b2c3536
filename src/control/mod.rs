//! The tap-ctl ⇄ tapdisk control protocol: message codec ([`msg`]), the daemon-side socket
//! server ([`server`]), the libblktapctl-style client ([`client`]) and minor marker files
//! ([`minors`]).
//!
//! # Paths and environment
//!
//! Everything lives under one control directory, `/run/blktap-control` by default. The
//! environment variable [`CONTROL_DIR_ENV`] (`BLKTAP_CONTROL_DIR`) overrides it for the client,
//! the server, the minors code and `tap-ctl` alike (tests and non-root use). A tapdisk spawned
//! by the client inherits the caller's environment, so it sees the same directory.
//!
//! | Path | Meaning |
//! |---|---|
//! | `<dir>/ctl<pid>` | control socket of tapdisk `<pid>` ([`socket_path`]) |
//! | `<dir>/tapdisk/tapdisk-<minor>` | minor marker file ([`minors::marker_path`]) |
//! | `<dir>/nbd<pid>.<minor>` | NBD socket of a VBD ([`nbd_socket_path`]) |
//!
//! The tapdisk binary the client spawns is found through [`TAPDISK_ENV`] (`BLKTAP_TAPDISK`),
//! else a `tapdisk` next to the current executable, else `/usr/libexec/tapdisk`.
//!
//! `create` hands each new VBD's NBD export to the kernel NBD driver and returns `/dev/nbdN`
//! when it can (generic netlink, see [`crate::nbd::kernel`]), else the socket path.
//! [`NBD_DEVICE_ENV`] (`BLKTAP_NBD_DEVICE`) set to `0`/`no`/`off`/`false` turns that off:
//! `create` then always returns the socket path. `destroy` disconnects the device either way.
//!
//! For blktap2-era scripts, a VBD on `/dev/nbdN` also gets the symlink
//! `/dev/xen/blktap-2/tapdev<minor>` → `/dev/nbdN` ([`tapdev`]); [`TAPDEV_DIR_ENV`]
//! (`BLKTAP_TAPDEV_DIR`) overrides that directory. A VBD reachable only through its socket
//! gets no link (a socket is not a block device).

pub mod client;
pub mod minors;
pub mod msg;
pub mod server;
pub mod tapdev;
mod transport;

use std::io;
use std::path::{Path, PathBuf};

/// Environment variable overriding the control directory (default [`DEFAULT_CONTROL_DIR`]).
pub const CONTROL_DIR_ENV: &str = "BLKTAP_CONTROL_DIR";
/// The control directory used when [`CONTROL_DIR_ENV`] is unset or empty.
pub const DEFAULT_CONTROL_DIR: &str = "/run/blktap-control";
/// Environment variable naming the tapdisk binary the client spawns.
pub const TAPDISK_ENV: &str = "BLKTAP_TAPDISK";
/// Where tapdisk is installed when [`TAPDISK_ENV`] is unset and no sibling binary exists.
pub const DEFAULT_TAPDISK: &str = "/usr/libexec/tapdisk";

/// Environment variable: `0`, `no`, `off` or `false` (any case) stop `create` from attaching
/// kernel NBD devices; unset or anything else lets it try.
pub const NBD_DEVICE_ENV: &str = "BLKTAP_NBD_DEVICE";

/// Environment variable overriding the directory of the `tapdev<minor>` compatibility links
/// (default [`DEFAULT_TAPDEV_DIR`]).
pub const TAPDEV_DIR_ENV: &str = "BLKTAP_TAPDEV_DIR";
/// Where blktap2 put its `tapdev<minor>` block devices, and we put links to `/dev/nbdN`.
pub const DEFAULT_TAPDEV_DIR: &str = "/dev/xen/blktap-2";

/// The tapdev link directory: `$BLKTAP_TAPDEV_DIR` if set and non-empty, else
/// `/dev/xen/blktap-2`.
pub fn tapdev_dir() -> PathBuf {
    match std::env::var_os(TAPDEV_DIR_ENV) {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from(DEFAULT_TAPDEV_DIR),
    }
}

/// The control directory: `$BLKTAP_CONTROL_DIR` if set and non-empty, else `/run/blktap-control`.
pub fn control_dir() -> PathBuf {
    match std::env::var_os(CONTROL_DIR_ENV) {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from(DEFAULT_CONTROL_DIR),
    }
}

/// `<dir>/ctl<pid>`: the control socket of tapdisk `pid`.
pub fn socket_path(dir: &Path, pid: i32) -> PathBuf {
    dir.join(format!("ctl{pid}"))
}

/// `<dir>/nbd<pid>.<minor>`: the NBD socket a tapdisk serves VBD `minor` on.
pub fn nbd_socket_path(dir: &Path, pid: i32, minor: u16) -> PathBuf {
    dir.join(format!("nbd{pid}.{minor}"))
}

/// Parse `(pid, minor)` out of an NBD socket name `nbd<pid>.<minor>` (optionally with a
/// directory and trailing NULs/whitespace, as xenstore and sysfs values carry); the name
/// must be exactly that, with a positive pid.
pub fn nbd_from_socket_name(name: &str) -> Option<(i32, u16)> {
    let s = name.trim_end_matches('\0').trim();
    let base = s.rsplit('/').next()?;
    let (pid, minor) = base.strip_prefix("nbd")?.split_once('.')?;
    let digits = |t: &str| !t.is_empty() && t.len() <= 10 && t.bytes().all(|b| b.is_ascii_digit());
    if !digits(pid) || !digits(minor) {
        return None;
    }
    let pid = pid.parse::<i32>().ok().filter(|p| *p > 0)?;
    let minor = minor.parse::<u16>().ok()?;
    Some((pid, minor))
}

/// Parse the pid out of a control socket name (`ctl<pid>`, optionally with a directory).
pub fn pid_from_socket_name(name: &str) -> Option<i32> {
    let base = name.trim_end().rsplit('/').next()?;
    let digits = base.strip_prefix("ctl")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<i32>().ok().filter(|p| *p > 0)
}

/// The C library's `strerror` text for a positive errno (what tap-ctl prints).
pub fn strerror(errno: i32) -> String {
    let s = io::Error::from_raw_os_error(errno).to_string();
    match s.strip_suffix(&format!(" (os error {errno})")) {
        Some(t) => t.to_string(),
        None => s,
    }
}

/// Errors of the control protocol, its transport and the minor files.
/// [`ControlError::errno`] gives the positive errno that tap-ctl exits with and that
/// ERROR replies carry.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Malformed message or argument (EINVAL).
    #[error("invalid {0}")]
    Invalid(String),
    /// A blkif protocol value other than 1..3 (EPROTONOSUPPORT).
    #[error("unsupported blkif protocol {0}")]
    BadProto(u32),
    /// The tapdisk answered with an ERROR message carrying this positive errno.
    #[error("tapdisk error: {}", strerror(*.0))]
    Remote(i32),
    /// The tapdisk answered with a reply of the wrong type (EINVAL).
    #[error("unexpected reply type {0}")]
    UnexpectedReply(u16),
    /// The exchange did not finish within the timeout (ETIMEDOUT).
    #[error("timed out")]
    Timeout,
    /// The peer closed the connection before a whole message arrived (EPIPE... reported as EIO).
    #[error("connection closed by peer")]
    Closed,
    /// An operating-system call failed.
    #[error("{op}")]
    Io {
        op: String,
        #[source]
        source: io::Error,
    },
    /// A plain errno with context (ENOENT for a missing minor, EBUSY, ...).
    #[error("{op}: {}", strerror(*.errno as i32))]
    Os {
        op: String,
        errno: nix::errno::Errno,
    },
}

impl ControlError {
    /// The positive errno for this error.
    pub fn errno(&self) -> i32 {
        match self {
            ControlError::Invalid(_) | ControlError::UnexpectedReply(_) => libc::EINVAL,
            ControlError::BadProto(_) => libc::EPROTONOSUPPORT,
            ControlError::Remote(e) => {
                if *e > 0 {
                    *e
                } else {
                    libc::EIO
                }
            }
            ControlError::Timeout => libc::ETIMEDOUT,
            ControlError::Closed => libc::EIO,
            ControlError::Io { source, .. } => match source.kind() {
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => libc::ETIMEDOUT,
                _ => source.raw_os_error().unwrap_or(libc::EIO),
            },
            ControlError::Os { errno, .. } => *errno as i32,
        }
    }

    /// `Invalid` with a message.
    pub fn invalid(what: impl Into<String>) -> Self {
        ControlError::Invalid(what.into())
    }

    /// `Io` with an operation description.
    pub fn io(op: impl Into<String>, source: io::Error) -> Self {
        ControlError::Io {
            op: op.into(),
            source,
        }
    }

    /// `Os` with an operation description.
    pub fn os(op: impl Into<String>, errno: nix::errno::Errno) -> Self {
        ControlError::Os {
            op: op.into(),
            errno,
        }
    }
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, ControlError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_names() {
        let d = Path::new("/run/blktap-control");
        assert_eq!(
            socket_path(d, 42),
            PathBuf::from("/run/blktap-control/ctl42")
        );
        assert_eq!(
            nbd_socket_path(d, 42, 3),
            PathBuf::from("/run/blktap-control/nbd42.3")
        );
        assert_eq!(
            pid_from_socket_name("/run/blktap-control/ctl42\n"),
            Some(42)
        );
        assert_eq!(pid_from_socket_name("ctl7"), Some(7));
        assert_eq!(pid_from_socket_name("ctl"), None);
        assert_eq!(pid_from_socket_name("ctl-1"), None);
        assert_eq!(pid_from_socket_name("ctl0"), None);
        assert_eq!(pid_from_socket_name("nbd42.3"), None);
        assert_eq!(pid_from_socket_name("ctl99999999999"), None);
    }

    #[test]
    fn nbd_socket_names() {
        assert_eq!(
            nbd_from_socket_name("/run/blktap-control/nbd42.3"),
            Some((42, 3))
        );
        assert_eq!(nbd_from_socket_name("nbd1.0"), Some((1, 0)));
        let p = nbd_socket_path(Path::new("/d"), 7, 65535);
        assert_eq!(nbd_from_socket_name(p.to_str().unwrap()), Some((7, 65535)));
        assert_eq!(nbd_from_socket_name("/x/nbd42.3\0"), Some((42, 3)));
        for bad in [
            "",
            "nbd",
            "nbd42",
            "nbd42.",
            "nbd.3",
            "nbd0.1",
            "nbd-1.2",
            "nbd4.70000",
            "nbd4.3x",
            "/dev/nbd0",
            "nbd99999999999.1",
            "ctl42",
            "nbd4 .3",
        ] {
            assert_eq!(nbd_from_socket_name(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn strerror_is_the_c_text() {
        assert_eq!(strerror(libc::EAGAIN), "Resource temporarily unavailable");
        assert_eq!(strerror(libc::ENOENT), "No such file or directory");
    }

    #[test]
    fn errnos() {
        assert_eq!(ControlError::invalid("x").errno(), libc::EINVAL);
        assert_eq!(ControlError::BadProto(9).errno(), libc::EPROTONOSUPPORT);
        assert_eq!(ControlError::Remote(libc::EBUSY).errno(), libc::EBUSY);
        assert_eq!(ControlError::Remote(-3).errno(), libc::EIO);
        assert_eq!(ControlError::Timeout.errno(), libc::ETIMEDOUT);
        assert_eq!(
            ControlError::io("x", io::Error::from_raw_os_error(libc::ENOENT)).errno(),
            libc::ENOENT
        );
        assert_eq!(
            ControlError::os("x", nix::errno::Errno::EWOULDBLOCK).errno(),
            libc::EWOULDBLOCK
        );
    }
}
