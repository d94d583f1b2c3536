//! `vhd-util coalesce -n NAME [-s] [-p]` (`vhd-util-coalesce.c`): copy every sector the
//! differencing disk NAME holds into its parent (VHD or raw), then print
//! `Coalesced <n> sectors` (no newline, as blktap).
//!
//! The copy is [`coalesce_onto`] of the library. Data goes through the image layer on
//! both sides: the child is read with its resolved
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
use super::progress::{progress_style, with_progress, Style};
use super::Io;
use crate::image::raw::RawImage;
use crate::image::vhd::ops::coalesce_onto;
use crate::image::Image;
use crate::vout;

pub const USAGE: UsageSpec = UsageSpec {
    cmd: "coalesce",
    spec: "n:o:a:x:sph",
    text: "options: <-n name> [-s sparse] [-p progress] [-h help]\n",
    to_stderr: false,
    h_status: EINVAL,
};

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
    let r = with_progress(io, style, |p| {
        coalesce_onto(&child, parent.as_ref(), Some(p))
    });
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
    let (p, name) = match USAGE.parse_named(io, args) {
        Ok(v) => v,
        Err(s) => return s,
    };
    let name = name.as_str();
    // blktap's option string lists -o, -a and -x but its switch sends them to usage.
    if p.flag('o') || p.flag('a') || p.flag('x') {
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
