//! The system-call side of both engines: Linux native AIO ([`native`]) and io_uring
//! ([`uring`]). Every block of unsafe_code the crate has outside `xen` and `capi` is in this
//! one file, each with the reason it is sound; `aio` itself and everything above it is safe.

use super::Request;

/// What both engines hand the kernel for `req`: a pointer to the bytes still to move
/// (mutable: a read fills them), their number, and the file offset in the ABIs' signed 64
/// bits. None when the offset does not fit or `start` lies past the buffer.
fn transfer<T>(req: &mut Request<T>) -> Option<(*mut u8, usize, i64)> {
    let offset = i64::try_from(req.offset).ok()?;
    let rest = req.buf.get_mut(req.start..)?;
    Some((rest.as_mut_ptr(), rest.len(), offset))
}

pub mod native {
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

    use super::super::{Dir, Done, Request};

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
            let (Some((buf_ptr, buf_len, offset)), Ok(fildes)) =
                (super::transfer(&mut req), u32::try_from(fd.as_raw_fd()))
            else {
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
}

pub mod uring {
    //! io_uring (`io_uring_setup`, `io_uring_enter`, `io_uring_register`) with its completions
    //! signalled on an eventfd (`IORING_REGISTER_EVENTFD`), for kernels from 5.6 on
    //! (`IORING_OP_READ`/`IORING_OP_WRITE`; older rings are refused at setup, checked through
    //! the 5.6 feature bit `IORING_FEAT_RW_CUR_POS`).
    //!
    //! Each [`Ring::submit`] writes one submission entry and calls `io_uring_enter` at once, so
    //! the kernel picks up the request (and the descriptor) during the call, as `io_submit`
    //! does; completions are read from the shared completion ring with no system call.
    //! No `SQPOLL`, no registered buffers or files: nothing outlives the calls but the buffers
    //! of the requests in flight, which the ring owns until their completion is reaped; its
    //! `Drop` waits for every request in flight before the buffers are freed (closing an
    //! io_uring does not wait).
    //!
    //! The structs follow `<linux/io_uring.h>`. Every field has a fixed width and every 64-bit
    //! field sits at a multiple of 8, so i686 and x86_64 share the layout;
    //! `tests/uring_layout.rs` checks them against gcc's view of the header for `-m64` and
    //! `-m32`.

    use std::io;
    use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::super::{Dir, Done, Request};

    /// `mmap` offsets of the rings (`IORING_OFF_SQ_RING`, `IORING_OFF_SQES`).
    pub const IORING_OFF_SQ_RING: u64 = 0;
    pub const IORING_OFF_SQES: u64 = 0x1000_0000;
    /// `io_uring_enter` flag: wait for `min_complete` completions.
    pub const IORING_ENTER_GETEVENTS: u32 = 1;
    /// `io_uring_register` opcode.
    pub const IORING_REGISTER_EVENTFD: u32 = 4;
    /// Opcodes (5.6).
    pub const IORING_OP_READ: u8 = 22;
    pub const IORING_OP_WRITE: u8 = 23;
    /// Features this ring needs: one mmap for both rings (5.4), completions never dropped
    /// (5.5), and a 5.6 kernel (the release of `IORING_OP_READ`/`WRITE`).
    pub const IORING_FEAT_SINGLE_MMAP: u32 = 1 << 0;
    pub const IORING_FEAT_NODROP: u32 = 1 << 1;
    pub const IORING_FEAT_RW_CUR_POS: u32 = 1 << 3;
    const NEEDED_FEATURES: u32 =
        IORING_FEAT_SINGLE_MMAP | IORING_FEAT_NODROP | IORING_FEAT_RW_CUR_POS;

    /// `struct io_sqring_offsets`.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default)]
    pub struct SqringOffsets {
        pub head: u32,
        pub tail: u32,
        pub ring_mask: u32,
        pub ring_entries: u32,
        pub flags: u32,
        pub dropped: u32,
        pub array: u32,
        pub resv1: u32,
        pub resv2: u64,
    }

    /// `struct io_cqring_offsets`.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default)]
    pub struct CqringOffsets {
        pub head: u32,
        pub tail: u32,
        pub ring_mask: u32,
        pub ring_entries: u32,
        pub overflow: u32,
        pub cqes: u32,
        pub flags: u32,
        pub resv1: u32,
        pub resv2: u64,
    }

