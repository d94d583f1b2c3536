//! Kernel NBD devices (`/dev/nbdN`) backed by tapdisk's NBD exports.
//!
//! ```text
//!  netlink.rs  pure generic-netlink codec: GETFAMILY, NBD_CMD_CONNECT/DISCONNECT, replies
//!  kernel.rs   the [`KernelNbd`] trait, its netlink implementation ([`Netlink`]), a
//!              simulation (`SimKernelNbd`, feature `sim`: tests only) and [`attach`]:
//!              handshake + hand-over
//! ```
//!
//! [`attach`] connects to an export's Unix socket, negotiates with `NBD_OPT_GO` (through
//! [`crate::nbd::client`]) and gives the connected socket to the kernel with
//! `NBD_CMD_CONNECT`; the kernel keeps its own reference, so our descriptor is closed
//! afterwards. The socket path is passed as the backend identifier, so
//! `/sys/block/nbdN/backend` names the export and a device can be mapped back to its
//! tapdisk (tapback does that for major 43; `tap-ctl destroy` finds the device to
//! disconnect the same way).
//!
//! When the generic-netlink family `nbd` does not exist (module not loaded, or a kernel
//! without it) the lookup fails with [`KernelNbdError::NotAvailable`].

pub mod netlink;

use std::fmt::Debug;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
#[cfg(any(test, feature = "sim"))]
use std::sync::Mutex;
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::socket::{
    bind, recv, sendto, setsockopt, socket, sockopt, AddressFamily, MsgFlags, NetlinkAddr,
    SockFlag, SockProtocol, SockType,
};
use nix::sys::time::{TimeVal, TimeValLike};

use self::netlink::{
    connect_index, family_from_replies, get_family_request, nbd_connect_request,
    nbd_disconnect_request, Exchange, Family, GenlReply, NbdConnect, NetlinkError, GENL_ID_CTRL,
    NBD_GENL_FAMILY_NAME,
};

