//! Disk images: raw files, VHD (fixed, dynamic, differencing), encryption and chains.
//!
//! Everything above this module (tapdisk's request pipeline, the NBD export, vhd-util)
//! reads and writes disks through the [`Image`] trait. Images are `Send + Sync`: all I/O
//! methods take `&self`, so a worker pool can run several requests against one image at
//! once; drivers serialise their own metadata updates internally.
//!
//! Units: sector numbers and counts are 512-byte sectors ([`SECTOR_SIZE`]), as in the VHD
//! format and the blkif protocol. Buffers passed to `read`/`write` are whole sectors.

pub mod chain;
pub mod crypto;
#[cfg(any(test, feature = "sim"))]
pub mod fault;
pub mod file;
pub mod open;
pub mod raw;
pub mod vhd;

pub use chain::OpenOptions;
pub use open::{open, probe, ImageFormat};

use std::io;
use std::path::PathBuf;

/// The sector unit of every image API, the VHD format and the blkif protocol.
pub use crate::SECTOR_SIZE;
/// `SECTOR_SIZE` as a shift.
pub const SECTOR_SHIFT: u32 = 9;

/// What a consumer needs to know about an open image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageInfo {
    /// Virtual size in 512-byte sectors.
    pub size_sectors: u64,
    /// Logical sector size advertised to consumers (always 512 for our drivers).
    pub sector_size: u32,
    /// The image (leaf) was opened read-only.
    pub read_only: bool,
}

impl ImageInfo {
    /// Virtual size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.size_sectors * SECTOR_SIZE
    }
}

/// One run of sectors with the same allocation status (NBD `base:allocation`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub sector: u64,
    pub nsectors: u64,
    /// Data is stored somewhere in the chain (false: reads as zeros, a hole).
    pub allocated: bool,
}

/// One image of a chain, as `tap-ctl stats` lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LayerInfo {
    /// The path the image was opened with (parents: as resolved from the child's locator).
    pub path: PathBuf,
    /// Its driver (VHD, or raw = tapdisk's `aio`).
    pub format: ImageFormat,
}

