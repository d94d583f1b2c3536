//! `tap-ctl` end to end against a fake tapdisk (harness = false).
//!
//! With `FAKE_TAPDISK=1` in the environment this executable *is* a small tapdisk: it dups
//! stdout, daemonises, binds `<dir>/ctl<pid>`, prints the socket path on the saved stdout and
//! serves the control protocol with in-memory VBDs (holding marker locks like tapdisk), exiting
//! after its last VBD is detached. Otherwise it runs the tests, pointing `BLKTAP_TAPDISK` at
//! itself.

mod common;
use common::cmd::tap_ctl;
use common::proc::{alive, wait_gone};

use std::collections::BTreeMap;
use std::io::Write;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use blktap3::control::client::Client;
use blktap3::control::minors::{self, MarkerLock};
use blktap3::control::msg::{DiskInfo, ListEntry, OpenFlags, Reply, Request, VbdState};
use blktap3::control::server::ControlServer;
use blktap3::control::{control_dir, nbd_socket_path};

struct Vbd {
    _lock: MarkerLock,
    params: Option<String>,
    state: VbdState,
    info: DiskInfo,
    keyed: bool,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn fake_tapdisk() -> i32 {
    let saved = std::io::stdout()
        .as_fd()
        .try_clone_to_owned()
        .expect("dup stdout");
    if nix::unistd::daemon(true, false).is_err() {
        return 1;
    }
    let dir = control_dir();
    let pid = nix::unistd::getpid().as_raw();
    let server = match ControlServer::bind(&dir, pid) {
        Ok(s) => s,
        Err(_) => return 1,
    };
    {
        let mut out = std::fs::File::from(saved);
        let _ = writeln!(out, "{}", server.path().display());
    }
    // Never outlive a forgotten test by much.
    let last = Arc::new(AtomicU64::new(now_secs()));
    let l2 = Arc::clone(&last);
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_secs(1));
        if now_secs() > l2.load(Ordering::Relaxed) + 60 {
            std::process::exit(2);
        }
    });
    let mut vbds: BTreeMap<u16, Vbd> = BTreeMap::new();
    let mut attached_once = false;
    loop {
        let served = server.serve_one(&mut |req| {
            last.store(now_secs(), Ordering::Relaxed);
            handle(&dir, pid, &mut vbds, &mut attached_once, req)
        });
        if served.is_err() {
            return 1;
        }
        if attached_once && vbds.is_empty() {
            return 0;
        }
    }
}

