//! `vhd-util coalesce -n NAME [-a ANCESTOR | -o OUTPUT] [-x PARENT] [-s] [-p]`
//! (`vhd-util-coalesce.c`).
//!
//! - default: copy every sector the differencing disk NAME holds into its parent (VHD or
//!   raw), then print `Coalesced <n> sectors` (no newline, as XenServer's blktap; OpenXT's
//!   prints nothing). `-x PARENT` uses PARENT instead of the parent locators (OpenXT's
//!   "custom parent"; like blktap, its uuid is not checked); NAME is then read on its own.
//! - `-a ANCESTOR` (OpenXT): copy NAME's sectors into ANCESTOR, a VHD or raw image further
//!   up NAME's chain, then clear those sectors from the bitmaps (and "full" batmap bits)
//!   of the layers in between, so they read the ancestor's new data too. Prints nothing.
//! - `-o OUTPUT` (OpenXT): write the whole chain's content into a new standalone dynamic
//!   VHD (blocks that read as all zeros are left unallocated). Prints nothing. An existing
//!   OUTPUT is refused; OUTPUT is removed on failure.
//!
//! The copies are [`coalesce_onto`] of the library. Data goes through the image layer on
//! both sides: the child is read with its resolved key and the target written with its
//! own (`TAPDISK3_CRYPTO_KEYDIR`), so encrypted chains stay correct, also when the layers
//! use different keys (`-o` writes plaintext: the new VHD has no keyhash). A keyed layer
//! without an available key fails the open (ENOKEY) before anything is written. blktap's
//! `-a`/`-o` failures print only `error coalescing: N`, and so do ours.
//!
//! Progress: `-p` prints blktap's `\r%6.2f%%` on stdout; otherwise a qemu-img style
//! progress is drawn on stderr when it is a terminal.

use std::path::{Path, PathBuf};

use super::chain::open_chain;
use super::cli::{OptsExt, UsageSpec};
use super::common::{self, neg};
use super::error::{Error, Result};
use super::progress::{progress_style, with_progress, Style};
use super::Io;
use crate::image::chain::{open_vhd_chain, OpenOptions};
use crate::image::crypto::KeySource;
use crate::image::raw::RawImage;
use crate::image::vhd::engine::VhdImage;
use crate::image::vhd::ops::{coalesce_onto, create, CreateOptions};
use crate::image::{Image, ImageError, SECTOR_SIZE};
use crate::vout;
use nix::errno::Errno;

pub const USAGE: UsageSpec = UsageSpec {
    cmd: "coalesce",
    spec: "n:o:a:x:sph",
    text: "options: <-n name> [-a ancestor] [-o output] [-s sparse] [-p progress] \
[-x custom parent] [-h help]\n",
    to_stderr: false,
    h_fails: true,
};

/// `canonicalize` with the path in the error.
fn canonical(p: impl AsRef<Path>) -> Result<PathBuf> {
    let p = p.as_ref();
    std::fs::canonicalize(p).map_err(|e| Error::io(format!("resolve {}", p.display()), e))
}

/// Open the coalesce target: a raw image, or a VHD with its chain, read-write.
fn open_target(path: &Path, raw: bool) -> std::result::Result<Box<dyn Image>, ImageError> {
    if raw {
        Ok(Box::new(RawImage::open(path, false)?))
    } else {
        Ok(Box::new(open_chain(&path.to_string_lossy(), false)?))
    }
}

