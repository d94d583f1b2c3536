//! `vhd-util modify -n NAME [-p NEW_PARENT [-m]] [-s PHYS_BYTES] [-z]`
//! (`vhd-util-modify.c`, libvhd `vhd_change_parent`, `vhd_set_phys_size`): the
//! "dangerous" metadata edits, on the engine's primitives:
//!
//! - `-z`: empty the BAT and batmap of a dynamic disk (all data becomes unreachable);
//!   fixed disks: ENOSYS;
//! - `-s`: put the footer so the file is PHYS_BYTES long (refused below the end of the
//!   data or when not sector aligned);
//! - `-p`: reparent a differencing disk (parent uuid, timestamp, name, and the existing
//!   MacX/W2ku/W2ru locators rewritten in place; ENOSPC if a new path does not fit);
//! - `-t differencing|dynamic|original` (OpenXT's vhd-util, used by vhd-dm-create):
//!   rewrite the footer's disk type; `original` infers it from the header's parent name.

use std::path::Path;

use super::cli::{OptsExt, UsageSpec, EINVAL};
use super::common::{self, neg};
use super::set::close;
use super::Io;
use crate::image::vhd::engine::VhdImage;
use crate::image::vhd::format::DiskType;
use crate::image::vhd::ops::set_parent;
use crate::image::ImageError;
use crate::{verr, vout};

pub const USAGE: UsageSpec = UsageSpec {
    cmd: "modify",
    spec: "n:s:p:mt:zh",
    text: "*** Dangerous operations, use with care ***\n\
options: <-n name> [-p NEW_PARENT set parent [-m raw]] \
[-s NEW_SIZE set size] [-z zero (kill data)] \
[-t TYPE (differencing|dynamic|original)] [-h help]\n",
    to_stderr: false,
    h_status: EINVAL,
};

/// Run `op` on the image opened read-write, then close it (first error wins).
fn with_rw(name: &str, op: impl FnOnce(&VhdImage) -> Result<(), ImageError>) -> i32 {
    let img = match common::open(name, false) {
        Ok(i) => i,
        Err(e) => return neg(&e),
    };
    let r = match op(&img) {
        Ok(()) => 0,
        Err(e) => neg(&e),
    };
    close(&img, r)
}

pub fn run(io: &mut Io, args: &[String]) -> i32 {
    let (p, name) = match USAGE.parse_named(io, args) {
        Ok(v) => v,
        Err(s) => return s,
    };
    let name = name.as_str();
    let newsize = match p.value('s') {
        None => None,
        Some(s) => match super::cli::parse_u64_strict(s) {
            Some(v) => Some(v),
            None => {
                verr!(io, "Invalid size '{s}'");
                return USAGE.fail(io, EINVAL);
            }
        },
    };
    // Opened once up front for blktap's "error opening" message; each operation then
    // runs on its own handle so their metadata writes do not interfere.
    let fixed = match common::open(name, true) {
        Ok(img) => img.disk_type() == DiskType::Fixed,
        Err(e) => {
            vout!(io, "error opening {name}: {}", neg(&e));
            return neg(&e);
        }
    };
    let mut err = 0;
    if p.flag('z') {
        err = if fixed {
            -libc::ENOSYS
        } else {
            // Empty the BAT, then cut the file after the metadata (blktap truncates).
            match with_rw(name, |img| img.zero_bat()) {
                0 => with_rw(name, |img| img.set_physical_size(img.physical_size())),
                e => e,
            }
        };
        if err != 0 {
            vout!(io, "failed to zero VHD: {err}");
        }
    }
    if let Some(sz) = newsize {
        err = with_rw(name, |img| img.set_physical_size(sz));
        if err != 0 {
            vout!(io, "failed to set physical size to {sz}: {err}");
        }
    }
    if let Some(np) = p.value('p') {
        if let Err(e) = set_parent(Path::new(name), Path::new(np), p.flag('m')) {
            vout!(io, "failed to set parent to '{np}': {}", neg(&e));
            err = neg(&e);
            return err;
        }
    }
    if let Some(t) = p.value('t') {
        err = change_type(io, name, t);
    }
    err
}

fn change_type(io: &mut Io, name: &str, t: &str) -> i32 {
    let img = match common::open(name, false) {
        Ok(i) => i,
        Err(e) => return neg(&e),
    };
    if img.disk_type() == DiskType::Fixed {
        vout!(io, "changing fixed vhd type not supported");
        return close(&img, EINVAL);
    }
    let code = match t {
        "differencing" => DiskType::Differencing.code(),
        "dynamic" => DiskType::Dynamic.code(),
        "original" => {
            let named = img.header().is_some_and(|h| !h.parent_name().is_empty());
            if named {
                DiskType::Differencing.code()
            } else {
                DiskType::Dynamic.code()
            }
        }
        _ => {
            vout!(io, "invalid type {t} (must be 'differencing or dynamic')");
            return close(&img, EINVAL);
        }
    };
    let r = img
        .update_footer(|f| f.disk_type = code)
        .map_or_else(|e| neg(&e), |()| 0);
    close(&img, r)
}
