//! Fault injection for tests (compiled only with `cfg(test)` or the feature `sim`, never
//! into a release build: `scripts/check-release-no-sim.sh` checks it).
//!
//! [`FaultFile`] wraps the [`BlockFile`] under an image and fails chosen calls, as chosen
//! by the [`Injector`] the test holds: EIO, ENOSPC or a short write/read at one [`Point`]
//! (data, bitmap, BAT, footer, batmap or header writes, any read, fdatasync). It is a seam
//! in the file layer, not `LD_PRELOAD`: the engine above runs unchanged and sees the
//! error where a real disk would give it.
//!
//! # Where a write falls
//!
//! A write is classified by the VHD region its offset falls in, learnt from the file when
//! it is wrapped (footer, dynamic header, BAT, batmap header and map) and kept current by
//! watching the BAT writes that pass through (a block's first `bitmap_sectors` sectors are
//! its bitmap, the rest its data). The engine is not asked to label its writes: the
//! classification cannot drift from what the engine believes, because it is made from
//! the bytes on disk. A 512-byte write at offset 0 or starting with the footer cookie is
//! the footer; writes into space no BAT entry owns yet (zeroing a new reserve, gaps) are
//! [`Point::Other`]. A file without a VHD footer (raw) is all [`Point::Data`].
//!
//! # What a fault does
//!
//! - [`Fault::Eio`], [`Fault::Enospc`], [`Fault::Eagain`]: the call fails with that errno;
//!   nothing lands.
//! - [`Fault::Short`]: half of the buffer (rounded down to whole sectors when it is at
//!   least two) lands, then the call fails as `write_all` does when `pwrite` stops making
//!   progress (`ErrorKind::WriteZero`, reported as EIO). A short read fills a prefix and
//!   fails with `UnexpectedEof`.
//! - A failed `sync` does not call the inner file's `sync`: like Linux after a writeback
//!   error, the failure is reported once and a later `fdatasync` of the file would
//!   succeed without the lost writes having reached the disk (the fsyncgate lesson), which
//!   is exactly what the image layer must not be fooled by.
//!
//! # Linux AIO
//!
//! tapdisk submits reads and writes of mapped ranges with Linux AIO on the wrapped file's
//! own descriptor ([`BlockFile::aio_fd`]), which bypasses `write_at`. Its completion path
//! asks [`BlockFile::inject_aio`] about every completion: the real kernel result is
//! replaced by `-EIO`, `-ENOSPC` or a short count (half, whole sectors), so the engine's
//! own handling of failed and short completions (error reply; resubmit the rest) runs.
//!
//! Before that, every asynchronous submission (the first, and the resubmission of a short
//! transfer's rest) asks [`BlockFile::inject_aio_submit`]: a fault armed at
//! [`Point::Submit`] makes the kernel refuse the submission with that errno
//! ([`Fault::Eagain`]: EAGAIN, as `io_submit` and `io_uring_enter` answer when the kernel is
//! short of resources; [`Fault::Short`] also gives EAGAIN, what tapdisk reports when
//! `io_submit` took none of its one request), so the engine's handling of refusals runs.

use std::collections::BTreeMap;
use std::fmt;
use std::io;
use std::os::fd::BorrowedFd;
use std::sync::{Arc, Mutex};

use super::file::{BlockFile, DioAlign};
use super::vhd::format::{
    bat_bytes_padded, decode_bat, BatmapHeader, DiskType, DynHeader, Footer, BATMAP_COOKIE,
    BATMAP_HEADER_SIZE, BAT_UNUSED, FOOTER_COOKIE, FOOTER_SIZE, HEADER_SIZE,
};
use super::SECTOR_SIZE;

/// Where an I/O call falls.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Point {
    /// Guest data (inside an allocated block's data area, or anywhere in a raw file).
    Data,
    /// A block's sector bitmap.
    Bitmap,
    /// The block allocation table.
    Bat,
    /// The footer (at offset 0 or at the end).
    Footer,
    /// The batmap header or map.
    Batmap,
    /// The dynamic header.
    Header,
    /// Any other write (zeroing a new reserve, alignment gaps).
    Other,
    /// Any read.
    Read,
    /// `fdatasync`.
    Sync,
    /// An asynchronous submission (`io_submit`, `io_uring_enter`) of a read or write: a
    /// fault here is the kernel refusing to take the request, not an I/O error.
    Submit,
}

impl Point {
    /// Every point, in report order.
    pub const ALL: [Point; 10] = [
        Point::Data,
        Point::Bitmap,
        Point::Bat,
        Point::Footer,
        Point::Batmap,
        Point::Header,
        Point::Other,
        Point::Read,
        Point::Sync,
        Point::Submit,
    ];

