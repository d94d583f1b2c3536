//! tapback's state machine over the in-memory xenstore with fake tapdisks.

mod common;

use std::time::{Duration, Instant};

use proptest::prelude::*;

use blktap3::blkif::XenbusState;
use blktap3::control::msg::BlkifProto;
use blktap3::tapback::{BackendConfig, DEFAULT_MAX_QUEUES, MAX_RING_ORDER};
use blktap3::xen::xenstore::{Access, Perm, Tx, XenStore};
use blktap3::xen::DomId;
use common::tapback::*;

const PID: i32 = 4242;

fn native_proto() -> BlkifProto {
    if cfg!(target_arch = "x86") {
        BlkifProto::X86_32
    } else {
        BlkifProto::X86_64
    }
}

/// A rig with one device (domain 5, devid 51712) on tapdisk PID minor 3, backend started.
fn one() -> (Rig, Vbd, TestBackend) {
    let rig = Rig::new();
    rig.tap.add_vbd(PID, 3, "vhd:/images/a.vhd", 2048);
    let v = rig.add_vbd(5, 51712, PID, 3);
    let b = rig.started();
    (rig, v, b)
}

/// `one()` with the frontend connected (ring ref 100, port 7).
fn connected_one() -> (Rig, Vbd, TestBackend) {
    let (rig, v, mut b) = one();
    connected(&rig, &v, &mut b, 100, 7);
    (rig, v, b)
}

fn connected(rig: &Rig, v: &Vbd, b: &mut TestBackend, gref: u32, port: u32) {
    rig.fe_publish(v, gref, port);
    pump(b);
    assert_eq!(rig.bstate(v).as_deref(), Some("4"), "{:?}", status(b, v));
}

/// The frontend moves to state `fe`; after a pump the backend's state is `want`.
fn fe_step(rig: &Rig, v: &Vbd, b: &mut TestBackend, fe: u32, want: &str) {
    rig.fe_state(v, fe);
    pump(b);
    assert_eq!(rig.bstate(v).as_deref(), Some(want), "{:?}", status(b, v));
}

/// Starts a backend and connects `v` (domain 5, device 1) to it; the (pid, minor) of the
/// tapdisk that got the ring.
fn ring_owner(rig: &Rig, v: &Vbd) -> Option<(i32, u16)> {
    let mut b = rig.started();
    connected(rig, v, &mut b, 1, 2);
    rig.tap.ring(5, 1).map(|r| (r.0, r.1))
}

#[test]
fn advertises_order_and_goes_initwait_without_hotplug_status() {
    let (rig, v, b) = one();
    // Like Linux blkback (XENBUS_MAX_RING_GRANT_ORDER): 16 pages.
    assert_eq!(MAX_RING_ORDER, 4);
    assert_eq!(rig.read(&v.b("max-ring-page-order")).as_deref(), Some("4"));
    assert_eq!(
        rig.dom0
            .get_perms(Tx::NONE, &v.b("max-ring-page-order"))
            .unwrap(),
        vec![
            Perm {
                dom: DomId(0),
                access: Access::None
            },
            Perm {
                dom: DomId(5),
                access: Access::Read
            }
        ]
    );
    assert!(rig.read(&v.b("hotplug-status")).is_none());
    assert_eq!(rig.bstate(&v).as_deref(), Some("2"));
    assert_eq!(status(&b, &v).state, XenbusState::InitWait);
    assert!(rig.tap.connects().is_empty());
    // The frontend can read what we advertised.
    let fe = rig.fe_conn(&v);
    assert_eq!(
        fe.read(Tx::NONE, &v.b("max-ring-page-order")).unwrap(),
        Some(b"4".to_vec())
    );
}

#[test]
fn connect_writes_features_in_one_transaction() {
    let (rig, v, mut b) = one();
    let before = rig.ops().len();
    connected(&rig, &v, &mut b, 77, 9);

    // The tapdisk got the ring.
    let c = rig.tap.connects();
    assert_eq!(c.len(), 1);
    let Call::Connect {
        pid,
        minor,
        blkif,
        errno,
    } = &c[0]
    else {
        unreachable!()
    };
    assert_eq!((*pid, *minor, *errno), (PID, 3, 0));
    assert_eq!((blkif.domid, blkif.devid), (5, 51712));
    assert_eq!(blkif.order, 0);
    assert_eq!(blkif.ring_refs(), &[77]);
    assert_eq!(blkif.port, 9);
    assert_eq!(blkif.proto, BlkifProto::X86_64);
    assert_eq!(blkif.pool, "");

    let expect = [
        ("sectors", "2048"),
        ("sector-size", "512"),
        ("physical-sector-size", "512"),
        ("info", "0"),
        ("feature-barrier", "1"),
        ("feature-flush-cache", "1"),
        ("feature-discard", "1"),
        ("discard-granularity", "4096"),
        ("discard-alignment", "0"),
        ("discard-secure", "0"),
        ("feature-max-indirect-segments", "256"),
        ("kthread-pid", "4242"),
    ];
    let fe = rig.fe_conn(&v);
    for (k, val) in expect {
        assert_eq!(rig.read(&v.b(k)).as_deref(), Some(val), "{k}");
        // Frontend-readable, owned by dom0.
        let perms = rig.dom0.get_perms(Tx::NONE, &v.b(k)).unwrap();
        assert_eq!(perms[0].dom, DomId(0), "{k}");
        assert!(
            perms.contains(&Perm {
                dom: DomId(5),
                access: Access::Read
            }),
            "{k}: {perms:?}"
        );
        assert_eq!(
            fe.read(Tx::NONE, &v.b(k)).unwrap().as_deref(),
            Some(val.as_bytes())
        );
    }

    // All feature keys were written inside one committed transaction, before the state.
    let ops: Vec<Op> = rig.ops()[before..].to_vec();
    let feature_tx: Vec<u32> = ops
        .iter()
        .filter(|o| {
            o.op == "write"
                && expect
                    .iter()
                    .any(|(k, _)| o.path == format!("backend/vbd3/5/51712/{k}"))
        })
        .map(|o| o.tx)
        .collect();
    assert_eq!(feature_tx.len(), expect.len());
    assert!(feature_tx[0] != 0 && feature_tx.iter().all(|t| *t == feature_tx[0]));
    let commit = ops
        .iter()
        .position(|o| o.op == "commit" && o.tx == feature_tx[0])
        .expect("committed");
    let state = ops
        .iter()
        .rposition(|o| o.op == "write" && o.path == "backend/vbd3/5/51712/state")
        .unwrap();
    assert!(commit < state);
    assert_eq!(
        status(&b, &v).ring.map(|r| (r.pid, r.minor)),
        Some((PID, 3))
    );

    // Re-evaluations (frontend goes Connected, more events) change nothing.
    rig.fe_state(&v, 4);
    let n = rig.ops().len();
    pump(&mut b);
    assert_eq!(rig.ops().len(), n, "idempotent: no writes");
    assert_eq!(rig.tap.connects().len(), 1);
}

