//! Ring lifecycle through the tapdisk event loop: control errors (over the real control
//! socket), disconnect with I/O in flight (dead ring), reconnect after a guest reboot, two
//! rings plus NBD on one VBD, pause/resume with requests queued in the ring.

mod common;

use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use blktap3::blkif::ring::header_index;
use blktap3::blkif::{op, Abi};
use blktap3::control::client::Client;
use blktap3::control::msg::OpenFlags;
use blktap3::control::msg::{
    decode_frame, Blkif, BlkifProto, Frame, Reply, Request, ResumeRequest, WireLayout,
};
use blktap3::control::server::{serve_connection, ControlServer};
use blktap3::control::ControlError;
use blktap3::nbd::client::Client as NbdClient;
use common::xenio::*;

fn blkif(domid: u32, devid: u32, order: u32) -> Blkif {
    Blkif {
        domid,
        devid,
        gref: [1; 16],
        order,
        proto: BlkifProto::X86_64,
        pool: String::new(),
        port: 1,
        poll_duration: 0,
        poll_idle_threshold: 0,
        queue: 0,
    }
}

fn rsp_prod(front: &mut blktap3::xen::sim::SimBlkfront<blktap3::xen::sim::MemXsConn>) -> u32 {
    header_index(front.ring().unwrap().mem(), 8)
}

#[test]
fn control_errors_over_the_socket() {
    let rig = Rig::start();
    let path = rig.path("d.img");
    make_raw(&path, 1 << 20, 1);
    rig.open(0, &format!("aio:{}", path.display()), None);
    let pid = 4242;
    let server = Arc::new(ControlServer::bind(rig.dir.path(), pid).unwrap());
    {
        let server = Arc::clone(&server);
        let h = rig.h.clone();
        std::thread::spawn(move || loop {
            let Ok(s) = server.accept() else { return };
            serve_connection(s, &mut |r| h.call(r));
        });
    }
    let client = Client::with_dir(rig.dir.path());
    let remote = |r: Result<(), ControlError>| match r {
        Err(ControlError::Remote(e)) => e,
        r => panic!("{r:?}"),
    };
    // No VBD on minor 9.
    assert_eq!(
        remote(client.connect_xenblkif(pid, 9, blkif(1, 51712, 0))),
        libc::ENODEV
    );
    // A ring that does not exist.
    assert_eq!(
        remote(client.disconnect_xenblkif(pid, 1, 51712, None)),
        libc::ENODEV
    );
    let front = rig.frontend(1, 51712, 0, Some(Abi::X86_64), 0);
    // The same (domid, devid) again.
    assert_eq!(
        remote(client.connect_xenblkif(pid, 0, blkif(1, 51712, 0))),
        libc::EALREADY
    );
    // Bad grant refs for a new ring: the map fails, nothing is left behind.
    assert!(client.connect_xenblkif(pid, 0, blkif(1, 51713, 0)).is_err());
    // Order 5 cannot be encoded by our client: patch the order field of a raw message.
    let req = |order| Request::XenblkifConnect {
        minor: 0,
        blkif: blkif(5, 1, order),
    };
    assert_eq!(req(5).encode().unwrap_err().errno(), libc::EINVAL);
    let a = req(3).encode().unwrap();
    let b = req(2).encode().unwrap();
    let diff: Vec<usize> = (0..a.len()).filter(|&i| a[i] != b[i]).collect();
    assert_eq!(diff.len(), 1);
    let mut raw = a.to_vec();
    raw[diff[0]] = 5;
    let mut s = UnixStream::connect(rig.dir.path().join(format!("ctl{pid}"))).unwrap();
    std::io::Write::write_all(&mut s, &raw).unwrap();
    let mut rsp = vec![0u8; blktap3::control::msg::MSG_SIZE];
    std::io::Read::read_exact(&mut s, &mut rsp).unwrap();
    match decode_frame(&rsp, WireLayout::NATIVE).unwrap().1 {
        Frame::Reply(Reply::Error(e)) => assert_eq!(e, libc::EINVAL),
        f => panic!("{f:?}"),
    }
    // Order 5 through the typed API reaches the ring code, which refuses it too.
    assert_eq!(
        rig.call(Request::XenblkifConnect {
            minor: 0,
            blkif: blkif(5, 1, 5)
        }),
        Reply::Error(libc::EINVAL)
    );
    // A VBD with a live ring cannot be detached (after close).
    assert_eq!(rig.call(Request::Close { minor: 0 }), Reply::Close);
    assert_eq!(
        rig.call(Request::Detach { minor: 0 }),
        Reply::Error(libc::EBUSY)
    );
    assert_eq!(
        client
            .disconnect_xenblkif(pid, 1, 51712, None)
            .map_err(|e| e.to_string()),
        Ok(())
    );
    assert_eq!(rig.call(Request::Detach { minor: 0 }), Reply::Detach);
    drop(front);
}

