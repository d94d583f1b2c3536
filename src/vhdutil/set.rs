//! `vhd-util set -n NAME -f hidden|marker -v 0..255` (`vhd-util-set-field.c`).

use super::cli::strtol;
use super::cli::UsageSpec;
use super::common::{self, neg};
use super::error::{Error, Result};
use super::Io;
use crate::vout;

pub const USAGE: UsageSpec = UsageSpec {
    cmd: "set",
    spec: "n:f:v:h",
    text: "options: <-n name> <-f field> <-v value> [-h help]\n",
    to_stderr: false,
    h_fails: true,
};

pub fn run(io: &mut Io, args: &[String]) -> Result {
    let Some((_, [name, field, v])) = USAGE.parse_required(io, args, ['n', 'f', 'v'])? else {
        return Ok(());
    };
    let (name, field, v) = (name.as_str(), field.as_str(), v.as_str());
    if field.len() >= 25 {
        vout!(io, "invalid field");
        return Err(USAGE.fail(io));
    }
    if field != "hidden" && field != "marker" {
        vout!(io, "invalid field {field}");
        return Err(USAGE.fail(io));
    }
    let value = strtol(v);
    if !(0..=255).contains(&value) {
        vout!(io, "invalid value {value}");
        return Err(USAGE.fail(io));
    }
    let value = value as u8;
    let img = match common::open(name, false) {
        Ok(i) => i,
        Err(e) => {
            vout!(io, "error opening {name}: {}", neg(&e));
            return Err(e.into());
        }
    };
    let r = if field == "hidden" {
        match img.set_hidden(value) {
            // No space for the primary footer: at least mark the backup copy, so the
            // storage manager can still find and delete the hidden node (blktap).
            Err(e)
                if e.errno() == libc::ENOSPC
                    && value != 0
                    && img.disk_type() != crate::image::vhd::format::DiskType::Fixed =>
            {
                let mut f = img.footer();
                f.hidden = value;
                img.write_raw(&f.encode(), 0)
            }
            r => r,
        }
    } else {
        img.set_marker(value)
    };
    let ret = r.map_err(Error::from);
    common::close_rw(&img, ret)
}
