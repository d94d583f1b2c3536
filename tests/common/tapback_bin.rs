//! A rig for the real `tapback` binary: a fake xenstored (the in-memory store served over the
//! wire protocol on a Unix socket, selected with `XENSTORED_PATH`), a fake tapdisk serving
//! several minors on `<ctl>/ctl<pid>` that records every ring it is given, and helpers to read
//! the daemon's memory high-water mark.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use blktap3::control::msg::{Blkif, DiskInfo, ListEntry, VbdState};
use blktap3::control::server::{ControlServer, Reply, Request};
use blktap3::xen::sim::{serve_wire, toolstack_add_vbd, MemXenStore, MemXsConn, SimXen};
use blktap3::xen::xenstore::{Tx, XenStore};
use blktap3::xen::DomId;

pub const BE: DomId = DomId(0);
/// The fake tapdisk's pid (it only names the control socket).
pub const TAP_PID: i32 = 31337;
/// Sectors of every fake disk.
pub const SECTORS: u64 = 131072;

/// What the fake tapdisk saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TapEvent {
    Connect {
        minor: u16,
        blkif: Blkif,
        errno: i32,
    },
    Disconnect {
        domid: u32,
        devid: u32,
        errno: i32,
    },
}

#[derive(Default, Debug)]
pub struct TapState {
    /// (domid, devid, queue) → (minor, blkif).
    pub rings: BTreeMap<(u32, u32, u32), (u16, Blkif)>,
    pub events: Vec<TapEvent>,
}

impl TapState {
    /// The rings of device (domid, devid), by queue.
    pub fn rings_of(&self, domid: u32, devid: u32) -> Vec<Blkif> {
        self.rings
            .iter()
            .filter(|((d, v, _), _)| (*d, *v) == (domid, devid))
            .map(|(_, (_, b))| b.clone())
            .collect()
    }

    /// How many events concern device (domid, devid).
    pub fn events_of(&self, domid: u32, devid: u32) -> usize {
        self.events
            .iter()
            .filter(|e| match e {
                TapEvent::Connect { blkif, .. } => (blkif.domid, blkif.devid) == (domid, devid),
                TapEvent::Disconnect {
                    domid: d, devid: v, ..
                } => (*d, *v) == (domid, devid),
            })
            .count()
    }
}

/// A fake tapdisk with minors `0..minors` open, answering on `<dir>/ctl<pid>`.
pub fn fake_tapdisk(dir: &Path, pid: i32, minors: u16, st: Arc<Mutex<TapState>>) {
    let server = ControlServer::bind(dir, pid).unwrap();
    thread::spawn(move || {
        let h = move |req: Request| -> Reply {
            let mut s = st.lock().unwrap();
            match req {
                Request::Pid => Reply::Pid(pid),
                Request::List => Reply::List(
                    (0..minors)
                        .map(|minor| ListEntry {
                            minor,
                            state: VbdState(0),
                            params: format!("vhd:/images/disk{minor}.vhd"),
                        })
                        .collect(),
                ),
                Request::DiskInfo { minor } if minor < minors => Reply::DiskInfo(DiskInfo {
                    sectors: SECTORS,
                    sector_size: 512,
                    info: 0,
                }),
                Request::XenblkifConnect { minor, blkif } => {
                    let key = (blkif.domid, blkif.devid, blkif.queue);
                    let err = if minor >= minors {
                        libc::ENODEV
                    } else {
                        match s.rings.entry(key) {
                            std::collections::btree_map::Entry::Occupied(_) => libc::EALREADY,
                            std::collections::btree_map::Entry::Vacant(v) => {
                                v.insert((minor, blkif.clone()));
                                0
                            }
                        }
                    };
                    s.events.push(TapEvent::Connect {
                        minor,
                        blkif,
                        errno: err,
                    });
                    if err == 0 {
                        Reply::XenblkifConnect
                    } else {
                        Reply::Error(err)
                    }
                }
                Request::XenblkifDisconnect { domid, devid } => {
                    let before = s.rings.len();
                    s.rings.retain(|(d, v, _), _| (*d, *v) != (domid, devid));
                    let err = if s.rings.len() < before {
                        0
                    } else {
                        libc::ENODEV
                    };
                    s.events.push(TapEvent::Disconnect {
                        domid,
                        devid,
                        errno: err,
                    });
                    if err == 0 {
                        Reply::XenblkifDisconnect
                    } else {
                        Reply::Error(err)
                    }
                }
                _ => Reply::Error(libc::EINVAL),
            }
        };
        let _ = server.run_concurrent(Arc::new(h));
    });
}

/// A fake xenstored on `sock`, serving `store` as dom0.
pub fn fake_xenstored(sock: &Path, store: MemXenStore) {
    fake_xenstored_as(sock, store, BE)
}

/// A fake xenstored on `sock`, serving `store` to domain `dom` (a guest's own connection:
/// its writes are requests answered one at a time, as over a real guest's xenbus ring).
pub fn fake_xenstored_as(sock: &Path, store: MemXenStore, dom: DomId) {
    let l = UnixListener::bind(sock).unwrap();
    thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { return };
            let store = store.clone();
            thread::spawn(move || {
                let _ = serve_wire(&store, dom, s.into());
            });
        }
    });
}

/// The rig: store, fake tapdisk, simulated Xen for blkfronts.
pub struct BinEnv {
    pub tmp: tempfile::TempDir,
    pub ctl: PathBuf,
    pub xs_sock: PathBuf,
    pub store: MemXenStore,
    pub dom0: MemXsConn,
    pub xen: SimXen,
    pub tap: Arc<Mutex<TapState>>,
}

