//! hopvm: a small, fast x86-64 virtual machine monitor on Linux KVM.
//!
//! The crate builds a PC-like VM ([`vm::Vm`]) from a [`config::VmConfig`]: guest memory with a
//! dirty bitmap ([`memory`]), the in-kernel interrupt controllers and PIT, legacy devices on a
//! port / MMIO [`bus`] behind one big lock, a kernel loaded by one of the [`loader`]s, and one
//! thread per vCPU ([`vcpu`]) that runs `KVM_RUN` without the lock. [`instance::Instance`] is
//! one running guest: its run state, resets, and live migration out and in.
//!
//! This is the VMM core. The monitor (QMP) is the crate `qmp` (`vmm/qmp/`), and the front ends —
//! the `hopvm` command line, QEMU's command line and the tools — are the crate `hopvm`
//! (`vmm/cli/`); neither is imported from here.

pub mod announce;
pub mod arch;
pub mod bus;
pub mod config;
pub mod cpu_throttle;
pub mod dirty_ring;
pub mod instance;
pub mod kvm_state;
pub mod loader;
pub mod memory;
pub mod objects;
pub mod qemu_opts;
pub mod runstate;
pub mod sections;
pub mod vcpu;
pub mod vm;
