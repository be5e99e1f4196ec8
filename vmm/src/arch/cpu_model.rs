//! QEMU-style CPU models: the `-cpu MODEL[,+feat|-feat|feat=on|off|vendor=STR…]` option.
//!
//! # Why
//!
//! kvm-unit-tests' `unittests.cfg` picks a CPU per test — `qemu64,+x2apic,+tsc-deadline` for
//! the APIC tests, `qemu64,-pcid,-invpcid` to check that PCID is really off, `max,+vmx` for
//! nested VMX, `max,vendor=GenuineIntel` for the MSR test, `kvm64,+rdtscp` — and expects the
//! guest to see exactly that: a feature that is asked off must be off even though KVM could
//! offer it. So a model is a transformation of KVM's supported CPUID, the way QEMU's
//! `target/i386/cpu.c` and `target/i386/kvm/kvm-cpu.c` build it under KVM.
//!
//! # Models
//!
//! * `host` and `max`: everything KVM offers (QEMU's `max` under KVM *is* `host`): KVM's
//!   supported CPUID with the host's vendor, family/model/stepping and brand string.
//! * `qemu64` (QEMU's default) and `kvm64`: the model's feature words (leaf 1 ECX/EDX, 6 EAX,
//!   7.0 EBX/ECX/EDX, 0xD.1 EAX, 0x8000_0001 ECX/EDX, 0x8000_0007 EDX, 0x8000_0008 EBX) replace
//!   KVM's, leaves 7.1+ are cleared, the basic and extended levels are the model's (0xD and
//!   0x8000_000A for `qemu64`, 0xD and 0x8000_0008 for `kvm64`) and higher leaves are
//!   dropped, family/model/stepping are the model's (15/107/1 and 15/6/1) and so is the brand
//!   string ("QEMU Virtual CPU version 2.5+", "Common KVM processor"). The feature words are
//!   QEMU's definitions with QEMU's KVM defaults (`kvm_default_props`) applied: `x2apic` on,
//!   `svm` and `monitor` off. Like QEMU under KVM (`host_cpu_instance_init`), the *vendor* is
//!   the host's: QEMU's model table says AuthenticAMD for `qemu64`, but with KVM that is
//!   overridden, and only an explicit `vendor=` changes it.
//!
//! Everything else — cache leaves 2, 4 and 0x8000_0005/6, the topology leaf 0xB, the address
//! sizes in 0x8000_0008 EAX (always the host's, as QEMU's `host-phys-bits=on`), KVM's
//! paravirtual leaves 0x4000_0000+ — stays as KVM reports it. The hypervisor bit is always
//! set, as QEMU does.
//!
//! # Options
//!
//! Applied in QEMU's order: the model, then `feat=on|off` options in order, then every
//! `+feat`, then every `-feat` (so `-feat` wins). A feature KVM does not support is left off
//! with QEMU's warning ("host doesn't support requested feature"), or is an error with
//! `enforce`. Unknown models, features and options are errors naming them. Recognised too:
//! `vendor=` (12 characters), `model-id=`, `family=`, `model=`, `stepping=`, `enforce`, and,
//! accepted for compatibility with no effect, `check`, `migratable` and `host-phys-bits`.
//! Feature names are QEMU's, with `_` read as `-` and QEMU's aliases (`sse4_1`, `sse3`…).
//!
//! # IA32_ARCH_CAPABILITIES
//!
//! KVM advertises ARCH_CAPABILITIES (leaf 7 EDX bit 29) because it emulates the MSR, but a
//! guest shown the bit reads MSR 0x10a, and QEMU writes the host's value there when it
//! creates the vCPU. Some hosts (nested KVM among them) advertise the bit and list the MSR yet
//! refuse that write; QEMU then aborts (`kvm_buf_set_msrs` assertion) with `-cpu host`. QEMU
//! already hides the bit when MSR 0x10a is missing from `KVM_GET_MSR_INDEX_LIST` (for Linux
//! 4.17–4.20 on AMD); [`supported_cpuid`] does the same, and [`must_hide_arch_capabilities`]
//! tries QEMU's write on a vCPU so the VM can hide the bit instead of failing
//! (`CpuidOptions::hide_arch_capabilities` in [`cpuid`](super::cpuid)).

use std::fmt;
use std::str::FromStr;

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_msr_entry, CpuId, Msrs, KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd};

/// Errors parsing or applying a CPU model.
#[derive(Debug, thiserror::Error)]
pub enum CpuModelError {
    /// No model name.
    #[error("empty cpu model")]
    Empty,
    /// The model is not one hopvm knows.
    #[error("unknown cpu model: {0}")]
    UnknownModel(String),
    /// A `+feat`, `-feat` or `feat=` names no known feature or option.
    #[error("unknown cpu feature: {0}")]
    UnknownFeature(String),
    /// An option's value is malformed or out of range.
    #[error("invalid value for {0}: {1}")]
    InvalidValue(String, String),
    /// With `enforce`: a requested feature that KVM does not support.
    #[error("host does not support cpu feature: {0}")]
    Unsupported(String),
    /// The resulting table has more entries than KVM takes.
    #[error("too many cpuid entries")]
    TooManyEntries,
    /// KVM's supported CPUID could not be read.
    #[error("cannot get kvm's supported cpuid: {0}")]
    Kvm(#[source] kvm_ioctls::Error),
    /// Hyper-V enlightenments asked for on a host whose KVM has no Hyper-V emulation.
    #[error(
        "{0}: Hyper-V enlightenments need KVM's Hyper-V support (KVM_CAP_HYPERV), \
         which this host's kernel lacks"
    )]
    NoHyperv(String),
    /// Hyper-V enlightenments on a host that has them: not implemented by hopvm.
    #[error("{0}: Hyper-V enlightenments are not implemented by hopvm")]
    HypervUnimplemented(String),
}

/// The IA32_ARCH_CAPABILITIES MSR.
pub const MSR_IA32_ARCH_CAPABILITIES: u32 = 0x10a;

/// A CPUID output register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

impl Reg {
    fn name(self) -> &'static str {
        match self {
            Reg::Eax => "EAX",
            Reg::Ebx => "EBX",
            Reg::Ecx => "ECX",
            Reg::Edx => "EDX",
        }
    }

    fn get(self, e: &kvm_cpuid_entry2) -> u32 {
        match self {
            Reg::Eax => e.eax,
            Reg::Ebx => e.ebx,
            Reg::Ecx => e.ecx,
            Reg::Edx => e.edx,
        }
    }

    fn get_mut(self, e: &mut kvm_cpuid_entry2) -> &mut u32 {
        match self {
            Reg::Eax => &mut e.eax,
            Reg::Ebx => &mut e.ebx,
            Reg::Ecx => &mut e.ecx,
            Reg::Edx => &mut e.edx,
        }
    }
}

/// One feature register: (leaf, subleaf, register).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Word {
    leaf: u32,
    sub: u32,
    reg: Reg,
}

const fn word(leaf: u32, sub: u32, reg: Reg) -> Word {
    Word { leaf, sub, reg }
}

const L1_ECX: Word = word(1, 0, Reg::Ecx);
const L1_EDX: Word = word(1, 0, Reg::Edx);
const L6_EAX: Word = word(6, 0, Reg::Eax);
const L7_EBX: Word = word(7, 0, Reg::Ebx);
const L7_ECX: Word = word(7, 0, Reg::Ecx);
const L7_EDX: Word = word(7, 0, Reg::Edx);
const L7_1_EAX: Word = word(7, 1, Reg::Eax);
const LD_1_EAX: Word = word(0xd, 1, Reg::Eax);
const E1_ECX: Word = word(0x8000_0001, 0, Reg::Ecx);
const E1_EDX: Word = word(0x8000_0001, 0, Reg::Edx);
const E7_EDX: Word = word(0x8000_0007, 0, Reg::Edx);
const E8_EBX: Word = word(0x8000_0008, 0, Reg::Ebx);
const EA_EDX: Word = word(0x8000_000a, 0, Reg::Edx);
const KVM_EAX: Word = word(0x4000_0001, 0, Reg::Eax);

/// The words a named model defines; KVM's values for them are replaced.
const MODEL_WORDS: [Word; 12] = [
    L1_ECX, L1_EDX, L6_EAX, L7_EBX, L7_ECX, L7_EDX, LD_1_EAX, E1_ECX, E1_EDX, E7_EDX, E8_EBX,
    EA_EDX,
];

const LEAF1_ECX_XSAVE: u32 = 1 << 26;
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
const LEAF7_EDX_ARCH_CAPABILITIES: u32 = 1 << 29;
const LEAF1_ECX_VMX: u32 = 1 << 5;
const EXT1_ECX_SVM: u32 = 1 << 2;
/// Leaf 1 EDX bits that AMD CPUs mirror in leaf 0x8000_0001 EDX (QEMU's
/// `CPUID_EXT2_AMD_ALIASES`).
const AMD_ALIASES: u32 = 0x0183_f3ff;
const VENDOR_AMD: &[u8; 12] = b"AuthenticAMD";

/// A named CPU feature: `mask` in `word`.
#[derive(Debug)]
struct Feature {
    name: &'static str,
    word: Word,
    mask: u32,
}

const fn feat(name: &'static str, word: Word, bit: u32) -> Feature {
    Feature {
        name,
        word,
        mask: 1 << bit,
    }
}

