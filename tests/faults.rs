//! Injected I/O faults on an in-process tapdisk serving three VBDs over NBD: a dynamic VHD
//! whose file fails chosen calls ([`blktap3::image::fault`]: EIO, ENOSPC, short writes and
//! reads, fdatasync failure, at data, bitmap, BAT, footer, batmap, reserve and read
//! points, through the worker path and the fast path on io_uring and on Linux AIO), a
//! healthy VHD and a healthy raw image. For every fault: the request that hit it gets the NBD error for its
//! errno, the other VBDs keep working, the file on disk passes `vhd-util check` and our
//! own BAT checks at once (mid-session, as a crash would find it) and after close, and
//! once the fault is cleared the same open image serves the request and the data reads
//! back right, in the session and after reopening. A failed fdatasync fails every later
//! flush until the image is reopened.
//!
//! Each case prints `faults-injected point/kind=N ...`; `scripts/faults.sh` sums them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use blktap3::control::msg::{OpenRequest, Reply, Request};
use blktap3::image::fault::{Fault, FaultFile, Injector, Point};
use blktap3::image::file::BlockFile;
use blktap3::image::open::open_wrapped;
use blktap3::image::vhd::engine::{VhdImage, VhdOpenOptions};
use blktap3::image::vhd::format::BAT_UNUSED;
use blktap3::image::vhd::ops::{create, CreateOptions};
use blktap3::image::{open as open_image, Image, ImageError};
use blktap3::nbd::client::{Client, ClientReply};
use blktap3::nbd::proto::{RequestHeader, CMD_FLUSH, CMD_TRIM, NBD_EIO, NBD_ENOSPC};
use blktap3::tapdisk::io::{EngineChoice, IoEngine};
use blktap3::tapdisk::{Config, CtlHandle, ImageOpener, OpenSpec, Tapdisk};

/// The engines of the fast path: io_uring where this kernel sets it up, Linux AIO.
fn async_engines() -> Vec<EngineChoice> {
    let mut v = Vec::new();
    let e = IoEngine::<u8>::with_engine(1, EngineChoice::Uring).unwrap();
    if e.engine() == Some(blktap3::aio::Kind::Uring) {
        v.push(EngineChoice::Uring);
    } else {
        eprintln!("io_uring unavailable here: not tested");
    }
    v.push(EngineChoice::Aio);
    v
}

const MIB: u64 = 1 << 20;
/// 512 MiB: more than 128 blocks, so two BAT sectors.
const VHD_SIZE: u64 = 512 * MIB;
const BLK: u64 = 2 * MIB;

/// Opens the paths it was told about through a [`FaultFile`], the others as tapdisk does.
#[derive(Debug, Default)]
struct FaultOpener {
    faulty: Mutex<HashMap<PathBuf, Arc<Injector>>>,
}

impl ImageOpener for FaultOpener {
    fn open(&self, spec: &OpenSpec) -> Result<Arc<dyn Image>, ImageError> {
        let opts = spec.chain_options();
        let fmt = spec.kind.format();
        let inj = self.faulty.lock().unwrap().get(&spec.path).cloned();
        Ok(Arc::from(match inj {
            Some(inj) => open_wrapped(&spec.path, fmt, &opts, &|f| {
                Ok(Arc::new(FaultFile::new(f, Arc::clone(&inj))?) as Arc<dyn BlockFile>)
            })?,
            None => open_image(&spec.path, fmt, &opts)?,
        }))
    }
}

struct Daemon {
    h: CtlHandle,
    cfg_nbd: HashMap<u16, PathBuf>,
    thread: Option<JoinHandle<()>>,
    _ctl: tempfile::TempDir,
}

impl Daemon {
    fn start(opener: Arc<FaultOpener>) -> Daemon {
        Daemon::start_on(opener, EngineChoice::Auto)
    }

