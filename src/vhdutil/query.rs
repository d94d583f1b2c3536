//! `vhd-util query`: one line per requested field, in blktap's fixed order
//! (`-v -s -p -f -m -d -a -S`), with blktap's messages (`vhd-util-query.c`).

use super::cli::{OptsExt, UsageSpec};
use super::common::{self, neg};
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
    h_status: 0,
};

pub fn run(io: &mut Io, args: &[String]) -> i32 {
    let (p, name) = match USAGE.parse_named(io, args) {
        Ok(v) => v,
        Err(s) => return s,
    };
    let img = match common::open(&name, true) {
        Ok(i) => i,
        Err(e) => {
            vout!(io, "error opening {name}: {}", neg(&e));
            return neg(&e);
        }
    };
    let mut err = 0;
    let keep = |err: &mut i32, r: i32| {
        if *err == 0 {
            *err = r;
        }
    };
    if p.flag('v') {
        vout!(io, "{}", img.footer().curr_size >> 20);
    }
    if p.flag('s') {
        match common::phys_size(&img) {
            Ok(s) => vout!(io, "{s}"),
            Err(e) => {
                vout!(io, "failed to get physical size: {}", neg(&e));
                err = neg(&e);
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
                    keep(&mut err, neg(&e));
                }
            }
        }
    }
    if p.flag('f') {
        match common::hidden(&img) {
            Ok(h) => vout!(io, "hidden: {h}"),
            Err(e) => {
                vout!(io, "error checking 'hidden' field: {}", neg(&e));
                keep(&mut err, neg(&e));
            }
        }
    }
    if p.flag('m') {
        match img.marker() {
            // blktap prints the marker as a (signed) char promoted to int.
            Ok(m) => vout!(io, "marker: {}", m as i8),
            Err(e) => {
                vout!(io, "error checking 'marker' field: {}", neg(&e));
                keep(&mut err, neg(&e));
            }
        }
    }
    if p.flag('d') {
        // vhd_chain_depth: 1 + one per parent, a raw parent included.
        match chain_depth(Path::new(&name)) {
            Ok(d) => vout!(io, "chain depth: {d}"),
            Err(e) => {
                vout!(io, "error checking chain depth: {}", neg(&e));
                keep(&mut err, neg(&e));
            }
        }
    }
    if p.flag('a') {
        if img.header().is_none() {
            // blktap: vhd_get_bat fails on a fixed disk.
            vout!(io, "error reading bat: {}", -libc::EINVAL);
            keep(&mut err, -libc::EINVAL);
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
    err
}
