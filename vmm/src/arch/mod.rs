//! x86-64 specifics of building a PC: CPUID, boot register state, and the firmware tables a
//! BIOS would leave behind.

pub mod acpi;
pub mod bios;
pub mod cpu_model;
pub mod cpuid;
pub mod mptable;
pub mod regs;
