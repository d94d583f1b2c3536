//! The libblktapctl-style client: talk to tapdisks by pid over `<dir>/ctl<pid>`.
//!
//! Every call opens one connection, sends one request and reads the whole reply. `timeout`
//! (where taken) bounds the whole exchange and gives ETIMEDOUT; `None` waits forever like
//! libblktapctl without a timeval. An ERROR reply becomes [`ControlError::Remote`] with its
//! positive errno, a reply of the wrong type [`ControlError::UnexpectedReply`] (EINVAL).

use std::io::Read;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::minors;
use super::msg::{
    read_reply, split_params, Blkif, DiskInfo, ListEntry, OpenRequest, Reply, Request,
    ResumeRequest, VbdState, WireLayout,
};
use super::tapdev;
use super::transport::{DeadlineReader, NoSigPipeWriter};
use super::{
    control_dir, nbd_from_socket_name, nbd_socket_path, pid_from_socket_name, socket_path,
    tapdev_dir, ControlError, Result, CONTROL_DIR_ENV, DEFAULT_TAPDISK, NBD_DEVICE_ENV,
    TAPDISK_ENV,
};
use crate::nbd::kernel::{self, KernelNbd};
use crate::util::error_chain;

/// How long `spawn` waits for the tapdisk to report its control socket.
pub const SPAWN_TIMEOUT: Duration = Duration::from_secs(30);
/// How often `spawn` retries a tapdisk killed by SIGUSR1 during start-up (a bugtool race).
pub const SPAWN_RETRIES: u32 = 5;

/// One row of `tap-ctl list`: the outer join of marker files, live tapdisks and their VBDs.
/// Missing fields are `None`.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct TapEntry {
    pub pid: Option<i32>,
    pub minor: Option<u16>,
    pub state: Option<VbdState>,
    /// Disk type (`vhd`, `aio`, ...).
    pub disk_type: Option<String>,
    pub path: Option<String>,
}

/// A VBD made by [`Client::create`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Created {
    pub pid: i32,
    pub minor: u16,
    /// The device the VBD is reachable through: `/dev/nbd<N>` when the kernel NBD driver
    /// took the export, else the NBD socket `<dir>/nbd<pid>.<minor>`.
    pub devname: PathBuf,
    /// The blktap2-style link `<tapdev dir>/tapdev<minor>` → `/dev/nbd<N>`, when it was
    /// made (never for a socket; a failure to make it is logged, not an error).
    pub tapdev: Option<PathBuf>,
}

/// How a [`Client`] uses the kernel NBD driver.
#[derive(Clone, Debug)]
enum KernelMode {
    /// The real driver over netlink; `create` attaches unless `BLKTAP_NBD_DEVICE` says no.
    Auto,
    /// Never attach nor look for devices.
    Off,
    /// This implementation (a simulation in tests), whatever the environment says.
    With(Arc<dyn KernelNbd>),
}

/// The tapdisk binary: `$BLKTAP_TAPDISK`, else `tapdisk` next to the current executable, else
/// `/usr/libexec/tapdisk`.
pub fn tapdisk_binary() -> PathBuf {
    if let Some(p) = std::env::var_os(TAPDISK_ENV).filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            let sib = dir.join("tapdisk");
            if sib.is_file() {
                return sib;
            }
        }
    }
    PathBuf::from(DEFAULT_TAPDISK)
}

/// A control client bound to one control directory.
#[derive(Clone, Debug)]
pub struct Client {
    dir: PathBuf,
    tapdev_dir: PathBuf,
    tapdisk: Option<PathBuf>,
    timeout: Option<Duration>,
    kernel: KernelMode,
}

impl Default for Client {
    fn default() -> Self {
        Client::new()
    }
}

impl Client {
    /// A client on [`control_dir()`] (honours `BLKTAP_CONTROL_DIR`).
    pub fn new() -> Client {
        Client::with_dir(control_dir())
    }

    /// A client on an explicit control directory (the tapdev link directory still comes from
    /// `BLKTAP_TAPDEV_DIR`, else `/dev/xen/blktap-2`; see [`Client::with_tapdev_dir`]).
    pub fn with_dir(dir: impl Into<PathBuf>) -> Client {
        Client {
            dir: dir.into(),
            tapdev_dir: tapdev_dir(),
            tapdisk: None,
            timeout: None,
            kernel: KernelMode::Auto,
        }
    }

    /// Attach created VBDs to (and on destroy detach them from) this kernel NBD
    /// implementation instead of the real driver; `BLKTAP_NBD_DEVICE` is not consulted.
    pub fn with_kernel_nbd(mut self, k: Arc<dyn KernelNbd>) -> Client {
        self.kernel = KernelMode::With(k);
        self
    }

