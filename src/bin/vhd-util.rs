//! vhd-util: create, inspect, snapshot, coalesce and key VHD images (blktap compatible).
//! A thin main: all logic lives in `blktap3::vhdutil`.

use std::io::IsTerminal;

fn main() {
    let args: Vec<String> = std::env::args_os()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    let err_is_tty = stderr.is_terminal();
    let mut out = stdout.lock();
    let mut err = stderr.lock();
    let mut io = blktap3::vhdutil::Io {
        out: &mut out,
        err: &mut err,
        err_is_tty,
    };
    let status = blktap3::vhdutil::main(&mut io, &args);
    drop(out);
    std::process::exit(status);
}
