//! `vhd-util repair -n NAME [-b]` (`vhd-util-repair.c`): rewrite both footer copies from
//! the footer that opens (the primary, else the backup; `-b`: the backup), giving it a
//! fresh uuid if it has a null one.

use super::cli::{OptsExt, UsageSpec, EINVAL};
use super::common::{self, neg};
use super::set::close;
use super::Io;
use crate::vout;

pub const USAGE: UsageSpec = UsageSpec {
    cmd: "repair",
    spec: "n:bh",
    text: "options: <-n name> <-b use the back-up footer> [-h help]\n",
    to_stderr: false,
    h_status: EINVAL,
};

pub fn run(io: &mut Io, args: &[String]) -> i32 {
    let p = match USAGE.parse(io, args) {
        Ok(p) => p,
        Err(s) => return s,
    };
    let Some(name) = p.value('n') else {
        return USAGE.fail(io, EINVAL);
    };
    if !p.operands.is_empty() {
        return USAGE.fail(io, EINVAL);
    }
    // Opening read-write puts a valid primary footer back at the end of the data when
    // only the backup (or the short footer) was usable.
    let img = match common::open_opts(name, false, p.flag('b')) {
        Ok(i) => i,
        Err(e) => {
            vout!(io, "error opening {name}: {}", neg(&e));
            return neg(&e);
        }
    };
    let r = img.update_footer(|f| {
        if f.uuid == [0; 16] {
            f.uuid = *uuid::Uuid::new_v4().as_bytes();
        }
    });
    let err = match r {
        Ok(()) => 0,
        Err(e) => {
            vout!(io, "error writing footer: {}", neg(&e));
            neg(&e)
        }
    };
    close(&img, err)
}