impl BinEnv {
    /// A fake tapdisk serving `minors` minors.
    pub fn new(minors: u16) -> BinEnv {
        let tmp = tempfile::tempdir().unwrap();
        let ctl = tmp.path().join("ctl");
        let xs_sock = tmp.path().join("xenstored.sock");
        let store = MemXenStore::new();
        fake_xenstored(&xs_sock, store.clone());
        let tap = Arc::new(Mutex::new(TapState::default()));
        fake_tapdisk(&ctl, TAP_PID, minors, Arc::clone(&tap));
        let dom0 = store.connect(BE).unwrap();
        BinEnv {
            tmp,
            ctl,
            xs_sock,
            store,
            dom0,
            xen: SimXen::new(),
            tap,
        }
    }

    pub fn tap(&self) -> std::sync::MutexGuard<'_, TapState> {
        self.tap.lock().unwrap()
    }

    /// The toolstack adds vbd `devid` of domain `fe` served by the fake tapdisk's `minor`:
    /// (frontend path, backend path).
    pub fn add_vbd(&self, fe: DomId, devid: u32, minor: u16) -> (String, String) {
        if self.xen.domain(fe).is_none() {
            self.xen.create_domain(fe, 256).unwrap();
        }
        let (fpath, bpath) = toolstack_add_vbd(&self.dom0, "vbd3", BE, fe, devid, false).unwrap();
        self.dom0
            .write(
                Tx::NONE,
                &format!("{bpath}/physical-device-path"),
                self.nbd_path(minor).as_bytes(),
            )
            .unwrap();
        (fpath, bpath)
    }

    /// The NBD socket path naming the fake tapdisk's `minor`.
    pub fn nbd_path(&self, minor: u16) -> String {
        format!("{}/nbd{TAP_PID}.{minor}", self.ctl.display())
    }

    /// A foreground tapback with its stderr collected by [`Tapback`].
    pub fn spawn_tapback(&self) -> Tapback {
        let pid = self.tmp.path().join("tapback.pid");
        let mut child = Command::new(env!("CARGO_BIN_EXE_tapback"))
            .args(["-d", "-p", pid.to_str().unwrap(), "--no-gntdev-check"])
            .env("XENSTORED_PATH", &self.xs_sock)
            .env("BLKTAP_CONTROL_DIR", &self.ctl)
            .env_remove("TAPBACK_DAEMON_CHILD")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let l = Arc::clone(&log);
        // Drain stderr all the time: a full pipe would block the daemon.
        let reader = thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                l.lock().unwrap().push(line);
            }
        });
        Tapback {
            child,
            log,
            reader: Some(reader),
        }
    }

    /// Backend `state` of `bpath`.
    pub fn bstate(&self, bpath: &str) -> Option<String> {
        self.dom0
            .read_string(Tx::NONE, &format!("{bpath}/state"))
            .unwrap()
    }

    /// tapback's error node of `bpath` (`error/<bpath relative to dom0>/error`).
    pub fn error_node(&self, bpath: &str) -> Option<String> {
        let rel = bpath.strip_prefix("/local/domain/0/").unwrap_or(bpath);
        self.dom0
            .read_string(Tx::NONE, &format!("error/{rel}/error"))
            .unwrap()
    }

    /// Poll until backend `state` of `bpath` is `want` (20 s).
    pub fn wait_bstate(&self, bpath: &str, want: &str) {
        until(
            &format!("{bpath} state {want}"),
            Duration::from_secs(20),
            || self.bstate(bpath).as_deref() == Some(want),
        );
    }
}

/// The running daemon.
pub struct Tapback {
    pub child: Child,
    log: Arc<Mutex<Vec<String>>>,
    reader: Option<thread::JoinHandle<()>>,
}

impl Tapback {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Still running (panics with its log if it exited).
    pub fn assert_alive(&mut self) {
        if let Some(st) = self.child.try_wait().unwrap() {
            panic!("tapback exited: {st:?}\n{}", self.log_text());
        }
    }

    /// The log lines so far.
    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Whether a log line contains all of `parts`.
    pub fn logged(&self, parts: &[&str]) -> bool {
        self.log
            .lock()
            .unwrap()
            .iter()
            .any(|l| parts.iter().all(|p| l.contains(p)))
    }

    /// Wait (at most 10 s) for a log line containing all of `parts`: tapback's stderr is
    /// collected by a thread, so a line it wrote may not be here yet.
    pub fn wait_logged(&self, parts: &[&str]) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.logged(parts) {
            assert!(
                Instant::now() < deadline,
                "no log line with {parts:?} in:\n{}",
                self.log_text()
            );
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// `VmHWM` (peak resident set) in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        status_kib(self.pid(), "VmHWM:").unwrap()
    }

    /// `VmRSS` in KiB.
    pub fn rss_kib(&self) -> u64 {
        status_kib(self.pid(), "VmRSS:").unwrap()
    }

    /// SIGTERM and wait; the exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid()),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let st = self.child.wait().unwrap();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        st
    }
}

impl Drop for Tapback {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A `/proc/<pid>/status` field in KiB (`VmHWM:`, `VmRSS:`).
pub fn status_kib(pid: i32, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with(field))?;
    line[field.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// Poll until `f` holds or `within` passed (then panic naming `what`).
pub fn until(what: &str, within: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(5));
    }
}
