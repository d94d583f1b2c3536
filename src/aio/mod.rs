//! Asynchronous file I/O from tapdisk's event loop: reads and writes are submitted from the
//! loop and their completions reaped there, with no thread hand-off. Two kernel interfaces
//! behind one API ([`Engine`]):
//!
//! - [`uring`]: io_uring (Linux 5.6 and later: `IORING_OP_READ`/`WRITE`), completions
//!   read from the shared completion ring without a system call;
//! - [`native`]: Linux native AIO (`io_submit`/`io_getevents`), on every kernel OpenXT
//!   ships (4.14 has no io_uring) and where io_uring is refused (`ENOSYS`, or `EPERM`
//!   from the `kernel.io_uring_disabled` sysctl or a seccomp filter).
//!
//! Both signal an eventfd at each completion, the one the loop already polls. Which one
//! runs, and the fallback to the worker threads, is chosen in `tapdisk::io`.
//!
//! This is the crate's one I/O-syscall module allowed to use unsafe_code (besides `xen`
//! and `capi`), all of it in `sys.rs`; every block says why it is sound. The API is safe: an engine owns the
//! buffer of every request in flight (the kernel writes into it until the request
//! completes), hands it back only with the request's completion, and does not let go of
//! the buffers in its `Drop` before the kernel is done with them.

use std::io;
use std::os::fd::BorrowedFd;

use crate::util::AlignedBuf;

mod sys;

pub use sys::{native, uring};

pub use native::{Context, IoEvent, Iocb};

#[cfg(target_endian = "big")]
compile_error!("aio: the kernel structs are declared for little-endian targets only");

/// Read into or write from the buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    Read,
    Write,
}

/// One request: `buf[start..]` read from or written to the file at `offset`.
#[derive(Debug)]
pub struct Request<T> {
    pub dir: Dir,
    pub buf: AlignedBuf,
    pub start: usize,
    pub offset: u64,
    /// The caller's data, handed back with the completion.
    pub user: T,
}

/// A finished request: its buffer and data back, and the kernel's result (bytes moved,
/// or a negative errno).
#[derive(Debug)]
pub struct Done<T> {
    pub req: Request<T>,
    pub res: i64,
}

/// The kernel interface an [`Engine`] uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// io_uring.
    Uring,
    /// Linux native AIO.
    Aio,
}

impl Kind {
    /// The name in logs.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Uring => "io_uring",
            Kind::Aio => "Linux AIO",
        }
    }
}

/// Submission and completion of reads and writes on `O_DIRECT` (or memory-backed)
/// descriptors, with either kernel interface. A request is refused at submission (it
/// comes back with the error) or completes exactly once through [`Engine::reap`].
#[derive(Debug)]
pub enum Engine<T> {
    Uring(uring::Ring<T>),
    Aio(Context<T>),
}

impl<T> Engine<T> {
    /// Set up `kind` for up to `depth` requests in flight; each completion signals the
    /// eventfd `notify`, which must stay open as long as the engine.
    pub fn new(kind: Kind, depth: u32, notify: BorrowedFd<'_>) -> io::Result<Engine<T>> {
        Ok(match kind {
            Kind::Uring => Engine::Uring(uring::Ring::new(depth, notify)?),
            Kind::Aio => Engine::Aio(Context::new(depth, notify)?),
        })
    }

    /// Which interface this is.
    pub fn kind(&self) -> Kind {
        match self {
            Engine::Uring(_) => Kind::Uring,
            Engine::Aio(_) => Kind::Aio,
        }
    }

    /// Requests that can still be submitted.
    pub fn room(&self) -> usize {
        match self {
            Engine::Uring(r) => r.room(),
            Engine::Aio(c) => c.room(),
        }
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        match self {
            Engine::Uring(r) => r.in_flight(),
            Engine::Aio(c) => c.in_flight(),
        }
    }