/// The features QEMU knows by these names (`feature_word_info` in `target/i386/cpu.c`).
static FEATURES: &[Feature] = &[
    // CPUID 1 EDX
    feat("fpu", L1_EDX, 0),
    feat("vme", L1_EDX, 1),
    feat("de", L1_EDX, 2),
    feat("pse", L1_EDX, 3),
    feat("tsc", L1_EDX, 4),
    feat("msr", L1_EDX, 5),
    feat("pae", L1_EDX, 6),
    feat("mce", L1_EDX, 7),
    feat("cx8", L1_EDX, 8),
    feat("apic", L1_EDX, 9),
    feat("sep", L1_EDX, 11),
    feat("mtrr", L1_EDX, 12),
    feat("pge", L1_EDX, 13),
    feat("mca", L1_EDX, 14),
    feat("cmov", L1_EDX, 15),
    feat("pat", L1_EDX, 16),
    feat("pse36", L1_EDX, 17),
    feat("pn", L1_EDX, 18),
    feat("clflush", L1_EDX, 19),
    feat("ds", L1_EDX, 21),
    feat("acpi", L1_EDX, 22),
    feat("mmx", L1_EDX, 23),
    feat("fxsr", L1_EDX, 24),
    feat("sse", L1_EDX, 25),
    feat("sse2", L1_EDX, 26),
    feat("ss", L1_EDX, 27),
    feat("ht", L1_EDX, 28),
    feat("tm", L1_EDX, 29),
    feat("pbe", L1_EDX, 31),
    // CPUID 1 ECX
    feat("pni", L1_ECX, 0),
    feat("pclmulqdq", L1_ECX, 1),
    feat("dtes64", L1_ECX, 2),
    feat("monitor", L1_ECX, 3),
    feat("ds-cpl", L1_ECX, 4),
    feat("vmx", L1_ECX, 5),
    feat("smx", L1_ECX, 6),
    feat("est", L1_ECX, 7),
    feat("tm2", L1_ECX, 8),
    feat("ssse3", L1_ECX, 9),
    feat("cid", L1_ECX, 10),
    feat("fma", L1_ECX, 12),
    feat("cx16", L1_ECX, 13),
    feat("xtpr", L1_ECX, 14),
    feat("pdcm", L1_ECX, 15),
    feat("pcid", L1_ECX, 17),
    feat("dca", L1_ECX, 18),
    feat("sse4.1", L1_ECX, 19),
    feat("sse4.2", L1_ECX, 20),
    feat("x2apic", L1_ECX, 21),
    feat("movbe", L1_ECX, 22),
    feat("popcnt", L1_ECX, 23),
    feat("tsc-deadline", L1_ECX, 24),
    feat("aes", L1_ECX, 25),
    feat("xsave", L1_ECX, 26),
    feat("avx", L1_ECX, 28),
    feat("f16c", L1_ECX, 29),
    feat("rdrand", L1_ECX, 30),
    feat("hypervisor", L1_ECX, 31),
    // CPUID 6 EAX
    feat("arat", L6_EAX, 2),
    // CPUID 7.0 EBX
    feat("fsgsbase", L7_EBX, 0),
    feat("tsc-adjust", L7_EBX, 1),
    feat("sgx", L7_EBX, 2),
    feat("bmi1", L7_EBX, 3),
    feat("hle", L7_EBX, 4),
    feat("avx2", L7_EBX, 5),
    feat("smep", L7_EBX, 7),
    feat("bmi2", L7_EBX, 8),
    feat("erms", L7_EBX, 9),
    feat("invpcid", L7_EBX, 10),
    feat("rtm", L7_EBX, 11),
    feat("mpx", L7_EBX, 14),
    feat("avx512f", L7_EBX, 16),
    feat("avx512dq", L7_EBX, 17),
    feat("rdseed", L7_EBX, 18),
    feat("adx", L7_EBX, 19),
    feat("smap", L7_EBX, 20),
    feat("avx512ifma", L7_EBX, 21),
    feat("clflushopt", L7_EBX, 23),
    feat("clwb", L7_EBX, 24),
    feat("intel-pt", L7_EBX, 25),
    feat("avx512pf", L7_EBX, 26),
    feat("avx512er", L7_EBX, 27),
    feat("avx512cd", L7_EBX, 28),
    feat("sha-ni", L7_EBX, 29),
    feat("avx512bw", L7_EBX, 30),
    feat("avx512vl", L7_EBX, 31),
    // CPUID 7.0 ECX
    feat("avx512vbmi", L7_ECX, 1),
    feat("umip", L7_ECX, 2),
    feat("pku", L7_ECX, 3),
    feat("waitpkg", L7_ECX, 5),
    feat("avx512vbmi2", L7_ECX, 6),
    feat("gfni", L7_ECX, 8),
    feat("vaes", L7_ECX, 9),
    feat("vpclmulqdq", L7_ECX, 10),
    feat("avx512vnni", L7_ECX, 11),
    feat("avx512bitalg", L7_ECX, 12),
    feat("avx512-vpopcntdq", L7_ECX, 14),
    feat("la57", L7_ECX, 16),
    feat("rdpid", L7_ECX, 22),
    feat("bus-lock-detect", L7_ECX, 24),
    feat("cldemote", L7_ECX, 25),
    feat("movdiri", L7_ECX, 27),
    feat("movdir64b", L7_ECX, 28),
    feat("pks", L7_ECX, 31),
    // CPUID 7.0 EDX
    feat("avx512-4vnniw", L7_EDX, 2),
    feat("avx512-4fmaps", L7_EDX, 3),
    feat("fsrm", L7_EDX, 4),
    feat("avx512-vp2intersect", L7_EDX, 8),
    feat("md-clear", L7_EDX, 10),
    feat("serialize", L7_EDX, 14),
    feat("tsx-ldtrk", L7_EDX, 16),
    feat("pconfig", L7_EDX, 18),
    feat("arch-lbr", L7_EDX, 19),
    feat("amx-bf16", L7_EDX, 22),
    feat("avx512-fp16", L7_EDX, 23),
    feat("amx-tile", L7_EDX, 24),
    feat("amx-int8", L7_EDX, 25),
    feat("spec-ctrl", L7_EDX, 26),
    feat("stibp", L7_EDX, 27),
    feat("flush-l1d", L7_EDX, 28),
    feat("arch-capabilities", L7_EDX, 29),
    feat("core-capability", L7_EDX, 30),
    feat("ssbd", L7_EDX, 31),
    // CPUID 7.1 EAX
    feat("avx-vnni", L7_1_EAX, 4),
    feat("avx512-bf16", L7_1_EAX, 5),
    feat("fzrm", L7_1_EAX, 10),
    feat("fsrs", L7_1_EAX, 11),
    feat("fsrc", L7_1_EAX, 12),
    feat("lam", L7_1_EAX, 26),
    // CPUID 0xD.1 EAX
    feat("xsaveopt", LD_1_EAX, 0),
    feat("xsavec", LD_1_EAX, 1),
    feat("xgetbv1", LD_1_EAX, 2),
    feat("xsaves", LD_1_EAX, 3),
    // CPUID 0x8000_0001 EDX
    feat("syscall", E1_EDX, 11),
    feat("nx", E1_EDX, 20),
    feat("mmxext", E1_EDX, 22),
    feat("fxsr-opt", E1_EDX, 25),
    feat("pdpe1gb", E1_EDX, 26),
    feat("rdtscp", E1_EDX, 27),
    feat("lm", E1_EDX, 29),
    feat("3dnowext", E1_EDX, 30),
    feat("3dnow", E1_EDX, 31),
    // CPUID 0x8000_0001 ECX
    feat("lahf-lm", E1_ECX, 0),
    feat("cmp-legacy", E1_ECX, 1),
    feat("svm", E1_ECX, 2),
    feat("extapic", E1_ECX, 3),
    feat("cr8legacy", E1_ECX, 4),
    feat("abm", E1_ECX, 5),
    feat("sse4a", E1_ECX, 6),
    feat("misalignsse", E1_ECX, 7),
    feat("3dnowprefetch", E1_ECX, 8),
    feat("osvw", E1_ECX, 9),
    feat("ibs", E1_ECX, 10),
    feat("xop", E1_ECX, 11),
    feat("skinit", E1_ECX, 12),
    feat("wdt", E1_ECX, 13),
    feat("lwp", E1_ECX, 15),
    feat("fma4", E1_ECX, 16),
    feat("tce", E1_ECX, 17),
    feat("nodeid-msr", E1_ECX, 19),
    feat("tbm", E1_ECX, 21),
    feat("topoext", E1_ECX, 22),
    feat("perfctr-core", E1_ECX, 23),
    feat("perfctr-nb", E1_ECX, 24),
    // CPUID 0x8000_0007 EDX
    feat("invtsc", E7_EDX, 8),
    // CPUID 0x8000_000A EDX (SVM features)
    feat("npt", EA_EDX, 0),
    feat("lbrv", EA_EDX, 1),
    feat("svm-lock", EA_EDX, 2),
    feat("nrip-save", EA_EDX, 3),
    feat("tsc-scale", EA_EDX, 4),
    feat("vmcb-clean", EA_EDX, 5),
    feat("flushbyasid", EA_EDX, 6),
    feat("decodeassists", EA_EDX, 7),
    feat("pause-filter", EA_EDX, 10),
    feat("pfthreshold", EA_EDX, 12),
    feat("avic", EA_EDX, 13),
    feat("v-vmsave-vmload", EA_EDX, 15),
    feat("vgif", EA_EDX, 16),
    feat("vnmi", EA_EDX, 25),
    feat("svme-addr-chk", EA_EDX, 28),
    // CPUID 0x8000_0008 EBX
    feat("clzero", E8_EBX, 0),
    feat("xsaveerptr", E8_EBX, 2),
    feat("rdpru", E8_EBX, 4),
    feat("wbnoinvd", E8_EBX, 9),
    feat("ibpb", E8_EBX, 12),
    feat("ibrs", E8_EBX, 14),
    feat("amd-stibp", E8_EBX, 15),
    feat("amd-ssbd", E8_EBX, 24),
    feat("virt-ssbd", E8_EBX, 25),
    feat("amd-no-ssb", E8_EBX, 26),
    // KVM paravirtual features, CPUID 0x4000_0001 EAX
    Feature {
        name: "kvmclock",
        word: KVM_EAX,
        mask: (1 << 0) | (1 << 3),
    },
    feat("kvm-nopiodelay", KVM_EAX, 1),
    feat("kvm-mmu", KVM_EAX, 2),
    feat("kvm-asyncpf", KVM_EAX, 4),
    feat("kvm-steal-time", KVM_EAX, 5),
    feat("kvm-pv-eoi", KVM_EAX, 6),
    feat("kvm-pv-unhalt", KVM_EAX, 7),
    feat("kvm-pv-tlb-flush", KVM_EAX, 9),
    feat("kvm-asyncpf-vmexit", KVM_EAX, 10),
    feat("kvm-pv-ipi", KVM_EAX, 11),
    feat("kvm-poll-control", KVM_EAX, 12),
    feat("kvm-pv-sched-yield", KVM_EAX, 13),
    feat("kvm-asyncpf-int", KVM_EAX, 14),
    feat("kvm-msi-ext-dest-id", KVM_EAX, 15),
    feat("kvmclock-stable-bit", KVM_EAX, 24),
];

/// A nested-VMX capability QEMU names `vmx-*`: a bit of a VMX capability MSR. For the control
/// MSRs the bit is in the allowed-1 half (bits 63:32), in the MSR and in its `TRUE_` twin
/// (`true_msr`, 0 if none).
#[derive(Debug)]
struct VmxFeature {
    name: &'static str,
    msr: u32,
    true_msr: u32,
    bit: u32,
}

const fn vmx_feat(name: &'static str, msr: u32, true_msr: u32, bit: u32) -> VmxFeature {
    VmxFeature {
        name,
        msr,
        true_msr,
        bit,
    }
}

