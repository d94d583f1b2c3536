//! blktap3: the Xen dom0 storage stack (tapdisk3, tap-ctl, tapback, vhd-util) in Rust.
//!
//! Module map (edges point down; formats and protocols never depend on the OS layer):
//!
//! ```text
//!  bin/{tapdisk,tap-ctl,tapback,vhd-util}   thin mains: parse, call, print, exit code
//!  capi        libblktapctl.so.0 C ABI          -> control
//!  tapback     xenstore backend state machine   -> xen (traits), control
//!  tapdisk     event loop, VBDs, I/O pipeline    -> image, blkif, nbd, control, xen (traits)
//!  vhdutil     vhd-util's commands              -> image, util::getopt
//!  tapctl      tap-ctl's commands               -> control, util::getopt
//!  control     544-byte message codec (536 on i686), client, server, minors -> nbd::kernel
//!  nbd         NBD fixed-newstyle protocol, server, small client, kernel /dev/nbdN attach
//!  blkif       ring ABIs and request parsing (pure, safe Rust only: forbid(unsafe_code))
//!  image       raw, VHD, crypto, chains (pure file I/O, safe Rust only)
//!  xen         gntdev, evtchn, xenstore + simulations (with capi, the only modules allowed unsafe_code)
//!  util        logging (syslog + stderr), error chains, tty detection, getopt
//! ```

/// The sector: the unit of blkif requests, of every image API, of the VHD format and of
/// the encryption (one AES-XTS data unit). The crate's only definition.
pub const SECTOR_SIZE: u64 = 512;
/// The page: Xen's grant and ring granularity and the alignment of VHD data blocks and
/// I/O buffers. The crate's only definition.
pub const PAGE_SIZE: usize = 4096;

pub mod blkif;
pub mod capi;
pub mod control;
pub mod image;
pub mod nbd;
pub mod tapback;
pub mod tapctl;
pub mod tapdisk;
pub mod util;
pub mod vhdutil;
pub mod xen;
