//! `vhd-util fill -n NAME [-b [-f SEC] [-t SEC] [-B]]` (`vhd-util-fill.c`).
//!
//! Without `-b` ([`fill_image`] of the library): every block not yet fully allocated is
//! read through the image layer (parents, keys) and written back, so the image ends fully
//! allocated with the same content; encrypted images work (`TAPDISK3_CRYPTO_KEYDIR`).
//!
//! `-b`: allocate blocks (BAT entries, all-ones bitmaps, file extended with zeros)
//! without writing data. Differences from blktap: blocks that are already allocated are
//! left alone (blktap re-points them at new, empty space), and keyed images are refused
//! (marking never-written sectors present would make them decrypt to garbage). `-B` is
//! accepted, but a block beyond the 2 TiB limit still fails: BAT entries are 32-bit.

use super::chain::open_chain_or_report;
use super::cli::strtoull;
use super::cli::{OptsExt, UsageSpec};
use super::common::{self, neg};
use super::error::{Error, Result};
use super::progress::{progress_style, with_progress};
use super::Io;
use crate::image::vhd::engine::{align_block_start, VhdImage};
use crate::image::vhd::format::*;
use crate::image::vhd::ops::fill_image;
use crate::image::{Image, SECTOR_SIZE};
use crate::{verr, vout};
use nix::errno::Errno;

pub const USAGE: UsageSpec = UsageSpec {
    cmd: "fill",
    spec: "n:f:t:bBh",
    text: "options: <-n name> [-h help] [-b initialise the BAT and bitmaps, \
don't write to the data blocks (much faster)] [-f start \
intialisation from this sector, only usable with -b] [-t \
intialise up to this sector (inclusive), only usable with -b] \
[-B ignore the 2 TB limit, only usable with -b]\n",
    to_stderr: false,
    h_fails: true,
};

/// `-b`: allocate extents `from..=to` with full bitmaps and no data writes.
fn allocate_fast(io: &mut Io, img: &VhdImage, from: u64, to: u64) -> Result {
    let Some(h) = img.header() else {
        return Err(Error::invalid("a fixed VHD has no BAT"));
    };
    if common::chain_keyed(img)? {
        verr!(
            io,
            "fill: -b would expose unwritten sectors of an encrypted VHD as garbage; use fill without -b"
        );
        return Err(Error::invalid("fill -b of an encrypted chain"));
    }
    let mut bat = img.bat();
    let spb = u64::from(h.spb());
    let bm = u64::from(h.bitmap_sectors());
    let old_len = common::phys_size(img)?;
    let mut max = (old_len - FOOTER_SIZE as u64) / SECTOR_SIZE;
    let old_end = max;
    let align = |m: u64| align_block_start(m, h.bitmap_sectors());
    max = align(max);
    let to = to.min(bat.len() as u64 - 1);
    let mut new = Vec::new();
    for i in from..=to {
        if bat[i as usize] != BAT_UNUSED {
            continue;
        }
        if max + bm + spb > u64::from(u32::MAX) {
            vout!(io, "sector offset for extent {i} exceeds the 2 TB limit");
            return Err(Error::os(format!("extent {i} past 2 TB"), Errno::EOVERFLOW));
        }
        bat[i as usize] = max as u32;
        new.push(i);
        max = align(max + bm + spb);
    }
    if new.is_empty() {
        return Ok(());
    }
    let end = new
        .iter()
        .map(|&i| u64::from(bat[i as usize]) + bm + spb)
        .max()
        .unwrap_or(max)
        * SECTOR_SIZE;
    let file = img.file();
    let w = |buf: &[u8], off: u64| img.write_raw(buf, off);
    // Space first (zeros), bitmaps next, then the BAT that publishes them, then the footer.
    if file.resizable() {
        let mut f = img.footer();
        file.set_len(end + FOOTER_SIZE as u64)
            .map_err(|e| Error::io("extend the file", e))?;
        w(&f.encode(), end)?;
    }
    let ones = vec![0xFFu8; (bm * SECTOR_SIZE) as usize];
    // Zero the alignment gaps in the old part of the file: the first one holds the old
    // footer (libvhd writes zeros from the old end of data up to the block).
    let mut prev = old_end;
    for &i in &new {
        let s = u64::from(bat[i as usize]);
        let (lo, hi) = (prev * SECTOR_SIZE, (s * SECTOR_SIZE).min(old_len));
        if hi > lo {
            w(&vec![0u8; (hi - lo) as usize], lo)?;
        }
        prev = s + bm + spb;
        w(&ones, s * SECTOR_SIZE)?;
    }
    file.sync().map_err(|e| Error::io("fsync", e))?;
    let raw = encode_bat(&bat);
    w(&raw, h.table_offset)?;
    file.sync().map_err(|e| Error::io("fsync", e))
}

pub fn run(io: &mut Io, args: &[String]) -> Result {
    let Some((p, name)) = USAGE.parse_named(io, args)? else {
        return Ok(());
    };
    let name = name.as_str();
    let init_bat = p.flag('b');
    let from = p.value('f').map(strtoull);
    let to = p.value('t').map(strtoull);
    if (from.is_some() || to.is_some()) && !init_bat {
        vout!(io, "-f/-t can only be used with -b");
        return Err(USAGE.fail(io));
    }
    if let (Some(f), Some(t)) = (from, to) {
        if t < f {
            vout!(io, "invalid sector range {f}-{t}");
            return Err(USAGE.fail(io));
        }
    }
    if p.flag('B') && !init_bat {
        vout!(io, "-B can only be used with -b");
        return Err(USAGE.fail(io));
    }
    if init_bat {
        let img = match common::open(name, false) {
            Ok(i) => i,
            Err(e) => {
                vout!(io, "error opening {name}: {}", neg(&e));
                return Err(e.into());
            }
        };
        if img.header().is_none() || img.bat().is_empty() {
            return Err(Error::invalid(format!("{name} has no BAT")));
        }
        let spb = u64::from(img.sectors_per_block().max(1));
        let fe = from.map_or(0, |s| s / spb);
        let te = to.map_or(u64::MAX, |s| s / spb);
        // Raw metadata writes: the engine handle is dropped without its close path.
        let r = allocate_fast(io, &img, fe, te);
        drop(img);
        return r;
    }
    let img = open_chain_or_report(io, name, false)?;
    let style = progress_style(io, false);
    let r = with_progress(io, style, |p| fill_image(&img, Some(p)).map(drop)).map_err(|e| {
        verr!(io, "{}", super::common::describe(&e));
        Error::from(e)
    });
    let c = img.close().map_err(Error::from);
    r.and(c)
}
