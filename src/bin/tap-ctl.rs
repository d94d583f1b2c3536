//! `tap-ctl`: control tapdisks (blktap-compatible command line). See `control::tapctl`.

use std::io::{self, IsTerminal, Write};

use blktap3::control::tapctl::{run, strip_debug, CliIo};

/// Minimal stderr logger for `--debug`.
struct StderrLog;

impl log::Log for StderrLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, r: &log::Record<'_>) {
        eprintln!("{}: {}", r.level().as_str().to_lowercase(), r.args());
    }
    fn flush(&self) {}
}

static LOGGER: StderrLog = StderrLog;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (args, debug) = strip_debug(&args);
    if debug && log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(log::LevelFilter::Debug);
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
