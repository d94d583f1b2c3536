//! `vhd-util`: blktap's VHD command-line tool, option- and output-compatible.
//!
//! Every command is a function `fn(&mut Io, &[String]) -> error::Result`: the error says
//! what failed and carries its cause ([`error::Error`]); [`main`] turns it into blktap's
//! exit status, the absolute value of the errno.
//! Options are parsed with getopt(3) semantics ([`crate::util::getopt`]); usage texts, messages and
//! output formats follow blktap's `vhd/vhd-util.c` and `vhd/lib/vhd-util-*.c` (and, for
//! `modify -t`, OpenXT's vhd-util). `src/bin/vhd-util.rs` only builds an [`Io`] over
//! stdout/stderr and calls [`main`]. `--debug` is accepted anywhere and ignored;
//! `COMMAND --help` prints that command's usage and exits 0 (blktap's getopt would reject
//! it); `vhd-util -h`/`--help`/`help` behave as blktap's: `invalid COMMAND -h` on stderr,
//! the usage on stdout, exit 0. The top-level usage lists blktap's commands only.
//!
//! | command | options | module |
//! |---|---|---|
//! | create | `-n -s MiB [-r] [-S MiB]` | [`create`] |
//! | snapshot | `-n -p [-l limit] [-m] [-S MiB] [-e] [-K]` | [`snapshot`] |
//! | query | `-n [-v] [-s] [-p] [-f] [-m] [-d] [-S] [-a] [-u]` | [`query`] |
//! | read | `-n [-p] [-t sec] [-b blk] [-B] [-m blk] [-i sec] [-e sec] [-a] [-j blk] [-d blk] [-c n] [-r sec] [-R byte] [-x] [-C] [-D]` | [`read`] |
//! | set | `-n -f hidden\|marker -v 0..255` | [`set`] |
//! | repair | `-n [-b]` | [`repair`] |
//! | resize | `-n -s MiB (-f \\| -j journal)` | [`resize`], [`journal`] |
//! | fill | `-n [-b [-f sec] [-t sec] [-B]]` | [`fill`] |
//! | coalesce | `-n [-a ancestor \| -o output] [-x parent] [-s] [-p]` | [`coalesce`] |
//! | modify | `-n [-p parent [-m]] [-s bytes] [-z] [-t type]` | [`modify`] |
//! | scan | `[-m glob] [-f] [-c] [-p] [-a] [-v] [-M] FILES` (`-l` refused) | [`scan`] |
//! | check | `-n [-i] [-I] [-t] [-p] [-b] [-B] [-s]` | [`check`] |
//! | revert | `-n -j journal` | [`resize`], [`journal`] |
//! | key | `-C -k [-N]`, `-s -n (-k\|-H) [-N]`, `-c -n -k`, `-p -n`, `-P pass -k -S salt [-i n]` | [`key`] |
//! | copy (extension) | `-n -N [-k keyfile\|-E]` | [`copy`] |
//!
//! Data-moving commands (coalesce, fill, copy, read -r/-R -D) go through the image layer
//! with keys from `TAPDISK3_CRYPTO_KEYDIR` (or `TAPDISK2_CRYPTO_KEYDIR`), so encrypted
//! chains are handled; a keyed layer without its key fails with ENOKEY before any write.
//! `read -r/-R` without `-D` print the stored bytes, as blktap does.
//! Long operations draw qemu-img style progress on stderr only when it is a terminal.
//!
//! Deliberate differences from blktap: sizes that are not plain decimal numbers are
//! refused (blktap reads them as 0); `create`/`snapshot` never overwrite an existing
//! file (EEXIST); `snapshot` does not copy the parent's keyhash unless `-K` (OpenXT 8);
//! `fill -b` leaves allocated blocks alone and refuses encrypted chains; `copy` makes a
//! standalone (flattened) copy; `key -s/-c` accept any key file name but require 32 or
//! 64 bytes; `scan -l` (LVM) is refused with EOPNOTSUPP; `resize -j` only grows and
//! its journal is not libvhd's format; timestamps in `read -p` are printed in UTC;
//! `read -p` prints numbers whole (OpenXT's cuts them to 14 characters); `read` names the
//! last requested block in "block N past end of file" (blktap the one after it) and
//! prints `-p`, `-r`, `-R` of fixed disks (blktap fails: no BAT).

