//! blktap3: the Xen dom0 storage stack (tapdisk3, tap-ctl, tapback, vhd-util) in Rust.
//!
//! Module map (edges point down; formats and protocols never depend on the OS layer):
//!
//! ```text
//!  bin/{tapdisk,tap-ctl,tapback,vhd-util}   thin mains: parse, call, print, exit code
//!  capi        libblktapctl.so.0 C ABI          -> control
//!  tapback     xenstore backend state machine   -> xen (traits), control
//!  tapdisk     event loop, VBDs, I/O pipeline    -> image, blkif, nbd, control, xen (traits)
//!  control     544-byte message codec, client, server
//!  nbd         NBD fixed-newstyle protocol and server
//!  blkif       ring ABIs and request parsing (pure, no unsafe)
//!  image       raw, VHD, crypto, chains (pure file I/O, no unsafe)
//!  xen         gntdev, evtchn, xenstore + simulations (the only home of `unsafe`)
//! ```

pub mod blkif;
pub mod capi;
pub mod control;
pub mod image;
pub mod nbd;
pub mod tapback;
pub mod tapdisk;
pub mod util;
pub mod vhdutil;
pub mod xen;
