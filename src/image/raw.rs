//! Raw images: a regular file or a block device whose bytes are the disk.
//!
//! Discard punches holes (`fallocate(PUNCH_HOLE | KEEP_SIZE)`; zeros are written where
//! the filesystem cannot punch). Flush is `fdatasync`. The size is the file size rounded
//! down to whole sectors.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::file::{BlockFile, OsFile, SysOpener};
use super::{
    check_range, check_sectors, check_usable, DirectMap, Extent, Image, ImageError, ImageFormat,
    ImageInfo, LayerInfo, SECTOR_SIZE,
};

/// A raw disk image.
#[derive(Debug)]
pub struct RawImage {
    path: PathBuf,
    file: Arc<dyn BlockFile>,
    info: ImageInfo,
    closed: AtomicBool,
    data_run: Mutex<DataRun>,
    /// An `fdatasync` failed: every later one fails until reopened (see [`RawImage::sync`]).
    sync_failed: AtomicBool,
}

/// The last data run `block_status` found, so that the next calls inside it need no `lseek`.
/// `SEEK_HOLE` walks every page up to the hole on tmpfs (milliseconds per call on a fully
/// written image), and clients ask for allocation in windows. Only discard turns data into
/// holes: it bumps `generation`, and a run found across a discard is not kept. Writes only
/// turn holes into data, so a kept run can err only towards "allocated", which is always
/// a correct NBD answer.
#[derive(Debug, Default)]
struct DataRun {
    /// Sectors `[start, end)` were all data.
    start: u64,
    end: u64,
    generation: u64,
}

impl RawImage {
    /// Open a raw file or block device (buffered I/O).
    pub fn open(path: &Path, read_only: bool) -> Result<RawImage, ImageError> {
        RawImage::open_with(path, read_only, false)
    }

    /// Open a raw file or block device, with `O_DIRECT` where possible when `direct`
    /// ([`OsFile::open_with`]).
    pub fn open_with(path: &Path, read_only: bool, direct: bool) -> Result<RawImage, ImageError> {
        let f = OsFile::open_with(path, !read_only, direct, &SysOpener)
            .map_err(|e| ImageError::io(path, "open", e))?;
        RawImage::from_file(path, Arc::new(f), read_only)
    }

    /// Wrap an already open file.
    pub fn from_file(
        path: &Path,
        file: Arc<dyn BlockFile>,
        read_only: bool,
    ) -> Result<RawImage, ImageError> {
        let len = file.len().map_err(|e| ImageError::io(path, "stat", e))?;
        Ok(RawImage {
            path: path.to_path_buf(),
            file,
            info: ImageInfo {
                size_sectors: len / SECTOR_SIZE,
                sector_size: SECTOR_SIZE as u32,
                read_only,
            },
            closed: AtomicBool::new(false),
            sync_failed: AtomicBool::new(false),
            data_run: Mutex::new(DataRun::default()),
        })
    }

    /// `fdatasync`, failing for good once one has failed: a later success would not
    /// cover the writes a writeback error dropped (as `VhdImage`'s sync, "fsyncgate").
    fn sync(&self) -> Result<(), ImageError> {
        super::sticky_sync(self.file.as_ref(), &self.path, &self.sync_failed)
    }

    /// The path the image was opened with.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn run(&self) -> std::sync::MutexGuard<'_, DataRun> {
        self.data_run.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keep `[start, end)` as the known data run unless a discard happened meanwhile.
    fn remember(&self, start: u64, end: u64, generation: u64) {
        let mut run = self.run();
        if run.generation == generation {
            (run.start, run.end) = (start, end);
        }
    }

    fn live(&self) -> Result<(), ImageError> {
        check_usable(&self.closed, self.info.read_only, false)
    }

    fn writable(&self) -> Result<(), ImageError> {
        check_usable(&self.closed, self.info.read_only, true)
    }
}

impl Image for RawImage {
    fn info(&self) -> ImageInfo {
        self.info
    }

    fn read(&self, sector: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        self.live()?;
        check_range(sector, buf.len(), self.info.size_sectors)?;
        self.file
            .read_at(buf, sector * SECTOR_SIZE)
            .map_err(|e| ImageError::io(&self.path, "read", e))
    }

    fn write(&self, sector: u64, buf: &[u8]) -> Result<(), ImageError> {
        self.writable()?;
        check_range(sector, buf.len(), self.info.size_sectors)?;
        self.file
            .write_at(buf, sector * SECTOR_SIZE)
            .map_err(|e| ImageError::io(&self.path, "write", e))
    }

    fn flush(&self) -> Result<(), ImageError> {
        self.live()?;
        if self.info.read_only {
            return Ok(());
        }
        self.sync()
    }

    fn memory_backed(&self) -> bool {
        self.file.memory_backed()
    }

    fn direct_map(&self, sector: u64, nsectors: u64, write: bool) -> Option<DirectMap> {
        if self.closed.load(Ordering::Acquire) || (write && self.info.read_only) {
            return None;
        }
        check_sectors(sector, nsectors, self.info.size_sectors).ok()?;
        self.file.aio_fd()?;
        Some(DirectMap {
            file: Arc::clone(&self.file),
            offset: sector * SECTOR_SIZE,
            cipher: None,
            commit: false,
        })
    }

