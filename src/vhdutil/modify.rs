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

use super::cli::{OptsExt, UsageSpec};
use super::common::{self, neg};
use super::error::{Error, Result};
use super::Io;
use crate::image::vhd::engine::VhdImage;
use crate::image::vhd::format::DiskType;
use crate::image::vhd::ops::set_parent;
use crate::image::ImageError;
use crate::{verr, vout};
use nix::errno::Errno;

pub const USAGE: UsageSpec = UsageSpec {
    cmd: "modify",
    spec: "n:s:p:mt:zh",
    text: "*** Dangerous operations, use with care ***\n\
options: <-n name> [-p NEW_PARENT set parent [-m raw]] \
[-s NEW_SIZE set size] [-z zero (kill data)] \
[-t TYPE (differencing|dynamic|original)] [-h help]\n",
    to_stderr: false,
    h_fails: true,
};

/// Run `op` on the image opened read-write, then close it (first error wins).
fn with_rw(
    name: &str,
    op: impl FnOnce(&VhdImage) -> std::result::Result<(), ImageError>,
) -> Result {
    let img = common::open(name, false)?;
    let r = op(&img).map_err(Error::from);
    common::close_rw(&img, r)
}

pub fn run(io: &mut Io, args: &[String]) -> Result {
    let Some((p, name)) = USAGE.parse_named(io, args)? else {
        return Ok(());
    };
    let name = name.as_str();
    let newsize = match p.value('s') {
        None => None,
        Some(s) => match super::cli::parse_u64_strict(s) {
            Some(v) => Some(v),
            None => {
                verr!(io, "Invalid size '{s}'");
                return Err(USAGE.fail(io));
            }
        },
    };
    // Opened once up front for blktap's "error opening" message; each operation then
    // runs on its own handle so their metadata writes do not interfere.
    let fixed = match common::open(name, true) {
        Ok(img) => img.disk_type() == DiskType::Fixed,
        Err(e) => {
            vout!(io, "error opening {name}: {}", neg(&e));
            return Err(e.into());
        }
    };
    // As blktap: the outcome of the last operation is the command's.
    let mut ret = Ok(());
    if p.flag('z') {
        ret = if fixed {
            Err(Error::os("zero a fixed VHD", Errno::ENOSYS))
        } else {
            // Empty the BAT, then cut the file after the metadata (blktap truncates).
            with_rw(name, |img| img.zero_bat())
                .and_then(|()| with_rw(name, |img| img.set_physical_size(img.physical_size())))
        };
        if let Err(e) = &ret {
            vout!(io, "failed to zero VHD: {}", e.neg());
        }
    }
    if let Some(sz) = newsize {
        ret = with_rw(name, |img| img.set_physical_size(sz));
        if let Err(e) = &ret {
            vout!(io, "failed to set physical size to {sz}: {}", e.neg());
        }
    }
    if let Some(np) = p.value('p') {
        if let Err(e) = set_parent(Path::new(name), Path::new(np), p.flag('m')) {
            vout!(io, "failed to set parent to '{np}': {}", neg(&e));
            return Err(e.into());
        }
    }
    if let Some(t) = p.value('t') {
        ret = change_type(io, name, t);
    }
    ret
}

fn change_type(io: &mut Io, name: &str, t: &str) -> Result {
    let img = common::open(name, false)?;
    if img.disk_type() == DiskType::Fixed {
        vout!(io, "changing fixed vhd type not supported");
        return common::close_rw(
            &img,
            Err(Error::invalid("cannot change the type of a fixed VHD")),
        );
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
            return common::close_rw(&img, Err(Error::invalid(format!("invalid type {t}"))));
        }
    };
    let r = img.update_footer(|f| f.disk_type = code);
    common::close_rw(&img, r.map_err(Error::from))
}
