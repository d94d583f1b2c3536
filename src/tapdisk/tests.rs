//! Event-loop tests: VBD lifecycle, pause/resume draining, markers, NBD through the loop.
//! Images are simulated ([`MemImage`] behind a gate that can hold I/O in the worker).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use super::daemon::{Config, ImageOpener, OpenSpec, Tapdisk};
use super::mem::MemImage;
use super::vbd::{DiskInfo, VDISK_READONLY};
use super::CtlHandle;
use crate::control::msg::{
    Blkif, BlkifProto, ListEntry, OpenFlags, OpenRequest, Reply, Request, ResumeRequest, VbdState,
};
use crate::image::{Extent, Image, ImageError, ImageInfo};
use crate::nbd::client::{Client, ClientReply};
use crate::nbd::proto::{self, RequestHeader};

/// A MemImage whose reads and writes wait while the gate is closed. It records the name of
/// the thread each read and write ran on, and says it is memory-backed when told to.
#[derive(Debug)]
struct GateImage {
    inner: MemImage,
    gate: Arc<(Mutex<bool>, Condvar)>,
    memory: bool,
    threads: Mutex<Vec<String>>,
}

impl GateImage {
    fn wait(&self) {
        let name = std::thread::current().name().unwrap_or("").to_string();
        self.threads.lock().unwrap().push(name);
        let (m, c) = &*self.gate;
        let mut open = m.lock().unwrap();
        while !*open {
            open = c.wait(open).unwrap();
        }
    }
}

impl Image for GateImage {
    fn info(&self) -> ImageInfo {
        self.inner.info()
    }
    fn read(&self, sector: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        self.wait();
        self.inner.read(sector, buf)
    }
    fn write(&self, sector: u64, buf: &[u8]) -> Result<(), ImageError> {
        self.wait();
        self.inner.write(sector, buf)
    }
    fn flush(&self) -> Result<(), ImageError> {
        self.inner.flush()
    }
    fn discard(&self, sector: u64, n: u64) -> Result<(), ImageError> {
        self.inner.discard(sector, n)
    }
    fn block_status(&self, sector: u64, n: u64) -> Result<Vec<Extent>, ImageError> {
        self.inner.block_status(sector, n)
    }
    fn close(&self) -> Result<(), ImageError> {
        self.inner.close()
    }
    fn memory_backed(&self) -> bool {
        self.memory
    }
}

/// Opens "images" by path from a table; every open creates a fresh GateImage sharing
/// the path's gate, with the configured size.
#[derive(Debug, Default)]
struct TableOpener {
    sizes: Mutex<HashMap<PathBuf, u64>>,
    gate: Arc<(Mutex<bool>, Condvar)>,
    opened: Mutex<Vec<Arc<GateImage>>>,
    /// Open images that say they are memory-backed.
    memory: std::sync::atomic::AtomicBool,
}

impl TableOpener {
    fn new() -> Arc<Self> {
        let o = TableOpener::default();
        *o.gate.0.lock().unwrap() = true;
        Arc::new(o)
    }
    fn add(&self, path: &str, sectors: u64) {
        self.sizes.lock().unwrap().insert(path.into(), sectors);
    }
    fn set_gate(&self, open: bool) {
        *self.gate.0.lock().unwrap() = open;
        self.gate.1.notify_all();
    }
    fn last(&self) -> Arc<GateImage> {
        self.opened.lock().unwrap().last().unwrap().clone()
    }
}

impl ImageOpener for TableOpener {
    fn open(&self, spec: &OpenSpec) -> Result<Arc<dyn Image>, ImageError> {
        let Some(&n) = self.sizes.lock().unwrap().get(&spec.path) else {
            return Err(ImageError::io(
                &spec.path,
                "open",
                std::io::Error::from_raw_os_error(libc::ENOENT),
            ));
        };
        let img = Arc::new(GateImage {
            inner: MemImage::new(n, spec.read_only),
            gate: self.gate.clone(),
            memory: self.memory.load(std::sync::atomic::Ordering::Relaxed),
            threads: Mutex::new(Vec::new()),
        });
        self.opened.lock().unwrap().push(img.clone());
        Ok(img)
    }
}

struct Harness {
    h: CtlHandle,
    thread: Option<JoinHandle<()>>,
    dir: tempfile::TempDir,
    pid: i32,
}

impl Harness {
    fn start(opener: Arc<TableOpener>, markers: bool) -> Harness {
        Harness::start_with(opener, markers, |_| {})
    }

