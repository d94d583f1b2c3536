//! Linux native AIO (`io_setup`, `io_submit`, `io_getevents`, `io_destroy`) with eventfd
//! notification: the engine of every kernel OpenXT ships (4.14 has no io_uring), and the
//! fallback where io_uring cannot be set up.
//!
//! The API is safe: a [`Context`] owns the buffer of every request in flight (the kernel
//! writes into it until the request completes), hands it back only with the request's
//! completion, and its `Drop` calls `io_destroy`, which waits for every request in flight
//! before the buffers are freed.
//!
//! The structs follow `<linux/aio_abi.h>` (little-endian layout; every field is 64-bit
//! even on 32-bit x86, so i686 and x86_64 share it); `tests/aio_layout.rs` checks them
//! against gcc's view of the header for `-m64` and `-m32`.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use super::{Dir, Done, Request};

/// `IOCB_CMD_PREAD`.
const IOCB_CMD_PREAD: u16 = 0;
/// `IOCB_CMD_PWRITE`.
const IOCB_CMD_PWRITE: u16 = 1;
/// `IOCB_FLAG_RESFD`: signal `aio_resfd` (an eventfd) at completion.
const IOCB_FLAG_RESFD: u32 = 1;

/// `struct iocb` (`<linux/aio_abi.h>`, little-endian).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct Iocb {
    pub aio_data: u64,
    pub aio_key: u32,
    pub aio_rw_flags: i32,
    pub aio_lio_opcode: u16,
    pub aio_reqprio: i16,
    pub aio_fildes: u32,
    pub aio_buf: u64,
    pub aio_nbytes: u64,
    pub aio_offset: i64,
    pub aio_reserved2: u64,
    pub aio_flags: u32,
    pub aio_resfd: u32,
}

/// `struct io_event`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct IoEvent {
    pub data: u64,
    pub obj: u64,
    pub res: i64,
    pub res2: i64,
}

/// `aio_context_t`.
type AioContext = libc::c_ulong;

/// An AIO context with its requests in flight (see the module doc).
#[derive(Debug)]
pub struct Context<T> {
    ctx: AioContext,
    /// Requests in flight, by slot (the iocb's `aio_data`).
    slots: Vec<Option<Request<T>>>,
    free: Vec<usize>,
    events: Vec<IoEvent>,
    /// The eventfd signalled at each completion.
    resfd: u32,
}

fn last_error() -> io::Error {
    io::Error::last_os_error()
}

impl<T> Context<T> {
    /// `io_setup` for up to `depth` requests in flight; each completion signals the
    /// eventfd `notify`, which must stay open as long as the context.
    pub fn new(depth: u32, notify: BorrowedFd<'_>) -> io::Result<Context<T>> {
        let mut ctx: AioContext = 0;
        let resfd = u32::try_from(notify.as_raw_fd())
            .map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
        // SAFETY: io_setup writes one aio_context_t through the pointer, which points at
        // a live local of that type; the kernel requires it to be zero on entry (it is).
        let r = unsafe {
            libc::syscall(
                libc::SYS_io_setup,
                libc::c_long::from(depth as i32),
                &mut ctx as *mut AioContext,
            )
        };
        if r < 0 {
            return Err(last_error());
        }
        let n = depth as usize;
        Ok(Context {
            ctx,
            slots: (0..n).map(|_| None).collect(),
            free: (0..n).rev().collect(),
            events: vec![IoEvent::default(); n],
            resfd,
        })
    }

    /// Requests that can still be submitted.
    pub fn room(&self) -> usize {
        self.free.len()
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Submit `req` on `fd`. The buffer stays with the context until [`Context::reap`]
    /// returns it. On failure (no room: EAGAIN; or the kernel's refusal) the request comes
    /// back with the error.
    #[allow(clippy::result_large_err)]
    pub fn submit(
        &mut self,
        fd: BorrowedFd<'_>,
        mut req: Request<T>,
    ) -> Result<(), (Request<T>, io::Error)> {
        let Some(slot) = self.free.pop() else {
            return Err((req, io::Error::from_raw_os_error(libc::EAGAIN)));
        };
        // A mutable pointer: the kernel writes into the buffer of a read.
        let start = req.start;
        let (Some((buf_ptr, buf_len)), Ok(fildes), Ok(offset)) = (
            req.buf.get_mut(start..).map(|d| (d.as_mut_ptr(), d.len())),
            u32::try_from(fd.as_raw_fd()),
            i64::try_from(req.offset),
        ) else {
            self.free.push(slot);
            return Err((req, io::Error::from_raw_os_error(libc::EINVAL)));
        };
        let mut cb = Iocb {
            aio_data: slot as u64,
            aio_lio_opcode: match req.dir {
                Dir::Read => IOCB_CMD_PREAD,
                Dir::Write => IOCB_CMD_PWRITE,
            },
            aio_fildes: fildes,
            aio_buf: buf_ptr as usize as u64,
            aio_nbytes: buf_len as u64,
            aio_offset: offset,
            aio_flags: IOCB_FLAG_RESFD,
            aio_resfd: self.resfd,
            ..Iocb::default()
        };
        let mut list = [&mut cb as *mut Iocb];
        // SAFETY: io_submit reads one pointer from `list` and the iocb it points to (both
        // live locals; the kernel copies the iocb before returning). The iocb names `fd`,
        // open for the duration of this call (the kernel takes its own reference), and the
        // bytes of `req.buf[req.start..]`: that heap allocation does not move when `req`
        // moves into `self.slots` below, and it stays there, untouched by us, until the
        // completion is reaped, or until `Drop`'s io_destroy has waited for the request.
        let r = unsafe {
            libc::syscall(
                libc::SYS_io_submit,
                self.ctx,
                1 as libc::c_long,
                list.as_mut_ptr(),
            )
        };
        if r != 1 {
            self.free.push(slot);
            let e = if r < 0 {
                last_error()
            } else {
                io::Error::from_raw_os_error(libc::EAGAIN)
            };
            return Err((req, e));
        }
        self.slots[slot] = Some(req);
        Ok(())
    }

    /// Collect every completion waiting (never blocks) into `out`.
    pub fn reap(&mut self, out: &mut Vec<Done<T>>) -> io::Result<()> {
        loop {
            let max = self.events.len();
            // SAFETY: io_getevents writes at most `max` io_event structs into `events`,
            // which holds exactly `max`; with min_nr 0 and no timeout it returns at once.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_io_getevents,
                    self.ctx,
                    0 as libc::c_long,
                    max as libc::c_long,
                    self.events.as_mut_ptr(),
                    std::ptr::null_mut::<libc::timespec>(),
                )
            };
            if r < 0 {
                let e = last_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let n = r as usize;
            for ev in &self.events[..n] {
                let slot = ev.data as usize;
                if let Some(req) = self.slots.get_mut(slot).and_then(Option::take) {
                    self.free.push(slot);
                    out.push(Done { req, res: ev.res });
                }
            }
            if n < max {
                return Ok(());
            }
        }
    }
}

impl<T> Drop for Context<T> {
    fn drop(&mut self) {
        // SAFETY: the context came from io_setup and is destroyed once. io_destroy
        // cancels what it can and waits for every request in flight to complete, so no
        // buffer in `slots` is written by the kernel after this returns and they can be
        // freed.
        unsafe {
            libc::syscall(libc::SYS_io_destroy, self.ctx);
        }
    }
}
