//! xs_wire codec (round trips, malformed input) and the real blocking client talking to the
//! in-memory store through a fake xenstored over a Unix socketpair.

use std::os::unix::net::UnixStream;
use std::thread;

use blktap3::xen::sim::{serve_wire, MemXenStore};
use blktap3::xen::xenstore::wire::{self, Message, MsgType, WireError};
use blktap3::xen::xenstore::{
    transaction, Access, Committed, Perm, Tx, XenStore, XsClient, XsError,
};
use blktap3::xen::DomId;
use nix::errno::Errno;
use proptest::prelude::*;

#[test]
fn header_layout_is_four_host_endian_u32() {
    let m = Message::new(MsgType::Write, 0x11, 0x22, b"a\0b".to_vec());
    let b = m.encode().unwrap();
    assert_eq!(b.len(), 19);
    assert_eq!(&b[0..4], &11u32.to_ne_bytes());
    assert_eq!(&b[4..8], &0x11u32.to_ne_bytes());
    assert_eq!(&b[8..12], &0x22u32.to_ne_bytes());
    assert_eq!(&b[12..16], &3u32.to_ne_bytes());
    let (d, used) = wire::decode(&b).unwrap().unwrap();
    assert_eq!((d, used), (m, 19));
}

#[test]
fn decode_needs_whole_messages_and_rejects_garbage() {
    let b = Message::new(MsgType::Read, 1, 0, b"/x\0".to_vec())
        .encode()
        .unwrap();
    for n in 0..b.len() {
        assert_eq!(wire::decode(&b[..n]).unwrap(), None, "prefix {n}");
    }
    let mut big = b.clone();
    big[12..16].copy_from_slice(&4097u32.to_ne_bytes());
    assert_eq!(wire::decode(&big), Err(WireError::TooLong(4097)));
    let mut bad = b.clone();
    bad[0..4].copy_from_slice(&20u32.to_ne_bytes());
    assert_eq!(wire::decode(&bad), Err(WireError::UnknownType(20)));
    assert!(Message::new(MsgType::Write, 1, 0, vec![0; 4097])
        .encode()
        .is_err());
    assert!(Message::new(MsgType::Write, 1, 0, vec![0; 4096])
        .encode()
        .is_ok());
}

#[test]
fn payload_helpers() {
    assert_eq!(wire::split_strings(b"a\0bc\0").unwrap(), vec!["a", "bc"]);
    assert_eq!(wire::split_strings(b"").unwrap(), Vec::<&str>::new());
    assert_eq!(wire::split_strings(b"a\0b").unwrap(), vec!["a", "b"]);
    assert_eq!(wire::split_strings(b"\xff\0"), Err(WireError::NotUtf8));
    assert_eq!(wire::join_strings(&["x", "y"]), b"x\0y\0");
    assert_eq!(
        wire::split_write(b"/p\0v\0al").unwrap(),
        ("/p", &b"v\0al"[..])
    );
    assert_eq!(wire::split_write(b"/p"), Err(WireError::BadStrings));
    assert_eq!(wire::single_string(b"/p\0").unwrap(), "/p");
    assert_eq!(wire::single_string(b"/p\0q\0"), Err(WireError::BadStrings));
    assert_eq!(wire::parse_error(b"EAGAIN\0").unwrap(), Errno::EAGAIN);
    assert!(wire::parse_error(b"EWHAT\0").is_err());
    assert_eq!(wire::error_payload(Errno::ENOENT), b"ENOENT\0");
    assert_eq!(wire::errno_name(Errno::EXDEV), "EINVAL");
    assert_eq!(wire::parse_tx_id(b"17\0").unwrap(), 17);
    assert!(wire::parse_tx_id(b"-1\0").is_err());
    assert_eq!(
        Perm::parse("r5").unwrap(),
        Perm {
            dom: DomId(5),
            access: Access::Read
        }
    );
    assert_eq!(Perm::parse("b0").unwrap().to_wire(), "b0");
    for bad in ["", "x1", "r", "r-1", "r70000", "rr1"] {
        assert!(Perm::parse(bad).is_err(), "{bad:?}");
    }
}