    fn discard(&self, sector: u64, nsectors: u64) -> Result<(), ImageError> {
        self.writable()?;
        check_sectors(sector, nsectors, self.info.size_sectors)?;
        {
            let mut run = self.run();
            run.generation += 1;
            (run.start, run.end) = (0, 0);
        }
        self.file
            .punch_hole(sector * SECTOR_SIZE, nsectors * SECTOR_SIZE)
            .map_err(|e| ImageError::io(&self.path, "punch hole", e))
    }

    fn block_status(&self, sector: u64, nsectors: u64) -> Result<Vec<Extent>, ImageError> {
        self.live()?;
        check_sectors(sector, nsectors, self.info.size_sectors)?;
        let mut out = Vec::new();
        let end = sector + nsectors;
        let mut cur = sector;
        let generation = {
            let run = self.run();
            if (run.start..run.end).contains(&cur) {
                push_extent(&mut out, cur, run.end.min(end), true);
                cur = run.end.min(end);
            }
            run.generation
        };
        let seek = |pos: u64, data: bool| {
            self.file
                .seek_extent(pos * SECTOR_SIZE, data)
                .map_err(|e| ImageError::io(&self.path, "seek data/hole", e))
        };
        while cur < end {
            // A data run starts at the sector holding its first byte (rounded down) ...
            let data = match seek(cur, true)? {
                Some(off) => (off / SECTOR_SIZE).clamp(cur, end),
                None => cur,
            };
            push_extent(&mut out, cur, data, false);
            if data >= end {
                break;
            }
            // ... and ends after the sector holding its last byte (rounded up).
            let hole = match seek(data, false)? {
                Some(off) => {
                    let hole = off.div_ceil(SECTOR_SIZE).max(data + 1);
                    self.remember(data, hole, generation);
                    hole.min(end)
                }
                None => end,
            };
            push_extent(&mut out, data, hole, true);
            cur = hole;
        }
        Ok(out)
    }

    fn close(&self) -> Result<(), ImageError> {
        if self.closed.swap(true, Ordering::AcqRel) || self.info.read_only {
            return Ok(());
        }
        self.sync()
    }

    fn layers(&self) -> Vec<LayerInfo> {
        vec![LayerInfo {
            path: self.path.clone(),
            format: ImageFormat::Raw,
        }]
    }
}