    /// `struct io_uring_params`.
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default)]
    pub struct Params {
        pub sq_entries: u32,
        pub cq_entries: u32,
        pub flags: u32,
        pub sq_thread_cpu: u32,
        pub sq_thread_idle: u32,
        pub features: u32,
        pub wq_fd: u32,
        pub resv: [u32; 3],
        pub sq_off: SqringOffsets,
        pub cq_off: CqringOffsets,
    }

    /// `struct io_uring_sqe`, the members a read or write uses (the header's unions by the
    /// name of that member).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default)]
    pub struct Sqe {
        pub opcode: u8,
        pub flags: u8,
        pub ioprio: u16,
        pub fd: i32,
        pub off: u64,
        pub addr: u64,
        pub len: u32,
        pub rw_flags: u32,
        pub user_data: u64,
        pub buf_index: u16,
        pub personality: u16,
        pub splice_fd_in: i32,
        pub addr3: u64,
        pub pad2: u64,
    }

    /// `struct io_uring_cqe` (without `IORING_SETUP_CQE32`).
    #[repr(C)]
    #[derive(Clone, Copy, Debug, Default)]
    pub struct Cqe {
        pub user_data: u64,
        pub res: i32,
        pub flags: u32,
    }

    fn last_error() -> io::Error {
        io::Error::last_os_error()
    }

    /// A shared mapping of the ring's memory, unmapped on drop.
    #[derive(Debug)]
    struct Map {
        ptr: *mut libc::c_void,
        len: usize,
    }

    impl Map {
        fn new(fd: BorrowedFd<'_>, len: usize, offset: u64) -> io::Result<Map> {
            let offset = libc::off_t::try_from(offset)
                .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
            // SAFETY: a new shared mapping chosen by the kernel (no address given), so it
            // overlaps nothing of ours; the kernel checks `len` and `offset` against the ring.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_POPULATE,
                    fd.as_raw_fd(),
                    offset,
                )
            };
            if ptr == libc::MAP_FAILED {
                return Err(last_error());
            }
            Ok(Map { ptr, len })
        }

        /// The address `off` bytes in, for an object of `size` bytes aligned to `align`;
        /// an error when the kernel's offset does not fit the mapping.
        fn at(&self, off: u32, size: usize, align: usize) -> io::Result<*mut u8> {
            let off = off as usize;
            let p = self.ptr.cast::<u8>().wrapping_add(off);
            if off.checked_add(size).is_none_or(|end| end > self.len)
                || !(p as usize).is_multiple_of(align)
            {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "io_uring: ring offset outside the mapping",
                ));
            }
            Ok(p)
        }
    }

    impl Drop for Map {
        fn drop(&mut self) {
            // SAFETY: the mapping came from mmap with this length and is unmapped once; the
            // pointers into it (in `Ring`) are dropped with it and never used afterwards.
            unsafe {
                libc::munmap(self.ptr, self.len);
            }
        }
    }

    /// Load a ring index the kernel writes (acquire: the entries before it are visible).
    fn load_acquire(p: *const u32) -> u32 {
        // SAFETY: every index pointer is checked at setup to lie inside a live mapping of
        // the ring (`Map::at`, 4-aligned) that the `Ring` holding it keeps mapped; the kernel
        // updates these words only atomically, so reading them as atomics is sound.
        unsafe { AtomicU32::from_ptr(p.cast_mut()) }.load(Ordering::Acquire)
    }

    /// Publish a ring index the kernel reads (release: the entries before it are written).
    fn store_release(p: *mut u32, v: u32) {
        // SAFETY: as in `load_acquire`; only this process writes these indices (the
        // submission tail and the completion head), the kernel reads them.
        unsafe { AtomicU32::from_ptr(p) }.store(v, Ordering::Release);
    }

    /// An io_uring with its requests in flight (see the module doc).
    #[derive(Debug)]
    pub struct Ring<T> {
        /// Requests in flight, by slot (the entry's `user_data`).
        slots: Vec<Option<Request<T>>>,
        free: Vec<usize>,
        sq_head: *const u32,
        sq_tail: *mut u32,
        sq_mask: u32,
        sq_entries: u32,
        sq_array: *mut u32,
        sqes: *mut Sqe,
        cq_head: *mut u32,
        cq_tail: *const u32,
        cq_mask: u32,
        cqes: *const Cqe,
        /// The mappings the pointers above point into, then the ring itself (dropped last).
        _sqe_map: Map,
        _ring_map: Map,
        fd: OwnedFd,
    }

    // SAFETY: the raw pointers point into mappings the `Ring` owns (never shared with another
    // `Ring`), and every access goes through `&mut self` or the atomics; nothing in the ring is
    // tied to the thread that set it up (the kernel checks the caller's files, not its thread).
    unsafe impl<T: Send> Send for Ring<T> {}

    impl<T> Ring<T> {
        /// `io_uring_setup` for up to `depth` requests in flight, its completions signalling
        /// the eventfd `notify`. Fails with the kernel's error (ENOSYS before 5.1, EPERM when
        /// `kernel.io_uring_disabled` or a seccomp filter forbids it) or `Unsupported` before
        /// 5.6.
        pub fn new(depth: u32, notify: BorrowedFd<'_>) -> io::Result<Ring<T>> {
            let mut p = Params::default();
            // SAFETY: io_uring_setup reads and writes one io_uring_params through the pointer,
            // which points at a live local of that layout (checked by tests/uring_layout.rs),
            // zeroed as the kernel requires.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_io_uring_setup,
                    depth as libc::c_long,
                    &mut p as *mut Params,
                )
            };
            if r < 0 {
                return Err(last_error());
            }
            let raw = RawFd::try_from(r).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
            // SAFETY: the descriptor the kernel just returned, owned by nothing else.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            if p.features & NEEDED_FEATURES != NEEDED_FEATURES {
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    format!("io_uring older than Linux 5.6 (features {:#x})", p.features),
                ));
            }
            if p.sq_entries < depth || p.cq_entries < depth {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
            let sq_len = p.sq_off.array as usize + p.sq_entries as usize * 4;
            let cq_len = p.cq_off.cqes as usize + p.cq_entries as usize * size_of::<Cqe>();
            let ring_map = Map::new(fd.as_fd(), sq_len.max(cq_len), IORING_OFF_SQ_RING)?;
            let sqe_map = Map::new(
                fd.as_fd(),
                p.sq_entries as usize * size_of::<Sqe>(),
                IORING_OFF_SQES,
            )?;
            let word = |off| ring_map.at(off, 4, 4).map(|p| p.cast::<u32>());
            let sq_mask_p = word(p.sq_off.ring_mask)?;
            let cq_mask_p = word(p.cq_off.ring_mask)?;
            let sq_array = ring_map
                .at(p.sq_off.array, p.sq_entries as usize * 4, 4)?
                .cast::<u32>();
            let cqes = ring_map
                .at(
                    p.cq_off.cqes,
                    p.cq_entries as usize * size_of::<Cqe>(),
                    align_of::<Cqe>(),
                )?
                .cast::<Cqe>();
            let sqes = sqe_map
                .at(
                    0,
                    p.sq_entries as usize * size_of::<Sqe>(),
                    align_of::<Sqe>(),
                )?
                .cast::<Sqe>();
            let (sq_mask, cq_mask) = (load_acquire(sq_mask_p), load_acquire(cq_mask_p));
            if sq_mask >= p.sq_entries || cq_mask >= p.cq_entries {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
            let efd: libc::c_int = notify.as_raw_fd();
            // SAFETY: IORING_REGISTER_EVENTFD reads one int (nr_args 1) through the pointer,
            // a live local; the kernel takes its own reference to the eventfd.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_io_uring_register,
                    fd.as_raw_fd() as libc::c_long,
                    IORING_REGISTER_EVENTFD as libc::c_long,
                    &efd as *const libc::c_int,
                    1 as libc::c_long,
                )
            };
            if r < 0 {
                return Err(last_error());
            }
            let n = depth as usize;
            Ok(Ring {
                slots: (0..n).map(|_| None).collect(),
                free: (0..n).rev().collect(),
                sq_head: word(p.sq_off.head)?,
                sq_tail: word(p.sq_off.tail)?,
                sq_mask,
                sq_entries: p.sq_entries,
                sq_array,
                sqes,
                cq_head: word(p.cq_off.head)?,
                cq_tail: word(p.cq_off.tail)?,
                cq_mask,
                cqes,
                _sqe_map: sqe_map,
                _ring_map: ring_map,
                fd,
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

        /// `io_uring_enter`: submit `to_submit` entries, wait for `min_complete` completions
        /// when `wait`.
        fn enter(&self, to_submit: u32, min_complete: u32, wait: bool) -> io::Result<usize> {
            let flags = if wait { IORING_ENTER_GETEVENTS } else { 0 };
            // SAFETY: io_uring_enter on our own ring with no argument pointer (null, size 0);
            // it reads the submission entries published below the tail, which `submit` wrote
            // in full and whose buffers the ring owns until their completion.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_io_uring_enter,
                    self.fd.as_raw_fd() as libc::c_long,
                    to_submit as libc::c_long,
                    min_complete as libc::c_long,
                    flags as libc::c_long,
                    std::ptr::null::<libc::c_void>(),
                    0 as libc::c_long,
                )
            };
            if r < 0 {
                Err(last_error())
            } else {
                Ok(r as usize)
            }
        }

        /// Submit `req` on `fd`. The buffer stays with the ring until [`Ring::reap`] returns
        /// it. On failure (no room: EAGAIN; or the kernel's refusal before it took the entry)
        /// the request comes back with the error; errors of a request the kernel took come as
        /// its completion.
        #[allow(clippy::result_large_err)]
        pub fn submit(
            &mut self,
            fd: BorrowedFd<'_>,
            mut req: Request<T>,
        ) -> Result<(), (Request<T>, io::Error)> {
            let Some(slot) = self.free.pop() else {
                return Err((req, io::Error::from_raw_os_error(libc::EAGAIN)));
            };
            // The pointer stays valid while the request is in flight: the buffer is a heap
            // allocation (`AlignedBuf`) that does not move when `req` moves into `slots`
            // below, and `slots` keeps it until the completion is reaped (or, on drop, until
            // the kernel is done with it).
            let Some((buf_ptr, Ok(buf_len), offset)) =
                super::transfer(&mut req).map(|(p, n, o)| (p, u32::try_from(n), o))
            else {
                self.free.push(slot);
                return Err((req, io::Error::from_raw_os_error(libc::EINVAL)));
            };
            let tail = load_acquire(self.sq_tail);
            let head = load_acquire(self.sq_head);
            if tail.wrapping_sub(head) >= self.sq_entries {
                self.free.push(slot);
                return Err((req, io::Error::from_raw_os_error(libc::EAGAIN)));
            }
            let idx = tail & self.sq_mask;
            let sqe = Sqe {
                opcode: match req.dir {
                    Dir::Read => IORING_OP_READ,
                    Dir::Write => IORING_OP_WRITE,
                },
                fd: fd.as_raw_fd(),
                off: offset as u64,
                addr: buf_ptr as usize as u64,
                len: buf_len,
                user_data: slot as u64,
                ..Sqe::default()
            };
            // SAFETY: `idx` <= sq_mask < sq_entries, the length of both arrays (checked at
            // setup against the mappings). The entry at `tail` is not between the kernel's
            // head and tail (room was checked above), so the kernel does not read it while we
            // write it; it reads it only after the tail is published below.
            unsafe {
                self.sqes.add(idx as usize).write(sqe);
                self.sq_array.add(idx as usize).write(idx);
            }
            store_release(self.sq_tail, tail.wrapping_add(1));
            // The buffer belongs to the ring from here on (the kernel may take the entry even
            // when the call below reports an error): the request moves into its slot, and out
            // again only if the kernel did not take the entry.
            self.slots[slot] = Some(req);
            let r = loop {
                match self.enter(1, 0, false) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                        if load_acquire(self.sq_head) == head {
                            continue;
                        }
                        break Ok(1);
                    }
                    r => break r,
                }
            };
            // The kernel advanced its head past the entry: the request is in flight and
            // completes through the completion ring, whatever the call returned.
            if load_acquire(self.sq_head) != head {
                return Ok(());
            }
            // Not taken: withdraw the entry (no other thread enters this ring, so the kernel
            // cannot read it from here on) and give the request back.
            store_release(self.sq_tail, tail);
            let e = match r {
                Err(e) => e,
                Ok(_) => io::Error::from_raw_os_error(libc::EAGAIN),
            };
            self.free.push(slot);
            match self.slots[slot].take() {
                Some(req) => Err((req, e)),
                // Unreachable: the slot was filled above.
                None => Ok(()),
            }
        }

        /// Collect every completion waiting (never blocks) into `out`.
        pub fn reap(&mut self, out: &mut Vec<Done<T>>) -> io::Result<()> {
            let mut head = load_acquire(self.cq_head);
            let tail = load_acquire(self.cq_tail);
            while head != tail {
                // SAFETY: `head & cq_mask` < cq_entries, the length of the completion array
                // (checked at setup); the entries between head and tail are written by the
                // kernel before it published the tail (acquired above) and stay until the
                // head is released below.
                let cqe = unsafe { self.cqes.add((head & self.cq_mask) as usize).read() };
                head = head.wrapping_add(1);
                let slot = cqe.user_data as usize;
                if let Some(req) = self.slots.get_mut(slot).and_then(Option::take) {
                    self.free.push(slot);
                    out.push(Done {
                        req,
                        res: i64::from(cqe.res),
                    });
                }
            }
            store_release(self.cq_head, head);
            Ok(())
        }
    }

    impl<T> Drop for Ring<T> {
        fn drop(&mut self) {
            // Closing an io_uring cancels and waits asynchronously: wait here for every
            // request in flight, so no buffer is written by the kernel once it is freed.
            let mut done = Vec::new();
            while self.in_flight() > 0 {
                let _ = self.reap(&mut done);
                done.clear();
                if self.in_flight() == 0 {
                    break;
                }
                match self.enter(0, 1, true) {
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        // Cannot wait: keep the buffers of the requests still in flight
                        // allocated for good rather than free memory the kernel may write.
                        for req in self.slots.iter_mut().filter_map(Option::take) {
                            std::mem::forget(req);
                        }
                        break;
                    }
                }
            }
        }
    }
}
