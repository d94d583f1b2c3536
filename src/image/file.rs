//! The byte store under an image: a tiny positional-I/O trait with the real file
//! implementation ([`OsFile`]) and an in-memory simulation ([`MemFile`]) that can model a
//! crash (drop unsynced writes, or keep only the first N of them).
//!
//! Drivers do all their I/O through [`BlockFile`], so crash-consistency tests run the real
//! engine code against the simulation.
//!
//! # Direct I/O
//!
//! tapdisk opens its images with `O_DIRECT` ([`OsFile::open_with`] with `direct`), as the C
//! tapdisk does: guest data does not pass through (and is not cached twice in) dom0's page
//! cache. The alignment the file needs comes from `statx(STATX_DIOALIGN)` (Linux 6.1+),
//! else from a probe read of one 512-byte block. When the filesystem refuses `O_DIRECT`
//! (`open` fails with EINVAL) or needs an offset alignment above 512 bytes (a 4Kn disk:
//! guests and VHD metadata write 512-byte sectors), the file is opened buffered instead and
//! one warning says why. vhd-util and the other tools always use buffered I/O.
//!
//! With `O_DIRECT`, [`BlockFile::read_at`] and [`BlockFile::write_at`] still take any buffer:
//! an aligned one (address on the direct-I/O memory alignment, offset and length on the
//! offset alignment) goes straight to the kernel; anything else goes through an aligned
//! bounce buffer. A read of an unaligned range reads the enclosing aligned range; an
//! unaligned write reads the enclosing range, patches it and writes it back
//! (read-modify-write, not atomic against a concurrent write to the same aligned block).
//! Only the VHD metadata path (footer, header, BAT, bitmaps, batmap, locators) and the
//! tools do unaligned I/O. The VHD's metadata lock serialises it, except bitmap and BAT
//! sector writes, which run outside it (one writer per bitmap or BAT sector at a time,
//! several at once in a commit batch, [`BlockFile::write_many`]): each is whole 512-byte
//! sectors at a sector offset (a VHD whose BAT is not at one keeps its BAT writes under
//! the lock), so with the offset alignments `O_DIRECT` is used with (512 bytes or less) the
//! bounce buffer never reads, patches and writes back a neighbour's bytes; the I/O engine
//! moves whole 512-byte sectors in page-aligned [`AlignedBuf`]s, which always go straight
//! through.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use log::warn;

use crate::aio;
use crate::util::AlignedBuf;

/// xattr holding the 65-byte keyhash of images without a batmap.
pub const XATTR_KEYHASH: &str = "user.com.citrix.xenclient.backend.keyhash";
/// xattr holding the marker byte of images without a batmap.
pub const XATTR_MARKER: &str = "user.com.citrix.xenclient.backend.marker";

/// Largest direct-I/O offset alignment used; files needing more are opened buffered.
pub const MAX_DIO_OFFSET_ALIGN: u32 = 512;

/// Positional I/O on a file or block device. All methods take `&self` (thread safe).
pub trait BlockFile: Send + Sync + fmt::Debug {
    /// Read exactly `buf.len()` bytes at `off` (error on a short read).
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()>;
    /// Write all of `buf` at `off`, extending the file if needed.
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()>;
    /// Make every completed write (and size change) durable (fdatasync).
    fn sync(&self) -> io::Result<()>;
    /// Current size in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Whether the size is zero.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Truncate or extend (extension reads as zeros). Fails on block devices.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Whether `set_len` is possible (regular files; false for block devices).
    fn resizable(&self) -> bool;
    /// Make a range read as zeros, freeing space where possible; keeps the size.
    fn punch_hole(&self, off: u64, len: u64) -> io::Result<()>;
    /// Read an extended attribute; `None` when it is absent.
    fn get_xattr(&self, name: &str) -> io::Result<Option<Vec<u8>>>;
    /// Set an extended attribute.
    fn set_xattr(&self, name: &str, value: &[u8]) -> io::Result<()>;
    /// Where the next data (`data`) or hole starts at or after `off` (`lseek` `SEEK_DATA` /
    /// `SEEK_HOLE`); no data after `off` gives the file size. `Ok(None)` when the file
    /// cannot tell (the simulation, filesystems without these whences): callers then treat
    /// everything as data.
    fn seek_extent(&self, off: u64, data: bool) -> io::Result<Option<u64>> {
        let _ = (off, data);
        Ok(None)
    }
    /// Whether the bytes live in memory (tmpfs, ramfs): reads and writes then complete
    /// without waiting for a device. Defaults to no.
    fn memory_backed(&self) -> bool {
        false
    }
    /// The direct-I/O alignment when the file is open with `O_DIRECT`.
    fn dio_align(&self) -> Option<DioAlign> {
        None
    }
    /// Write each buffer at its offset, as [`BlockFile::write_at`] does; one result per
    /// write, in order. Where the file can, the writes go to the kernel together, so the
    /// device works on them at once ([`OsFile`] with `O_DIRECT`: Linux AIO), and writes
    /// that overlap land in no fixed order; the default writes them one after another.
    /// Used for the bitmap writes of a VHD commit batch (one per block: no overlap).
    fn write_many(&self, writes: &[(&[u8], u64)]) -> Vec<io::Result<()>> {
        one_by_one(self, writes)
    }
    /// The descriptor for asynchronous I/O submitted by the caller (Linux AIO), when that
    /// never blocks the submitter: the file is open with `O_DIRECT`, or it is memory-backed
    /// (buffered AIO then completes inside the submission). Buffers handed to the kernel
    /// must be page-aligned and offsets and lengths whole sectors. Defaults to none.
    fn aio_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
    /// Test builds only: the result tapdisk's AIO completion path should see for a
    /// transfer of `len` bytes at `off` that the kernel completed with `res` (bytes or
    /// -errno). Fault injection ([`super::fault::FaultFile`]) replaces it; everything
    /// else returns `res`.
    #[cfg(any(test, feature = "sim"))]
    fn inject_aio(&self, write: bool, off: u64, len: usize, res: i64) -> i64 {
        let _ = (write, off, len);
        res
    }
    /// Test builds only: the error with which the kernel should refuse tapdisk's
    /// asynchronous submission (`io_submit`, `io_uring_enter`) of a transfer of `len`
    /// bytes at `off`, or `None` to submit it for real. Fault injection
    /// ([`super::fault::FaultFile`], [`super::fault::Point::Submit`]) chooses; everything
    /// else returns `None`.
    #[cfg(any(test, feature = "sim"))]
    fn inject_aio_submit(&self, write: bool, off: u64, len: usize) -> Option<io::Error> {
        let _ = (write, off, len);
        None
    }
}

