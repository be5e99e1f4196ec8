//! Helpers shared by the integration tests of the `hopvm` binary: hopvm processes and their
//! monitors ([`proc`]), the tools ([`tools`]), and the core's serial capture.

#![allow(dead_code)]

pub mod libvirt;
pub mod proc;
pub mod proxy;
pub mod rng;
pub mod tools;

#[path = "../../../tests/common/mod.rs"]
mod shared;

pub use shared::*;