/// QEMU's `vmx-*` features (`FEAT_VMX_*` in `target/i386/cpu.c`): IA32_VMX_BASIC (0x480),
/// the pin-based, processor-based, exit and entry controls (0x481–0x484, TRUE_ 0x48d–0x490),
/// MISC (0x485), the secondary controls (0x48b), EPT/VPID capabilities (0x48c), VMFUNC (0x491).
static VMX_FEATURES: &[VmxFeature] = &[
    vmx_feat("vmx-intr-exit", 0x481, 0x48d, 32),
    vmx_feat("vmx-nmi-exit", 0x481, 0x48d, 35),
    vmx_feat("vmx-vnmi", 0x481, 0x48d, 37),
    vmx_feat("vmx-preemption-timer", 0x481, 0x48d, 38),
    vmx_feat("vmx-posted-intr", 0x481, 0x48d, 39),
    vmx_feat("vmx-vintr-pending", 0x482, 0x48e, 34),
    vmx_feat("vmx-tsc-offset", 0x482, 0x48e, 35),
    vmx_feat("vmx-hlt-exit", 0x482, 0x48e, 39),
    vmx_feat("vmx-invlpg-exit", 0x482, 0x48e, 41),
    vmx_feat("vmx-mwait-exit", 0x482, 0x48e, 42),
    vmx_feat("vmx-rdpmc-exit", 0x482, 0x48e, 43),
    vmx_feat("vmx-rdtsc-exit", 0x482, 0x48e, 44),
    vmx_feat("vmx-cr3-load-noexit", 0x482, 0x48e, 47),
    vmx_feat("vmx-cr3-store-noexit", 0x482, 0x48e, 48),
    vmx_feat("vmx-cr8-load-exit", 0x482, 0x48e, 51),
    vmx_feat("vmx-cr8-store-exit", 0x482, 0x48e, 52),
    vmx_feat("vmx-flexpriority", 0x482, 0x48e, 53),
    vmx_feat("vmx-vnmi-pending", 0x482, 0x48e, 54),
    vmx_feat("vmx-movdr-exit", 0x482, 0x48e, 55),
    vmx_feat("vmx-io-exit", 0x482, 0x48e, 56),
    vmx_feat("vmx-io-bitmap", 0x482, 0x48e, 57),
    vmx_feat("vmx-mtf", 0x482, 0x48e, 59),
    vmx_feat("vmx-msr-bitmap", 0x482, 0x48e, 60),
    vmx_feat("vmx-monitor-exit", 0x482, 0x48e, 61),
    vmx_feat("vmx-pause-exit", 0x482, 0x48e, 62),
    vmx_feat("vmx-secondary-ctls", 0x482, 0x48e, 63),
    vmx_feat("vmx-apicv-xapic", 0x48b, 0x0, 32),
    vmx_feat("vmx-ept", 0x48b, 0x0, 33),
    vmx_feat("vmx-desc-exit", 0x48b, 0x0, 34),
    vmx_feat("vmx-rdtscp-exit", 0x48b, 0x0, 35),
    vmx_feat("vmx-apicv-x2apic", 0x48b, 0x0, 36),
    vmx_feat("vmx-vpid", 0x48b, 0x0, 37),
    vmx_feat("vmx-wbinvd-exit", 0x48b, 0x0, 38),
    vmx_feat("vmx-unrestricted-guest", 0x48b, 0x0, 39),
    vmx_feat("vmx-apicv-register", 0x48b, 0x0, 40),
    vmx_feat("vmx-apicv-vid", 0x48b, 0x0, 41),
    vmx_feat("vmx-ple", 0x48b, 0x0, 42),
    vmx_feat("vmx-rdrand-exit", 0x48b, 0x0, 43),
    vmx_feat("vmx-invpcid-exit", 0x48b, 0x0, 44),
    vmx_feat("vmx-vmfunc", 0x48b, 0x0, 45),
    vmx_feat("vmx-shadow-vmcs", 0x48b, 0x0, 46),
    vmx_feat("vmx-encls-exit", 0x48b, 0x0, 47),
    vmx_feat("vmx-rdseed-exit", 0x48b, 0x0, 48),
    vmx_feat("vmx-pml", 0x48b, 0x0, 49),
    vmx_feat("vmx-xsaves", 0x48b, 0x0, 52),
    vmx_feat("vmx-mbec", 0x48b, 0x0, 54),
    vmx_feat("vmx-tsc-scaling", 0x48b, 0x0, 57),
    vmx_feat("vmx-enable-user-wait-pause", 0x48b, 0x0, 58),
    vmx_feat("vmx-exit-nosave-debugctl", 0x483, 0x48f, 34),
    vmx_feat("vmx-exit-load-perf-global-ctrl", 0x483, 0x48f, 44),
    vmx_feat("vmx-exit-ack-intr", 0x483, 0x48f, 47),
    vmx_feat("vmx-exit-save-pat", 0x483, 0x48f, 50),
    vmx_feat("vmx-exit-load-pat", 0x483, 0x48f, 51),
    vmx_feat("vmx-exit-save-efer", 0x483, 0x48f, 52),
    vmx_feat("vmx-exit-load-efer", 0x483, 0x48f, 53),
    vmx_feat("vmx-exit-save-preemption-timer", 0x483, 0x48f, 54),
    vmx_feat("vmx-exit-clear-bndcfgs", 0x483, 0x48f, 55),
    vmx_feat("vmx-exit-clear-rtit-ctl", 0x483, 0x48f, 57),
    vmx_feat("vmx-exit-load-pkrs", 0x483, 0x48f, 61),
    vmx_feat("vmx-entry-noload-debugctl", 0x484, 0x490, 34),
    vmx_feat("vmx-entry-ia32e-mode", 0x484, 0x490, 41),
    vmx_feat("vmx-entry-load-perf-global-ctrl", 0x484, 0x490, 45),
    vmx_feat("vmx-entry-load-pat", 0x484, 0x490, 46),
    vmx_feat("vmx-entry-load-efer", 0x484, 0x490, 47),
    vmx_feat("vmx-entry-load-bndcfgs", 0x484, 0x490, 48),
    vmx_feat("vmx-entry-load-rtit-ctl", 0x484, 0x490, 50),
    vmx_feat("vmx-entry-load-pkrs", 0x484, 0x490, 54),
    vmx_feat("vmx-store-lma", 0x485, 0x0, 5),
    vmx_feat("vmx-activity-hlt", 0x485, 0x0, 6),
    vmx_feat("vmx-activity-shutdown", 0x485, 0x0, 7),
    vmx_feat("vmx-activity-wait-sipi", 0x485, 0x0, 8),
    vmx_feat("vmx-vmwrite-vmexit-fields", 0x485, 0x0, 29),
    vmx_feat("vmx-zero-len-inject", 0x485, 0x0, 30),
    vmx_feat("vmx-ept-execonly", 0x48c, 0x0, 0),
    vmx_feat("vmx-page-walk-4", 0x48c, 0x0, 6),
    vmx_feat("vmx-page-walk-5", 0x48c, 0x0, 7),
    vmx_feat("vmx-ept-2mb", 0x48c, 0x0, 16),
    vmx_feat("vmx-ept-1gb", 0x48c, 0x0, 17),
    vmx_feat("vmx-invept", 0x48c, 0x0, 20),
    vmx_feat("vmx-eptad", 0x48c, 0x0, 21),
    vmx_feat("vmx-ept-advanced-exitinfo", 0x48c, 0x0, 22),
    vmx_feat("vmx-invept-single-context", 0x48c, 0x0, 25),
    vmx_feat("vmx-invept-all-context", 0x48c, 0x0, 26),
    vmx_feat("vmx-invvpid", 0x48c, 0x0, 32),
    vmx_feat("vmx-invvpid-single-addr", 0x48c, 0x0, 40),
    vmx_feat("vmx-invvpid-single-context", 0x48c, 0x0, 41),
    vmx_feat("vmx-invvpid-all-context", 0x48c, 0x0, 42),
    vmx_feat("vmx-invvpid-single-context-noglobals", 0x48c, 0x0, 43),
    vmx_feat("vmx-ins-outs", 0x480, 0x0, 54),
    vmx_feat("vmx-true-ctls", 0x480, 0x0, 55),
    vmx_feat("vmx-eptp-switching", 0x491, 0x0, 0),
];

/// QEMU's other names for features (after `_` → `-`).
static ALIASES: &[(&str, &str)] = &[
    ("sse3", "pni"),
    ("pclmuldq", "pclmulqdq"),
    ("sse4-1", "sse4.1"),
    ("sse4-2", "sse4.2"),
    ("xd", "nx"),
    ("i64", "lm"),
    ("ffxsr", "fxsr-opt"),
];

const fn bits(list: &[u32]) -> u32 {
    let mut v = 0;
    let mut i = 0;
    while i < list.len() {
        v |= 1 << list[i];
        i += 1;
    }
    v
}

/// QEMU's `PPRO_FEATURES`: FPU DE PSE TSC MSR PAE MCE CX8 APIC SEP PGE CMOV PAT MMX FXSR SSE
/// SSE2.
const PPRO_FEATURES: u32 = bits(&[0, 2, 3, 4, 5, 6, 7, 8, 9, 11, 13, 15, 16, 23, 24, 25, 26]);
/// `qemu64`'s leaf 1 EDX: PPRO + MTRR CLFLUSH MCA PSE36.
const QEMU64_L1_EDX: u32 = PPRO_FEATURES | bits(&[12, 19, 14, 17]);
/// Leaf 1 ECX of both models: SSE3 CX16, plus x2APIC (QEMU's KVM default).
const MODEL_L1_ECX: u32 = bits(&[0, 13, 21]);
/// Leaf 0x8000_0001 EDX of both models: SYSCALL NX LM.
const MODEL_E1_EDX: u32 = bits(&[11, 20, 29]);

/// A built-in model (QEMU's `builtin_x86_defs` entry under KVM).
#[derive(Debug)]
struct ModelDef {
    level: u32,
    xlevel: u32,
    family: u32,
    model: u32,
    stepping: u32,
    model_id: &'static str,
    words: &'static [(Word, u32)],
}

impl ModelDef {
    fn word(&self, w: Word) -> u32 {
        self.words
            .iter()
            .find(|(x, _)| *x == w)
            .map_or(0, |(_, v)| *v)
    }
}

static QEMU64: ModelDef = ModelDef {
    level: 0xd,
    xlevel: 0x8000_000a,
    family: 15,
    model: 107,
    stepping: 1,
    model_id: "QEMU Virtual CPU version 2.5+",
    words: &[
        (L1_EDX, QEMU64_L1_EDX),
        (L1_ECX, MODEL_L1_ECX),
        (E1_EDX, MODEL_E1_EDX),
        // LAHF_LM; QEMU's SVM is switched off under KVM.
        (E1_ECX, bits(&[0])),
    ],
};

static KVM64: ModelDef = ModelDef {
    level: 0xd,
    xlevel: 0x8000_0008,
    family: 15,
    model: 6,
    stepping: 1,
    model_id: "Common KVM processor",
    words: &[
        // qemu64's + VME.
        (L1_EDX, QEMU64_L1_EDX | bits(&[1])),
        (L1_ECX, MODEL_L1_ECX),
        (E1_EDX, MODEL_E1_EDX),
    ],
};

static OPTERON_G1: ModelDef = ModelDef {
    level: 5,
    xlevel: 0x8000_0008,
    family: 15,
    model: 6,
    stepping: 1,
    model_id: "AMD Opteron 240 (Gen 1 Class Opteron)",
    words: &[
        (L1_EDX, QEMU64_L1_EDX | bits(&[1])),
        // SSE3, plus x2APIC (QEMU's KVM default).
        (L1_ECX, bits(&[0, 21])),
        (E1_EDX, MODEL_E1_EDX),
    ],
};

static SKYLAKE_SERVER: ModelDef = ModelDef {
    level: 0xd,
    xlevel: 0x8000_0008,
    family: 6,
    model: 85,
    stepping: 4,
    model_id: "Intel Xeon Processor (Skylake)",
    words: &[
        (L1_EDX, QEMU64_L1_EDX | bits(&[1])),
        // SSE3 PCLMULQDQ FMA SSSE3 CX16 PCID SSE4.1 SSE4.2 X2APIC MOVBE POPCNT TSC-DEADLINE AES
        // XSAVE AVX F16C RDRAND.
        (
            L1_ECX,
            bits(&[
                0, 1, 9, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 28, 29, 30,
            ]),
        ),
        (L6_EAX, bits(&[2])),
        // FSGSBASE BMI1 HLE AVX2 SMEP BMI2 ERMS INVPCID RTM MPX AVX512F AVX512DQ RDSEED ADX
        // SMAP CLFLUSHOPT CLWB AVX512CD AVX512BW AVX512VL.
        (
            L7_EBX,
            bits(&[
                0, 3, 4, 5, 7, 8, 9, 10, 11, 14, 16, 17, 18, 19, 20, 23, 24, 28, 30, 31,
            ]),
        ),
        // PKU.
        (L7_ECX, bits(&[3])),
        // XSAVEOPT XSAVEC XGETBV1.
        (LD_1_EAX, bits(&[0, 1, 2])),
        // SYSCALL NX PDPE1GB RDTSCP LM.
        (E1_EDX, MODEL_E1_EDX | bits(&[26, 27])),
        // LAHF_LM ABM 3DNOWPREFETCH.
        (E1_ECX, bits(&[0, 5, 8])),
    ],
};

/// The model a [`CpuModel`] starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BaseModel {
    /// QEMU's default model.
    Qemu64,
    /// QEMU's `kvm64`.
    Kvm64,
    /// QEMU's `Opteron_G1` (an AMD Opteron 240's features).
    OpteronG1,
    /// QEMU's `Skylake-Server` (v1: an Intel Xeon Skylake's features).
    SkylakeServer,
    /// Everything KVM supports (QEMU's `max` under KVM).
    Max,
    /// Everything KVM supports, as the host.
    Host,
}

impl BaseModel {
    /// The name `-cpu` takes.
    pub fn name(self) -> &'static str {
        match self {
            BaseModel::Qemu64 => "qemu64",
            BaseModel::Kvm64 => "kvm64",
            BaseModel::OpteronG1 => "Opteron_G1",
            BaseModel::SkylakeServer => "Skylake-Server",
            BaseModel::Max => "max",
            BaseModel::Host => "host",
        }
    }

    fn def(self) -> Option<&'static ModelDef> {
        match self {
            BaseModel::Qemu64 => Some(&QEMU64),
            BaseModel::Kvm64 => Some(&KVM64),
            BaseModel::OpteronG1 => Some(&OPTERON_G1),
            BaseModel::SkylakeServer => Some(&SKYLAKE_SERVER),
            BaseModel::Max | BaseModel::Host => None,
        }
    }

    fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "qemu64" | "qemu64-v1" => BaseModel::Qemu64,
            "kvm64" | "kvm64-v1" => BaseModel::Kvm64,
            "Opteron_G1" | "Opteron_G1-v1" => BaseModel::OpteronG1,
            "Skylake-Server" | "Skylake-Server-v1" => BaseModel::SkylakeServer,
            "max" => BaseModel::Max,
            "host" => BaseModel::Host,
            _ => return None,
        })
    }
}

