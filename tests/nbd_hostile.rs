//! The real tapdisk (spawned by `tap-ctl create`) under hostile conditions that only a
//! separate process can set up. The wider scenarios run in `scripts/hostile-peers.sh`.

mod common;
use common::cmd::{success, tap_ctl};
use common::image::aio_raw;

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use blktap3::control::nbd_from_socket_name;
use blktap3::nbd::client::Client;

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let st = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = st.rsplit_once(')').unwrap().1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

fn prlimit_nofile(pid: i32, soft: usize) {
    let st = Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &format!("--nofile={soft}:")])
        .status()
        .unwrap();
    assert!(st.success(), "prlimit failed");
}

#[test]
fn out_of_descriptors_tapdisk_neither_spins_nor_stops_serving() {
    // An accept failing with EMFILE left the level-triggered listener in the epoll set: the
    // loop woke for ever (half a core, a warning per wakeup) while clients waited.
    let dir = tempfile::tempdir().unwrap();
    let ctl = dir.path().join("ctl");
    let params = aio_raw(dir.path(), "disk.raw", 4 << 20);
    let out = tap_ctl(&ctl, env!("CARGO_BIN_EXE_tapdisk"))
        .env("BLKTAP_NBD_DEVICE", "0")
        .args(["create", "-a", &params])
        .output()
        .unwrap();
    let sock = success("tap-ctl create", &out).trim().to_string();
    let (pid, _) = nbd_from_socket_name(&sock).unwrap_or_else(|| panic!("socket {sock}"));
    let mut served = Client::connect(Path::new(&sock), false).unwrap();
    prlimit_nofile(pid, open_fds(pid) + 2);
    let mut waiting = Vec::new();
    for _ in 0..8 {
        waiting.push(UnixStream::connect(&sock).unwrap());
    }
    std::thread::sleep(Duration::from_millis(300));
    let t0 = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(2));
    let ticks = cpu_ticks(pid) - t0;
    // A client already connected is served meanwhile.
    assert_eq!(served.read(0, 4096).unwrap(), Ok(vec![0u8; 4096]));
    prlimit_nofile(pid, 1024);
    // The waiting clients are taken once descriptors are available again (the next tick).
    use std::io::Read;
    let t = Instant::now();
    for s in &mut waiting {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut g = [0u8; 18];
        s.read_exact(&mut g).unwrap();
    }
    let took = t.elapsed();
    let _ = Command::new(env!("CARGO_BIN_EXE_tap-ctl"))
        .env("BLKTAP_CONTROL_DIR", &ctl)
        .args(["destroy", "-p", &pid.to_string(), "-m", "0"])
        .status();
    assert!(
        ticks < 30,
        "tapdisk used {ticks} clock ticks in 2 s with clients waiting for descriptors"
    );
    assert!(took < Duration::from_secs(4), "{took:?}");
}