    fn start_on(opener: Arc<FaultOpener>, engine: EngineChoice) -> Daemon {
        let ctl = tempfile::tempdir().unwrap();
        let mut cfg = Config::new(ctl.path());
        cfg.io_engine = engine;
        cfg.lock_markers = false;
        cfg.io_threads = 2;
        cfg.opener = opener;
        let cfg_nbd = (1..=3).map(|m| (m, cfg.nbd_path(m))).collect();
        let (tx, rx) = channel();
        let thread = std::thread::spawn(move || {
            let mut td = Tapdisk::new(cfg).unwrap();
            tx.send(td.handle()).unwrap();
            td.run().unwrap();
        });
        Daemon {
            h: rx.recv().unwrap(),
            cfg_nbd,
            thread: Some(thread),
            _ctl: ctl,
        }
    }

    fn open(&self, minor: u16, params: &str) {
        let r = self.h.call(Request::Open(OpenRequest::new(minor, params)));
        assert!(matches!(r, Reply::Open(_)), "open {params}: {r:?}");
    }

    fn attach_open(&self, minor: u16, params: &str) -> Client {
        assert_eq!(self.h.call(Request::Attach { minor }), Reply::Attach);
        self.open(minor, params);
        self.client(minor)
    }

    fn client(&self, minor: u16) -> Client {
        Client::connect(&self.cfg_nbd[&minor], false).unwrap()
    }

    fn close(&self, minor: u16) -> Reply {
        self.h.call(Request::Close { minor })
    }

    fn stop(mut self) {
        for m in 1..=3 {
            let _ = self.close(m);
            assert_eq!(self.h.call(Request::Detach { minor: m }), Reply::Detach);
        }
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
    }
}

fn pattern(n: usize, seed: u32) -> Vec<u8> {
    (0..n as u32)
        .map(|i| {
            (i.wrapping_mul(2_654_435_761)
                .wrapping_add(seed.wrapping_mul(97))
                >> 11) as u8
        })
        .collect()
}

/// A command without payload (FLUSH, TRIM): its NBD error.
fn simple(c: &mut Client, typ: u16, offset: u64, length: u32) -> u32 {
    let h = RequestHeader {
        flags: 0,
        typ,
        cookie: 77,
        offset,
        length,
    };
    c.send(&h, &[]).unwrap();
    match c.recv(None, &mut Vec::new()).unwrap() {
        ClientReply::Simple { error, .. } => error,
        r => panic!("{r:?}"),
    }
}

/// What each written sector may hold: the last acknowledged write, and the data of failed
/// writes since (an unacknowledged write may or may not have landed).
#[derive(Default)]
struct Model {
    sectors: HashMap<u64, Vec<Vec<u8>>>,
}

impl Model {
    fn acked(&mut self, off: u64, data: &[u8]) {
        for (i, s) in data.chunks(512).enumerate() {
            self.sectors.insert(off / 512 + i as u64, vec![s.to_vec()]);
        }
    }
    fn failed(&mut self, off: u64, data: &[u8]) {
        for (i, s) in data.chunks(512).enumerate() {
            self.sectors
                .entry(off / 512 + i as u64)
                .or_insert_with(|| vec![vec![0u8; 512]])
                .push(s.to_vec());
        }
    }
    /// The one value a sector must read now (the last write was acknowledged).
    fn exact(&self, off: u64, len: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(len);
        for s in 0..len as u64 / 512 {
            match self.sectors.get(&(off / 512 + s)) {
                Some(a) if a.len() == 1 => v.extend_from_slice(&a[0]),
                Some(_) => panic!("sector {} has no single expected value", off / 512 + s),
                None => v.extend_from_slice(&[0u8; 512]),
            }
        }
        v
    }
}