    /// Never use kernel NBD devices: `create` returns the socket path.
    pub fn without_kernel_nbd(mut self) -> Client {
        self.kernel = KernelMode::Off;
        self
    }

    /// The driver `create` attaches with, if any.
    fn kernel_for_create(&self) -> Option<Arc<dyn KernelNbd>> {
        match &self.kernel {
            KernelMode::Off => None,
            KernelMode::With(k) => Some(k.clone()),
            KernelMode::Auto
                if !crate::util::switched_on(std::env::var_os(NBD_DEVICE_ENV).as_deref()) =>
            {
                None
            }
            KernelMode::Auto => Some(Arc::new(kernel::Netlink::new())),
        }
    }

    /// The driver whose devices `destroy` cleans up: the environment switch only governs
    /// creation, a device that exists is always disconnected.
    fn kernel_for_cleanup(&self) -> Option<Arc<dyn KernelNbd>> {
        match &self.kernel {
            KernelMode::Off => None,
            KernelMode::With(k) => Some(k.clone()),
            KernelMode::Auto => Some(Arc::new(kernel::Netlink::new())),
        }
    }

    /// The index of the kernel NBD device attached to VBD (`pid`, `minor`), if any.
    ///
    /// The kernel's backend identifier (`/sys/block/nbdN/backend`) says which device holds
    /// the VBD's socket. Kernels older than the identifier (Linux 4.14 of OpenXT 8 among
    /// them) accept and ignore it; there the `tapdev<minor>` link `create` made is the
    /// record, trusted only while `pid` is the tapdisk of `minor` (a stale pid must not
    /// reach the device of the VBD that now has the minor) and unless the kernel names
    /// another backend for that device.
    pub fn nbd_device_of(&self, pid: i32, minor: u16) -> Option<u32> {
        let k = self.kernel_for_cleanup()?;
        let sock = nbd_socket_path(&self.dir, pid, minor);
        let sock = sock.to_str()?;
        if let Some(index) = kernel::find_by_backend(&*k, sock) {
            return Some(index);
        }
        if self.pid_of_minor(minor) != Some(pid) {
            return None;
        }
        let index = self.linked_device(minor)?;
        match kernel::backend_of(&*k, index) {
            Some(other) if other != sock => None,
            _ => Some(index),
        }
    }

    /// The VBD (`pid`, `minor`) behind kernel NBD device `index`, from its backend
    /// identifier, else (kernels without one) from the `tapdev<minor>` link to it and the
    /// tapdisk serving, or last serving, that minor ([`Client::pid_of_minor`]).
    pub fn vbd_of_nbd_device(&self, index: u32) -> Option<(i32, u16)> {
        let k = self.kernel_for_cleanup()?;
        if let Some(backend) = kernel::backend_of(&*k, index) {
            return nbd_from_socket_name(&backend);
        }
        let minor = self
            .tapdev_links()
            .into_iter()
            .find(|&(_, i)| i == index)
            .map(|(m, _)| m)?;
        Some((self.pid_of_minor(minor)?, minor))
    }

    /// The device index the `tapdev<minor>` link points to, if it is a link to `/dev/nbdN`.
    fn linked_device(&self, minor: u16) -> Option<u32> {
        let target = tapdev::target(&self.tapdev_dir, minor)?;
        kernel::parse_device_name(target.to_str()?).filter(|&i| kernel::device_path(i) == target)
    }

    /// Every `tapdev<minor>` link to a `/dev/nbdN`: (minor, N), by minor. A device named
    /// by more than one link (one of them stale) is left out: which VBD has it is unknown,
    /// and guessing could hand a guest, or a disconnect, another VBD's disk.
    fn tapdev_links(&self) -> Vec<(u16, u32)> {
        let Ok(rd) = std::fs::read_dir(&self.tapdev_dir) else {
            return Vec::new();
        };
        let mut out: Vec<(u16, u32)> = rd
            .flatten()
            .filter_map(|e| tapdev::parse_tapdev_name(e.file_name().to_str()?))
            .filter_map(|m| Some((m, self.linked_device(m)?)))
            .collect();
        out.sort_unstable();
        let named_twice: Vec<u32> = out
            .iter()
            .filter(|(_, i)| out.iter().filter(|(_, j)| j == i).count() > 1)
            .map(|&(_, i)| i)
            .collect();
        if !named_twice.is_empty() {
            log::warn!(
                "{}: /dev/nbd{:?} named by more than one tapdev link; ignored",
                self.tapdev_dir.display(),
                named_twice
            );
            out.retain(|(_, i)| !named_twice.contains(i));
        }
        out
    }

    /// The pid of the tapdisk serving VBD `minor`, else of the one that served it and
    /// died without closing it: the pid in the export socket `nbd<pid>.<minor>` it left
    /// in the control directory (the live one if there are several).
    pub fn pid_of_minor(&self, minor: u16) -> Option<i32> {
        let live = self
            .list()
            .ok()?
            .into_iter()
            .find(|e| e.minor == Some(minor) && e.pid.is_some())
            .and_then(|e| e.pid);
        live.or_else(|| self.export_pid_of_minor(minor))
    }

