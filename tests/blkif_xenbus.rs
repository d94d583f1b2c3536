//! Xenbus helpers: states, protocol strings, ring-page-order negotiation, value parsing.

use blktap3::blkif::xenbus::*;
use blktap3::blkif::Abi;

#[test]
fn states_round_trip() {
    for v in 0..=8u32 {
        let s = XenbusState::from_u32(v).unwrap();
        assert_eq!(s as u32, v);
        assert_eq!(XenbusState::parse(s.as_str()).unwrap(), s);
    }
    assert_eq!(XenbusState::from_u32(9), None);
    assert_eq!(XenbusState::parse("4\0").unwrap(), XenbusState::Connected);
    assert_eq!(XenbusState::parse(" 6 ").unwrap(), XenbusState::Closed);
    for bad in ["", "9", "-1", "0x4", "four", "4a"] {
        assert!(XenbusState::parse(bad).is_err(), "{bad:?}");
    }
    assert!(XenbusState::InitWait < XenbusState::Connected);
}

#[test]
fn protocol_strings() {
    assert_eq!(parse_protocol(None).unwrap(), Abi::NATIVE);
    assert_eq!(parse_protocol(Some("")).unwrap(), Abi::NATIVE);
    assert_eq!(parse_protocol(Some("x86_32-abi")).unwrap(), Abi::X86_32);
    assert_eq!(parse_protocol(Some("x86_64-abi\0")).unwrap(), Abi::X86_64);
    assert_eq!(
        parse_protocol(Some("arm-abi")),
        Err(XenbusError::UnknownProtocol("arm-abi".into()))
    );
    assert!(parse_protocol(Some("x86_64")).is_err());
}

#[test]
fn ring_order_negotiation() {
    assert_eq!(negotiate_ring_order(None, 3).unwrap(), 0);
    assert_eq!(negotiate_ring_order(Some("3"), 3).unwrap(), 3);
    assert_eq!(
        negotiate_ring_order(Some("4"), 3),
        Err(XenbusError::OrderTooLarge { order: 4, max: 3 })
    );
    // The backend maximum is clamped to what the crate supports (4).
    assert_eq!(
        negotiate_ring_order(Some("5"), 9),
        Err(XenbusError::OrderTooLarge { order: 5, max: 4 })
    );
    assert!(negotiate_ring_order(Some("x"), 3).is_err());
    assert!(negotiate_ring_order(Some("4294967296"), 3).is_err());
    assert_eq!(frontend_ring_order(None, 4), 0);
    assert_eq!(frontend_ring_order(Some("3"), 4), 3);
    assert_eq!(frontend_ring_order(Some("8"), 2), 2);
    assert_eq!(frontend_ring_order(Some("junk"), 2), 0);
    assert_eq!(ring_ref_key(0, 0), "ring-ref");
    assert_eq!(ring_ref_key(2, 3), "ring-ref3");
}

#[test]
fn uint_values() {
    assert_eq!(parse_uint::<u32>("123").unwrap(), 123);
    assert_eq!(parse_uint::<u64>("18446744073709551615").unwrap(), u64::MAX);
    assert!(parse_uint::<u64>("18446744073709551616").is_err());
    assert!(parse_uint::<u16>("65536").is_err());
    for bad in ["", " ", "+1", "-1", "1.0", "0x10", "1 2"] {
        assert!(parse_uint::<u32>(bad).is_err(), "{bad:?}");
    }
    assert_eq!(keys::MAX_RING_PAGE_ORDER, "max-ring-page-order");
    assert_eq!(vdisk::READONLY, 4);
}