/// What `O_DIRECT` asks of a file's I/O (`statx` `stx_dio_mem_align` and
/// `stx_dio_offset_align`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DioAlign {
    /// Alignment of buffer addresses (bytes).
    pub mem: u32,
    /// Alignment of file offsets and lengths (bytes).
    pub offset: u32,
}

impl DioAlign {
    /// Whether `len` bytes at address `addr` and file offset `off` can go to the kernel as
    /// they are.
    fn fits(self, addr: usize, len: usize, off: u64) -> bool {
        let (m, o) = (self.mem.max(1) as usize, u64::from(self.offset.max(1)));
        addr.is_multiple_of(m) && off.is_multiple_of(o) && (len as u64).is_multiple_of(o)
    }
}

/// How [`OsFile::open_with`] opens a file and learns its direct-I/O alignment: the system
/// ([`SysOpener`]), or in tests a stand-in that refuses `O_DIRECT` like some filesystems do.
pub trait FileOpener {
    /// `open(2)` read-only or read-write, with `O_DIRECT` when `direct`.
    fn open(&self, path: &Path, writable: bool, direct: bool) -> io::Result<File>;
    /// The direct-I/O alignment of a file opened with `O_DIRECT` (`Ok(None)`: the file
    /// cannot do direct I/O).
    fn dio_align(&self, file: &File) -> io::Result<Option<DioAlign>>;
}

/// The real `open(2)` and `statx(2)`.
#[derive(Clone, Copy, Debug, Default)]
pub struct SysOpener;

impl FileOpener for SysOpener {
    fn open(&self, path: &Path, writable: bool, direct: bool) -> io::Result<File> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .custom_flags(if direct { libc::O_DIRECT } else { 0 })
            .open(path)
    }

    fn dio_align(&self, file: &File) -> io::Result<Option<DioAlign>> {
        use rustix::fs::{statx, AtFlags, StatxFlags};
        match statx(file, "", AtFlags::EMPTY_PATH, StatxFlags::DIOALIGN) {
            Ok(st) if st.stx_mask & StatxFlags::DIOALIGN.bits() != 0 => {
                // An offset alignment of 0 means "no direct I/O on this file".
                return Ok((st.stx_dio_offset_align != 0).then_some(DioAlign {
                    mem: st.stx_dio_mem_align,
                    offset: st.stx_dio_offset_align,
                }));
            }
            // Kernels before 6.1 (or filesystems) that do not report it: probe below.
            Ok(_) => {}
            Err(e) if e == rustix::io::Errno::NOSYS => {}
            Err(e) => return Err(e.into()),
        }
        // One aligned 512-byte read at 0 (an empty file reads nothing, which says nothing
        // either way: assume the common 512). EINVAL means a larger alignment is needed.
        let mut probe = AlignedBuf::zeroed(MAX_DIO_OFFSET_ALIGN as usize);
        match file.read_at(&mut probe, 0) {
            Ok(_) => Ok(Some(DioAlign {
                mem: MAX_DIO_OFFSET_ALIGN,
                offset: MAX_DIO_OFFSET_ALIGN,
            })),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(Some(DioAlign {
                mem: crate::PAGE_SIZE as u32,
                offset: crate::PAGE_SIZE as u32,
            })),
            Err(e) => Err(e),
        }
    }
}

/// A real file or block device.
pub struct OsFile {
    file: File,
    path: PathBuf,
    blockdev: bool,
    memory: bool,
    /// Open with `O_DIRECT`, needing this alignment.
    dio: Option<DioAlign>,
}