/// Append sectors `[from, to)` to `out`, merging with a last extent of the same status.
fn push_extent(out: &mut Vec<Extent>, from: u64, to: u64, allocated: bool) {
    if to <= from {
        return;
    }
    match out.last_mut() {
        Some(e) if e.allocated == allocated && e.sector + e.nsectors == from => {
            e.nsectors += to - from
        }
        _ => out.push(Extent {
            sector: from,
            nsectors: to - from,
            allocated,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::file::MemFile;

    #[test]
    fn raw_read_write_discard_and_close() {
        let f = Arc::new(MemFile::from_bytes(vec![1u8; 4096]));
        let img = RawImage::from_file(Path::new("m"), f.clone(), false).unwrap();
        assert_eq!(img.info().size_sectors, 8);
        img.write(1, &[9u8; 512]).unwrap();
        let mut b = vec![0u8; 1024];
        img.read(0, &mut b).unwrap();
        assert!(b[..512].iter().all(|&x| x == 1));
        assert!(b[512..].iter().all(|&x| x == 9));
        img.discard(1, 1).unwrap();
        img.read(1, &mut b[..512]).unwrap();
        assert!(b[..512].iter().all(|&x| x == 0));
        assert!(matches!(
            img.read(8, &mut b[..512]),
            Err(ImageError::OutOfRange { .. })
        ));
        img.close().unwrap();
        assert_eq!(f.pending_ops(), 0);
        assert!(matches!(img.read(0, &mut b), Err(ImageError::Closed)));
    }

    /// The filesystem type of `dir` as coreutils' `stat -f` names it.
    fn fs_type(dir: &Path) -> String {
        let out = std::process::Command::new("stat")
            .args(["-f", "-c", "%T"])
            .arg(dir)
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    #[test]
    fn memory_backed_means_the_file_is_on_tmpfs() {
        let dirs = [
            std::path::PathBuf::from("/dev/shm"),
            std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/target")),
        ];
        for dir in dirs.iter().filter(|d| d.is_dir()) {
            let d = tempfile::tempdir_in(dir).unwrap();
            let p = d.path().join("m.raw");
            std::fs::write(&p, [0u8; 4096]).unwrap();
            let img = RawImage::open(&p, false).unwrap();
            let tmpfs = ["tmpfs", "ramfs"].contains(&fs_type(dir).as_str());
            assert_eq!(img.memory_backed(), tmpfs, "{}", dir.display());
        }
        let f = Arc::new(MemFile::from_bytes(vec![0u8; 1024]));
        assert!(!RawImage::from_file(Path::new("m"), f, false)
            .unwrap()
            .memory_backed());
    }

    /// Allocation asked for in windows (as NBD clients do) after a first look that found
    /// one long data run, then again after a discard punched a hole into that run.
    #[test]
    fn raw_block_status_in_windows_sees_holes_punched_later() {
        let dir = ["/dev/shm", concat!(env!("CARGO_MANIFEST_DIR"), "/target")]
            .into_iter()
            .find(|d| Path::new(d).is_dir())
            .unwrap();
        let d = tempfile::tempdir_in(dir).unwrap();
        let p = d.path().join("w.raw");
        std::fs::write(&p, vec![0x5a; 8 << 20]).unwrap();
        let img = RawImage::open(&p, false).unwrap();
        let windows = |img: &RawImage| -> Vec<Extent> {
            let mut all: Vec<Extent> = Vec::new();
            for w in 0..16u64 {
                for e in img.block_status(w * 1024, 1024).unwrap() {
                    push_extent(&mut all, e.sector, e.sector + e.nsectors, e.allocated);
                }
            }
            all
        };
        let full = vec![Extent {
            sector: 0,
            nsectors: 16384,
            allocated: true,
        }];
        assert_eq!(windows(&img), full);
        img.discard(4096, 2048).unwrap();
        let after = windows(&img);
        // What a freshly opened image (nothing remembered) reports is the truth.
        let fresh = RawImage::open(&p, true).unwrap();
        assert_eq!(after, fresh.block_status(0, 16384).unwrap());
        let first_hole = fresh.block_status(0, 16384).unwrap()[0].nsectors;
        if first_hole < 16384 {
            // The filesystem punched and reports holes: the hole shows in the windows.
            assert_eq!(after.len(), 3, "{after:?}");
            assert!(!after[1].allocated);
            assert!(after[1].sector >= 4096 && after[1].sector + after[1].nsectors <= 6144);
        }
        // Writing into the hole makes it data again.
        img.write(4096, &vec![1u8; 2048 * 512]).unwrap();
        assert_eq!(windows(&img), full);
    }

    #[test]
    fn raw_read_only_refuses_writes() {
        let f = Arc::new(MemFile::from_bytes(vec![0u8; 1024]));
        let img = RawImage::from_file(Path::new("m"), f, true).unwrap();
        assert!(matches!(img.write(0, &[0; 512]), Err(ImageError::ReadOnly)));
        assert!(matches!(img.discard(0, 1), Err(ImageError::ReadOnly)));
    }

    #[test]
    fn raw_block_status_reports_holes_of_sparse_files() {
        use std::os::unix::fs::FileExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sparse.raw");
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(16 << 20).unwrap();
        f.write_all_at(&[0xaa; 4096], 0).unwrap();
        f.write_all_at(&[0xbb; 4096], 8 << 20).unwrap();
        f.sync_all().unwrap();
        let img = RawImage::open(&p, true).unwrap();
        let all = img.block_status(0, 32768).unwrap();
        // Extents cover the range exactly, in order.
        let mut next = 0;
        for e in &all {
            assert_eq!(e.sector, next, "{all:?}");
            assert!(e.nsectors > 0);
            next += e.nsectors;
        }
        assert_eq!(next, 32768);
        // What the filesystem itself says about the first hole.
        let first_hole = nix::unistd::lseek64(&f, 0, nix::unistd::Whence::SeekHole).unwrap();
        if first_hole >= 16 << 20 {
            // No hole reporting here (everything reads as data): one allocated extent.
            assert_eq!(all.len(), 1, "{all:?}");
            assert!(all[0].allocated);
            return;
        }
        let kinds: Vec<bool> = all.iter().map(|e| e.allocated).collect();
        assert_eq!(kinds, [true, false, true, false], "{all:?}");
        assert_eq!(all[0].nsectors * SECTOR_SIZE, first_hole as u64);
        // The second data run holds the write at 8 MiB.
        let second = all[2];
        assert!(second.sector <= 16384 && second.sector + second.nsectors >= 16392);
        // A range inside the first hole is one hole; one straddling 8 MiB is hole + data.
        assert_eq!(
            img.block_status(4096, 8192).unwrap(),
            vec![Extent {
                sector: 4096,
                nsectors: 8192,
                allocated: false
            }]
        );
        let st = img.block_status(16376, 16).unwrap();
        assert_eq!(st.len(), 2, "{st:?}");
        assert!(!st[0].allocated && st[1].allocated);
        assert_eq!(st[1].sector + st[1].nsectors, 16392);
        // Out of range is still refused.
        assert!(matches!(
            img.block_status(32760, 16),
            Err(ImageError::OutOfRange { .. })
        ));
    }

    #[test]
    fn raw_block_status_without_hole_support_is_all_allocated() {
        // The simulation cannot tell holes: everything is data.
        let f = Arc::new(MemFile::from_bytes(vec![0u8; 8192]));
        let img = RawImage::from_file(Path::new("m"), f, true).unwrap();
        assert_eq!(
            img.block_status(2, 10).unwrap(),
            vec![Extent {
                sector: 2,
                nsectors: 10,
                allocated: true
            }]
        );
    }
}
