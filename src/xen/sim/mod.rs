//! In-process simulations of the Xen interfaces, faithful enough to run the real ring, parse
//! and grant-copy code paths in tests and benchmarks without Xen.
//!
//! - [`SimXen`]: a "hypervisor" holding domains ([`SimDomain`]: memfd-backed guest memory plus
//!   a grant table) and event channels.
//! - [`SimGrants`]: a backend domain's view, implementing [`GrantCopier`](super::GrantCopier)
//!   (memcpy with Xen's checks) and [`GrantMapper`](super::GrantMapper) (the granted pages are
//!   mapped again, contiguously, from the guest's memfd: true aliasing, as with gntdev).
//! - [`SimEvtchn`]: event channels over eventfd, with Linux evtchn's mask-on-delivery.
//! - [`MemXenStore`] / [`MemXsConn`]: an in-memory xenstore with transactions, permissions and
//!   watches; [`serve_wire`] exposes it over the real wire protocol (a fake xenstored).
//! - [`SimBlkfront`]: a blkfront that negotiates over xenstore and drives the ring.
//!
//! Known differences from the real thing are listed on each type.

mod blkfront;
mod evtchn;
mod grant;
mod xenstore;

pub use blkfront::{
    toolstack_add_vbd, BlkfrontError, BlkfrontInfo, BlkfrontOptions, Completion, RingView,
    SimBlkfront,
};
pub use evtchn::SimEvtchn;
pub use grant::{SimCopyOp, SimCopyPtr, SimDomain, SimGrants, SimMapping, SimXen};
pub use xenstore::{serve_wire, MemXenStore, MemXsConn};
