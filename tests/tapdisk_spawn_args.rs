//! The spawning tapdisk passes its arguments to the daemon child unchanged, including ones
//! that are not UTF-8 (a path may be any bytes).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn a_non_utf8_pidfile_path_reaches_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join(OsStr::from_bytes(b"pid-\xff.txt"));
    let out = Command::new(env!("CARGO_BIN_EXE_tapdisk"))
        .arg("--pidfile")
        .arg(&pidfile)
        .env("BLKTAP_CONTROL_DIR", dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{:?}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8(out.stdout).unwrap();
    assert!(
        line.trim_end()
            .starts_with(&dir.path().display().to_string()),
        "{line}"
    );
    // The daemon wrote the pidfile under the exact name; stop it with SIGTERM.
    let deadline = Instant::now() + Duration::from_secs(10);
    let pid = loop {
        if let Ok(s) = std::fs::read_to_string(&pidfile) {
            if let Ok(p) = s.trim().parse::<i32>() {
                break p;
            }
        }
        assert!(Instant::now() < deadline, "no pidfile");
        std::thread::sleep(Duration::from_millis(10));
    };
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGTERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while pidfile.exists() {
        assert!(Instant::now() < deadline, "daemon did not stop");
        std::thread::sleep(Duration::from_millis(10));
    }
}