#[test]
fn disconnect_with_io_in_flight_then_guest_reboot() {
    let gate = GateOpener::new(8192);
    let rig = Rig::with_opener(gate.clone());
    rig.open(0, "aio:/gated", None);
    let mut front = rig.frontend(2, 51712, 0, Some(Abi::X86_32), 1);
    gate.set(false);
    let mut rng = Rng(5);
    let mut written = Vec::new();
    for i in 0..8u64 {
        let mut d = vec![0u8; 8192];
        rng.fill(&mut d);
        front.submit_write(i * 64, &d).unwrap();
        written.push((i * 64, d));
    }
    for i in 0..4u64 {
        front.submit_read(1000 + i * 8, 8).unwrap();
    }
    front.kick().unwrap();
    until("12 requests in flight", || outstanding(&rig.stats(0)) == 12);
    assert_eq!(
        rig.call(Request::XenblkifDisconnect {
            domid: 2,
            devid: 51712
        }),
        Reply::XenblkifDisconnect
    );
    assert!(!rig.stats(0).contains("xenbus"));
    gate.set(true);
    until("the dead ring drained", || outstanding(&rig.stats(0)) == 0);
    std::thread::sleep(Duration::from_millis(50));
    // Nothing was written to the ring after the disconnect.
    assert_eq!(rsp_prod(&mut front), 0);
    assert!(front.poll_completions().unwrap().is_empty());

    // Guest reboot: a new frontend on the same (domid, devid) connects again.
    let mut front2 = rig.frontend(2, 51712, 0, Some(Abi::X86_64), 2);
    for (sector, d) in &written {
        front2.submit_read(*sector, 16).unwrap();
        front2.kick().unwrap();
        let c = wait(&mut front2, 1);
        // The dead ring's writes did reach the disk; only their responses were dropped.
        assert_eq!(c[0].status, 0);
        assert!(c[0].data.as_deref() == Some(&d[..]));
    }
    assert!(rig.stats(0).contains("\"domid\": 2, \"devid\": 51712"));
}

#[test]
fn two_rings_and_nbd_on_one_vbd() {
    let rig = Rig::start();
    let path = rig.path("shared.img");
    let size = 8 << 20;
    let mut model = make_raw(&path, size, 3);
    rig.open(0, &format!("aio:{}", path.display()), None);
    // A stubdomain and its guest attach the same disk.
    let mut stub = rig.frontend(3, 51712, 0, Some(Abi::X86_32), 0);
    let mut guest = rig.frontend(4, 51712, 0, None, 3);
    let sock = rig.dir.path().join(format!("nbd{}.0", std::process::id()));
    let mut nbd = NbdClient::connect(&sock, false).unwrap();
    let mut rng = Rng(11);
    for round in 0..20u64 {
        // Disjoint regions per path in each round.
        let base = round * 96 * 1024;
        let mut a = vec![0u8; 32 * 1024];
        let mut b = vec![0u8; 32 * 1024];
        let mut c = vec![0u8; 32 * 1024];
        rng.fill(&mut a);
        rng.fill(&mut b);
        rng.fill(&mut c);
        stub.submit_write(base / 512, &a).unwrap();
        guest.submit_write((base + 32768) / 512, &b).unwrap();
        stub.kick().unwrap();
        guest.kick().unwrap();
        assert_eq!(nbd.write(base + 65536, &c, false).unwrap(), 0);
        assert_eq!(wait(&mut stub, 1)[0].status, 0);
        assert_eq!(wait(&mut guest, 1)[0].status, 0);
        let at = base as usize;
        model[at..at + 32768].copy_from_slice(&a);
        model[at + 32768..at + 65536].copy_from_slice(&b);
        model[at + 65536..at + 98304].copy_from_slice(&c);
        // Everyone reads everything written this round.
        let want = &model[at..at + 98304];
        stub.submit_read(base / 512, 192).unwrap();
        stub.kick().unwrap();
        assert!(wait(&mut stub, 1)[0].data.as_deref() == Some(want));
        guest.submit_read(base / 512, 192).unwrap();
        guest.kick().unwrap();
        assert!(wait(&mut guest, 1)[0].data.as_deref() == Some(want));
        assert!(nbd.read(base, 98304).unwrap().unwrap() == want);
    }
    let st = rig.stats(0);
    assert_eq!(
        st.matches("\"pool\": \"td-xenio-default\"").count(),
        2,
        "{st}"
    );
    assert!(
        st.contains("\"domid\": 3, \"devid\": 51712, \"reqs\": [ 40, 40 ]"),
        "{st}"
    );
    assert!(
        st.contains("\"domid\": 4, \"devid\": 51712, \"reqs\": [ 40, 40 ]"),
        "{st}"
    );
    let _ = Ordering::SeqCst;
}

#[test]
fn pause_leaves_requests_in_the_ring_and_resume_serves_them() {
    let rig = Rig::start();
    let path = rig.path("p.img");
    let size = 4 << 20;
    let mut model = make_raw(&path, size, 9);
    let params = format!("aio:{}", path.display());
    rig.open(0, &params, None);
    let mut front = rig.frontend(6, 51712, 0, Some(Abi::X86_64), 0);
    assert_eq!(rig.call(Request::Pause { minor: 0 }), Reply::Pause);
    let mut rng = Rng(2);
    let mut ids = Vec::new();
    for i in 0..6u64 {
        let mut d = vec![0u8; 4096];
        rng.fill(&mut d);
        model[(i * 8192) as usize..(i * 8192) as usize + 4096].copy_from_slice(&d);
        ids.push(front.submit_write(i * 16, &d).unwrap());
    }
    ids.push(front.submit_sync(op::FLUSH_DISKCACHE, 0, &[]).unwrap());
    front.kick().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(front.poll_completions().unwrap().is_empty());
    assert_eq!(rsp_prod(&mut front), 0);
    assert_eq!(
        rig.call(Request::Resume(ResumeRequest {
            minor: 0,
            flags: OpenFlags::empty(),
            params: None,
            secondary: None,
            log_path: None,
        })),
        Reply::Resume
    );
    let got = wait(&mut front, 7);
    assert!(got.iter().all(|c| c.status == 0));
    let mut got_ids: Vec<u64> = got.iter().map(|c| c.id).collect();
    got_ids.sort_unstable();
    assert_eq!(got_ids, ids);
    front.submit_read(0, (size / 512) as u32 / 4).unwrap();
    front.kick().unwrap();
    let c = wait(&mut front, 1);
    assert!(c[0].data.as_deref() == Some(&model[..size / 4]));
}
