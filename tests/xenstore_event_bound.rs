//! The xenstore client's watch-event queue stays bounded when a peer floods it with events
//! (a guest writing under a watched node as fast as it can): past
//! `MAX_QUEUED_EVENT_BYTES`, events arriving while a request waits for its reply are folded
//! into one event per token naming the watched path, and `take_watch_events` returns batches
//! of at most that size, leaving the rest in the socket. Nothing is lost: every token that
//! had events is still reported.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::{Duration, Instant};

use blktap3::xen::xenstore::client::MAX_QUEUED_EVENT_BYTES;
use blktap3::xen::xenstore::wire::{self, Message, MsgType};
use blktap3::xen::xenstore::{Tx, WatchEvent, XenStore, XsClient};

fn next_request(s: &mut UnixStream, buf: &mut Vec<u8>) -> Message {
    loop {
        if let Some((m, used)) = wire::decode(buf).unwrap() {
            buf.drain(..used);
            return m;
        }
        let mut chunk = [0u8; 8192];
        let n = s.read(&mut chunk).unwrap();
        assert!(n > 0, "client closed");
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn event(path: &str, token: &str) -> Vec<u8> {
    Message::new(
        MsgType::WatchEvent,
        0,
        0,
        wire::join_strings(&[path, token]),
    )
    .encode()
    .unwrap()
}

const FRONT: &str = "/local/domain/9/device/vbd/51712/state";
const N: usize = 20_000;

fn flood(s: &mut UnixStream, from: usize) {
    let mut out = Vec::new();
    for i in from..from + N {
        if i.is_multiple_of(10) {
            out.extend(event(&format!("backend/vbd3/9/{i}"), "root"));
        } else {
            out.extend(event(&format!("{FRONT}/{i}"), "front"));
        }
    }
    s.write_all(&out).unwrap();
}

fn bytes(evs: &[WatchEvent]) -> usize {
    evs.iter().map(|e| e.path.len() + e.token.len()).sum()
}

#[test]
fn a_flood_of_watch_events_is_folded_and_batched() {
    let (a, mut b) = UnixStream::pair().unwrap();
    let server = thread::spawn(move || {
        let mut buf = Vec::new();
        for _ in 0..2 {
            let m = next_request(&mut b, &mut buf);
            assert_eq!(m.ty, MsgType::Watch);
            let reply = Message::new(MsgType::Watch, m.req_id, 0, b"OK\0".to_vec());
            b.write_all(&reply.encode().unwrap()).unwrap();
        }
        // A read whose reply comes after a flood of events.
        let m = next_request(&mut b, &mut buf);
        assert_eq!(m.ty, MsgType::Read);
        flood(&mut b, 0);
        let reply = Message::new(MsgType::Read, m.req_id, 0, b"value".to_vec());
        b.write_all(&reply.encode().unwrap()).unwrap();
        // Then a flood while the client is idle.
        let m = next_request(&mut b, &mut buf);
        assert_eq!(m.ty, MsgType::Read);
        let reply = Message::new(MsgType::Read, m.req_id, 0, b"go".to_vec());
        b.write_all(&reply.encode().unwrap()).unwrap();
        flood(&mut b, N);
        b
    });
    let c = XsClient::from_fd(a.into());
    c.watch(FRONT, "front").unwrap();
    c.watch("backend/vbd3", "root").unwrap();
    assert_eq!(
        c.read(Tx::NONE, "x").unwrap().as_deref(),
        Some(&b"value"[..])
    );

    // Queued while waiting for the reply: the first events as they came, then one folded
    // event per token, naming the watched path.
    let evs = c.take_watch_events().unwrap();
    assert!(evs.len() < N, "{} events queued", evs.len());
    assert!(bytes(&evs) <= MAX_QUEUED_EVENT_BYTES + 64);
    let folded: Vec<&WatchEvent> = evs
        .iter()
        .filter(|e| e.path == FRONT || e.path == "backend/vbd3")
        .collect();
    assert_eq!(folded.len(), 2, "{folded:?}");
    let plain = evs.len() - 2;
    for (i, e) in evs.iter().take(plain).enumerate() {
        let want = if i.is_multiple_of(10) {
            format!("backend/vbd3/9/{i}")
        } else {
            format!("{FRONT}/{i}")
        };
        assert_eq!(e.path, want);
    }
    assert!(c.take_watch_events().unwrap().is_empty());

    // Idle client: batches of bounded size, every event delivered in order.
    assert_eq!(c.read(Tx::NONE, "y").unwrap().as_deref(), Some(&b"go"[..]));
    let mut got: Vec<WatchEvent> = c.take_watch_events().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut batches = 0;
    while got.len() < N {
        assert!(Instant::now() < deadline, "{} of {N} events", got.len());
        let evs = c.take_watch_events().unwrap();
        assert!(
            bytes(&evs) <= MAX_QUEUED_EVENT_BYTES + 8192,
            "batch too big"
        );
        if evs.is_empty() {
            thread::sleep(Duration::from_millis(1));
        } else {
            batches += 1;
        }
        got.extend(evs);
    }
    assert_eq!(got.len(), N);
    assert!(batches > 1, "one unbounded batch");
    for (k, e) in got.iter().enumerate() {
        let i = N + k;
        let want = if i.is_multiple_of(10) {
            format!("backend/vbd3/9/{i}")
        } else {
            format!("{FRONT}/{i}")
        };
        assert_eq!(e.path, want);
    }
    drop(server.join().unwrap());
}

#[test]
fn events_received_during_a_request_are_reported_pending_though_the_socket_is_empty() {
    // tapback sleeps in poll() on the xenstore socket: an event the client already took off
    // the socket (queued while waiting for a reply, or read together with it) must be
    // reported, or a frontend's state change waits for unrelated traffic.
    let (a, mut b) = UnixStream::pair().unwrap();
    let server = thread::spawn(move || {
        let mut buf = Vec::new();
        let m = next_request(&mut b, &mut buf);
        let reply = Message::new(MsgType::Watch, m.req_id, 0, b"OK\0".to_vec());
        b.write_all(&reply.encode().unwrap()).unwrap();
        // An event before the reply (queued during the call)...
        let m = next_request(&mut b, &mut buf);
        let mut out = event(FRONT, "front");
        out.extend(
            Message::new(MsgType::Read, m.req_id, 0, b"1".to_vec())
                .encode()
                .unwrap(),
        );
        b.write_all(&out).unwrap();
        // ...and one sent with the reply, in the same write (read past the reply).
        let m = next_request(&mut b, &mut buf);
        let mut out = Message::new(MsgType::Read, m.req_id, 0, b"2".to_vec())
            .encode()
            .unwrap();
        out.extend(event(FRONT, "front"));
        b.write_all(&out).unwrap();
        b
    });
    let c = XsClient::from_fd(a.into());
    c.watch(FRONT, "front").unwrap();
    assert!(!c.has_pending_events());
    assert_eq!(c.read(Tx::NONE, "x").unwrap().as_deref(), Some(&b"1"[..]));
    assert!(c.has_pending_events(), "an event queued during the read");
    assert_eq!(c.take_watch_events().unwrap().len(), 1);
    assert!(!c.has_pending_events());
    assert_eq!(c.read(Tx::NONE, "y").unwrap().as_deref(), Some(&b"2"[..]));
    let _b = server.join().unwrap();
    // Whether the event arrived with the reply's bytes or after them, the client has it or
    // the socket does: sleeping on the socket is safe only when the client has none.
    let mut fds = [nix::poll::PollFd::new(
        std::os::fd::AsFd::as_fd(&c),
        nix::poll::PollFlags::POLLIN,
    )];
    let readable = nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO).unwrap() > 0;
    assert!(
        c.has_pending_events() || readable,
        "an event neither pending nor readable: a poll() would sleep on it"
    );
    assert_eq!(c.take_watch_events().unwrap().len(), 1);
    assert!(!c.has_pending_events());
}