#[test]
fn missing_protocol_means_native() {
    let (rig, v, mut b) = one();
    rig.fe_write(
        &v,
        &[("ring-ref", "8"), ("event-channel", "3"), ("state", "3")],
    );
    pump(&mut b);
    assert_eq!(rig.bstate(&v).as_deref(), Some("4"));
    let (_, _, blkif) = rig.tap.ring(5, 51712).unwrap();
    assert_eq!(blkif.proto, native_proto());
}

#[test]
fn x86_32_protocol_and_multi_page_ring() {
    let (rig, v, mut b) = one();
    rig.fe_write(
        &v,
        &[
            ("ring-page-order", "3"),
            ("ring-ref0", "10"),
            ("ring-ref1", "11"),
            ("ring-ref2", "12"),
            ("ring-ref3", "13"),
            ("ring-ref4", "14"),
            ("ring-ref5", "15"),
            ("ring-ref6", "16"),
            ("ring-ref7", "17"),
            ("event-channel", "4"),
            ("protocol", "x86_32-abi"),
            ("state", "3"),
        ],
    );
    pump(&mut b);
    assert_eq!(rig.bstate(&v).as_deref(), Some("4"));
    let (_, _, blkif) = rig.tap.ring(5, 51712).unwrap();
    assert_eq!(blkif.order, 3);
    assert_eq!(blkif.ring_refs(), &[10, 11, 12, 13, 14, 15, 16, 17]);
    assert_eq!(blkif.proto, BlkifProto::X86_32);
}

fn order4_keys(first: u32) -> Vec<(String, String)> {
    let mut kv = vec![("ring-page-order".to_owned(), "4".to_owned())];
    for i in 0..16u32 {
        kv.push((format!("ring-ref{i}"), (first + i).to_string()));
    }
    kv
}

fn fe_write_owned(rig: &Rig, v: &Vbd, kv: &[(String, String)]) {
    let kvr: Vec<(&str, &str)> = kv.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
    rig.fe_write(v, &kvr);
}

#[test]
fn order_4_ring_connects_with_sixteen_refs() {
    let (rig, v, mut b) = one();
    let mut kv = order4_keys(300);
    kv.push(("event-channel".to_owned(), "12".to_owned()));
    kv.push(("protocol".to_owned(), "x86_64-abi".to_owned()));
    kv.push(("state".to_owned(), "3".to_owned()));
    fe_write_owned(&rig, &v, &kv);
    pump(&mut b);
    assert_eq!(rig.bstate(&v).as_deref(), Some("4"), "{:?}", status(&b, &v));
    let (_, _, blkif) = rig.tap.ring(5, 51712).unwrap();
    assert_eq!(blkif.order, 4);
    let want: Vec<u32> = (300..316).collect();
    assert_eq!(blkif.ring_refs(), &want[..]);
    assert_eq!(blkif.gref[..], want[..]);
    assert_eq!(blkif.port, 12);
    assert_eq!(blkif.proto, BlkifProto::X86_64);
}

#[test]
fn order_4_ring_with_a_missing_high_ref_fails_the_device() {
    let (rig, v, mut b) = one();
    let mut kv = order4_keys(1);
    kv.retain(|(k, _)| k != "ring-ref15");
    kv.push(("event-channel".to_owned(), "4".to_owned()));
    kv.push(("state".to_owned(), "3".to_owned()));
    fe_write_owned(&rig, &v, &kv);
    pump(&mut b);
    let st = status(&b, &v);
    assert!(
        st.failed.as_deref().unwrap().contains("ring-ref15"),
        "{st:?}"
    );
    assert_eq!(rig.bstate(&v).as_deref(), Some("5"));
    assert!(rig.tap.connects().is_empty());
}

#[test]
fn order_out_of_range_fails_the_device_then_recovers_after_reset() {
    let (rig, v, mut b) = one();
    rig.fe_write(
        &v,
        &[
            ("ring-page-order", "5"),
            ("ring-ref0", "1"),
            ("event-channel", "4"),
            ("state", "3"),
        ],
    );
    pump(&mut b);
    let st = status(&b, &v);
    assert!(
        st.failed.as_deref().unwrap().contains("ring-page-order"),
        "{st:?}"
    );
    assert_eq!(
        rig.bstate(&v).as_deref(),
        Some("5"),
        "xenbus_dev_fatal style Closing"
    );
    let err = rig
        .read("/local/domain/0/error/backend/vbd3/5/51712/error")
        .unwrap();
    assert!(err.starts_with("22 "), "{err}");
    assert!(rig.tap.connects().is_empty());
    assert!(st.retry_at.is_none(), "a fatal error is not retried");

    // Still failed on further triggers.
    rig.wb(&v, "hotplug-status", "connected");
    pump(&mut b);
    assert!(rig.tap.connects().is_empty());

    // The frontend closes and starts over with good values.
    rig.fe_state(&v, 5);
    pump(&mut b);
    fe_step(&rig, &v, &mut b, 6, "6");
    rig.fe_write(&v, &[("ring-page-order", "0"), ("state", "1")]);
    pump(&mut b);
    assert_eq!(rig.bstate(&v).as_deref(), Some("2"));
    assert!(status(&b, &v).failed.is_none());
    assert!(rig
        .read("/local/domain/0/error/backend/vbd3/5/51712/error")
        .is_none());
    connected(&rig, &v, &mut b, 5, 6);
}

