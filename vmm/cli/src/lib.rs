//! hopvm's front ends: the `hopvm` command line ([`cli`]), QEMU's command line ([`qemu_cli`]),
//! running a VM to its end ([`run`]), and the tools for people ([`tools`]: demo, migrate, qmp
//! shell, timeline report), each owning its arguments.
//!
//! They sit on top of the VMM core (crate `vmm`) and the monitor (crate `qmp`); nothing below
//! imports them.

pub mod cli;
pub mod qemu_blockdev;
pub mod qemu_cli;
pub mod qemu_domain;
pub mod qemu_launch;
pub mod qemu_netdev;
pub mod run;
pub mod sandbox;
pub mod tools;
