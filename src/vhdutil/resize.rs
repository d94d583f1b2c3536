//! `vhd-util resize -n NAME -s MiB (-f | -j JOURNAL)` and `vhd-util revert -n NAME -j
//! JOURNAL` (`vhd-util-resize.c`, `vhd-util-revert.c`).
//!
//! `-f` grows within the BAT preallocated with `create/snapshot -S` (footer only).
//! `-j` grows offline past the BAT, moving metadata and blocks, with a journal
//! ([`super::journal`]; our own journal format); `revert` rolls an interrupted one back.
//! Shrinking is not supported (blktap: "dynamic shrink not fully implemented").

use super::cli::{number, OptsExt, UsageSpec};
use super::common::{self, neg};
use super::error::{Error, Result};
use super::journal;
use super::Io;
use crate::image::vhd::format::DiskType;
use crate::image::vhd::ops::{max_fast_resize_size, resize_fast};
use crate::{verr, vout};
use nix::errno::Errno;
use std::path::Path;

pub const USAGE: UsageSpec = UsageSpec {
    cmd: "resize",
    spec: "n:s:j:fh",
    text: "options: <-n name> <-s size (in MB)> (<-j journal>|<-f fast>) [-h help]\n\n\
The resize operation can only be performed offline and must be journaled because \
resizing the metadata might require moving data blocks. However, if a VHD was \
created with -S <msize> option (during vhd-util create/snapshot), which preallocates \
the metadata for growing the VHD up to size <msize>, then resizing such a VHD up to \
<msize> can be performed online without journaling (-f option).\n\
Note: only growing is supported; the -j journal is this vhd-util's own format \
(roll back an interrupted resize with vhd-util revert -n NAME -j JOURNAL).\n",
    to_stderr: false,
    h_fails: true,
};

pub const REVERT_USAGE: UsageSpec = UsageSpec {
    cmd: "revert",
    spec: "n:j:h",
    text: "options: <-n name> <-j journal> [-h help]\n",
    to_stderr: false,
    h_fails: true,
};

fn grow_fast(io: &mut Io, name: &str, bytes: u64) -> Result {
    let bs = 2u64 << 20;
    let Some(size) = bytes.div_ceil(bs).checked_mul(bs) else {
        return Err(Error::invalid(format!("size {bytes} too large")));
    };
    let img = common::open(name, true)?;
    let (curr, max) = (img.footer().curr_size, max_fast_resize_size(&img));
    drop(img);
    if size < curr {
        vout!(io, "{name}: size ({size}) < curr size ({curr})");
        return Err(Error::invalid(format!("{name}: cannot shrink")));
    }
    if size == curr {
        return Ok(());
    }
    if size > max {
        verr!(
            io,
            "not enough metadata space reserved for fast resize (up to {} MB)",
            max >> 20
        );
        return Err(Error::invalid(format!(
            "{name}: metadata space reserved for {} MB only",
            max >> 20
        )));
    }
    // The batmap checksum covers a prefix that grows with the virtual size, but the
    // map is zero past the old size, so the stored checksum stays right.
    resize_fast(Path::new(name), size).map_err(|e| {
        verr!(io, "{}", super::common::describe(&e));
        Error::from(e)
    })
}

pub fn run(io: &mut Io, args: &[String]) -> Result {
    let Some(p) = USAGE.parse(io, args)? else {
        return Ok(());
    };
    let (Some(name), Some(s)) = (p.value('n'), p.value('s')) else {
        return Err(USAGE.fail(io));
    };
    let (fast, journal) = (p.flag('f'), p.value('j'));
    if !p.operands.is_empty() || (!fast && journal.is_none()) || (fast && journal.is_some()) {
        return Err(USAGE.fail(io));
    }
    let mib = number(io, "size", s)?;
    let Some(bytes) = mib.checked_mul(1 << 20) else {
        vout!(io, "invalid size '{s}'");
        return Err(Error::invalid(format!("size {s} MiB too large")));
    };
    match common::open(name, true) {
        Err(e) => {
            vout!(io, "error opening {name}: {}", neg(&e));
            return Err(e.into());
        }
        Ok(img) => {
            if !img.footer().creator_is_tap() {
                vout!(io, "{name} not created by xen; resize not supported");
                return Err(Error::invalid(format!("{name}: not created by tapdisk")));
            }
            if img.disk_type() == DiskType::Fixed && fast {
                verr!(io, "{name}: fast resize of fixed disks is not supported");
                return Err(Error::invalid(format!(
                    "{name}: fast resize of a fixed disk"
                )));
            }
        }
    }
    if let Some(j) = journal {
        return journaled(io, name, j, mib);
    }
    grow_fast(io, name, bytes)
}

/// `resize -j`: journaled offline growth.
fn journaled(io: &mut Io, name: &str, jname: &str, mib: u64) -> Result {
    let img = common::open(name, true)?;
    let fixed = img.disk_type() == DiskType::Fixed;
    let curr = img.footer().curr_size;
    drop(img);
    let too_large = || Error::invalid(format!("size {mib} MiB too large"));
    let bytes = mib.checked_mul(1 << 20).ok_or_else(too_large)?;
    let size = if fixed {
        bytes
    } else {
        let bs = 2u64 << 20;
        bytes.div_ceil(bs).checked_mul(bs).ok_or_else(too_large)?
    };
    if size == curr {
        return Ok(());
    }
    if size < curr {
        vout!(io, "dynamic shrink not fully implemented");
        vout!(io, "resize failed: {}", -libc::ENOSYS);
        return Err(Error::os("shrink", Errno::ENOSYS));
    }
    let mut failed_at = None;
    let mut fail = |point: &str| {
        if journal::fail_point(point) {
            failed_at = Some(point.to_string());
            true
        } else {
            false
        }
    };
    let (path, jpath) = (Path::new(name), Path::new(jname));
    // Never reuse (or, on failure, roll back with) a journal we did not write.
    if jpath.symlink_metadata().is_ok() {
        vout!(io, "creating journal failed: {}", -libc::EEXIST);
        return Err(Error::os(jname, Errno::EEXIST));
    }
    let r = if fixed {
        journal::grow_fixed(path, jpath, size, &mut fail)
    } else {
        journal::grow(path, jpath, size, &mut fail)
    };
    match r {
        Ok(true) => Ok(()),
        Ok(false) => {
            // Simulated crash (blktap's TEST_FAIL_AT): stop here, journal left behind.
            let point = failed_at.unwrap_or_default();
            vout!(io, "Failing at {point}");
            Err(Error::invalid(format!("simulated failure at {point}")))
        }
        Err(e) => {
            vout!(io, "resize failed: {}", neg(&e));
            verr!(io, "{}", common::describe(&e));
            if jpath.exists() {
                if let Err(je) = journal::revert(path, jpath) {
                    vout!(io, "closing journal failed: {}", neg(&je));
                }
            }
            Err(e.into())
        }
    }
}

pub fn run_revert(io: &mut Io, args: &[String]) -> Result {
    let Some((_, [name, j])) = REVERT_USAGE.parse_required(io, args, ['n', 'j'])? else {
        return Ok(());
    };
    journal::revert(Path::new(&name), Path::new(&j)).map_err(|e| {
        vout!(io, "reverting journal failed: {}", neg(&e));
        verr!(io, "{}", common::describe(&e));
        Error::from(e)
    })
}