#[test]
fn hostile_frontend_values_connect_nothing() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("ring-ref", "abc"), ("event-channel", "3")], "ring-ref"),
        (&[("ring-ref", "-1"), ("event-channel", "3")], "ring-ref"),
        (
            &[("ring-ref", "4294967296"), ("event-channel", "3")],
            "ring-ref",
        ),
        (&[("ring-ref", ""), ("event-channel", "3")], "ring-ref"),
        (&[("event-channel", "3")], "ring-ref"),
        (
            &[
                ("ring-page-order", "99999999999999999999"),
                ("ring-ref", "1"),
                ("event-channel", "3"),
            ],
            "ring-page-order",
        ),
        (
            &[
                ("ring-page-order", "0x1"),
                ("ring-ref", "1"),
                ("event-channel", "3"),
            ],
            "ring-page-order",
        ),
        (
            &[
                ("ring-page-order", "2"),
                ("ring-ref0", "1"),
                ("ring-ref1", "2"),
                ("ring-ref2", "3"),
                ("event-channel", "3"),
            ],
            "ring-ref3",
        ),
        (
            &[("ring-ref", "1"), ("event-channel", "x")],
            "event-channel",
        ),
        (&[("ring-ref", "1")], "event-channel"),
        (
            &[("ring-ref", "1"), ("event-channel", "0")],
            "event-channel",
        ),
        (
            &[
                ("ring-ref", "1"),
                ("event-channel", "2"),
                ("protocol", "arm-abi"),
            ],
            "protocol",
        ),
        (
            &[
                ("ring-ref", "1"),
                ("event-channel", "2"),
                ("feature-persistent", "2"),
            ],
            "feature-persistent",
        ),
        (
            &[
                ("ring-ref", "1"),
                ("event-channel", "2"),
                ("feature-persistent", "yes"),
            ],
            "feature-persistent",
        ),
    ];
    for (kv, key) in cases {
        let (rig, v, mut b) = one();
        let mut kv = kv.to_vec();
        kv.push(("state", "3"));
        rig.fe_write(&v, &kv);
        pump(&mut b);
        let st = status(&b, &v);
        let msg = st
            .failed
            .clone()
            .unwrap_or_else(|| panic!("{kv:?}: {st:?}"));
        assert!(msg.contains(key), "{kv:?}: {msg}");
        assert!(rig.tap.connects().is_empty(), "{kv:?}");
        assert_eq!(rig.bstate(&v).as_deref(), Some("5"), "{kv:?}");
        assert!(rig.tap.ring(5, 51712).is_none());
    }
}

#[test]
fn frontend_device_type_garbage_is_fatal_backend_mode_garbage_waits() {
    // Frontend device-type (used when the backend has none) garbage: fatal.
    let (rig, v, mut b) = one();
    rig.dom0.rm(Tx::NONE, &v.b("device-type")).unwrap();
    rig.fe_write(&v, &[("device-type", "floppy")]);
    rig.fe_publish(&v, 1, 2);
    pump(&mut b);
    assert!(status(&b, &v).failed.unwrap().contains("device-type"));
    assert!(rig.tap.connects().is_empty());

    // Bad backend mode: a toolstack problem, waits (retried) and connects once fixed.
    let (rig, v, mut b) = one();
    rig.wb(&v, "mode", "rw!");
    rig.fe_publish(&v, 1, 2);
    pump(&mut b);
    let st = status(&b, &v);
    assert!(st.failed.is_none());
    assert!(st.pending.unwrap().contains("mode"));
    assert!(st.retry_at.is_some());
    assert!(rig.tap.connects().is_empty());
    assert_eq!(rig.bstate(&v).as_deref(), Some("2"));
    rig.wb(&v, "mode", "r");
    pump(&mut b);
    assert_eq!(rig.bstate(&v).as_deref(), Some("4"));
    assert_eq!(rig.read(&v.b("info")).as_deref(), Some("4"));
    assert!(status(&b, &v).pending.is_none());
}

#[test]
fn info_bits_discard_and_sector_conversion() {
    let rig = Rig::new();
    rig.tap.add_vbd(PID, 1, "aio:/iso", 100);
    rig.tap.add_vbd(PID, 2, "aio:/big", 100);
    rig.tap.st().info.get_mut(&(PID, 2)).unwrap().sector_size = 4096;
    rig.tap.add_vbd(PID, 4, "aio:/nodiscard", 100);
    let cd = rig.add_vbd(5, 1, PID, 1);
    rig.wb(&cd, "device-type", "cdrom");
    rig.wb(&cd, "mode", "r");
    let big = rig.add_vbd(5, 2, PID, 2);
    let nd = rig.add_vbd(5, 4, PID, 4);
    rig.wb(&nd, "discard-enable", "0");
    let mut b = rig.backend(BackendConfig {
        barrier: false,
        ..BackendConfig::default()
    });
    pump(&mut b);
    for (i, v) in [&cd, &big, &nd].into_iter().enumerate() {
        connected(&rig, v, &mut b, 10 + i as u32, 20 + i as u32);
        assert_eq!(
            rig.read(&v.b("feature-barrier")).as_deref(),
            Some("0"),
            "-b"
        );
    }
    assert_eq!(rig.read(&cd.b("info")).as_deref(), Some("5"));
    assert_eq!(rig.read(&cd.b("feature-discard")).as_deref(), Some("0"));
    assert!(rig.read(&cd.b("discard-granularity")).is_none());
    assert_eq!(rig.read(&big.b("info")).as_deref(), Some("0"));
    assert_eq!(rig.read(&big.b("sectors")).as_deref(), Some("800"));
    assert_eq!(rig.read(&big.b("sector-size")).as_deref(), Some("4096"));
    assert_eq!(
        rig.read(&big.b("physical-sector-size")).as_deref(),
        Some("4096")
    );
    assert_eq!(rig.read(&big.b("feature-discard")).as_deref(), Some("1"));
    assert_eq!(rig.read(&nd.b("feature-discard")).as_deref(), Some("0"));
}

#[test]
fn bad_sector_size_from_tapdisk_is_retried_not_advertised() {
    let (rig, v, mut b) = one();
    rig.tap.st().info.get_mut(&(PID, 3)).unwrap().sector_size = 100;
    rig.fe_publish(&v, 1, 2);
    pump(&mut b);
    assert!(status(&b, &v).pending.unwrap().contains("sector size"));
    assert!(rig.read(&v.b("sectors")).is_none());
    assert_eq!(rig.bstate(&v).as_deref(), Some("2"));
    rig.tap.st().info.get_mut(&(PID, 3)).unwrap().sector_size = 512;
    let later = Instant::now() + Duration::from_secs(11);
    b.tick(later);
    assert_eq!(rig.bstate(&v).as_deref(), Some("4"));
    // The ring was connected once; the retry got EALREADY.
    let c = rig.tap.connects();
    assert_eq!(c.len(), 2);
    assert!(matches!(
        c[1],
        Call::Connect {
            errno: libc::EALREADY,
            ..
        }
    ));
}

