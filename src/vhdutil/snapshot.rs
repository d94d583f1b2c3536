//! `vhd-util snapshot -n NAME -p PARENT [-l LIMIT] [-m] [-S MiB] [-e] [-K]`
//! (`vhd-util-snapshot.c`).
//!
//! By default empty differencing ancestors are skipped (the child links to the first
//! non-empty one, keeping the supplied parent's size); `-e` links to exactly PARENT.
//! Key hashes: OpenXT 8 behaviour by default, the child gets NO keyhash (it inherits the
//! nearest keyed ancestor's key at open); `-K` (extension) copies the parent's keyhash
//! like upstream blktap since 2018.

use std::path::{Path, PathBuf};

use super::cli::strtol;
use super::cli::{number, OptsExt, UsageSpec};
use super::common::{self, neg};
use super::error::{Error, Result};
use super::Io;
use crate::image::chain::chain_depth;
use crate::image::vhd::ops::{snapshot, snapshot_target, SnapshotOptions};
use crate::{verr, vout};

pub const USAGE: UsageSpec = UsageSpec {
    cmd: "snapshot",
    spec: "n:p:S:l:meKh",
    text: "options: <-n name> <-p parent name> [-l snapshot depth limit] \
[-m parent_is_raw] [-S size (MB) for metadata preallocation \
(see vhd-util resize)] [-e link to supplied parent name even \
if it's empty] [-h help]\n\
extension: [-K copy the parent's keyhash into the snapshot (upstream blktap behaviour; \
the default, as in OpenXT 8, leaves the snapshot without a keyhash so it uses the \
nearest keyed ancestor's key)]\n",
    to_stderr: false,
    h_fails: false,
};

pub fn run(io: &mut Io, args: &[String]) -> Result {
    let Some(p) = USAGE.parse(io, args)? else {
        return Ok(());
    };
    let (Some(name), Some(pname)) = (p.value('n'), p.value('p')) else {
        return Err(USAGE.fail(io));
    };
    if !p.operands.is_empty() {
        return Err(USAGE.fail(io));
    }
    let msize = p.value('S').map(|v| number(io, "size", v)).transpose()?;
    let limit = p.value('l').map(strtol).unwrap_or(0);
    let raw = p.flag('m');
    let exact = p.flag('e');
    let ppath = common::canonpath(pname)?;

    if limit != 0 && !raw {
        let depth = (if exact {
            Ok((PathBuf::from(&ppath), false))
        } else {
            snapshot_target(Path::new(&ppath))
        })
        .and_then(|(t, traw)| {
            if traw {
                Ok(None)
            } else {
                chain_depth(&t).map(Some)
            }
        });
        match depth {
            Err(e) => {
                vout!(io, "error checking snapshot depth: {}", neg(&e));
                return Err(e.into());
            }
            Ok(Some(d)) if i64::from(d) + 1 > limit => {
                vout!(
                    io,
                    "snapshot depth exceeded: current depth: {d}, limit: {limit}"
                );
                return Err(Error::os(
                    format!("snapshot depth {d} exceeds limit {limit}"),
                    nix::errno::Errno::ENOSPC,
                ));
            }
            Ok(_) => {}
        }
    }

    let msize_bytes = match msize.map(super::create::mib_to_block_bytes) {
        Some(None) => return Err(USAGE.fail(io)),
        Some(Some(b)) if b > 0 => Some(b),
        _ => None,
    };
    let opts = SnapshotOptions {
        raw_parent: raw,
        link_exact: exact,
        depth_limit: None,
        max_size: msize_bytes,
        copy_keyhash: p.flag('K'),
    };
    match snapshot(Path::new(name), Path::new(&ppath), &opts) {
        Ok(_) => Ok(()),
        Err(e) => {
            verr!(io, "{}", super::common::describe(&e));
            Err(e.into())
        }
    }
}
