//! Grant-copy segment lists for blkif requests: where each segment of a validated request
//! (or the pages of an indirect request's segment list) goes in tapdisk's private buffer.
//! The `xen` module copies what these lists say; building them is the data path's job.

use crate::blkif::{IndirectRequest, Request, Segment};
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
    let mut v = Vec::with_capacity(req.segments().len());
    push_copy_segs(&mut v, req.segments(), layout);
    v
}

/// Append the grant-copy segments of `segments` (a validated request's) to `out`, offsets
/// relative to the request's own buffer: one list can hold a whole batch.
pub fn push_copy_segs(out: &mut Vec<CopySeg>, segments: &[Segment], layout: BufLayout) {
    let mut packed = 0usize;
    out.extend(segments.iter().enumerate().map(|(i, s)| {
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
    }));
}

/// Grant-copy segments that fetch an indirect request's segment pages (whole pages, in
/// order) into a buffer of `grefs.len() * 4096` bytes, ready for
/// [`IndirectRequest::complete`].
pub fn indirect_copy_segs(hdr: &IndirectRequest) -> Vec<CopySeg> {
    let mut v = Vec::with_capacity(hdr.grefs.len());
    push_indirect_copy_segs(&mut v, hdr);
    v
}

/// Append [`indirect_copy_segs`] of `hdr` to `out`.
pub fn push_indirect_copy_segs(out: &mut Vec<CopySeg>, hdr: &IndirectRequest) {
    out.extend(hdr.grefs.iter().enumerate().map(|(i, g)| CopySeg {
        gref: GrantRef(*g),
        page_off: 0,
        len: XEN_PAGE_SIZE as u16,
        buf_off: i * XEN_PAGE_SIZE,
    }));
}
