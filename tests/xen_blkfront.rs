//! The simulated blkfront against a small test backend (xenstore handshake, ring mapping,
//! event channels, grant copy, every ABI and ring order, indirect requests, hostile slots).
//! The real backend is tapdisk's job; this loop exists to check the frontend and the
//! blkif/xen building blocks together.

mod common;
use common::data::pattern;

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use blktap3::blkif::abi::{op, PAGE_SIZE};
use blktap3::blkif::xenbus::{
    keys, negotiate_ring_order, parse_protocol, parse_uint, ring_ref_key, XenbusState,
};
use blktap3::blkif::*;
use blktap3::tapdisk::xenio::segs::{indirect_copy_segs, request_copy_segs, BufLayout};
use blktap3::xen::sim::{toolstack_add_vbd, BlkfrontOptions, MemXenStore, SimBlkfront, SimXen};
use blktap3::xen::xenstore::{transaction, Tx, XenStore};
use blktap3::xen::*;

const BE: DomId = DomId(0);
const FE: DomId = DomId(1);
const DISK_SECTORS: u64 = 8192; // 4 MiB

struct BackendCfg {
    max_order: u32,
    read_only: bool,
    max_indirect: u32,
}

#[derive(Default, Debug)]
struct BackendStats {
    requests: u64,
    rejected: u64,
    protocol: Option<Abi>,
    order: Option<u32>,
}