/// Errors of kernel NBD attach/detach.
#[derive(Debug, thiserror::Error)]
pub enum KernelNbdError {
    /// The kernel has no `nbd` generic-netlink family (driver not loaded).
    #[error("kernel nbd driver not available")]
    NotAvailable,
    /// A netlink socket call failed.
    #[error("netlink {0}")]
    Os(&'static str, #[source] Errno),
    /// No complete answer within the timeout.
    #[error("netlink {0} timed out")]
    Timeout(&'static str),
    /// The kernel answered the request with an error.
    #[error("nbd {op} refused: {}", std::io::Error::from_raw_os_error(*.errno))]
    Refused { op: &'static str, errno: i32 },
    /// A reply that does not decode.
    #[error("malformed netlink reply")]
    Codec(#[source] NetlinkError),
    /// The NBD negotiation with the export failed.
    #[error("nbd handshake with {0}")]
    Handshake(String, #[source] std::io::Error),
    /// An argument the kernel cannot take (descriptor number, non-UTF-8 path).
    #[error("invalid {0}")]
    Invalid(&'static str),
}

impl KernelNbdError {
    /// The positive errno that best describes this error.
    pub fn errno(&self) -> i32 {
        match self {
            KernelNbdError::NotAvailable => libc::ENODEV,
            KernelNbdError::Os(_, e) => *e as i32,
            KernelNbdError::Timeout(_) => libc::ETIMEDOUT,
            KernelNbdError::Refused { errno, .. } => *errno,
            KernelNbdError::Codec(_) => libc::EPROTO,
            KernelNbdError::Handshake(_, e) => e.raw_os_error().unwrap_or(libc::EIO),
            KernelNbdError::Invalid(_) => libc::EINVAL,
        }
    }
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, KernelNbdError>;

/// What `NBD_CMD_CONNECT` is told about the export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectConfig<'a> {
    /// Export size in bytes (from the handshake).
    pub size: u64,
    /// Logical block size; `None` = the kernel's default (1024 on older kernels, 512 since).
    pub block_size: Option<u32>,
    /// Transmission flags from the handshake.
    pub flags: u64,
    /// The backend identifier, `/sys/block/nbdN/backend`: the export's socket path.
    pub backend_id: &'a str,
}

/// The kernel NBD driver, as far as tap-ctl needs it.
pub trait KernelNbd: Debug + Send + Sync {
    /// Give the connected, negotiated socket `sock` to a free device; returns its index.
    fn connect(&self, sock: BorrowedFd<'_>, cfg: &ConnectConfig<'_>) -> Result<u32>;
    /// Disconnect device `index` (the kernel sends NBD_CMD_DISC and drops the socket).
    fn disconnect(&self, index: u32) -> Result<()>;
    /// Connected devices and their backend identifiers, by index ascending.
    fn devices(&self) -> Vec<(u32, String)>;
}

/// The index of the device whose backend identifier is `backend`.
pub fn find_by_backend(k: &dyn KernelNbd, backend: &str) -> Option<u32> {
    k.devices()
        .into_iter()
        .find(|(_, b)| b == backend)
        .map(|(i, _)| i)
}

/// The backend identifier of device `index`, if it is connected and has one.
pub fn backend_of(k: &dyn KernelNbd, index: u32) -> Option<String> {
    k.devices()
        .into_iter()
        .find(|(i, _)| *i == index)
        .map(|(_, b)| b)
}

/// `/dev/nbd<index>`.
pub fn device_path(index: u32) -> PathBuf {
    PathBuf::from(format!("/dev/nbd{index}"))
}

/// The index of a device name `nbd<N>` or `/dev/nbd<N>` (any directory), else `None`.
pub fn parse_device_name(name: &str) -> Option<u32> {
    let base = name.trim().rsplit('/').next()?;
    let digits = base.strip_prefix("nbd")?;
    if digits.is_empty() || digits.len() > 9 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// A block size the kernel accepts (a power of two from 512 to 4096), else `None`.
pub fn valid_block_size(bs: u32) -> Option<u32> {
    (bs.is_power_of_two() && (512..=4096).contains(&bs)).then_some(bs)
}

/// Negotiate with the export at `socket` (fixed newstyle, `NBD_OPT_GO`) and hand the
/// connection to `kernel`; returns the device index. `block_size` is the VBD's sector size
/// (ignored when the kernel cannot take it). Our descriptor is closed on return; on
/// success the kernel holds the connection.
pub fn attach(kernel: &dyn KernelNbd, socket: &Path, block_size: u32) -> Result<u32> {
    let backend_id = socket
        .to_str()
        .ok_or(KernelNbdError::Invalid("socket path"))?;
    let client = crate::nbd::client::Client::connect(socket, false)
        .map_err(|e| KernelNbdError::Handshake(backend_id.to_string(), e))?;
    kernel.connect(
        client.stream.as_fd(),
        &ConnectConfig {
            size: client.size,
            block_size: valid_block_size(block_size),
            flags: u64::from(client.flags),
            backend_id,
        },
    )
}

/// The real driver, over generic netlink; devices are listed from sysfs.
#[derive(Debug, Clone)]
pub struct Netlink {
    sysfs: PathBuf,
    timeout: Duration,
}

impl Default for Netlink {
    fn default() -> Self {
        Netlink::new()
    }
}

impl Netlink {
    /// On `/sys`, waiting up to 30 s for each kernel answer (CONNECT waits for the device).
    pub fn new() -> Netlink {
        Netlink {
            sysfs: PathBuf::from("/sys"),
            timeout: Duration::from_secs(30),
        }
    }

    /// Read devices from another sysfs root (tests).
    pub fn with_sysfs(mut self, root: impl Into<PathBuf>) -> Netlink {
        self.sysfs = root.into();
        self
    }

    /// Resolve the `nbd` family id ([`KernelNbdError::NotAvailable`] without the driver).
    pub fn family(&self) -> Result<u16> {
        self.family_named(NBD_GENL_FAMILY_NAME).map(|f| f.id)
    }

    /// Ask the kernel about any generic-netlink family ([`KernelNbdError::NotAvailable`]
    /// when it does not exist).
    pub fn family_named(&self, name: &str) -> Result<Family> {
        GenlSocket::open(self.timeout)?.family(name)
    }
}

impl KernelNbd for Netlink {
    fn connect(&self, sock: BorrowedFd<'_>, cfg: &ConnectConfig<'_>) -> Result<u32> {
        let fd = u32::try_from(sock.as_raw_fd()).map_err(|_| KernelNbdError::Invalid("fd"))?;
        let mut s = GenlSocket::open(self.timeout)?;
        let family = s.nbd_family()?;
        let req = NbdConnect {
            index: None,
            size_bytes: cfg.size,
            block_size: cfg.block_size.map(u64::from),
            server_flags: cfg.flags,
            socket_fds: &[fd],
            backend: Some(cfg.backend_id),
        };
        let replies = s.transact("connect", family, |seq| {
            nbd_connect_request(family, seq, &req)
        })?;
        match connect_index(&replies) {
            Ok(i) => Ok(i),
            // Connected, but the reply lost the index: find the device by its backend.
            Err(e) => find_by_backend(self, cfg.backend_id).ok_or(KernelNbdError::Codec(e)),
        }
    }

    fn disconnect(&self, index: u32) -> Result<()> {
        let mut s = GenlSocket::open(self.timeout)?;
        let family = s.nbd_family()?;
        s.transact("disconnect", family, |seq| {
            nbd_disconnect_request(family, seq, index)
        })
        .map(|_| ())
    }

    fn devices(&self) -> Vec<(u32, String)> {
        let Ok(rd) = std::fs::read_dir(self.sysfs.join("block")) else {
            return Vec::new();
        };
        let mut out: Vec<(u32, String)> = rd
            .flatten()
            .filter_map(|e| {
                let index = parse_device_name(e.file_name().to_str()?)?;
                let b = std::fs::read_to_string(e.path().join("backend")).ok()?;
                let b = b.trim_end_matches(['\n', '\0']);
                (!b.is_empty()).then(|| (index, b.to_string()))
            })
            .collect();
        out.sort_unstable();
        out
    }
}

/// One generic-netlink socket and its sequence counter.
struct GenlSocket {
    fd: OwnedFd,
    seq: u32,
}

impl GenlSocket {
    fn open(timeout: Duration) -> Result<GenlSocket> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkGeneric,
        )
        .map_err(|e| KernelNbdError::Os("socket", e))?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0)).map_err(|e| KernelNbdError::Os("bind", e))?;
        let ms = i64::try_from(timeout.as_millis()).unwrap_or(i64::MAX);
        setsockopt(&fd, sockopt::ReceiveTimeout, &TimeVal::milliseconds(ms))
            .map_err(|e| KernelNbdError::Os("setsockopt", e))?;
        // Any start value works: answers are matched on the sequence number and our port.
        let seq = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(1);
        Ok(GenlSocket { fd, seq })
    }

    /// Send one request (built for the next sequence number) and collect its replies up to
    /// the ACK.
    fn transact(
        &mut self,
        op: &'static str,
        family: u16,
        build: impl FnOnce(u32) -> std::result::Result<Vec<u8>, NetlinkError>,
    ) -> Result<Vec<GenlReply>> {
        self.seq = self.seq.wrapping_add(1);
        let msg = build(self.seq).map_err(KernelNbdError::Codec)?;
        let kernel = NetlinkAddr::new(0, 0);
        loop {
            match sendto(self.fd.as_raw_fd(), &msg, &kernel, MsgFlags::empty()) {
                Ok(_) => break,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(KernelNbdError::Os("send", e)),
            }
        }
        let mut x = Exchange::new(family, self.seq);
        let mut buf = vec![0u8; 32 << 10];
        while !x.is_done() {
            let n = match recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
                Ok(0) => return Err(KernelNbdError::Os("recv", Errno::EPIPE)),
                Ok(n) => n,
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => return Err(KernelNbdError::Timeout(op)),
                Err(e) => return Err(KernelNbdError::Os("recv", e)),
            };
            x.absorb(&buf[..n.min(buf.len())]).map_err(|e| match e {
                NetlinkError::Kernel(errno) => KernelNbdError::Refused { op, errno },
                e => KernelNbdError::Codec(e),
            })?;
        }
        Ok(x.replies().to_vec())
    }

    /// The id of the `nbd` family.
    fn nbd_family(&mut self) -> Result<u16> {
        self.family(NBD_GENL_FAMILY_NAME).map(|f| f.id)
    }

    /// CTRL_CMD_GETFAMILY for `name`.
    fn family(&mut self, name: &str) -> Result<Family> {
        let r = self.transact("family lookup", GENL_ID_CTRL, |seq| {
            get_family_request(seq, name)
        });
        match r {
            Ok(replies) => family_from_replies(&replies).map_err(KernelNbdError::Codec),
            Err(KernelNbdError::Refused {
                errno: libc::ENOENT,
                ..
            }) => Err(KernelNbdError::NotAvailable),
            Err(e) => Err(e),
        }
    }
}

#[cfg(any(test, feature = "sim"))]
/// A call made to a [`SimKernelNbd`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SimCall {
    Connect {
        index: u32,
        size: u64,
        block_size: Option<u32>,
        flags: u64,
        backend_id: String,
    },
    Disconnect(u32),
}

#[cfg(any(test, feature = "sim"))]
#[derive(Debug, Default)]
struct SimState {
    first_index: u32,
    fail_connect: Option<i32>,
    /// index → (backend, the socket the "kernel" holds).
    devices: std::collections::BTreeMap<u32, (String, OwnedFd)>,
    calls: Vec<SimCall>,
}

#[cfg(any(test, feature = "sim"))]
/// In-process stand-in for the kernel driver: it takes its own reference to the socket (as
/// the kernel does) and hands out the lowest free index from a configurable start.
#[derive(Debug, Default)]
pub struct SimKernelNbd {
    state: Mutex<SimState>,
}

#[cfg(any(test, feature = "sim"))]
impl SimKernelNbd {
    /// Indices from 0.
    pub fn new() -> SimKernelNbd {
        SimKernelNbd::default()
    }