fn coalesce_parent(
    io: &mut Io,
    name: &str,
    sparse: bool,
    style: Style,
    step_parent: Option<&str>,
) -> Result<u64> {
    let meta = common::open(name, true).map_err(|e| {
        vout!(io, "error opening {name}: {}", neg(&e));
        Error::from(e)
    })?;
    if !meta.is_differencing() {
        vout!(io, "coalescing of non-differencing disks is not supported");
        return Err(Error::invalid(format!("{name} is not a differencing disk")));
    }
    let (pname, raw) = match step_parent {
        Some(p) => (PathBuf::from(p), common::parent_is_raw(&meta)),
        None => match common::parent_path(&meta) {
            Ok(Some(p)) => p,
            Ok(None) => {
                vout!(io, "error finding {name} parent: {}", -libc::EINVAL);
                return Err(Error::invalid(format!("{name} has no parent")));
            }
            Err(e) => {
                vout!(io, "error finding {name} parent: {}", neg(&e));
                return Err(e.into());
            }
        },
    };
    drop(meta);
    // With a custom parent the locators may point nowhere: read the child alone (only
    // the sectors it holds are copied, and those never come from a parent).
    let opened = if step_parent.is_some() {
        open_vhd_chain(
            Path::new(name),
            &OpenOptions {
                read_only: true,
                keys: KeySource::from_env(),
                leaf_only: true,
                ..Default::default()
            },
        )
    } else {
        open_chain(name, true)
    };
    let child = opened.map_err(|e| {
        vout!(io, "error opening {name}: {}", neg(&e));
        let _ = writeln!(io.err, "{}", common::describe(&e));
        Error::from(e)
    })?;
    let pstr = pname.to_string_lossy().into_owned();
    if sparse && !raw {
        vout!(io, "opening for sparse writes");
    }
    let parent = open_target(&pname, raw).map_err(|e| {
        if raw {
            vout!(io, "failed to open parent {pstr}: {}", neg(&e));
        } else {
            vout!(io, "error opening {pstr}: {}", neg(&e));
            let _ = writeln!(io.err, "{}", common::describe(&e));
        }
        Error::from(e)
    })?;
    let r = with_progress(io, style, |p| {
        coalesce_onto(&child, parent.as_ref(), Some(p))
    });
    let closed = parent.close();
    let _ = child.close();
    finish(io, r, closed)
}

/// The outcome of a coalesce: the copy's error (its cause on stderr) first, then the
/// target's close.
fn finish(
    io: &mut Io,
    r: std::result::Result<u64, ImageError>,
    closed: std::result::Result<(), ImageError>,
) -> Result<u64> {
    let n = r.map_err(|e| {
        let _ = writeln!(io.err, "{}", common::describe(&e));
        Error::from(e)
    })?;
    closed?;
    Ok(n)
}

/// The chain ends before the ancestor (blktap: ENOENT).
fn not_found() -> Error {
    Error::os("ancestor not in the chain", Errno::ENOENT)
}

/// NAME's chain up to ANCESTOR: the layers strictly between them (VHDs) and the
/// ancestor itself (path, raw). blktap's errors: EINVAL when NAME is ANCESTOR or block
/// sizes differ, ENOENT when the chain ends before reaching ANCESTOR.
fn ancestor_chain(name: &str, ancestor: &str) -> Result<(Vec<PathBuf>, PathBuf, bool)> {
    let target = canonical(ancestor)?;
    if canonical(name)? == target {
        return Err(Error::invalid(format!("{name} is its own ancestor")));
    }
    let mut cur = common::open(name, true)?;
    let block_size = cur.header().map(|h| h.block_size);
    let mut between = Vec::new();
    for _ in 0..common::MAX_CHAIN {
        if !cur.is_differencing() || cur.header().map(|h| h.block_size) != block_size {
            return Err(if cur.is_differencing() {
                Error::invalid(format!("block sizes differ on the way to {ancestor}"))
            } else {
                not_found()
            });
        }
        let (p, raw) = common::parent_path(&cur)?.ok_or_else(not_found)?;
        if canonical(&p)? == target {
            return Ok((between, p, raw));
        }
        if raw {
            return Err(not_found());
        }
        cur = common::open(&p.to_string_lossy(), true)?;
        between.push(p);
    }
    Err(Error::os(format!("chain of {name}"), Errno::ELOOP))
}

fn coalesce_ancestor(
    io: &mut Io,
    name: &str,
    ancestor: &str,
    sparse: bool,
    style: Style,
) -> Result<u64> {
    let (between, anc, raw) = ancestor_chain(name, ancestor)?;
    let child = open_chain(name, true).map_err(|e| {
        let _ = writeln!(io.err, "{}", common::describe(&e));
        Error::from(e)
    })?;
    let mut layers: Vec<VhdImage> = Vec::with_capacity(between.len());
    for p in &between {
        layers.push(common::open(&p.to_string_lossy(), false)?);
    }
    if sparse && !raw {
        vout!(io, "opening for sparse writes");
    }
    let target = open_target(&anc, raw).map_err(|e| {
        let _ = writeln!(io.err, "{}", common::describe(&e));
        Error::from(e)
    })?;
    let r = with_progress(io, style, |p| {
        let n = coalesce_onto(&child, target.as_ref(), Some(p))?;
        // The layers in between must no longer hide what the ancestor now holds. The
        // ancestor's copy is durable (coalesce_onto ends with its flush), so each layer
        // clears its "full" batmap bits and syncs, then rewrites its bitmaps and syncs:
        // two syncs per layer, and every crash state in between reads the same data
        // (argument at VhdImage::clear_bitmap_bits_batch).
        for l in &layers {
            l.clear_bitmap_bits_batch(&mut |blk| child.block_bitmap(blk))?;
        }
        Ok(n)
    });
    let mut closed = target.close();
    for l in &layers {
        closed = closed.and(l.close());
    }
    let _ = child.close();
    finish(io, r, closed)
}