    /// Lower-case name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Point::Data => "data",
            Point::Bitmap => "bitmap",
            Point::Bat => "bat",
            Point::Footer => "footer",
            Point::Batmap => "batmap",
            Point::Header => "header",
            Point::Other => "other",
            Point::Read => "read",
            Point::Sync => "fdatasync",
            Point::Submit => "submit",
        }
    }
}

/// What an injected fault does (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Fault {
    Eio,
    Enospc,
    Short,
    /// EAGAIN: the kernel short of resources (meant for [`Point::Submit`]).
    Eagain,
}

impl Fault {
    /// Lower-case name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Fault::Eio => "EIO",
            Fault::Enospc => "ENOSPC",
            Fault::Short => "short",
            Fault::Eagain => "EAGAIN",
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Rule {
    point: Point,
    fault: Fault,
    /// Matching calls to let through first.
    skip: u64,
    /// Faults left to inject (`None`: until cleared).
    left: Option<u64>,
}

#[derive(Debug, Default)]
struct InjState {
    rules: Vec<Rule>,
    /// Calls seen per point (faulted or not).
    seen: BTreeMap<Point, u64>,
    /// Faults injected per point and kind.
    injected: BTreeMap<(Point, Fault), u64>,
    /// AIO completions seen.
    aio: u64,
}

/// A test's view of the I/O of a [`FaultFile`] (see [`Injector::watch`]).
type Watcher = Arc<dyn Fn(Access) + Send + Sync>;

/// The test's handle on the faults of one or more [`FaultFile`]s.
#[derive(Default)]
pub struct Injector {
    st: Mutex<InjState>,
    watcher: Mutex<Option<Watcher>>,
}

impl fmt::Debug for Injector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Injector")
            .field("st", &self.st)
            .finish_non_exhaustive()
    }
}