/// A virtual disk.
pub trait Image: Send + Sync + std::fmt::Debug {
    /// Size and flags; constant for the life of the open image.
    fn info(&self) -> ImageInfo;
    /// Read `buf.len() / 512` sectors starting at `sector`. Unallocated ranges come from
    /// the parent chain, or read as zeros at the root.
    fn read(&self, sector: u64, buf: &mut [u8]) -> Result<(), ImageError>;
    /// Write whole sectors. Returns only once the data and the metadata that makes it
    /// visible are written (not necessarily synced: see [`Image::flush`]).
    fn write(&self, sector: u64, buf: &[u8]) -> Result<(), ImageError>;
    /// [`Image::write`] from a buffer the caller owns and gives up: afterwards its contents
    /// are unspecified. An encrypted image encrypts in place instead of into a bounce
    /// buffer (tapdisk's engine, whose request buffers are private). Defaults to `write`.
    fn write_in_place(&self, sector: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        self.write(sector, buf)
    }
    /// Make every acknowledged write durable (fdatasync of the files involved).
    fn flush(&self) -> Result<(), ImageError>;
    /// Drop the contents of a range. Afterwards the range reads as zeros (or, for a
    /// differencing VHD that cannot deallocate, as whatever the format allows: see the driver).
    fn discard(&self, sector: u64, nsectors: u64) -> Result<(), ImageError>;
    /// Allocation map of a range, as consecutive extents covering exactly the range.
    fn block_status(&self, sector: u64, nsectors: u64) -> Result<Vec<Extent>, ImageError>;
    /// Write final metadata (VHD footer, batmap) and sync. Further I/O fails. Idempotent.
    fn close(&self) -> Result<(), ImageError>;
    /// The images of the chain, leaf (this image) first, root last. The default (empty)
    /// means the image does not describe itself (test doubles); callers then describe it
    /// from what they opened.
    fn layers(&self) -> Vec<LayerInfo> {
        Vec::new()
    }
    /// Whether every file of the chain keeps its bytes in memory (tmpfs, ramfs), so that
    /// reads and writes finish without waiting for a device. tapdisk runs the I/O of such
    /// images on its event loop instead of handing it to a worker thread. Defaults to no.
    fn memory_backed(&self) -> bool {
        false
    }
    /// Where `nsectors` at `sector` live when a reader or writer may go to the file
    /// directly (asynchronous I/O from tapdisk's loop) and nothing else has to happen:
    /// one contiguous run in one file whose descriptor takes asynchronous I/O
    /// ([`file::BlockFile::aio_fd`]), needing no metadata change and no parent. `None` (the
    /// default) means "go through [`Image::read`] / [`Image::write`]". A raw image always
    /// maps; a VHD when the range lies in one allocated block whose cached bitmap has every
    /// bit of the range set. Answered from memory, without I/O.
    ///
    /// A write may also be mapped when something has to happen after its data is in the
    /// file ([`DirectMap::commit`]): a VHD block that is allocated and whose bitmap is
    /// cached, but whose bits for the range are not all set yet (or whose bitmap or BAT
    /// sector is not on disk as in memory), and a block's first write, for which the VHD
    /// allocates the block in memory here (no I/O) when its reserve has room. The writer then calls [`Image::commit_writes`] once the data
    /// write has completed, and acknowledges the write only after that.
    fn direct_map(&self, sector: u64, nsectors: u64, write: bool) -> Option<DirectMap> {
        let _ = (sector, nsectors, write);
        None
    }
    /// Finish writes whose data went to the file through a [`DirectMap`] with `commit`
    /// set, after each data write completed: `(sector, nsectors)` per write, as mapped.
    /// One result per range, in order; a write is acknowledged only once its result is
    /// `Ok`. Writes committed in one call share the work (a VHD syncs once for all of them,
    /// then writes each block's bitmap once). The default has nothing to do: an image
    /// whose `direct_map` sets `commit` must implement it.
    fn commit_writes(&self, ranges: &[(u64, u64)]) -> Vec<Result<(), ImageError>> {
        ranges.iter().map(|_| Ok(())).collect()
    }
}

/// The answer of [`Image::direct_map`]: the bytes are at `offset` in `file` (kept open by
/// the `Arc` while the I/O runs); when `cipher` is set they are stored encrypted, with the
/// request's first virtual sector as the first tweak (encrypt before writing, decrypt
/// after reading); when `commit` is set a write must then be committed.
#[derive(Clone, Debug)]
pub struct DirectMap {
    pub file: std::sync::Arc<dyn file::BlockFile>,
    pub offset: u64,
    pub cipher: Option<std::sync::Arc<crypto::XtsCipher>>,
    /// A write to this mapping is complete only after [`Image::commit_writes`] for it
    /// (which runs blocking I/O: on a worker, never on the loop). Never set for a read.
    pub commit: bool,
}

/// Errors of the image layer. `errno()` maps each to the errno that tapdisk reports.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path}: {op}")]
    Io {
        path: String,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{path}: corrupt image: {what}")]
    Corrupt { path: String, what: String },
    #[error("{path}: unsupported: {what}")]
    Unsupported { path: String, what: String },
    #[error("request at sector {sector} (+{nsectors}) is outside the disk ({size} sectors)")]
    OutOfRange {
        sector: u64,
        nsectors: u64,
        size: u64,
    },
    #[error("buffer of {0} bytes is not a whole number of sectors")]
    Misaligned(usize),
    #[error("image is read-only")]
    ReadOnly,
    #[error("image is closed")]
    Closed,
    #[error("no space: {0}")]
    NoSpace(String),
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error(transparent)]
    Crypto(#[from] crypto::CryptoError),
}