/// A parsed `-cpu` option: a base model and what the options change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuModel {
    spec: String,
    base: BaseModel,
    vendor: Option<[u8; 12]>,
    family: Option<u32>,
    model: Option<u32>,
    stepping: Option<u32>,
    model_id: Option<String>,
    /// (index into [`FEATURES`], on), in the order QEMU applies them.
    features: Vec<(usize, bool)>,
    /// (index into [`VMX_FEATURES`], on), in the order QEMU applies them.
    vmx_features: Vec<(usize, bool)>,
    /// The Hyper-V enlightenments asked for (`hv-*` options, as given).
    hyperv: Vec<String>,
    enforce: bool,
}

/// What a feature name names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FeatureRef {
    /// A CPUID bit: index into [`FEATURES`].
    Cpuid(usize),
    /// A VMX capability: index into [`VMX_FEATURES`].
    Vmx(usize),
    /// A Hyper-V enlightenment (`hv-*`).
    Hyperv,
}

/// QEMU's Hyper-V enlightenment options (`hv-*`, `kvm_hyperv_properties` and the `hv-*`
/// properties of `x86_cpu_properties`).
static HYPERV_OPTIONS: &[&str] = &[
    "hv-relaxed",
    "hv-vapic",
    "hv-time",
    "hv-crash",
    "hv-reset",
    "hv-vpindex",
    "hv-runtime",
    "hv-synic",
    "hv-stimer",
    "hv-stimer-direct",
    "hv-frequencies",
    "hv-reenlightenment",
    "hv-tlbflush",
    "hv-tlbflush-ext",
    "hv-tlbflush-direct",
    "hv-evmcs",
    "hv-ipi",
    "hv-avic",
    "hv-apicv",
    "hv-emsr-bitmap",
    "hv-xmm-input",
    "hv-syndbg",
    "hv-passthrough",
    "hv-enforce-cpuid",
    "hv-spinlocks",
    "hv-vendor-id",
    "hv-version-id-build",
    "hv-version-id-major",
    "hv-version-id-minor",
    "hv-version-id-spack",
    "hv-version-id-sbranch",
    "hv-version-id-snumber",
    "hv-no-nonarch-coresharing",
];

fn lookup_feature(name: &str) -> Result<FeatureRef, CpuModelError> {
    let normalized = name.replace('_', "-");
    let canonical = ALIASES
        .iter()
        .find(|(alias, _)| *alias == normalized)
        .map_or(normalized.as_str(), |(_, c)| c);
    if let Some(i) = FEATURES.iter().position(|f| f.name == canonical) {
        return Ok(FeatureRef::Cpuid(i));
    }
    if let Some(i) = VMX_FEATURES.iter().position(|f| f.name == canonical) {
        return Ok(FeatureRef::Vmx(i));
    }
    if HYPERV_OPTIONS.contains(&canonical) {
        return Ok(FeatureRef::Hyperv);
    }
    Err(CpuModelError::UnknownFeature(name.to_string()))
}

fn parse_bool(key: &str, value: Option<&str>) -> Result<bool, CpuModelError> {
    match value {
        None | Some("on") | Some("yes") | Some("true") => Ok(true),
        Some("off") | Some("no") | Some("false") => Ok(false),
        Some(v) => Err(CpuModelError::InvalidValue(key.to_string(), v.to_string())),
    }
}

fn parse_number(key: &str, value: Option<&str>, max: u32) -> Result<u32, CpuModelError> {
    let invalid = || CpuModelError::InvalidValue(key.to_string(), value.unwrap_or("").to_string());
    let v = value.ok_or_else(invalid)?;
    let n = match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => v.parse(),
    }
    .map_err(|_| invalid())?;
    if n > max {
        return Err(invalid());
    }
    Ok(n)
}

impl FromStr for CpuModel {
    type Err = CpuModelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let spec = s.trim();
        let items = crate::qemu_opts::split_options(spec);
        let name = items.first().map(String::as_str).unwrap_or("");
        if name.is_empty() {
            return Err(CpuModelError::Empty);
        }
        let base = BaseModel::from_name(name)
            .ok_or_else(|| CpuModelError::UnknownModel(name.to_string()))?;
        let mut model = CpuModel {
            spec: spec.to_string(),
            base,
            vendor: None,
            family: None,
            model: None,
            stepping: None,
            model_id: None,
            features: Vec::new(),
            vmx_features: Vec::new(),
            hyperv: Vec::new(),
            enforce: false,
        };
        let (mut plus, mut minus) = (Vec::new(), Vec::new());
        for item in items.iter().skip(1).filter(|i| !i.is_empty()) {
            if let Some(f) = item.strip_prefix('+') {
                match lookup_feature(f)? {
                    FeatureRef::Hyperv => model.hyperv.push(f.to_string()),
                    r => plus.push(r),
                }
                continue;
            }
            if let Some(f) = item.strip_prefix('-') {
                match lookup_feature(f)? {
                    FeatureRef::Hyperv => {}
                    r => minus.push(r),
                }
                continue;
            }
            let (key, value) = match item.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (item.as_str(), None),
            };
            match key.replace('_', "-").as_str() {
                "vendor" => {
                    let v = value.unwrap_or("");
                    let bytes: [u8; 12] = v
                        .as_bytes()
                        .try_into()
                        .ok()
                        .filter(|_| v.is_ascii())
                        .ok_or_else(|| {
                            CpuModelError::InvalidValue(key.to_string(), v.to_string())
                        })?;
                    model.vendor = Some(bytes);
                }
                "model-id" => {
                    let v = value.ok_or_else(|| {
                        CpuModelError::InvalidValue(key.to_string(), String::new())
                    })?;
                    model.model_id = Some(v.to_string());
                }
                "family" => model.family = Some(parse_number(key, value, 0xff + 0xf)?),
                "model" => model.model = Some(parse_number(key, value, 0xff)?),
                "stepping" => model.stepping = Some(parse_number(key, value, 0xf)?),
                "enforce" => model.enforce = parse_bool(key, value)?,
                "check" | "migratable" => {
                    parse_bool(key, value)?;
                }
                "host-phys-bits" => {
                    if !parse_bool(key, value)? {
                        log::warn!(
                            "host-phys-bits=off ignored: guests see the host's address width"
                        );
                    }
                }
                _ => match lookup_feature(key)? {
                    FeatureRef::Cpuid(i) => model.features.push((i, parse_bool(key, value)?)),
                    FeatureRef::Vmx(i) => model.vmx_features.push((i, parse_bool(key, value)?)),
                    FeatureRef::Hyperv => {
                        // Values (hv-spinlocks=N, hv-vendor-id=…) or on/off switches.
                        let on = parse_bool(key, value).unwrap_or(true);
                        if on {
                            model.hyperv.push(item.clone());
                        }
                    }
                },
            }
        }
        for (list, on) in [(plus, true), (minus, false)] {
            for r in list {
                match r {
                    FeatureRef::Cpuid(i) => model.features.push((i, on)),
                    FeatureRef::Vmx(i) => model.vmx_features.push((i, on)),
                    FeatureRef::Hyperv => {}
                }
            }
        }
        Ok(model)
    }
}

impl fmt::Display for CpuModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.spec)
    }
}

fn find(entries: &[kvm_cpuid_entry2], leaf: u32, sub: u32) -> Option<&kvm_cpuid_entry2> {
    entries
        .iter()
        .find(|e| e.function == leaf && e.index == sub)
}

fn get(entries: &[kvm_cpuid_entry2], w: Word) -> u32 {
    find(entries, w.leaf, w.sub).map_or(0, |e| w.reg.get(e))
}

/// Sets a register, adding the entry if it is missing and `value` is not zero.
fn set(entries: &mut Vec<kvm_cpuid_entry2>, w: Word, value: u32) {
    if let Some(e) = entries
        .iter_mut()
        .find(|e| e.function == w.leaf && e.index == w.sub)
    {
        *w.reg.get_mut(e) = value;
        return;
    }
    if value == 0 {
        return;
    }
    let indexed = w.sub != 0
        || matches!(w.leaf, 4 | 7 | 0xb | 0xd | 0x1f)
        || entries
            .iter()
            .any(|e| e.function == w.leaf && e.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX != 0);
    let mut e = kvm_cpuid_entry2 {
        function: w.leaf,
        index: w.sub,
        flags: if indexed {
            KVM_CPUID_FLAG_SIGNIFCANT_INDEX
        } else {
            0
        },
        ..Default::default()
    };
    *w.reg.get_mut(&mut e) = value;
    entries.push(e);
}

fn update(entries: &mut Vec<kvm_cpuid_entry2>, w: Word, f: impl FnOnce(u32) -> u32) {
    let value = f(get(entries, w));
    set(entries, w, value);
}

/// Leaf 1 EAX for a family, model and stepping, encoded as QEMU does.
fn encode_signature(family: u32, model: u32, stepping: u32) -> u32 {
    let mut eax = (stepping & 0xf) | ((model & 0xf) << 4) | (((model >> 4) & 0xf) << 16);
    if family > 0xf {
        eax |= (0xf << 8) | (((family - 0xf) & 0xff) << 20);
    } else {
        eax |= family << 8;
    }
    eax
}

/// (family, model, stepping) of a leaf 1 EAX.
fn decode_signature(eax: u32) -> (u32, u32, u32) {
    (
        ((eax >> 8) & 0xf) + ((eax >> 20) & 0xff),
        ((eax >> 4) & 0xf) | ((eax >> 12) & 0xf0),
        eax & 0xf,
    )
}

fn set_vendor(entries: &mut Vec<kvm_cpuid_entry2>, vendor: &[u8; 12]) {
    let part =
        |i: usize| u32::from_le_bytes([vendor[i], vendor[i + 1], vendor[i + 2], vendor[i + 3]]);
    for leaf in [0, 0x8000_0000] {
        set(entries, word(leaf, 0, Reg::Ebx), part(0));
        set(entries, word(leaf, 0, Reg::Edx), part(4));
        set(entries, word(leaf, 0, Reg::Ecx), part(8));
    }
}

fn vendor_of(entries: &[kvm_cpuid_entry2]) -> [u8; 12] {
    let mut v = [0u8; 12];
    for (i, reg) in [Reg::Ebx, Reg::Edx, Reg::Ecx].into_iter().enumerate() {
        v[i * 4..i * 4 + 4].copy_from_slice(&get(entries, word(0, 0, reg)).to_le_bytes());
    }
    v
}

fn set_brand(entries: &mut Vec<kvm_cpuid_entry2>, brand: &str) {
    let mut bytes = [0u8; 48];
    // The string is NUL-terminated within 48 bytes: at most 47 characters.
    let len = brand.len().min(47);
    bytes[..len].copy_from_slice(&brand.as_bytes()[..len]);
    for (i, chunk) in bytes.chunks(16).enumerate() {
        let leaf = 0x8000_0002 + i as u32;
        for (j, reg) in [Reg::Eax, Reg::Ebx, Reg::Ecx, Reg::Edx]
            .into_iter()
            .enumerate()
        {
            let v = u32::from_le_bytes([
                chunk[j * 4],
                chunk[j * 4 + 1],
                chunk[j * 4 + 2],
                chunk[j * 4 + 3],
            ]);
            // Zeroes overwrite existing entries too, so a shorter string replaces a longer one.
            set(entries, word(leaf, 0, reg), v);
        }
    }
}

/// The name QEMU would print for `bit` of `w`.
fn bit_name(w: Word, bit: u32) -> &'static str {
    FEATURES
        .iter()
        .find(|f| f.word == w && f.mask & (1 << bit) != 0)
        .map_or("", |f| f.name)
}

