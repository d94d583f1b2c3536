//! Test rig for the blkif data path: an in-process tapdisk on a simulated Xen (SimXen), a
//! minimal xenstore backend negotiator that issues XENBLKIF_CONNECT through the control API,
//! and the simulated blkfront on the guest side.

use std::path::{Path, PathBuf};
use std::sync::mpsc::channel;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use blktap3::blkif::xenbus::{keys, queue_prefix, ring_ref_key};
use blktap3::blkif::Abi;
use blktap3::control::msg::{Blkif, BlkifProto, DiskInfo, OpenRequest, Reply, Request};
use blktap3::image::crypto::KeyHash;
use blktap3::tapdisk::daemon::{Config, ImageOpener};
use blktap3::tapdisk::{CtlHandle, SimXenOpener, Tapdisk};
use blktap3::xen::sim::{
    toolstack_add_vbd, BlkfrontOptions, Completion, MemXenStore, MemXsConn, SimBlkfront, SimXen,
};
use blktap3::xen::xenstore::{Tx, XenStore};
use blktap3::xen::DomId;

pub const BE: DomId = DomId(0);
/// Guest memory per simulated domain (pages).
pub const GUEST_PAGES: usize = 16384;

pub struct Rig {
    pub xen: SimXen,
    pub store: MemXenStore,
    pub h: CtlHandle,
    pub dir: tempfile::TempDir,
    thread: Option<JoinHandle<()>>,
}

impl Rig {
    pub fn start() -> Rig {
        Rig::start_with(|_| {})
    }

    pub fn start_with(f: impl FnOnce(&mut Config)) -> Rig {
        Rig::start_with_xen(|_, cfg| f(cfg))
    }

    /// Like [`Rig::start_with`], the hook also seeing the rig's simulated Xen.
    pub fn start_with_xen(f: impl FnOnce(&SimXen, &mut Config)) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let xen = SimXen::new();
        let store = MemXenStore::new();
        let mut cfg = Config::new(dir.path());
        cfg.lock_markers = false;
        cfg.io_threads = 2;
        cfg.xen = Arc::new(SimXenOpener {
            xen: xen.clone(),
            dom: BE,
        });
        f(&xen, &mut cfg);
        let (tx, rx) = channel();
        let thread = std::thread::spawn(move || {
            let mut td = Tapdisk::new(cfg).unwrap();
            td.keep_running_when_empty();
            tx.send(td.handle()).unwrap();
            td.run().unwrap();
        });
        Rig {
            xen,
            store,
            h: rx.recv().unwrap(),
            dir,
            thread: Some(thread),
        }
    }

    pub fn with_opener(opener: Arc<dyn ImageOpener>) -> Rig {
        Rig::start_with(move |c| c.opener = opener)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn call(&self, r: Request) -> Reply {
        self.h.call(r)
    }

    /// ATTACH + OPEN.
    pub fn open(&self, minor: u16, params: &str, key: Option<&[u8]>) -> DiskInfo {
        assert_eq!(self.call(Request::Attach { minor }), Reply::Attach);
        let mut o = OpenRequest::new(minor, params);
        o.key = key.map(blktap3::control::msg::SecretKey::new);
        match self.call(Request::Open(o)) {
            Reply::Open(i) => i,
            r => panic!("open {params}: {r:?}"),
        }
    }

    pub fn stats(&self, minor: u16) -> String {
        match self.call(Request::Stats { minor: Some(minor) }) {
            Reply::Stats(b) => String::from_utf8(b).unwrap(),
            r => panic!("stats: {r:?}"),
        }
    }

    /// A guest domain `domid` with a blkfront on vbd `devid`, negotiated with a minimal
    /// backend that connects the ring to `minor`. `abi = None`: no `protocol` key (native).
    pub fn frontend(
        &self,
        domid: u16,
        devid: u32,
        minor: u16,
        abi: Option<Abi>,
        max_order: u32,
    ) -> SimBlkfront<MemXsConn> {
        let opts = BlkfrontOptions {
            abi: abi.unwrap_or(Abi::NATIVE),
            write_protocol: abi.is_some(),
            max_ring_order: max_order,
            timeout: Duration::from_secs(20),
            ..BlkfrontOptions::default()
        };
        self.frontend_with(domid, devid, minor, opts)
    }

    /// [`Rig::frontend`] with every frontend option (e.g. `queues`).
    pub fn frontend_with(
        &self,
        domid: u16,
        devid: u32,
        minor: u16,
        opts: BlkfrontOptions,
    ) -> SimBlkfront<MemXsConn> {
        let fe = DomId(domid);
        if self.xen.domain(fe).is_none() {
            self.xen.create_domain(fe, GUEST_PAGES).unwrap();
        }
        let xs0 = self.store.connect(BE).unwrap();
        let (fpath, bpath) = toolstack_add_vbd(&xs0, "vbd3", BE, fe, devid, false).unwrap();
        let mut front =
            SimBlkfront::new(&self.xen, fe, self.store.connect(fe).unwrap(), &fpath, opts).unwrap();
        let h = self.h.clone();
        let be = std::thread::spawn(move || {
            backend_negotiate(&xs0, &fpath, &bpath, domid, devid, minor, &h);
        });
        front.connect().unwrap();
        be.join().unwrap();
        front
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        // Tapdisk exits on SIGTERM only; tests leave the thread to die with the process.
        let _ = self.thread.take();
    }
}

