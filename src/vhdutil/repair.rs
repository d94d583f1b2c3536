//! `vhd-util repair -n NAME [-b]` (`vhd-util-repair.c`): rewrite both footer copies from
//! the footer that opens (the primary, else the backup; `-b`: the backup), giving it a
//! fresh uuid if it has a null one.

use super::cli::{OptsExt, UsageSpec};
use super::common::{self, neg};
use super::error::{Error, Result};
use super::Io;
use crate::image::vhd::ops::repair;
use crate::vout;
use std::path::Path;

pub const USAGE: UsageSpec = UsageSpec {
    cmd: "repair",
    spec: "n:bh",
    text: "options: <-n name> <-b use the back-up footer> [-h help]\n",
    to_stderr: false,
    h_fails: true,
};

pub fn run(io: &mut Io, args: &[String]) -> Result {
    let Some((p, name)) = USAGE.parse_named(io, args)? else {
        return Ok(());
    };
    let name = name.as_str();
    // Open once read-only for blktap's "error opening" message, then let the engine
    // rewrite both footers (primary at the end of the data, backup at 0).
    if let Err(e) = common::open_opts(name, true, p.flag('b')) {
        vout!(io, "error opening {name}: {}", neg(&e));
        return Err(e.into());
    }
    repair(Path::new(name), p.flag('b')).map_err(|e| {
        vout!(io, "error writing footer: {}", neg(&e));
        Error::from(e)
    })
}
