//! `/dev/xen/evtchn`: interdomain event channels. Pending ports are read from the fd as `u32`s;
//! writing a port's `u32` unmasks it.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::sys::{
    IoctlEvtchnBindInterdomain, IoctlEvtchnBindUnboundPort, IoctlEvtchnPort,
    IOCTL_EVTCHN_BIND_INTERDOMAIN, IOCTL_EVTCHN_BIND_UNBOUND_PORT, IOCTL_EVTCHN_NOTIFY,
    IOCTL_EVTCHN_UNBIND,
};
use super::{DomId, EventChannel, Port};

/// Default device path.
pub const EVTCHN_PATH: &str = "/dev/xen/evtchn";

/// An open evtchn handle (non-blocking).
#[derive(Debug)]
pub struct EvtchnDev {
    fd: OwnedFd,
}

impl EvtchnDev {
    /// Open [`EVTCHN_PATH`].
    pub fn open() -> io::Result<EvtchnDev> {
        EvtchnDev::open_path(Path::new(EVTCHN_PATH))
    }

    /// Open an evtchn node at `path` (read-write, non-blocking, close-on-exec).
    pub fn open_path(path: &Path) -> io::Result<EvtchnDev> {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_CLOEXEC | libc::O_NONBLOCK)
            .open(path)?;
        Ok(EvtchnDev { fd: f.into() })
    }

    /// Allocate a port that `remote` may bind to (what a frontend does).
    pub fn bind_unbound(&self, remote: DomId) -> io::Result<Port> {
        let mut arg = IoctlEvtchnBindUnboundPort {
            remote_domain: u32::from(remote.0),
        };
        // SAFETY: valid, initialised argument struct for the duration of the call.
        let rc = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                IOCTL_EVTCHN_BIND_UNBOUND_PORT,
                &mut arg,
            )
        };
        port_result(rc)
    }

    fn port_ioctl(&self, req: nix::sys::ioctl::ioctl_num_type, port: Port) -> io::Result<()> {
        let mut arg = IoctlEvtchnPort { port: port.0 };
        // SAFETY: valid, initialised argument struct for the duration of the call.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), req, &mut arg) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

fn port_result(rc: libc::c_int) -> io::Result<Port> {
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Port(rc as u32))
}

impl AsFd for EvtchnDev {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl EventChannel for EvtchnDev {
    fn bind_interdomain(&self, dom: DomId, remote: Port) -> io::Result<Port> {
        let mut arg = IoctlEvtchnBindInterdomain {
            remote_domain: u32::from(dom.0),
            remote_port: remote.0,
        };
        // SAFETY: valid, initialised argument struct for the duration of the call.
        let rc =
            unsafe { libc::ioctl(self.fd.as_raw_fd(), IOCTL_EVTCHN_BIND_INTERDOMAIN, &mut arg) };
        port_result(rc)
    }

    fn unbind(&self, local: Port) -> io::Result<()> {
        self.port_ioctl(IOCTL_EVTCHN_UNBIND, local)
    }

    fn notify(&self, local: Port) -> io::Result<()> {
        self.port_ioctl(IOCTL_EVTCHN_NOTIFY, local)
    }

    fn pending(&self) -> io::Result<Option<Port>> {
        let mut b = [0u8; 4];
        match nix::unistd::read(&self.fd, &mut b) {
            Ok(4) => Ok(Some(Port(u32::from_ne_bytes(b)))),
            Ok(_) => Err(io::ErrorKind::UnexpectedEof.into()),
            Err(nix::errno::Errno::EAGAIN) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    fn unmask(&self, local: Port) -> io::Result<()> {
        let n = nix::unistd::write(&self.fd, &local.0.to_ne_bytes())?;
        if n != 4 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        Ok(())
    }
}