fn wait_readable(fd: &impl AsFd, ms: u16) {
    let mut fds = [nix::poll::PollFd::new(
        fd.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(ms));
}

/// A minimal backend: handshake, then serve requests against an in-memory disk until the
/// frontend closes.
fn run_backend(
    xen: SimXen,
    store: MemXenStore,
    bpath: String,
    cfg: BackendCfg,
    disk: Arc<Mutex<Vec<u8>>>,
    stats: Arc<Mutex<BackendStats>>,
    stop: Arc<AtomicBool>,
) {
    let xs = store.connect(BE).unwrap();
    let grants = xen.grants(BE);
    let evt = xen.evtchn(BE).unwrap();
    let fpath = xs
        .read_string(Tx::NONE, &format!("{bpath}/{}", keys::FRONTEND))
        .unwrap()
        .unwrap();
    transaction(&xs, |tx| {
        xs.write(
            tx,
            &format!("{bpath}/{}", keys::MAX_RING_PAGE_ORDER),
            cfg.max_order.to_string().as_bytes(),
        )?;
        xs.write(
            tx,
            &format!("{bpath}/{}", keys::FEATURE_MAX_INDIRECT_SEGMENTS),
            cfg.max_indirect.to_string().as_bytes(),
        )?;
        xs.write(tx, &format!("{bpath}/{}", keys::FEATURE_FLUSH_CACHE), b"1")?;
        xs.write(tx, &format!("{bpath}/{}", keys::FEATURE_BARRIER), b"1")?;
        xs.write(tx, &format!("{bpath}/{}", keys::FEATURE_DISCARD), b"1")?;
        xs.write(
            tx,
            &format!("{bpath}/{}", keys::STATE),
            XenbusState::InitWait.as_str().as_bytes(),
        )
    })
    .unwrap();
    xs.watch(&format!("{fpath}/{}", keys::STATE), "fe").unwrap();
    let fe_state = || -> XenbusState {
        xs.read_string(Tx::NONE, &format!("{fpath}/{}", keys::STATE))
            .unwrap()
            .and_then(|s| XenbusState::parse(&s).ok())
            .unwrap_or(XenbusState::Unknown)
    };
    let set_state = |s: XenbusState| {
        xs.write(
            Tx::NONE,
            &format!("{bpath}/{}", keys::STATE),
            s.as_str().as_bytes(),
        )
        .unwrap()
    };
    // Wait for Initialised.
    while fe_state() != XenbusState::Initialised {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        wait_readable(&xs, 20);
        xs.take_watch_events().unwrap();
    }
    let rd = |k: &str| xs.read_string(Tx::NONE, &format!("{fpath}/{k}")).unwrap();
    let order = negotiate_ring_order(rd(keys::RING_PAGE_ORDER).as_deref(), cfg.max_order).unwrap();
    let refs: Vec<GrantRef> = (0..1u32 << order)
        .map(|i| GrantRef(parse_uint(&rd(&ring_ref_key(order, i)).unwrap()).unwrap()))
        .collect();
    let port = Port(parse_uint(&rd(keys::EVENT_CHANNEL).unwrap()).unwrap());
    let abi = parse_protocol(rd(keys::PROTOCOL).as_deref()).unwrap();
    {
        let mut s = stats.lock().unwrap();
        s.protocol = Some(abi);
        s.order = Some(order);
    }
    let mapping = grants.map(FE, &refs, true).unwrap();
    let mut ring = BackRing::attach(mapping, abi, order).unwrap();
    let local = evt.bind_interdomain(FE, port).unwrap();
    transaction(&xs, |tx| {
        xs.write(
            tx,
            &format!("{bpath}/{}", keys::SECTORS),
            DISK_SECTORS.to_string().as_bytes(),
        )?;
        xs.write(tx, &format!("{bpath}/{}", keys::SECTOR_SIZE), b"512")?;
        xs.write(
            tx,
            &format!("{bpath}/{}", keys::INFO),
            (if cfg.read_only { 4u32 } else { 0 })
                .to_string()
                .as_bytes(),
        )
    })
    .unwrap();
    set_state(XenbusState::Connected);
    let pcfg = ParseConfig {
        read_only: cfg.read_only,
        max_indirect_segments: cfg.max_indirect,
        ..ParseConfig::new(DISK_SECTORS)
    };
    let mut buf = vec![0u8; 4096 * 4096];
    loop {
        // Frontend state changes.
        xs.take_watch_events().unwrap();
        match fe_state() {
            XenbusState::Closing => set_state(XenbusState::Closing),
            XenbusState::Closed | XenbusState::Unknown => {
                evt.unbind(local).unwrap();
                set_state(XenbusState::Closed);
                return;
            }
            _ => {}
        }
        if stop.load(Ordering::Relaxed) {
            return;
        }
        while let Some(p) = evt.pending().unwrap() {
            evt.unmask(p).unwrap();
        }
        loop {
            while let Some(item) = ring.next_request(&pcfg).unwrap() {
                let (id, o, st) = serve(item, &grants, &pcfg, &disk, &mut buf, &stats);
                ring.push_response(id, o, st).unwrap();
            }
            if ring.push_responses_and_check_notify() {
                evt.notify(local).unwrap();
            }
            if !ring.final_check_for_requests().unwrap() {
                break;
            }
        }
        let mut fds = [
            nix::poll::PollFd::new(evt.as_fd(), nix::poll::PollFlags::POLLIN),
            nix::poll::PollFd::new(xs.as_fd(), nix::poll::PollFlags::POLLIN),
        ];
        let _ = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(50u16));
    }
}