fn warn_unsupported(w: Word, missing: u32) {
    for bit in (0..32).filter(|b| missing & (1 << b) != 0) {
        let leaf = if w.sub == 0 {
            format!("CPUID.{:02X}H", w.leaf)
        } else {
            format!("CPUID[eax={:02X}h,ecx={:02X}h]", w.leaf, w.sub)
        };
        log::warn!(
            "host doesn't support requested feature: {leaf}:{}.{} [bit {bit}]",
            w.reg.name(),
            bit_name(w, bit)
        );
    }
}

impl CpuModel {
    /// The model the options apply to.
    pub fn base(&self) -> BaseModel {
        self.base
    }

    /// Whether unsupported features are errors (`enforce`) rather than warnings.
    pub fn enforce(&self) -> bool {
        self.enforce
    }

    /// Checks that this host can give the guest the Hyper-V enlightenments asked for (`hv-*`).
    /// They need KVM's Hyper-V emulation (`KVM_CAP_HYPERV`, `has_kvm_hyperv`). As in QEMU,
    /// `hv-passthrough` alone gives the guest what KVM offers, which on a host without it is
    /// nothing (the guest sees no Hyper-V leaves); any other `hv-*` option is then an error.
    /// hopvm does not yet build the Hyper-V CPUID leaves on a host that has them: that is an
    /// error too, rather than a guest silently without its enlightenments.
    pub fn check_hyperv(&self, has_kvm_hyperv: bool) -> Result<(), CpuModelError> {
        if self.hyperv.is_empty() {
            return Ok(());
        }
        let list = self.hyperv.join(",");
        let passthrough_only = self
            .hyperv
            .iter()
            .all(|h| h.replace('_', "-").starts_with("hv-passthrough"));
        match (has_kvm_hyperv, passthrough_only) {
            (false, true) => {
                log::warn!("{list}: this host's KVM offers no Hyper-V enlightenments");
                Ok(())
            }
            (false, false) => Err(CpuModelError::NoHyperv(list)),
            (true, _) => Err(CpuModelError::HypervUnimplemented(list)),
        }
    }

    /// The VMX capability MSRs a guest with this model's `vmx-*` options gets, given the guest
    /// CPUID `cpuid` (nothing unless it shows VMX) and KVM's value of each VMX capability MSR
    /// (`kvm_msr`, from `KVM_GET_MSRS` on /dev/kvm; `None` if KVM does not report it). As in
    /// QEMU, `-vmx-FEAT` clears an allowed-1 bit; `+vmx-FEAT` keeps it if KVM allows it and is
    /// otherwise left off with a warning (an error with `enforce`).
    pub fn vmx_msrs(
        &self,
        cpuid: &CpuId,
        kvm_msr: impl Fn(u32) -> Option<u64>,
    ) -> Result<Vec<(u32, u64)>, CpuModelError> {
        let vmx = get(cpuid.as_slice(), L1_ECX) & LEAF1_ECX_VMX != 0;
        let mut out: Vec<(u32, u64)> = Vec::new();
        for &(idx, on) in &self.vmx_features {
            let Some(f) = VMX_FEATURES.get(idx) else {
                continue;
            };
            let host = vmx.then(|| kvm_msr(f.msr)).flatten();
            if on && host.is_none_or(|v| v & (1 << f.bit) == 0) {
                if self.enforce {
                    return Err(CpuModelError::Unsupported(f.name.to_string()));
                }
                log::warn!("host doesn't support requested feature: {}", f.name);
                continue;
            }
            if on || host.is_none() {
                continue;
            }
            for msr in [f.msr, f.true_msr].into_iter().filter(|m| *m != 0) {
                let Some(current) = out
                    .iter()
                    .find(|(m, _)| *m == msr)
                    .map(|(_, v)| *v)
                    .or_else(|| kvm_msr(msr))
                else {
                    continue;
                };
                let value = current & !(1 << f.bit);
                match out.iter_mut().find(|(m, _)| *m == msr) {
                    Some(e) => e.1 = value,
                    None => out.push((msr, value)),
                }
            }
        }
        Ok(out)
    }

    /// The CPUID this model gives a guest on a host whose KVM supports `supported` (ideally
    /// [`supported_cpuid`]'s table). Apply it before the per-vCPU patching of
    /// [`cpuid::vcpu_cpuid`](super::cpuid::vcpu_cpuid).
    pub fn apply(&self, supported: &CpuId) -> Result<CpuId, CpuModelError> {
        let sup = supported.as_slice();
        let mut out: Vec<kvm_cpuid_entry2> = sup.to_vec();
        // Bits the host can give: KVM's, plus the hypervisor bit QEMU always adds.
        let host_bits = |w: Word| get(sup, w) | if w == L1_ECX { LEAF1_ECX_HYPERVISOR } else { 0 };

        let def = self.base.def();
        if let Some(def) = def {
            for w in MODEL_WORDS {
                let want = def.word(w);
                let have = host_bits(w);
                if want & !have != 0 {
                    if self.enforce {
                        return Err(CpuModelError::Unsupported(
                            bit_name(w, (want & !have).trailing_zeros()).to_string(),
                        ));
                    }
                    warn_unsupported(w, want & !have);
                }
                set(&mut out, w, want & have);
            }
            for e in out.iter_mut().filter(|e| e.function == 7 && e.index >= 1) {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            out.retain(|e| match e.function {
                f if f < 0x4000_0000 => f <= def.level,
                f if (0x8000_0000..0xc000_0000).contains(&f) => f <= def.xlevel,
                f if f >= 0xc000_0000 => false,
                _ => true,
            });
            set(&mut out, word(0, 0, Reg::Eax), def.level);
            set(&mut out, word(0x8000_0000, 0, Reg::Eax), def.xlevel);
            let vendor = vendor_of(sup);
            set_vendor(&mut out, &vendor);
            let signature = encode_signature(def.family, def.model, def.stepping);
            set(&mut out, word(1, 0, Reg::Eax), signature);
            set(&mut out, word(0x8000_0001, 0, Reg::Eax), signature);
            set_brand(&mut out, def.model_id);
        }

        if let Some(vendor) = &self.vendor {
            set_vendor(&mut out, vendor);
        }
        if self.family.is_some() || self.model.is_some() || self.stepping.is_some() {
            let (family, model, stepping) = decode_signature(get(&out, word(1, 0, Reg::Eax)));
            let signature = encode_signature(
                self.family.unwrap_or(family),
                self.model.unwrap_or(model),
                self.stepping.unwrap_or(stepping),
            );
            set(&mut out, word(1, 0, Reg::Eax), signature);
            set(&mut out, word(0x8000_0001, 0, Reg::Eax), signature);
        }
        if let Some(id) = &self.model_id {
            set_brand(&mut out, id);
        }

        update(&mut out, L1_ECX, |v| v | LEAF1_ECX_HYPERVISOR);
        for &(idx, on) in &self.features {
            let Some(f) = FEATURES.get(idx) else {
                continue;
            };
            if on {
                let missing = f.mask & !host_bits(f.word);
                if missing != 0 {
                    if self.enforce {
                        return Err(CpuModelError::Unsupported(f.name.to_string()));
                    }
                    warn_unsupported(f.word, missing);
                }
                let add = f.mask & host_bits(f.word);
                update(&mut out, f.word, |v| v | add);
            } else {
                update(&mut out, f.word, |v| v & !f.mask);
            }
        }

        if def.is_some() {
            // The highest leaf-7 subleaf with features left (QEMU's cpuid_level_func7).
            let max_sub = out
                .iter()
                .filter(|e| e.function == 7 && e.index >= 1)
                .filter(|e| e.eax | e.ebx | e.ecx | e.edx != 0)
                .map(|e| e.index)
                .max()
                .unwrap_or(0);
            set(&mut out, word(7, 0, Reg::Eax), max_sub);
            // Features beyond the model's levels raise them (QEMU's cpuid_min_level and
            // cpuid_min_xlevel): leaf 7 for a leaf-7 feature, 0x8000_000A for SVM.
            let leaf7 = out
                .iter()
                .any(|e| e.function == 7 && e.eax | e.ebx | e.ecx | e.edx != 0);
            if leaf7 && get(&out, word(0, 0, Reg::Eax)) < 7 {
                set(&mut out, word(0, 0, Reg::Eax), 7);
            }
            if get(&out, E1_ECX) & EXT1_ECX_SVM != 0
                && get(&out, word(0x8000_0000, 0, Reg::Eax)) < 0x8000_000a
            {
                set(&mut out, word(0x8000_0000, 0, Reg::Eax), 0x8000_000a);
                for e in sup.iter().filter(|e| e.function == 0x8000_000a) {
                    if find(&out, e.function, e.index).is_none() {
                        out.push(*e);
                        set(&mut out, EA_EDX, 0);
                    }
                }
            }
        }
        if get(&out, L1_ECX) & LEAF1_ECX_XSAVE == 0 {
            // No XSAVE, no XSAVE leaf (as QEMU).
            for e in out.iter_mut().filter(|e| e.function == 0xd) {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
        }
        if &vendor_of(&out) == VENDOR_AMD {
            // AMD CPUs repeat these leaf 1 EDX bits in 0x8000_0001 EDX.
            let aliases = get(&out, L1_EDX) & AMD_ALIASES;
            update(&mut out, E1_EDX, |v| (v & !AMD_ALIASES) | aliases);
        }

        if out.len() > KVM_MAX_CPUID_ENTRIES {
            return Err(CpuModelError::TooManyEntries);
        }
        CpuId::from_entries(&out).map_err(|_| CpuModelError::TooManyEntries)
    }
}

/// Adjusts KVM's supported CPUID the way QEMU's `kvm_arch_get_supported_cpuid` does: the
/// hypervisor bit is supported, TSC deadline is if KVM has `KVM_CAP_TSC_DEADLINE_TIMER`
/// (hopvm's irqchip is always in the kernel), ARCH_CAPABILITIES is not if KVM does not list
/// MSR 0x10a.
fn adjust_supported(cpuid: &mut CpuId, tsc_deadline: bool, arch_capabilities_msr: bool) {
    for e in cpuid.as_mut_slice() {
        match (e.function, e.index) {
            (1, _) => {
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if tsc_deadline {
                    e.ecx |= LEAF1_ECX_TSC_DEADLINE;
                }
            }
            (7, 0) if !arch_capabilities_msr => e.edx &= !LEAF7_EDX_ARCH_CAPABILITIES,
            _ => {}
        }
    }
}

/// The CPUID KVM supports, with QEMU's adjustments (see the module docs): the table to pass
/// to [`CpuModel::apply`]. `arch_caps` is [`arch_capabilities_msr`]'s answer, asked once by
/// the caller and also needed by [`must_hide_arch_capabilities`].
pub fn supported_cpuid(kvm: &Kvm, arch_caps: Option<u64>) -> Result<CpuId, CpuModelError> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(CpuModelError::Kvm)?;
    adjust_supported(
        &mut cpuid,
        kvm.check_extension(Cap::TscDeadlineTimer),
        arch_caps.is_some(),
    );
    Ok(cpuid)
}

/// The IA32_ARCH_CAPABILITIES value QEMU would give a `host` guest: `None` if KVM does not
/// list the MSR at all, else KVM's feature-MSR value (0 if KVM does not report one).
pub fn arch_capabilities_msr(kvm: &Kvm) -> Option<u64> {
    let listed = kvm.get_msr_index_list().ok()?;
    if !listed.as_slice().contains(&MSR_IA32_ARCH_CAPABILITIES) {
        return None;
    }
    let is_feature = kvm
        .get_msr_feature_index_list()
        .is_ok_and(|l| l.as_slice().contains(&MSR_IA32_ARCH_CAPABILITIES));
    if !is_feature {
        return Some(0);
    }
    let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_IA32_ARCH_CAPABILITIES,
        ..Default::default()
    }])
    .ok()?;
    match kvm.get_msrs(&mut msrs) {
        Ok(1) => Some(msrs.as_slice().first().map_or(0, |e| e.data)),
        _ => Some(0),
    }
}

