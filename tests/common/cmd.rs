//! Running programs: the built `tap-ctl`, and any command whose success a test requires.

use std::ffi::OsStr;
use std::fmt::Debug;
use std::path::Path;
use std::process::{Command, Output};

/// The stdout of `out`, asserting that the command (`what`) exited with status 0; the failure
/// message shows the status, stdout and stderr.
pub fn success(what: impl Debug, out: &Output) -> String {
    assert!(
        out.status.success(),
        "{what:?} failed: {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `cmd` to completion and returns its stdout, asserting it succeeded.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    success(&cmd, &out)
}

/// The built `tap-ctl` on control directory `ctl`, spawning `tapdisk` for new VBDs.
pub fn tap_ctl(ctl: &Path, tapdisk: impl AsRef<OsStr>) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tap-ctl"));
    c.env("BLKTAP_CONTROL_DIR", ctl)
        .env("BLKTAP_TAPDISK", tapdisk);
    c
}

/// `qemu-io -f raw <uri> -c <cmd>...`.
pub fn qemu_io(uri: &str, cmds: &[&str]) -> Command {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", uri]);
    for x in cmds {
        c.args(["-c", x]);
    }
    c
}
