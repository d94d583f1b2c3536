//! Raw images: a regular file or a block device whose bytes are the disk.
//!
//! Discard punches holes (`fallocate(PUNCH_HOLE | KEEP_SIZE)`; zeros are written where
//! the filesystem cannot punch). Flush is `fdatasync`. The size is the file size rounded
//! down to whole sectors.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use super::file::{BlockFile, OsFile};
use super::{
    check_range, check_sectors, check_usable, Extent, Image, ImageError, ImageFormat, ImageInfo,
    LayerInfo, SECTOR_SIZE,
};

/// A raw disk image.
#[derive(Debug)]
pub struct RawImage {
    path: PathBuf,
    file: Arc<dyn BlockFile>,
    info: ImageInfo,
    closed: AtomicBool,
}

impl RawImage {
    /// Open a raw file or block device.
    pub fn open(path: &Path, read_only: bool) -> Result<RawImage, ImageError> {
        let f = OsFile::open(path, !read_only).map_err(|e| ImageError::io(path, "open", e))?;
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
        })
    }

    /// The path the image was opened with.
    pub fn path(&self) -> &Path {
        &self.path
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
        self.file
            .sync()
            .map_err(|e| ImageError::io(&self.path, "fdatasync", e))
    }

    fn discard(&self, sector: u64, nsectors: u64) -> Result<(), ImageError> {
        self.writable()?;
        check_sectors(sector, nsectors, self.info.size_sectors)?;
        self.file
            .punch_hole(sector * SECTOR_SIZE, nsectors * SECTOR_SIZE)
            .map_err(|e| ImageError::io(&self.path, "punch hole", e))
    }

    fn block_status(&self, sector: u64, nsectors: u64) -> Result<Vec<Extent>, ImageError> {
        self.live()?;
        check_sectors(sector, nsectors, self.info.size_sectors)?;
        Ok(vec![Extent {
            sector,
            nsectors,
            allocated: true,
        }])
    }

    fn close(&self) -> Result<(), ImageError> {
        if self.closed.swap(true, Ordering::AcqRel) || self.info.read_only {
            return Ok(());
        }
        self.file
            .sync()
            .map_err(|e| ImageError::io(&self.path, "fdatasync", e))
    }

    fn layers(&self) -> Vec<LayerInfo> {
        vec![LayerInfo {
            path: self.path.clone(),
            format: ImageFormat::Raw,
        }]
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

    #[test]
    fn raw_read_only_refuses_writes() {
        let f = Arc::new(MemFile::from_bytes(vec![0u8; 1024]));
        let img = RawImage::from_file(Path::new("m"), f, true).unwrap();
        assert!(matches!(img.write(0, &[0; 512]), Err(ImageError::ReadOnly)));
        assert!(matches!(img.discard(0, 1), Err(ImageError::ReadOnly)));
    }
}
