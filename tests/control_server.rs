//! The control server over a real Unix socket with a test handler.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use blktap3::control::msg::{
    read_reply, DiskInfo, ListEntry, MsgType, OpenRequest, Reply, Request, SecretKey, VbdState,
    WireLayout, MSG_SIZE,
};
use blktap3::control::server::{serve_connection_with, ControlServer, Served};

const L: WireLayout = WireLayout::NATIVE;

/// Start a server in a temp dir that serves `n` connections with `handler` on a thread;
/// returns the socket path, the served outcomes (joined) and the requests seen.
fn with_server<F>(
    n: usize,
    recv_timeout: Duration,
    mut handler: F,
    client: impl FnOnce(&std::path::Path),
) -> (Vec<Served>, Vec<Request>)
where
    F: FnMut(&Request) -> Reply + Send + 'static,
{
    let dir = tempfile::tempdir().unwrap();
    let server = ControlServer::bind(dir.path(), 4242).unwrap();
    let path = server.path().to_path_buf();
    assert_eq!(path, dir.path().join("ctl4242"));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = Arc::clone(&seen);
    let t = thread::spawn(move || {
        let mut out = Vec::new();
        for _ in 0..n {
            let s = server.accept().unwrap();
            out.push(serve_connection_with(
                s,
                &mut |r| {
                    let rep = handler(&r);
                    seen2.lock().unwrap().push(r);
                    rep
                },
                L,
                recv_timeout,
            ));
        }
        out
    });
    client(&path);
    let served = t.join().unwrap();
    let seen = seen.lock().unwrap().clone();
    (served, seen)
}

fn roundtrip(path: &std::path::Path, req: &Request) -> (u16, Reply) {
    let mut s = UnixStream::connect(path).unwrap();
    s.write_all(&req.encode().unwrap()).unwrap();
    read_reply(&mut s, L).unwrap()
}

#[test]
fn dribbled_request_with_trailers_is_handled() {
    let mut open = OpenRequest::new(3, "vhd:/a.vhd");
    open.set_log_path(Some("/tmp/log".into()));
    open.set_key(Some(SecretKey::new(&[7; 32])));
    let req = Request::Open(open);
    let req2 = req.clone();
    let (served, seen) = with_server(
        1,
        Duration::from_secs(2),
        |_| {
            Reply::Open(DiskInfo {
                sectors: 2048,
                sector_size: 512,
                info: 0,
            })
        },
        move |path| {
            let wire = req2.encode().unwrap();
            let mut s = UnixStream::connect(path).unwrap();
            for chunk in wire.chunks(5) {
                s.write_all(chunk).unwrap();
                thread::sleep(Duration::from_millis(1));
            }
            let (cookie, rep) = read_reply(&mut s, L).unwrap();
            assert_eq!(cookie, 3);
            assert_eq!(
                rep,
                Reply::Open(DiskInfo {
                    sectors: 2048,
                    sector_size: 512,
                    info: 0
                })
            );
        },
    );
    assert_eq!(
        served,
        vec![Served::Handled {
            request: MsgType::Open,
            replied: true
        }]
    );
    assert_eq!(seen, vec![req]);
}

#[test]
fn disconnect_mid_message_never_reaches_the_handler() {
    let (served, seen) = with_server(
        2,
        Duration::from_secs(2),
        |_| Reply::Pid(1),
        |path| {
            let wire = Request::Attach { minor: 1 }.encode().unwrap();
            let mut s = UnixStream::connect(path).unwrap();
            s.write_all(&wire[..MSG_SIZE / 2]).unwrap();
            drop(s);
            // OPEN whose trailer is cut off.
            let mut o = OpenRequest::new(1, "aio:/x");
            o.log_path = Some("/l".into());
            let wire = Request::Open(o).encode().unwrap();
            let mut s = UnixStream::connect(path).unwrap();
            s.write_all(&wire[..MSG_SIZE + 10]).unwrap();
            drop(s);
        },
    );
    assert_eq!(served, vec![Served::Dropped, Served::Dropped]);
    assert!(seen.is_empty());
}

#[test]
fn slow_client_times_out() {
    let (served, seen) = with_server(
        1,
        Duration::from_millis(200),
        |_| Reply::Pid(1),
        |path| {
            let wire = Request::Pid.encode().unwrap();
            let mut s = UnixStream::connect(path).unwrap();
            s.write_all(&wire[..100]).unwrap();
            thread::sleep(Duration::from_millis(600));
            // The server gave up: the rest of the message gets no reply.
            let _ = s.write_all(&wire[100..]);
            let mut b = [0u8; 1];
            assert_eq!(s.read(&mut b).unwrap_or(0), 0);
        },
    );
    assert_eq!(served, vec![Served::Dropped]);
    assert!(seen.is_empty());
}

