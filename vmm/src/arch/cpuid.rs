//! Per-vCPU CPUID: KVM's supported set, with each vCPU's own APIC ID and the VM's topology.
//!
//! The guest learns who it is from CPUID: leaf 1 EBX carries the initial APIC ID and the number
//! of logical processors, leaves 0xB / 0x1F the x2APIC ID and the SMT/core levels, leaf 4 the
//! cores per package. Every vCPU gets a copy of KVM's supported leaves with those fields
//! rewritten; the hypervisor bit is set so that guests know they are virtualised.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// Leaf 1 ECX: running under a hypervisor.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX: more than one logical processor per package.
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// Leaf 7 EDX: IA32_ARCH_CAPABILITIES MSR present.
const LEAF7_EDX_ARCH_CAPABILITIES: u32 = 1 << 29;
/// CPUID topology level types (leaves 0xB / 0x1F ECX[15:8]).
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// Bits needed to number `n` items (the APIC ID shift of a topology level).
fn id_bits(n: u32) -> u32 {
    32 - n.saturating_sub(1).leading_zeros()
}

/// Options that shape the CPUID of every vCPU.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuidOptions {
    /// Number of vCPUs (all cores of one package, one thread each).
    pub cpus: u8,
    /// Hide IA32_ARCH_CAPABILITIES because the host cannot set MSR 0x10a.
    pub hide_arch_capabilities: bool,
}

/// Rewrites one entry for the vCPU whose APIC ID is `apic_id`.
fn patch_entry(e: &mut kvm_cpuid_entry2, apic_id: u32, opts: &CpuidOptions) {
    let cpus = u32::from(opts.cpus.max(1));
    match e.function {
        1 => {
            e.ebx = (e.ebx & 0xffff) | (apic_id << 24) | ((cpus & 0xff) << 16);
            e.ecx |= LEAF1_ECX_HYPERVISOR;
            if cpus > 1 {
                e.edx |= LEAF1_EDX_HTT;
            } else {
                e.edx &= !LEAF1_EDX_HTT;
            }
        }
        4 => {
            // EAX[31:26]: cores per package − 1; EAX[25:14]: threads sharing this cache − 1.
            let cache_level = (e.eax >> 5) & 7;
            let sharing = if cache_level == 3 { cpus - 1 } else { 0 };
            e.eax = (e.eax & 0x3fff) | (sharing << 14) | ((cpus - 1) << 26);
        }
        7 if e.index == 0 && opts.hide_arch_capabilities => {
            e.edx &= !LEAF7_EDX_ARCH_CAPABILITIES;
        }
        0xb | 0x1f => {
            let (shift, count, level) = match e.index {
                0 => (0, 1, LEVEL_SMT),
                1 => (id_bits(cpus), cpus, LEVEL_CORE),
                _ => (0, 0, 0),
            };
            e.eax = shift;
            e.ebx = count;
            e.ecx = (level << 8) | (e.index & 0xff);
            e.edx = apic_id;
        }
        _ => {}
    }
}

/// The CPUID of the vCPU with `apic_id`, from KVM's supported set `base`.
pub fn vcpu_cpuid(base: &CpuId, apic_id: u8, opts: &CpuidOptions) -> CpuId {
    let mut cpuid = base.clone();
    for e in cpuid.as_mut_slice() {
        patch_entry(e, u32::from(apic_id), opts);
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ebx: 0x0008_0800,
            ..Default::default()
        }
    }

    #[test]
    fn apic_ids_and_topology() {
        let base =
            CpuId::from_entries(&[entry(1, 0), entry(0xb, 0), entry(0xb, 1), entry(7, 0)]).unwrap();
        let opts = CpuidOptions {
            cpus: 4,
            hide_arch_capabilities: true,
        };
        let c = vcpu_cpuid(&base, 3, &opts);
        let e = c.as_slice();
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_eq!(e[0].ebx & 0xffff, 0x0800);
        assert_ne!(e[0].edx & LEAF1_EDX_HTT, 0);
        assert_ne!(e[0].ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_eq!((e[1].edx, e[1].ebx, e[1].ecx >> 8), (3, 1, LEVEL_SMT));
        assert_eq!((e[2].edx, e[2].ebx, e[2].eax), (3, 4, 2));
        assert_eq!(e[3].edx & LEAF7_EDX_ARCH_CAPABILITIES, 0);
    }

    #[test]
    fn bits() {
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(3), 2);
        assert_eq!(id_bits(4), 2);
        assert_eq!(id_bits(5), 3);
    }
}