/// The file as a crash would find it now (or after close): `vhd-util check` passes, no two
/// BAT entries share a block, every entry lies inside the file, and every allocated sector
/// holds zeros (never written) or something written to it.
fn check_file(path: &Path, model: &Model, when: &str) {
    let out = Command::new(env!("CARGO_BIN_EXE_vhd-util"))
        .args(["check", "-n"])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{when}: vhd-util check {}: {}{}",
        path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let img = VhdImage::open(path, &VhdOpenOptions::default()).unwrap();
    let len = std::fs::metadata(path).unwrap().len();
    let mut seen = HashMap::new();
    for (i, &e) in img.bat().iter().enumerate() {
        if e == BAT_UNUSED {
            continue;
        }
        assert!(
            u64::from(e) * 512 + BLK < len,
            "{when}: BAT[{i}] past the end"
        );
        if let Some(j) = seen.insert(e, i) {
            panic!("{when}: BAT[{i}] and BAT[{j}] both point at sector {e:#x}");
        }
    }
    for ext in img.block_status(0, VHD_SIZE / 512).unwrap() {
        if !ext.allocated {
            continue;
        }
        let mut buf = vec![0u8; (ext.nsectors * 512) as usize];
        img.read(ext.sector, &mut buf).unwrap();
        for (k, got) in buf.chunks(512).enumerate() {
            let s = ext.sector + k as u64;
            let ok = match model.sectors.get(&s) {
                Some(allowed) => allowed.iter().any(|a| a == got),
                None => got.iter().all(|&b| b == 0),
            };
            assert!(ok, "{when}: sector {s} holds data never written to it");
        }
    }
}

/// The healthy VBDs: a write, a read back and a flush each succeed.
fn healthy(vhd: &mut Client, raw: &mut Client, round: u32) {
    for (c, what) in [(vhd, "healthy vhd"), (raw, "healthy raw")] {
        let off = u64::from(round % 64) * 3 * MIB + 4096;
        let d = pattern(8192, 5000 + round);
        assert_eq!(c.write(off, &d, false).unwrap(), 0, "{what} write");
        assert_eq!(c.read(off, 8192).unwrap(), Ok(d), "{what} read");
        assert_eq!(simple(c, CMD_FLUSH, 0, 0), 0, "{what} flush");
    }
}

/// How a case provokes its fault.
#[derive(Clone, Copy, Debug)]
enum How {
    /// Write a new block with FUA (allocation, on a worker: FUA writes never take the
    /// loop's path): block 3 in round 1, 4 in round 2, ... (a block the last round
    /// allocated would take the asynchronous path).
    NewBlock,
    /// Write a new block without FUA: allocated on the loop (in memory), its data through
    /// the asynchronous engine, its BAT sector and bitmap by the commit on a worker; blocks
    /// as for `NewBlock`.
    LoopNewBlock,
    /// Write inside the full block 0 (mapped: Linux AIO).
    AioWrite,
    /// Write unwritten sectors of the partly written block 1 (data through the loop's
    /// asynchronous engine, then the commit on a worker: fdatasync, bitmap).
    PartialBlock,
    /// Write new blocks until the reserve runs out and the file is extended.
    Extend,
    /// Discard in the full block 0 (the batmap is rewritten).
    Discard,
    /// Read from the full block 0 (AIO).
    AioRead,
    /// Read across written and unwritten sectors of block 1 (worker).
    WorkerRead,
}

struct Rig {
    d: Daemon,
    inj: Arc<Injector>,
    path: PathBuf,
    c: Client,
    vhd2: Client,
    raw: Client,
    model: Model,
    _dir: tempfile::TempDir,
}

fn rig() -> Rig {
    rig_on(EngineChoice::Auto)
}

