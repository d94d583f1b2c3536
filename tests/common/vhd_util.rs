//! Helpers shared by the vhd-util integration tests: run the built binary, make temp
//! directories and key files.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub struct Out {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
    pub raw: Vec<u8>,
}

/// vhd-util coalesce's usage line.
pub const COALESCE_USAGE: &str =
    "options: <-n name> [-a ancestor] [-o output] [-s sparse] [-p progress] \
     [-x custom parent] [-h help]\n";

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_vhd-util")
}

/// Run vhd-util with `args` and optional environment overrides.
pub fn run_env(args: &[&str], env: &[(&str, &str)]) -> Out {
    let mut c = Command::new(bin());
    c.args(args).stdin(Stdio::null());
    c.env_remove("TAPDISK3_CRYPTO_KEYDIR");
    c.env_remove("TAPDISK2_CRYPTO_KEYDIR");
    for (k, v) in env {
        c.env(k, v);
    }
    let o = c.output().expect("run vhd-util");
    Out {
        status: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        raw: o.stdout,
    }
}

pub fn run(args: &[&str]) -> Out {
    run_env(args, &[])
}

/// Run and require exit status 0; returns stdout.
pub fn ok(args: &[&str]) -> String {
    let o = run(args);
    assert_eq!(
        o.status, 0,
        "vhd-util {args:?} failed: stdout={:?} stderr={:?}",
        o.stdout, o.stderr
    );
    o.stdout
}

pub fn tmpdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

pub fn p(dir: &Path, name: &str) -> String {
    dir.join(name).to_string_lossy().into_owned()
}

pub fn path(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

/// Write a key file with bytes 0..n.
pub fn keyfile(dir: &Path, name: &str, n: u8) -> String {
    let k: Vec<u8> = (0..n).collect();
    let f = dir.join(name);
    std::fs::write(&f, k).unwrap();
    f.to_string_lossy().into_owned()
}

/// Whether `prog` runs (peer tools are optional on some machines).
pub fn have(prog: &str) -> bool {
    Command::new(prog)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Run a peer tool, returning (status, stdout+stderr).
pub fn peer(prog: &str, args: &[&str]) -> (i32, String) {
    let o = Command::new(prog).args(args).output().expect("run peer");
    let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&o.stderr));
    (o.status.code().unwrap_or(-1), s)
}

/// Big-endian u32 / u64 at `off` of a file.
pub fn be32(f: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(f[off..off + 4].try_into().unwrap())
}
pub fn be64(f: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(f[off..off + 8].try_into().unwrap())
}

/// Runs vhd-util with `args`; asserts its exit status and its whole stdout.
pub fn expect_stdout(args: &[&str], status: i32, stdout: &str) {
    let o = run(args);
    assert_eq!(
        (o.status, o.stdout.as_str()),
        (status, stdout),
        "vhd-util {args:?} (stderr {:?})",
        o.stderr
    );
}

/// Runs vhd-util with `args`; asserts its exit status and its whole stderr.
pub fn expect_stderr(args: &[&str], status: i32, stderr: &str) {
    let o = run(args);
    assert_eq!(
        (o.status, o.stderr.as_str()),
        (status, stderr),
        "vhd-util {args:?} (stdout {:?})",
        o.stdout
    );
}

/// Runs vhd-util with `args`; asserts its exit status and that its stdout starts with `start`.
pub fn expect_stdout_start(args: &[&str], status: i32, start: &str) {
    let o = run(args);
    assert!(
        o.status == status && o.stdout.starts_with(start),
        "vhd-util {args:?}: status {} (want {status}), stdout {:?} (want it to start with {start:?})",
        o.status,
        o.stdout
    );
}
