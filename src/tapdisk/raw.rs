//! A minimal raw-file [`Image`] ("aio:" disks).
//!
//! TEMPORARY: to be replaced by `crate::image::raw` from the image engine when it lands on
//! main. Buffered I/O (no O_DIRECT), pread/pwrite at byte offsets, discard by hole punching,
//! allocation from SEEK_DATA/SEEK_HOLE.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use nix::fcntl::{fallocate, FallocateFlags};
use nix::unistd::{lseek, Whence};

use crate::image::{check_range, check_sectors, Extent, Image, ImageError, ImageInfo, SECTOR_SIZE};

#[derive(Debug)]
pub struct RawImage {
    path: PathBuf,
    file: File,
    info: ImageInfo,
    closed: AtomicBool,
}

impl RawImage {
    pub fn open(path: &Path, read_only: bool) -> Result<Self, ImageError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|e| ImageError::io(path, "open", e))?;
        let len = file
            .metadata()
            .map_err(|e| ImageError::io(path, "stat", e))?
            .len();
        Ok(RawImage {
            path: path.to_path_buf(),
            file,
            info: ImageInfo {
                size_sectors: len / SECTOR_SIZE,
                sector_size: 512,
                read_only,
            },
            closed: AtomicBool::new(false),
        })
    }

    fn open_check(&self) -> Result<(), ImageError> {
        // Acquire pairs with the Release in close(): I/O after close fails.
        if self.closed.load(Ordering::Acquire) {
            Err(ImageError::Closed)
        } else {
            Ok(())
        }
    }

    fn io_err(&self, op: &'static str, e: std::io::Error) -> ImageError {
        ImageError::io(&self.path, op, e)
    }
}

fn off(v: u64) -> Result<i64, ImageError> {
    i64::try_from(v).map_err(|_| ImageError::Invalid("offset too large".into()))
}

impl Image for RawImage {
    fn info(&self) -> ImageInfo {
        self.info
    }

    fn read(&self, sector: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        self.open_check()?;
        check_range(sector, buf.len(), self.info.size_sectors)?;
        self.file
            .read_exact_at(buf, sector * SECTOR_SIZE)
            .map_err(|e| self.io_err("read", e))
    }

    fn write(&self, sector: u64, buf: &[u8]) -> Result<(), ImageError> {
        self.open_check()?;
        if self.info.read_only {
            return Err(ImageError::ReadOnly);
        }
        check_range(sector, buf.len(), self.info.size_sectors)?;
        self.file
            .write_all_at(buf, sector * SECTOR_SIZE)
            .map_err(|e| self.io_err("write", e))
    }

    fn flush(&self) -> Result<(), ImageError> {
        self.open_check()?;
        if self.info.read_only {
            return Ok(());
        }
        self.file
            .sync_data()
            .map_err(|e| self.io_err("fdatasync", e))
    }

    fn discard(&self, sector: u64, nsectors: u64) -> Result<(), ImageError> {
        self.open_check()?;
        if self.info.read_only {
            return Err(ImageError::ReadOnly);
        }
        check_sectors(sector, nsectors, self.info.size_sectors)?;
        let flags = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        match fallocate(
            &self.file,
            flags,
            off(sector * SECTOR_SIZE)?,
            off(nsectors * SECTOR_SIZE)?,
        ) {
            Ok(()) => Ok(()),
            Err(e) => Err(self.io_err("punch hole", e.into())),
        }
    }

    fn block_status(&self, sector: u64, nsectors: u64) -> Result<Vec<Extent>, ImageError> {
        self.open_check()?;
        check_sectors(sector, nsectors, self.info.size_sectors)?;
        let end = (sector + nsectors) * SECTOR_SIZE;
        let mut pos = sector * SECTOR_SIZE;
        let mut out = Vec::new();
        let all = |out: &mut Vec<Extent>| {
            out.clear();
            out.push(Extent {
                sector,
                nsectors,
                allocated: true,
            });
        };
        while pos < end {
            // Next data at or after pos (ENXIO: none until EOF).
            let data = match lseek(&self.file, off(pos)?, Whence::SeekData) {
                Ok(d) => (d as u64).min(end),
                Err(nix::errno::Errno::ENXIO) => end,
                Err(_) => {
                    all(&mut out);
                    return Ok(out);
                }
            };
            if data > pos {
                push(&mut out, pos, data, false);
            }
            if data >= end {
                break;
            }
            let hole = match lseek(&self.file, off(data)?, Whence::SeekHole) {
                Ok(h) => (h as u64).min(end),
                Err(_) => end,
            };
            push(&mut out, data, hole.max(data + 1), true);
            pos = hole.max(data + 1);
        }
        Ok(out)
    }

    fn close(&self) -> Result<(), ImageError> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        if !self.info.read_only {
            self.file
                .sync_data()
                .map_err(|e| self.io_err("fdatasync", e))?;
        }
        Ok(())
    }
}

/// Append byte range [a, b) as sector extents (data wins partial sectors), merging neighbours.
fn push(out: &mut Vec<Extent>, a: u64, b: u64, allocated: bool) {
    let (mut s, mut e) = (a / SECTOR_SIZE, b.div_ceil(SECTOR_SIZE));
    if !allocated {
        s = a.div_ceil(SECTOR_SIZE);
        e = b / SECTOR_SIZE;
    }
    if let Some(last) = out.last() {
        s = s.max(last.sector + last.nsectors);
    }
    if e <= s {
        return;
    }
    match out.last_mut() {
        Some(l) if l.allocated == allocated && l.sector + l.nsectors == s => l.nsectors += e - s,
        _ => out.push(Extent {
            sector: s,
            nsectors: e - s,
            allocated,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_read_write_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.raw");
        let f = File::create(&p).unwrap();
        f.set_len(4 << 20).unwrap();
        let img = RawImage::open(&p, false).unwrap();
        assert_eq!(img.info().size_sectors, 8192);
        img.write(2048, &[0xab; 65536]).unwrap();
        let mut b = vec![0u8; 512];
        img.read(2048 + 127, &mut b).unwrap();
        assert!(b.iter().all(|x| *x == 0xab));
        let ext = img.block_status(0, 8192).unwrap();
        let total: u64 = ext.iter().map(|e| e.nsectors).sum();
        assert_eq!(total, 8192);
        assert!(ext
            .iter()
            .any(|e| e.allocated && e.sector <= 2048 && e.sector + e.nsectors >= 2176));
        assert!(!ext[0].allocated);
        img.close().unwrap();
        assert!(matches!(img.read(0, &mut b), Err(ImageError::Closed)));
        let ro = RawImage::open(&p, true).unwrap();
        assert!(matches!(ro.write(0, &b), Err(ImageError::ReadOnly)));
    }
}