/// KVM's value of the feature MSR `index` (`KVM_GET_MSRS` on /dev/kvm), if KVM lists it in
/// `KVM_GET_MSR_FEATURE_INDEX_LIST` (the VMX capability MSRs are there when KVM offers nested
/// VMX).
pub fn feature_msr(kvm: &Kvm, index: u32) -> Option<u64> {
    let listed = kvm.get_msr_feature_index_list().ok()?;
    if !listed.as_slice().contains(&index) {
        return None;
    }
    let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
        index,
        ..Default::default()
    }])
    .ok()?;
    match kvm.get_msrs(&mut msrs) {
        Ok(1) => msrs.as_slice().first().map(|e| e.data),
        _ => None,
    }
}

/// Whether the guest must not be shown ARCH_CAPABILITIES although `cpuid` shows it: true if
/// KVM refuses the write of `arch_caps` ([`arch_capabilities_msr`]'s value) to MSR 0x10a that
/// QEMU does at vCPU creation (and that a guest relies on). False if `cpuid` does not show the
/// feature.
///
/// `vcpu` must be a vCPU of the VM that has not run yet: the probe sets its CPUID to `cpuid`
/// (KVM only accepts host writes of the MSR when the guest has the feature) and leaves the
/// MSR set on success. Set the vCPU's final CPUID afterwards.
pub fn must_hide_arch_capabilities(vcpu: &VcpuFd, cpuid: &CpuId, arch_caps: Option<u64>) -> bool {
    if get(cpuid.as_slice(), L7_EDX) & LEAF7_EDX_ARCH_CAPABILITIES == 0 {
        return false;
    }
    let Some(value) = arch_caps else {
        return true;
    };
    if let Err(e) = vcpu.set_cpuid2(cpuid) {
        log::warn!("cannot set cpuid to probe arch-capabilities: {e}");
        return true;
    }
    let Ok(msrs) = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_IA32_ARCH_CAPABILITIES,
        data: value,
        ..Default::default()
    }]) else {
        return true;
    };
    let settable = matches!(vcpu.set_msrs(&msrs), Ok(1));
    if !settable {
        log::warn!("kvm refuses IA32_ARCH_CAPABILITIES={value:#x}: hiding arch-capabilities");
    }
    !settable
}

/// The CPUID this host's KVM supports, with QEMU's adjustments ([`supported_cpuid`] on a
/// fresh `/dev/kvm` handle): what `query-cpu-definitions` and `query-cpu-model-expansion`
/// describe.
pub fn host_supported_cpuid() -> Result<CpuId, CpuModelError> {
    let kvm = Kvm::new().map_err(CpuModelError::Kvm)?;
    supported_cpuid(&kvm, arch_capabilities_msr(&kvm))
}

/// The models `-cpu` accepts, in the order `query-cpu-definitions` lists them.
pub const BASE_MODELS: &[BaseModel] = &[
    BaseModel::Qemu64,
    BaseModel::Kvm64,
    BaseModel::OpteronG1,
    BaseModel::SkylakeServer,
    BaseModel::Max,
    BaseModel::Host,
];

/// Every CPUID feature name hopvm knows (QEMU's names).
pub fn feature_names() -> impl Iterator<Item = &'static str> {
    FEATURES.iter().map(|f| f.name)
}

/// Every CPUID feature name hopvm knows, with whether `cpuid` (a guest's CPUID, as
/// [`CpuModel::apply`] builds it) has it: QEMU's boolean CPU properties.
pub fn feature_states(cpuid: &CpuId) -> Vec<(&'static str, bool)> {
    let entries = cpuid.as_slice();
    FEATURES
        .iter()
        .map(|f| (f.name, get(entries, f.word) & f.mask == f.mask))
        .collect()
}

/// The identity a guest CPUID gives: vendor, family, model, stepping and brand string, as
/// QEMU's CPU properties `vendor`, `family`, `model`, `stepping` and `model-id` report them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuIdentity {
    /// `GenuineIntel`, `AuthenticAMD`, ...
    pub vendor: String,
    /// Family (base + extended).
    pub family: u32,
    /// Model (with the extended model).
    pub model: u32,
    /// Stepping.
    pub stepping: u32,
    /// The brand string of leaves 0x8000_0002..4.
    pub model_id: String,
}

/// [`CpuIdentity`] of a guest CPUID.
pub fn identity(cpuid: &CpuId) -> CpuIdentity {
    let entries = cpuid.as_slice();
    let (family, model, stepping) = decode_signature(get(entries, word(1, 0, Reg::Eax)));
    let mut brand = Vec::with_capacity(48);
    for leaf in 0x8000_0002..=0x8000_0004 {
        for reg in [Reg::Eax, Reg::Ebx, Reg::Ecx, Reg::Edx] {
            brand.extend_from_slice(&get(entries, word(leaf, 0, reg)).to_le_bytes());
        }
    }
    let end = brand.iter().position(|&b| b == 0).unwrap_or(brand.len());
    CpuIdentity {
        vendor: String::from_utf8_lossy(&vendor_of(entries)).into_owned(),
        family,
        model,
        stepping,
        model_id: String::from_utf8_lossy(&brand[..end]).trim().to_string(),
    }
}

impl CpuModel {
    /// The features this model asks for that a host whose KVM supports `supported` cannot
    /// give (QEMU's `unavailable-features` of `query-cpu-definitions`): empty for `max` and
    /// `host`, which take what there is.
    pub fn unavailable_features(&self, supported: &CpuId) -> Vec<&'static str> {
        let sup = supported.as_slice();
        let host_bits = |w: Word| get(sup, w) | if w == L1_ECX { LEAF1_ECX_HYPERVISOR } else { 0 };
        let mut missing = Vec::new();
        let mut note = |w: Word, bits: u32| {
            for f in FEATURES
                .iter()
                .filter(|f| f.word == w && f.mask & bits != 0)
            {
                if !missing.contains(&f.name) {
                    missing.push(f.name);
                }
            }
        };
        // As QEMU's x86_cpu_filter_features: what is asked for once the explicit `feat=on` /
        // `feat=off` (the last one of each wins) are applied to the model's words — a model
        // feature turned off is not missing.
        let off = |w: Word| {
            FEATURES
                .iter()
                .enumerate()
                .filter(|(_, f)| f.word == w)
                .filter(|(i, _)| {
                    self.features
                        .iter()
                        .rev()
                        .find(|(j, _)| j == i)
                        .is_some_and(|&(_, on)| !on)
                })
                .fold(0, |acc, (_, f)| acc | f.mask)
        };
        if let Some(def) = self.base.def() {
            for w in MODEL_WORDS {
                note(w, def.word(w) & !off(w) & !host_bits(w));
            }
        }
        for (pos, &(idx, on)) in self.features.iter().enumerate() {
            let last = !self.features[pos + 1..].iter().any(|&(j, _)| j == idx);
            if let Some(f) = FEATURES.get(idx).filter(|_| on && last) {
                note(f.word, f.mask & !host_bits(f.word));
            }
        }
        missing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            flags: if matches!(function, 7 | 0xb | 0xd) {
                KVM_CPUID_FLAG_SIGNIFCANT_INDEX
            } else {
                0
            },
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    fn vendor_regs(v: &[u8; 12]) -> [u32; 3] {
        let p = |i: usize| u32::from_le_bytes(v[i..i + 4].try_into().unwrap());
        [p(0), p(4), p(8)]
    }

    /// A KVM-supported table as an Intel host with most features might report it.
    fn intel_host() -> CpuId {
        let [b, d, c] = vendor_regs(b"GenuineIntel");
        let brand = *b"Intel(R) Xeon(R) Test CPU @ 2.00GHz\0\0\0\0\0\0\0\0\0\0\0\0\0";
        let brand_leaf = |i: usize| {
            let w = |j: usize| u32::from_le_bytes(brand[i * 16 + j * 4..][..4].try_into().unwrap());
            [w(0), w(1), w(2), w(3)]
        };
        CpuId::from_entries(&[
            e(0, 0, [0x1f, b, c, d]),
            e(1, 0, [0x0005_0654, 0x0001_0800, 0xf6fa_3223, 0x1f8b_fbff]),
            e(6, 0, [0x4, 0, 0, 0]),
            e(7, 0, [1, 0xd19f_4fbb, 0x0041_401e, 0xbc00_0410]),
            e(7, 1, [0x30, 0, 0, 0]),
            e(0xb, 0, [0, 1, 0x100, 0]),
            e(0xb, 1, [0, 1, 0x201, 0]),
            e(0xd, 0, [0x2e7, 0xa88, 0xa88, 0]),
            e(0xd, 1, [0xf, 0, 0, 0]),
            e(0xd, 2, [0x100, 0x240, 0, 0]),
            e(0x14, 0, [1, 0xf, 7, 0]),
            e(0x1f, 0, [0, 1, 0x100, 0]),
            e(
                0x4000_0000,
                0,
                [0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d],
            ),
            e(0x4000_0001, 0, [0x0100_7efb, 0, 0, 0]),
            e(0x8000_0000, 0, [0x8000_0008, 0, 0, 0]),
            e(0x8000_0001, 0, [0, 0, 0x121, 0x2c10_0800]),
            e(0x8000_0002, 0, brand_leaf(0)),
            e(0x8000_0003, 0, brand_leaf(1)),
            e(0x8000_0004, 0, brand_leaf(2)),
            e(0x8000_0006, 0, [0, 0, 0x0100_6040, 0]),
            e(0x8000_0007, 0, [0, 0, 0, 0x100]),
            e(0x8000_0008, 0, [0x3027, 0x200, 0, 0]),
        ])
        .unwrap()
    }

    /// An AMD host (no VMX, SVM instead, the leaf 1 EDX aliases in 0x8000_0001 EDX).
    fn amd_host() -> CpuId {
        let [b, d, c] = vendor_regs(b"AuthenticAMD");
        CpuId::from_entries(&[
            e(0, 0, [0x10, b, c, d]),
            e(1, 0, [0x00a1_0f11, 0x0102_0800, 0xf6f8_3203, 0x178b_fbff]),
            e(7, 0, [0, 0x219c_07ab, 0x0040_069c, 0x2000_0010]),
            e(0xd, 0, [0x2e7, 0x980, 0x980, 0]),
            e(0x8000_0000, 0, [0x8000_0021, b, c, d]),
            e(0x8000_0001, 0, [0x00a1_0f11, 0, 0x0040_0397, 0x2fd3_fbff]),
            e(0x8000_0008, 0, [0x3030, 0x5002_0005, 0x7001, 0]),
            e(0x8000_001d, 0, [0x121, 0x01c0_003f, 0x3f, 0]),
            e(0x8000_0021, 0, [0x204, 0, 6, 0]),
        ])
        .unwrap()
    }

    fn reg(c: &CpuId, leaf: u32, sub: u32, r: Reg) -> u32 {
        get(c.as_slice(), word(leaf, sub, r))
    }

    fn has(c: &CpuId, name: &str) -> bool {
        let FeatureRef::Cpuid(i) = lookup_feature(name).unwrap() else {
            panic!("{name} is not a cpuid feature");
        };
        let f = &FEATURES[i];
        get(c.as_slice(), f.word) & f.mask == f.mask
    }

    fn brand(c: &CpuId) -> String {
        let mut bytes = Vec::new();
        for leaf in 0x8000_0002..=0x8000_0004 {
            for r in [Reg::Eax, Reg::Ebx, Reg::Ecx, Reg::Edx] {
                bytes.extend_from_slice(&reg(c, leaf, 0, r).to_le_bytes());
            }
        }
        let end = bytes.iter().position(|b| *b == 0).unwrap_or(bytes.len());
        String::from_utf8(bytes[..end].to_vec()).unwrap()
    }

    fn vendor(c: &CpuId) -> [u8; 12] {
        vendor_of(c.as_slice())
    }

    fn apply(spec: &str, host: &CpuId) -> CpuId {
        spec.parse::<CpuModel>().unwrap().apply(host).unwrap()
    }

