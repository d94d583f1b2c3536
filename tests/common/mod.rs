//! Helpers shared by the integration test crates. A crate says `mod common;` and uses the
//! submodules it needs; every crate compiles them all, so each is `allow(dead_code)` for the
//! parts a given crate leaves unused.

#[allow(dead_code)]
pub mod cmd;
#[allow(dead_code)]
pub mod cprog;
#[allow(dead_code)]
pub mod data;
#[allow(dead_code)]
pub mod image;
#[allow(dead_code)]
pub mod nbd;
#[allow(dead_code)]
pub mod proc;
#[allow(dead_code)]
pub mod tapback;
#[allow(dead_code)]
pub mod tapback_bin;
#[allow(dead_code)]
pub mod vhd_util;
#[allow(dead_code)]
pub mod xenio;
