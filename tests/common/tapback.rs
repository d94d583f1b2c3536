//! Shared test rig for tapback: a fake tapdisk set recording calls, a recording xenstore
//! wrapper, and helpers playing the toolstack and the frontend over the in-memory xenstore.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use blktap3::control::msg::{Blkif, DiskInfo, ListEntry, VbdState};
use blktap3::control::ControlError;
use blktap3::tapback::{Backend, BackendConfig, DeviceId, DeviceStatus, TapdiskOps};
use blktap3::xen::sim::{toolstack_add_vbd, MemXenStore, MemXsConn};
use blktap3::xen::xenstore::{Committed, Perm, Tx, WatchEvent, XenStore, XsError};
use blktap3::xen::DomId;

pub const BE: DomId = DomId(0);

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    Connect {
        pid: i32,
        minor: u16,
        blkif: Blkif,
        errno: i32,
    },
    Disconnect {
        pid: i32,
        domid: u32,
        devid: u32,
        errno: i32,
    },
    Info {
        pid: i32,
        minor: u16,
    },
}

#[derive(Debug, Default)]
pub struct FakeState {
    pub vbds: BTreeMap<i32, Vec<ListEntry>>,
    pub info: BTreeMap<(i32, u16), DiskInfo>,
    /// (domid, devid, queue) → (pid, minor, blkif)
    pub rings: BTreeMap<(u32, u32, u32), (i32, u16, Blkif)>,
    pub connect_errors: VecDeque<i32>,
    pub disconnect_errors: VecDeque<i32>,
    pub dead: BTreeSet<i32>,
    pub calls: Vec<Call>,
    pub nbd: BTreeMap<(u32, u32), String>,
}

/// A fake set of tapdisks. Clones share state.
#[derive(Clone, Debug, Default)]
pub struct FakeTap(pub Arc<Mutex<FakeState>>);

fn remote(errno: i32) -> ControlError {
    ControlError::Remote(errno)
}

fn refused() -> ControlError {
    ControlError::io(
        "connect",
        std::io::Error::from_raw_os_error(libc::ECONNREFUSED),
    )
}

impl FakeTap {
    pub fn st(&self) -> std::sync::MutexGuard<'_, FakeState> {
        self.0.lock().unwrap()
    }

    /// Add VBD `minor` serving `params` to tapdisk `pid`.
    pub fn add_vbd(&self, pid: i32, minor: u16, params: &str, sectors: u64) {
        let mut st = self.st();
        st.vbds.entry(pid).or_default().push(ListEntry {
            minor,
            state: VbdState(0),
            params: params.to_owned(),
        });
        st.info.insert(
            (pid, minor),
            DiskInfo {
                sectors,
                sector_size: 512,
                info: 0,
            },
        );
    }

    pub fn calls(&self) -> Vec<Call> {
        self.st().calls.clone()
    }

    pub fn connects(&self) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| matches!(c, Call::Connect { .. }))
            .collect()
    }

    /// Disconnects that removed a ring.
    pub fn disconnects(&self) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| matches!(c, Call::Disconnect { errno: 0, .. }))
            .collect()
    }

    /// Every disconnect attempt, including those that found no ring.
    pub fn all_disconnects(&self) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| matches!(c, Call::Disconnect { .. }))
            .collect()
    }

    /// Queue 0 (the only one of a single-queue device).
    pub fn ring(&self, domid: u32, devid: u32) -> Option<(i32, u16, Blkif)> {
        self.ring_q(domid, devid, 0)
    }

    pub fn ring_q(&self, domid: u32, devid: u32, queue: u32) -> Option<(i32, u16, Blkif)> {
        self.st().rings.get(&(domid, devid, queue)).cloned()
    }
}

/// Remove every queue of `(domid, devid)`; whether there was one.
fn remove_device(
    rings: &mut BTreeMap<(u32, u32, u32), (i32, u16, Blkif)>,
    domid: u32,
    devid: u32,
) -> bool {
    let before = rings.len();
    rings.retain(|k, _| (k.0, k.1) != (domid, devid));
    rings.len() != before
}

