//! Multi-queue blkif on the simulated Xen: a blkfront with several queues (one ring and event
//! channel each, `multi-queue-num-queues` and `queue-<i>/...` keys) connected queue by queue
//! with XENBLKIF_CONNECT, concurrent verified I/O on every queue, a flush that drains only
//! its own queue, PAUSE/RESUME across all queues, DISCONNECT of the whole device, and the
//! connect rules (a queue twice, a queue on another minor).

mod common;

use std::time::Duration;

use blktap3::blkif::{op, Abi};
use blktap3::control::msg::{Blkif, BlkifProto, OpenFlags, Reply, Request, ResumeRequest};
use blktap3::xen::sim::{BlkfrontOptions, MemXsConn, SimBlkfront};
use common::xenio::*;

fn opts(queues: u32) -> BlkfrontOptions {
    BlkfrontOptions {
        abi: Abi::X86_64,
        max_ring_order: 1,
        timeout: Duration::from_secs(20),
        queues,
        ..BlkfrontOptions::default()
    }
}

fn resume(rig: &Rig, minor: u16) {
    assert_eq!(
        rig.call(Request::Resume(ResumeRequest {
            minor,
            flags: OpenFlags::empty(),
            params: None,
            secondary: None,
            log_path: None,
        })),
        Reply::Resume
    );
}

/// Write `data` at `sector` on queue `q` (not kicked).
fn write_on(front: &mut SimBlkfront<MemXsConn>, q: usize, sector: u64, data: &[u8]) -> u64 {
    front.set_queue(q).unwrap();
    front.submit_write(sector, data).unwrap()
}

#[test]
fn four_queues_carry_concurrent_verified_io() {
    let rig = Rig::start();
    let path = rig.path("mq.img");
    let size = 16 << 20;
    let mut model = make_raw(&path, size, 21);
    rig.open(0, &format!("aio:{}", path.display()), None);
    // The backend offers 4; the frontend asks for 6 and gets 4.
    let mut front = rig.frontend_with(7, 51712, 0, opts(6));
    assert_eq!(front.queue_count(), 4);
    assert_eq!(front.info().unwrap().queues, 4);
    let fpath = "/local/domain/7/device/vbd/51712";
    let xs = rig.store.connect(BE).unwrap();
    let rd = |k: &str| {
        use blktap3::xen::xenstore::{Tx, XenStore};
        xs.read_string(Tx::NONE, &format!("{fpath}/{k}")).unwrap()
    };
    assert_eq!(rd("multi-queue-num-queues").as_deref(), Some("4"));
    for q in 0..4 {
        assert!(rd(&format!("queue-{q}/event-channel")).is_some());
        assert!(rd(&format!("queue-{q}/ring-ref0")).is_some());
    }
    assert!(rd("event-channel").is_none());

    let mut rng = Rng(8);
    for round in 0..12u64 {
        // Every queue writes its own region (8 requests of 1..=20 pages, some indirect),
        // all kicked before anything is waited for.
        let mut expect = Vec::new();
        for q in 0..4usize {
            for k in 0..8u64 {
                let pages = 1 + rng.below(20) as usize;
                let sector = ((round % 3) * 32 + q as u64 * 8 + k) * 256;
                let mut d = vec![0u8; pages * 4096];
                rng.fill(&mut d);
                model[(sector * 512) as usize..][..d.len()].copy_from_slice(&d);
                expect.push(write_on(&mut front, q, sector, &d));
            }
            front.kick().unwrap();
        }
        let done = wait(&mut front, expect.len());
        assert!(done.iter().all(|c| c.status == 0), "{done:?}");
        // Read everything back, each queue reading another queue's region.
        let mut reads = Vec::new();
        for q in 0..4usize {
            front.set_queue((q + 1) % 4).unwrap();
            let sector = ((round % 3) * 32 + q as u64 * 8) * 256;
            reads.push((front.submit_read(sector, 8 * 256).unwrap(), sector));
        }
        for q in 0..4 {
            front.set_queue(q).unwrap();
            front.kick().unwrap();
        }
        for c in wait(&mut front, 4) {
            assert_eq!(c.status, 0);
            let sector = reads.iter().find(|r| r.0 == c.id).unwrap().1;
            let at = (sector * 512) as usize;
            assert!(c.data.as_deref() == Some(&model[at..at + 8 * 256 * 512]));
        }
    }
    // Four rings in the VBD's stats, each of which carried its share.
    let st = rig.stats(0);
    assert_eq!(
        st.matches("\"domid\": 7, \"devid\": 51712").count(),
        4,
        "{st}"
    );
    assert!(!st.contains("\"reqs\": [ 0, 0 ]"), "{st}");
}