impl fmt::Debug for OsFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OsFile({})", self.path.display())
    }
}

impl OsFile {
    /// Open `path` read-only or read-write, buffered.
    pub fn open(path: &Path, writable: bool) -> io::Result<OsFile> {
        OsFile::open_with(path, writable, false, &SysOpener)
    }

    /// Open `path` read-only or read-write; with `direct`, with `O_DIRECT` where the
    /// filesystem allows it (see the module doc: otherwise buffered, with one warning).
    pub fn open_with(
        path: &Path,
        writable: bool,
        direct: bool,
        opener: &dyn FileOpener,
    ) -> io::Result<OsFile> {
        let mut dio = None;
        let file = if direct {
            match Self::try_direct(path, writable, opener)? {
                Ok((f, a)) => {
                    dio = Some(a);
                    f
                }
                Err(why) => {
                    warn!(
                        "{}: direct I/O unavailable ({why}): using buffered I/O",
                        path.display()
                    );
                    opener.open(path, writable, false)?
                }
            }
        } else {
            opener.open(path, writable, false)?
        };
        let blockdev = file.metadata()?.file_type().is_block_device();
        let memory = !blockdev && on_memory_fs(&file);
        Ok(OsFile {
            file,
            path: path.to_path_buf(),
            blockdev,
            memory,
            dio,
        })
    }

