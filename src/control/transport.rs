//! Socket helpers shared by the client and the server: whole-deadline reads and
//! SIGPIPE-free writes on a Unix stream.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nix::sys::socket::{send, MsgFlags};

/// Reads from a stream with one deadline for the whole exchange (not per read).
pub(crate) struct DeadlineReader<'a> {
    stream: &'a UnixStream,
    deadline: Option<Instant>,
}

impl<'a> DeadlineReader<'a> {
    pub(crate) fn new(stream: &'a UnixStream, timeout: Option<Duration>) -> Self {
        DeadlineReader {
            stream,
            deadline: timeout.map(|t| Instant::now() + t),
        }
    }
}

/// The time left before `deadline` (`None`: no deadline), or TimedOut once it has passed.
fn time_left(deadline: Option<Instant>) -> io::Result<Option<Duration>> {
    let Some(d) = deadline else {
        return Ok(None);
    };
    let left = d.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(io::ErrorKind::TimedOut.into());
    }
    Ok(Some(left))
}

impl Read for DeadlineReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.set_read_timeout(time_left(self.deadline)?)?;
        let mut s = self.stream;
        s.read(buf)
    }
}

/// Writes with `MSG_NOSIGNAL` (a vanished peer gives EPIPE, never SIGPIPE: the C ABI runs inside
/// libxl's process) and one deadline for the whole write.
pub(crate) struct NoSigPipeWriter<'a> {
    stream: &'a UnixStream,
    deadline: Option<Instant>,
}

impl<'a> NoSigPipeWriter<'a> {
    pub(crate) fn new(stream: &'a UnixStream, timeout: Option<Duration>) -> Self {
        NoSigPipeWriter {
            stream,
            deadline: timeout.map(|t| Instant::now() + t),
        }
    }
}

impl Write for NoSigPipeWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.set_write_timeout(time_left(self.deadline)?)?;
        loop {
            match send(self.stream.as_raw_fd(), buf, MsgFlags::MSG_NOSIGNAL) {
                Ok(n) => return Ok(n),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(nix::errno::Errno::EAGAIN) => return Err(io::ErrorKind::TimedOut.into()),
                Err(e) => return Err(io::Error::from_raw_os_error(e as i32)),
            }
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
