//! The real `tapback` binary against a fake xenstored (the in-memory store served over the
//! xenstore wire protocol on a Unix socket, selected with `XENSTORED_PATH`) and a fake tapdisk
//! (the control server of `control::server` on `<BLKTAP_CONTROL_DIR>/ctl<pid>`), with the
//! simulated blkfront as the guest.

mod common;

use std::collections::BTreeMap;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use blktap3::control::client::Client;
use blktap3::control::msg::{Blkif, DiskInfo, ListEntry, VbdState};
use blktap3::control::server::{ControlServer, Reply, Request};
use blktap3::tapback::{ControlTapdisks, TapdiskOps};
use blktap3::xen::sim::{
    toolstack_add_vbd, BlkfrontOptions, MemXenStore, MemXsConn, SimBlkfront, SimXen,
};
use blktap3::xen::xenstore::{Tx, XenStore};
use blktap3::xen::DomId;
use common::tapback_bin::fake_xenstored;

const BE: DomId = DomId(0);
const FE: DomId = DomId(7);
const TAP_PID: i32 = 31337;
const MINOR: u16 = 2;

#[derive(Default, Debug)]
struct TapState {
    rings: BTreeMap<(u32, u32), Blkif>,
    connects: Vec<(u16, Blkif, i32)>,
    /// Disconnects that removed a ring.
    disconnects: Vec<(u32, u32)>,
}

/// A fake tapdisk answering on `<dir>/ctl<pid>`.
fn fake_tapdisk(dir: &Path, pid: i32, st: Arc<Mutex<TapState>>) {
    let server = ControlServer::bind(dir, pid).unwrap();
    thread::spawn(move || {
        let h = move |req: Request| -> Reply {
            let mut s = st.lock().unwrap();
            match req {
                Request::Pid => Reply::Pid(pid),
                Request::List => Reply::List(vec![ListEntry {
                    minor: MINOR,
                    state: VbdState(0),
                    params: "vhd:/images/guest.vhd".to_owned(),
                }]),
                Request::DiskInfo { minor } if minor == MINOR => Reply::DiskInfo(DiskInfo {
                    sectors: 131072,
                    sector_size: 512,
                    info: 0,
                }),
                Request::XenblkifConnect { minor, blkif } => {
                    let key = (blkif.domid, blkif.devid);
                    let err = if minor != MINOR {
                        libc::ENODEV
                    } else {
                        match s.rings.entry(key) {
                            std::collections::btree_map::Entry::Occupied(_) => libc::EALREADY,
                            std::collections::btree_map::Entry::Vacant(v) => {
                                v.insert(blkif.clone());
                                0
                            }
                        }
                    };
                    s.connects.push((minor, blkif, err));
                    if err == 0 {
                        Reply::XenblkifConnect
                    } else {
                        Reply::Error(err)
                    }
                }
                Request::XenblkifDisconnect { domid, devid } => {
                    if s.rings.remove(&(domid, devid)).is_some() {
                        s.disconnects.push((domid, devid));
                        Reply::XenblkifDisconnect
                    } else {
                        Reply::Error(libc::ENODEV)
                    }
                }
                _ => Reply::Error(libc::EINVAL),
            }
        };
        let _ = server.run_concurrent(Arc::new(h));
    });
}

struct Env {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    ctl: PathBuf,
    xs_sock: PathBuf,
    store: MemXenStore,
    dom0: MemXsConn,
    xen: SimXen,
    tap: Arc<Mutex<TapState>>,
    fpath: String,
    bpath: String,
}

fn env() -> Env {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_owned();
    let ctl = dir.join("ctl");
    let xs_sock = dir.join("xenstored.sock");
    let store = MemXenStore::new();
    fake_xenstored(&xs_sock, store.clone());
    let tap = Arc::new(Mutex::new(TapState::default()));
    fake_tapdisk(&ctl, TAP_PID, Arc::clone(&tap));
    let dom0 = store.connect(BE).unwrap();
    let xen = SimXen::new();
    xen.create_domain(FE, 256).unwrap();
    let (fpath, bpath) = toolstack_add_vbd(&dom0, "vbd3", BE, FE, 51712, false).unwrap();
    dom0.write(
        Tx::NONE,
        &format!("{bpath}/physical-device-path"),
        format!("{}/nbd{TAP_PID}.{MINOR}", ctl.display()).as_bytes(),
    )
    .unwrap();
    Env {
        _tmp: tmp,
        dir,
        ctl,
        xs_sock,
        store,
        dom0,
        xen,
        tap,
        fpath,
        bpath,
    }
}