/// What the fuzz target checks (also run here on random bytes).
fn check_stream(bytes: &[u8]) {
    let mut buf = bytes;
    while let Ok(Some((m, used))) = wire::decode(buf) {
        assert!(used >= wire::HEADER_SIZE && used <= buf.len());
        assert!(m.payload.len() <= wire::PAYLOAD_MAX);
        let re = m.encode().unwrap();
        assert_eq!(&re[..], &buf[..used]);
        let _ = wire::split_strings(&m.payload);
        let _ = wire::split_write(&m.payload);
        let _ = wire::parse_error(&m.payload);
        let _ = wire::parse_tx_id(&m.payload);
        buf = &buf[used..];
    }
}

proptest! {
    #[test]
    fn random_streams_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        check_stream(&bytes);
    }

    #[test]
    fn messages_round_trip(ty in 0u32..27, req in any::<u32>(), tx in any::<u32>(), payload in proptest::collection::vec(any::<u8>(), 0..200)) {
        if let Ok(t) = MsgType::try_from(ty) {
            let m = Message::new(t, req, tx, payload);
            let b = m.encode().unwrap();
            let (d, used) = wire::decode(&b).unwrap().unwrap();
            prop_assert_eq!(used, b.len());
            prop_assert_eq!(d, m);
        }
    }
}

fn client(store: &MemXenStore, dom: DomId) -> (XsClient, thread::JoinHandle<std::io::Result<()>>) {
    let (a, b) = UnixStream::pair().unwrap();
    let st = store.clone();
    let h = thread::spawn(move || serve_wire(&st, dom, b.into()));
    (XsClient::from_fd(a.into()), h)
}

#[test]
fn client_against_fake_xenstored() {
    let store = MemXenStore::new();
    let (xs, server) = client(&store, DomId(0));
    assert_eq!(xs.read(Tx::NONE, "/a").unwrap(), None);
    xs.write(Tx::NONE, "/a/b", b"hello").unwrap();
    assert_eq!(xs.read(Tx::NONE, "/a/b").unwrap().unwrap(), b"hello");
    assert_eq!(xs.read_string(Tx::NONE, "/a/b").unwrap().unwrap(), "hello");
    xs.mkdir(Tx::NONE, "/a/c").unwrap();
    let mut d = xs.directory(Tx::NONE, "/a").unwrap();
    d.sort();
    assert_eq!(d, vec!["b", "c"]);
    assert!(matches!(
        xs.directory(Tx::NONE, "/zz"),
        Err(XsError::Errno(Errno::ENOENT))
    ));
    let perms = [
        Perm {
            dom: DomId(0),
            access: Access::None,
        },
        Perm {
            dom: DomId(3),
            access: Access::Read,
        },
    ];
    xs.set_perms(Tx::NONE, "/a/b", &perms).unwrap();
    assert_eq!(xs.get_perms(Tx::NONE, "/a/b").unwrap(), perms);
    xs.rm(Tx::NONE, "/a").unwrap();
    assert_eq!(xs.read(Tx::NONE, "/a/b").unwrap(), None);
    // Values with NULs survive.
    xs.write(Tx::NONE, "/bin", b"\0x\0").unwrap();
    assert_eq!(xs.read(Tx::NONE, "/bin").unwrap().unwrap(), b"\0x\0");
    drop(xs);
    server.join().unwrap().unwrap();
}