fn rd(xs: &MemXsConn, p: &str) -> Option<String> {
    xs.read_string(Tx::NONE, p).unwrap()
}

fn wr(xs: &MemXsConn, p: &str, v: &str) {
    xs.write(Tx::NONE, p, v.as_bytes()).unwrap()
}

/// What tapback does, reduced to the happy path: advertise, wait for Initialised, CONNECT,
/// publish the disk and go Connected.
pub fn backend_negotiate(
    xs: &MemXsConn,
    fpath: &str,
    bpath: &str,
    domid: u16,
    devid: u32,
    minor: u16,
    h: &CtlHandle,
) {
    let info = match h.call(Request::DiskInfo { minor }) {
        Reply::DiskInfo(i) => i,
        r => panic!("disk info: {r:?}"),
    };
    for (k, v) in [
        (keys::MAX_RING_PAGE_ORDER, "4"),
        (keys::FEATURE_FLUSH_CACHE, "1"),
        (keys::FEATURE_BARRIER, "1"),
        (keys::FEATURE_DISCARD, "1"),
        (keys::DISCARD_GRANULARITY, "4096"),
        (keys::FEATURE_MAX_INDIRECT_SEGMENTS, "256"),
        (keys::MULTI_QUEUE_MAX_QUEUES, "4"),
        (keys::STATE, "2"),
    ] {
        wr(xs, &format!("{bpath}/{k}"), v);
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while rd(xs, &format!("{fpath}/state")).as_deref() != Some("3") {
        assert!(Instant::now() < deadline, "frontend never Initialised");
        std::thread::sleep(Duration::from_millis(1));
    }
    let order: u32 = rd(xs, &format!("{fpath}/{}", keys::RING_PAGE_ORDER))
        .map(|v| v.parse().unwrap())
        .unwrap_or(0);
    let proto = match rd(xs, &format!("{fpath}/{}", keys::PROTOCOL)).as_deref() {
        None => BlkifProto::Native,
        Some("x86_32-abi") => BlkifProto::X86_32,
        Some("x86_64-abi") => BlkifProto::X86_64,
        Some(p) => panic!("protocol {p}"),
    };
    let nq: u32 = rd(xs, &format!("{fpath}/{}", keys::MULTI_QUEUE_NUM_QUEUES))
        .map(|v| v.parse().unwrap())
        .unwrap_or(1);
    for q in 0..nq {
        let pre = queue_prefix(nq, q);
        let mut gref = [0u32; 16];
        for (i, g) in gref.iter_mut().enumerate().take(1 << order) {
            let k = ring_ref_key(order, i as u32);
            *g = rd(xs, &format!("{fpath}/{pre}{k}"))
                .unwrap()
                .parse()
                .unwrap();
        }
        let port: u32 = rd(xs, &format!("{fpath}/{pre}{}", keys::EVENT_CHANNEL))
            .unwrap()
            .parse()
            .unwrap();
        let blkif = Blkif {
            domid: u32::from(domid),
            devid,
            gref,
            order,
            proto,
            pool: String::new(),
            port,
            poll_duration: 0,
            poll_idle_threshold: 0,
            queue: q,
        };
        let r = h.call(Request::XenblkifConnect { minor, blkif });
        assert_eq!(r, Reply::XenblkifConnect);
    }
    wr(
        xs,
        &format!("{bpath}/{}", keys::SECTORS),
        &info.sectors.to_string(),
    );
    wr(
        xs,
        &format!("{bpath}/{}", keys::INFO),
        &info.info.to_string(),
    );
    wr(xs, &format!("{bpath}/{}", keys::SECTOR_SIZE), "512");
    wr(xs, &format!("{bpath}/{}", keys::STATE), "4");
}

/// A raw image of `size` bytes filled with a deterministic pattern; returns the contents.
pub fn make_raw(path: &Path, size: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed);
    let mut v = vec![0u8; size];
    rng.fill(&mut v);
    std::fs::write(path, &v).unwrap();
    v
}