    fn start_with(opener: Arc<TableOpener>, markers: bool, f: impl FnOnce(&mut Config)) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = Config::new(dir.path());
        f(&mut cfg);
        cfg.opener = opener;
        cfg.lock_markers = markers;
        cfg.io_threads = 2;
        let pid = cfg.pid;
        let (tx, rx) = channel();
        let thread = std::thread::spawn(move || {
            let mut td = Tapdisk::new(cfg).unwrap();
            tx.send(td.handle()).unwrap();
            td.run().unwrap();
        });
        Harness {
            h: rx.recv().unwrap(),
            thread: Some(thread),
            dir,
            pid,
        }
    }

    fn call(&self, r: Request) -> Reply {
        self.h.call(r)
    }

    /// Send without waiting for the answer.
    fn call_async(&self, r: Request) -> Receiver<Reply> {
        let (tx, rx) = channel();
        let h = self.h.clone();
        std::thread::spawn(move || tx.send(h.call(r)).unwrap());
        rx
    }

    fn nbd(&self, minor: u16) -> PathBuf {
        self.dir.path().join(format!("nbd{}.{minor}", self.pid))
    }

    fn open(&self, minor: u16, params: &str, flags: u32) -> Reply {
        let mut o = OpenRequest::new(minor, params);
        o.flags = OpenFlags(flags);
        self.call(Request::Open(o))
    }

    fn resume(&self, minor: u16, params: Option<&str>) -> Reply {
        self.call(Request::Resume(ResumeRequest {
            minor,
            flags: OpenFlags::empty(),
            params: params.map(String::from),
            secondary: None,
            log_path: None,
        }))
    }

    fn exited(&mut self) -> bool {
        let t = self.thread.take().unwrap();
        for _ in 0..200 {
            if t.is_finished() {
                t.join().unwrap();
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.thread = Some(t);
        false
    }
}

fn open_minor(h: &Harness, minor: u16, path: &str) {
    assert_eq!(h.call(Request::Attach { minor }), Reply::Attach);
    assert!(matches!(h.open(minor, path, 0), Reply::Open(_)));
}

#[test]
fn lifecycle_attach_open_close_detach_then_exit() {
    let op = TableOpener::new();
    op.add("/a", 2048);
    let mut h = Harness::start(op, false);
    assert_eq!(h.call(Request::Pid), Reply::Pid(h.pid));
    assert_eq!(h.open(1, "aio:/a", 0), Reply::Error(libc::EINVAL));
    assert_eq!(h.call(Request::Attach { minor: 1 }), Reply::Attach);
    assert_eq!(
        h.call(Request::Attach { minor: 1 }),
        Reply::Error(libc::EEXIST)
    );
    assert_eq!(h.call(Request::List), only_closed(1));
    assert_eq!(h.open(1, "aio:/missing", 0), Reply::Error(libc::ENOENT));
    assert_eq!(h.open(1, "qcow:/a", 0), Reply::Error(libc::ENOSYS));
    for f in [
        OpenFlags::SECONDARY,
        OpenFlags::ADD_LOG,
        OpenFlags::REUSE_PRT,
        OpenFlags::ADD_LCACHE,
    ] {
        assert_eq!(h.open(1, "aio:/a", f.0), Reply::Error(libc::EOPNOTSUPP));
    }
    let info = DiskInfo {
        sectors: 2048,
        sector_size: 512,
        info: 0,
    };
    assert_eq!(h.open(1, "aio:/a", 0), Reply::Open(info));
    assert!(h.nbd(1).exists());
    assert_eq!(h.open(1, "aio:/a", 0), Reply::Error(libc::EALREADY));
    assert_eq!(
        h.call(Request::DiskInfo { minor: 1 }),
        Reply::DiskInfo(info)
    );
    let Reply::Stats(s) = h.call(Request::Stats { minor: Some(1) }) else {
        panic!()
    };
    let s = String::from_utf8(s).unwrap();
    assert!(
        s.starts_with("{ \"name\": \"aio:/a\", \"secs\": [ 0, 0 ]"),
        "{s}"
    );
    assert!(s.contains("\"driver\": { \"type\": 0, \"name\": \"aio\""));
    let Reply::Stats(all) = h.call(Request::Stats { minor: None }) else {
        panic!()
    };
    let all = String::from_utf8(all).unwrap();
    assert_eq!(all, format!("[ {s} ]"));
    assert_eq!(
        h.call(Request::Detach { minor: 1 }),
        Reply::Error(libc::EBUSY)
    );
    // The real Xen devices are opened at the first CONNECT: without /dev/xen that fails.
    if !std::path::Path::new("/dev/xen/gntdev").exists() {
        assert_eq!(
            h.call(Request::XenblkifConnect {
                minor: 1,
                blkif: blkif()
            }),
            Reply::Error(libc::ENOENT)
        );
    }
    assert_eq!(
        h.call(Request::XenblkifDisconnect { domid: 1, devid: 2 }),
        Reply::Error(libc::ENODEV)
    );
    assert_eq!(
        h.call(Request::XenblkifConnect {
            minor: 9,
            blkif: blkif()
        }),
        Reply::Error(libc::ENODEV)
    );
    assert_eq!(h.call(Request::Close { minor: 1 }), Reply::Close);
    assert!(!h.nbd(1).exists());
    assert_eq!(h.call(Request::List), only_closed(1));
    assert_eq!(h.call(Request::Detach { minor: 1 }), Reply::Detach);
    assert!(h.exited(), "tapdisk must exit after the last detach");
    assert_eq!(h.call(Request::Pid), Reply::Error(libc::ESHUTDOWN));
}

#[test]
fn read_only_open_reports_readonly_and_refuses_writes() {
    let op = TableOpener::new();
    op.add("/ro", 64);
    let h = Harness::start(op, false);
    h.call(Request::Attach { minor: 0 });
    let Reply::Open(i) = h.open(0, "aio:/ro", OpenFlags::RDONLY.0) else {
        panic!()
    };
    assert_eq!(i.info, VDISK_READONLY);
    let mut c = Client::connect(&h.nbd(0), false).unwrap();
    assert_ne!(c.flags & proto::TFLAG_READ_ONLY, 0);
    assert_eq!(c.write(0, &[1u8; 512], false).unwrap(), proto::NBD_EPERM);
    assert_eq!(c.read(0, 512).unwrap(), Ok(vec![0u8; 512]));
}

#[test]
fn pause_drains_inflight_io_closes_image_and_resume_checks_geometry() {
    let op = TableOpener::new();
    op.add("/leaf", 4096);
    op.add("/bigger", 8192);
    op.add("/snap", 4096);
    let h = Harness::start(op.clone(), false);
    open_minor(&h, 2, "vhd:/leaf");
    let mut c = Client::connect(&h.nbd(2), false).unwrap();
    assert_eq!(c.write(0, &[0x11u8; 4096], false).unwrap(), 0);

    // A write stuck in the image holds the pause back.
    op.set_gate(false);
    let w = RequestHeader {
        flags: 0,
        typ: proto::CMD_WRITE,
        cookie: 77,
        offset: 4096,
        length: 512,
    };
    c.send(&w, &[0x22u8; 512]).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let paused = h.call_async(Request::Pause { minor: 2 });
    assert!(paused.recv_timeout(Duration::from_millis(300)).is_err());
    let Reply::List(l) = h.call(Request::List) else {
        panic!()
    };
    assert!(l[0].state.contains(VbdState::PAUSE_REQUESTED));
    assert_eq!(
        h.call(Request::Pause { minor: 2 }),
        Reply::Error(libc::EBUSY)
    );
    let first = op.last();
    op.set_gate(true);
    assert_eq!(
        paused.recv_timeout(Duration::from_secs(5)).unwrap(),
        Reply::Pause
    );
    assert!(first.inner.is_closed());
    let mut data = Vec::new();
    assert_eq!(
        c.recv(None, &mut data).unwrap(),
        ClientReply::Simple {
            cookie: 77,
            error: 0
        }
    );
    let Reply::List(l) = h.call(Request::List) else {
        panic!()
    };
    assert_eq!(l[0].state, VbdState::PAUSED);
    // DISK_INFO still answers while paused.
    assert!(matches!(
        h.call(Request::DiskInfo { minor: 2 }),
        Reply::DiskInfo(_)
    ));

    // Requests sent while paused wait for the resume.
    let r = RequestHeader {
        flags: 0,
        typ: proto::CMD_READ,
        cookie: 78,
        offset: 0,
        length: 512,
    };
    c.send(&r, &[]).unwrap();
    c.stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    assert!(c.recv(Some(512), &mut data).is_err());
    c.stream.set_read_timeout(None).unwrap();

    assert_eq!(
        h.resume(2, Some("vhd:/bigger")),
        Reply::Error(libc::EMEDIUMTYPE)
    );
    let Reply::List(l) = h.call(Request::List) else {
        panic!()
    };
    assert_eq!(l[0].state, VbdState::PAUSED | VbdState::RESUME_FAILED);
    assert_eq!(h.resume(2, Some("vhd:/snap")), Reply::Resume);
    let Reply::List(l) = h.call(Request::List) else {
        panic!()
    };
    assert_eq!(
        (l[0].state, l[0].params.as_str()),
        (VbdState(0), "vhd:/snap")
    );
    assert_eq!(
        c.recv(Some(512), &mut data).unwrap(),
        ClientReply::Simple {
            cookie: 78,
            error: 0
        }
    );
    assert_eq!(h.resume(2, None), Reply::Error(libc::EINVAL));
}

#[test]
fn close_while_paused_and_force_close_drop_clients() {
    let op = TableOpener::new();
    op.add("/x", 64);
    let h = Harness::start(op, false);
    open_minor(&h, 0, "aio:/x");
    open_minor(&h, 1, "aio:/x");
    assert_eq!(h.call(Request::Pause { minor: 0 }), Reply::Pause);
    assert_eq!(h.call(Request::Pause { minor: 0 }), Reply::Pause);
    assert_eq!(h.call(Request::Close { minor: 0 }), Reply::Close);
    assert_eq!(h.call(Request::Detach { minor: 0 }), Reply::Detach);
    let mut c = Client::connect(&h.nbd(1), false).unwrap();
    assert_eq!(h.call(Request::ForceShutdown { minor: 1 }), Reply::Close);
    // The connection was dropped: the next request sees EOF.
    let _ = c.send(
        &RequestHeader {
            flags: 0,
            typ: proto::CMD_FLUSH,
            cookie: 1,
            offset: 0,
            length: 0,
        },
        &[],
    );
    assert!(c.recv(None, &mut Vec::new()).is_err());
    // The loop still runs (minor 1 is attached).
    assert_eq!(h.call(Request::Pid), Reply::Pid(h.pid));
}

#[test]
fn attach_locks_the_marker_file() {
    let op = TableOpener::new();
    let h = Harness::start(op.clone(), true);
    assert_eq!(
        h.call(Request::Attach { minor: 4 }),
        Reply::Error(libc::EPERM)
    );
    let mdir = h.dir.path().join("tapdisk");
    std::fs::create_dir_all(&mdir).unwrap();
    std::fs::write(mdir.join("tapdisk-4"), b"").unwrap();
    assert_eq!(h.call(Request::Attach { minor: 4 }), Reply::Attach);
    // A second tapdisk cannot take the same minor.
    let mut cfg = Config::new(h.dir.path());
    cfg.opener = op;
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        let mut td = Tapdisk::new(cfg).unwrap();
        td.keep_running_when_empty();
        tx.send(td.handle()).unwrap();
        td.run().unwrap();
    });
    let other = rx.recv().unwrap();
    assert_eq!(
        other.call(Request::Attach { minor: 4 }),
        Reply::Error(libc::EBUSY)
    );
    assert_eq!(h.call(Request::Detach { minor: 4 }), Reply::Detach);
    assert_eq!(other.call(Request::Attach { minor: 4 }), Reply::Attach);
}