impl TapdiskOps for FakeTap {
    fn list_pid(&self, pid: i32) -> Result<Vec<ListEntry>, ControlError> {
        let st = self.st();
        if st.dead.contains(&pid) {
            return Err(refused());
        }
        st.vbds.get(&pid).cloned().ok_or_else(|| {
            ControlError::io("connect", std::io::Error::from_raw_os_error(libc::ENOENT))
        })
    }

    fn list_all(&self) -> Result<Vec<(i32, Vec<ListEntry>)>, ControlError> {
        let st = self.st();
        Ok(st
            .vbds
            .iter()
            .filter(|(p, _)| !st.dead.contains(p))
            .map(|(p, v)| (*p, v.clone()))
            .collect())
    }

    fn disk_info(&self, pid: i32, minor: u16) -> Result<DiskInfo, ControlError> {
        let mut st = self.st();
        st.calls.push(Call::Info { pid, minor });
        if st.dead.contains(&pid) {
            return Err(refused());
        }
        st.info
            .get(&(pid, minor))
            .copied()
            .ok_or(remote(libc::EINVAL))
    }

    fn connect(&self, pid: i32, minor: u16, blkif: &Blkif) -> Result<(), ControlError> {
        let mut st = self.st();
        let errno = if st.dead.contains(&pid) {
            libc::ECONNREFUSED
        } else if let Some(e) = st.connect_errors.pop_front() {
            e
        } else if !st
            .vbds
            .get(&pid)
            .is_some_and(|v| v.iter().any(|e| e.minor == minor))
        {
            libc::ENODEV
        } else {
            match st.rings.entry((blkif.domid, blkif.devid, blkif.queue)) {
                std::collections::btree_map::Entry::Occupied(_) => libc::EALREADY,
                std::collections::btree_map::Entry::Vacant(v) => {
                    v.insert((pid, minor, blkif.clone()));
                    0
                }
            }
        };
        st.calls.push(Call::Connect {
            pid,
            minor,
            blkif: blkif.clone(),
            errno,
        });
        match errno {
            0 => Ok(()),
            libc::ECONNREFUSED => Err(refused()),
            e => Err(remote(e)),
        }
    }

    fn disconnect(&self, pid: i32, domid: u32, devid: u32) -> Result<(), ControlError> {
        let mut st = self.st();
        let errno = if st.dead.contains(&pid) {
            libc::ECONNREFUSED
        } else if let Some(e) = st.disconnect_errors.pop_front() {
            e
        } else if remove_device(&mut st.rings, domid, devid) {
            0
        } else {
            libc::ENODEV
        };
        st.calls.push(Call::Disconnect {
            pid,
            domid,
            devid,
            errno,
        });
        match errno {
            0 => Ok(()),
            libc::ECONNREFUSED => Err(refused()),
            e => Err(remote(e)),
        }
    }

    fn block_device_socket(&self, major: u32, minor: u32) -> Option<String> {
        self.st().nbd.get(&(major, minor)).cloned()
    }
}

/// One logged xenstore operation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Op {
    pub op: &'static str,
    pub tx: u32,
    pub path: String,
}

/// Something to run just before the next transaction commit (to provoke a conflict).
pub type Hook = Arc<Mutex<Option<Box<dyn FnOnce() + Send>>>>;

/// A xenstore connection that logs every mutating operation.
pub struct Rec<X> {
    pub inner: X,
    pub log: Arc<Mutex<Vec<Op>>>,
    pub before_commit: Hook,
    /// This many next `directory` calls fail with EIO.
    pub fail_dirs: Arc<std::sync::atomic::AtomicU32>,
}

impl<X: AsFd> AsFd for Rec<X> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.inner.as_fd()
    }
}

impl<X: XenStore> Rec<X> {
    fn note(&self, op: &'static str, tx: Tx, path: &str) {
        self.log.lock().unwrap().push(Op {
            op,
            tx: tx.0,
            path: path.to_owned(),
        });
    }
}