fn rig_on(engine: EngineChoice) -> Rig {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let path = dir.path().join("faulty.vhd");
    let good = dir.path().join("good.vhd");
    let raw = dir.path().join("good.raw");
    create(&path, &CreateOptions::dynamic(VHD_SIZE)).unwrap();
    create(&good, &CreateOptions::dynamic(VHD_SIZE)).unwrap();
    std::fs::write(&raw, vec![0u8; (200 * MIB) as usize]).unwrap();
    let opener = Arc::new(FaultOpener::default());
    let inj = Injector::new();
    opener
        .faulty
        .lock()
        .unwrap()
        .insert(path.clone(), Arc::clone(&inj));
    let d = Daemon::start_on(opener, engine);
    let mut c = d.attach_open(1, &format!("vhd:{}", path.display()));
    let vhd2 = d.attach_open(2, &format!("vhd:{}", good.display()));
    let raw = d.attach_open(3, &format!("aio:{}", raw.display()));
    // Block 0 full, block 1 written in part.
    let mut model = Model::default();
    let full = pattern(BLK as usize, 1);
    assert_eq!(c.write(0, &full, false).unwrap(), 0);
    model.acked(0, &full);
    let part = pattern(8192, 2);
    assert_eq!(c.write(BLK, &part, false).unwrap(), 0);
    model.acked(BLK, &part);
    assert_eq!(simple(&mut c, CMD_FLUSH, 0, 0), 0);
    Rig {
        d,
        inj,
        path,
        c,
        vhd2,
        raw,
        model,
        _dir: dir,
    }
}

/// What the request returned (NBD error, 0 = success); records it in the model.
fn provoke(r: &mut Rig, how: How, round: u32) -> (u32, u64, usize) {
    let seed = 100 + round;
    match how {
        How::NewBlock | How::LoopNewBlock => {
            let off = (2 + u64::from(round)) * BLK + 4096;
            let d = pattern(8192, seed);
            let e = r.c.write(off, &d, matches!(how, How::NewBlock)).unwrap();
            note(&mut r.model, e, off, &d);
            (e, off, d.len())
        }
        How::AioWrite => {
            let off = 64 * 1024;
            let d = pattern(16384, seed);
            let e = r.c.write(off, &d, false).unwrap();
            note(&mut r.model, e, off, &d);
            (e, off, d.len())
        }
        How::PartialBlock => {
            let off = BLK + MIB;
            let d = pattern(4096, seed);
            let e = r.c.write(off, &d, false).unwrap();
            note(&mut r.model, e, off, &d);
            (e, off, d.len())
        }
        How::Extend => {
            // Blocks 0 and 1 are taken; the first reserve holds 8. Blocks 10.. until one
            // fails (the 7th new block needs a new reserve); the last one when none does.
            let mut last = (0, 0, 0);
            for b in 10..30u64 {
                let off = b * BLK;
                let d = pattern(4096, seed + b as u32);
                let e = r.c.write(off, &d, false).unwrap();
                note(&mut r.model, e, off, &d);
                last = (e, off, d.len());
                if e != 0 {
                    break;
                }
            }
            last
        }
        How::Discard => {
            let e = simple(&mut r.c, CMD_TRIM, 8192, 4096);
            if e == 0 {
                r.model.acked(8192, &[0u8; 4096]);
            } else {
                r.model.failed(8192, &[0u8; 4096]);
            }
            (e, 8192, 4096)
        }
        How::AioRead | How::WorkerRead => {
            let off = if matches!(how, How::AioRead) {
                32 * 1024
            } else {
                BLK
            };
            let len = 16384;
            let got = r.c.read(off, len as u32).unwrap();
            match got {
                Ok(d) => {
                    assert_eq!(d, r.model.exact(off, len), "a read that succeeds is right");
                    (0, off, len)
                }
                Err(e) => (e, off, len),
            }
        }
    }
}

fn note(m: &mut Model, e: u32, off: u64, d: &[u8]) {
    if e == 0 {
        m.acked(off, d);
    } else {
        m.failed(off, d);
    }
}

/// One fault at one point: the request fails with `want` (0: the engine absorbs it, a
/// short AIO transfer being resubmitted), everything else keeps working, the file stays
/// consistent, and once cleared the same request succeeds on the same open image.
fn case(point: Point, fault: Fault, how: How, want: u32) {
    case_on(EngineChoice::Auto, point, fault, how, want);
}

/// [`case`] with each engine of the fast path.
fn async_case(point: Point, fault: Fault, how: How, want: u32) {
    for engine in async_engines() {
        eprintln!("engine {engine:?}");
        case_on(engine, point, fault, how, want);
    }
}