#[test]
fn paused_tapdisk_connect_is_retried_with_backoff() {
    let (rig, v, mut b) = one();
    rig.tap
        .st()
        .connect_errors
        .extend([libc::EBUSY, libc::ETIMEDOUT]);
    let t0 = Instant::now();
    rig.fe_publish(&v, 1, 2);
    b.handle_events(t0).unwrap();
    let st = status(&b, &v);
    assert_eq!(rig.bstate(&v).as_deref(), Some("2"));
    assert!(st.failed.is_none());
    let due = st.retry_at.unwrap();
    assert_eq!(b.next_deadline(), Some(due));
    // Not yet due: nothing happens.
    b.tick(t0);
    assert_eq!(rig.tap.connects().len(), 1);
    b.tick(due);
    assert_eq!(rig.tap.connects().len(), 2);
    let due2 = status(&b, &v).retry_at.unwrap();
    assert!(
        due2 - due > due - t0 - Duration::from_millis(1),
        "back-off grows"
    );
    b.tick(due2);
    assert_eq!(rig.bstate(&v).as_deref(), Some("4"));
    assert_eq!(b.next_deadline(), None);
}

#[test]
fn tapdisk_refusing_the_ring_fails_the_device() {
    let (rig, v, mut b) = one();
    rig.tap.st().connect_errors.push_back(libc::EINVAL);
    rig.fe_publish(&v, 1, 2);
    pump(&mut b);
    assert!(status(&b, &v).failed.unwrap().contains("refused"));
    assert_eq!(rig.bstate(&v).as_deref(), Some("5"));
}

#[test]
fn guest_reboot_reconnects_with_new_ring() {
    let (rig, v, mut b) = connected_one();
    fe_step(&rig, &v, &mut b, 5, "5");
    assert!(
        rig.tap.disconnects().is_empty(),
        "disconnect waits for Closed"
    );
    fe_step(&rig, &v, &mut b, 6, "6");
    assert_eq!(
        rig.tap.disconnects(),
        vec![Call::Disconnect {
            pid: PID,
            domid: 5,
            devid: 51712,
            errno: 0
        }]
    );
    assert!(status(&b, &v).ring.is_none());
    // Reboot: Initialising → InitWait → Connected with the new refs.
    fe_step(&rig, &v, &mut b, 1, "2");
    connected(&rig, &v, &mut b, 200, 8);
    let (_, _, blkif) = rig.tap.ring(5, 51712).unwrap();
    assert_eq!(blkif.ring_refs(), &[200]);
    assert_eq!(blkif.port, 8);
    assert_eq!(rig.tap.connects().len(), 2);
}

#[test]
fn frontend_reset_without_closing_drops_the_stale_ring() {
    let (rig, v, mut b) = connected_one();
    fe_step(&rig, &v, &mut b, 1, "2");
    assert_eq!(rig.tap.disconnects().len(), 1);
    connected(&rig, &v, &mut b, 300, 9);
    assert_eq!(rig.tap.ring(5, 51712).unwrap().2.ring_refs(), &[300]);
}

#[test]
fn closed_with_dead_tapdisk_is_fine_and_transient_disconnect_retries() {
    let (rig, v, mut b) = one();
    connected(&rig, &v, &mut b, 1, 2);
    rig.tap.st().disconnect_errors.push_back(libc::ETIMEDOUT);
    rig.fe_state(&v, 6);
    pump(&mut b);
    assert_eq!(
        rig.bstate(&v).as_deref(),
        Some("4"),
        "not Closed before disconnect"
    );
    let due = status(&b, &v).retry_at.unwrap();
    rig.tap.st().dead.insert(PID);
    b.tick(due);
    assert_eq!(rig.bstate(&v).as_deref(), Some("6"));
    assert!(status(&b, &v).ring.is_none());
}

/// OpenXT's tapback: a vanished frontend closes the device but leaves the backend dir,
/// which libxl still reads (`tapdisk-params`) to destroy the tapdisk.
#[test]
fn frontend_vanishing_closes_the_backend_and_keeps_it() {
    let (rig, v, mut b) = one();
    connected(&rig, &v, &mut b, 1, 2);
    // The domain dies: xenstored drops its tree.
    rig.dom0.rm(Tx::NONE, "/local/domain/5").unwrap();
    pump(&mut b);
    assert_eq!(rig.tap.disconnects().len(), 1);
    assert!(rig.tap.ring(5, 51712).is_none());
    assert_eq!(rig.bstate(&v).as_deref(), Some("6"));
    assert!(
        rig.read(&v.b("physical-device-path")).is_some(),
        "backend dir kept"
    );
    assert!(status(&b, &v).ring.is_none());
    // The toolstack removes the device: tapback forgets it, nothing disconnected twice.
    rig.dom0.rm(Tx::NONE, &v.bpath).unwrap();
    pump(&mut b);
    assert!(b.device(v.id()).is_none());
    assert_eq!(rig.tap.disconnects().len(), 1);
}

#[test]
fn frontend_absent_at_creation_is_waited_for() {
    let rig = Rig::new();
    rig.tap.add_vbd(PID, 3, "vhd:/a", 10);
    let v = rig.add_vbd(5, 1, PID, 3);
    rig.dom0.rm(Tx::NONE, &v.fpath).unwrap();
    let mut b = rig.started();
    assert!(
        rig.read(&v.bpath).is_some(),
        "not removed: frontend never seen"
    );
    // The frontend appears later.
    let fe = rig.fe_conn(&v);
    // (The frontend dir is recreated by dom0 for the guest, as the toolstack would.)
    rig.dom0.write(Tx::NONE, &v.f("state"), b"1").unwrap();
    rig.dom0
        .set_perms(
            Tx::NONE,
            &v.fpath,
            &[Perm {
                dom: DomId(5),
                access: Access::None,
            }],
        )
        .unwrap();
    rig.dom0
        .set_perms(
            Tx::NONE,
            &v.f("state"),
            &[Perm {
                dom: DomId(5),
                access: Access::None,
            }],
        )
        .unwrap();
    drop(fe);
    pump(&mut b);
    assert_eq!(rig.bstate(&v).as_deref(), Some("2"));
}