fn serve(
    item: Taken,
    grants: &impl GrantCopier,
    cfg: &ParseConfig,
    disk: &Mutex<Vec<u8>>,
    buf: &mut [u8],
    stats: &Mutex<BackendStats>,
) -> (u64, u8, Status) {
    stats.lock().unwrap().requests += 1;
    let req = match item {
        Ok(Parsed::Ready(r)) => r,
        Ok(Parsed::Indirect(h)) => {
            let segs = indirect_copy_segs(&h);
            let mut pages = vec![0u8; h.grefs.len() * PAGE_SIZE];
            if grants.copy_from_guest(FE, &segs, &mut pages).is_err() {
                return (h.id, h.op.wire_op(), Status::Error);
            }
            match h.complete(&pages, cfg) {
                Ok(r) => r,
                Err(rej) => {
                    stats.lock().unwrap().rejected += 1;
                    return (rej.id, rej.op, rej.status());
                }
            }
        }
        Err(rej) => {
            stats.lock().unwrap().rejected += 1;
            return (rej.id, rej.op, rej.status());
        }
    };
    let len = req.data_len() as usize;
    // An empty flush has no position (Linux sends u64::MAX).
    let start = if req.nr_sectors() == 0 {
        0
    } else {
        (req.sector * 512) as usize
    };
    let segs = request_copy_segs(&req, BufLayout::Packed);
    let ok = match req.op {
        Operation::Read => {
            buf[..len].copy_from_slice(&disk.lock().unwrap()[start..start + len]);
            grants.copy_to_guest(FE, &segs, &buf[..len]).is_ok()
        }
        Operation::Write | Operation::WriteBarrier | Operation::Flush => {
            if grants.copy_from_guest(FE, &segs, &mut buf[..len]).is_err() {
                false
            } else {
                disk.lock().unwrap()[start..start + len].copy_from_slice(&buf[..len]);
                true
            }
        }
        Operation::Discard { nr_sectors, .. } => {
            let n = (nr_sectors * 512) as usize;
            disk.lock().unwrap()[start..start + n].fill(0);
            true
        }
    };
    (
        req.id,
        req.wire_op(),
        if ok { Status::Okay } else { Status::Error },
    )
}

struct Rig {
    xen: SimXen,
    store: MemXenStore,
    fpath: String,
    disk: Arc<Mutex<Vec<u8>>>,
    stats: Arc<Mutex<BackendStats>>,
    stop: Arc<AtomicBool>,
    backend: Option<thread::JoinHandle<()>>,
}