#[test]
fn client_transactions_and_conflict_over_the_wire() {
    let store = MemXenStore::new();
    let (xs, _h) = client(&store, DomId(0));
    let other = store.connect(DomId(0)).unwrap();
    xs.write(Tx::NONE, "/n", b"1").unwrap();
    let tx = xs.begin().unwrap();
    assert_ne!(tx, Tx::NONE);
    assert_eq!(xs.read(tx, "/n").unwrap().unwrap(), b"1");
    other.write(Tx::NONE, "/n", b"2").unwrap();
    xs.write(tx, "/n", b"3").unwrap();
    assert_eq!(xs.end(tx, true).unwrap(), Committed::Retry);
    assert_eq!(xs.read(Tx::NONE, "/n").unwrap().unwrap(), b"2");
    let mut tries = 0;
    transaction(&xs, |tx| {
        tries += 1;
        let v = xs.read(tx, "/n")?.unwrap();
        if tries == 1 {
            other.write(Tx::NONE, "/n", b"5")?;
        }
        let mut nv = v.clone();
        nv.push(b'!');
        xs.write(tx, "/n", &nv)
    })
    .unwrap();
    assert_eq!(tries, 2);
    assert_eq!(xs.read(Tx::NONE, "/n").unwrap().unwrap(), b"5!");
    assert!(matches!(
        xs.end(Tx(999), true),
        Err(XsError::Errno(Errno::ENOENT))
    ));
}

#[test]
fn watch_events_interleaved_with_replies_are_queued_not_lost() {
    let store = MemXenStore::new();
    let (xs, _h) = client(&store, DomId(0));
    let other = store.connect(DomId(0)).unwrap();
    xs.watch("/dev", "t1").unwrap();
    // Our own writes trigger events that the server sends before each reply.
    for i in 0..20 {
        xs.write(Tx::NONE, &format!("/dev/{i}"), b"x").unwrap();
    }
    // Another connection's writes arrive asynchronously.
    other.write(Tx::NONE, "/dev/other", b"y").unwrap();
    let mut all = Vec::new();
    for _ in 0..100 {
        all.extend(xs.take_watch_events().unwrap());
        if all.iter().any(|e| e.path == "/dev/other") {
            break;
        }
        thread::sleep(std::time::Duration::from_millis(5));
    }
    assert_eq!(all[0].path, "/dev", "registration event first");
    for i in 0..20 {
        assert!(
            all.iter()
                .any(|e| e.path == format!("/dev/{i}") && e.token == "t1"),
            "event {i} lost"
        );
    }
    assert!(all.iter().any(|e| e.path == "/dev/other"));
    xs.unwatch("/dev", "t1").unwrap();
    assert!(matches!(
        xs.unwatch("/dev", "t1"),
        Err(XsError::Errno(Errno::ENOENT))
    ));
}

#[test]
fn client_as_unprivileged_domain_sees_eacces() {
    let store = MemXenStore::new();
    let dom0 = store.connect(DomId(0)).unwrap();
    dom0.write(Tx::NONE, "/secret", b"s").unwrap();
    let (xs, _h) = client(&store, DomId(7));
    assert!(matches!(
        xs.read(Tx::NONE, "/secret"),
        Err(XsError::Errno(Errno::EACCES))
    ));
    assert_eq!(XsError::Errno(Errno::EACCES).errno(), Errno::EACCES);
}

#[test]
fn client_reports_a_dead_server() {
    let (a, b) = UnixStream::pair().unwrap();
    drop(b);
    let xs = XsClient::from_fd(a.into());
    assert!(matches!(xs.read(Tx::NONE, "/x"), Err(XsError::Io(_))));
}

#[test]
fn client_rejects_a_server_speaking_garbage() {
    use std::io::{Read, Write};
    let (a, mut b) = UnixStream::pair().unwrap();
    let h = thread::spawn(move || {
        let mut hdr = [0u8; 16];
        b.read_exact(&mut hdr).unwrap();
        let mut reply = hdr;
        reply[12..16].copy_from_slice(&100_000u32.to_ne_bytes());
        b.write_all(&reply).unwrap();
        b
    });
    let xs = XsClient::from_fd(a.into());
    // Our request payload is "/x\0" but the reply claims 100000 bytes: a protocol error.
    let e = xs.read(Tx::NONE, "/x").unwrap_err();
    assert!(
        matches!(e, XsError::Protocol(WireError::TooLong(100_000))),
        "{e:?}"
    );
    drop(h.join());
}