fn handle(
    dir: &Path,
    pid: i32,
    vbds: &mut BTreeMap<u16, Vbd>,
    attached_once: &mut bool,
    req: Request,
) -> Reply {
    match req {
        Request::Pid => Reply::Pid(pid),
        Request::Attach { minor } => {
            if vbds.contains_key(&minor) {
                return Reply::error(libc::EEXIST);
            }
            match minors::lock_marker(dir, minor, Duration::from_secs(1)) {
                Ok(lock) => {
                    vbds.insert(
                        minor,
                        Vbd {
                            _lock: lock,
                            params: None,
                            state: VbdState::CLOSED,
                            info: DiskInfo::default(),
                            keyed: false,
                        },
                    );
                    *attached_once = true;
                    Reply::Attach
                }
                Err(e) => Reply::error(e.errno()),
            }
        }
        Request::Open(o) => {
            let Some(v) = vbds.get_mut(&o.minor) else {
                return Reply::error(libc::EINVAL);
            };
            if v.params.is_some() {
                return Reply::error(libc::EALREADY);
            }
            let Some((_, path)) = o.params.split_once(':') else {
                return Reply::error(libc::EINVAL);
            };
            let size = match std::fs::metadata(path) {
                Ok(m) => m.len(),
                Err(e) => return Reply::error(e.raw_os_error().unwrap_or(libc::EIO)),
            };
            v.info = DiskInfo {
                sectors: size / 512,
                sector_size: 512,
                info: if o.flags.contains(OpenFlags::RDONLY) {
                    4
                } else {
                    0
                },
            };
            v.keyed = o.key.is_some();
            v.params = Some(o.params);
            v.state = VbdState(0);
            Reply::Open(v.info)
        }
        Request::Pause { minor } => match vbds.get_mut(&minor) {
            Some(v) if v.params.is_some() => {
                v.state = VbdState::PAUSED;
                Reply::Pause
            }
            _ => Reply::error(libc::EINVAL),
        },
        Request::Resume(r) => match vbds.get_mut(&r.minor) {
            Some(v) if v.state.contains(VbdState::PAUSED) => {
                if let Some(p) = r.params {
                    v.params = Some(p);
                }
                v.state = VbdState(0);
                Reply::Resume
            }
            _ => Reply::error(libc::EINVAL),
        },
        Request::Close { minor } | Request::ForceShutdown { minor } => match vbds.get_mut(&minor) {
            Some(v) => {
                v.params = None;
                v.state = VbdState::CLOSED;
                Reply::Close
            }
            None => Reply::error(libc::EINVAL),
        },
        Request::Detach { minor } => match vbds.get(&minor) {
            Some(v) if v.params.is_some() => Reply::error(libc::EBUSY),
            Some(_) => {
                vbds.remove(&minor);
                Reply::Detach
            }
            None => Reply::error(libc::EINVAL),
        },
        Request::List => Reply::List(
            vbds.iter()
                .map(|(m, v)| ListEntry {
                    minor: *m,
                    state: v.state,
                    params: v.params.clone().unwrap_or_default(),
                })
                .collect(),
        ),
        Request::Stats { minor } => {
            let one = |m: &u16, v: &Vbd| {
                format!(
                    "{{ \"name\": \"{}\", \"minor\": {m}, \"keyed\": {} }}",
                    v.params.clone().unwrap_or_default(),
                    v.keyed
                )
            };
            match minor {
                Some(m) => match vbds.get(&m) {
                    Some(v) => Reply::Stats(one(&m, v).into_bytes()),
                    None => Reply::error(libc::EINVAL),
                },
                None => {
                    let all: Vec<String> = vbds.iter().map(|(m, v)| one(m, v)).collect();
                    Reply::Stats(format!("[ {} ]", all.join(", ")).into_bytes())
                }
            }
        }
        Request::DiskInfo { minor } => match vbds.get(&minor) {
            Some(v) => Reply::DiskInfo(v.info),
            None => Reply::error(libc::EINVAL),
        },
        Request::XenblkifConnect { .. } | Request::XenblkifDisconnect { .. } => {
            Reply::error(libc::ENODEV)
        }
    }
}

// ---- tests ---------------------------------------------------------------------------------

struct Env {
    dir: tempfile::TempDir,
}

struct Out {
    status: i32,
    stdout: String,
    stderr: String,
}

impl Env {
    fn new() -> Env {
        Env {
            dir: tempfile::tempdir().unwrap(),
        }
    }
    fn path(&self) -> &Path {
        self.dir.path()
    }
    fn tap_ctl(&self, args: &[&str]) -> Out {
        self.tap_ctl_stdin(args, &[])
    }
    fn tap_ctl_stdin(&self, args: &[&str], stdin: &[u8]) -> Out {
        let mut child = tap_ctl(self.path(), std::env::current_exe().unwrap())
            .args(args)
            .env("FAKE_TAPDISK", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        {
            let mut i = child.stdin.take().unwrap();
            let _ = i.write_all(stdin);
        }
        let o = child.wait_with_output().unwrap();
        Out {
            status: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8(o.stdout).unwrap(),
            stderr: String::from_utf8(o.stderr).unwrap(),
        }
    }
    fn ok(&self, args: &[&str]) -> String {
        let o = self.tap_ctl(args);
        assert_eq!(o.status, 0, "tap-ctl {args:?}: {}", o.stderr);
        o.stdout
    }
    fn image(&self, name: &str, size: u64) -> PathBuf {
        let p = self.path().join(name);
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(size).unwrap();
        p
    }
}

fn test_spawn_and_list_pid_only() {
    let env = Env::new();
    let out = env.ok(&["spawn"]);
    let pid: i32 = out.trim().parse().expect("non-TTY spawn prints the pid");
    assert!(alive(pid));
    assert!(env.path().join(format!("ctl{pid}")).exists());
    assert_eq!(env.ok(&["list"]), format!("pid={pid}\n"));
    // A stale socket of a dead tapdisk is ignored.
    std::os::unix::net::UnixListener::bind(env.path().join("ctl1")).unwrap();
    assert_eq!(env.ok(&["list"]), format!("pid={pid}\n"));
    // attach on a minor without marker fails with the marker's errno.
    let o = env.tap_ctl(&["attach", "-p", &pid.to_string(), "-m", "3"]);
    assert_eq!(o.status, libc::ENOENT);
    assert_eq!(o.stderr, "No such file or directory\n");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGTERM).unwrap();
    assert!(wait_gone(pid, Duration::from_secs(2)));
}

