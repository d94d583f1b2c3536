//! Grant-copy segment lists for blkif requests: where each segment of a validated request
//! (or the pages of an indirect request's segment list) goes in tapdisk's private buffer.
//! The `xen` module copies what these lists say; building them is the data path's job.

use crate::blkif::{IndirectRequest, Request};
use crate::xen::{CopySeg, GrantRef, XEN_PAGE_SIZE};

/// How a request's data is laid out in the local buffer for grant copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BufLayout {
    /// Segment data back to back (`buf_off` = running sum of lengths).
    Packed,
    /// Segment `i` at `i * 4096 + first_sect * 512`, as tapdisk does, so each segment keeps
    /// its in-page alignment (the buffer needs `segments * 4096` bytes).
    PagePerSegment,
}

/// Grant-copy segments for a validated request's data.
pub fn request_copy_segs(req: &Request, layout: BufLayout) -> Vec<CopySeg> {
    let mut packed = 0usize;
    req.segments()
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let buf_off = match layout {
                BufLayout::Packed => {
                    let o = packed;
                    packed += usize::from(s.len());
                    o
                }
                BufLayout::PagePerSegment => i * XEN_PAGE_SIZE + usize::from(s.page_offset()),
            };
            CopySeg {
                gref: GrantRef(s.gref),
                page_off: s.page_offset(),
                len: s.len(),
                buf_off,
            }
        })
        .collect()
}

/// Grant-copy segments that fetch an indirect request's segment pages (whole pages, in
/// order) into a buffer of `grefs.len() * 4096` bytes, ready for
/// [`IndirectRequest::complete`].
pub fn indirect_copy_segs(hdr: &IndirectRequest) -> Vec<CopySeg> {
    hdr.grefs
        .iter()
        .enumerate()
        .map(|(i, g)| CopySeg {
            gref: GrantRef(*g),
            page_off: 0,
            len: XEN_PAGE_SIZE as u16,
            buf_off: i * XEN_PAGE_SIZE,
        })
        .collect()
}