    /// Open with `O_DIRECT` and learn the alignment. The inner `Err` says why direct I/O
    /// is not possible on this file (the caller opens it buffered); the outer one is a
    /// real failure (no such file, permissions...).
    fn try_direct(
        path: &Path,
        writable: bool,
        opener: &dyn FileOpener,
    ) -> io::Result<Result<(File, DioAlign), String>> {
        let file = match opener.open(path, writable, true) {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                return Ok(Err(format!("the filesystem refuses O_DIRECT: {e}")))
            }
            Err(e) => return Err(e),
        };
        match opener.dio_align(&file) {
            Ok(Some(a)) if a.offset <= MAX_DIO_OFFSET_ALIGN && a.mem as usize <= crate::PAGE_SIZE => {
                Ok(Ok((file, a)))
            }
            Ok(Some(a)) => Ok(Err(format!(
                "it needs {}-byte offsets and {}-byte buffers, more than {MAX_DIO_OFFSET_ALIGN} and {}",
                a.offset,
                a.mem,
                crate::PAGE_SIZE
            ))),
            Ok(None) => Ok(Err("statx reports no direct I/O for this file".into())),
            Err(e) => Ok(Err(format!("cannot learn its alignment: {e}"))),
        }
    }

    /// Create a new file (fails if it exists) opened read-write.
    pub fn create_new(path: &Path) -> io::Result<OsFile> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        let memory = on_memory_fs(&file);
        Ok(OsFile {
            file,
            path: path.to_path_buf(),
            blockdev: false,
            memory,
            dio: None,
        })
    }

    /// The path this file was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the file is open with `O_DIRECT`.
    pub fn direct(&self) -> bool {
        self.dio.is_some()
    }

    /// `pread` into an aligned buffer until it is full or the file ends; the bytes read.
    fn read_upto(&self, buf: &mut [u8], off: u64) -> io::Result<usize> {
        let mut got = 0;
        while got < buf.len() {
            match self.file.read_at(&mut buf[got..], off + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(got)
    }

    /// The aligned range `[start, end)` enclosing `len` bytes at `off`.
    fn enclosing(a: DioAlign, off: u64, len: usize) -> io::Result<(u64, usize)> {
        let o = u64::from(a.offset.max(1));
        let start = off - off % o;
        let end = off
            .checked_add(len as u64)
            .and_then(|e| e.checked_next_multiple_of(o))
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        let n =
            usize::try_from(end - start).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        Ok((start, n))
    }

    fn bounce_read(&self, a: DioAlign, buf: &mut [u8], off: u64) -> io::Result<()> {
        let (start, n) = Self::enclosing(a, off, buf.len())?;
        let mut tmp = AlignedBuf::zeroed(n);
        let got = self.read_upto(&mut tmp, start)?;
        // off - start < the offset alignment.
        let skip = (off - start) as usize;
        if got < skip + buf.len() {
            return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
        }
        buf.copy_from_slice(&tmp[skip..skip + buf.len()]);
        Ok(())
    }

    fn bounce_write(&self, a: DioAlign, buf: &[u8], off: u64) -> io::Result<()> {
        let (start, n) = Self::enclosing(a, off, buf.len())?;
        let mut tmp = AlignedBuf::zeroed(n);
        let skip = (off - start) as usize;
        let whole = skip == 0 && n == buf.len();
        let old_len = self.len()?;
        if !whole {
            // Read-modify-write of the partial first and last blocks (bytes past the end
            // of the file stay zero).
            self.read_upto(&mut tmp, start)?;
        }
        tmp[skip..skip + buf.len()].copy_from_slice(buf);
        self.file.write_all_at(&tmp, start)?;
        // The aligned write may have extended the file beyond what the caller wrote.
        let want = old_len.max(off + buf.len() as u64);
        if !self.blockdev && start + n as u64 > want {
            self.file.set_len(want)?;
        }
        Ok(())
    }
}

/// Writes one [`aio_batch`] takes at most (more go in several rounds).
const BATCH_DEPTH: usize = 64;

#[cfg(any(test, feature = "sim"))]
thread_local! {
    /// Test builds: writes this thread's [`aio_batch`]es submitted.
    static BATCHED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Test builds: writes this thread submitted in Linux AIO batches
/// ([`BlockFile::write_many`]) so far.
#[cfg(any(test, feature = "sim"))]
pub fn batched_writes() -> u64 {
    BATCHED.with(|b| b.get())
}

/// A thread's Linux AIO context for [`aio_batch`], with the eventfd it signals; `None` once
/// setting one up failed (no AIO here: the writes then go one by one).
type BatchCtx = Option<(aio::Context<usize>, nix::sys::eventfd::EventFd)>;

thread_local! {
    /// Set up at a thread's first batch (the VHD commit's worker threads).
    static BATCH: std::cell::RefCell<Option<BatchCtx>> = const { std::cell::RefCell::new(None) };
}

/// Write every `(bytes, offset)` on `fd` (`O_DIRECT`, each offset and length aligned) with
/// Linux AIO, all submitted before waiting for any, and wait for them: per write the bytes
/// written or the error, or `None` when the kernel refused its submission (EAGAIN,
/// ENOMEM, ...: the caller writes it with `pwrite`). `None` for all when this thread
/// cannot use Linux AIO.
fn aio_batch(
    fd: BorrowedFd<'_>,
    writes: &[(&[u8], u64)],
) -> Option<Vec<Option<io::Result<usize>>>> {
    BATCH.with(|cell| {
        let mut slot = cell.borrow_mut();
        let ctx = slot.get_or_insert_with(new_batch_ctx);
        if ctx.as_ref().is_some_and(|(c, _)| c.in_flight() != 0) {
            // Left with requests in flight (a batch that did not finish): a fresh context,
            // once the old one's Drop has waited for them, so no stale completion is
            // taken for one of this batch.
            *ctx = None;
            *ctx = new_batch_ctx();
        }
        let (c, efd) = ctx.as_mut()?;
        let r = batch_on(c, efd, fd, writes);
        if r.is_none() {
            // Waiting failed: no more batches on this thread. Dropping the context waits
            // for what is still in flight (io_destroy) before its buffers are freed.
            *ctx = None;
        }
        r
    })
}

/// A Linux AIO context for [`aio_batch`] and the eventfd it signals (`None`: no AIO here).
fn new_batch_ctx() -> BatchCtx {
    use nix::sys::eventfd::{EfdFlags, EventFd};
    let efd = EventFd::from_flags(EfdFlags::EFD_CLOEXEC).ok()?;
    let ctx = aio::Context::new(BATCH_DEPTH as u32, efd.as_fd()).ok()?;
    Some((ctx, efd))
}

/// Each of `writes` with [`BlockFile::write_at`], one after another.
fn one_by_one<F: BlockFile + ?Sized>(f: &F, writes: &[(&[u8], u64)]) -> Vec<io::Result<()>> {
    writes.iter().map(|(b, off)| f.write_at(b, *off)).collect()
}

/// [`aio_batch`] on one context: `None` when waiting for completions failed.
fn batch_on(
    ctx: &mut aio::Context<usize>,
    efd: &nix::sys::eventfd::EventFd,
    fd: BorrowedFd<'_>,
    writes: &[(&[u8], u64)],
) -> Option<Vec<Option<io::Result<usize>>>> {
    let mut out: Vec<Option<io::Result<usize>>> = writes.iter().map(|_| None).collect();
    let mut done = Vec::new();
    for (round, chunk) in writes.chunks(BATCH_DEPTH).enumerate() {
        let base = round * BATCH_DEPTH;
        let mut waiting = 0;
        for (k, (b, off)) in chunk.iter().enumerate() {
            let req = aio::Request {
                dir: aio::Dir::Write,
                buf: AlignedBuf::from_slice(b),
                start: 0,
                offset: *off,
                user: base + k,
            };
            if ctx.submit(fd, req).is_ok() {
                waiting += 1;
                #[cfg(any(test, feature = "sim"))]
                BATCHED.with(|b| b.set(b.get() + 1));
            }
        }
        while waiting > 0 {
            // Blocks until a completion signals the eventfd (reading resets its counter).
            match efd.read() {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                Err(_) => return None,
            }
            ctx.reap(&mut done).ok()?;
            for aio::Done { req, res } in done.drain(..) {
                waiting -= 1;
                out[req.user] = Some(usize::try_from(res).map_err(|_| {
                    io::Error::from_raw_os_error(
                        res.checked_neg()
                            .and_then(|e| i32::try_from(e).ok())
                            .unwrap_or(libc::EIO),
                    )
                }));
            }
        }
    }
    Some(out)
}

impl BlockFile for OsFile {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        match self.dio {
            Some(a) if !a.fits(buf.as_ptr() as usize, buf.len(), off) => {
                self.bounce_read(a, buf, off)
            }
            _ => self.file.read_exact_at(buf, off),
        }
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        match self.dio {
            Some(a) if !a.fits(buf.as_ptr() as usize, buf.len(), off) => {
                self.bounce_write(a, buf, off)
            }
            _ => self.file.write_all_at(buf, off),
        }
    }
    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }
    /// With `O_DIRECT` and more than one write, each aligned write goes to the kernel in
    /// one Linux AIO batch ([`aio_batch`]) and this thread waits for all of them; the
    /// others (unaligned: read-modify-write) and all writes where AIO cannot be set up go
    /// one after another.
    fn write_many(&self, writes: &[(&[u8], u64)]) -> Vec<io::Result<()>> {
        let Some(a) = self.dio.filter(|_| writes.len() > 1) else {
            return one_by_one(self, writes);
        };
        // Only whole aligned blocks at aligned offsets: the buffer is copied into an
        // aligned one, so its address does not matter.
        let batchable = |b: &[u8], off: u64| a.fits(0, b.len(), off) && !b.is_empty();
        let picked: Vec<(usize, &[u8], u64)> = writes
            .iter()
            .enumerate()
            .filter(|(_, (b, off))| batchable(b, *off))
            .map(|(i, (b, off))| (i, *b, *off))
            .collect();
        let mut out: Vec<Option<io::Result<()>>> = writes.iter().map(|_| None).collect();
        if picked.len() > 1 {
            let batch: Vec<(&[u8], u64)> = picked.iter().map(|&(_, b, off)| (b, off)).collect();
            if let Some(rs) = aio_batch(self.file.as_fd(), &batch) {
                for ((i, b, off), r) in picked.iter().zip(rs) {
                    out[*i] = match r {
                        // A short write: the rest one by one.
                        Some(Ok(n)) if n < b.len() => Some(self.write_at(&b[n..], off + n as u64)),
                        Some(Ok(_)) => Some(Ok(())),
                        Some(Err(e)) => Some(Err(e)),
                        // Refused at submission (EAGAIN, ENOMEM, ...): one by one below.
                        None => None,
                    };
                }
            }
        }
        out.into_iter()
            .zip(writes)
            .map(|(r, (b, off))| r.unwrap_or_else(|| self.write_at(b, *off)))
            .collect()
    }
    fn len(&self) -> io::Result<u64> {
        if self.blockdev {
            use std::io::Seek;
            let mut f = &self.file;
            f.seek(io::SeekFrom::End(0))
        } else {
            Ok(self.file.metadata()?.len())
        }
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        if self.blockdev {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        self.file.set_len(len)
    }
    fn resizable(&self) -> bool {
        !self.blockdev
    }
    fn punch_hole(&self, off: u64, len: u64) -> io::Result<()> {
        use nix::fcntl::{fallocate, FallocateFlags};
        // nix takes off_t, which is 32-bit on i686: beyond that, write zeros instead.
        let (Ok(o), Ok(l)) = (libc::off_t::try_from(off), libc::off_t::try_from(len)) else {
            return write_zeros(self, off, len);
        };
        let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        match fallocate(&self.file, flags, o, l) {
            Ok(()) => Ok(()),
            // Filesystems or devices without hole punching: write zeros instead.
            Err(nix::errno::Errno::EOPNOTSUPP) | Err(nix::errno::Errno::ENODEV) => {
                write_zeros(self, off, len)
            }
            Err(e) => Err(io::Error::from(e)),
        }
    }
    fn get_xattr(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        match xattr::get(&self.path, name) {
            Ok(v) => Ok(v),
            // Absent, or a filesystem without user xattrs (where none can have been set):
            // both read as "not set". (tapdisk fails the open on ENOTSUP; we don't.)
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENODATA) | Some(libc::ENOTSUP)) => {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }
    fn set_xattr(&self, name: &str, value: &[u8]) -> io::Result<()> {
        xattr::set(&self.path, name, value)
    }
    fn seek_extent(&self, off: u64, data: bool) -> io::Result<Option<u64>> {
        use nix::errno::Errno;
        use nix::unistd::{lseek64, Whence};
        let Ok(o) = i64::try_from(off) else {
            return Ok(None);
        };
        let whence = if data {
            Whence::SeekData
        } else {
            Whence::SeekHole
        };
        // Only positional I/O is done on this fd, so moving its offset is harmless.
        match lseek64(&self.file, o, whence) {
            Ok(p) => Ok(u64::try_from(p).ok()),
            // No data at or after `off` (or `off` at/after the end).
            Err(Errno::ENXIO) => self.len().map(Some),
            Err(Errno::EINVAL) | Err(Errno::EOPNOTSUPP) => Ok(None),
            Err(e) => Err(io::Error::from(e)),
        }
    }
    fn memory_backed(&self) -> bool {
        self.memory
    }
    fn dio_align(&self) -> Option<DioAlign> {
        self.dio
    }
    fn aio_fd(&self) -> Option<BorrowedFd<'_>> {
        (self.dio.is_some() || self.memory).then(|| self.file.as_fd())
    }
}