fn test_create_list_stats_pause_destroy() {
    let env = Env::new();
    let img = env.image("a.img", 1 << 20);
    let img2 = env.image("b.img", 1 << 20);
    let img_s = img.display().to_string();
    let out = env.ok(&["create", "-a", &format!("aio:{img_s}")]);
    let dev = PathBuf::from(out.trim());
    let name = dev.file_name().unwrap().to_str().unwrap().to_string();
    let (pid, minor) = name
        .strip_prefix("nbd")
        .and_then(|r| r.split_once('.'))
        .map(|(p, m)| (p.parse::<i32>().unwrap(), m.parse::<u16>().unwrap()))
        .expect("create prints <dir>/nbd<pid>.<minor>");
    assert_eq!(minor, 0);
    assert_eq!(dev, nbd_socket_path(env.path(), pid, 0));
    let p = pid.to_string();
    assert_eq!(
        env.ok(&["list"]),
        format!("pid={pid} minor=0 state=0 args=aio:{img_s}\n")
    );
    assert_eq!(env.ok(&["list", "-t", "aio"]).lines().count(), 1);
    assert_eq!(env.ok(&["list", "-t", "vhd"]), "");
    assert_eq!(env.ok(&["list", "-f", &img_s]).lines().count(), 1);
    assert_eq!(env.ok(&["list", "-p", &p, "-m", "0"]).lines().count(), 1);
    assert_eq!(env.ok(&["list", "-m", "1"]), "");
    assert_eq!(
        Client::with_dir(env.path())
            .find_minor("aio", &img_s)
            .unwrap(),
        0
    );
    // stats: the JSON and two newlines.
    assert_eq!(
        env.ok(&["stats", "-p", &p, "-m", "0"]),
        format!("{{ \"name\": \"aio:{img_s}\", \"minor\": 0, \"keyed\": false }}\n\n")
    );
    // The marker is held: free fails with EWOULDBLOCK.
    let o = env.tap_ctl(&["free", "-m", "0"]);
    assert_eq!(o.status, libc::EWOULDBLOCK);
    assert_eq!(o.stderr, "Resource temporarily unavailable\n");
    // pause -t works (the C bug is not reproduced), unpause onto a new leaf.
    env.ok(&["pause", "-p", &p, "-m", "0", "-t", "5"]);
    assert!(env.ok(&["list"]).contains("state=0x20 "));
    env.ok(&[
        "unpause",
        "-p",
        &p,
        "-m",
        "0",
        "-a",
        &format!("aio:{}", img2.display()),
    ]);
    assert_eq!(
        env.ok(&["list"]),
        format!("pid={pid} minor=0 state=0 args=aio:{}\n", img2.display())
    );
    // close, then open again with a key from stdin.
    env.ok(&["close", "-p", &p, "-m", "0"]);
    assert_eq!(env.ok(&["list"]), format!("pid={pid} minor=0 state=0x2\n"));
    let o = env.tap_ctl_stdin(
        &[
            "open",
            "-p",
            &p,
            "-m",
            "0",
            "-a",
            &format!("aio:{img_s}"),
            "-E",
        ],
        &[9u8; 64],
    );
    assert_eq!(o.status, 0, "{}", o.stderr);
    assert!(env
        .ok(&["stats", "-p", &p, "-m", "0"])
        .contains("\"keyed\": true"));
    // open on an open VBD: EALREADY.
    let o = env.tap_ctl(&["open", "-p", &p, "-m", "0", "-a", &format!("aio:{img_s}")]);
    assert_eq!(o.status, libc::EALREADY);
    // detach while open: EBUSY.
    assert_eq!(
        env.tap_ctl(&["detach", "-p", &p, "-m", "0"]).status,
        libc::EBUSY
    );
    // A second VBD in the same tapdisk, then destroy both.
    let (m2, _) = minors::allocate(env.path()).unwrap();
    env.ok(&["attach", "-p", &p, "-m", &m2.to_string()]);
    assert_eq!(
        env.ok(&["list"]),
        format!("pid={pid} minor=0 state=0 args=aio:{img_s}\npid={pid} minor=1 state=0x2\n")
    );
    env.ok(&["detach", "-p", &p, "-m", &m2.to_string()]);
    env.ok(&["free", "-m", &m2.to_string()]);
    env.ok(&["destroy", "-p", &p, "-m", "0", "-t", "5"]);
    assert!(
        wait_gone(pid, Duration::from_secs(2)),
        "tapdisk exits after its last detach"
    );
    assert!(!minors::marker_path(env.path(), 0).exists());
    assert_eq!(env.ok(&["list"]), "");
}