#[test]
fn a_flush_drains_its_own_queue_only() {
    let gate = GateOpener::new(16384);
    let rig = Rig::with_opener(gate.clone());
    rig.open(0, "aio:/gated", None);
    let mut front = rig.frontend_with(8, 51712, 0, opts(2));
    assert_eq!(front.queue_count(), 2);
    // Queue 0: a write stuck behind the closed gate, then a flush, which must wait for it.
    gate.set(false);
    let w = write_on(&mut front, 0, 0, &[1u8; 4096]);
    let f = front.submit_sync(op::FLUSH_DISKCACHE, 0, &[]).unwrap();
    front.kick().unwrap();
    until("the write in flight", || outstanding(&rig.stats(0)) == 1);
    // Queue 1: a discard (never waits for the gate) completes meanwhile.
    front.set_queue(1).unwrap();
    let d = front.submit_discard(4096, 8).unwrap();
    front.kick().unwrap();
    let c = wait(&mut front, 1);
    assert_eq!((c[0].id, c[0].status), (d, 0));
    // Queue 0's flush has not been answered before its write.
    assert!(front.poll_completions().unwrap().is_empty());
    gate.set(true);
    let mut ids: Vec<u64> = wait(&mut front, 2).iter().map(|c| c.id).collect();
    ids.sort_unstable();
    assert_eq!(ids, vec![w, f]);
}

#[test]
fn pause_holds_every_queue_and_resume_serves_them_all() {
    let rig = Rig::start();
    let path = rig.path("p.img");
    let size = 4 << 20;
    let model = make_raw(&path, size, 4);
    let params = format!("aio:{}", path.display());
    rig.open(0, &params, None);
    let mut front = rig.frontend_with(9, 51712, 0, opts(3));
    assert_eq!(front.queue_count(), 3);
    assert_eq!(rig.call(Request::Pause { minor: 0 }), Reply::Pause);
    let mut ids = Vec::new();
    for q in 0..3usize {
        front.set_queue(q).unwrap();
        ids.push(front.submit_read(q as u64 * 64, 64).unwrap());
        front.kick().unwrap();
    }
    std::thread::sleep(Duration::from_millis(150));
    assert!(front.poll_completions().unwrap().is_empty());
    resume(&rig, 0);
    let got = wait(&mut front, 3);
    for c in &got {
        let q = ids.iter().position(|&i| i == c.id).unwrap();
        let at = q * 64 * 512;
        assert!(c.data.as_deref() == Some(&model[at..at + 64 * 512]));
    }
}

fn blkif(domid: u32, queue: u32, port: u32) -> Blkif {
    Blkif {
        domid,
        devid: 51712,
        gref: [0; 16],
        order: 0,
        proto: BlkifProto::X86_64,
        pool: String::new(),
        port,
        poll_duration: 0,
        poll_idle_threshold: 0,
        queue,
    }
}

#[test]
fn disconnect_removes_every_queue_and_connect_rules_hold() {
    let rig = Rig::start();
    let path = rig.path("d.img");
    make_raw(&path, 1 << 20, 1);
    rig.open(0, &format!("aio:{}", path.display()), None);
    let path1 = rig.path("e.img");
    make_raw(&path1, 1 << 20, 2);
    rig.open(1, &format!("aio:{}", path1.display()), None);
    let mut front = rig.frontend_with(10, 51712, 0, opts(2));
    front.set_queue(1).unwrap();
    front.submit_read(0, 8).unwrap();
    front.kick().unwrap();
    assert_eq!(wait(&mut front, 1)[0].status, 0);
    // The same queue again: EALREADY. Queue 1 of this device on another minor: EINVAL
    // (checked before anything is mapped, so the bogus grant refs do not matter).
    let errno = |r: Reply| match r {
        Reply::Error(e) => e,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        errno(rig.call(Request::XenblkifConnect {
            minor: 0,
            blkif: blkif(10, 1, 1)
        })),
        libc::EALREADY
    );
    assert_eq!(
        errno(rig.call(Request::XenblkifConnect {
            minor: 1,
            blkif: blkif(10, 2, 1)
        })),
        libc::EINVAL
    );
    assert_eq!(
        rig.call(Request::XenblkifDisconnect {
            domid: 10,
            devid: 51712
        }),
        Reply::XenblkifDisconnect
    );
    assert!(!rig.stats(0).contains("xenbus"), "{}", rig.stats(0));
    // Nothing left to disconnect.
    assert_eq!(
        errno(rig.call(Request::XenblkifDisconnect {
            domid: 10,
            devid: 51712
        })),
        libc::ENODEV
    );
    // The guest comes back with 2 queues again.
    drop(front);
    let mut front2 = rig.frontend_with(11, 51712, 0, opts(2));
    for q in 0..2 {
        front2.set_queue(q).unwrap();
        front2.submit_read(q as u64 * 8, 8).unwrap();
        front2.kick().unwrap();
    }
    assert!(wait(&mut front2, 2).iter().all(|c| c.status == 0));
}