    /// Indices from `first`.
    pub fn starting_at(first: u32) -> SimKernelNbd {
        let s = SimKernelNbd::default();
        s.lock().first_index = first;
        s
    }

    /// Every CONNECT fails with `errno` (like a kernel refusing it).
    pub fn failing(errno: i32) -> SimKernelNbd {
        let s = SimKernelNbd::default();
        s.lock().fail_connect = Some(errno);
        s
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SimState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The calls made so far, in order.
    pub fn calls(&self) -> Vec<SimCall> {
        self.lock().calls.clone()
    }

    /// A duplicate of the socket device `index` holds (to talk NBD over it as the kernel
    /// would).
    pub fn socket(&self, index: u32) -> Option<OwnedFd> {
        self.lock()
            .devices
            .get(&index)
            .and_then(|(_, fd)| fd.try_clone().ok())
    }
}

#[cfg(any(test, feature = "sim"))]
impl KernelNbd for SimKernelNbd {
    fn connect(&self, sock: BorrowedFd<'_>, cfg: &ConnectConfig<'_>) -> Result<u32> {
        let mut st = self.lock();
        if let Some(errno) = st.fail_connect {
            return Err(KernelNbdError::Refused {
                op: "connect",
                errno,
            });
        }
        // The kernel insists on a socket.
        let stat = nix::sys::stat::fstat(sock).map_err(|e| KernelNbdError::Os("fstat", e))?;
        if stat.st_mode & libc::S_IFMT != libc::S_IFSOCK {
            return Err(KernelNbdError::Refused {
                op: "connect",
                errno: libc::ENOTSOCK,
            });
        }
        let held = sock.try_clone_to_owned().map_err(|e| {
            KernelNbdError::Os("dup", Errno::from_raw(e.raw_os_error().unwrap_or(0)))
        })?;
        let mut index = st.first_index;
        while st.devices.contains_key(&index) {
            index += 1;
        }
        st.devices.insert(index, (cfg.backend_id.to_string(), held));
        st.calls.push(SimCall::Connect {
            index,
            size: cfg.size,
            block_size: cfg.block_size,
            flags: cfg.flags,
            backend_id: cfg.backend_id.to_string(),
        });
        Ok(index)
    }