impl Env {
    fn tapback(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_tapback"));
        c.args(args)
            .arg("--no-gntdev-check")
            .env("XENSTORED_PATH", &self.xs_sock)
            .env("BLKTAP_CONTROL_DIR", &self.ctl)
            .env_remove("TAPBACK_DAEMON_CHILD")
            .stdin(Stdio::null());
        c
    }

    fn spawn_fg(&self) -> Child {
        let pid = self.dir.join("fg.pid");
        self.tapback(&["-d", "-v", "-p", pid.to_str().unwrap()])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    fn bstate(&self) -> Option<String> {
        self.dom0
            .read(Tx::NONE, &format!("{}/state", self.bpath))
            .unwrap()
            .map(|v| String::from_utf8(v).unwrap())
    }

    fn wait_bstate(&self, want: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.bstate().as_deref() != Some(want) {
            assert!(
                Instant::now() < deadline,
                "backend state {:?}",
                self.bstate()
            );
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn front(&self) -> SimBlkfront<MemXsConn> {
        SimBlkfront::new(
            &self.xen,
            FE,
            self.store.connect(FE).unwrap(),
            &self.fpath,
            BlkfrontOptions::default(),
        )
        .unwrap()
    }
}

fn term(child: &mut Child) -> std::process::ExitStatus {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    child.wait().unwrap()
}

fn stderr_of(child: Child) -> String {
    let out = child.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn binary_connects_a_blkfront_survives_restart_and_tears_down() {
    let e = env();
    let mut tb = e.spawn_fg();
    e.wait_bstate("2");
    assert!(e.dir.join("fg.pid").exists());

    // The guest negotiates: tapback advertised order 4, so it uses 16 ring pages, and the
    // refs 8..15 reach tapdisk through the control message's extension.
    let mut front = e.front();
    let info = front.connect().unwrap();
    assert_eq!(info.ring_order, 4);
    assert_eq!(info.sectors, 131072);
    assert_eq!(info.sector_size, 512);
    assert!(info.flush && info.discard && info.barrier);
    assert_eq!(info.max_indirect_segments, 256);
    {
        let s = e.tap.lock().unwrap();
        assert_eq!(s.connects.len(), 1);
        let (minor, blkif, err) = &s.connects[0];
        assert_eq!((*minor, *err), (MINOR, 0));
        assert_eq!((blkif.domid, blkif.devid, blkif.order), (7, 51712, 4));
        assert_eq!(blkif.ring_refs().len(), 16);
        // The refs tapdisk got are the ones the guest published.
        for (i, r) in blkif.ring_refs().iter().enumerate() {
            let v = e
                .dom0
                .read(Tx::NONE, &format!("{}/ring-ref{i}", e.fpath))
                .unwrap()
                .unwrap();
            assert_eq!(String::from_utf8(v).unwrap(), r.to_string());
        }
    }
    let kpid = e
        .dom0
        .read(Tx::NONE, &format!("{}/kthread-pid", e.bpath))
        .unwrap();
    assert_eq!(kpid, Some(TAP_PID.to_string().into_bytes()));

    // SIGTERM: clean exit, pid file removed, device left connected.
    let st = term(&mut tb);
    assert!(st.success(), "{st:?}");
    assert!(!e.dir.join("fg.pid").exists());
    let log = stderr_of(tb);
    assert!(log.contains("connected to tapdisk 31337"), "{log}");
    assert_eq!(e.bstate().as_deref(), Some("4"));
    assert!(e.tap.lock().unwrap().disconnects.is_empty());
    assert_eq!(e.tap.lock().unwrap().rings.len(), 1);

    // A new tapback reconnects idempotently (EALREADY) and handles the guest's shutdown.
    let tb2 = e.spawn_fg();
    let deadline = Instant::now() + Duration::from_secs(20);
    while e.tap.lock().unwrap().connects.len() < 2 {
        assert!(Instant::now() < deadline, "no reconnect");
        thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(e.tap.lock().unwrap().connects[1].2, libc::EALREADY);
    front.disconnect().unwrap();
    assert_eq!(e.bstate().as_deref(), Some("6"));
    assert_eq!(e.tap.lock().unwrap().disconnects, vec![(7, 51712)]);
    assert!(e.tap.lock().unwrap().rings.is_empty());

    // The guest reboots: a new ring is connected.
    // (The simulated blkfront waits for "state >= wanted", which a Closed backend already
    // satisfies, so wait for tapback here.)
    let mut front = e.front();
    front.connect().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while e.tap.lock().unwrap().rings.len() != 1 || e.bstate().as_deref() != Some("4") {
        assert!(Instant::now() < deadline, "no reconnect after reboot");
        thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(e.tap.lock().unwrap().connects.len(), 3);

    let mut tb2 = tb2;
    assert!(term(&mut tb2).success());
}

#[test]
fn binary_daemonises_and_writes_its_pid() {
    let e = env();
    let pidfile = e.dir.join("d.pid");
    let out = e
        .tapback(&["-p", pidfile.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let npid = nix::unistd::Pid::from_raw(pid);
    // The daemon is alive, in its own session, and serving.
    assert_eq!(nix::unistd::getsid(Some(npid)).unwrap(), npid);
    e.wait_bstate("2");
    // A second instance with the same pid file refuses to start.
    let out = e
        .tapback(&["-d", "-p", pidfile.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(libc::EEXIST), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("pid {pid}")));
    assert_eq!(
        std::fs::read_to_string(&pidfile).unwrap().trim(),
        pid.to_string()
    );
    nix::sys::signal::kill(npid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while pidfile.exists() {
        assert!(Instant::now() < deadline, "daemon did not exit");
        thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn binary_start_up_failures_reach_the_caller() {
    let e = env();
    // No xenstored at the given path: the daemonising parent reports the child's error.
    let out = e
        .tapback(&[])
        .env("XENSTORED_PATH", e.dir.join("nope.sock"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(libc::ENOENT), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope.sock"));
    // Usage errors.
    let out = e.tapback(&["-x", "bad"]).output().unwrap();
    assert_eq!(out.status.code(), Some(libc::EINVAL));
}

#[test]
fn control_tapdisks_over_real_sockets() {
    let e = env();
    let t = ControlTapdisks::new(Client::with_dir(&e.ctl)).with_timeout(Duration::from_secs(2));
    assert_eq!(t.list_pid(TAP_PID).unwrap()[0].minor, MINOR);
    // A stale control socket (no listener) is skipped by list_all.
    let stale = e.ctl.join("ctl999999");
    drop(UnixListener::bind(&stale).unwrap());
    let all = t.list_all().unwrap();
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].0, TAP_PID);
    assert_eq!(t.disk_info(TAP_PID, MINOR).unwrap().sectors, 131072);
    // A dead tapdisk: ECONNREFUSED, which disconnect treats as "gone".
    assert_eq!(
        t.disconnect(999999, 1, 1).unwrap_err().errno(),
        libc::ECONNREFUSED
    );
    // A wedged tapdisk (accepts, never answers) times out instead of hanging tapback.
    let wedged = UnixListener::bind(e.ctl.join("ctl888888")).unwrap();
    let t = t.with_timeout(Duration::from_millis(200));
    let start = Instant::now();
    let err = t.list_pid(888888).unwrap_err();
    assert_eq!(err.errno(), libc::ETIMEDOUT);
    assert!(start.elapsed() < Duration::from_secs(5));
    // Also XENBLKIF_CONNECT and the scan of every socket (the client's default timeout).
    let blkif = Blkif {
        domid: 1,
        devid: 768,
        gref: [0; 16],
        order: 0,
        proto: blktap3::control::msg::BlkifProto::X86_64,
        pool: String::new(),
        port: 3,
        poll_duration: 0,
        poll_idle_threshold: 0,
        queue: 0,
    };
    let start = Instant::now();
    assert_eq!(
        t.connect(888888, MINOR, &blkif).unwrap_err().errno(),
        libc::ETIMEDOUT
    );
    let all = t.list_all().unwrap();
    assert_eq!(all.len(), 1, "the wedged tapdisk is skipped");
    assert!(start.elapsed() < Duration::from_secs(5));
    let start = Instant::now();
    let c = Client::with_dir(&e.ctl).with_timeout(Duration::from_millis(200));
    assert!(c.list().unwrap().iter().all(|v| v.pid != Some(888888)));
    assert!(start.elapsed() < Duration::from_secs(5));
    drop(wedged);
    // physical-device for NBD devices resolves through sysfs' backend identifier.
    let sys = e.dir.join("sys");
    std::fs::create_dir_all(sys.join("dev/block/43:32")).unwrap();
    std::fs::write(
        sys.join("dev/block/43:32/backend"),
        format!("{}/nbd{TAP_PID}.{MINOR}\n", e.ctl.display()),
    )
    .unwrap();
    let t = t.with_sysfs(&sys);
    assert_eq!(
        t.block_device_socket(43, 32),
        Some(format!("{}/nbd{TAP_PID}.{MINOR}", e.ctl.display()))
    );
    assert_eq!(t.block_device_socket(43, 33), None);
    assert_eq!(t.block_device_socket(8, 32), None);
}