    /// The pid in an export socket `nbd<pid>.<minor>` of the control directory, preferring
    /// one whose process is alive.
    fn export_pid_of_minor(&self, minor: u16) -> Option<i32> {
        let mut pids: Vec<i32> = std::fs::read_dir(&self.dir)
            .ok()?
            .flatten()
            .filter_map(|e| nbd_from_socket_name(e.file_name().to_str()?))
            .filter(|&(_, m)| m == minor)
            .map(|(p, _)| p)
            .collect();
        pids.sort_unstable_by_key(|&p| !process_exists(p));
        pids.first().copied()
    }

    /// Bound every control exchange that is not given its own timeout (also those of
    /// [`Client::connect_xenblkif`], [`Client::tapdisks`], [`Client::list`] and
    /// [`Client::list_all`]) by `timeout`. Without it they wait as long as tapdisk takes.
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = Some(timeout);
        self
    }

    /// The default timeout of control exchanges ([`Client::with_timeout`]).
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// Use this tapdisk binary for `spawn` instead of [`tapdisk_binary()`].
    pub fn with_tapdisk(mut self, bin: impl Into<PathBuf>) -> Client {
        self.tapdisk = Some(bin.into());
        self
    }

    /// The control directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Put the `tapdev<minor>` compatibility links in `dir` instead of
    /// [`tapdev_dir()`](super::tapdev_dir).
    pub fn with_tapdev_dir(mut self, dir: impl Into<PathBuf>) -> Client {
        self.tapdev_dir = dir.into();
        self
    }

    /// The directory of the `tapdev<minor>` compatibility links.
    pub fn tapdev_dir(&self) -> &Path {
        &self.tapdev_dir
    }

    /// Remove the `tapdev<minor>` link (if `only_to`, only when it points there); failures
    /// are logged.
    fn remove_tapdev(&self, minor: u16, only_to: Option<&Path>) {
        match tapdev::unlink(&self.tapdev_dir, minor, only_to) {
            Ok(true) => log::debug!(
                "removed {}",
                tapdev::tapdev_path(&self.tapdev_dir, minor).display()
            ),
            Ok(false) => {}
            Err(e) => log::warn!(
                "remove {}: {e}",
                tapdev::tapdev_path(&self.tapdev_dir, minor).display()
            ),
        }
    }

    /// The device of the VBD `minor` of a live tapdisk: `/dev/nbd<N>` if the kernel NBD
    /// driver has its export, else the export's socket. ENOENT when no live tapdisk serves
    /// `minor` or the VBD has no export (nothing opened on it).
    pub fn find_device(&self, minor: u16) -> Result<PathBuf> {
        let pid = self
            .list()?
            .into_iter()
            .find(|e| e.minor == Some(minor) && e.pid.is_some())
            .and_then(|e| e.pid)
            .ok_or_else(|| {
                ControlError::os(format!("no tapdisk serves minor {minor}"), Errno::ENOENT)
            })?;
        if let Some(index) = self.nbd_device_of(pid, minor) {
            return Ok(kernel::device_path(index));
        }
        let sock = nbd_socket_path(&self.dir, pid, minor);
        match std::fs::symlink_metadata(&sock) {
            Ok(_) => Ok(sock),
            Err(e) => Err(ControlError::io(format!("stat {}", sock.display()), e)),
        }
    }

    /// Send one request to tapdisk `pid` and read its whole reply (ERROR replies included).
    /// `timeout` bounds the exchange; `None` uses the client's default, if any.
    pub fn send_and_receive(
        &self,
        pid: i32,
        req: &Request,
        timeout: Option<Duration>,
    ) -> Result<Reply> {
        let timeout = timeout.or(self.timeout);
        let path = socket_path(&self.dir, pid);
        let wire = req.encode()?;
        let stream = UnixStream::connect(&path)
            .map_err(|e| ControlError::io(format!("connect {}", path.display()), e))?;
        let started = Instant::now();
        {
            let mut w = NoSigPipeWriter::new(&stream, timeout);
            std::io::Write::write_all(&mut w, &wire).map_err(|e| {
                if e.kind() == std::io::ErrorKind::TimedOut {
                    ControlError::Timeout
                } else {
                    ControlError::io("send request", e)
                }
            })?;
        }
        let left = timeout.map(|t| t.saturating_sub(started.elapsed()));
        if left.is_some_and(|l| l.is_zero()) {
            return Err(ControlError::Timeout);
        }
        let mut r = DeadlineReader::new(&stream, left);
        let (_, reply) = read_reply(&mut r, WireLayout::NATIVE)?;
        log::debug!("tap-ctl: {} to {pid}: {reply:?}", req.msg_type().name());
        Ok(reply)
    }

    /// [`Client::send_and_receive`], then ERROR → `Remote(errno)`, wrong type → EINVAL.
    pub fn request(&self, pid: i32, req: &Request, timeout: Option<Duration>) -> Result<Reply> {
        let reply = self.send_and_receive(pid, req, timeout)?;
        if let Reply::Error(e) = reply {
            return Err(ControlError::Remote(e));
        }
        if reply.msg_type() != req.reply_type() {
            return Err(ControlError::UnexpectedReply(reply.msg_type() as u16));
        }
        Ok(reply)
    }

    fn expect_unit(&self, pid: i32, req: &Request, timeout: Option<Duration>) -> Result<()> {
        self.request(pid, req, timeout).map(|_| ())
    }

    /// PID: the tapdisk's own idea of its pid.
    pub fn get_pid(&self, pid: i32, timeout: Option<Duration>) -> Result<i32> {
        match self.request(pid, &Request::Pid, timeout)? {
            Reply::Pid(p) => Ok(p),
            other => Err(ControlError::UnexpectedReply(other.msg_type() as u16)),
        }
    }

    /// ATTACH VBD `minor`.
    pub fn attach(&self, pid: i32, minor: u16) -> Result<()> {
        self.expect_unit(pid, &Request::Attach { minor }, None)
    }

    /// DETACH VBD `minor`.
    pub fn detach(&self, pid: i32, minor: u16) -> Result<()> {
        self.expect_unit(pid, &Request::Detach { minor }, None)
    }

    /// OPEN: returns the image geometry.
    pub fn open(&self, pid: i32, req: OpenRequest, timeout: Option<Duration>) -> Result<DiskInfo> {
        match self.request(pid, &Request::Open(req), timeout)? {
            Reply::Open(d) => Ok(d),
            other => Err(ControlError::UnexpectedReply(other.msg_type() as u16)),
        }
    }

    /// CLOSE, or FORCE_SHUTDOWN with `force`.
    pub fn close(
        &self,
        pid: i32,
        minor: u16,
        force: bool,
        timeout: Option<Duration>,
    ) -> Result<()> {
        let req = if force {
            Request::ForceShutdown { minor }
        } else {
            Request::Close { minor }
        };
        self.expect_unit(pid, &req, timeout)
    }

    /// PAUSE.
    pub fn pause(&self, pid: i32, minor: u16, timeout: Option<Duration>) -> Result<()> {
        self.expect_unit(pid, &Request::Pause { minor }, timeout)
    }

    /// RESUME (unpause), optionally on a new leaf.
    pub fn unpause(&self, pid: i32, req: ResumeRequest, timeout: Option<Duration>) -> Result<()> {
        self.expect_unit(pid, &Request::Resume(req), timeout)
    }

    /// LIST of one tapdisk.
    pub fn list_pid(&self, pid: i32, timeout: Option<Duration>) -> Result<Vec<ListEntry>> {
        match self.request(pid, &Request::List, timeout)? {
            Reply::List(v) => Ok(v),
            other => Err(ControlError::UnexpectedReply(other.msg_type() as u16)),
        }
    }

    /// STATS of one VBD (`Some(minor)`) or all (`None`): the JSON bytes.
    pub fn stats(
        &self,
        pid: i32,
        minor: Option<u16>,
        timeout: Option<Duration>,
    ) -> Result<Vec<u8>> {
        match self.request(pid, &Request::Stats { minor }, timeout)? {
            Reply::Stats(v) => Ok(v),
            other => Err(ControlError::UnexpectedReply(other.msg_type() as u16)),
        }
    }

    /// DISK_INFO.
    pub fn info(&self, pid: i32, minor: u16, timeout: Option<Duration>) -> Result<DiskInfo> {
        match self.request(pid, &Request::DiskInfo { minor }, timeout)? {
            Reply::DiskInfo(d) => Ok(d),
            other => Err(ControlError::UnexpectedReply(other.msg_type() as u16)),
        }
    }

    /// XENBLKIF_CONNECT a ring to VBD `minor`.
    pub fn connect_xenblkif(&self, pid: i32, minor: u16, blkif: Blkif) -> Result<()> {
        self.expect_unit(pid, &Request::XenblkifConnect { minor, blkif }, None)
    }

    /// XENBLKIF_DISCONNECT the ring of (domid, devid).
    pub fn disconnect_xenblkif(
        &self,
        pid: i32,
        domid: u32,
        devid: u32,
        timeout: Option<Duration>,
    ) -> Result<()> {
        self.expect_unit(pid, &Request::XenblkifDisconnect { domid, devid }, timeout)
    }

    /// Allocate a minor (marker file).
    pub fn allocate(&self) -> Result<(u16, PathBuf)> {
        minors::allocate(&self.dir)
    }

    /// Free a minor (EWOULDBLOCK while a tapdisk holds it).
    pub fn free(&self, minor: u16) -> Result<()> {
        minors::free(&self.dir, minor)
    }

    /// The pids of every `ctl<pid>` socket in the control directory (stale ones included),
    /// ascending.
    fn socket_pids(&self) -> Result<Vec<i32>> {
        let rd = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(ControlError::io(format!("read {}", self.dir.display()), e)),
        };
        let mut pids: Vec<i32> = rd
            .flatten()
            .filter_map(|e| e.file_name().to_str().and_then(pid_from_socket_name))
            .collect();
        pids.sort_unstable();
        Ok(pids)
    }

    /// The pids of live tapdisks: every `ctl<pid>` socket whose tapdisk answers PID with
    /// that pid, ascending. Stale sockets are skipped.
    pub fn tapdisks(&self) -> Result<Vec<i32>> {
        let mut pids = Vec::new();
        for pid in self.socket_pids()? {
            match self.get_pid(pid, None) {
                Ok(p) if p == pid => pids.push(pid),
                Ok(p) => log::debug!("ctl{pid} answers pid {p}; skipped"),
                Err(e) => log::debug!("ctl{pid}: {}; skipped", error_chain(&e)),
            }
        }
        Ok(pids)
    }

    /// The VBDs of every tapdisk with a control socket that answers LIST, by pid
    /// ascending; sockets that fail (stale, wedged past the timeout) are skipped.
    pub fn list_all(&self) -> Result<Vec<(i32, Vec<ListEntry>)>> {
        let mut out = Vec::new();
        for pid in self.socket_pids()? {
            match self.list_pid(pid, None) {
                Ok(v) => out.push((pid, v)),
                Err(e) => log::debug!("tapdisk {pid} skipped: {}", error_chain(&e)),
            }
        }
        Ok(out)
    }

    /// `tap-ctl list`: every VBD of every live tapdisk, tapdisks without VBDs (pid only), and
    /// allocated minors no tapdisk serves (minor only).
    pub fn list(&self) -> Result<Vec<TapEntry>> {
        let markers = minors::list(&self.dir)?;
        let mut out = Vec::new();
        let mut served = std::collections::BTreeSet::new();
        for pid in self.tapdisks()? {
            let vbds = match self.list_pid(pid, None) {
                Ok(v) => v,
                Err(e) => {
                    log::debug!("list of {pid}: {}", error_chain(&e));
                    Vec::new()
                }
            };
            if vbds.is_empty() {
                out.push(TapEntry {
                    pid: Some(pid),
                    ..TapEntry::default()
                });
            }
            for v in vbds {
                served.insert(v.minor);
                let (disk_type, path) = split_list_params(&v.params);
                out.push(TapEntry {
                    pid: Some(pid),
                    minor: Some(v.minor),
                    state: Some(v.state),
                    disk_type,
                    path,
                });
            }
        }
        for m in markers {
            if !served.contains(&m) {
                out.push(TapEntry {
                    minor: Some(m),
                    ..TapEntry::default()
                });
            }
        }
        Ok(out)
    }

    /// The minor of the VBD serving `disk_type:path` (ENOENT if none).
    pub fn find_minor(&self, disk_type: &str, path: &str) -> Result<u16> {
        self.list()?
            .into_iter()
            .find(|e| e.disk_type.as_deref() == Some(disk_type) && e.path.as_deref() == Some(path))
            .and_then(|e| e.minor)
            .ok_or_else(|| {
                ControlError::os(
                    format!("no tapdisk serves {disk_type}:{path}"),
                    Errno::ENOENT,
                )
            })
    }

    /// Start a tapdisk and return its pid. The tapdisk inherits our environment (plus
    /// `BLKTAP_CONTROL_DIR` = this client's directory), daemonises and prints
    /// `<dir>/ctl<pid>\n` on its stdout, which is a pipe to us.
    pub fn spawn(&self) -> Result<i32> {
        let bin = self.tapdisk.clone().unwrap_or_else(tapdisk_binary);
        let mut attempt = 0;
        loop {
            attempt += 1;
            match spawn_once(&bin, &self.dir)? {
                SpawnOutcome::Pid(p) => return Ok(p),
                SpawnOutcome::KilledByUsr1 if attempt < SPAWN_RETRIES => {
                    log::warn!("tapdisk killed by SIGUSR1 during start-up; retrying");
                }
                SpawnOutcome::KilledByUsr1 => {
                    return Err(ControlError::os("spawn tapdisk", Errno::EINTR))
                }
            }
        }
    }

    /// allocate + spawn + attach + open, then hand the NBD export to the kernel NBD driver
    /// (see [`Created::devname`]); a failure there is not an error, the socket path is
    /// returned instead. On failure everything done so far is undone (detach, free; a
    /// tapdisk that never got its VBD is terminated).
    pub fn create(&self, open: OpenRequest, timeout: Option<Duration>) -> Result<Created> {
        split_params(&open.params)?;
        // Before a minor is taken: a dead earlier holder of the minor we get must not keep
        // its device (its link would be overwritten below and the device leaked).
        let kernel = self.kernel_for_create();
        if let Some(k) = &kernel {
            self.reap_orphaned_devices(&**k);
        }
        let (minor, _) = self.allocate()?;
        let pid = match self.spawn() {
            Ok(p) => p,
            Err(e) => {
                let _ = self.free(minor);
                return Err(e);
            }
        };
        if let Err(e) = self.attach(pid, minor) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            let _ = self.free(minor);
            return Err(e);
        }
        let mut open = open;
        open.minor = minor;
        open.devnum = u32::from(minor);
        let info = match self.open(pid, open, timeout) {
            Ok(i) => i,
            Err(e) => {
                let _ = self.detach(pid, minor);
                let _ = self.free_when_released(minor);
                return Err(e);
            }
        };
        let socket = nbd_socket_path(&self.dir, pid, minor);
        let attached = kernel.and_then(|k| match kernel::attach(&*k, &socket, info.sector_size) {
            Ok(index) => Some((k, index)),
            Err(e) => {
                log::debug!(
                    "kernel nbd attach of {}: {}; using the socket",
                    socket.display(),
                    error_chain(&e)
                );
                None
            }
        });
        let (devname, tapdev) = match attached {
            None => {
                // A link left from an earlier user of this minor would name someone else's disk.
                self.remove_tapdev(minor, None);
                (socket, None)
            }
            Some((k, index)) => {
                let dev = kernel::device_path(index);
                match tapdev::link(&self.tapdev_dir, minor, &dev) {
                    Ok(()) => (dev, Some(tapdev::tapdev_path(&self.tapdev_dir, minor))),
                    Err(e) => {
                        log::warn!(
                            "link {} to {}: {e}",
                            tapdev::tapdev_path(&self.tapdev_dir, minor).display(),
                            dev.display()
                        );
                        if kernel::backend_of(&*k, index).is_some() {
                            (dev, None)
                        } else {
                            // Without a backend identifier the link is the only record of
                            // which VBD has the device: without it destroy could never
                            // disconnect it. Serve the socket instead.
                            if let Err(e) = k.disconnect(index) {
                                log::warn!("disconnect {}: {}", dev.display(), error_chain(&e));
                            }
                            (socket, None)
                        }
                    }
                }
            }
        };
        Ok(Created {
            pid,
            minor,
            devname,
            tapdev,
        })
    }

    /// Disconnect the kernel NBD device of (`pid`, `minor`), if there is one, and remove
    /// the `tapdev<minor>` link to it, then close (forced or not) + detach + free, and
    /// remove any `tapdev<minor>` link left. A failed disconnect is logged; the close goes
    /// ahead (tapdisk drops the connection anyway).
    ///
    /// When tapdisk `pid` no longer exists (killed, crashed) there is nothing to close:
    /// the device is disconnected, the minor freed (and its link removed), and the destroy
    /// succeeds, so that a toolstack tearing down a domain is not stuck on a disk whose
    /// server already died.
    pub fn destroy(
        &self,
        pid: i32,
        minor: u16,
        force: bool,
        timeout: Option<Duration>,
    ) -> Result<()> {
        if let Some(k) = self.kernel_for_cleanup() {
            if let Some(index) = self.nbd_device_of(pid, minor) {
                if let Err(e) = k.disconnect(index) {
                    log::warn!("disconnect /dev/nbd{index}: {}", error_chain(&e));
                }
                self.remove_tapdev(minor, Some(&kernel::device_path(index)));
            }
        }
        // Links go before the minor is freed: once free, another create may take the minor
        // and publish its own link under the same name.
        if !process_exists(pid) {
            log::warn!("tapdisk {pid} is not running; releasing minor {minor}");
            // Unless another tapdisk has the minor now (a stale destroy): its link stays.
            if self.pid_of_minor(minor).is_none_or(|p| p == pid) {
                self.remove_tapdev(minor, None);
            }
            self.free_when_released(minor)?;
            self.remove_dead_sockets(pid, minor);
            return Ok(());
        }
        self.close(pid, minor, force, timeout)?;
        self.detach(pid, minor)?;
        self.remove_tapdev(minor, None);
        self.free_when_released(minor)
    }

    /// Disconnect every kernel NBD device still attached to an export of this control
    /// directory whose tapdisk no longer exists. The kernel keeps such a device (failing
    /// its I/O) until it is told, so a tapdisk that was killed would otherwise leak one
    /// device per disk until none are left. Devices are found by their backend identifier,
    /// and (kernels without one) by the `tapdev<minor>` links of VBDs whose tapdisk is gone.
    pub fn reap_orphaned_devices(&self, k: &dyn KernelNbd) {
        let known = k.devices();
        for (minor, index) in self.tapdev_links() {
            if known.iter().any(|(i, _)| *i == index) {
                continue;
            }
            if self.export_pid_of_minor(minor).is_some_and(process_exists) {
                continue;
            }
            match k.disconnect(index) {
                Ok(()) => {
                    log::info!("disconnected /dev/nbd{index}: the tapdisk of minor {minor} is gone")
                }
                Err(e) => log::warn!("disconnect orphaned /dev/nbd{index}: {}", error_chain(&e)),
            }
            self.remove_tapdev(minor, Some(&kernel::device_path(index)));
        }
        for (index, backend) in known {
            let Some((pid, minor)) = nbd_from_socket_name(&backend) else {
                continue;
            };
            if Path::new(backend.trim()) != nbd_socket_path(&self.dir, pid, minor)
                || process_exists(pid)
            {
                continue;
            }
            match k.disconnect(index) {
                Ok(()) => log::info!("disconnected /dev/nbd{index}: its tapdisk {pid} is gone"),
                Err(e) => log::warn!("disconnect orphaned /dev/nbd{index}: {}", error_chain(&e)),
            }
            // The device may go to the next VBD: its old name must not lead there.
            self.remove_tapdev(minor, Some(&kernel::device_path(index)));
        }
    }

    /// The socket files a dead tapdisk `pid` left for `minor`: its NBD export, and its
    /// control socket once no export of it is left (those of its other minors go with
    /// their own destroy). Nothing listens on them any more; left behind they would only
    /// accumulate, one pair per killed tapdisk.
    fn remove_dead_sockets(&self, pid: i32, minor: u16) {
        // `free` may have waited: a new process may have the pid by now, and its sockets
        // are not ours to remove.
        if process_exists(pid) {
            return;
        }
        let nbd = nbd_socket_path(&self.dir, pid, minor);
        if let Err(e) = std::fs::remove_file(&nbd) {
            if e.kind() != std::io::ErrorKind::NotFound {
                log::warn!("remove {}: {e}", nbd.display());
            }
        }
        let others = std::fs::read_dir(&self.dir).map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_str().and_then(nbd_from_socket_name))
                .any(|(p, _)| p == pid)
        });
        // Any doubt (an unreadable directory): keep it.
        if let Ok(false) = others {
            let ctl = socket_path(&self.dir, pid);
            if let Err(e) = std::fs::remove_file(&ctl) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    log::warn!("remove {}: {e}", ctl.display());
                }
            }
        }
    }

    /// `free`, retrying for a second while the exiting tapdisk still holds the marker lock.
    fn free_when_released(&self, minor: u16) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            match self.free(minor) {
                Err(e) if e.errno() == libc::EWOULDBLOCK && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                r => return r,
            }
        }
    }
}

