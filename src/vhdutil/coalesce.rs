//! `vhd-util coalesce -n NAME [-s] [-p]` (`vhd-util-coalesce.c`): copy every sector the
//! differencing disk NAME holds into its parent (VHD or raw), then print
//! `Coalesced <n> sectors` (no newline, as blktap).
//!
//! Data goes through the image layer on both sides: the child is read with its resolved
//! key and the parent written with its own (`TAPDISK3_CRYPTO_KEYDIR`), so encrypted
//! chains stay correct, also when the layers use different keys. A keyed layer without an
//! available key fails the open (ENOKEY) before anything is written.
//!
//! Progress: `-p` prints blktap's `\r%6.2f%%` on stdout; otherwise a qemu-img style
//! progress is drawn on stderr when it is a terminal.

use std::path::Path;

use super::chain::open_chain;
use super::cli::{OptsExt, UsageSpec, EINVAL};
use super::common::{self, neg};
use super::progress::{Progress, Style};
use super::Io;
use crate::image::raw::RawImage;
use crate::image::vhd::engine::VhdImage;
use crate::image::vhd::format::{bit_run, bit_test, BAT_UNUSED};
use crate::image::{Image, ImageError, SECTOR_SIZE};
use crate::vout;

pub const USAGE: UsageSpec = UsageSpec {
    cmd: "coalesce",
    spec: "n:o:a:x:sph",
    text: "options: <-n name> [-s sparse] [-p progress] [-h help]\n",
    to_stderr: false,
    h_status: EINVAL,
};

/// Progress reporting for the data commands: blktap style on stdout when asked (`-p`),
/// else qemu-img style on stderr when that is a terminal.
pub fn progress_style(io: &Io, blktap_flag: bool) -> Style {
    if blktap_flag {
        Style::Blktap
    } else if io.err_is_tty {
        Style::Tty
    } else {
        Style::Silent
    }
}

/// Draw progress on the stream its style uses.
pub fn draw(io: &mut Io, p: &mut Progress, style: Style, done: u64) {
    match style {
        Style::Blktap => p.update(io.out, done),
        _ => p.update(io.err, done),
    }
}

/// Finish progress on the stream its style uses.
pub fn finish(io: &mut Io, p: &mut Progress, style: Style) {
    match style {
        Style::Blktap => p.finish(io.out),
        _ => p.finish(io.err),
    }
}

/// Copy the sectors held by `child` (a chain-opened leaf) into `parent`. Returns the
/// number of sectors copied.
pub fn coalesce_onto(
    io: &mut Io,
    child: &VhdImage,
    parent: &dyn Image,
    style: Style,
) -> Result<u64, ImageError> {
    let bat = child.bat();
    let spb = u64::from(child.sectors_per_block());
    let csize = child.info().size_sectors;
    let psize = parent.info().size_sectors;
    let full = child.batmap().map(|(_, m)| m);
    // First the runs of sectors the child holds (bitmap, or whole block when the batmap
    // says full), so nothing is written if some of them do not fit the parent.
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for (i, &e) in bat.iter().enumerate() {
        let first = i as u64 * spb;
        if e == BAT_UNUSED || first >= csize {
            continue;
        }
        let n = spb.min(csize - first);
        if full.as_ref().is_some_and(|m| bit_test(m, i as u64)) {
            runs.push((first, n));
            continue;
        }
        let blk = u32::try_from(i).map_err(|_| ImageError::Invalid("block number".into()))?;
        let Some(bm) = child.block_bitmap(blk)? else {
            continue;
        };
        let mut s = 0;
        while s < n {
            let (set, len) = bit_run(&bm, s, n - s);
            if set {
                runs.push((first + s, len));
            }
            s += len;
        }
    }
    if let Some(&(s, n)) = runs.iter().find(|&&(s, n)| s + n > psize) {
        return Err(ImageError::OutOfRange {
            sector: s,
            nsectors: n,
            size: psize,
        });
    }
    let mut prog = Progress::new(style, runs.len() as u64);
    let mut total = 0u64;
    let mut buf = Vec::new();
    for (i, &(s, len)) in runs.iter().enumerate() {
        draw(io, &mut prog, style, i as u64);
        let bytes = usize::try_from(len * SECTOR_SIZE)
            .map_err(|_| ImageError::Invalid("run too large".into()))?;
        buf.resize(bytes, 0);
        child.read(s, &mut buf)?;
        parent.write(s, &buf)?;
        total += len;
    }
    parent.flush()?;
    finish(io, &mut prog, style);
    Ok(total)
}

fn coalesce_parent(io: &mut Io, name: &str, sparse: bool, style: Style) -> Result<u64, i32> {
    let meta = common::open(name, true).map_err(|e| {
        vout!(io, "error opening {name}: {}", neg(&e));
        neg(&e)
    })?;
    if !meta.is_differencing() {
        vout!(io, "coalescing of non-differencing disks is not supported");
        return Err(EINVAL);
    }
    let (pname, raw) = match common::parent_path(&meta) {
        Ok(Some(p)) => p,
        Ok(None) => {
            vout!(io, "error finding {name} parent: {EINVAL}");
            return Err(EINVAL);
        }
        Err(e) => {
            vout!(io, "error finding {name} parent: {}", neg(&e));
            return Err(neg(&e));
        }
    };
    drop(meta);
    let child = open_chain(name, true).map_err(|e| {
        vout!(io, "error opening {name}: {}", neg(&e));
        let _ = writeln!(io.err, "{}", common::describe(&e));
        neg(&e)
    })?;
    let pstr = pname.to_string_lossy().into_owned();
    let parent: Box<dyn Image> = if raw {
        Box::new(RawImage::open(Path::new(&pname), false).map_err(|e| {
            vout!(io, "failed to open parent {pstr}: {}", neg(&e));
            neg(&e)
        })?)
    } else {
        if sparse {
            vout!(io, "opening for sparse writes");
        }
        Box::new(open_chain(&pstr, false).map_err(|e| {
            vout!(io, "error opening {pstr}: {}", neg(&e));
            let _ = writeln!(io.err, "{}", common::describe(&e));
            neg(&e)
        })?)
    };
    let r = coalesce_onto(io, &child, parent.as_ref(), style);
    let closed = parent.close();
    let _ = child.close();
    let n = r.map_err(|e| {
        let _ = writeln!(io.err, "{}", common::describe(&e));
        neg(&e)
    })?;
    closed.map_err(|e| neg(&e))?;
    Ok(n)
}

pub fn run(io: &mut Io, args: &[String]) -> i32 {
    let p = match USAGE.parse(io, args) {
        Ok(p) => p,
        Err(s) => return s,
    };
    let Some(name) = p.value('n') else {
        return USAGE.fail(io, EINVAL);
    };
    // blktap's option string lists -o, -a and -x but its switch sends them to usage.
    if !p.operands.is_empty() || p.flag('o') || p.flag('a') || p.flag('x') {
        return USAGE.fail(io, EINVAL);
    }
    let style = progress_style(io, p.flag('p'));
    match coalesce_parent(io, name, p.flag('s'), style) {
        Ok(n) => {
            let _ = write!(io.out, "Coalesced {n} sectors");
            0
        }
        Err(e) => {
            vout!(io, "error coalescing: {e}");
            e
        }
    }
}