fn test_create_failure_undoes_everything() {
    let env = Env::new();
    let missing = env.path().join("missing.img");
    let o = env.tap_ctl(&["create", "-a", &format!("aio:{}", missing.display())]);
    assert_eq!(o.status, libc::ENOENT, "{}", o.stderr);
    assert_eq!(o.stderr, "No such file or directory\n");
    // No marker left, and the tapdisk (detached, no VBD left) is gone.
    for _ in 0..200 {
        if minors::list(env.path()).unwrap().is_empty()
            && Client::with_dir(env.path()).tapdisks().unwrap().is_empty()
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(minors::list(env.path()).unwrap(), Vec::<u16>::new());
    assert_eq!(env.ok(&["list"]), "");
    // Bad params never spawn anything.
    assert_eq!(
        env.tap_ctl(&["create", "-a", "nocolon"]).status,
        libc::EINVAL
    );
    assert_eq!(env.tap_ctl(&["create"]).status, libc::EINVAL);
}

fn test_destroy_by_devname() {
    let env = Env::new();
    let img = env.image("c.img", 4096);
    let dev = env.ok(&["create", "-a", &format!("aio:{}", img.display())]);
    let dev = dev.trim().to_string();
    let pid = Client::with_dir(env.path()).tapdisks().unwrap()[0];
    env.ok(&["destroy", "-d", &dev]);
    assert!(wait_gone(pid, Duration::from_secs(2)));
    assert_eq!(env.ok(&["list"]), "");
}

fn main() {
    if std::env::var_os("FAKE_TAPDISK").is_some() {
        std::process::exit(fake_tapdisk());
    }
    let tests: [(&str, fn()); 4] = [
        ("spawn_and_list_pid_only", test_spawn_and_list_pid_only),
        (
            "create_list_stats_pause_destroy",
            test_create_list_stats_pause_destroy,
        ),
        (
            "create_failure_undoes_everything",
            test_create_failure_undoes_everything,
        ),
        ("destroy_by_devname", test_destroy_by_devname),
    ];
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let mut ran = 0;
    for (name, t) in tests {
        if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        print!("test {name} ... ");
        let _ = std::io::stdout().flush();
        t();
        println!("ok");
        ran += 1;
    }
    println!("test result: ok. {ran} passed");
}