fn case_on(engine: EngineChoice, point: Point, fault: Fault, how: How, want: u32) {
    let mut r = rig_on(engine);
    if want == 0 {
        // Absorbed by the engine (a short AIO transfer resubmitted): once. Armed for
        // good, the shorts would end in no progress, a failure.
        r.inj.arm_n(point, fault, 0, Some(1));
    } else {
        r.inj.arm(point, fault);
    }
    let aio_before = r.inj.aio_seen();
    let (e, off, len) = provoke(&mut r, how, 1);
    eprintln!("case {point:?}/{fault:?} via {how:?}: NBD error {e}");
    assert_eq!(e, want, "{point:?}/{fault:?} via {how:?}");
    assert!(
        r.inj.injected(point) >= 1,
        "{point:?} was never hit by {how:?}"
    );
    if matches!(
        how,
        How::AioWrite | How::AioRead | How::PartialBlock | How::LoopNewBlock
    ) {
        assert!(
            r.inj.aio_seen() > aio_before,
            "{how:?} went through the asynchronous engine"
        );
    }
    healthy(&mut r.vhd2, &mut r.raw, 1);
    check_file(&r.path, &r.model, "mid-session, fault armed");
    // Still failing while armed (not for short AIO, absorbed).
    if want != 0 && !matches!(how, How::Extend) {
        let (e2, _, _) = provoke(&mut r, how, 2);
        assert_eq!(e2, want, "second try while armed");
    }
    r.inj.clear();
    if point == Point::Bat {
        // Another BAT sector's block first: the failed block must not be handed out again.
        let off = 200 * BLK;
        let d = pattern(4096, 4242);
        assert_eq!(r.c.write(off, &d, false).unwrap(), 0);
        r.model.acked(off, &d);
        check_file(&r.path, &r.model, "after the BAT fault, another allocation");
    }
    let (e3, off3, len3) = provoke(&mut r, how, 3);
    assert_eq!(e3, 0, "after clearing");
    assert_eq!(simple(&mut r.c, CMD_FLUSH, 0, 0), 0, "flush after clearing");
    if !matches!(how, How::AioRead | How::WorkerRead | How::Discard) {
        assert_eq!(
            r.c.read(off3, len3 as u32).unwrap(),
            Ok(r.model.exact(off3, len3))
        );
    }
    let _ = (off, len);
    healthy(&mut r.vhd2, &mut r.raw, 2);
    check_file(&r.path, &r.model, "after clearing");
    assert_eq!(r.d.close(1), Reply::Close);
    check_file(&r.path, &r.model, "after close");
    if matches!(how, How::Discard) {
        // Whatever the batmap says, the discarded sectors read as zeros.
        let img = VhdImage::open(&r.path, &VhdOpenOptions::default()).unwrap();
        let mut b = vec![1u8; 4096];
        img.read(16, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0), "discarded sectors after reopen");
    }
    eprintln!("{}", r.inj.summary());
    r.d.stop();
}

#[test]
fn data_write_faults_on_the_worker_path() {
    case(Point::Data, Fault::Eio, How::NewBlock, NBD_EIO);
    case(Point::Data, Fault::Enospc, How::NewBlock, NBD_ENOSPC);
    case(Point::Data, Fault::Short, How::NewBlock, NBD_EIO);
}

#[test]
fn data_write_faults_on_the_aio_path() {
    async_case(Point::Data, Fault::Eio, How::AioWrite, NBD_EIO);
    async_case(Point::Data, Fault::Enospc, How::AioWrite, NBD_ENOSPC);
    // A short completion is resubmitted for the rest: the write succeeds, whole.
    async_case(Point::Data, Fault::Short, How::AioWrite, 0);
    // The same for a write whose bits are then set by a commit on a worker.
    async_case(Point::Data, Fault::Eio, How::PartialBlock, NBD_EIO);
    async_case(Point::Data, Fault::Short, How::PartialBlock, 0);
    // And for a block's first write, allocated on the loop.
    async_case(Point::Data, Fault::Eio, How::LoopNewBlock, NBD_EIO);
}

