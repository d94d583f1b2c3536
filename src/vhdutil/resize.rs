//! `vhd-util resize -n NAME -s MiB -f` (fast grow within the `-S` preallocation,
//! `vhd-util-resize.c` `vhd_dynamic_grow_fast`) and `vhd-util revert`.
//!
//! Journaled resize (`-j`) and `revert` (which rolls back an interrupted journaled
//! resize) are NOT implemented: both are refused with EOPNOTSUPP and a clear message.
//! Create or snapshot with `-S` to allow a later `resize -f`.

use super::cli::{number, OptsExt, UsageSpec, EINVAL};
use super::common::{self, neg};
use super::Io;
use crate::image::vhd::format::DiskType;
use crate::image::vhd::ops::{max_fast_resize_size, resize_fast};
use crate::{verr, vout};
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
Note: this vhd-util implements only -f; journaled resize (-j) is not supported.\n",
    to_stderr: false,
    h_status: EINVAL,
};

pub const REVERT_USAGE: UsageSpec = UsageSpec {
    cmd: "revert",
    spec: "n:j:h",
    text: "options: <-n name> <-j journal> [-h help]\n\
Note: journaled resize is not supported by this vhd-util, so there is nothing to revert.\n",
    to_stderr: false,
    h_status: EINVAL,
};

fn grow_fast(io: &mut Io, name: &str, bytes: u64) -> i32 {
    let bs = 2u64 << 20;
    let Some(size) = bytes.div_ceil(bs).checked_mul(bs) else {
        return EINVAL;
    };
    let (curr, max) = match common::open(name, true) {
        Ok(img) => (img.footer().curr_size, max_fast_resize_size(&img)),
        Err(e) => return neg(&e),
    };
    if size < curr {
        vout!(io, "{name}: size ({size}) < curr size ({curr})");
        return EINVAL;
    }
    if size == curr {
        return 0;
    }
    if size > max {
        verr!(
            io,
            "not enough metadata space reserved for fast resize (up to {} MB)",
            max >> 20
        );
        return EINVAL;
    }
    // The batmap checksum covers a prefix that grows with the virtual size, but the
    // map is zero past the old size, so the stored checksum stays right.
    match resize_fast(Path::new(name), size) {
        Ok(()) => 0,
        Err(e) => {
            verr!(io, "{}", super::common::describe(&e));
            neg(&e)
        }
    }
}

pub fn run(io: &mut Io, args: &[String]) -> i32 {
    let p = match USAGE.parse(io, args) {
        Ok(p) => p,
        Err(s) => return s,
    };
    let (Some(name), Some(s)) = (p.value('n'), p.value('s')) else {
        return USAGE.fail(io, EINVAL);
    };
    let (fast, journal) = (p.flag('f'), p.value('j'));
    if !p.operands.is_empty() || (!fast && journal.is_none()) || (fast && journal.is_some()) {
        return USAGE.fail(io, EINVAL);
    }
    let mib = match number(io, "size", s) {
        Ok(v) => v,
        Err(e) => return e,
    };
    let Some(bytes) = mib.checked_mul(1 << 20) else {
        vout!(io, "invalid size '{s}'");
        return EINVAL;
    };
    match common::open(name, true) {
        Err(e) => {
            vout!(io, "error opening {name}: {}", neg(&e));
            return neg(&e);
        }
        Ok(img) => {
            if !img.footer().creator_is_tap() {
                vout!(io, "{name} not created by xen; resize not supported");
                return EINVAL;
            }
            if img.disk_type() == DiskType::Fixed && fast {
                verr!(io, "{name}: fast resize of fixed disks is not supported");
                return EINVAL;
            }
        }
    }
    if journal.is_some() {
        verr!(
            io,
            "resize: journaled resize (-j) is not supported by this vhd-util; \
             create the VHD with -S and use -f"
        );
        return -libc::EOPNOTSUPP;
    }
    grow_fast(io, name, bytes)
}

pub fn run_revert(io: &mut Io, args: &[String]) -> i32 {
    let p = match REVERT_USAGE.parse(io, args) {
        Ok(p) => p,
        Err(s) => return s,
    };
    if p.value('n').is_none() || p.value('j').is_none() || !p.operands.is_empty() {
        return REVERT_USAGE.fail(io, EINVAL);
    }
    verr!(
        io,
        "revert: journaled resize is not supported by this vhd-util, so there is no journal to revert"
    );
    -libc::EOPNOTSUPP
}