impl Injector {
    /// No faults armed.
    pub fn new() -> Arc<Injector> {
        Arc::new(Injector::default())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, InjState> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Show every positional read and write and every `fdatasync` of the files (not the
    /// asynchronous reads and writes, which go to the kernel on [`BlockFile::aio_fd`]) to
    /// `watcher` before anything else happens to it: tests record I/O with it, or hold a
    /// call (a slow disk) by blocking in it.
    pub fn watch(&self, watcher: impl Fn(Access) + Send + Sync + 'static) {
        *self.watcher.lock().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(watcher));
    }

    fn show(&self, a: Access) {
        let w = self
            .watcher
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(w) = w {
            w(a);
        }
    }

    /// Fail every call at `point` with `fault` until [`Injector::clear`].
    pub fn arm(&self, point: Point, fault: Fault) {
        self.arm_n(point, fault, 0, None);
    }

    /// Let `skip` calls at `point` through, then fail `times` of them (`None`: all, until
    /// cleared).
    pub fn arm_n(&self, point: Point, fault: Fault, skip: u64, times: Option<u64>) {
        self.lock().rules.push(Rule {
            point,
            fault,
            skip,
            left: times,
        });
    }

    /// Disarm every rule (counters are kept).
    pub fn clear(&self) {
        self.lock().rules.clear();
    }

    /// Faults injected at `point` (all kinds).
    pub fn injected(&self, point: Point) -> u64 {
        self.lock()
            .injected
            .iter()
            .filter(|((p, _), _)| *p == point)
            .map(|(_, n)| n)
            .sum()
    }

    /// Calls seen at `point`, faulted or not.
    pub fn seen(&self, point: Point) -> u64 {
        self.lock().seen.get(&point).copied().unwrap_or(0)
    }

    /// Linux AIO completions seen (faulted or not).
    pub fn aio_seen(&self) -> u64 {
        self.lock().aio
    }

    /// Every (point, kind, count) injected so far.
    pub fn counts(&self) -> Vec<(Point, Fault, u64)> {
        self.lock()
            .injected
            .iter()
            .map(|(&(p, f), &n)| (p, f, n))
            .collect()
    }

    /// One line for reports: `faults-injected data/EIO=2 bat/short=1 ...`.
    pub fn summary(&self) -> String {
        let mut s = String::from("faults-injected");
        for (p, f, n) in self.counts() {
            s.push_str(&format!(" {}/{}={n}", p.name(), f.name()));
        }
        s
    }

    /// Count a call at `point`; the fault to inject, if a rule fires.
    pub fn hit(&self, point: Point) -> Option<Fault> {
        let mut st = self.lock();
        *st.seen.entry(point).or_default() += 1;
        let mut fired = None;
        for r in st.rules.iter_mut().filter(|r| r.point == point) {
            if r.left == Some(0) {
                continue;
            }
            if r.skip > 0 {
                r.skip -= 1;
                continue;
            }
            if let Some(n) = r.left.as_mut() {
                *n -= 1;
            }
            fired = Some(r.fault);
            break;
        }
        if let Some(f) = fired {
            *st.injected.entry((point, f)).or_default() += 1;
        }
        fired
    }
}

/// The VHD regions of a file, as far as known (see the module doc).
#[derive(Debug, Default)]
struct Layout {
    vhd: bool,
    header: Option<(u64, u64)>,
    /// BAT: offset, bytes (padded).
    bat: Option<(u64, u64)>,
    batmap: Option<(u64, u64)>,
    bm_bytes: u64,
    data_bytes: u64,
    /// The BAT as on disk.
    entries: Vec<u32>,
    /// Allocated block start (bytes) -> block number.
    blocks: BTreeMap<u64, u32>,
}

fn within(r: Option<(u64, u64)>, off: u64) -> bool {
    r.is_some_and(|(s, n)| off >= s && off < s + n)
}

impl Layout {
    fn learn(file: &dyn BlockFile) -> io::Result<Layout> {
        let mut l = Layout::default();
        let len = file.len()?;
        let mut fb = [0u8; FOOTER_SIZE];
        let mut footer = None;
        for off in [len.checked_sub(FOOTER_SIZE as u64), Some(0)]
            .into_iter()
            .flatten()
        {
            if file.read_at(&mut fb, off).is_ok() && fb[..8] == FOOTER_COOKIE {
                footer = Some(Footer::decode(&fb));
                break;
            }
        }
        let Some(f) = footer else {
            return Ok(l);
        };
        l.vhd = true;
        if !matches!(
            f.kind(),
            Some(DiskType::Dynamic) | Some(DiskType::Differencing)
        ) {
            return Ok(l);
        }
        let mut hb = [0u8; HEADER_SIZE];
        file.read_at(&mut hb, f.data_offset)?;
        let h = DynHeader::decode(&hb);
        l.header = Some((f.data_offset, HEADER_SIZE as u64));
        let padded = bat_bytes_padded(h.max_bat_size);
        l.bat = Some((h.table_offset, padded));
        l.bm_bytes = u64::from(h.bitmap_sectors()) * SECTOR_SIZE;
        l.data_bytes = u64::from(h.spb()) * SECTOR_SIZE;
        let mut raw = vec![0u8; h.max_bat_size as usize * 4];
        file.read_at(&mut raw, h.table_offset)?;
        l.entries = decode_bat(&raw);
        for (i, &e) in l.entries.iter().enumerate() {
            if e != BAT_UNUSED {
                l.blocks.insert(u64::from(e) * SECTOR_SIZE, i as u32);
            }
        }
        let hdr_off = h.table_offset + padded;
        let mut bb = [0u8; BATMAP_HEADER_SIZE];
        if file.read_at(&mut bb, hdr_off).is_ok() && bb[..8] == BATMAP_COOKIE {
            let b = BatmapHeader::decode(&bb);
            let end = b.batmap_offset + u64::from(b.batmap_size) * SECTOR_SIZE;
            l.batmap = Some((hdr_off, end.saturating_sub(hdr_off)));
        }
        Ok(l)
    }

    fn classify(&self, off: u64, buf_start: &[u8]) -> Point {
        if !self.vhd {
            return Point::Data;
        }
        if within(self.header, off) {
            return Point::Header;
        }
        if within(self.bat, off) {
            return Point::Bat;
        }
        if within(self.batmap, off) {
            return Point::Batmap;
        }
        if off == 0 || (buf_start.len() == FOOTER_SIZE && buf_start[..8] == FOOTER_COOKIE) {
            return Point::Footer;
        }
        if self.bat.is_none() {
            // Fixed disk: everything before the footer is data.
            return Point::Data;
        }
        if let Some((&start, _)) = self.blocks.range(..=off).next_back() {
            if off < start + self.bm_bytes {
                return Point::Bitmap;
            }
            if off < start + self.bm_bytes + self.data_bytes {
                return Point::Data;
            }
        }
        Point::Other
    }