#[test]
fn bitmap_write_faults() {
    async_case(Point::Bitmap, Fault::Eio, How::PartialBlock, NBD_EIO);
    async_case(Point::Bitmap, Fault::Short, How::PartialBlock, NBD_EIO);
    case(Point::Bitmap, Fault::Short, How::NewBlock, NBD_EIO);
    async_case(Point::Bitmap, Fault::Eio, How::LoopNewBlock, NBD_EIO);
    case(Point::Bitmap, Fault::Eio, How::NewBlock, NBD_EIO);
}

#[test]
fn bat_write_faults() {
    case(Point::Bat, Fault::Eio, How::NewBlock, NBD_EIO);
    case(Point::Bat, Fault::Enospc, How::NewBlock, NBD_ENOSPC);
    case(Point::Bat, Fault::Short, How::NewBlock, NBD_EIO);
    // A block allocated on the loop: its BAT sector is written by the commit.
    async_case(Point::Bat, Fault::Eio, How::LoopNewBlock, NBD_EIO);
    async_case(Point::Bat, Fault::Short, How::LoopNewBlock, NBD_EIO);
}

#[test]
fn footer_and_reserve_write_faults_while_extending() {
    case(Point::Footer, Fault::Eio, How::Extend, NBD_EIO);
    case(Point::Footer, Fault::Short, How::Extend, NBD_EIO);
    case(Point::Other, Fault::Enospc, How::Extend, NBD_ENOSPC);
}

#[test]
fn batmap_write_faults() {
    case(Point::Batmap, Fault::Eio, How::Discard, NBD_EIO);
    case(Point::Batmap, Fault::Short, How::Discard, NBD_EIO);
}

#[test]
fn read_faults() {
    async_case(Point::Read, Fault::Eio, How::AioRead, NBD_EIO);
    async_case(Point::Read, Fault::Short, How::AioRead, 0);
    case(Point::Read, Fault::Eio, How::WorkerRead, NBD_EIO);
    case(Point::Read, Fault::Short, How::WorkerRead, NBD_EIO);
}

/// After a failed fdatasync nothing is reported durable again until the image is
/// reopened, although the file's own fdatasync would succeed (the fault fires once, and a
/// FaultFile's failed sync skips the real one, as Linux forgets a writeback error once
/// reported). Reads and writes that claim no durability go on; the other VBDs are not
/// affected; CLOSE reports the failure; a reopen of the same file serves flushes again.
#[test]
fn fdatasync_failure_fails_every_later_flush_until_reopen() {
    let mut r = rig();
    let (e, off, len) = provoke(&mut r, How::AioWrite, 1);
    assert_eq!(e, 0);
    r.inj.arm_n(Point::Sync, Fault::Eio, 0, Some(1));
    assert_eq!(
        simple(&mut r.c, CMD_FLUSH, 0, 0),
        NBD_EIO,
        "the failing flush"
    );
    assert_eq!(r.inj.injected(Point::Sync), 1);
    let syncs = r.inj.seen(Point::Sync);
    for i in 0..3 {
        assert_eq!(
            simple(&mut r.c, CMD_FLUSH, 0, 0),
            NBD_EIO,
            "flush {i} after the failure must not report success"
        );
    }
    assert_eq!(
        r.inj.seen(Point::Sync),
        syncs,
        "later flushes do not even ask the file"
    );
    // A FUA write is a write plus a flush: it cannot be acknowledged as durable.
    let d = pattern(4096, 900);
    assert_eq!(r.c.write(off, &d, true).unwrap(), NBD_EIO, "FUA write");
    r.model.failed(off, &d);
    // Plain writes (no durability claimed) and reads still work.
    let d = pattern(len, 901);
    assert_eq!(r.c.write(off, &d, false).unwrap(), 0);
    r.model.acked(off, &d);
    assert_eq!(r.c.read(off, len as u32).unwrap(), Ok(d.clone()));
    healthy(&mut r.vhd2, &mut r.raw, 3);
    // Clearing the fault changes nothing: the image cannot know what was lost.
    r.inj.clear();
    assert_eq!(
        simple(&mut r.c, CMD_FLUSH, 0, 0),
        NBD_EIO,
        "cleared, not reopened"
    );
    let closed = r.d.close(1);
    assert_ne!(closed, Reply::Close, "CLOSE reports the failed sync");
    check_file(&r.path, &r.model, "closed after the fdatasync failure");
    // Reopen the same file (same injector, no fault armed): flushes succeed again.
    r.d.open(1, &format!("vhd:{}", r.path.display()));
    let mut c = r.d.client(1);
    assert_eq!(c.read(off, len as u32).unwrap(), Ok(d));
    let d2 = pattern(8192, 902);
    assert_eq!(c.write(5 * BLK, &d2, false).unwrap(), 0);
    r.model.acked(5 * BLK, &d2);
    assert_eq!(simple(&mut c, CMD_FLUSH, 0, 0), 0, "flush after reopen");
    assert_eq!(r.d.close(1), Reply::Close);
    check_file(&r.path, &r.model, "after reopen and close");
    eprintln!("{}", r.inj.summary());
    r.d.stop();
}