/// Whether `file` sits on a filesystem that keeps its data in memory (tmpfs, ramfs).
/// A failing `fstatfs` answers no (the safe side: I/O then goes to the workers).
fn on_memory_fs(file: &File) -> bool {
    use nix::sys::statfs::{fstatfs, FsType, TMPFS_MAGIC};
    // linux/magic.h RAMFS_MAGIC (not in libc); the cast keeps the bits on 32-bit targets.
    let ramfs = FsType(0x8584_58f6_u32 as _);
    fstatfs(file).is_ok_and(|s| [TMPFS_MAGIC, ramfs].contains(&s.filesystem_type()))
}

/// Write `len` zero bytes at `off` in chunks.
pub fn write_zeros(f: &dyn BlockFile, mut off: u64, mut len: u64) -> io::Result<()> {
    let chunk = AlignedBuf::zeroed(1 << 20);
    while len > 0 {
        let n = len.min(chunk.len() as u64);
        // n <= 1 MiB, fits usize on every target.
        f.write_at(&chunk[..n as usize], off)?;
        off += n;
        len -= n;
    }
    Ok(())
}

/// One mutation not yet made durable by `sync`.
#[derive(Clone, Debug)]
enum PendingOp {
    Write(u64, Vec<u8>),
    SetLen(u64),
}

