//! Random bytes as a xenstore reply stream: decode, re-encode, and parse payloads.
#![no_main]

use blktap3::xen::xenstore::wire;
use blktap3::xen::xenstore::Perm;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut buf = data;
    while let Ok(Some((m, used))) = wire::decode(buf) {
        assert!(used >= wire::HEADER_SIZE && used <= buf.len());
        assert!(m.payload.len() <= wire::PAYLOAD_MAX);
        assert_eq!(&m.encode().unwrap()[..], &buf[..used]);
        if let Ok(parts) = wire::split_strings(&m.payload) {
            for p in parts {
                let _ = Perm::parse(p);
            }
        }
        let _ = wire::split_write(&m.payload);
        let _ = wire::parse_error(&m.payload);
        let _ = wire::parse_tx_id(&m.payload);
        buf = &buf[used..];
    }
});