/// The same contract for a raw image: the failed flush, every later one, and a FUA write
/// fail until reopen.
#[test]
fn fdatasync_failure_on_a_raw_image() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let path = dir.path().join("faulty.raw");
    std::fs::write(&path, vec![0u8; (16 * MIB) as usize]).unwrap();
    let opener = Arc::new(FaultOpener::default());
    let inj = Injector::new();
    opener
        .faulty
        .lock()
        .unwrap()
        .insert(path.clone(), Arc::clone(&inj));
    let d = Daemon::start(opener);
    let mut c = d.attach_open(1, &format!("aio:{}", path.display()));
    let data = pattern(65536, 7);
    assert_eq!(c.write(4096, &data, false).unwrap(), 0);
    inj.arm_n(Point::Sync, Fault::Eio, 0, Some(1));
    assert_eq!(simple(&mut c, CMD_FLUSH, 0, 0), NBD_EIO);
    assert_eq!(simple(&mut c, CMD_FLUSH, 0, 0), NBD_EIO);
    assert_eq!(c.write(0, &data[..4096], true).unwrap(), NBD_EIO);
    assert_eq!(c.read(4096, 65536).unwrap(), Ok(data.clone()));
    assert_ne!(d.close(1), Reply::Close);
    d.open(1, &format!("aio:{}", path.display()));
    let mut c = d.client(1);
    assert_eq!(simple(&mut c, CMD_FLUSH, 0, 0), 0);
    assert_eq!(c.read(4096, 65536).unwrap(), Ok(data));
    eprintln!("{}", inj.summary());
    for m in 2..=3 {
        assert_eq!(d.h.call(Request::Attach { minor: m }), Reply::Attach);
    }
    d.stop();
}

/// xorshift64*: deterministic test randomness.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        let mut x = self.0 | 1;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d) % n.max(1)
    }
}