fn coalesce_out(io: &mut Io, name: &str, out: &str, style: Style) -> Result<()> {
    let src = open_chain(name, true).map_err(|e| {
        let _ = writeln!(io.err, "{}", common::describe(&e));
        Error::from(e)
    })?;
    match Path::new(out).symlink_metadata() {
        Ok(_) => {
            vout!(io, "{out} already exists");
            return Err(Error::os(out, Errno::EEXIST));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            let e = Error::io(format!("stat {out}"), e);
            vout!(io, "error checking {out}: {}", e.errno());
            return Err(e);
        }
    }
    let size = src.footer().curr_size;
    if let Err(e) = create(Path::new(out), &CreateOptions::dynamic(size)) {
        vout!(io, "error creating {out}: {}", neg(&e));
        return Err(e.into());
    }
    let remove = || {
        let _ = std::fs::remove_file(out);
    };
    let dst = match open_chain(out, false) {
        Ok(d) => d,
        Err(e) => {
            vout!(io, "error opening {out}: {}", neg(&e));
            remove();
            return Err(e.into());
        }
    };
    let (sbs, dbs) = (
        src.header().map_or(0, |h| h.block_size),
        dst.header().map_or(0, |h| h.block_size),
    );
    if sbs != dbs {
        // blktap prints this without a newline.
        let _ = write!(
            io.out,
            "source and destination VHD block sizes are different: {sbs} != {dbs}"
        );
        let _ = dst.close();
        remove();
        return Err(Error::invalid(format!(
            "block sizes differ: {sbs} != {dbs}"
        )));
    }
    let spb = u64::from(src.sectors_per_block());
    let total = src.bat().len() as u64;
    let csize = src.info().size_sectors;
    let r = with_progress(io, style, |p| {
        let mut buf = Vec::new();
        for i in 0..total {
            p(i, total);
            let first = i * spb;
            if first >= csize {
                break;
            }
            let n = spb.min(csize - first);
            buf.resize((n * SECTOR_SIZE) as usize, 0);
            src.read(first, &mut buf)?;
            if buf.iter().any(|&b| b != 0) {
                dst.write(first, &buf)?;
            }
        }
        dst.flush()
    });
    let closed = dst.close();
    let _ = src.close();
    match r.and(closed) {
        Ok(()) => Ok(()),
        Err(e) => {
            let _ = writeln!(io.err, "{}", common::describe(&e));
            remove();
            Err(e.into())
        }
    }
}

pub fn run(io: &mut Io, args: &[String]) -> Result {
    let Some((p, name)) = USAGE.parse_named(io, args)? else {
        return Ok(());
    };
    let name = name.as_str();
    let (out, ancestor) = (p.value('o'), p.value('a'));
    if out.is_some() && ancestor.is_some() {
        return Err(USAGE.fail(io));
    }
    let style = progress_style(io, p.flag('p'));
    let sparse = p.flag('s');
    let r = match (out, ancestor) {
        (Some(o), _) => coalesce_out(io, name, o, style).map(|()| None),
        (None, Some(a)) => coalesce_ancestor(io, name, a, sparse, style).map(|_| None),
        (None, None) => coalesce_parent(io, name, sparse, style, p.value('x')).map(Some),
    };
    match r {
        Ok(Some(n)) => {
            let _ = write!(io.out, "Coalesced {n} sectors");
            Ok(())
        }
        Ok(None) => Ok(()),
        Err(e) => {
            vout!(io, "error coalescing: {}", e.neg());
            Err(e)
        }
    }
}