impl ImageError {
    /// Build an [`ImageError::Io`] for `path`.
    pub fn io(path: impl AsRef<std::path::Path>, op: &'static str, source: io::Error) -> Self {
        ImageError::Io {
            path: path.as_ref().display().to_string(),
            op,
            source,
        }
    }

    /// The positive errno tapdisk and vhd-util report for this error.
    pub fn errno(&self) -> i32 {
        match self {
            ImageError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            ImageError::Corrupt { .. } => libc::EINVAL,
            ImageError::Unsupported { .. } => libc::EOPNOTSUPP,
            ImageError::OutOfRange { .. } => libc::EINVAL,
            ImageError::Misaligned(_) => libc::EINVAL,
            ImageError::ReadOnly => libc::EPERM,
            ImageError::Closed => libc::EBADF,
            ImageError::NoSpace(_) => libc::ENOSPC,
            ImageError::Invalid(_) => libc::EINVAL,
            ImageError::Crypto(e) => e.errno(),
        }
    }
}

/// The state check every image does first: a closed image fails with `Closed`; for a
/// mutation (`write`) a read-only one fails with `ReadOnly`.
pub fn check_usable(
    closed: &std::sync::atomic::AtomicBool,
    read_only: bool,
    write: bool,
) -> Result<(), ImageError> {
    if closed.load(std::sync::atomic::Ordering::Acquire) {
        Err(ImageError::Closed)
    } else if write && read_only {
        Err(ImageError::ReadOnly)
    } else {
        Ok(())
    }
}

/// Check that `buf_len` bytes at `sector` fit a disk of `size` sectors and are whole sectors.
pub fn check_range(sector: u64, buf_len: usize, size: u64) -> Result<u64, ImageError> {
    if !(buf_len as u64).is_multiple_of(SECTOR_SIZE) {
        return Err(ImageError::Misaligned(buf_len));
    }
    let nsectors = buf_len as u64 / SECTOR_SIZE;
    check_sectors(sector, nsectors, size)?;
    Ok(nsectors)
}

/// `fdatasync` of an image's file that fails for good once one has failed: after a writeback
/// error Linux may have dropped the dirty data and reports the error only once, so a later
/// success would not cover the writes before it ("fsyncgate"). `failed` is the image's flag;
/// only a reopen clears it.
pub(crate) fn sticky_sync(
    file: &dyn file::BlockFile,
    path: &std::path::Path,
    failed: &std::sync::atomic::AtomicBool,
) -> Result<(), ImageError> {
    use std::sync::atomic::Ordering;
    if failed.load(Ordering::Acquire) {
        return Err(ImageError::io(
            path,
            "fdatasync (an earlier one failed: durability unknown until reopened)",
            io::Error::from_raw_os_error(libc::EIO),
        ));
    }
    file.sync().map_err(|e| {
        failed.store(true, Ordering::Release);
        log::error!(
            "{}: fdatasync failed ({e}): every later flush fails until the image is reopened",
            path.display()
        );
        ImageError::io(path, "fdatasync", e)
    })
}

/// Check that `nsectors` at `sector` fit a disk of `size` sectors.
pub fn check_sectors(sector: u64, nsectors: u64, size: u64) -> Result<(), ImageError> {
    match sector.checked_add(nsectors) {
        Some(end) if end <= size => Ok(()),
        _ => Err(ImageError::OutOfRange {
            sector,
            nsectors,
            size,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_range_rejects_overflow_and_partial_sectors() {
        assert_eq!(check_range(0, 1024, 2).unwrap(), 2);
        assert!(matches!(
            check_range(1, 1024, 2),
            Err(ImageError::OutOfRange { .. })
        ));
        assert!(matches!(
            check_range(u64::MAX, 512, u64::MAX),
            Err(ImageError::OutOfRange { .. })
        ));
        assert!(matches!(
            check_range(0, 100, 2),
            Err(ImageError::Misaligned(100))
        ));
    }
}
