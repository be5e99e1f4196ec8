//! hopvm: a small, fast x86-64 virtual machine monitor on Linux KVM.
//!
//! The crate builds a PC-like VM ([`vm::Vm`]) from a [`config::VmConfig`]: guest memory with a
//! dirty bitmap ([`memory`]), the in-kernel interrupt controllers and PIT, legacy devices on a
//! port / MMIO [`bus`] behind one big lock, a kernel loaded by one of the [`loader`]s, and one
//! thread per vCPU ([`vcpu`]) that runs `KVM_RUN` without the lock. [`run`] drives a VM to its
//! end, and [`cli`] is the `hopvm` command line.

pub mod arch;
pub mod bus;
pub mod cli;
pub mod config;
pub mod instance;
pub mod kvm_state;
pub mod loader;
pub mod memory;
pub mod qemu_cli;
pub mod qmp;
pub mod run;
pub mod runstate;
pub mod sections;
pub mod tools;
pub mod vcpu;
pub mod vm;