    fn disconnect(&self, index: u32) -> Result<()> {
        let mut st = self.lock();
        st.calls.push(SimCall::Disconnect(index));
        match st.devices.remove(&index) {
            // Dropping the descriptor closes the "kernel's" end of the connection.
            Some(_) => Ok(()),
            None => Err(KernelNbdError::Refused {
                op: "disconnect",
                errno: libc::EINVAL,
            }),
        }
    }

    fn devices(&self) -> Vec<(u32, String)> {
        self.lock()
            .devices
            .iter()
            .map(|(i, (b, _))| (*i, b.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn device_names() {
        assert_eq!(parse_device_name("/dev/nbd3"), Some(3));
        assert_eq!(parse_device_name("nbd15"), Some(15));
        assert_eq!(device_path(7), PathBuf::from("/dev/nbd7"));
        for bad in [
            "/dev/nbd",
            "nbd3.1",
            "/run/x/nbd42.3",
            "nbdx",
            "nbd-1",
            "sda",
            "nbd9999999999",
        ] {
            assert_eq!(parse_device_name(bad), None, "{bad}");
        }
        assert_eq!(valid_block_size(512), Some(512));
        assert_eq!(valid_block_size(4096), Some(4096));
        for bad in [0, 256, 768, 8192] {
            assert_eq!(valid_block_size(bad), None);
        }
    }

    #[test]
    fn sysfs_scan_finds_backends() {
        let d = tempfile::tempdir().unwrap();
        let b = d.path().join("block");
        for (dev, backend) in [
            ("nbd0", Some("")),
            ("nbd1", Some("/run/blktap-control/nbd10.1\n")),
            ("nbd12", Some("/run/blktap-control/nbd10.2\n")),
            ("nbd2", None),
            ("sda", Some("/x\n")),
        ] {
            std::fs::create_dir_all(b.join(dev)).unwrap();
            if let Some(s) = backend {
                std::fs::write(b.join(dev).join("backend"), s).unwrap();
            }
        }
        let k = Netlink::new().with_sysfs(d.path());
        assert_eq!(
            k.devices(),
            vec![
                (1, "/run/blktap-control/nbd10.1".to_string()),
                (12, "/run/blktap-control/nbd10.2".to_string())
            ]
        );
        assert_eq!(find_by_backend(&k, "/run/blktap-control/nbd10.2"), Some(12));
        assert_eq!(find_by_backend(&k, "/run/blktap-control/nbd10.3"), None);
        assert_eq!(
            backend_of(&k, 1).as_deref(),
            Some("/run/blktap-control/nbd10.1")
        );
        assert_eq!(backend_of(&k, 0), None);
        // A missing sysfs is an empty list.
        assert!(Netlink::new()
            .with_sysfs(d.path().join("no"))
            .devices()
            .is_empty());
    }

    /// The real netlink path: without the nbd module the family lookup is a clean
    /// "not available"; where the driver exists the lookup gives a dynamic family id.
    #[test]
    fn real_family_lookup_is_clean() {
        match Netlink::new().family() {
            Err(KernelNbdError::NotAvailable) => {}
            Ok(id) => assert!(id >= 0x10, "family id {id}"),
            Err(e) => panic!("unexpected {e:?}"),
        }
    }

    /// The same path against a family every kernel has: the generic-netlink controller
    /// itself (id 0x10, multicast group "notify"); an unknown name is "not available".
    #[test]
    fn real_family_lookup_decodes_the_kernel_reply() {
        let k = Netlink::new();
        let f = k.family_named("nlctrl").unwrap();
        assert_eq!((f.id, f.name.as_str()), (0x10, "nlctrl"));
        assert!(f.version >= 1);
        assert!(f.mcast_groups.iter().any(|g| g.name == "notify"), "{f:?}");
        assert!(matches!(
            k.family_named("nosuchfamily"),
            Err(KernelNbdError::NotAvailable)
        ));
    }

    #[test]
    fn simulation_holds_the_socket_and_refuses_non_sockets() {
        let k = SimKernelNbd::starting_at(3);
        let (a, mut b) = UnixStream::pair().unwrap();
        let cfg = ConnectConfig {
            size: 4096,
            block_size: Some(512),
            flags: 1,
            backend_id: "/r/nbd1.0",
        };
        assert_eq!(k.connect(a.as_fd(), &cfg).unwrap(), 3);
        assert_eq!(k.connect(a.as_fd(), &cfg).unwrap(), 4);
        drop(a);
        // The simulated kernel still holds the connection.
        let held = UnixStream::from(k.socket(3).unwrap());
        std::io::Write::write_all(&mut &held, b"x").unwrap();
        let mut c = [0u8; 1];
        std::io::Read::read_exact(&mut b, &mut c).unwrap();
        assert_eq!(&c, b"x");
        drop(held);
        k.disconnect(3).unwrap();
        k.disconnect(4).unwrap();
        assert_eq!(k.disconnect(3).unwrap_err().errno(), libc::EINVAL);
        // Every holder gone: the peer sees EOF.
        assert_eq!(std::io::Read::read(&mut b, &mut c).unwrap(), 0);
        let f = tempfile::tempfile().unwrap();
        assert_eq!(
            k.connect(f.as_fd(), &cfg).unwrap_err().errno(),
            libc::ENOTSOCK
        );
        assert_eq!(k.calls().len(), 5);
        let k = SimKernelNbd::failing(libc::EBUSY);
        let (a, _b) = UnixStream::pair().unwrap();
        assert_eq!(k.connect(a.as_fd(), &cfg).unwrap_err().errno(), libc::EBUSY);
    }

    #[test]
    fn attach_to_a_dead_socket_is_a_handshake_error() {
        let d = tempfile::tempdir().unwrap();
        let k = SimKernelNbd::new();
        let e = attach(&k, &d.path().join("nbd1.0"), 512).unwrap_err();
        assert!(matches!(e, KernelNbdError::Handshake(..)), "{e:?}");
        assert!(k.calls().is_empty());
    }
}