/// A dynamic VHD of `size` bytes (all zeros); with `key`, encrypted (keyhash set).
pub fn make_vhd(path: &Path, size: u64, key: Option<&[u8]>) {
    blktap3::image::vhd::ops::create(
        path,
        &blktap3::image::vhd::ops::CreateOptions::dynamic(size),
    )
    .unwrap();
    if let Some(k) = key {
        let img = blktap3::image::vhd::ops::open_meta(path, false).unwrap();
        img.set_keyhash(&KeyHash::for_key(k, &[7u8; 32])).unwrap();
        blktap3::image::Image::close(&img).unwrap();
    }
}

/// xorshift64*: deterministic test randomness.
#[derive(Clone, Debug)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0 | 1;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn fill(&mut self, b: &mut [u8]) {
        for c in b.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// A start sector for `sectors` sectors of a `disk_sectors` disk overlapping none of the
/// ranges in `used`, from at most `tries` random picks; the range is added to `used`.
pub fn pick_free(
    rng: &mut Rng,
    used: &mut Vec<(u64, u64)>,
    disk_sectors: u64,
    sectors: u64,
    tries: usize,
) -> Option<u64> {
    for _ in 0..tries {
        let s = rng.below(disk_sectors - sectors);
        if used.iter().all(|&(a, b)| s + sectors <= a || s >= b) {
            used.push((s, s + sectors));
            return Some(s);
        }
    }
    None
}

/// Wait for exactly `n` completions.
pub fn wait(front: &mut SimBlkfront<MemXsConn>, n: usize) -> Vec<Completion> {
    let got = front.wait_completions(n, Duration::from_secs(30)).unwrap();
    assert_eq!(got.len(), n, "{got:?}");
    got
}

/// A RAM disk whose reads and writes wait while its gate is closed.
#[derive(Debug)]
pub struct GateImage {
    pub inner: blktap3::tapdisk::mem::MemImage,
    pub gate: Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
}

impl GateImage {
    fn wait(&self) {
        let (m, c) = &*self.gate;
        let mut open = m.lock().unwrap();
        while !*open {
            open = c.wait(open).unwrap();
        }
    }
}

impl blktap3::image::Image for GateImage {
    fn info(&self) -> blktap3::image::ImageInfo {
        self.inner.info()
    }
    fn read(&self, sector: u64, buf: &mut [u8]) -> Result<(), blktap3::image::ImageError> {
        self.wait();
        self.inner.read(sector, buf)
    }
    fn write(&self, sector: u64, buf: &[u8]) -> Result<(), blktap3::image::ImageError> {
        self.wait();
        self.inner.write(sector, buf)
    }
    fn flush(&self) -> Result<(), blktap3::image::ImageError> {
        self.inner.flush()
    }
    fn discard(&self, sector: u64, n: u64) -> Result<(), blktap3::image::ImageError> {
        self.inner.discard(sector, n)
    }
    fn block_status(
        &self,
        sector: u64,
        n: u64,
    ) -> Result<Vec<blktap3::image::Extent>, blktap3::image::ImageError> {
        self.inner.block_status(sector, n)
    }
    fn close(&self) -> Result<(), blktap3::image::ImageError> {
        self.inner.close()
    }
}

/// Opens any path as a fresh gated RAM disk of `sectors` sectors (shared gate).
#[derive(Debug)]
pub struct GateOpener {
    pub sectors: u64,
    pub gate: Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>,
}

impl GateOpener {
    pub fn new(sectors: u64) -> Arc<GateOpener> {
        Arc::new(GateOpener {
            sectors,
            gate: Arc::new((std::sync::Mutex::new(true), std::sync::Condvar::new())),
        })
    }
    pub fn set(&self, open: bool) {
        *self.gate.0.lock().unwrap() = open;
        self.gate.1.notify_all();
    }
}

impl ImageOpener for GateOpener {
    fn open(
        &self,
        spec: &blktap3::tapdisk::OpenSpec,
    ) -> Result<Arc<dyn blktap3::image::Image>, blktap3::image::ImageError> {
        Ok(Arc::new(GateImage {
            inner: blktap3::tapdisk::mem::MemImage::new(self.sectors, spec.read_only),
            gate: Arc::clone(&self.gate),
        }))
    }
}

/// `"reqs_outstanding": N` of the stats JSON.
pub fn outstanding(stats: &str) -> u64 {
    let k = "\"reqs_outstanding\": ";
    let i = stats.find(k).unwrap() + k.len();
    stats[i..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Poll until `f` holds (10 s).
pub fn until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
}
