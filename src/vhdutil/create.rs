//! `vhd-util create -n NAME -s MiB [-r] [-S MiB]` (`vhd-util-create.c`).
//!
//! Sizes are rounded up to whole 2 MiB blocks as libvhd does. Unlike blktap, an existing
//! file is never overwritten (EEXIST), and a size that is not a plain number is refused.

use std::path::Path;

use super::cli::{number, OptsExt, UsageSpec};
use super::common::neg;
use super::error::{Error, Result};
use super::Io;
use crate::image::vhd::format::DEFAULT_BLOCK_SIZE;
use crate::image::vhd::ops::{create, CreateOptions};
use crate::{verr, vout};

pub const USAGE: UsageSpec = UsageSpec {
    cmd: "create",
    spec: "n:s:S:rh",
    text: "options: <-n name> <-s size (MB)> [-r reserve] [-h help] \
[<-S size (MB) for metadata preallocation (see vhd-util resize)>]\n",
    to_stderr: false,
    h_fails: true,
};

/// MiB to bytes rounded up to whole 2 MiB blocks; `None` on overflow.
pub fn mib_to_block_bytes(mib: u64) -> Option<u64> {
    let bytes = mib.checked_mul(1 << 20)?;
    let bs = u64::from(DEFAULT_BLOCK_SIZE);
    bytes.checked_add(bs - 1).map(|b| b / bs * bs)
}

pub fn run(io: &mut Io, args: &[String]) -> Result {
    let Some((p, [name, s])) = USAGE.parse_required(io, args, ['n', 's'])? else {
        return Ok(());
    };
    let (name, s) = (name.as_str(), s.as_str());
    let size = number(io, "size", s)?;
    let msize = p
        .value('S')
        .map(|v| number(io, "size", v))
        .transpose()?
        .unwrap_or(0);
    if msize != 0 && msize < size {
        vout!(io, "Error: <-S size> must be greater than <-s size>");
        return Err(Error::invalid("-S size smaller than -s size"));
    }
    let (Some(bytes), Some(mbytes)) = (mib_to_block_bytes(size), mib_to_block_bytes(msize)) else {
        vout!(io, "invalid size '{s}'");
        return Err(Error::invalid(format!("size {s} MiB too large")));
    };
    let fixed = p.flag('r');
    let opts = CreateOptions {
        size: bytes,
        fixed,
        block_size: DEFAULT_BLOCK_SIZE,
        max_size: (mbytes != 0 && !fixed).then_some(mbytes),
    };
    create(Path::new(name), &opts).map_err(|e| {
        verr!(io, "{name}: failed to create: {}", neg(&e));
        verr!(io, "{}", super::common::describe(&e));
        e.into()
    })
}