impl Rig {
    fn new(cfg: BackendCfg) -> Rig {
        let xen = SimXen::new();
        xen.create_domain(FE, 4096).unwrap();
        let store = MemXenStore::new();
        let dom0 = store.connect(BE).unwrap();
        let (fpath, bpath) =
            toolstack_add_vbd(&dom0, "vbd3", BE, FE, 51712, cfg.read_only).unwrap();
        let disk = Arc::new(Mutex::new(
            (0..DISK_SECTORS as usize * 512)
                .map(|i| (i / 512) as u8)
                .collect::<Vec<u8>>(),
        ));
        let stats = Arc::new(Mutex::new(BackendStats::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let backend = {
            let (xen, store, disk, stats, stop) = (
                xen.clone(),
                store.clone(),
                Arc::clone(&disk),
                Arc::clone(&stats),
                Arc::clone(&stop),
            );
            thread::spawn(move || run_backend(xen, store, bpath, cfg, disk, stats, stop))
        };
        Rig {
            xen,
            store,
            fpath,
            disk,
            stats,
            stop,
            backend: Some(backend),
        }
    }

    fn front(&self, opts: BlkfrontOptions) -> SimBlkfront<impl XenStore> {
        SimBlkfront::new(
            &self.xen,
            FE,
            self.store.connect(FE).unwrap(),
            &self.fpath,
            opts,
        )
        .unwrap()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.backend.take() {
            let _ = h.join();
        }
    }
}

const T: Duration = Duration::from_secs(10);

fn io_round_trip<X: XenStore>(f: &mut SimBlkfront<X>) {
    let data = pattern(44 * 1024, 3);
    let w = f.submit_write(16, &data).unwrap();
    f.kick().unwrap();
    let c = f.wait_completions(1, T).unwrap();
    assert_eq!((c[0].id, c[0].op, c[0].status), (w, op::WRITE, 0));
    let r = f.submit_read(16, 88).unwrap();
    f.kick().unwrap();
    let c = f.wait_completions(1, T).unwrap();
    assert_eq!((c[0].id, c[0].status), (r, 0));
    assert_eq!(c[0].data.as_deref(), Some(&data[..]));
}

#[test]
fn handshake_and_io_in_every_abi() {
    for abi in [Abi::X86_32, Abi::X86_64] {
        let rig = Rig::new(BackendCfg {
            max_order: 2,
            read_only: false,
            max_indirect: 256,
        });
        let mut f = rig.front(BlkfrontOptions {
            abi,
            ..Default::default()
        });
        let info = f.connect().unwrap();
        assert_eq!(info.sectors, DISK_SECTORS);
        assert_eq!(info.sector_size, 512);
        assert_eq!(info.ring_order, 2);
        assert_eq!(info.max_indirect_segments, 256);
        assert!(info.flush && info.barrier && info.discard);
        assert_eq!(f.backend_state().unwrap(), XenbusState::Connected);
        assert_eq!(rig.stats.lock().unwrap().protocol, Some(abi));
        assert_eq!(f.ring().unwrap().entries(), 128);
        io_round_trip(&mut f);
        f.disconnect().unwrap();
        assert_eq!(f.backend_state().unwrap(), XenbusState::Closed);
    }
}

#[test]
fn missing_protocol_means_native() {
    let rig = Rig::new(BackendCfg {
        max_order: 0,
        read_only: false,
        max_indirect: 0,
    });
    let mut f = rig.front(BlkfrontOptions {
        abi: Abi::NATIVE,
        write_protocol: false,
        ..Default::default()
    });
    f.connect().unwrap();
    assert_eq!(rig.stats.lock().unwrap().protocol, Some(Abi::NATIVE));
    io_round_trip(&mut f);
}

#[test]
fn single_page_ring_without_max_order_key_uses_ring_ref() {
    // Order 0: the single ref goes to `ring-ref`, not `ring-ref0`.
    let rig = Rig::new(BackendCfg {
        max_order: 0,
        read_only: false,
        max_indirect: 0,
    });
    let mut f = rig.front(BlkfrontOptions::default());
    let info = f.connect().unwrap();
    assert_eq!(info.ring_order, 0);
    let xs = rig.store.connect(BE).unwrap();
    assert!(xs
        .read(Tx::NONE, &format!("{}/ring-ref", rig.fpath))
        .unwrap()
        .is_some());
    assert!(xs
        .read(Tx::NONE, &format!("{}/ring-ref0", rig.fpath))
        .unwrap()
        .is_none());
    assert_eq!(info.max_indirect_segments, 0);
    // Without indirect support a 48 KiB request cannot be expressed.
    assert!(f.submit_read(0, 96).is_err());
}

#[test]
fn indirect_one_mib_requests_and_many_in_flight() {
    let rig = Rig::new(BackendCfg {
        max_order: 3,
        read_only: false,
        max_indirect: 256,
    });
    let mut f = rig.front(BlkfrontOptions {
        abi: Abi::X86_64,
        ..Default::default()
    });
    f.connect().unwrap();
    let a = pattern(1 << 20, 9);
    let b = pattern(1 << 20, 77);
    f.submit_write(0, &a).unwrap();
    f.submit_write(2048, &b).unwrap();
    f.kick().unwrap();
    let c = f.wait_completions(2, T).unwrap();
    assert!(c.iter().all(|c| c.status == 0), "{c:?}");
    assert_eq!(&rig.disk.lock().unwrap()[..1 << 20], &a[..]);
    // Many small reads in flight at once.
    let mut ids = Vec::new();
    for i in 0..100u64 {
        ids.push(f.submit_read(i * 8, 8).unwrap());
    }
    f.kick().unwrap();
    let c = f.wait_completions(100, T).unwrap();
    assert_eq!(c.len(), 100);
    for comp in &c {
        let i = ids.iter().position(|&x| x == comp.id).unwrap();
        assert_eq!(comp.data.as_deref(), Some(&a[i * 4096..(i + 1) * 4096]));
    }
    let r = f.submit_read(2048, 2048).unwrap();
    f.kick().unwrap();
    let c = f.wait_completions(1, T).unwrap();
    assert_eq!((c[0].id, c[0].data.as_deref()), (r, Some(&b[..])));
}

#[test]
fn flush_barrier_discard_and_errors() {
    let rig = Rig::new(BackendCfg {
        max_order: 1,
        read_only: false,
        max_indirect: 32,
    });
    let mut f = rig.front(BlkfrontOptions {
        abi: Abi::X86_32,
        ..Default::default()
    });
    f.connect().unwrap();
    let fl = f.submit_sync(op::FLUSH_DISKCACHE, 0, &[]).unwrap();
    let ba = f
        .submit_sync(op::WRITE_BARRIER, 8, &pattern(4096, 1))
        .unwrap();
    let di = f.submit_discard(100, 50).unwrap();
    // Beyond the disk end, and an unknown opcode written raw.
    let oob = f.submit_read(DISK_SECTORS - 4, 8).unwrap();
    let mut raw = [0u8; 108];
    WireRequest::Direct {
        op: 42,
        nr_segments: 0,
        handle: 0,
        id: 4242,
        sector: 0,
        segments: &[],
    }
    .encode(Abi::X86_32, &mut raw);
    f.submit_raw(4242, &raw).unwrap();
    f.kick().unwrap();
    let c = f.wait_completions(5, T).unwrap();
    let st = |id: u64| {
        c.iter()
            .find(|c| c.id == id)
            .map(|c| (c.op, c.status))
            .unwrap()
    };
    assert_eq!(st(fl), (op::FLUSH_DISKCACHE, 0));
    assert_eq!(st(ba), (op::WRITE_BARRIER, 0));
    assert_eq!(st(di), (op::DISCARD, 0));
    assert_eq!(st(oob), (op::READ, -1));
    assert_eq!(st(4242), (42, -2));
    assert!(rig.disk.lock().unwrap()[100 * 512..150 * 512]
        .iter()
        .all(|&b| b == 0));
    assert_eq!(rig.stats.lock().unwrap().rejected, 2);
}

#[test]
fn read_only_backend_refuses_writes() {
    let rig = Rig::new(BackendCfg {
        max_order: 0,
        read_only: true,
        max_indirect: 0,
    });
    let mut f = rig.front(BlkfrontOptions::default());
    let info = f.connect().unwrap();
    assert_eq!(info.info & 4, 4);
    let w = f.submit_write(0, &[1u8; 4096]).unwrap();
    f.kick().unwrap();
    let c = f.wait_completions(1, T).unwrap();
    assert_eq!((c[0].id, c[0].status), (w, -1));
    assert_eq!(rig.disk.lock().unwrap()[0], 0);
}

#[test]
fn ring_indices_wrap_during_io() {
    let rig = Rig::new(BackendCfg {
        max_order: 0,
        read_only: false,
        max_indirect: 0,
    });
    let mut f = rig.front(BlkfrontOptions {
        start_index: u32::MAX - 10,
        ..Default::default()
    });
    f.connect().unwrap();
    for round in 0..5u64 {
        for i in 0..8 {
            f.submit_read(round * 64 + i * 8, 8).unwrap();
        }
        f.kick().unwrap();
        let c = f.wait_completions(8, T).unwrap();
        assert!(c.iter().all(|c| c.status == 0));
    }
}

#[test]
fn handshake_times_out_without_a_backend() {
    let xen = SimXen::new();
    xen.create_domain(FE, 64).unwrap();
    let store = MemXenStore::new();
    let dom0 = store.connect(BE).unwrap();
    let (fpath, _) = toolstack_add_vbd(&dom0, "vbd3", BE, FE, 1, false).unwrap();
    let mut f = SimBlkfront::new(
        &xen,
        FE,
        store.connect(FE).unwrap(),
        &fpath,
        BlkfrontOptions {
            timeout: Duration::from_millis(100),
            ..Default::default()
        },
    )
    .unwrap();
    let t0 = Instant::now();
    assert!(f.connect().is_err());
    assert!(t0.elapsed() < Duration::from_secs(5));
}
