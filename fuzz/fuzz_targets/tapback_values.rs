//! tapback's handling of xenstore values a frontend (a guest) writes.
//!
//! Part 1: the value parsers (`parse_uint`, `parse_protocol`, `negotiate_ring_order`,
//! `XenbusState::parse`, `parse_physical_device`, `valid_name`) on arbitrary strings, with
//! their contracts: only plain decimal is a number, the ring order never exceeds the limit,
//! a state value formats back to what parses.
//!
//! Part 2: the whole backend state machine (`tapback::Backend` over the in-memory xenstore
//! and fake tapdisks of tests/common/tapback.rs) with a frontend writing arbitrary values for
//! the keys blkback reads (ring-ref*, ring-page-order, event-channel, protocol,
//! feature-persistent, device-type, state...) in an arbitrary order. Nothing may panic; a
//! Connected backend handed the tapdisk exactly what the frontend published.
#![no_main]

#[allow(dead_code)]
#[path = "../../tests/common/tapback.rs"]
mod rig;

use blktap3::blkif::xenbus::{negotiate_ring_order, parse_protocol, parse_uint};
use blktap3::blkif::XenbusState;
use blktap3::tapback::locate::parse_physical_device;
use blktap3::tapback::MAX_RING_ORDER;
use libfuzzer_sys::fuzz_target;
use rig::{pump, Call, Rig};

const KEYS: [&str; 12] = [
    "state",
    "ring-ref",
    "ring-ref0",
    "ring-ref1",
    "ring-ref2",
    "ring-ref3",
    "ring-page-order",
    "event-channel",
    "protocol",
    "feature-persistent",
    "device-type",
    "multi-queue-num-queues",
];

fn parsers(s: &str) {
    if let Ok(v) = parse_uint::<u32>(s) {
        let t = s.trim_end_matches('\0').trim();
        assert!(t.bytes().all(|b| b.is_ascii_digit()));
        assert_eq!(t.parse::<u32>().ok(), Some(v));
    }
    let _ = parse_uint::<u64>(s);
    let _ = parse_protocol(Some(s));
    for max in [0, 1, MAX_RING_ORDER, u32::MAX] {
        if let Ok(o) = negotiate_ring_order(Some(s), max) {
            assert!(o <= max && o <= MAX_RING_ORDER);
        }
    }
    if let Ok(st) = XenbusState::parse(s) {
        assert_eq!(XenbusState::parse(st.as_str()), Ok(st));
    }
    if let Ok(Some((ma, mi))) = parse_physical_device(s) {
        assert_eq!(
            parse_physical_device(&format!("{ma:x}:{mi:x}")),
            Ok(Some((ma, mi)))
        );
    }
    let _ = blktap3::tapback::backend::valid_name(s);
}

fuzz_target!(|data: &[u8]| {
    // Part 1 on the whole input as text.
    parsers(&String::from_utf8_lossy(data));

    // Part 2: records of [key index, len, value bytes...].
    let rig = Rig::new();
    rig.tap.add_vbd(4242, 3, "vhd:/images/a.vhd", 2048);
    let v = rig.add_vbd(5, 51712, 4242, 3);
    let mut b = rig.started();
    let mut rest = data;
    let mut steps = 0;
    while rest.len() >= 2 && steps < 32 {
        let key = KEYS[usize::from(rest[0]) % KEYS.len()];
        let len = usize::from(rest[1]).min(rest.len() - 2);
        let val = String::from_utf8_lossy(&rest[2..2 + len]).into_owned();
        rest = &rest[2 + len..];
        steps += 1;
        rig.fe_write(&v, &[(key, &val)]);
        pump(&mut b);
        b.tick(std::time::Instant::now());
        // The backend's own state is always a valid XenbusState.
        if let Some(s) = rig.bstate(&v) {
            XenbusState::parse(&s).expect("backend wrote a valid state");
        }
    }
    if rig.bstate(&v).as_deref() == Some("4") {
        // Connected: the tapdisk got the ring the frontend published.
        let c = rig.tap.connects();
        let Some(Call::Connect { blkif, errno, .. }) = c.last() else {
            panic!("Connected without a connect call: {c:?}");
        };
        assert!(*errno == 0 || *errno == libc::EALREADY, "errno {errno}");
        // The ring tapdisk serves is the one tapback connected last (a stale ring kept
        // through EALREADY while the frontend published a new one was a bug this target
        // found: a frontend going Closing and straight back to Initialised).
        let (_, _, held) = rig.tap.ring(5, 51712).expect("Connected without a ring");
        assert_eq!(&held, blkif, "tapdisk serves a stale ring");
        assert_ne!(blkif.port, 0);
        assert!(blkif.order <= MAX_RING_ORDER);
        assert_eq!(blkif.ring_refs().len(), 1usize << blkif.order);
    }
});