#[test]
fn bad_input_gets_einval_with_cookie_echoed() {
    let (served, seen) = with_server(
        3,
        Duration::from_secs(2),
        |_| Reply::Pid(1),
        |path| {
            // Unknown type 99.
            let mut m = vec![0u8; MSG_SIZE];
            m[0..2].copy_from_slice(&99u16.to_ne_bytes());
            m[2..4].copy_from_slice(&77u16.to_ne_bytes());
            let mut s = UnixStream::connect(path).unwrap();
            s.write_all(&m).unwrap();
            assert_eq!(
                read_reply(&mut s, L).unwrap(),
                (77, Reply::Error(libc::EINVAL))
            );
            // PID without a NUL in params.path.
            let mut m = Request::Pid.encode().unwrap().to_vec();
            let p = L.params_path_offset();
            m[p..p + 256].fill(b'x');
            let mut s = UnixStream::connect(path).unwrap();
            s.write_all(&m).unwrap();
            assert_eq!(
                read_reply(&mut s, L).unwrap(),
                (0, Reply::Error(libc::EINVAL))
            );
            // EXIT has no handler.
            let mut m = vec![0u8; MSG_SIZE];
            m[0..2].copy_from_slice(&30u16.to_ne_bytes());
            let mut s = UnixStream::connect(path).unwrap();
            s.write_all(&m).unwrap();
            assert_eq!(
                read_reply(&mut s, L).unwrap(),
                (0, Reply::Error(libc::EINVAL))
            );
        },
    );
    assert_eq!(served, vec![Served::Rejected(libc::EINVAL); 3]);
    assert!(seen.is_empty());
}

#[test]
fn list_of_50_and_big_stats_payload() {
    let entries: Vec<ListEntry> = (0..50)
        .map(|i| ListEntry {
            minor: i,
            state: VbdState::CLOSED,
            params: format!("vhd:/srv/{i}.vhd"),
        })
        .collect();
    let e2 = entries.clone();
    // Larger than any socket buffer: the reply must be streamed.
    let payload: Vec<u8> = (0..600_000u32).map(|i| b'a' + (i % 26) as u8).collect();
    let p2 = payload.clone();
    let (served, _) = with_server(
        3,
        Duration::from_secs(2),
        move |r| match r {
            Request::List => Reply::List(e2.clone()),
            Request::Stats { minor: None } => Reply::Stats(p2.clone()),
            _ => Reply::error(libc::ENOSYS),
        },
        |path| {
            assert_eq!(
                roundtrip(path, &Request::List),
                (0xFFFF, Reply::List(entries.clone()))
            );
            let mut s = UnixStream::connect(path).unwrap();
            s.write_all(&Request::Stats { minor: None }.encode().unwrap())
                .unwrap();
            thread::sleep(Duration::from_millis(50));
            assert_eq!(
                read_reply(&mut s, L).unwrap(),
                (0xFFFF, Reply::Stats(payload.clone()))
            );
            assert_eq!(
                roundtrip(path, &Request::Pause { minor: 5 }),
                (5, Reply::Error(libc::ENOSYS))
            );
        },
    );
    assert!(served
        .iter()
        .all(|s| matches!(s, Served::Handled { replied: true, .. })));
}

#[test]
fn client_gone_before_reply_does_not_kill_the_server() {
    let (served, _) = with_server(
        2,
        Duration::from_secs(2),
        |r| match r {
            Request::List => Reply::List(
                (0..2000)
                    .map(|i| ListEntry {
                        minor: i,
                        state: VbdState(0),
                        params: String::new(),
                    })
                    .collect(),
            ),
            _ => Reply::Pid(9),
        },
        |path| {
            let mut s = UnixStream::connect(path).unwrap();
            s.write_all(&Request::List.encode().unwrap()).unwrap();
            let mut b = vec![0u8; MSG_SIZE];
            s.read_exact(&mut b).unwrap();
            drop(s);
            // The server survives (no SIGPIPE) and serves the next client.
            assert_eq!(roundtrip(path, &Request::Pid), (0, Reply::Pid(9)));
        },
    );
    assert_eq!(
        served[0],
        Served::Handled {
            request: MsgType::List,
            replied: false
        }
    );
    assert_eq!(
        served[1],
        Served::Handled {
            request: MsgType::Pid,
            replied: true
        }
    );
}

#[test]
fn run_concurrent_serves_parallel_clients_and_unlinks_on_drop() {
    let dir = tempfile::tempdir().unwrap();
    let server = Arc::new(ControlServer::bind(dir.path(), 77).unwrap());
    let path = server.path().to_path_buf();
    let s2 = Arc::clone(&server);
    thread::spawn(move || {
        let _ = s2.run_concurrent(Arc::new(|r| match r {
            Request::Pid => Reply::Pid(77),
            _ => Reply::error(libc::EINVAL),
        }));
    });
    // A slow client must not block the others.
    let mut slow = UnixStream::connect(&path).unwrap();
    slow.write_all(&[0u8; 10]).unwrap();
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let p = path.clone();
            thread::spawn(move || roundtrip(&p, &Request::Pid))
        })
        .collect();
    for c in clients {
        assert_eq!(c.join().unwrap(), (0, Reply::Pid(77)));
    }
    drop(slow);
    // Rebinding the same pid replaces a stale socket.
    let again = ControlServer::bind(dir.path(), 78).unwrap();
    let p78 = again.path().to_path_buf();
    assert!(p78.exists());
    drop(again);
    assert!(!p78.exists());
}