#[derive(Debug, Default)]
struct MemState {
    /// What the "disk" holds after a crash right now (the last synced state).
    durable: Vec<u8>,
    /// What readers see now.
    current: Vec<u8>,
    /// Mutations since the last sync, in issue order.
    pending: Vec<PendingOp>,
    xattrs: HashMap<String, Vec<u8>>,
    /// Fail every write/sync/set_len after this many more mutations (crash injection).
    fail_after: Option<u64>,
    /// Number of mutations (writes + set_len) performed so far.
    ops: u64,
}

fn apply(buf: &mut Vec<u8>, op: &PendingOp) {
    match op {
        PendingOp::Write(off, data) => {
            let (Ok(o), Ok(end)) = (
                usize::try_from(*off),
                usize::try_from(*off + data.len() as u64),
            ) else {
                return;
            };
            if buf.len() < end {
                buf.resize(end, 0);
            }
            buf[o..end].copy_from_slice(data);
        }
        PendingOp::SetLen(len) => {
            if let Ok(l) = usize::try_from(*len) {
                buf.resize(l, 0);
            }
        }
    }
}

/// In-memory file with a durability model: writes land in `current` and are only copied to
/// the durable image by `sync`. A crash ([`MemFile::crash_image`]) keeps the durable state
/// plus any chosen subset of the unsynced mutations.
#[derive(Debug, Default)]
pub struct MemFile {
    st: Mutex<MemState>,
    /// Behaves like a block device: fixed size, `set_len` fails.
    fixed_size: bool,
}

impl MemFile {
    /// An empty file.
    pub fn new() -> MemFile {
        MemFile::default()
    }

    /// A file holding `data`, all of it durable.
    pub fn from_bytes(data: Vec<u8>) -> MemFile {
        MemFile {
            st: Mutex::new(MemState {
                durable: data.clone(),
                current: data,
                ..Default::default()
            }),
            fixed_size: false,
        }
    }