/// Whether process `pid` is alive (a positive pid only: 0 and negative values name process
/// groups). A zombie is not: a killed daemonised tapdisk stays one until its new parent
/// reaps it, which some init processes are slow to do. Without /proc, signal 0 decides
/// (EPERM means it exists but is not ours to signal).
fn process_exists(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    match std::fs::read(format!("/proc/{pid}/stat")) {
        // "pid (comm) S ...": the state follows the last ')' (comm may hold anything).
        Ok(stat) => match stat.iter().rposition(|&b| b == b')') {
            Some(i) => !matches!(stat.get(i + 2), Some(b'Z' | b'X')),
            None => true,
        },
        Err(_) if Path::new("/proc/self/stat").exists() => false,
        Err(_) => !matches!(kill(Pid::from_raw(pid), None), Err(Errno::ESRCH)),
    }
}

/// Split a LIST path `"type:/path"` (empty = nothing open).
fn split_list_params(p: &str) -> (Option<String>, Option<String>) {
    if p.is_empty() {
        return (None, None);
    }
    match p.split_once(':') {
        Some((t, rest)) => (Some(t.to_string()), Some(rest.to_string())),
        None => (None, Some(p.to_string())),
    }
}

enum SpawnOutcome {
    Pid(i32),
    KilledByUsr1,
}