pub mod chain;
pub mod check;
pub mod cli;
pub mod coalesce;
pub mod common;
pub mod copy;
pub mod create;
pub mod dump;
pub mod error;
pub mod fill;
pub mod glob;
pub mod journal;
pub mod key;
pub mod modify;
pub mod progress;
pub mod query;
pub mod read;
pub mod repair;
pub mod resize;
pub mod scan;
pub mod scanfmt;
pub mod set;
pub mod snapshot;

use std::io::Write;

/// Where a command writes, and whether a terminal is attached (for progress).
pub struct Io<'a> {
    pub out: &'a mut dyn Write,
    pub err: &'a mut dyn Write,
    /// stderr is a terminal: long operations draw qemu-img style progress there.
    pub err_is_tty: bool,
}

/// Write a line to stdout, ignoring write errors (as printf does).
#[macro_export]
#[doc(hidden)]
macro_rules! vout {
    ($io:expr, $($arg:tt)*) => {{
        let _ = writeln!($io.out, $($arg)*);
    }};
}

/// Write a line to stderr, ignoring write errors.
#[macro_export]
#[doc(hidden)]
macro_rules! verr {
    ($io:expr, $($arg:tt)*) => {{
        let _ = writeln!($io.err, $($arg)*);
    }};
}

/// A command entry point: `args` excludes the command name.
pub type CommandFn = fn(&mut Io, &[String]) -> error::Result;

/// One vhd-util command.
pub struct Command {
    pub name: &'static str,
    pub func: CommandFn,
}

/// The command table, in blktap's order (the usage line lists them in this order).
const fn cmd(name: &'static str, func: CommandFn) -> Command {
    Command { name, func }
}

pub const COMMANDS: &[Command] = &[
    cmd("create", create::run),
    cmd("snapshot", snapshot::run),
    cmd("query", query::run),
    cmd("read", read::run),
    cmd("set", set::run),
    cmd("repair", repair::run),
    cmd("resize", resize::run),
    cmd("fill", fill::run),
    cmd("coalesce", coalesce::run),
    cmd("modify", modify::run),
    cmd("scan", scan::run),
    cmd("check", check::run),
    cmd("revert", resize::run_revert),
    cmd("key", key::run),
    cmd("copy", copy::run),
];

/// Commands that blktap's vhd-util does not have.
pub const EXTENSIONS: &[&str] = &["copy"];

/// `usage: vhd-util COMMAND [OPTIONS]` and blktap's command list, byte for byte: the
/// extension `copy` is left out of this line (scripts parse it); `vhd-util copy -h`
/// describes it.
pub fn print_help(io: &mut Io) {
    let names: Vec<&str> = COMMANDS
        .iter()
        .map(|c| c.name)
        .filter(|&n| !EXTENSIONS.contains(&n))
        .collect();
    vout!(io, "usage: vhd-util COMMAND [OPTIONS]");
    vout!(io, "COMMAND := {{ {} }}", names.join(" | "));
}

/// Run vhd-util with `args` (without the program name). Returns the exit status.
pub fn main(io: &mut Io, args: &[String]) -> i32 {
    let Some(first) = args.first() else {
        print_help(io);
        return 0;
    };
    // Like blktap, `-h`, `--help` and `help` are no commands: "invalid COMMAND -h" on
    // stderr, then the usage on stdout, exit 0.
    let Some(cmd) = COMMANDS.iter().find(|c| c.name == first) else {
        verr!(io, "invalid COMMAND {first}");
        print_help(io);
        return 0;
    };
    // `--debug` may appear anywhere; blktap uses it to turn on libvhd logging.
    let rest: Vec<String> = args[1..]
        .iter()
        .filter(|a| a.as_str() != "--debug")
        .cloned()
        .collect();
    let ret = (cmd.func)(io, &rest);
    let _ = io.out.flush();
    match ret {
        Ok(()) => 0,
        Err(e) => {
            log::debug!("vhd-util {}: {}", cmd.name, crate::util::error_chain(&e));
            e.errno()
        }
    }
}