#[test]
fn backend_removal_disconnects() {
    let (rig, v, mut b) = one();
    connected(&rig, &v, &mut b, 1, 2);
    rig.dom0.rm(Tx::NONE, &v.bpath).unwrap();
    pump(&mut b);
    assert!(b.device(v.id()).is_none());
    assert_eq!(rig.tap.disconnects().len(), 1);
    assert!(rig.read(&v.bpath).is_none(), "not recreated");
}

#[test]
fn backend_removal_with_dead_tapdisk() {
    let (rig, v, mut b) = one();
    connected(&rig, &v, &mut b, 1, 2);
    rig.tap.st().dead.insert(PID);
    rig.dom0
        .rm(Tx::NONE, "/local/domain/0/backend/vbd3/5")
        .unwrap();
    pump(&mut b);
    assert!(b.devices().is_empty());
    assert!(rig.read(&v.bpath).is_none());
}

#[test]
fn online_zero_blocks_connect_and_initwait() {
    let rig = Rig::new();
    rig.tap.add_vbd(PID, 3, "vhd:/a", 10);
    let v = rig.add_vbd(5, 1, PID, 3);
    rig.wb(&v, "online", "0");
    let mut b = rig.started();
    assert_eq!(rig.bstate(&v).as_deref(), Some("1"));
    rig.fe_publish(&v, 1, 2);
    pump(&mut b);
    assert!(rig.tap.connects().is_empty());
    rig.wb(&v, "online", "1");
    pump(&mut b);
    assert_eq!(rig.bstate(&v).as_deref(), Some("4"));
}

#[test]
fn tapdisk_located_later_and_in_any_order() {
    let rig = Rig::new();
    let v = rig.add_vbd_bare(5, 768);
    let mut b = rig.started();
    rig.fe_publish(&v, 1, 2);
    pump(&mut b);
    let st = status(&b, &v);
    assert_eq!(rig.bstate(&v).as_deref(), Some("2"));
    assert!(st.pending.unwrap().contains("no tapdisk"));
    // A stale/garbage physical-device-path, then the params of a real VBD.
    rig.wb(&v, "physical-device-path", "/run/blktap-control/nbd999.1");
    pump(&mut b);
    assert_eq!(rig.bstate(&v).as_deref(), Some("2"));
    rig.tap.add_vbd(77, 2, "vhd:/images/x.vhd", 64);
    rig.wb(&v, "tapdisk-params", "vhd:/images/x.vhd");
    pump(&mut b);
    assert_eq!(rig.bstate(&v).as_deref(), Some("4"));
    assert_eq!(rig.tap.ring(5, 768).map(|r| (r.0, r.1)), Some((77, 2)));
    assert_eq!(rig.read(&v.b("kthread-pid")).as_deref(), Some("77"));
}

#[test]
fn physical_device_path_wins_and_is_verified() {
    let rig = Rig::new();
    rig.tap.add_vbd(10, 1, "vhd:/a", 10);
    rig.tap.add_vbd(20, 2, "vhd:/a", 10);
    let v = rig.add_vbd(5, 1, 20, 2);
    rig.wb(&v, "tapdisk-params", "vhd:/a");
    assert_eq!(ring_owner(&rig, &v), Some((20, 2)));

    // physical-device-path naming a minor the tapdisk does not serve falls back.
    let rig = Rig::new();
    rig.tap.add_vbd(10, 1, "vhd:/a", 10);
    let v = rig.add_vbd(5, 1, 10, 9);
    rig.wb(&v, "tapdisk-params", "vhd:/a");
    assert_eq!(ring_owner(&rig, &v), Some((10, 1)));
}

#[test]
fn physical_device_nbd_major_resolves_through_the_host() {
    let rig = Rig::new();
    rig.tap.add_vbd(33, 4, "vhd:/a", 10);
    rig.tap
        .st()
        .nbd
        .insert((43, 0x20), "/run/blktap-control/nbd33.4".to_owned());
    let v = rig.add_vbd_bare(5, 1);
    rig.wb(&v, "physical-device", "2b:20");
    assert_eq!(ring_owner(&rig, &v), Some((33, 4)));
}

#[test]
fn restart_reconnects_idempotently() {
    let (rig, v, mut b) = connected_one();
    rig.fe_state(&v, 4);
    pump(&mut b);
    drop(b); // killed: nothing is torn down
    assert!(rig.tap.ring(5, 51712).is_some());
    // blkfront watches the backend state; a rewrite of Connected would make Linux
    // revalidate the disk's capacity.
    let fe = rig.fe_conn(&v);
    fe.watch(&v.b("state"), "blkfront").unwrap();
    assert_eq!(
        fe.take_watch_events().unwrap().len(),
        1,
        "the registration event"
    );

    let mut b2 = rig.started();
    let events = fe.take_watch_events().unwrap();
    assert!(events.is_empty(), "backend state rewritten: {events:?}");
    let st = status(&b2, &v);
    assert_eq!(st.state, XenbusState::Connected);
    assert_eq!(st.ring.as_ref().map(|r| r.pid), Some(PID));
    let c = rig.tap.connects();
    assert_eq!(c.len(), 2);
    assert!(matches!(
        c[1],
        Call::Connect {
            errno: libc::EALREADY,
            ..
        }
    ));
    assert!(rig.tap.disconnects().is_empty(), "a live ring is kept");
    assert_eq!(rig.tap.ring(5, 51712).unwrap().2.ring_refs(), &[100]);
    assert_eq!(rig.bstate(&v).as_deref(), Some("4"));

    // And the restarted instance still handles the teardown.
    rig.fe_state(&v, 5);
    pump(&mut b2);
    fe_step(&rig, &v, &mut b2, 6, "6");
    assert!(rig.tap.ring(5, 51712).is_none());
}

#[test]
fn restart_while_frontend_republished_replaces_the_stale_ring() {
    let (rig, v, b) = connected_one();
    drop(b);
    // While tapback was away the guest rebooted and published a new ring.
    rig.fe_state(&v, 6);
    rig.fe_state(&v, 1);
    rig.fe_publish(&v, 555, 12);
    let _b2 = rig.started();
    assert_eq!(rig.bstate(&v).as_deref(), Some("4"));
    assert_eq!(rig.tap.disconnects().len(), 1);
    let (_, _, blkif) = rig.tap.ring(5, 51712).unwrap();
    assert_eq!(blkif.ring_refs(), &[555]);
}

#[test]
fn restart_with_frontend_closed_drops_a_left_over_ring() {
    let (rig, v, b) = connected_one();
    drop(b);
    rig.fe_state(&v, 6);
    let _b2 = rig.started();
    assert_eq!(rig.bstate(&v).as_deref(), Some("6"));
    assert!(rig.tap.ring(5, 51712).is_none());
}