impl<X: XenStore> XenStore for Rec<X> {
    fn read(&self, tx: Tx, path: &str) -> Result<Option<Vec<u8>>, XsError> {
        self.inner.read(tx, path)
    }
    fn write(&self, tx: Tx, path: &str, value: &[u8]) -> Result<(), XsError> {
        self.note("write", tx, path);
        self.inner.write(tx, path, value)
    }
    fn directory(&self, tx: Tx, path: &str) -> Result<Vec<String>, XsError> {
        use std::sync::atomic::Ordering::SeqCst;
        if self
            .fail_dirs
            .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(XsError::Io(std::io::Error::other(
                "injected directory failure",
            )));
        }
        self.inner.directory(tx, path)
    }
    fn mkdir(&self, tx: Tx, path: &str) -> Result<(), XsError> {
        self.note("mkdir", tx, path);
        self.inner.mkdir(tx, path)
    }
    fn rm(&self, tx: Tx, path: &str) -> Result<(), XsError> {
        self.note("rm", tx, path);
        self.inner.rm(tx, path)
    }
    fn get_perms(&self, tx: Tx, path: &str) -> Result<Vec<Perm>, XsError> {
        self.inner.get_perms(tx, path)
    }
    fn set_perms(&self, tx: Tx, path: &str, perms: &[Perm]) -> Result<(), XsError> {
        self.note("set_perms", tx, path);
        self.inner.set_perms(tx, path, perms)
    }
    fn begin(&self) -> Result<Tx, XsError> {
        let t = self.inner.begin()?;
        self.note("begin", t, "");
        Ok(t)
    }
    fn end(&self, tx: Tx, commit: bool) -> Result<Committed, XsError> {
        if commit {
            let hook = self.before_commit.lock().unwrap().take();
            if let Some(h) = hook {
                h();
            }
        }
        let r = self.inner.end(tx, commit)?;
        self.note(
            match (commit, r) {
                (true, Committed::Done) => "commit",
                (true, Committed::Retry) => "retry",
                (false, _) => "abort",
            },
            tx,
            "",
        );
        Ok(r)
    }
    fn watch(&self, path: &str, token: &str) -> Result<(), XsError> {
        self.inner.watch(path, token)
    }
    fn unwatch(&self, path: &str, token: &str) -> Result<(), XsError> {
        self.inner.unwatch(path, token)
    }
    fn take_watch_events(&self) -> Result<Vec<WatchEvent>, XsError> {
        self.inner.take_watch_events()
    }
    fn has_pending_events(&self) -> bool {
        self.inner.has_pending_events()
    }
}

pub type TestBackend = Backend<Rec<MemXsConn>, FakeTap>;

/// The in-memory store, the fake tapdisks and a dom0 connection for the toolstack role.
pub struct Rig {
    pub store: MemXenStore,
    pub dom0: MemXsConn,
    pub tap: FakeTap,
    pub log: Arc<Mutex<Vec<Op>>>,
    pub before_commit: Hook,
    /// This many next `directory` calls of the backend's connection fail (EIO).
    pub fail_dirs: Arc<std::sync::atomic::AtomicU32>,
}

/// A device as the toolstack set it up.
#[derive(Clone, Debug)]
pub struct Vbd {
    pub fe: DomId,
    pub devid: u32,
    pub fpath: String,
    pub bpath: String,
}

impl Vbd {
    pub fn id(&self) -> DeviceId {
        DeviceId {
            domid: self.fe.0,
            devid: self.devid,
        }
    }
    pub fn f(&self, key: &str) -> String {
        format!("{}/{key}", self.fpath)
    }
    pub fn b(&self, key: &str) -> String {
        format!("{}/{key}", self.bpath)
    }
}

impl Default for Rig {
    fn default() -> Self {
        Rig::new()
    }
}