    #[test]
    fn parses_kvm_unit_tests_options() {
        for spec in [
            "qemu64",
            "qemu64,+x2apic,+tsc-deadline",
            "qemu64,-pcid,-invpcid",
            "qemu64,+umip",
            "max",
            "max,+vmx",
            "max,+svm",
            "max,vendor=GenuineIntel",
            "max,host-phys-bits,+vmx",
            "host",
            "host,migratable=no",
            "kvm64,+rdtscp",
            "qemu64,+sse4_1,+tsc_deadline,lahf_lm=off,sse3=on",
            "qemu64,enforce,check=off,",
            "Opteron_G1,vendor=AuthenticAMD",
            "Skylake-Server,host-phys-bits,+vmx,+vmx-mbec",
            "max,host-phys-bits,+vmx,-vmx-mbec",
            "max,+svm,-npt",
            "host,hv_passthrough",
        ] {
            let m: CpuModel = spec.parse().unwrap();
            assert_eq!(m.to_string(), spec);
        }
        let m: CpuModel = "qemu64,x2apic=off,+x2apic,-pcid,pcid=on".parse().unwrap();
        assert_eq!(m.base(), BaseModel::Qemu64);
        let names: Vec<_> = m
            .features
            .iter()
            .map(|(i, on)| (FEATURES[*i].name, *on))
            .collect();
        // QEMU's order: feat=on|off as given, then +feat, then -feat.
        assert_eq!(
            names,
            vec![
                ("x2apic", false),
                ("pcid", true),
                ("x2apic", true),
                ("pcid", false)
            ]
        );
    }

    #[test]
    fn parse_errors_name_the_culprit() {
        let err = |s: &str| s.parse::<CpuModel>().unwrap_err().to_string();
        assert_eq!(err(""), "empty cpu model");
        assert_eq!(err(",+x2apic"), "empty cpu model");
        assert_eq!(err("pentium9"), "unknown cpu model: pentium9");
        assert_eq!(err("Qemu64"), "unknown cpu model: Qemu64");
        assert_eq!(err("qemu64,+foo"), "unknown cpu feature: foo");
        assert_eq!(err("qemu64,-"), "unknown cpu feature: ");
        assert_eq!(err("kvm64,hv_timer"), "unknown cpu feature: hv_timer");
        assert_eq!(err("max,+vmx-nothing"), "unknown cpu feature: vmx-nothing");
        assert_eq!(err("qemu64,phys-bits=36"), "unknown cpu feature: phys-bits");
        assert_eq!(err("max,vendor=Intel"), "invalid value for vendor: Intel");
        assert_eq!(err("max,vendor"), "invalid value for vendor: ");
        assert_eq!(
            err("qemu64,x2apic=maybe"),
            "invalid value for x2apic: maybe"
        );
        assert_eq!(err("qemu64,family=999"), "invalid value for family: 999");
        assert_eq!(err("qemu64,stepping=16"), "invalid value for stepping: 16");
        assert_eq!(err("qemu64,model=x"), "invalid value for model: x");
        assert_eq!(err("qemu64,model-id"), "invalid value for model-id: ");
        assert_eq!(err("qemu64,enforce=2"), "invalid value for enforce: 2");
    }

    #[test]
    fn qemu64_on_intel() {
        let host = intel_host();
        let c = apply("qemu64", &host);
        // Under KVM QEMU keeps the host's vendor.
        assert_eq!(&vendor(&c), b"GenuineIntel");
        assert_eq!(reg(&c, 0x8000_0000, 0, Reg::Ebx), reg(&c, 0, 0, Reg::Ebx));
        assert_eq!(reg(&c, 0, 0, Reg::Eax), 0xd);
        assert_eq!(reg(&c, 1, 0, Reg::Eax), 0x0006_0fb1);
        assert_eq!(decode_signature(0x0006_0fb1), (15, 107, 1));
        assert_eq!(reg(&c, 0x8000_0001, 0, Reg::Eax), 0x0006_0fb1);
        assert_eq!(reg(&c, 1, 0, Reg::Ebx), 0x0001_0800);
        assert_eq!(
            reg(&c, 1, 0, Reg::Ecx),
            (1 << 0) | (1 << 13) | (1 << 21) | (1 << 31)
        );
        assert_eq!(reg(&c, 1, 0, Reg::Edx), 0x078b_fbfd);
        assert_eq!(reg(&c, 1, 0, Reg::Edx), QEMU64_L1_EDX);
        for name in [
            "fpu",
            "de",
            "pse",
            "tsc",
            "msr",
            "pae",
            "mce",
            "cx8",
            "apic",
            "sep",
            "mtrr",
            "pge",
            "mca",
            "cmov",
            "pat",
            "pse36",
            "clflush",
            "mmx",
            "fxsr",
            "sse",
            "sse2",
            "pni",
            "cx16",
            "x2apic",
            "hypervisor",
            "lm",
            "syscall",
            "nx",
            "lahf-lm",
        ] {
            assert!(has(&c, name), "{name}");
        }
        for name in [
            "vme",
            "pcid",
            "vmx",
            "xsave",
            "avx",
            "tsc-deadline",
            "popcnt",
            "rdtscp",
        ] {
            assert!(!has(&c, name), "{name}");
        }
        assert_eq!(reg(&c, 6, 0, Reg::Eax), 0);
        for r in [Reg::Eax, Reg::Ebx, Reg::Ecx, Reg::Edx] {
            assert_eq!(reg(&c, 7, 0, r), 0);
            assert_eq!(reg(&c, 7, 1, r), 0);
            assert_eq!(reg(&c, 0xd, 0, r), 0, "no xsave, no leaf 0xd");
        }
        assert_eq!(reg(&c, 0x8000_0000, 0, Reg::Eax), 0x8000_000a);
        assert_eq!(reg(&c, 0x8000_0001, 0, Reg::Ecx), 1);
        assert_eq!(reg(&c, 0x8000_0001, 0, Reg::Edx), MODEL_E1_EDX);
        assert_eq!(reg(&c, 0x8000_0007, 0, Reg::Edx), 0);
        assert_eq!(reg(&c, 0x8000_0008, 0, Reg::Ebx), 0);
        assert_eq!(reg(&c, 0x8000_0008, 0, Reg::Eax), 0x3027);
        assert_eq!(brand(&c), "QEMU Virtual CPU version 2.5+");
        let leaves: Vec<_> = c.as_slice().iter().map(|e| (e.function, e.index)).collect();
        assert!(!leaves.contains(&(0x14, 0)) && !leaves.contains(&(0x1f, 0)));
        assert!(leaves.contains(&(0xb, 1)) && leaves.contains(&(0x8000_0006, 0)));
        // KVM's paravirtual leaves stay.
        assert_eq!(reg(&c, 0x4000_0001, 0, Reg::Eax), 0x0100_7efb);
        assert_eq!(reg(&c, 0x4000_0000, 0, Reg::Ebx), 0x4b4d_564b);
    }

    #[test]
    fn pcid_combinations() {
        let host = intel_host();
        let c = apply("qemu64,+pcid,+invpcid", &host);
        assert!(has(&c, "pcid") && has(&c, "invpcid"));
        assert_eq!(reg(&c, 7, 0, Reg::Ebx), 1 << 10);
        let c = apply("qemu64,-pcid,-invpcid", &host);
        assert!(!has(&c, "pcid") && !has(&c, "invpcid"));
        let c = apply("qemu64,-pcid,+invpcid", &host);
        assert!(!has(&c, "pcid") && has(&c, "invpcid"));
        // On host, -pcid removes what KVM offers.
        assert!(has(&apply("host", &host), "pcid"));
        let c = apply("host,-pcid,-invpcid", &host);
        assert!(!has(&c, "pcid") && !has(&c, "invpcid") && has(&c, "smep"));
    }

    #[test]
    fn minus_wins_and_assignments_come_first() {
        let host = intel_host();
        assert!(!has(&apply("qemu64,-x2apic,+x2apic", &host), "x2apic"));
        assert!(has(&apply("qemu64,x2apic=off,+x2apic", &host), "x2apic"));
        assert!(!has(&apply("qemu64,x2apic=off", &host), "x2apic"));
        assert!(!has(
            &apply("qemu64,+x2apic,x2apic=off,-x2apic", &host),
            "x2apic"
        ));
        assert!(has(&apply("qemu64,umip", &host), "umip"));
    }

    #[test]
    fn unsupported_features_stay_off() {
        let host = intel_host();
        // KVM_GET_SUPPORTED_CPUID does not report TSC deadline; supported_cpuid adds it.
        let c = apply("qemu64,+x2apic,+tsc-deadline", &host);
        assert!(has(&c, "x2apic") && !has(&c, "tsc-deadline"));
        let mut adjusted = host.clone();
        adjust_supported(&mut adjusted, true, true);
        assert!(has(
            &apply("qemu64,+x2apic,+tsc-deadline", &adjusted),
            "tsc-deadline"
        ));
        assert!(!has(&apply("qemu64", &adjusted), "tsc-deadline"));
        // SVM on an Intel host, VMX on an AMD one.
        assert!(!has(&apply("max,+svm", &host), "svm"));
        assert!(has(&apply("max,+vmx", &host), "vmx"));
        assert!(!has(&apply("max,+vmx", &amd_host()), "vmx"));
        // enforce turns the warning into an error naming the feature.
        let m: CpuModel = "qemu64,+tsc-deadline,enforce".parse().unwrap();
        assert!(m.enforce());
        assert_eq!(
            m.apply(&host).unwrap_err().to_string(),
            "host does not support cpu feature: tsc-deadline"
        );
        assert!(m.apply(&adjusted).is_ok());
    }

    #[test]
    fn host_and_max_keep_kvms_table() {
        let host = intel_host();
        for spec in ["host", "max", "host,migratable=no", "max,host-phys-bits"] {
            let c = apply(spec, &host);
            assert_eq!(c.as_slice().len(), host.as_slice().len());
            for (a, b) in c.as_slice().iter().zip(host.as_slice()) {
                assert_eq!((a.function, a.index), (b.function, b.index));
                if a.function == 1 {
                    assert_eq!(a.ecx, b.ecx | LEAF1_ECX_HYPERVISOR);
                    assert_eq!((a.eax, a.edx), (b.eax, b.edx));
                } else {
                    assert_eq!((a.eax, a.ebx, a.ecx, a.edx), (b.eax, b.ebx, b.ecx, b.edx));
                }
            }
        }
        assert_eq!(
            brand(&apply("host", &host)),
            "Intel(R) Xeon(R) Test CPU @ 2.00GHz"
        );
        // -hypervisor is honoured here (cpuid.rs sets it again per vCPU).
        assert!(!has(&apply("host,-hypervisor", &host), "hypervisor"));
    }

    #[test]
    fn vendor_and_signature_overrides() {
        let host = intel_host();
        let c = apply("max,vendor=AuthenticAMD", &host);
        assert_eq!(&vendor(&c), b"AuthenticAMD");
        assert_eq!(
            [
                reg(&c, 0x8000_0000, 0, Reg::Ebx),
                reg(&c, 0x8000_0000, 0, Reg::Edx),
                reg(&c, 0x8000_0000, 0, Reg::Ecx)
            ],
            vendor_regs(b"AuthenticAMD")
        );
        // AMD CPUs mirror leaf 1 EDX in 0x8000_0001 EDX.
        let l1 = reg(&c, 1, 0, Reg::Edx);
        let e1 = reg(&c, 0x8000_0001, 0, Reg::Edx);
        assert_eq!(e1 & AMD_ALIASES, l1 & AMD_ALIASES);
        assert_eq!(e1 & !AMD_ALIASES, 0x2c10_0800);
        let c = apply("qemu64,vendor=GenuineIntel", &amd_host());
        assert_eq!(&vendor(&c), b"GenuineIntel");
        assert_eq!(reg(&c, 0x8000_0001, 0, Reg::Edx), MODEL_E1_EDX);

        let c = apply("qemu64,family=6,model=0x55,stepping=4", &host);
        assert_eq!(reg(&c, 1, 0, Reg::Eax), 0x0005_0654);
        let c = apply("host,family=23,model=49", &host);
        assert_eq!(reg(&c, 1, 0, Reg::Eax), 0x0083_0f14);
        assert_eq!(decode_signature(0x0083_0f10), (0x17, 0x31, 0));
        assert_eq!(encode_signature(0x17, 0x31, 0), 0x0083_0f10);
        assert_eq!(decode_signature(0x00a1_0f11), (0x19, 0x11, 1));
        let c = apply("qemu64,model-id=Hop,,Hop CPU", &host);
        assert_eq!(brand(&c), "Hop,Hop CPU");
        let long = "x".repeat(60);
        let c = apply(&format!("host,model-id={long}"), &host);
        assert_eq!(brand(&c), "x".repeat(47));
    }