#[test]
fn many_devices_and_domains() {
    let rig = Rig::new();
    let mut vs = Vec::new();
    for (i, (dom, devid)) in [(5u16, 51712u32), (5, 51728), (6, 51712), (7, 768)]
        .into_iter()
        .enumerate()
    {
        let pid = 100 + i as i32;
        rig.tap
            .add_vbd(pid, i as u16, &format!("vhd:/d{i}"), 10 + i as u64);
        vs.push((rig.add_vbd(dom, devid, pid, i as u16), pid));
    }
    let mut b = rig.started();
    assert_eq!(b.devices().len(), 4);
    for (i, (v, _)) in vs.iter().enumerate() {
        rig.fe_publish(v, 1000 + i as u32, 50 + i as u32);
    }
    pump(&mut b);
    for (i, (v, pid)) in vs.iter().enumerate() {
        assert_eq!(rig.bstate(v).as_deref(), Some("4"));
        assert_eq!(rig.read(&v.b("sectors")), Some((10 + i).to_string()));
        let (p, _, blkif) = rig.tap.ring(u32::from(v.fe.0), v.devid).unwrap();
        assert_eq!(p, *pid);
        assert_eq!(blkif.ring_refs(), &[1000 + i as u32]);
    }
    // A new domain's device appears while running.
    rig.tap.add_vbd(200, 9, "vhd:/new", 99);
    let nv = rig.add_vbd(9, 1, 200, 9);
    pump(&mut b);
    assert_eq!(rig.bstate(&nv).as_deref(), Some("2"));
    // Removing one domain's directory touches only its devices.
    rig.dom0
        .rm(Tx::NONE, "/local/domain/0/backend/vbd3/5")
        .unwrap();
    pump(&mut b);
    assert_eq!(b.devices().len(), 3);
    assert_eq!(rig.tap.disconnects().len(), 2);
    assert!(rig.tap.ring(6, 51712).is_some());
    assert!(rig.tap.ring(7, 768).is_some());
}

#[test]
fn only_domid_serves_one_domain() {
    let rig = Rig::new();
    rig.tap.add_vbd(1, 1, "vhd:/a", 10);
    rig.tap.add_vbd(2, 2, "vhd:/b", 10);
    let a = rig.add_vbd(5, 1, 1, 1);
    let c = rig.add_vbd(6, 1, 2, 2);
    let mut b = rig.backend(BackendConfig {
        only_domid: Some(6),
        ..BackendConfig::default()
    });
    pump(&mut b);
    assert_eq!(b.devices(), vec![c.id()]);
    assert_eq!(rig.bstate(&a).as_deref(), Some("1"), "not ours");
    assert_eq!(rig.bstate(&c).as_deref(), Some("2"));
    rig.fe_publish(&a, 1, 2);
    rig.fe_publish(&c, 1, 2);
    pump(&mut b);
    assert_eq!(rig.bstate(&a).as_deref(), Some("1"));
    assert_eq!(rig.bstate(&c).as_deref(), Some("4"));
}

#[test]
fn own_domid_from_xenstore_and_other_name() {
    // A driver domain 3 serving backend/vbd9.
    let rig = Rig::new();
    rig.dom0
        .write(Tx::NONE, "/local/domain/3/domid", b"3")
        .unwrap();
    rig.tap.add_vbd(1, 1, "vhd:/a", 10);
    let (fpath, bpath) =
        blktap3::xen::sim::toolstack_add_vbd(&rig.dom0, "vbd9", DomId(3), DomId(5), 1, false)
            .unwrap();
    rig.dom0
        .write(
            Tx::NONE,
            &format!("{bpath}/physical-device-path"),
            b"/x/nbd1.1",
        )
        .unwrap();
    // The driver domain owns its tree (as xenstored sets it up), the guest may read it.
    chown_tree(
        &rig,
        "/local/domain/3",
        &[
            Perm {
                dom: DomId(3),
                access: Access::None,
            },
            Perm {
                dom: DomId(5),
                access: Access::Read,
            },
        ],
    );
    // Frontend readable by the driver domain.
    rig.dom0
        .set_perms(
            Tx::NONE,
            &format!("{fpath}/state"),
            &[
                Perm {
                    dom: DomId(5),
                    access: Access::None,
                },
                Perm {
                    dom: DomId(3),
                    access: Access::Read,
                },
            ],
        )
        .unwrap();
    let xs = Rec {
        inner: rig.store.connect(DomId(3)).unwrap(),
        log: std::sync::Arc::clone(&rig.log),
        before_commit: std::sync::Arc::default(),
        fail_dirs: std::sync::Arc::default(),
    };
    let mut b = blktap3::tapback::Backend::new(
        xs,
        rig.tap.clone(),
        BackendConfig {
            name: "vbd9".to_owned(),
            ..BackendConfig::default()
        },
        Instant::now(),
    )
    .unwrap();
    pump(&mut b);
    assert_eq!(b.self_dom(), DomId(3));
    assert_eq!(rig.read(&format!("{bpath}/state")).as_deref(), Some("2"));
    let perms = rig
        .dom0
        .get_perms(Tx::NONE, &format!("{bpath}/max-ring-page-order"))
        .unwrap();
    assert_eq!(perms[0].dom, DomId(3));
}

fn chown_tree(rig: &Rig, path: &str, perms: &[Perm]) {
    rig.dom0.set_perms(Tx::NONE, path, perms).unwrap();
    for c in rig.dom0.directory(Tx::NONE, path).unwrap() {
        chown_tree(rig, &format!("{path}/{c}"), perms);
    }
}

#[test]
fn reconfiguring_is_logged_and_ignored() {
    let (rig, v, mut b) = one();
    connected(&rig, &v, &mut b, 1, 2);
    fe_step(&rig, &v, &mut b, 7, "4");
    assert!(status(&b, &v).ring.is_some());
    fe_step(&rig, &v, &mut b, 42, "4");
}

#[test]
fn bad_names_are_refused() {
    let rig = Rig::new();
    for name in ["", "a/b", "..", "x y"] {
        let xs = rig.store.connect(BE).unwrap();
        let r = blktap3::tapback::Backend::new(
            xs,
            rig.tap.clone(),
            BackendConfig {
                name: name.to_owned(),
                ..BackendConfig::default()
            },
            Instant::now(),
        );
        assert!(r.is_err(), "{name:?}");
    }
}

