//! `vhd-util query`: one line per requested field, in blktap's fixed order
//! (`-v -s -p -f -m -d -a -S`), with blktap's messages (`vhd-util-query.c`).

use super::cli::{OptsExt, UsageSpec};
use super::common::{self, neg};
use super::error::{Error, Result};
use super::Io;
use crate::image::chain::chain_depth;
use crate::image::vhd::format::BAT_UNUSED;
use crate::image::vhd::ops::max_fast_resize_size;
use crate::vout;
use std::path::Path;

pub const USAGE: UsageSpec = UsageSpec {
    cmd: "query",
    spec: "n:vspfdSmauh",
    text: "options: <-n name> [-v print virtual size (in MB)] \
[-s print physical utilization (bytes)] [-p print parent] \
[-f print fields] [-m print marker] [-d print chain depth] \
[-S print max virtual size (MB) for fast resize] \
[-a print allocated block count] \
[-u don't resolve parent path] \
[-h help]\n",
    to_stderr: false,
    h_fails: false,
};

pub fn run(io: &mut Io, args: &[String]) -> Result {
    let Some((p, name)) = USAGE.parse_named(io, args)? else {
        return Ok(());
    };
    let img = match common::open(&name, true) {
        Ok(i) => i,
        Err(e) => {
            vout!(io, "error opening {name}: {}", neg(&e));
            return Err(e.into());
        }
    };
    // As blktap: a failed -s sets the status, later failures only when it is still 0.
    let mut err: Option<Error> = None;
    let keep = |err: &mut Option<Error>, e: Error| {
        err.get_or_insert(e);
    };
    if p.flag('v') {
        vout!(io, "{}", img.footer().curr_size >> 20);
    }
    if p.flag('s') {
        match common::phys_size(&img) {
            Ok(s) => vout!(io, "{s}"),
            Err(e) => {
                vout!(io, "failed to get physical size: {}", neg(&e));
                err = Some(e.into());
            }
        }
    }
    if p.flag('p') {
        if !img.is_differencing() {
            vout!(io, "{name} has no parent");
        } else {
            let r = if p.flag('u') {
                common::parent_unresolved(&img)
            } else {
                common::parent_path(&img).and_then(|o| {
                    o.map(|(p, _)| p.to_string_lossy().into_owned())
                        .ok_or_else(|| crate::image::ImageError::Invalid("no parent".into()))
                })
            };
            match r {
                Ok(s) => vout!(io, "{s}"),
                Err(e) => {
                    vout!(io, "query failed");
                    keep(&mut err, e.into());
                }
            }
        }
    }
    if p.flag('f') {
        match common::hidden(&img) {
            Ok(h) => vout!(io, "hidden: {h}"),
            Err(e) => {
                vout!(io, "error checking 'hidden' field: {}", neg(&e));
                keep(&mut err, e.into());
            }
        }
    }
    if p.flag('m') {
        match img.marker() {
            // blktap prints the marker as a (signed) char promoted to int.
            Ok(m) => vout!(io, "marker: {}", m as i8),
            Err(e) => {
                vout!(io, "error checking 'marker' field: {}", neg(&e));
                keep(&mut err, e.into());
            }
        }
    }
    if p.flag('d') {
        // vhd_chain_depth: 1 + one per parent, a raw parent included.
        match chain_depth(Path::new(&name)) {
            Ok(d) => vout!(io, "chain depth: {d}"),
            Err(e) => {
                vout!(io, "error checking chain depth: {}", neg(&e));
                keep(&mut err, e.into());
            }
        }
    }
    if p.flag('a') {
        if img.header().is_none() {
            // blktap: vhd_get_bat fails on a fixed disk.
            vout!(io, "error reading bat: {}", -libc::EINVAL);
            keep(&mut err, Error::invalid("a fixed VHD has no BAT"));
        } else {
            let used = img.bat().iter().filter(|&&e| e != BAT_UNUSED).count();
            vout!(io, "{used}");
        }
    }
    if p.flag('S') {
        // blktap prints max_bat_size << 1 (2 MiB blocks); fixed disks have no BAT: 0.
        let max = if img.header().is_some() {
            max_fast_resize_size(&img) >> 20
        } else {
            0
        };
        vout!(io, "{max}");
    }
    err.map_or(Ok(()), Err)
}
