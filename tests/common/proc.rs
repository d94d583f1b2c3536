//! Waiting for processes (tapdisks) to go away.

use std::time::{Duration, Instant};

/// Whether a process `pid` exists (an unreaped zombie still does).
pub fn alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

/// Polls `done` until it holds or `within` has passed; whether it held.
fn poll(within: Duration, mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < within {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// Whether `pid` is gone altogether (exited and reaped) within `within`. For daemonised
/// tapdisks, which are not this process's children.
pub fn wait_gone(pid: i32, within: Duration) -> bool {
    poll(within, || !alive(pid))
}

/// Whether `pid` has exited within 5 s: gone, or a zombie its parent has not reaped yet. For
/// tapdisks this test process spawned itself, which stay zombies until it waits for them.
pub fn wait_exited(pid: i32) -> bool {
    poll(Duration::from_secs(5), || {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        state.is_empty() || state.contains(") Z")
    })
}
