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

/// A foreground tapdisk (`-D`, logging to stderr) whose stderr cannot be written (a file on
/// a full disk, here `/dev/full`: every write fails with ENOSPC) keeps running: a failed log
/// line is dropped, never a panic (eprintln! would panic and take every disk down with it).
#[test]
fn a_full_stderr_does_not_kill_a_foreground_tapdisk() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tapdisk"))
        .arg("-D")
        .arg("--debug")
        .arg("--pidfile")
        .arg(&pidfile)
        .env("BLKTAP_CONTROL_DIR", dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(full)
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pidfile.exists() {
        if let Some(st) = child.try_wait().unwrap() {
            panic!("tapdisk exited at start-up with {st:?}");
        }
        assert!(Instant::now() < deadline, "no pidfile");
        std::thread::sleep(Duration::from_millis(10));
    }
    // It logged (debug and info lines at start-up) and is still serving.
    std::thread::sleep(Duration::from_millis(200));
    assert!(child.try_wait().unwrap().is_none(), "tapdisk died");
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::SIGTERM).unwrap();
    let st = child.wait().unwrap();
    assert!(st.success(), "{st:?}");
}