    /// Follow BAT bytes that landed at `off`.
    fn landed(&mut self, off: u64, bytes: &[u8]) {
        let Some((bat_off, _)) = self.bat else {
            return;
        };
        if !within(self.bat, off) || !(off - bat_off).is_multiple_of(4) {
            return;
        }
        let first = ((off - bat_off) / 4) as usize;
        for (k, e) in decode_bat(&bytes[..bytes.len() / 4 * 4])
            .into_iter()
            .enumerate()
        {
            let Some(slot) = self.entries.get_mut(first + k) else {
                break;
            };
            if *slot != BAT_UNUSED {
                self.blocks.remove(&(u64::from(*slot) * SECTOR_SIZE));
            }
            *slot = e;
            if e != BAT_UNUSED {
                self.blocks
                    .insert(u64::from(e) * SECTOR_SIZE, (first + k) as u32);
            }
        }
    }
}

/// A [`BlockFile`] that fails the calls its [`Injector`] chooses (see the module doc).
pub struct FaultFile {
    inner: Arc<dyn BlockFile>,
    inj: Arc<Injector>,
    layout: Mutex<Layout>,
}

impl fmt::Debug for FaultFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultFile({:?})", self.inner)
    }
}

/// How much of `len` bytes a short transfer moves: half, in whole sectors when there are
/// at least two, else half a sector's bytes.
fn short_len(len: usize) -> usize {
    let s = SECTOR_SIZE as usize;
    if len >= 2 * s {
        len / 2 / s * s
    } else {
        len / 2
    }
}

fn errno(fault: Fault) -> io::Error {
    match fault {
        Fault::Eio => io::Error::from_raw_os_error(libc::EIO),
        Fault::Enospc => io::Error::from_raw_os_error(libc::ENOSPC),
        Fault::Short => io::Error::from(io::ErrorKind::WriteZero),
        Fault::Eagain => io::Error::from_raw_os_error(libc::EAGAIN),
    }
}

impl FaultFile {
    /// Wrap `inner`, learning its VHD layout from its current contents.
    pub fn new(inner: Arc<dyn BlockFile>, inj: Arc<Injector>) -> io::Result<FaultFile> {
        let layout = Layout::learn(inner.as_ref())?;
        Ok(FaultFile {
            inner,
            inj,
            layout: Mutex::new(layout),
        })
    }

    fn layout(&self) -> std::sync::MutexGuard<'_, Layout> {
        self.layout.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where a write of `buf` at `off` falls.
    pub fn classify(&self, off: u64, buf: &[u8]) -> Point {
        self.layout().classify(off, buf)
    }
}