    /// Submit `req` on `fd`. The buffer stays with the engine until [`Engine::reap`]
    /// returns it. On failure (no room: EAGAIN; or the kernel's refusal) the request comes
    /// back with the error.
    #[allow(clippy::result_large_err)]
    pub fn submit(
        &mut self,
        fd: BorrowedFd<'_>,
        req: Request<T>,
    ) -> Result<(), (Request<T>, io::Error)> {
        match self {
            Engine::Uring(r) => r.submit(fd, req),
            Engine::Aio(c) => c.submit(fd, req),
        }
    }

    /// Collect every completion waiting (never blocks) into `out`.
    pub fn reap(&mut self, out: &mut Vec<Done<T>>) -> io::Result<()> {
        match self {
            Engine::Uring(r) => r.reap(out),
            Engine::Aio(c) => c.reap(out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::eventfd::{EfdFlags, EventFd};
    use std::os::fd::AsFd;
    use std::os::unix::fs::OpenOptionsExt;

    /// Both interfaces, where this kernel has them (io_uring may be refused here: then
    /// only AIO is tested, with a note).
    fn kinds() -> Vec<Kind> {
        let efd = EventFd::from_flags(EfdFlags::EFD_NONBLOCK).unwrap();
        let mut v = Vec::new();
        match Engine::<()>::new(Kind::Uring, 4, efd.as_fd()) {
            Ok(_) => v.push(Kind::Uring),
            Err(e) => eprintln!("io_uring unavailable here ({e}): testing Linux AIO only"),
        }
        v.push(Kind::Aio);
        v
    }

    /// A file holding `content` on ext4 under /var/tmp (O_DIRECT needs a real filesystem),
    /// opened with O_DIRECT, read-only or read-write; keep the directory while it is used.
    fn direct_file(content: &[u8], write: bool) -> (tempfile::TempDir, std::fs::File) {
        let d = tempfile::tempdir_in("/var/tmp").unwrap();
        let p = d.path().join("f");
        std::fs::write(&p, content).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .custom_flags(libc::O_DIRECT)
            .open(&p)
            .unwrap();
        (d, f)
    }

    fn wait_all(c: &mut Engine<u32>, n: usize) -> Vec<Done<u32>> {
        let mut out = Vec::new();
        let start = std::time::Instant::now();
        while out.len() < n {
            assert!(start.elapsed().as_secs() < 10);
            c.reap(&mut out).unwrap();
        }
        out
    }

    #[test]
    fn direct_reads_and_writes_complete_with_their_buffers_and_signal_the_eventfd() {
        for kind in kinds() {
            let (d, f) = direct_file(&vec![0u8; 64 << 10], true);
            let efd = EventFd::from_flags(EfdFlags::EFD_NONBLOCK).unwrap();
            let mut c: Engine<u32> = Engine::new(kind, 8, efd.as_fd()).unwrap();
            assert_eq!(c.kind(), kind);
            for i in 0..4u32 {
                let buf = AlignedBuf::from_slice(&[i as u8 + 1; 4096]);
                let req = Request {
                    dir: Dir::Write,
                    buf,
                    start: 0,
                    offset: u64::from(i) * 8192,
                    user: i,
                };
                c.submit(f.as_fd(), req).unwrap();
            }
            let done = wait_all(&mut c, 4);
            assert!(efd.read().unwrap() >= 1, "{kind:?}");
            assert!(done.iter().all(|d| d.res == 4096), "{kind:?}");
            let all = std::fs::read(d.path().join("f")).unwrap();
            assert_eq!(all[3 * 8192..4 * 8192 - 4096], [4u8; 4096]);
            // A read of a sub-range of the buffer, and one past the end (short: 0 bytes).
            let req = Request {
                dir: Dir::Read,
                buf: AlignedBuf::zeroed(8192),
                start: 4096,
                offset: 8192,
                user: 9,
            };
            c.submit(f.as_fd(), req).unwrap();
            let req = Request {
                dir: Dir::Read,
                buf: AlignedBuf::zeroed(4096),
                start: 0,
                offset: 64 << 10,
                user: 10,
            };
            c.submit(f.as_fd(), req).unwrap();
            let mut done = wait_all(&mut c, 2);
            done.sort_by_key(|d| d.req.user);
            assert_eq!((done[0].req.user, done[0].res), (9, 4096), "{kind:?}");
            assert_eq!(done[0].req.buf[4096..], [2u8; 4096]);
            assert!(done[0].req.buf[..4096].iter().all(|&x| x == 0));
            assert_eq!((done[1].req.user, done[1].res), (10, 0), "{kind:?}");
            assert_eq!(c.in_flight(), 0);
        }
    }

    /// `req` refused at submission with `errno`, or completing with it.
    fn fails_with(c: &mut Engine<u32>, f: BorrowedFd<'_>, req: Request<u32>, errno: i32) {
        let user = req.user;
        match c.submit(f, req) {
            Err((r, e)) => assert_eq!((r.user, e.raw_os_error()), (user, Some(errno))),
            Ok(()) => {
                let done = wait_all(c, 1);
                assert_eq!((done[0].req.user, done[0].res), (user, -i64::from(errno)));
            }
        }
    }

    #[test]
    fn errors_come_back_with_their_request() {
        for kind in kinds() {
            let (_d, f) = direct_file(&vec![0u8; 8192], false);
            let efd = EventFd::from_flags(EfdFlags::EFD_NONBLOCK).unwrap();
            let mut c: Engine<u32> = Engine::new(kind, 1, efd.as_fd()).unwrap();
            // A write on a read-only fd: EBADF (AIO refuses it at submission, io_uring
            // completes it with the error).
            let req = Request {
                dir: Dir::Write,
                buf: AlignedBuf::zeroed(4096),
                start: 0,
                offset: 0,
                user: 1,
            };
            fails_with(&mut c, f.as_fd(), req, libc::EBADF);
            // A misaligned direct read: EINVAL.
            let req = Request {
                dir: Dir::Read,
                buf: AlignedBuf::zeroed(4096),
                start: 1,
                offset: 0,
                user: 2,
            };
            fails_with(&mut c, f.as_fd(), req, libc::EINVAL);
            // Full: the one slot is taken until reaped.
            let ok = |user| Request {
                dir: Dir::Read,
                buf: AlignedBuf::zeroed(512),
                start: 0,
                offset: 0,
                user,
            };
            c.submit(f.as_fd(), ok(3)).unwrap();
            let (r, e) = c.submit(f.as_fd(), ok(4)).unwrap_err();
            assert_eq!((r.user, e.raw_os_error()), (4, Some(libc::EAGAIN)));
            assert_eq!(wait_all(&mut c, 1)[0].res, 512, "{kind:?}");
            assert_eq!(c.room(), 1);
        }
    }

    /// Dropping an engine with requests in flight returns (does not hang waiting for
    /// them) and the engine's slots are reused for many requests, past the ring's size in
    /// total. (That the drop waits before the buffers are freed is not observable here:
    /// the kernel writing into freed memory would not fail this test.)
    #[test]
    fn drop_with_requests_in_flight_and_reuse_of_slots() {
        for kind in kinds() {
            let (_d, f) = direct_file(&vec![5u8; 1 << 20], false);
            let efd = EventFd::from_flags(EfdFlags::EFD_NONBLOCK).unwrap();
            let mut c: Engine<u32> = Engine::new(kind, 16, efd.as_fd()).unwrap();
            let read = |user: u32| Request {
                dir: Dir::Read,
                buf: AlignedBuf::zeroed(64 << 10),
                start: 0,
                offset: u64::from(user % 16) * (64 << 10),
                user,
            };
            // 4 rounds through all 16 slots, reaping as they come back.
            let mut got = 0;
            let mut next = 0u32;
            while got < 64 {
                while next < 64 && c.room() > 0 {
                    c.submit(f.as_fd(), read(next)).unwrap();
                    next += 1;
                }
                let mut out = Vec::new();
                c.reap(&mut out).unwrap();
                for d in &out {
                    assert_eq!(d.res, 64 << 10, "{kind:?} {}", d.req.user);
                    assert!(d.req.buf.iter().all(|&x| x == 5));
                }
                got += out.len();
            }
            for i in 0..16 {
                c.submit(f.as_fd(), read(i)).unwrap();
            }
            assert_eq!(c.in_flight(), 16);
            drop(c);
        }
    }
}