/// Many faults at random points, kinds and moments under a random mix of writes (new
/// blocks, extensions, partly written blocks, the mapped fast path), reads, discards and
/// flushes. Every request that succeeds is right, every failure is EIO or ENOSPC, and
/// after each round (fault cleared) the file passes the checks and the image serves I/O
/// again; at the end, every sector reads its last acknowledged write, in the session and
/// from the closed file.
#[test]
fn random_faults_sweep() {
    let mut r = rig();
    let mut rng = Rng(0x5eed_f417);
    let points = [
        Point::Data,
        Point::Bitmap,
        Point::Bat,
        Point::Footer,
        Point::Other,
        Point::Batmap,
        Point::Read,
    ];
    let faults = [Fault::Eio, Fault::Enospc, Fault::Short];
    let rounds = 120;
    let mut failures = 0;
    let mut writes: Vec<(u64, usize)> = vec![(0, 65536), (BLK, 8192)];
    for round in 0..rounds {
        let point = points[rng.below(points.len() as u64) as usize];
        let fault = faults[rng.below(3) as usize];
        r.inj
            .arm_n(point, fault, rng.below(3), Some(1 + rng.below(3)));
        for k in 0..8 {
            let seed = round * 100 + k + 1000;
            let blk = rng.below(160);
            let sec = rng.below(BLK / 512 - 64);
            let off = blk * BLK + sec * 512;
            let len = 512 * (1 + rng.below(32)) as usize;
            match rng.below(10) {
                0..=5 => {
                    let d = pattern(len, seed as u32);
                    let e = r.c.write(off, &d, false).unwrap();
                    assert!(e == 0 || e == NBD_EIO || e == NBD_ENOSPC, "write: {e}");
                    note(&mut r.model, e, off, &d);
                    failures += u32::from(e != 0);
                    writes.push((off, len));
                }
                6 | 7 => {
                    // Mostly where something was written (else no file I/O happens).
                    let (off, len) = match writes.len() {
                        0 => (off, len),
                        n if rng.below(4) != 0 => writes[rng.below(n as u64) as usize],
                        _ => (off, len),
                    };
                    match r.c.read(off, len as u32).unwrap() {
                        Ok(got) => {
                            for (i, s) in got.chunks(512).enumerate() {
                                let n = off / 512 + i as u64;
                                let ok = match r.model.sectors.get(&n) {
                                    Some(allowed) => allowed.iter().any(|a| a == s),
                                    None => s.iter().all(|&b| b == 0),
                                };
                                assert!(ok, "round {round}: sector {n} read data never written");
                            }
                        }
                        Err(e) => {
                            assert!(e == NBD_EIO || e == NBD_ENOSPC, "read: {e}");
                            failures += 1;
                        }
                    }
                }
                8 => {
                    let e = simple(&mut r.c, CMD_TRIM, off, len as u32);
                    let z = vec![0u8; len];
                    note(&mut r.model, e, off, &z);
                    failures += u32::from(e != 0);
                }
                _ => {
                    let e = simple(&mut r.c, CMD_FLUSH, 0, 0);
                    assert_eq!(e, 0, "no fdatasync fault is armed");
                }
            }
        }
        r.inj.clear();
        if round % 10 == 0 {
            healthy(&mut r.vhd2, &mut r.raw, round as u32);
        }
        check_file(&r.path, &r.model, &format!("round {round}"));
    }
    // Settle every sector a failed request left ambiguous, then everything reads back.
    let ambiguous: Vec<u64> = r
        .model
        .sectors
        .iter()
        .filter(|(_, a)| a.len() > 1)
        .map(|(&s, _)| s)
        .collect();
    for s in ambiguous {
        let d = pattern(512, s as u32);
        assert_eq!(r.c.write(s * 512, &d, false).unwrap(), 0);
        r.model.acked(s * 512, &d);
    }
    assert_eq!(simple(&mut r.c, CMD_FLUSH, 0, 0), 0);
    let mut written: Vec<u64> = r.model.sectors.keys().copied().collect();
    written.sort_unstable();
    for s in &written {
        assert_eq!(
            r.c.read(s * 512, 512).unwrap(),
            Ok(r.model.exact(s * 512, 512)),
            "sector {s}"
        );
    }
    assert_eq!(r.d.close(1), Reply::Close);
    check_file(&r.path, &r.model, "sweep, closed");
    let img = VhdImage::open(&r.path, &VhdOpenOptions::default()).unwrap();
    for s in &written {
        let mut b = vec![0u8; 512];
        img.read(*s, &mut b).unwrap();
        assert_eq!(b, r.model.exact(s * 512, 512), "sector {s} after close");
    }
    let total: u64 = r.inj.counts().iter().map(|c| c.2).sum();
    eprintln!("sweep: {rounds} rounds, {failures} requests failed, {total} faults injected");
    eprintln!("{}", r.inj.summary());
    assert!(
        total >= u64::from(rounds as u32) / 2,
        "too few faults hit: {total}"
    );
    assert!(failures > 0);
    r.d.stop();
}
