//! NBD (Network Block Device) protocol, fixed-newstyle, server side.
//!
//! ```text
//!  proto.rs   pure protocol: constants, the handshake state machine (no I/O), transmission
//!             request parsing/validation and reply encoding. Unit-tested and fuzzable.
//!  server.rs  one non-blocking connection: byte buffers around `proto`, request decoding
//!             into owned commands, an output queue written with writev. It knows nothing of
//!             images or of the event loop; tapdisk drives it.
//! ```
//!
//! Wire reference: the NBD protocol document (`doc/proto.md` of the NBD project). Integers on
//! the wire are big-endian.

pub mod client;
pub mod kernel;
pub mod proto;
pub mod server;

pub use proto::{ExportInfo, Handshake, Negotiated};

/// Errors of the NBD layer (a connection-fatal protocol violation or a socket error).
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("bad client flags {0:#x}")]
    ClientFlags(u32),
    #[error("bad option magic {0:#x}")]
    OptionMagic(u64),
    #[error("bad request magic {0:#x}")]
    RequestMagic(u32),
    #[error("too many options")]
    TooManyOptions,
    #[error("client aborted the handshake")]
    Aborted,
    #[error("invalid {0} option")]
    InvalidOption(&'static str),
    #[error("socket i/o")]
    Io(#[source] std::io::Error),
}
