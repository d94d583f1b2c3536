//! `vhd-util`: blktap's VHD command-line tool, option- and output-compatible.
//!
//! Every command is a function `fn(&mut Io, &[String]) -> i32` returning blktap's
//! status convention: 0, or a negative errno (the binary exits with its absolute value).
//! Options are parsed with getopt semantics ([`getopt`]), messages and output formats
//! follow blktap's `vhd/lib/vhd-util-*.c` (see the per-command modules). The binary in
//! `src/bin/vhd-util.rs` only builds an [`Io`] over stdout/stderr and calls [`main`].

pub mod chain;
pub mod check;
pub mod cli;
pub mod coalesce;
pub mod common;
pub mod copy;
pub mod create;
pub mod dump;
pub mod fill;
pub mod getopt;
pub mod glob;
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
pub type CommandFn = fn(&mut Io, &[String]) -> i32;

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

/// `usage: vhd-util COMMAND [OPTIONS]` and the command list.
pub fn print_help(io: &mut Io) {
    let names: Vec<&str> = COMMANDS.iter().map(|c| c.name).collect();
    vout!(io, "usage: vhd-util COMMAND [OPTIONS]");
    vout!(io, "COMMAND := {{ {} }}", names.join(" | "));
}

/// Run vhd-util with `args` (without the program name). Returns the exit status.
pub fn main(io: &mut Io, args: &[String]) -> i32 {
    let Some(first) = args.first() else {
        print_help(io);
        return 0;
    };
    if matches!(first.as_str(), "--help" | "-h" | "help") {
        print_help(io);
        return 0;
    }
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
    ret.checked_abs().unwrap_or(i32::MAX)
}
