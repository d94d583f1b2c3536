//! A tapdisk killed with SIGKILL leaves its control socket, its NBD socket and its minor's
//! marker file behind. The real `tap-ctl` must recover: `list` still answers (showing the
//! orphaned minor, without hanging on the dead socket), `free` releases the minor (the
//! kernel dropped the dead process's flock), and `create` serves the disk again; `destroy`
//! of the dead tapdisk's VBDs frees them and removes the socket files it left.

mod common;
use common::cmd::{qemu_io, success, tap_ctl};
use common::image::aio_raw;
use common::proc::wait_gone;

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

/// `(pid, minor)` of the `list` row serving `path` (non-TTY `key=value` format).
fn row_for(list: &str, path: &str) -> Option<(Option<i32>, Option<u16>)> {
    list.lines().find(|l| l.contains(path)).map(|l| {
        let field = |k: &str| {
            l.split_whitespace()
                .find_map(|f| f.strip_prefix(&format!("{k}=")).map(str::to_owned))
        };
        (
            field("pid").and_then(|v| v.parse().ok()),
            field("minor").and_then(|v| v.parse().ok()),
        )
    })
}

fn wait_dead(pid: i32) {
    assert!(
        wait_gone(pid, Duration::from_secs(5)),
        "pid {pid} did not die"
    );
}

fn run(ctl: &Path, args: &[&str]) -> Output {
    tap_ctl(ctl, env!("CARGO_BIN_EXE_tapdisk"))
        .args(args)
        .output()
        .expect("run tap-ctl")
}

/// `tap-ctl args`'s stdout; it must succeed.
fn ok(ctl: &Path, args: &[&str]) -> String {
    success(("tap-ctl", args), &run(ctl, args))
}

#[test]
fn tap_ctl_recovers_after_tapdisk_is_killed() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = dir.path().join("ctl");
    let img = dir.path().join("disk.raw");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    let params = format!("aio:{}", img.display());

    let dev = ok(&ctl, &["create", "-a", &params]);
    assert!(
        Path::new(dev.trim()).exists(),
        "device {dev:?} does not exist"
    );
    let list = ok(&ctl, &["list"]);
    let (pid, minor) = row_for(&list, img.to_str().unwrap()).expect("row for the disk");
    let (pid, minor) = (pid.expect("pid"), minor.expect("minor"));

    // The minor is locked while its tapdisk lives: free must refuse.
    let busy = run(&ctl, &["free", "-m", &minor.to_string()]);
    assert!(
        !busy.status.success(),
        "free succeeded while the tapdisk held the minor"
    );

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_dead(pid);
    assert!(
        ctl.join(format!("ctl{pid}")).exists(),
        "a SIGKILLed tapdisk cannot remove its socket: the stale file is the point of this test"
    );

    // list answers, shows the orphaned minor without a pid, and does not hang.
    let start = Instant::now();
    let list = ok(&ctl, &["list"]);
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "list hung on a dead tapdisk"
    );
    assert!(
        list.lines().any(|l| l.trim() == format!("minor={minor}")),
        "orphaned minor not listed: {list:?}"
    );
    assert!(
        !list.contains(&format!("pid={pid}")),
        "dead pid listed: {list:?}"
    );

    // The dead process's flock is gone: free works, and create serves the disk again.
    ok(&ctl, &["free", "-m", &minor.to_string()]);
    let dev = ok(&ctl, &["create", "-a", &params]);
    let list = ok(&ctl, &["list"]);
    let (pid2, minor2) = row_for(&list, img.to_str().unwrap()).expect("row after re-create");
    let (pid2, minor2) = (pid2.expect("pid"), minor2.expect("minor"));
    assert_ne!(pid2, pid);
    let uri = format!("nbd+unix:///?socket={}", dev.trim());
    let out = qemu_io(&uri, &["write -P 0x77 0 64k", "read -P 0x77 0 64k"])
        .output()
        .expect("qemu-io (install qemu-utils)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("fail"),
        "I/O after recovery: {text}"
    );
    ok(
        &ctl,
        &[
            "destroy",
            "-p",
            &pid2.to_string(),
            "-m",
            &minor2.to_string(),
        ],
    );
    wait_dead(pid2);
    let list = ok(&ctl, &["list"]);
    assert!(list.trim().is_empty(), "left over after destroy: {list:?}");
}

#[test]
fn destroy_of_a_killed_tapdisk_frees_its_minor_and_removes_its_sockets() {
    let dir = tempfile::tempdir().unwrap();
    let ctl = dir.path().join("ctl");
    let params = ["a.raw", "b.raw"].map(|name| aio_raw(dir.path(), name, 4 << 20));
    // One tapdisk with two VBDs: spawn, then attach and open the second minor in it.
    ok(&ctl, &["create", "-a", &params[0]]);
    let list = ok(&ctl, &["list"]);
    let path0 = params[0].trim_start_matches("aio:");
    let (pid, minor) = row_for(&list, path0).expect("row for the first disk");
    let (pid, minor) = (pid.expect("pid"), minor.expect("minor"));
    // allocate prints the new minor's tapdev path: the minor is its trailing number.
    let dev2 = ok(&ctl, &["allocate"]);
    let digits = dev2.trim().len()
        - dev2
            .trim()
            .trim_end_matches(|c: char| c.is_ascii_digit())
            .len();
    let minor2: u16 = dev2.trim()[dev2.trim().len() - digits..]
        .parse()
        .unwrap_or_else(|e| panic!("allocate printed {dev2:?}: {e}"));
    ok(
        &ctl,
        &["attach", "-p", &pid.to_string(), "-m", &minor2.to_string()],
    );
    ok(
        &ctl,
        &[
            "open",
            "-p",
            &pid.to_string(),
            "-m",
            &minor2.to_string(),
            "-a",
            &params[1],
        ],
    );
    let ctl_sock = ctl.join(format!("ctl{pid}"));
    let nbd = |m: u16| ctl.join(format!("nbd{pid}.{m}"));
    assert!(
        nbd(minor).exists() && nbd(minor2).exists(),
        "both exports listen"
    );

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_dead(pid);

    // The first destroy removes its export; the control socket stays while another export
    // of the dead tapdisk is left.
    ok(
        &ctl,
        &["destroy", "-p", &pid.to_string(), "-m", &minor.to_string()],
    );
    assert!(!nbd(minor).exists(), "the dead export's socket is left");
    assert!(
        nbd(minor2).exists(),
        "another minor's socket went with the wrong destroy"
    );
    assert!(ctl_sock.exists());
    // The last one removes the control socket too, and every minor is free.
    ok(
        &ctl,
        &["destroy", "-p", &pid.to_string(), "-m", &minor2.to_string()],
    );
    assert!(!nbd(minor2).exists());
    assert!(
        !ctl_sock.exists(),
        "the dead tapdisk's control socket is left"
    );
    let list = ok(&ctl, &["list"]);
    assert!(list.trim().is_empty(), "left over after destroy: {list:?}");
}
