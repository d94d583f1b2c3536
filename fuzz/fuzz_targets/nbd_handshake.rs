//! The NBD fixed-newstyle handshake (server side) and the transmission request codec on
//! hostile client bytes, without sockets.
//!
//! Invariants:
//! - `Handshake::input` never panics, never claims more bytes than it was given, and gives
//!   the same replies and outcome whether the input arrives at once or one byte at a time;
//! - after negotiation, every 28-byte request header that parses re-encodes to the same
//!   bytes, and every command `validate` accepts lies inside the export (and is not a write
//!   to a read-only export, nor a block-status query that was not negotiated).
#![no_main]

use blktap3::nbd::proto::{self, Command, Outcome, RequestHeader, REQUEST_LEN};
use blktap3::nbd::{ExportInfo, Handshake, Negotiated};
use libfuzzer_sys::fuzz_target;

/// Feed `data` in chunks of `chunk` bytes (re-presenting what was not consumed). Returns the
/// replies, a printable outcome and the bytes left for the transmission phase.
fn run(export: &ExportInfo, data: &[u8], chunk: usize) -> (Vec<u8>, String, Vec<u8>) {
    let mut hs = Handshake::new(export.clone());
    let mut out = Vec::new();
    let mut pending: Vec<u8> = Vec::new();
    let mut fed = 0;
    loop {
        let take = chunk.min(data.len() - fed);
        pending.extend_from_slice(&data[fed..fed + take]);
        fed += take;
        let (used, outcome) = hs.input(&pending, &mut out);
        assert!(used <= pending.len());
        pending.drain(..used);
        match outcome {
            Outcome::NeedMore if fed < data.len() => continue,
            Outcome::NeedMore => return (out, "need-more".into(), pending),
            Outcome::Transmission(neg) => {
                pending.extend_from_slice(&data[fed..]);
                return (out, format!("{neg:?}"), pending);
            }
            Outcome::Close(e) => return (out, format!("close: {e}"), pending),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, data)) = data.split_first() else {
        return;
    };
    let export = ExportInfo {
        size: u64::from(flags >> 2) * 4096 + u64::from(flags & 1) * 512,
        read_only: flags & 2 != 0,
        name: "fuzz".into(),
    };
    let whole = run(&export, data, usize::MAX);
    let bytewise = run(&export, data, 1);
    assert_eq!(whole.0, bytewise.0, "replies differ when fed byte by byte");
    assert_eq!(whole.1, bytewise.1, "outcome differs when fed byte by byte");
    let (_, outcome, rest) = whole;
    if outcome == "need-more" || outcome.starts_with("close") {
        return;
    }
    // Transmission phase: walk the request stream (payloads follow WRITE headers).
    let neg_structured = outcome.contains("structured: true");
    let neg = Negotiated {
        structured: neg_structured,
        base_allocation: neg_structured && outcome.contains("base_allocation: true"),
    };
    let mut at = 0;
    while rest.len() - at >= REQUEST_LEN {
        let b: [u8; REQUEST_LEN] = rest[at..at + REQUEST_LEN].try_into().unwrap_or([0; 28]);
        at += REQUEST_LEN;
        let Ok(h) = RequestHeader::parse(&b) else {
            break;
        };
        assert_eq!(h.encode(), b);
        if let Ok(cmd) = proto::validate(&h, &export, &neg) {
            let (off, len) = match cmd {
                Command::Read { offset, len } => (offset, len),
                Command::Write { offset, len, .. }
                | Command::Trim { offset, len, .. }
                | Command::WriteZeroes { offset, len, .. } => {
                    assert!(!export.read_only, "{cmd:?} on a read-only export");
                    (offset, len)
                }
                Command::BlockStatus { offset, len, .. } => {
                    assert!(neg.structured && neg.base_allocation);
                    (offset, len)
                }
                Command::Disconnect | Command::Flush => (0, 0),
            };
            assert!(
                off + u64::from(len) <= export.size,
                "{cmd:?} outside the export"
            );
        }
        at = at.saturating_add(h.payload_len() as usize).min(rest.len());
    }
});