#[test]
fn garbage_directory_entries_are_ignored() {
    let rig = Rig::new();
    rig.dom0
        .write(
            Tx::NONE,
            "/local/domain/0/backend/vbd3/notadom/1/state",
            b"1",
        )
        .unwrap();
    rig.dom0
        .write(Tx::NONE, "/local/domain/0/backend/vbd3/5/xvda/state", b"1")
        .unwrap();
    rig.dom0
        .write(Tx::NONE, "/local/domain/0/backend/vbd3/70000/1/state", b"1")
        .unwrap();
    let b = rig.started();
    assert!(b.devices().is_empty());
}

#[test]
fn vbd_without_an_open_image_is_waited_for() {
    let rig = Rig::new();
    rig.tap.add_vbd(PID, 3, "", 10);
    let v = rig.add_vbd(5, 1, PID, 3);
    let mut b = rig.started();
    rig.fe_publish(&v, 1, 2);
    pump(&mut b);
    assert!(status(&b, &v).pending.unwrap().contains("no image open"));
    assert!(rig.tap.connects().is_empty());
    // tap-ctl open happens; the retry timer picks it up.
    rig.tap.st().vbds.get_mut(&PID).unwrap()[0].params = "vhd:/a".to_owned();
    b.tick(Instant::now() + Duration::from_secs(11));
    assert_eq!(rig.bstate(&v).as_deref(), Some("4"));
}

#[test]
fn recreated_device_directory_is_advertised_again() {
    let (rig, v, mut b) = one();
    connected(&rig, &v, &mut b, 1, 2);
    // The toolstack drops the keys we wrote (as if the directory were re-created) and the
    // next trigger restores the advertisement.
    rig.dom0.rm(Tx::NONE, &v.b("max-ring-page-order")).unwrap();
    pump(&mut b);
    assert_eq!(rig.read(&v.b("max-ring-page-order")).as_deref(), Some("4"));
}

#[test]
fn feature_transaction_is_retried_on_conflict() {
    let (rig, v, mut b) = one();
    // Just before tapback commits its feature transaction, the toolstack touches the device.
    let other = rig.store.connect(BE).unwrap();
    let key = v.b("sectors");
    *rig.before_commit.lock().unwrap() = Some(Box::new(move || {
        other.write(Tx::NONE, &key, b"999").unwrap();
    }));
    connected(&rig, &v, &mut b, 1, 2);
    assert_eq!(rig.read(&v.b("sectors")).as_deref(), Some("2048"));
    let ops = rig.ops();
    let retry = ops
        .iter()
        .position(|o| o.op == "retry")
        .expect("a conflict");
    assert!(ops[retry..].iter().any(|o| o.op == "commit"));
    assert_eq!(rig.tap.connects().len(), 1, "the ring is connected once");
}

fn value() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        Just(None),
        "[0-9]{1,3}".prop_map(Some),
        "[0-9a-z_-]{0,12}".prop_map(Some),
        Just(Some("x86_64-abi".to_owned())),
        Just(Some("x86_32-abi".to_owned())),
        Just(Some("4294967296".to_owned())),
        Just(Some("0".to_owned())),
        Just(Some("1".to_owned())),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// Whatever the frontend writes, tapback never panics, and it connects exactly when the
    /// values are valid, with exactly those values.
    #[test]
    fn random_frontend_values(
        order in prop_oneof![value(), (0u32..=5).prop_map(|o| Some(o.to_string()))],
        refs in proptest::collection::vec(value(), 16),
        port in value(),
        proto in value(),
        persistent in value(),
    ) {
        let (rig, v, mut b) = one();
        let mut kv: Vec<(String, String)> = Vec::new();
        let mut put = |k: &str, val: &Option<String>| {
            if let Some(x) = val {
                kv.push((k.to_owned(), x.clone()));
            }
        };
        put("ring-page-order", &order);
        put("ring-ref", &refs[0]);
        for (i, r) in refs.iter().enumerate() {
            put(&format!("ring-ref{i}"), r);
        }
        put("event-channel", &port);
        put("protocol", &proto);
        put("feature-persistent", &persistent);
        kv.push(("state".to_owned(), "3".to_owned()));
        let kvr: Vec<(&str, &str)> = kv.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        rig.fe_write(&v, &kvr);
        pump(&mut b);

        let num = |x: &Option<String>| x.as_deref().and_then(|s| s.parse::<u32>().ok());
        let want_order = match &order { None => Some(0), Some(_) => num(&order).filter(|o| *o <= 4) };
        let want = want_order.and_then(|o| {
            let refs: Option<Vec<u32>> = if o == 0 {
                num(&refs[0]).map(|r| vec![r])
            } else {
                (0..1usize << o).map(|i| num(&refs[i])).collect()
            };
            let port = num(&port).filter(|p| *p != 0)?;
            let proto_ok = matches!(proto.as_deref(), None | Some("x86_64-abi") | Some("x86_32-abi") | Some(""));
            let pers_ok = matches!(persistent.as_deref(), None | Some("0") | Some("1"));
            (proto_ok && pers_ok).then_some((o, refs?, port))
        });
        let st = status(&b, &v);
        match want {
            Some((o, r, p)) => {
                prop_assert_eq!(rig.bstate(&v), Some("4".to_owned()), "{:?}", st);
                let (_, _, blkif) = rig.tap.ring(5, 51712).unwrap();
                prop_assert_eq!(blkif.order, o);
                prop_assert_eq!(blkif.ring_refs(), &r[..]);
                prop_assert_eq!(blkif.port, p);
            }
            None => {
                prop_assert!(st.failed.is_some(), "{:?}", st);
                prop_assert!(rig.tap.connects().is_empty());
                prop_assert_eq!(rig.bstate(&v), Some("5".to_owned()));
            }
        }
    }
}

#[test]
fn garbage_own_domid_is_a_clear_error() {
    let rig = Rig::new();
    rig.dom0
        .write(Tx::NONE, "/local/domain/0/domid", b"zero")
        .unwrap();
    let r = blktap3::tapback::Backend::new(
        rig.store.connect(BE).unwrap(),
        rig.tap.clone(),
        BackendConfig::default(),
        Instant::now(),
    );
    let e = r.err().unwrap();
    assert_eq!(e.errno(), libc::EINVAL);
    assert!(e.to_string().contains("domid"), "{e}");
}