    /// A simulated block device holding `data` (size fixed, writes past the end fail).
    pub fn block_device(data: Vec<u8>) -> MemFile {
        MemFile {
            fixed_size: true,
            ..MemFile::from_bytes(data)
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemState> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What readers see now.
    pub fn contents(&self) -> Vec<u8> {
        self.lock().current.clone()
    }

    /// Number of unsynced mutations.
    pub fn pending_ops(&self) -> usize {
        self.lock().pending.len()
    }

    /// Total number of mutations (writes and size changes) so far.
    pub fn op_count(&self) -> u64 {
        self.lock().ops
    }

    /// After `n` more successful mutations, every mutation and sync fails with EIO
    /// (the process "stops" at that point).
    pub fn fail_after(&self, n: u64) {
        self.lock().fail_after = Some(n);
    }

    /// The file as it would be found after a crash now: the durable state plus the
    /// unsynced mutations whose index `keep(i)` accepts (applied in issue order).
    pub fn crash_image(&self, keep: &mut dyn FnMut(usize) -> bool) -> Vec<u8> {
        let st = self.lock();
        let mut img = st.durable.clone();
        for (i, op) in st.pending.iter().enumerate() {
            if keep(i) {
                apply(&mut img, op);
            }
        }
        img
    }

    fn mutate(&self, op: PendingOp) -> io::Result<()> {
        let mut st = self.lock();
        if let Some(n) = st.fail_after {
            if n == 0 {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            st.fail_after = Some(n - 1);
        }
        st.ops += 1;
        apply(&mut st.current, &op);
        st.pending.push(op);
        Ok(())
    }
}

impl BlockFile for MemFile {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let st = self.lock();
        let end = off.checked_add(buf.len() as u64);
        match (
            usize::try_from(off),
            end.and_then(|e| usize::try_from(e).ok()),
        ) {
            (Ok(o), Some(e)) if e <= st.current.len() => {
                buf.copy_from_slice(&st.current[o..e]);
                Ok(())
            }
            _ => Err(io::Error::from(io::ErrorKind::UnexpectedEof)),
        }
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        let end = off.checked_add(buf.len() as u64);
        if end.is_none() || (self.fixed_size && end > Some(self.len()?)) {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        self.mutate(PendingOp::Write(off, buf.to_vec()))
    }
    fn sync(&self) -> io::Result<()> {
        let mut st = self.lock();
        if st.fail_after == Some(0) {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        st.durable = st.current.clone();
        st.pending.clear();
        Ok(())
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().current.len() as u64)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        if self.fixed_size {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        self.mutate(PendingOp::SetLen(len))
    }
    fn resizable(&self) -> bool {
        !self.fixed_size
    }
    fn punch_hole(&self, off: u64, len: u64) -> io::Result<()> {
        let cur = self.len()?;
        let end = off.saturating_add(len).min(cur);
        if end > off {
            let n = usize::try_from(end - off)
                .map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
            self.mutate(PendingOp::Write(off, vec![0u8; n]))?;
        }
        Ok(())
    }
    fn get_xattr(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        Ok(self.lock().xattrs.get(name).cloned())
    }
    fn set_xattr(&self, name: &str, value: &[u8]) -> io::Result<()> {
        self.lock().xattrs.insert(name.to_string(), value.to_vec());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memfile_crash_keeps_only_synced_or_selected_writes() {
        let f = MemFile::new();
        f.write_at(b"abcd", 0).unwrap();
        f.sync().unwrap();
        f.write_at(b"XY", 1).unwrap();
        f.set_len(8).unwrap();
        assert_eq!(f.contents(), b"aXYd\0\0\0\0");
        assert_eq!(f.crash_image(&mut |_| false), b"abcd");
        assert_eq!(f.crash_image(&mut |i| i == 1), b"abcd\0\0\0\0");
        assert_eq!(f.crash_image(&mut |_| true), f.contents());
        let mut b = [0u8; 2];
        assert!(f.read_at(&mut b, 7).is_err());
    }

    /// A directory on a real disk filesystem (ext4 under /var/tmp here), not tmpfs.
    fn disk_dir() -> tempfile::TempDir {
        tempfile::tempdir_in("/var/tmp").unwrap()
    }

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn direct_io_reads_and_writes_any_range_like_buffered_io() {
        let d = disk_dir();
        let p = d.path().join("f");
        let init = pattern(3 * 4096 + 700, 1);
        std::fs::write(&p, &init).unwrap();
        let f = OsFile::open_with(&p, true, true, &SysOpener).unwrap();
        assert!(f.direct(), "ext4 takes O_DIRECT");
        let a = f.dio_align().unwrap();
        assert!(a.offset <= MAX_DIO_OFFSET_ALIGN && a.offset > 0);
        assert!(f.aio_fd().is_some());
        let mut model = init.clone();
        // Odd offsets and lengths, a sector, a page-aligned buffer, a misaligned buffer of
        // whole sectors, a write that straddles and one that extends the unaligned end.
        let writes: Vec<(u64, Vec<u8>)> = vec![
            (1, pattern(3, 7)),
            (1000, pattern(511, 8)),
            (512, pattern(512, 9)),
            (4095, pattern(2, 10)),
            (model.len() as u64 - 10, pattern(30, 11)),
        ];
        for (off, data) in &writes {
            f.write_at(data, *off).unwrap();
            let end = *off as usize + data.len();
            if model.len() < end {
                model.resize(end, 0);
            }
            model[*off as usize..end].copy_from_slice(data);
            assert_eq!(f.len().unwrap(), model.len() as u64, "exact length kept");
        }
        let mut al = AlignedBuf::from_slice(&pattern(4096, 12));
        f.write_at(&al, 4096).unwrap();
        model[4096..8192].copy_from_slice(&al);
        let mut mis = vec![0u8; 1025];
        f.write_at(&pattern(1024, 13), 8192).unwrap();
        model[8192..9216].copy_from_slice(&pattern(1024, 13));
        for (off, len) in [
            (0u64, 1usize),
            (1, 3),
            (511, 2),
            (1000, 1025),
            (0, model.len()),
        ] {
            let mut b = vec![0u8; len];
            f.read_at(&mut b, off).unwrap();
            assert_eq!(b, model[off as usize..off as usize + len], "{off}+{len}");
        }
        f.read_at(&mut mis[1..], 512).unwrap();
        assert_eq!(mis[1..], model[512..1536]);
        f.read_at(&mut al, 4096).unwrap();
        assert_eq!(al[..], model[4096..8192]);
        // Past the end is an error, as with buffered I/O.
        let mut b = [0u8; 16];
        assert!(f.read_at(&mut b, model.len() as u64 - 8).is_err());
        f.sync().unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), model);
        write_zeros(&f, 3, 5000).unwrap();
        model[3..5003].fill(0);
        assert_eq!(std::fs::read(&p).unwrap(), model);
    }

    /// Many writes at once on an `O_DIRECT` file (ext4: 512-byte alignment; Linux AIO
    /// available): the aligned ones, one of them extending the file, go out in Linux AIO
    /// batches (more of them than one batch holds), an unaligned one on its own; the file
    /// ends as if they were written one by one. A buffered file takes them one by one.
    #[test]
    fn write_many_lands_every_write() {
        let d = disk_dir();
        for direct in [true, false] {
            let p = d.path().join(format!("f{direct}"));
            let mut model = pattern(1 << 20, 1);
            std::fs::write(&p, &model).unwrap();
            let f = OsFile::open_with(&p, true, direct, &SysOpener).unwrap();
            assert_eq!(f.direct(), direct);
            let mut writes: Vec<(u64, Vec<u8>)> = (0..100u64)
                .map(|k| (k * 8192 + 512 * (k % 3), pattern(512 << (k % 2), k as u8)))
                .collect();
            writes.push((900_001, pattern(700, 200)));
            writes.push(((1 << 20) + 4096, pattern(512, 201)));
            for (off, b) in &writes {
                let end = *off as usize + b.len();
                if model.len() < end {
                    model.resize(end, 0);
                }
                model[*off as usize..end].copy_from_slice(b);
            }
            let refs: Vec<(&[u8], u64)> = writes.iter().map(|(o, b)| (b.as_slice(), *o)).collect();
            let before = batched_writes();
            for (i, r) in f.write_many(&refs).into_iter().enumerate() {
                assert!(r.is_ok(), "direct={direct} write {i}: {r:?}");
            }
            let batched = batched_writes() - before;
            if direct {
                assert_eq!(batched, 101, "direct: writes batched");
            } else {
                assert_eq!(batched, 0, "buffered: one by one");
            }
            assert!(std::fs::read(&p).unwrap() == model, "direct={direct}");
        }
    }

    /// Refuses `O_DIRECT` as ramfs and older tmpfs do (open fails with EINVAL), or claims
    /// a 4 KiB offset alignment (a 4Kn disk).
    struct Refusing {
        align: Option<DioAlign>,
    }

    impl FileOpener for Refusing {
        fn open(&self, path: &Path, writable: bool, direct: bool) -> io::Result<File> {
            if direct && self.align.is_none() {
                return Err(io::Error::from_raw_os_error(libc::EINVAL));
            }
            SysOpener.open(path, writable, direct)
        }
        fn dio_align(&self, _file: &File) -> io::Result<Option<DioAlign>> {
            Ok(self.align)
        }
    }

    #[test]
    fn direct_io_falls_back_to_buffered_when_refused_or_too_coarse() {
        let d = disk_dir();
        let p = d.path().join("f");
        std::fs::write(&p, pattern(8192, 3)).unwrap();
        let coarse = DioAlign {
            mem: 4096,
            offset: 4096,
        };
        for align in [None, Some(coarse)] {
            let f = OsFile::open_with(&p, true, true, &Refusing { align }).unwrap();
            assert!(!f.direct(), "{align:?}");
            assert!(f.dio_align().is_none() && f.aio_fd().is_none());
            f.write_at(&[1, 2, 3], 5).unwrap();
            let mut b = [0u8; 3];
            f.read_at(&mut b, 5).unwrap();
            assert_eq!(b, [1, 2, 3]);
        }
        // Missing files are still errors, not fallbacks.
        let e = OsFile::open_with(&d.path().join("nope"), false, true, &SysOpener).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENOENT));
    }

    /// The real refusal: ramfs answers `open(O_DIRECT)` with EINVAL (tmpfs accepts it
    /// since Linux 6.6). Needs root to mount one; skipped (with a note) without.
    #[test]
    fn direct_io_falls_back_on_a_real_ramfs() {
        struct Mount(tempfile::TempDir);
        impl Drop for Mount {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount")
                    .arg(self.0.path())
                    .status();
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "ramfs", "ramfs"])
            .arg(dir.path())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("cannot mount ramfs here (not root?): real-refusal test skipped");
            return;
        }
        let m = Mount(dir);
        let p = m.0.path().join("f");
        std::fs::write(&p, pattern(4096, 5)).unwrap();
        let err = SysOpener.open(&p, true, true).unwrap_err();
        assert_eq!(
            err.raw_os_error(),
            Some(libc::EINVAL),
            "ramfs refuses O_DIRECT"
        );
        let f = OsFile::open_with(&p, true, true, &SysOpener).unwrap();
        assert!(!f.direct());
        assert!(f.memory_backed());
        f.write_at(&[9; 10], 100).unwrap();
        let mut b = vec![0u8; 4096];
        f.read_at(&mut b, 0).unwrap();
        let mut want = pattern(4096, 5);
        want[100..110].fill(9);
        assert_eq!(b, want);
    }

    #[test]
    fn memfile_fail_after_stops_mutations() {
        let f = MemFile::new();
        f.fail_after(1);
        f.write_at(b"a", 0).unwrap();
        assert!(f.write_at(b"b", 1).is_err());
        assert!(f.sync().is_err());
        assert_eq!(f.contents(), b"a");
    }
}
