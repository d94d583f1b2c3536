//! VHD images (Microsoft/Citrix Virtual Hard Disk, with the tapdisk batmap extension).
//!
//! - [`format`](mod@format): on-disk structures, pure encode/decode/validate (no I/O).
//! - [`engine`]: [`VhdImage`], the storage engine implementing [`crate::image::Image`]
//!   (concurrency and crash-consistency design in its module doc).
//! - [`parent`]: parent locators (resolve, produce).
//! - [`ops`]: offline operations for vhd-util (create, snapshot, coalesce, check, ...).
//!
//! Chains (a differencing leaf with its parents, keys) are opened by
//! [`crate::image::chain::open_vhd_chain`].

pub mod engine;
pub mod format;
pub mod ops;
pub mod parent;

pub use engine::{FooterSource, VhdImage, VhdOpenOptions};
pub use format::{DiskType, DynHeader, Footer};
