//! The tap-ctl control message codec on hostile bytes, in each wire layout.
//!
//! - Requests (what tapdisk's control server decodes): `request_len` agrees with what
//!   `decode_request` accepts, a decoded request re-encodes to bytes that decode to the same
//!   request, and `read_request` over a byte stream never panics and agrees with the slice
//!   decoder.
//! - Replies (what tap-ctl and libblktapctl decode): a decoded single-message reply re-encodes
//!   to a frame that decodes to the same reply and cookie; `read_reply` over the stream (LIST
//!   and STATS assembly) never panics.
#![no_main]

use blktap3::control::msg::{self, Frame, Need, WireLayout};
use libfuzzer_sys::fuzz_target;

const LAYOUTS: [WireLayout; 3] = [WireLayout::LP64, WireLayout::I686, WireLayout::ILP32_ALIGN8];

fuzz_target!(|data: &[u8]| {
    let Some((&sel, body)) = data.split_first() else {
        return;
    };
    let layout = LAYOUTS[usize::from(sel) % LAYOUTS.len()];

    // Requests.
    let slice_req = msg::decode_request(body, layout);
    if let Ok(req) = &slice_req {
        // Whatever decodes has exactly the length request_len announces.
        assert_eq!(
            msg::request_len(body, layout).ok(),
            Some(Need::Exactly(body.len()))
        );
        let again = req
            .encode_with(layout)
            .expect("a decoded request re-encodes");
        let back = msg::decode_request(&again, layout).expect("a re-encoded request decodes");
        assert_eq!(&back, req);
        assert_eq!(back.cookie(), req.cookie());
    }
    let mut r = body;
    let streamed = msg::read_request(&mut r, layout);
    if let (Ok(a), Ok((cookie, b))) = (&slice_req, &streamed) {
        // The stream decoder read exactly the same request when the slice was exactly one.
        assert_eq!(a, b);
        assert_eq!(*cookie, msg::peek_cookie(body));
    }

    // Replies.
    if body.len() >= layout.msg_size {
        let frame = &body[..layout.msg_size];
        if let Ok((cookie, Frame::Reply(rep))) = msg::decode_frame(frame, layout) {
            let enc = rep
                .encode_with(cookie, layout)
                .expect("a decoded reply re-encodes");
            assert_eq!(enc.len(), layout.msg_size);
            let (c2, f2) = msg::decode_frame(&enc, layout).expect("a re-encoded reply decodes");
            assert_eq!(c2, cookie);
            assert_eq!(f2, Frame::Reply(rep));
        }
    }
    let mut r = body;
    if let Ok((_, rep)) = msg::read_reply(&mut r, layout) {
        let _ = rep.msg_type();
    }
});