impl Rig {
    pub fn new() -> Rig {
        let store = MemXenStore::new();
        let dom0 = store.connect(BE).unwrap();
        Rig {
            store,
            dom0,
            tap: FakeTap::default(),
            log: Arc::default(),
            before_commit: Arc::default(),
            fail_dirs: Arc::default(),
        }
    }

    pub fn backend(&self, cfg: BackendConfig) -> TestBackend {
        let xs = Rec {
            inner: self.store.connect(BE).unwrap(),
            log: Arc::clone(&self.log),
            before_commit: Arc::clone(&self.before_commit),
            fail_dirs: Arc::clone(&self.fail_dirs),
        };
        Backend::new(xs, self.tap.clone(), cfg, Instant::now()).unwrap()
    }

    /// A backend with the default configuration that has handled what is already there.
    pub fn started(&self) -> TestBackend {
        let mut b = self.backend(BackendConfig::default());
        pump(&mut b);
        b
    }

    /// The toolstack creates a vbd3 device served by tapdisk `pid` minor `minor`, announced
    /// through `physical-device-path`.
    pub fn add_vbd(&self, fe: u16, devid: u32, pid: i32, minor: u16) -> Vbd {
        let v = self.add_vbd_bare(fe, devid);
        self.wb(
            &v,
            "physical-device-path",
            &format!("/run/blktap-control/nbd{pid}.{minor}"),
        );
        v
    }

    /// The toolstack's nodes only (no locator key).
    pub fn add_vbd_bare(&self, fe: u16, devid: u32) -> Vbd {
        let (fpath, bpath) =
            toolstack_add_vbd(&self.dom0, "vbd3", BE, DomId(fe), devid, false).unwrap();
        Vbd {
            fe: DomId(fe),
            devid,
            fpath,
            bpath,
        }
    }

    /// Write a backend key as the toolstack.
    pub fn wb(&self, v: &Vbd, key: &str, val: &str) {
        self.dom0
            .write(Tx::NONE, &v.b(key), val.as_bytes())
            .unwrap();
    }

    /// Read a key as dom0.
    pub fn read(&self, path: &str) -> Option<String> {
        self.dom0
            .read(Tx::NONE, path)
            .unwrap()
            .map(|v| String::from_utf8(v).unwrap())
    }

    /// A connection acting as the frontend domain.
    pub fn fe_conn(&self, v: &Vbd) -> MemXsConn {
        self.store.connect(v.fe).unwrap()
    }

    /// The frontend writes `kv` in one transaction (like blkfront), then `state`.
    pub fn fe_write(&self, v: &Vbd, kv: &[(&str, &str)]) {
        let xs = self.fe_conn(v);
        blktap3::xen::transaction(&xs, |tx| {
            for (k, val) in kv {
                xs.write(tx, &v.f(k), val.as_bytes())?;
            }
            Ok(())
        })
        .unwrap();
    }

    pub fn fe_state(&self, v: &Vbd, s: u32) {
        self.fe_write(v, &[("state", &s.to_string())]);
    }

    /// The frontend publishes a single-page x86_64 ring and goes Initialised.
    pub fn fe_publish(&self, v: &Vbd, ring_ref: u32, port: u32) {
        let r = ring_ref.to_string();
        let p = port.to_string();
        self.fe_write(
            v,
            &[
                ("ring-ref", &r),
                ("event-channel", &p),
                ("protocol", "x86_64-abi"),
                ("feature-persistent", "0"),
                ("state", "3"),
            ],
        );
    }

    pub fn bstate(&self, v: &Vbd) -> Option<String> {
        self.read(&v.b("state"))
    }

    pub fn ops(&self) -> Vec<Op> {
        self.log.lock().unwrap().clone()
    }
}

/// Pump the backend until no watch events are left.
pub fn pump(b: &mut TestBackend) {
    b.handle_events(Instant::now()).unwrap();
    while b.more_events() {
        b.handle_events(Instant::now()).unwrap();
    }
}

pub fn status(b: &TestBackend, v: &Vbd) -> DeviceStatus {
    b.device(v.id()).expect("device known")
}