    #[test]
    fn qemu64_on_amd() {
        let c = apply("qemu64", &amd_host());
        assert_eq!(&vendor(&c), b"AuthenticAMD");
        assert_eq!(reg(&c, 0x8000_0000, 0, Reg::Eax), 0x8000_000a);
        assert_eq!(
            reg(&c, 0x8000_0001, 0, Reg::Edx),
            MODEL_E1_EDX | (QEMU64_L1_EDX & AMD_ALIASES)
        );
        assert!(!has(&c, "svm"), "svm is off under kvm");
        let leaves: Vec<_> = c.as_slice().iter().map(|e| e.function).collect();
        assert!(!leaves.contains(&0x8000_001d) && !leaves.contains(&0x8000_0021));
        assert_eq!(brand(&c), "QEMU Virtual CPU version 2.5+");
        // Brand leaves are added when KVM's table has none.
        assert!(leaves.contains(&0x8000_0002));
    }

    #[test]
    fn opteron_g1_as_the_syscall_test_asks() {
        let c = apply("Opteron_G1,vendor=AuthenticAMD", &intel_host());
        assert_eq!(&vendor(&c), b"AuthenticAMD");
        assert_eq!(reg(&c, 0, 0, Reg::Eax), 5);
        assert_eq!(reg(&c, 0x8000_0000, 0, Reg::Eax), 0x8000_0008);
        assert_eq!(reg(&c, 1, 0, Reg::Eax), encode_signature(15, 6, 1));
        assert!(has(&c, "sse3") && has(&c, "vme") && has(&c, "x2apic") && has(&c, "lm"));
        assert!(!has(&c, "cx16") && !has(&c, "pcid") && !has(&c, "rdtscp"));
        // AMD: the leaf 1 EDX aliases in 0x8000_0001 EDX.
        assert!(has(&c, "syscall") && has(&c, "nx"));
        assert_ne!(reg(&c, 0x8000_0001, 0, Reg::Edx) & 1, 0, "fpu alias");
        assert!(!c
            .as_slice()
            .iter()
            .any(|e| e.function == 7 || e.function == 0xd));
        assert_eq!(brand(&c), "AMD Opteron 240 (Gen 1 Class Opteron)");
        // A leaf-7 feature raises the level to 7.
        let c = apply("Opteron_G1,+smep", &intel_host());
        assert_eq!(reg(&c, 0, 0, Reg::Eax), 7);
        assert!(has(&c, "smep"));
    }

    #[test]
    fn skylake_server() {
        let c = apply(
            "Skylake-Server,host-phys-bits,+vmx,+vmx-mbec",
            &intel_host(),
        );
        assert_eq!(reg(&c, 1, 0, Reg::Eax), encode_signature(6, 85, 4));
        assert_eq!(brand(&c), "Intel Xeon Processor (Skylake)");
        for f in ["avx", "xsave", "pcid", "movbe", "smep", "invpcid", "vmx"] {
            assert!(has(&c, f), "{f}");
        }
        assert!(has(&c, "avx512f") && has(&c, "pku"));
        // The host's, not the model's: off.
        for f in ["umip", "rdpid", "md-clear"] {
            assert!(!has(&c, f), "{f}");
        }
        assert!(has(&c, "pdpe1gb") && has(&c, "lm") && !has(&c, "svm"));
        assert_eq!(reg(&c, 0x8000_0000, 0, Reg::Eax), 0x8000_0008);
    }

    /// As QEMU's filtered features: a model feature the host lacks is unavailable unless
    /// the command line turns it off (libvirt's `qemu64,pni=off` on a host without SSE3).
    #[test]
    fn unavailable_features_leave_out_what_is_turned_off() {
        let mut entries = amd_host().as_slice().to_vec();
        for e in entries.iter_mut().filter(|e| e.function == 1) {
            e.ecx &= !1; // no SSE3
        }
        let host = CpuId::from_entries(&entries).unwrap();
        let m = |s: &str| s.parse::<CpuModel>().unwrap().unavailable_features(&host);
        assert!(m("qemu64").contains(&"pni"));
        assert!(!m("qemu64,svm=off,pni=off").contains(&"pni"));
        assert!(!m("qemu64,-pni").contains(&"pni"));
        // As in QEMU, `+feat` wins over `feat=off` wherever it stands.
        assert!(m("qemu64,pni=off,+pni").contains(&"pni"));
        assert!(m("qemu64,+pni,pni=off").contains(&"pni"));
    }

    #[test]
    fn svm_features() {
        let mut entries = amd_host().as_slice().to_vec();
        entries.push(e(0x8000_000a, 0, [1, 0x8000, 0, 0x1_3cff]));
        let host = CpuId::from_entries(&entries).unwrap();
        let c = apply("max,+svm,-npt", &host);
        assert!(has(&c, "svm") && !has(&c, "npt") && has(&c, "nrip-save"));
        let c = apply("qemu64,+svm,+npt", &host);
        assert!(has(&c, "svm") && has(&c, "npt") && !has(&c, "nrip-save"));
        assert_eq!(reg(&c, 0x8000_0000, 0, Reg::Eax), 0x8000_000a);
        // The Intel host has no SVM: asked for, left off.
        let c = apply("max,+svm,-npt", &intel_host());
        assert!(!has(&c, "svm") && !has(&c, "npt"));
    }

    #[test]
    fn vmx_capability_msrs() {
        // IA32_VMX_PROCBASED_CTLS2 (0x48b): MBEC (bit 22) and EPT (bit 1) allowed.
        let kvm = |msr: u32| match msr {
            0x48b => Some(((1u64 << 22) | (1 << 1)) << 32),
            0x482 | 0x48e => Some(0xfff9_fffe_0401_e172),
            _ => None,
        };
        let host = intel_host();
        let m: CpuModel = "max,+vmx,-vmx-mbec,-vmx-hlt-exit,+vmx-ept".parse().unwrap();
        let msrs = m.vmx_msrs(&apply("max,+vmx", &host), kvm).unwrap();
        assert!(msrs.contains(&(0x48b, 1 << 33)), "{msrs:x?}");
        let proc = 0xfff9_fffe_0401_e172u64 & !(1 << (32 + 7));
        assert!(msrs.contains(&(0x482, proc)) && msrs.contains(&(0x48e, proc)));
        // Without VMX in the guest's CPUID, nothing to set.
        let m: CpuModel = "max,-vmx,-vmx-mbec".parse().unwrap();
        assert!(m
            .vmx_msrs(&apply("max,-vmx", &host), kvm)
            .unwrap()
            .is_empty());
        // Asked for but not offered: an error only with enforce.
        let m: CpuModel = "max,+vmx,+vmx-pml".parse().unwrap();
        assert!(m.vmx_msrs(&apply("max", &host), kvm).unwrap().is_empty());
        let m: CpuModel = "max,+vmx,+vmx-pml,enforce".parse().unwrap();
        assert!(m.vmx_msrs(&apply("max", &host), kvm).is_err());
    }

    #[test]
    fn hyperv_options() {
        let m: CpuModel = "host,hv_passthrough".parse().unwrap();
        assert!(m.check_hyperv(false).is_ok(), "nothing to pass through");
        assert!(matches!(
            m.check_hyperv(true),
            Err(CpuModelError::HypervUnimplemented(_))
        ));
        let m: CpuModel = "qemu64,hv-time,hv_spinlocks=0x1fff,+hv-relaxed"
            .parse()
            .unwrap();
        assert_eq!(m.hyperv, ["hv-time", "hv_spinlocks=0x1fff", "hv-relaxed"]);
        assert!(matches!(
            m.check_hyperv(false),
            Err(CpuModelError::NoHyperv(_))
        ));
        let m: CpuModel = "qemu64,hv-time=off".parse().unwrap();
        assert!(m.check_hyperv(false).is_ok());
        let m: CpuModel = "qemu64".parse().unwrap();
        assert!(m.check_hyperv(false).is_ok() && m.check_hyperv(true).is_ok());
    }

    #[test]
    fn kvm64() {
        let host = intel_host();
        let c = apply("kvm64,+rdtscp", &host);
        assert_eq!(&vendor(&c), b"GenuineIntel");
        assert_eq!(reg(&c, 1, 0, Reg::Eax), 0x0000_0f61);
        assert_eq!(reg(&c, 0x8000_0000, 0, Reg::Eax), 0x8000_0008);
        assert!(has(&c, "vme") && has(&c, "rdtscp") && !has(&c, "lahf-lm"));
        assert_eq!(brand(&c), "Common KVM processor");
    }

    #[test]
    fn leaf7_subleaves_and_xsave() {
        let host = intel_host();
        let c = apply("qemu64,+avx-vnni", &host);
        assert!(has(&c, "avx-vnni"));
        assert_eq!(reg(&c, 7, 0, Reg::Eax), 1);
        let c = apply("qemu64,+xsave,+xsaveopt", &host);
        assert_eq!(reg(&c, 0xd, 0, Reg::Eax), 0x2e7);
        assert_eq!(reg(&c, 0xd, 1, Reg::Eax), 1);
        let c = apply("host,-xsave", &host);
        assert_eq!(reg(&c, 0xd, 0, Reg::Eax), 0);
    }

    #[test]
    fn arch_capabilities_needs_the_msr() {
        let mut c = intel_host();
        adjust_supported(&mut c, false, true);
        assert!(has(&c, "arch-capabilities") && has(&c, "hypervisor"));
        adjust_supported(&mut c, false, false);
        assert!(!has(&c, "arch-capabilities"));
        assert!(!has(&apply("qemu64", &intel_host()), "arch-capabilities"));
        assert!(has(
            &apply("qemu64,+arch-capabilities", &intel_host()),
            "arch-capabilities"
        ));
    }

    #[test]
    fn empty_table_does_not_panic() {
        let empty = CpuId::new(0).unwrap();
        for spec in [
            "qemu64,+x2apic",
            "host,vendor=GenuineIntel,family=6",
            "kvm64",
        ] {
            let c = apply(spec, &empty);
            assert!(!c.as_slice().is_empty());
        }
    }

    /// The models against the real KVM: KVM must accept every table.
    #[test]
    fn kvm_accepts_models() {
        let Ok(kvm) = Kvm::new() else {
            return;
        };
        let arch_caps = arch_capabilities_msr(&kvm);
        let supported = supported_cpuid(&kvm, arch_caps).unwrap();
        assert!(has(&supported, "hypervisor"));
        assert_eq!(
            has(&supported, "tsc-deadline"),
            kvm.check_extension(Cap::TscDeadlineTimer)
        );
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        for (id, spec) in [
            "qemu64",
            "qemu64,+x2apic,+tsc-deadline",
            "qemu64,+pcid,+invpcid,+umip",
            "kvm64,+rdtscp",
            "max,vendor=GenuineIntel",
            "host",
            "Opteron_G1,vendor=AuthenticAMD",
            "Skylake-Server,host-phys-bits,+vmx,+vmx-mbec",
            "max,+svm,-npt",
        ]
        .into_iter()
        .enumerate()
        {
            let cpuid = apply(spec, &supported);
            let vcpu = vm.create_vcpu(id as u64).unwrap();
            let hide = must_hide_arch_capabilities(&vcpu, &cpuid, arch_caps);
            if !has(&cpuid, "arch-capabilities") {
                assert!(!hide);
            } else if !hide {
                let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
                    index: MSR_IA32_ARCH_CAPABILITIES,
                    ..Default::default()
                }])
                .unwrap();
                assert_eq!(vcpu.get_msrs(&mut msrs).unwrap(), 1);
                assert_eq!(Some(msrs.as_slice()[0].data), arch_caps);
            }
            vcpu.set_cpuid2(&cpuid)
                .unwrap_or_else(|e| panic!("{spec}: {e}"));
        }
    }
}
