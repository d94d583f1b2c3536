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
//!  xen         gntdev, evtchn, xenstore (raw ioctls, mmap, shared ring memory);
//!              xen::sim, the in-process simulations, only with feature `sim` (tests, benches)
//!  util        logging (syslog + stderr), error chains, tty detection, getopt
//!  aio         io_uring and Linux native AIO (+ eventfd) for tapdisk's engine
//! ```
//!
//! Only `xen`, `capi` and `aio` may use unsafe_code (each block with a `// SAFETY:` comment); every
//! other module is declared below with `#[forbid(unsafe_code)]`.
//!
//! Feature `sim` (off in releases; `cargo test` and `cargo bench` turn it on through the
//! crate's self dev-dependency) adds the simulations: `xen::sim` (SimXen, SimBlkfront,
//! MemXenStore), `tapdisk::SimXenOpener`, `tapdisk::mem::MemImage` and
//! `nbd::kernel::SimKernelNbd`. A release build holds none of them
//! (`scripts/check-release-no-sim.sh`).

/// The sector: the unit of blkif requests, of every image API, of the VHD format and of
/// the encryption (one AES-XTS data unit). The crate's only definition.
pub const SECTOR_SIZE: u64 = 512;
/// The page: Xen's grant and ring granularity and the alignment of VHD data blocks and
/// I/O buffers. The crate's only definition.
pub const PAGE_SIZE: usize = 4096;

// unsafe_code is allowed in `xen` (ioctls, mmap, shared ring memory), `capi` (the C ABI) and
// `aio` (the io_uring and Linux AIO system calls) only; every other module is compiled with
// `forbid(unsafe_code)`, set here so that no file inside a module can lift it.
pub mod aio;
#[forbid(unsafe_code)]
pub mod blkif;
pub mod capi;
#[forbid(unsafe_code)]
pub mod control;
#[forbid(unsafe_code)]
pub mod image;
#[forbid(unsafe_code)]
pub mod nbd;
#[forbid(unsafe_code)]
pub mod tapback;
#[forbid(unsafe_code)]
pub mod tapctl;
#[forbid(unsafe_code)]
pub mod tapdisk;
#[forbid(unsafe_code)]
pub mod util;
#[forbid(unsafe_code)]
pub mod vhdutil;
pub mod xen;