/// A frontend with `n` queues: `multi-queue-num-queues` and `queue-<i>/ring-ref` +
/// `queue-<i>/event-channel` (refs 500+i, ports 20+i), as Linux blkfront writes them.
fn mq_keys(n: u32) -> Vec<(String, String)> {
    let mut kv = vec![("multi-queue-num-queues".to_owned(), n.to_string())];
    for q in 0..n {
        kv.push((format!("queue-{q}/ring-ref"), (500 + q).to_string()));
        kv.push((format!("queue-{q}/event-channel"), (20 + q).to_string()));
    }
    kv.push(("protocol".to_owned(), "x86_64-abi".to_owned()));
    kv.push(("state".to_owned(), "3".to_owned()));
    kv
}

#[test]
fn advertises_multi_queue_and_connects_every_queue() {
    let (rig, v, mut b) = one();
    assert_eq!(
        rig.read(&v.b("multi-queue-max-queues")).as_deref(),
        Some(DEFAULT_MAX_QUEUES.to_string().as_str())
    );
    fe_write_owned(&rig, &v, &mq_keys(3));
    pump(&mut b);
    assert_eq!(rig.bstate(&v).as_deref(), Some("4"), "{:?}", status(&b, &v));
    for q in 0..3 {
        let (pid, minor, blkif) = rig.tap.ring_q(5, 51712, q).unwrap();
        assert_eq!((pid, minor), (PID, 3));
        assert_eq!(blkif.queue, q);
        assert_eq!(blkif.ring_refs(), &[500 + q]);
        assert_eq!(blkif.port, 20 + q);
        assert_eq!(blkif.proto, BlkifProto::X86_64);
    }
    assert!(rig.tap.ring_q(5, 51712, 3).is_none());
    assert_eq!(status(&b, &v).ring.unwrap().queues, 3);
    // Closing disconnects the device (every queue) once.
    fe_step(&rig, &v, &mut b, 5, "5");
    fe_step(&rig, &v, &mut b, 6, "6");
    assert_eq!(rig.tap.disconnects().len(), 1);
    assert!(rig.tap.st().rings.is_empty());
}

#[test]
fn too_many_queues_fail_the_device() {
    let (rig, v, mut b) = one();
    fe_write_owned(&rig, &v, &mq_keys(DEFAULT_MAX_QUEUES + 1));
    pump(&mut b);
    let st = status(&b, &v);
    assert!(
        st.failed
            .as_deref()
            .unwrap()
            .contains("multi-queue-num-queues"),
        "{st:?}"
    );
    assert!(rig.tap.connects().is_empty());
}

#[test]
fn a_queue_tapdisk_refuses_disconnects_the_queues_before_it() {
    let (rig, v, mut b) = one();
    // Queue 0 is accepted (0: no error), queue 1 refused with EINVAL (fatal).
    rig.tap.st().connect_errors.extend([0, libc::EINVAL]);
    fe_write_owned(&rig, &v, &mq_keys(2));
    pump(&mut b);
    let st = status(&b, &v);
    assert!(st.failed.is_some(), "{st:?}");
    assert!(st.ring.is_none(), "{st:?}");
    let c = rig.tap.connects();
    assert_eq!(c.len(), 2, "{c:?}");
    // The device is not left half connected: one DISCONNECT (every queue) after queue 1.
    assert!(
        matches!(
            rig.tap.calls().last(),
            Some(Call::Disconnect {
                domid: 5,
                devid: 51712,
                ..
            })
        ),
        "{:?}",
        rig.tap.calls()
    );
}

#[test]
fn a_bad_queue_key_fails_the_device_before_any_connect() {
    let (rig, v, mut b) = one();
    let mut kv = mq_keys(2);
    for (k, val) in kv.iter_mut() {
        if k == "queue-1/event-channel" {
            *val = "0".to_owned();
        }
    }
    fe_write_owned(&rig, &v, &kv);
    pump(&mut b);
    let st = status(&b, &v);
    assert!(
        st.failed
            .as_deref()
            .unwrap()
            .contains("queue-1/event-channel"),
        "{st:?}"
    );
    assert!(rig.tap.connects().is_empty());
}

/// Found by the `tapback_values` fuzz target: a frontend that goes Closing and then straight
/// back to Initialised (without Closed or Initialising) with a new ring must get the new ring
/// served. Before the fix tapback called XENBLKIF_CONNECT while tapdisk still held the old
/// ring, took its EALREADY as success and went Connected on the stale ring. Now a ring that
/// differs from the one connected before is disconnected first (blkback always disconnects
/// before `connect_ring`).
#[test]
fn closing_then_initialised_with_a_new_ring_replaces_the_old_ring() {
    let (rig, v, mut b) = connected_one();
    fe_step(&rig, &v, &mut b, 5, "5");
    rig.fe_write(
        &v,
        &[("ring-ref", "200"), ("event-channel", "9"), ("state", "3")],
    );
    pump(&mut b);
    assert_eq!(rig.bstate(&v).as_deref(), Some("4"), "{:?}", status(&b, &v));
    let (_, _, ring) = rig.tap.ring(5, 51712).expect("tapdisk holds a ring");
    assert_eq!(ring.ring_refs(), &[200], "tapdisk must serve the new ring");
    assert_eq!(ring.port, 9);
    assert_eq!(rig.tap.disconnects().len(), 1, "{:?}", rig.tap.calls());
}

#[test]
fn a_failed_scan_is_retried() {
    // The start-up scan (a whole-root scan, like a folded flood of events) fails: the
    // devices it would have found must come up on a retry, without any new event.
    let rig = Rig::new();
    rig.tap.add_vbd(PID, 3, "vhd:/images/a.vhd", 2048);
    let v = rig.add_vbd(5, 51712, PID, 3);
    rig.fail_dirs
        .store(1000, std::sync::atomic::Ordering::SeqCst);
    let mut b = rig.started();
    assert!(b.devices().is_empty(), "the scan failed: {:?}", b.devices());
    let again = b.next_deadline().expect("a failed scan schedules another");
    rig.fail_dirs.store(0, std::sync::atomic::Ordering::SeqCst);
    b.tick(again);
    pump(&mut b);
    assert_eq!(b.devices(), vec![v.id()]);
    assert_eq!(rig.bstate(&v).as_deref(), Some("2"), "{:?}", status(&b, &v));
    assert!(
        b.next_deadline().is_none_or(|t| t > again),
        "no rescan left pending"
    );
}