fn spawn_once(bin: &Path, dir: &Path) -> Result<SpawnOutcome> {
    use std::os::unix::process::ExitStatusExt;
    // ETXTBSY: the binary is still open for writing somewhere (being installed, or a
    // concurrent fork inherited the writer); it clears quickly.
    let mut tries = 0;
    let mut child = loop {
        match Command::new(bin)
            .env(CONTROL_DIR_ENV, dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
        {
            Ok(c) => break c,
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 50 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(ControlError::io(format!("spawn {}", bin.display()), e)),
        }
    };
    let line = match child.stdout.take() {
        Some(mut out) => read_line(&mut out, SPAWN_TIMEOUT),
        None => Ok(Vec::new()),
    };
    // The first child exits once the daemon has forked; a tapdisk that stays in the
    // foreground is left running.
    let deadline = Instant::now() + Duration::from_secs(5);
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => break None,
            Err(e) => return Err(ControlError::io("wait for tapdisk", e)),
        }
    };
    let line = line?;
    let text = String::from_utf8_lossy(&line);
    if let Some(pid) = pid_from_socket_name(text.trim()) {
        return Ok(SpawnOutcome::Pid(pid));
    }
    if status.and_then(|s| s.signal()) == Some(libc::SIGUSR1) {
        return Ok(SpawnOutcome::KilledByUsr1);
    }
    let how = match status {
        Some(s) => format!("{s}"),
        None => "still running".to_string(),
    };
    // tapdisk exits with the errno of what stopped it (e.g. ENOTDIR for a bad control
    // directory): pass that on, as tap-ctl's exit status; anything else is EIO.
    let errno = status
        .and_then(|s| s.code())
        .filter(|c| (1..=255).contains(c))
        .map_or(Errno::EIO, Errno::from_raw);
    Err(ControlError::os(
        format!(
            "tapdisk {} did not report its control socket ({how}; said {:?})",
            bin.display(),
            text.trim()
        ),
        errno,
    ))
}

