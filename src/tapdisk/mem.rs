//! An in-memory [`Image`]: the simulation backend for event-loop, pause/resume and NBD tests.

use std::sync::{Mutex, RwLock};

use crate::image::{check_range, check_sectors, Extent, Image, ImageError, ImageInfo, SECTOR_SIZE};

/// A RAM disk that tracks which sectors were ever written (for `block_status`).
#[derive(Debug)]
pub struct MemImage {
    info: ImageInfo,
    data: RwLock<Vec<u8>>,
    allocated: Mutex<Vec<bool>>,
    closed: Mutex<bool>,
}

impl MemImage {
    /// A zeroed, fully unallocated disk of `sectors` sectors (an empty disk when that many
    /// bytes cannot be addressed, e.g. 4 GiB or more on a 32-bit host).
    pub fn new(sectors: u64, read_only: bool) -> Self {
        let bytes = sectors
            .checked_mul(SECTOR_SIZE)
            .and_then(|b| usize::try_from(b).ok());
        let (sectors, bytes) = match bytes {
            Some(b) => (sectors, b),
            None => (0, 0),
        };
        // sectors <= bytes, so it fits usize too.
        let n = usize::try_from(sectors).unwrap_or(0);
        MemImage {
            info: ImageInfo {
                size_sectors: sectors,
                sector_size: 512,
                read_only,
            },
            data: RwLock::new(vec![0u8; bytes]),
            allocated: Mutex::new(vec![false; n]),
            closed: Mutex::new(false),
        }
    }

    /// Whether [`Image::close`] was called.
    pub fn is_closed(&self) -> bool {
        *self.closed.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check_open(&self) -> Result<(), ImageError> {
        if self.is_closed() {
            Err(ImageError::Closed)
        } else {
            Ok(())
        }
    }
}

fn range(sector: u64, n: u64) -> std::ops::Range<usize> {
    // Callers checked the range against the in-memory size, which fits usize.
    let s = (sector * SECTOR_SIZE) as usize;
    s..s + (n * SECTOR_SIZE) as usize
}

impl Image for MemImage {
    fn info(&self) -> ImageInfo {
        self.info
    }

    fn read(&self, sector: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        self.check_open()?;
        let n = check_range(sector, buf.len(), self.info.size_sectors)?;
        let d = self.data.read().unwrap_or_else(|e| e.into_inner());
        buf.copy_from_slice(&d[range(sector, n)]);
        Ok(())
    }

    fn write(&self, sector: u64, buf: &[u8]) -> Result<(), ImageError> {
        self.check_open()?;
        if self.info.read_only {
            return Err(ImageError::ReadOnly);
        }
        let n = check_range(sector, buf.len(), self.info.size_sectors)?;
        let mut d = self.data.write().unwrap_or_else(|e| e.into_inner());
        d[range(sector, n)].copy_from_slice(buf);
        let mut a = self.allocated.lock().unwrap_or_else(|e| e.into_inner());
        for s in sector..sector + n {
            a[s as usize] = true;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), ImageError> {
        self.check_open()
    }

    fn discard(&self, sector: u64, nsectors: u64) -> Result<(), ImageError> {
        self.check_open()?;
        if self.info.read_only {
            return Err(ImageError::ReadOnly);
        }
        check_sectors(sector, nsectors, self.info.size_sectors)?;
        let mut d = self.data.write().unwrap_or_else(|e| e.into_inner());
        d[range(sector, nsectors)].fill(0);
        let mut a = self.allocated.lock().unwrap_or_else(|e| e.into_inner());
        for s in sector..sector + nsectors {
            a[s as usize] = false;
        }
        Ok(())
    }

    fn block_status(&self, sector: u64, nsectors: u64) -> Result<Vec<Extent>, ImageError> {
        self.check_open()?;
        check_sectors(sector, nsectors, self.info.size_sectors)?;
        let a = self.allocated.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<Extent> = Vec::new();
        for s in sector..sector + nsectors {
            let alloc = a[s as usize];
            match out.last_mut() {
                Some(e) if e.allocated == alloc => e.nsectors += 1,
                _ => out.push(Extent {
                    sector: s,
                    nsectors: 1,
                    allocated: alloc,
                }),
            }
        }
        Ok(out)
    }

    fn close(&self) -> Result<(), ImageError> {
        *self.closed.lock().unwrap_or_else(|e| e.into_inner()) = true;
        Ok(())
    }

    /// A RAM disk is memory, so tapdisk serves it on its loop like an image on tmpfs.
    fn memory_backed(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_size_beyond_the_address_space_gives_an_empty_disk() {
        // u64::MAX / 256 sectors overflows the byte count on every host.
        let m = MemImage::new(u64::MAX / 256, false);
        assert_eq!(m.info().size_sectors, 0);
        assert!(m.read(0, &mut [0u8; 512]).is_err());
        let m = MemImage::new(8, false);
        assert_eq!(m.info().size_sectors, 8);
        let mut b = [1u8; 4096];
        m.read(0, &mut b).unwrap();
        assert_eq!(b, [0u8; 4096]);
    }
}
