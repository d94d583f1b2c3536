//! The byte store under an image: a tiny positional-I/O trait with the real file
//! implementation ([`OsFile`]) and an in-memory simulation ([`MemFile`]) that can model a
//! crash (drop unsynced writes, or keep only the first N of them).
//!
//! Drivers do all their I/O through [`BlockFile`], so crash-consistency tests run the real
//! engine code against the simulation.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// xattr holding the 65-byte keyhash of images without a batmap.
pub const XATTR_KEYHASH: &str = "user.com.citrix.xenclient.backend.keyhash";
/// xattr holding the marker byte of images without a batmap.
pub const XATTR_MARKER: &str = "user.com.citrix.xenclient.backend.marker";

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
}

/// A real file or block device.
pub struct OsFile {
    file: File,
    path: PathBuf,
    blockdev: bool,
    memory: bool,
}

impl fmt::Debug for OsFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OsFile({})", self.path.display())
    }
}

impl OsFile {
    /// Open `path` read-only or read-write.
    pub fn open(path: &Path, writable: bool) -> io::Result<OsFile> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)?;
        let blockdev = file.metadata()?.file_type().is_block_device();
        let memory = !blockdev && on_memory_fs(&file);
        Ok(OsFile {
            file,
            path: path.to_path_buf(),
            blockdev,
            memory,
        })
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
        })
    }

    /// The path this file was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl BlockFile for OsFile {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.file.write_all_at(buf, off)
    }
    fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
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
    let chunk = vec![0u8; 1 << 20];
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