impl BlockFile for FaultFile {
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.inj.show(Access {
            write: false,
            offset: off,
            len: buf.len(),
            sync: false,
        });
        match self.inj.hit(Point::Read) {
            None => self.inner.read_at(buf, off),
            Some(Fault::Short) => {
                let n = short_len(buf.len());
                self.inner.read_at(&mut buf[..n], off)?;
                Err(io::Error::from(io::ErrorKind::UnexpectedEof))
            }
            Some(f) => Err(errno(f)),
        }
    }

    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        self.inj.show(Access {
            write: true,
            offset: off,
            len: buf.len(),
            sync: false,
        });
        let point = self.classify(off, buf);
        let landed = match self.inj.hit(point) {
            None => {
                self.inner.write_at(buf, off)?;
                buf.len()
            }
            Some(Fault::Short) => {
                let n = short_len(buf.len());
                self.inner.write_at(&buf[..n], off)?;
                self.layout().landed(off, &buf[..n]);
                return Err(errno(Fault::Short));
            }
            Some(f) => return Err(errno(f)),
        };
        self.layout().landed(off, &buf[..landed]);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        self.inj.show(Access {
            write: false,
            offset: 0,
            len: 0,
            sync: true,
        });
        match self.inj.hit(Point::Sync) {
            None => self.inner.sync(),
            Some(f) => Err(match f {
                Fault::Short => io::Error::from_raw_os_error(libc::EIO),
                f => errno(f),
            }),
        }
    }

    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn resizable(&self) -> bool {
        self.inner.resizable()
    }
    fn punch_hole(&self, off: u64, len: u64) -> io::Result<()> {
        self.inner.punch_hole(off, len)
    }
    fn get_xattr(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        self.inner.get_xattr(name)
    }
    fn set_xattr(&self, name: &str, value: &[u8]) -> io::Result<()> {
        self.inner.set_xattr(name, value)
    }
    fn seek_extent(&self, off: u64, data: bool) -> io::Result<Option<u64>> {
        self.inner.seek_extent(off, data)
    }
    fn memory_backed(&self) -> bool {
        self.inner.memory_backed()
    }
    fn dio_align(&self) -> Option<DioAlign> {
        self.inner.dio_align()
    }
    fn aio_fd(&self) -> Option<BorrowedFd<'_>> {
        self.inner.aio_fd()
    }

    fn inject_aio(&self, write: bool, off: u64, len: usize, res: i64) -> i64 {
        self.inj.lock().aio += 1;
        // AIO writes only go to guest data, also in a block the loop allocated whose BAT
        // entry has not reached the file yet (so the layout does not know the block).
        let _ = off;
        let point = if write { Point::Data } else { Point::Read };
        match self.inj.hit(point) {
            None => res,
            Some(Fault::Eio) => -i64::from(libc::EIO),
            Some(Fault::Enospc) => -i64::from(libc::ENOSPC),
            Some(Fault::Eagain) => -i64::from(libc::EAGAIN),
            Some(Fault::Short) => {
                // Direct I/O moves whole sectors: a single sector moves nothing.
                let n = if len >= 2 * SECTOR_SIZE as usize {
                    i64::try_from(short_len(len)).unwrap_or(0)
                } else {
                    0
                };
                if res < 0 {
                    res
                } else {
                    res.min(n)
                }
            }
        }
    }

    fn inject_aio_submit(&self, write: bool, off: u64, len: usize) -> Option<io::Error> {
        let _ = (write, off, len);
        self.inj.hit(Point::Submit).map(|f| match f {
            // A submission moves nothing: "took none of it" is EAGAIN.
            Fault::Short => io::Error::from_raw_os_error(libc::EAGAIN),
            f => errno(f),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::file::MemFile;
    use crate::image::vhd::engine::{VhdImage, VhdOpenOptions};
    use crate::image::vhd::ops::{create, CreateOptions};
    use crate::image::Image;

    #[test]
    fn rules_skip_count_and_clear() {
        let inj = Injector::new();
        inj.arm_n(Point::Bat, Fault::Eio, 1, Some(2));
        assert_eq!(inj.hit(Point::Bat), None);
        assert_eq!(inj.hit(Point::Data), None);
        assert_eq!(inj.hit(Point::Bat), Some(Fault::Eio));
        assert_eq!(inj.hit(Point::Bat), Some(Fault::Eio));
        assert_eq!(inj.hit(Point::Bat), None);
        inj.arm(Point::Read, Fault::Short);
        assert_eq!(inj.hit(Point::Read), Some(Fault::Short));
        inj.clear();
        assert_eq!(inj.hit(Point::Read), None);
        assert_eq!(inj.injected(Point::Bat), 2);
        assert_eq!(inj.seen(Point::Bat), 4);
        assert_eq!(inj.summary(), "faults-injected bat/EIO=2 read/short=1");
    }

    #[test]
    fn writes_are_classified_by_the_vhd_region_they_land_in() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a.vhd");
        create(&p, &CreateOptions::dynamic(8 << 20)).unwrap();
        let mem = Arc::new(MemFile::from_bytes(std::fs::read(&p).unwrap()));
        let inj = Injector::new();
        let ff = Arc::new(FaultFile::new(mem.clone(), inj.clone()).unwrap());
        let img = VhdImage::open_file(
            &p,
            ff.clone(),
            &VhdOpenOptions {
                read_only: false,
                ..VhdOpenOptions::default()
            },
        )
        .unwrap();
        img.write(4096 + 8, &[7u8; 1024]).unwrap();
        // One BAT sector, one data write, one bitmap write for the first allocation.
        assert_eq!(inj.seen(Point::Bat), 1);
        assert_eq!(inj.seen(Point::Data), 1);
        assert_eq!(inj.seen(Point::Bitmap), 1);
        assert!(inj.seen(Point::Footer) >= 1, "the reserve's new footer");
        img.write(4096 + 100, &[8u8; 512]).unwrap();
        assert_eq!(inj.seen(Point::Data), 2);
        assert_eq!(inj.seen(Point::Bitmap), 2);
        assert_eq!(inj.seen(Point::Bat), 1, "no new allocation");
        // A full block: close then writes the batmap.
        img.write(3 * 4096, &vec![9u8; 2 << 20]).unwrap();
        assert_eq!(inj.seen(Point::Batmap), 0);
        img.close().unwrap();
        assert!(inj.seen(Point::Batmap) >= 1, "close writes the batmap");
        assert_eq!(inj.seen(Point::Header), 0);
        assert_eq!(inj.counts(), vec![]);
    }
}

/// What an [`Injector`]'s watcher is told about each positional read or write, and each
/// `fdatasync` (`sync`, with no offset or length).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Access {
    pub write: bool,
    pub offset: u64,
    pub len: usize,
    pub sync: bool,
}
