//! `tap-ctl`: control tapdisks (blktap-compatible command line). See `tapctl`.

use std::io::{self, IsTerminal, Write};

use blktap3::tapctl::{run, strip_debug, CliIo};
use blktap3::util::logging::{self, LogOptions};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (args, debug) = strip_debug(&args);
    if debug {
        logging::init(&LogOptions::stderr_only("tap-ctl", log::LevelFilter::Debug));
    }
    let stdout = io::stdout();
    let tty = stdout.is_terminal();
    let mut out = stdout.lock();
    let mut err = io::stderr();
    let mut inp = io::stdin();
    let status = {
        let mut cli = CliIo {
            stdout: &mut out,
            stderr: &mut err,
            stdin: &mut inp,
            tty,
        };
        run(&args, &mut cli)
    };
    let _ = out.flush();
    drop(out);
    std::process::exit(status);
}
