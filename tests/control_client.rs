//! The client against in-process servers: timeouts, error mapping and the list join.

use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use blktap3::control::client::{Client, TapEntry};
use blktap3::control::minors;
use blktap3::control::msg::{
    Blkif, BlkifProto, DiskInfo, ListEntry, OpenRequest, Reply, Request, VbdState,
};
use blktap3::control::server::ControlServer;

/// Serve `pid` in `dir` forever on a thread with `h`.
fn serve(dir: &std::path::Path, pid: i32, h: impl Fn(Request) -> Reply + Send + Sync + 'static) {
    let server = ControlServer::bind(dir, pid).unwrap();
    std::thread::spawn(move || {
        let _ = server.run_concurrent(Arc::new(h));
    });
}

#[test]
fn timeout_gives_etimedout() {
    let d = tempfile::tempdir().unwrap();
    // A socket that accepts (backlog) but never answers.
    let _l = UnixListener::bind(d.path().join("ctl555")).unwrap();
    let c = Client::with_dir(d.path());
    let t = Instant::now();
    let e = c
        .get_pid(555, Some(Duration::from_millis(200)))
        .unwrap_err();
    assert_eq!(e.errno(), libc::ETIMEDOUT);
    assert!(t.elapsed() >= Duration::from_millis(200));
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[test]
fn error_replies_and_wrong_types() {
    let d = tempfile::tempdir().unwrap();
    serve(d.path(), 600, |r| match r {
        Request::Pid => Reply::Pid(600),
        Request::Attach { minor: 1 } => Reply::error(libc::EEXIST),
        Request::Detach { .. } => Reply::Pid(1),
        Request::DiskInfo { minor } => Reply::DiskInfo(DiskInfo {
            sectors: u64::from(minor) << 33,
            sector_size: 4096,
            info: 4,
        }),
        Request::XenblkifConnect { minor: 2, blkif } if blkif.ring_refs() == [5, 6] => {
            Reply::XenblkifConnect
        }
        // Order 4: sixteen refs, 8..15 through the extension.
        Request::XenblkifConnect { minor: 4, blkif }
            if blkif.order == 4
                && blkif.ring_refs() == (1000..1016).collect::<Vec<u32>>().as_slice() =>
        {
            Reply::XenblkifConnect
        }
        Request::XenblkifDisconnect {
            domid: 4,
            devid: 768,
        } => Reply::XenblkifDisconnect,
        Request::Open(o) if o.params == "vhd:/x" && o.req_timeout == 9 => Reply::Open(DiskInfo {
            sectors: 8,
            sector_size: 512,
            info: 0,
        }),
        Request::Close { .. } | Request::ForceShutdown { .. } => Reply::Close,
        _ => Reply::error(libc::EINVAL),
    });
    let c = Client::with_dir(d.path());
    assert_eq!(c.get_pid(600, None).unwrap(), 600);
    assert_eq!(c.attach(600, 1).unwrap_err().errno(), libc::EEXIST);
    assert_eq!(c.attach(600, 2).unwrap_err().errno(), libc::EINVAL);
    // Wrong reply type: EINVAL.
    assert_eq!(c.detach(600, 1).unwrap_err().errno(), libc::EINVAL);
    assert_eq!(
        c.info(600, 1, None).unwrap(),
        DiskInfo {
            sectors: 1 << 33,
            sector_size: 4096,
            info: 4
        }
    );
    let mut o = OpenRequest::new(3, "vhd:/x");
    o.req_timeout = 9;
    assert_eq!(c.open(600, o, None).unwrap().sectors, 8);
    c.close(600, 3, false, Some(Duration::from_secs(2)))
        .unwrap();
    c.close(600, 3, true, None).unwrap();
    let mut gref = [0; 16];
    gref[0] = 5;
    gref[1] = 6;
    let mut b = Blkif {
        domid: 4,
        devid: 768,
        gref,
        order: 1,
        proto: BlkifProto::X86_64,
        pool: String::new(),
        port: 3,
        poll_duration: 0,
        poll_idle_threshold: 0,
        queue: 0,
    };
    c.connect_xenblkif(600, 2, b.clone()).unwrap();
    for (i, g) in b.gref.iter_mut().enumerate() {
        *g = 1000 + i as u32;
    }
    b.order = 4;
    c.connect_xenblkif(600, 4, b.clone()).unwrap();
    // With a ref the server does not expect (gref[15]), the server's arm does not match.
    b.gref[15] = 7;
    assert!(c.connect_xenblkif(600, 4, b.clone()).is_err());
    // Order 5 is refused by the client before anything is sent.
    b.order = 5;
    assert_eq!(
        c.connect_xenblkif(600, 4, b).unwrap_err().errno(),
        libc::EINVAL
    );
    c.disconnect_xenblkif(600, 4, 768, None).unwrap();
    assert_eq!(
        c.disconnect_xenblkif(600, 4, 769, None)
            .unwrap_err()
            .errno(),
        libc::EINVAL
    );
}

#[test]
fn list_is_the_outer_join_of_markers_tapdisks_and_vbds() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    for _ in 0..4 {
        minors::allocate(dir).unwrap();
    }
    // Tapdisk 700 serves minors 1 and 3 (3 closed), tapdisk 800 serves nothing,
    // "tapdisk" 900 answers PID with another pid (not verified: skipped),
    // ctl1000 is a stale socket nobody listens on.
    serve(dir, 700, |r| match r {
        Request::Pid => Reply::Pid(700),
        Request::List => Reply::List(vec![
            ListEntry {
                minor: 1,
                state: VbdState(0),
                params: "vhd:/v/one.vhd".into(),
            },
            ListEntry {
                minor: 3,
                state: VbdState::CLOSED,
                params: String::new(),
            },
        ]),
        _ => Reply::error(libc::EINVAL),
    });
    serve(dir, 800, |r| match r {
        Request::Pid => Reply::Pid(800),
        Request::List => Reply::List(vec![]),
        _ => Reply::error(libc::EINVAL),
    });
    serve(dir, 900, |r| match r {
        Request::Pid => Reply::Pid(901),
        _ => Reply::error(libc::EINVAL),
    });
    drop(UnixListener::bind(dir.join("ctl1000")).unwrap());
    let c = Client::with_dir(dir);
    assert_eq!(c.tapdisks().unwrap(), vec![700, 800]);
    let rows = c.list().unwrap();
    let want = vec![
        TapEntry {
            pid: Some(700),
            minor: Some(1),
            state: Some(VbdState(0)),
            disk_type: Some("vhd".into()),
            path: Some("/v/one.vhd".into()),
        },
        TapEntry {
            pid: Some(700),
            minor: Some(3),
            state: Some(VbdState::CLOSED),
            disk_type: None,
            path: None,
        },
        TapEntry {
            pid: Some(800),
            ..TapEntry::default()
        },
        TapEntry {
            minor: Some(0),
            ..TapEntry::default()
        },
        TapEntry {
            minor: Some(2),
            ..TapEntry::default()
        },
    ];
    assert_eq!(rows, want);
    assert_eq!(c.find_minor("vhd", "/v/one.vhd").unwrap(), 1);
    assert_eq!(
        c.find_minor("aio", "/v/one.vhd").unwrap_err().errno(),
        libc::ENOENT
    );
}