/// Read up to the first newline (or EOF) within `timeout`; at most 4096 bytes.
fn read_line<R: Read + AsFd>(r: &mut R, timeout: Duration) -> Result<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < 4096 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ControlError::Timeout);
        }
        let ms = PollTimeout::try_from(left.as_millis().min(60_000) as i32 + 1)
            .unwrap_or(PollTimeout::MAX);
        let ready = {
            let mut fds = [PollFd::new(r.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, ms) {
                Ok(n) => n,
                Err(Errno::EINTR) => continue,
                Err(e) => return Err(ControlError::os("poll tapdisk stdout", e)),
            }
        };
        if ready == 0 {
            continue;
        }
        match r.read(&mut b) {
            Ok(0) => break,
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) => line.push(b[0]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ControlError::io("read tapdisk stdout", e)),
        }
    }
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_exists_says_no_for_zombies_gone_pids_and_groups() {
        assert!(process_exists(std::process::id() as i32));
        assert!(!process_exists(0));
        assert!(!process_exists(-1));
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        // Not waited for: it becomes a zombie once it exits.
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z"))
            .unwrap_or(false)
        {
            assert!(Instant::now() < deadline, "child {pid} never exited");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!process_exists(pid), "zombie {pid} counted as alive");
        child.wait().unwrap();
        assert!(!process_exists(pid));
    }

    #[test]
    fn list_params_split() {
        assert_eq!(split_list_params(""), (None, None));
        assert_eq!(
            split_list_params("vhd:/a:b"),
            (Some("vhd".into()), Some("/a:b".into()))
        );
        assert_eq!(split_list_params("/x"), (None, Some("/x".into())));
    }

    #[test]
    fn spawn_of_missing_binary_is_enoent() {
        let d = tempfile::tempdir().unwrap();
        let c = Client::with_dir(d.path()).with_tapdisk(d.path().join("nope"));
        assert_eq!(c.spawn().unwrap_err().errno(), libc::ENOENT);
    }

    #[test]
    fn spawn_parses_the_socket_line_and_rejects_garbage() {
        let d = tempfile::tempdir().unwrap();
        let script = d.path().join("fake");
        std::fs::write(&script, "#!/bin/sh\necho \"$BLKTAP_CONTROL_DIR/ctl4321\"\n").unwrap();
        let bad = d.path().join("bad");
        std::fs::write(&bad, "#!/bin/sh\necho hello\nexit 3\n").unwrap();
        for p in [&script, &bad] {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let c = Client::with_dir(d.path()).with_tapdisk(&script);
        assert_eq!(c.spawn().unwrap(), 4321);
        let c = Client::with_dir(d.path()).with_tapdisk(&bad);
        let e = c.spawn().unwrap_err();
        assert_eq!(
            e.errno(),
            3,
            "the child's exit status is passed on as the errno"
        );
        assert!(e.to_string().contains("exit status: 3"), "{e}");
    }

    #[test]
    fn missing_tapdisk_socket_is_enoent() {
        let d = tempfile::tempdir().unwrap();
        let c = Client::with_dir(d.path());
        assert_eq!(c.get_pid(12345, None).unwrap_err().errno(), libc::ENOENT);
        assert_eq!(c.list().unwrap(), vec![]);
        assert_eq!(c.find_minor("vhd", "/x").unwrap_err().errno(), libc::ENOENT);
    }
}