#[test]
fn nbd_pipelined_requests_block_status_and_dead_client() {
    let op = TableOpener::new();
    op.add("/d", 2048);
    let h = Harness::start(op.clone(), false);
    open_minor(&h, 3, "aio:/d");
    let mut c = Client::connect(&h.nbd(3), true).unwrap();
    assert_eq!(c.size, 2048 * 512);
    for i in 0..16u64 {
        let w = RequestHeader {
            flags: 0,
            typ: proto::CMD_WRITE,
            cookie: i,
            offset: i * 4096,
            length: 4096,
        };
        c.send(&w, &vec![i as u8; 4096]).unwrap();
    }
    assert_eq!(ok_cookies(&mut c, 16), (0..16).collect::<Vec<_>>());
    // Unaligned structured read crossing two written blocks.
    c.send(
        &RequestHeader {
            flags: 0,
            typ: proto::CMD_READ,
            cookie: 100,
            offset: 4096 - 10,
            length: 20,
        },
        &[],
    )
    .unwrap();
    match c.recv(None, &mut Vec::new()).unwrap() {
        ClientReply::Chunk {
            cookie: 100,
            typ: proto::REPLY_TYPE_OFFSET_DATA,
            payload,
            ..
        } => {
            assert_eq!(payload[..8], (4096u64 - 10).to_be_bytes());
            assert_eq!(payload[8..18], [0u8; 10]);
            assert_eq!(payload[18..28], [1u8; 10]);
        }
        r => panic!("{r:?}"),
    }
    // Allocation: 64 KiB written, the rest a hole.
    c.send(
        &RequestHeader {
            flags: 0,
            typ: proto::CMD_BLOCK_STATUS,
            cookie: 101,
            offset: 0,
            length: 1 << 20,
        },
        &[],
    )
    .unwrap();
    match c.recv(None, &mut Vec::new()).unwrap() {
        ClientReply::Chunk {
            typ: proto::REPLY_TYPE_BLOCK_STATUS,
            payload,
            ..
        } => {
            let words: Vec<u32> = payload
                .chunks(4)
                .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            assert_eq!(words, vec![1, 65536, 0, (1 << 20) - 65536, 3]);
        }
        r => panic!("{r:?}"),
    }
    // Out of range read: an error chunk, connection stays.
    c.send(
        &RequestHeader {
            flags: 0,
            typ: proto::CMD_READ,
            cookie: 102,
            offset: 2048 * 512,
            length: 512,
        },
        &[],
    )
    .unwrap();
    match c.recv(None, &mut Vec::new()).unwrap() {
        ClientReply::Chunk {
            typ: proto::REPLY_TYPE_ERROR,
            payload,
            ..
        } => assert_eq!(payload[..4], proto::NBD_EINVAL.to_be_bytes()),
        r => panic!("{r:?}"),
    }

    // A client that disconnects with requests stuck in the image.
    let mut d = Client::connect(&h.nbd(3), false).unwrap();
    op.set_gate(false);
    for i in 0..8u64 {
        let r = RequestHeader {
            flags: 0,
            typ: proto::CMD_READ,
            cookie: i,
            offset: 0,
            length: 4096,
        };
        d.send(&r, &[]).unwrap();
    }
    std::thread::sleep(Duration::from_millis(100));
    drop(d);
    std::thread::sleep(Duration::from_millis(100));
    op.set_gate(true);
    // Completions for the dead client are dropped; the counters settle to zero.
    let mut ok = false;
    for _ in 0..100 {
        let Reply::Stats(s) = h.call(Request::Stats { minor: Some(3) }) else {
            panic!()
        };
        let s = String::from_utf8(s).unwrap();
        if s.contains("\"reqs_outstanding\": 0") {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(ok);
    // The other client is unaffected.
    let mut e = Client::connect(&h.nbd(3), false).unwrap();
    assert_eq!(e.read(4096, 512).unwrap(), Ok(vec![1u8; 512]));
    let Reply::Stats(s) = h.call(Request::Stats { minor: Some(3) }) else {
        panic!()
    };
    let s = String::from_utf8(s).unwrap();
    assert!(s.contains("\"secs\": [ "), "{s}");
    assert!(!s.contains("\"secs\": [ 0, 0 ]"), "{s}");
    drop(c);
}

/// Pipelined writes from two clients, then reads, a flush and block status, on a
/// memory-backed image: answered correctly, and the reads and writes ran where the
/// configuration says (the loop thread when inline I/O is on, the td-io workers when off).
fn nbd_on_a_memory_backed_image(inline: bool) {
    let op = TableOpener::new();
    op.memory.store(true, std::sync::atomic::Ordering::Relaxed);
    op.add("/m", 4096);
    let h = Harness::start_with(op.clone(), false, |c| c.inline_io = inline);
    open_minor(&h, 1, "aio:/m");
    let mut clients: Vec<Client> = (0..2)
        .map(|_| Client::connect(&h.nbd(1), false).unwrap())
        .collect();
    // 40 writes per client in flight at once (more than one read batch of the loop).
    for (k, c) in clients.iter_mut().enumerate() {
        for i in 0..40u64 {
            let block = k as u64 * 40 + i;
            let w = RequestHeader {
                flags: 0,
                typ: proto::CMD_WRITE,
                cookie: block,
                offset: block * 4096,
                length: 4096,
            };
            c.send(&w, &vec![block as u8 + 1; 4096]).unwrap();
        }
    }
    for (k, c) in clients.iter_mut().enumerate() {
        let first = k as u64 * 40;
        assert_eq!(ok_cookies(c, 40), (first..first + 40).collect::<Vec<_>>());
    }
    let c = &mut clients[0];
    for block in 0..80u64 {
        let want = vec![block as u8 + 1; 4096];
        assert_eq!(
            c.read(block * 4096, 4096).unwrap(),
            Ok(want),
            "block {block}"
        );
    }
    assert_eq!(c.read(80 * 4096, 512).unwrap(), Ok(vec![0u8; 512]));
    let f = RequestHeader {
        flags: 0,
        typ: proto::CMD_FLUSH,
        cookie: 7,
        offset: 0,
        length: 0,
    };
    c.send(&f, &[]).unwrap();
    assert!(matches!(
        c.recv(None, &mut Vec::new()).unwrap(),
        ClientReply::Simple {
            cookie: 7,
            error: 0
        }
    ));
    let threads = op.last().threads.lock().unwrap().clone();
    assert_eq!(threads.len(), 80 + 81);
    let on_workers = threads.iter().filter(|t| t.starts_with("td-io")).count();
    if inline {
        assert_eq!(on_workers, 0, "{threads:?}");
    } else {
        assert_eq!(on_workers, threads.len(), "{threads:?}");
    }
    // Nothing is left counted as outstanding.
    let Reply::Stats(s) = h.call(Request::Stats { minor: Some(1) }) else {
        panic!()
    };
    let s = String::from_utf8(s).unwrap();
    assert!(s.contains("\"reqs_outstanding\": 0"), "{s}");
}

#[test]
fn memory_backed_images_are_served_inline_on_the_loop() {
    nbd_on_a_memory_backed_image(true);
}

#[test]
fn inline_io_off_sends_memory_backed_io_to_the_workers() {
    nbd_on_a_memory_backed_image(false);
}

fn blkif() -> Blkif {
    Blkif {
        domid: 1,
        devid: 51712,
        gref: [0; 16],
        order: 0,
        proto: BlkifProto::Native,
        pool: String::new(),
        port: 5,
        poll_duration: 0,
        poll_idle_threshold: 0,
        queue: 0,
    }
}

#[test]
fn clients_stuck_in_the_handshake_are_dropped() {
    let op = TableOpener::new();
    op.add("/h", 64);
    let h = Harness::start_with(op, false, |c| {
        c.handshake_timeout = Duration::from_millis(500)
    });
    open_minor(&h, 0, "aio:/h");
    let mut slow = std::os::unix::net::UnixStream::connect(h.nbd(0)).unwrap();
    let mut done = Client::connect(&h.nbd(0), false).unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    use std::io::Read;
    let mut g = [0u8; 18];
    slow.read_exact(&mut g).unwrap(); // the greeting was sent
    slow.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(
        slow.read(&mut g).unwrap(),
        0,
        "stuck client must be disconnected"
    );
    // A client past the handshake is not affected.
    assert_eq!(done.read(0, 512).unwrap(), Ok(vec![0u8; 512]));
}

#[test]
fn a_connection_pins_at_most_64_mib_of_buffers() {
    let op = TableOpener::new();
    op.add("/big", 131072); // 64 MiB
    let h = Harness::start(op.clone(), false);
    open_minor(&h, 0, "aio:/big");
    let mut c = Client::connect(&h.nbd(0), false).unwrap();
    op.set_gate(false);
    for i in 0..6u64 {
        c.send(
            &RequestHeader {
                flags: 0,
                typ: proto::CMD_READ,
                cookie: i,
                offset: 0,
                length: 32 << 20,
            },
            &[],
        )
        .unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    let Reply::Stats(s) = h.call(Request::Stats { minor: Some(0) }) else {
        panic!()
    };
    let s = String::from_utf8(s).unwrap();
    assert!(s.contains("\"reqs_outstanding\": 2"), "{s}");
    op.set_gate(true);
    let mut data = Vec::new();
    for _ in 0..6 {
        assert!(matches!(
            c.recv(Some(32 << 20), &mut data).unwrap(),
            ClientReply::Simple { error: 0, .. }
        ));
    }
}

#[test]
fn block_status_describes_at_most_32_mib_per_request() {
    let op = TableOpener::new();
    op.add("/bs", 262144); // 128 MiB
    let h = Harness::start(op, false);
    open_minor(&h, 0, "aio:/bs");
    let mut c = Client::connect(&h.nbd(0), true).unwrap();
    for (cookie, offset) in [(1u64, 0u64), (2, 64 << 20)] {
        c.send(
            &RequestHeader {
                flags: 0,
                typ: proto::CMD_BLOCK_STATUS,
                cookie,
                offset,
                length: 64 << 20,
            },
            &[],
        )
        .unwrap();
        match c.recv(None, &mut Vec::new()).unwrap() {
            ClientReply::Chunk {
                cookie: got,
                typ: proto::REPLY_TYPE_BLOCK_STATUS,
                payload,
                ..
            } => {
                assert_eq!(got, cookie);
                let words: Vec<u32> = payload
                    .chunks(4)
                    .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                assert_eq!(words, vec![1, 32 << 20, 3]);
            }
            r => panic!("{r:?}"),
        }
    }
}

/// Receive `n` simple replies, each a success, and return their cookies in order.
fn ok_cookies(c: &mut Client, n: usize) -> Vec<u64> {
    let mut seen: Vec<u64> = (0..n)
        .map(|_| match c.recv(None, &mut Vec::new()).unwrap() {
            ClientReply::Simple { cookie, error: 0 } => cookie,
            r => panic!("{r:?}"),
        })
        .collect();
    seen.sort();
    seen
}

/// The LIST reply of a tapdisk whose one VBD, `minor`, is attached with nothing open.
fn only_closed(minor: u16) -> Reply {
    Reply::List(vec![ListEntry {
        minor,
        state: VbdState::CLOSED,
        params: String::new(),
    }])
}

/// `reqs_outstanding` of minor 0 (requests in the engine).
fn outstanding(h: &Harness) -> u64 {
    let Reply::Stats(s) = h.call(Request::Stats { minor: Some(0) }) else {
        panic!()
    };
    let s = String::from_utf8(s).unwrap();
    let v = s
        .split("\"reqs_outstanding\": ")
        .nth(1)
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok());
    v.unwrap_or_else(|| panic!("no reqs_outstanding in {s}"))
}

fn nbd_header(typ: u16, cookie: u64, offset: u64, length: u32) -> RequestHeader {
    RequestHeader {
        flags: 0,
        typ,
        cookie,
        offset,
        length,
    }
}

#[test]
fn nbd_clients_together_pin_at_most_the_memory_limit() {
    // Clients that never read their replies used to pin 64 MiB each, however many of them
    // there were (scripts/hostile-peers.sh, never-read: 613 MiB RSS with 8 clients).
    let op = TableOpener::new();
    op.add("/lim", 65536); // 32 MiB
    let h = Harness::start_with(op.clone(), false, |c| c.nbd_mem_limit = 8 << 20);
    open_minor(&h, 0, "aio:/lim");
    op.set_gate(false);
    let mut a = Client::connect(&h.nbd(0), false).unwrap();
    let mut b = Client::connect(&h.nbd(0), false).unwrap();
    let mut small = Client::connect(&h.nbd(0), false).unwrap();
    for i in 0..4 {
        a.send(&nbd_header(proto::CMD_READ, i, 0, 4 << 20), &[])
            .unwrap();
    }
    std::thread::sleep(Duration::from_millis(200));
    for i in 0..2 {
        b.send(&nbd_header(proto::CMD_READ, i, 0, 4 << 20), &[])
            .unwrap();
    }
    std::thread::sleep(Duration::from_millis(200));
    // A light client is still served past the limit.
    small
        .send(&nbd_header(proto::CMD_READ, 9, 0, 64 << 10), &[])
        .unwrap();
    let mut n = 0;
    for _ in 0..100 {
        n = outstanding(&h);
        if n >= 3 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    let n = n.max(outstanding(&h));
    op.set_gate(true);
    assert_eq!(n, 3, "2 x 4 MiB fill the 8 MiB, plus the 64 KiB");
    op.set_gate(true);
    // Everything is served once memory frees (each client reading its replies: one that does
    // not would keep the others' large reads waiting, by design).
    let reader = |mut c: Client, n: usize, len: usize| {
        std::thread::spawn(move || {
            let mut d = Vec::new();
            (0..n)
                .map(|_| match c.recv(Some(len), &mut d).unwrap() {
                    ClientReply::Simple { error: 0, cookie } => cookie,
                    r => panic!("{r:?}"),
                })
                .collect::<std::collections::BTreeSet<u64>>()
                .into_iter()
                .collect::<Vec<u64>>()
        })
    };
    let (ra, rb, rs) = (
        reader(a, 4, 4 << 20),
        reader(b, 2, 4 << 20),
        reader(small, 1, 64 << 10),
    );
    assert_eq!(ra.join().unwrap(), vec![0, 1, 2, 3]);
    assert_eq!(rb.join().unwrap(), vec![0, 1]);
    assert_eq!(rs.join().unwrap(), vec![9]);
}

#[test]
fn stalled_write_payloads_count_against_the_memory_limit() {
    // A WRITE header with a large length used to get its whole buffer at once, for as long as
    // the client cared to stall: 32 MiB per connection, any number of connections.
    let op = TableOpener::new();
    op.add("/st", 65536); // 32 MiB
    let h = Harness::start_with(op, false, |c| c.nbd_mem_limit = 8 << 20);
    open_minor(&h, 0, "aio:/st");
    let mut stalled = Vec::new();
    for i in 0..2u64 {
        let mut c = Client::connect(&h.nbd(0), false).unwrap();
        c.send(&nbd_header(proto::CMD_WRITE, i, 0, 4 << 20), &[1; 4096])
            .unwrap();
        stalled.push(c);
    }
    std::thread::sleep(Duration::from_millis(200));
    let mut big = Client::connect(&h.nbd(0), false).unwrap();
    let t = std::thread::spawn(move || {
        let e = big.write(8 << 20, &vec![2u8; 4 << 20], false).unwrap();
        (e, std::time::Instant::now())
    });
    std::thread::sleep(Duration::from_millis(300));
    // A small write is served meanwhile.
    let mut small = Client::connect(&h.nbd(0), false).unwrap();
    assert_eq!(small.write(16 << 20, &[3u8; 4096], false).unwrap(), 0);
    assert!(!t.is_finished(), "the 4 MiB write must wait for memory");
    let released = std::time::Instant::now();
    drop(stalled);
    let (e, done) = t.join().unwrap();
    assert_eq!(e, 0);
    assert!(done >= released);
    assert_eq!(small.read(8 << 20, 512).unwrap(), Ok(vec![2u8; 512]));
}

#[test]
fn requests_of_a_departed_client_still_count_against_the_memory_limit() {
    // A client that sends reads and disconnects left their buffers uncounted: reconnecting
    // could pile up requests in the engine without limit.
    let op = TableOpener::new();
    op.add("/dep", 65536); // 32 MiB
    let h = Harness::start_with(op.clone(), false, |c| c.nbd_mem_limit = 8 << 20);
    open_minor(&h, 0, "aio:/dep");
    op.set_gate(false);
    let mut a = Client::connect(&h.nbd(0), false).unwrap();
    for i in 0..2 {
        a.send(&nbd_header(proto::CMD_READ, i, 0, 4 << 20), &[])
            .unwrap();
    }
    std::thread::sleep(Duration::from_millis(200));
    drop(a);
    std::thread::sleep(Duration::from_millis(200));
    let mut b = Client::connect(&h.nbd(0), false).unwrap();
    b.send(&nbd_header(proto::CMD_READ, 5, 0, 4 << 20), &[])
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        outstanding(&h),
        2,
        "the departed client's 8 MiB still count"
    );
    op.set_gate(true);
    let mut d = Vec::new();
    assert!(matches!(
        b.recv(Some(4 << 20), &mut d).unwrap(),
        ClientReply::Simple {
            error: 0,
            cookie: 5
        }
    ));
}

#[test]
fn idle_recycled_buffers_do_not_keep_a_request_waiting_for_memory() {
    // A connection's recycled buffers count as memory it holds; a request waiting for memory
    // that only idle buffers took used to wait forever.
    let op = TableOpener::new();
    op.add("/pool", 65536); // 32 MiB
    let h = Harness::start_with(op, false, |c| c.nbd_mem_limit = 8 << 20);
    open_minor(&h, 0, "aio:/pool");
    let mut idle = Client::connect(&h.nbd(0), false).unwrap();
    assert_eq!(idle.read(0, 4 << 20).unwrap(), Ok(vec![0u8; 4 << 20]));
    // A stalled 4 MiB WRITE holds the other half.
    let mut stalled = Client::connect(&h.nbd(0), false).unwrap();
    stalled
        .send(&nbd_header(proto::CMD_WRITE, 1, 0, 4 << 20), &[1; 512])
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let mut c = Client::connect(&h.nbd(0), false).unwrap();
    c.stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert_eq!(c.read(4 << 20, 4 << 20).unwrap(), Ok(vec![0u8; 4 << 20]));
    drop((idle, stalled));
}

/// A 32 MiB raw image at `path` on minor 0, NBD clients limited to 8 MiB together and
/// dropped after `stall` without progress.
fn stall_harness(path: &str, stall: Duration) -> Harness {
    let op = TableOpener::new();
    op.add(path, 65536);
    let h = Harness::start_with(op, false, |c| {
        c.nbd_mem_limit = 8 << 20;
        c.nbd_stall_timeout = stall;
    });
    open_minor(&h, 0, &format!("aio:{path}"));
    h
}

/// Wait (at most 30 s) for `t` to finish; its result.
fn join_within<T>(t: std::thread::JoinHandle<T>, what: &str) -> T {
    let start = std::time::Instant::now();
    while !t.is_finished() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{what}: still waiting after 30 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    t.join().unwrap()
}

#[test]
fn a_client_that_stops_sending_its_write_is_dropped_and_frees_the_memory() {
    // Two clients send 4 MiB WRITE headers and a little payload, then stall, holding the
    // whole 8 MiB limit: a large write of another client waited for as long as they cared.
    let h = stall_harness("/sw", Duration::from_secs(1));
    let mut stalled = Vec::new();
    for i in 0..2u64 {
        let mut c = Client::connect(&h.nbd(0), false).unwrap();
        c.send(&nbd_header(proto::CMD_WRITE, i, 0, 4 << 20), &[1; 4096])
            .unwrap();
        stalled.push(c);
    }
    std::thread::sleep(Duration::from_millis(200));
    let mut big = Client::connect(&h.nbd(0), false).unwrap();
    let t = std::thread::spawn(move || big.write(8 << 20, &vec![2u8; 4 << 20], false).unwrap());
    // The stalled clients are still connected on our side: only tapdisk can free the memory.
    assert_eq!(join_within(t, "the 4 MiB write"), 0);
    for mut c in stalled {
        let mut d = Vec::new();
        assert!(
            c.recv(None, &mut d).is_err(),
            "a stalled client must have been disconnected"
        );
    }
}

#[test]
fn a_client_that_never_reads_its_replies_is_dropped_and_frees_the_memory() {
    let h = stall_harness("/nr", Duration::from_secs(1));
    let mut deaf = Client::connect(&h.nbd(0), false).unwrap();
    for i in 0..4 {
        deaf.send(&nbd_header(proto::CMD_READ, i, 0, 4 << 20), &[])
            .unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    let mut big = Client::connect(&h.nbd(0), false).unwrap();
    let t = std::thread::spawn(move || big.read(0, 4 << 20).unwrap());
    assert_eq!(
        join_within(t, "the 4 MiB read").map(|d| d.len()),
        Ok(4 << 20)
    );
    // It gets what was already in its socket, then the end of the connection.
    let mut d = Vec::new();
    let mut replies = 0;
    while let Ok(r) = deaf.recv(Some(4 << 20), &mut d) {
        assert!(matches!(r, ClientReply::Simple { error: 0, .. }), "{r:?}");
        replies += 1;
    }
    assert!(
        replies < 4,
        "the deaf client was served in full: not dropped"
    );
}

#[test]
fn a_client_that_reads_its_replies_slowly_keeps_its_connection() {
    let h = stall_harness("/slow", Duration::from_secs(2));
    let mut slow = Client::connect(&h.nbd(0), false).unwrap();
    for i in 0..6 {
        slow.send(&nbd_header(proto::CMD_READ, i, 0, 2 << 20), &[])
            .unwrap();
    }
    // 3.6 s of replies, longer than the timeout, taken a little at a time (each gap well
    // inside it, with room for a loaded machine).
    let mut d = Vec::new();
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(600));
        match slow.recv(Some(2 << 20), &mut d) {
            Ok(ClientReply::Simple { error: 0, .. }) => {}
            r => panic!("slow reader cut off: {r:?}"),
        }
    }
}

#[test]
fn a_client_held_up_by_a_pause_is_not_dropped_as_stalled() {
    // A WRITE whose payload is part-read when the VBD pauses: tapdisk stops reading until
    // the resume, so the client waits for us, not we for it; a pause longer than the stall
    // timeout must not cost it its connection (a /dev/nbdN would see I/O errors).
    let h = stall_harness("/pz", Duration::from_secs(1));
    let mut c = Client::connect(&h.nbd(0), false).unwrap();
    let len = 4usize << 20;
    let data: Vec<u8> = (0..len).map(|i| (i / 4096) as u8).collect();
    c.send(
        &nbd_header(proto::CMD_WRITE, 1, 0, len as u32),
        &data[..64 << 10],
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(h.call(Request::Pause { minor: 0 }), Reply::Pause);
    let rest = data[64 << 10..].to_vec();
    let t = std::thread::spawn(move || {
        c.send_raw(&rest).unwrap();
        let mut d = Vec::new();
        c.recv(None, &mut d)
    });
    std::thread::sleep(Duration::from_secs(3));
    assert!(matches!(h.resume(0, None), Reply::Resume));
    match join_within(t, "the paused write") {
        Ok(ClientReply::Simple {
            cookie: 1,
            error: 0,
        }) => {}
        r => panic!("the write across the pause: {r:?}"),
    }
}
