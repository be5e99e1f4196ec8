//! Saving and restoring KVM's vCPU and VM state on the real KVM: a state saved from one VM,
//! restored into a fresh one and saved again must come back equal (lossless round trip), and
//! damaged encodings must be rejected with an error, never a panic.
//!
//! No guest code runs: the vCPUs are only created, given distinctive state through the
//! module's own restore path, and saved.

use std::os::raw::c_char;

use kvm_bindings::{
    kvm_fpu, kvm_lapic_state, kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vmm::arch::cpuid::{vcpu_cpuid, CpuidOptions};
use vmm::arch::regs::{self, EntryMode};
use vmm::kvm_state::{
    restore_vcpu, restore_vm, save_vcpu, save_vm, FpuState, KvmStateError, MsrValue, SavedMsrs,
    VcpuState, VmState, MAX_VCPU_STATE_BYTES, VCPU_STATE_VERSION, VM_STATE_VERSION,
};
use vmm::memory::{self, GuestMemoryMmap, Layout};

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_CR_PAT: u32 = 0x277;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

const APIC_TPR: usize = 0x80;
const APIC_LDR: usize = 0xd0;
const APIC_SPIV: usize = 0xf0;
const APIC_LVTT: usize = 0x320;
const APIC_LVT0: usize = 0x350;
const APIC_TMCCT: usize = 0x390;
/// LVT timer mode field, TSC-deadline mode.
const APIC_LVT_TIMER_TSCDEADLINE: u32 = 2 << 17;

const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const CR4_OSXSAVE: u64 = 1 << 18;
const EFER_SCE: u64 = 1;

/// A bare VM as hopvm builds one (irqchip, PIT, 2 MiB of RAM with boot tables, vCPUs with
/// hopvm's CPUID), without devices or threads. Fields drop in order: vCPUs, then the VM, then
/// its memory.
struct TestVm {
    vcpus: Vec<VcpuFd>,
    vm: VmFd,
    msrs: SavedMsrs,
    _memory: GuestMemoryMmap,
    _kvm: Kvm,
}

fn test_vm(cpus: u8) -> TestVm {
    test_vm_with_pit(cpus, true)
}

fn test_vm_with_pit(cpus: u8, pit: bool) -> TestVm {
    let kvm = Kvm::new().expect("open /dev/kvm");
    let vm = kvm.create_vm().unwrap();
    vm.set_tss_address(0xfffb_d000).unwrap();
    vm.set_identity_map_address(0xfffb_c000).unwrap();
    let memory = memory::create_guest_memory(&Layout::new(2 << 20)).unwrap();
    memory::set_kvm_slots(&vm, &memory, false).unwrap();
    regs::write_boot_tables(&memory, EntryMode::Long64).unwrap();
    vm.create_irq_chip().unwrap();
    if pit {
        vm.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .unwrap();
    }
    let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
    let opts = CpuidOptions {
        cpus,
        hide_arch_capabilities: false,
    };
    let vcpus: Vec<VcpuFd> = (0..cpus)
        .map(|id| {
            let vcpu = vm.create_vcpu(u64::from(id)).unwrap();
            vcpu.set_cpuid2(&vcpu_cpuid(&supported, id, &opts)).unwrap();
            vcpu
        })
        .collect();
    let msrs = SavedMsrs::probe(&kvm, &vm, &vcpus[0]).unwrap();
    TestVm {
        vcpus,
        vm,
        msrs,
        _memory: memory,
        _kvm: kvm,
    }
}

fn lapic_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let b = &lapic.regs[offset..offset + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_lapic_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (dst, src) in lapic.regs[offset..offset + 4]
        .iter_mut()
        .zip(value.to_le_bytes())
    {
        *dst = src as c_char;
    }
}

fn msr(state: &VcpuState, index: u32) -> Option<u64> {
    state.msrs.iter().find(|m| m.index == index).map(|m| m.data)
}

fn set_msr(state: &mut VcpuState, index: u32, data: u64) {
    let entry = state
        .msrs
        .iter_mut()
        .find(|m| m.index == index)
        .unwrap_or_else(|| panic!("msr {index:#x} is not saved on this host"));
    entry.data = data;
}

/// Puts distinctive values into every part of a vCPU's state.
fn customise_vcpu(state: &mut VcpuState, msrs: &SavedMsrs, seed: u64) {
    let r = &mut state.regs;
    let mut v = 0x0101_0101_0101_0101u64.wrapping_mul(seed + 1);
    for reg in [
        &mut r.rax, &mut r.rbx, &mut r.rcx, &mut r.rdx, &mut r.rsi, &mut r.rdi, &mut r.rsp,
        &mut r.rbp, &mut r.r8, &mut r.r9, &mut r.r10, &mut r.r11, &mut r.r12, &mut r.r13,
        &mut r.r14, &mut r.r15,
    ] {
        v = v
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *reg = v;
    }
    r.rip = 0x10_0000 + seed * 0x10;
    // IF, ZF, PF, CF and the always-one bit 1.
    r.rflags = 0x247;

    // 64-bit mode on hopvm's boot GDT and identity map, with SSE and XSAVE enabled.
    state.sregs = regs::entry_sregs(state.sregs, EntryMode::Long64);
    state.sregs.cr4 |= CR4_OSFXSR | CR4_OSXMMEXCPT | CR4_OSXSAVE;
    state.sregs.efer |= EFER_SCE;
    state.sregs.cr2 = 0xdead_b000 + seed;
    assert_eq!(state.sregs.cr3, regs::PML4_ADDR);

    match &mut state.fpu {
        FpuState::Xsave(area) => {
            // XMM0 in the legacy area (bytes 160..176), and XSTATE_BV (byte 512) marking the
            // SSE component as not in its init state.
            for (i, b) in area[160..176].iter_mut().enumerate() {
                *b = 0xa0 + i as u8 + seed as u8;
            }
            area[512] |= 0x3;
        }
        FpuState::Fpu(fpu) => {
            fpu.xmm[0] = [0xa0 + seed as u8; 16];
        }
    }
    if let Some(xcrs) = &mut state.xcrs {
        // x87 | SSE | AVX.
        xcrs.xcrs[0].value = 0x7;
    }
    if let Some(dr) = &mut state.debugregs {
        dr.db = [0x1000 + seed, 0x2000, 0x3000, 0x4000];
        // L0 and G1 enabled, bit 10 reads as one.
        dr.dr7 = 0x409;
    }

    // The LAPIC: enabled, TPR, logical ID, ExtINT on LINT0, and the timer in TSC-deadline mode
    // (when the host has it) so that the TSC_DEADLINE MSR below is kept.
    let l = &mut state.lapic;
    set_lapic_reg(l, APIC_SPIV, 0x1ff);
    set_lapic_reg(l, APIC_TPR, 0x20 + seed as u32);
    set_lapic_reg(l, APIC_LDR, 1 << (24 + seed));
    set_lapic_reg(l, APIC_LVT0, 0x700);
    let tsc_deadline =
        msrs.caps().tsc_deadline_timer && msrs.indices().contains(&MSR_IA32_TSC_DEADLINE);
    if tsc_deadline {
        set_lapic_reg(l, APIC_LVTT, APIC_LVT_TIMER_TSCDEADLINE | 0xec);
    }

    set_msr(state, MSR_IA32_SYSENTER_EIP, 0xffff_ffff_8100_0000 + seed);
    set_msr(
        state,
        MSR_KERNEL_GS_BASE,
        0xffff_8880_0000_0000 + (seed << 12),
    );
    set_msr(state, MSR_LSTAR, 0xffff_ffff_8180_0000 + seed);
    // WB, WC, UC-, UC / WB, WT, UC-, UC.
    set_msr(state, MSR_IA32_CR_PAT, 0x0007_0401_0007_0406);
    if msrs.indices().contains(&MSR_MTRR_DEF_TYPE) {
        set_msr(state, MSR_MTRR_DEF_TYPE, (1 << 11) | 6);
    }
    let tsc = TSC_VALUE + (seed << 32);
    let current = msr(state, MSR_IA32_TSC).unwrap();
    set_msr(state, MSR_IA32_TSC, tsc);
    if tsc_deadline {
        // Some 7 minutes ahead at 2.6 GHz, whether KVM takes the TSC written above or keeps
        // the host's (see `tsc_is_restored`): it never fires during the test.
        set_msr(state, MSR_IA32_TSC_DEADLINE, tsc.max(current) + (1 << 40));
    }

    if let Some(ev) = &mut state.vcpu_events {
        // A #UD being injected (lost if REGS were restored after VCPU_EVENTS), NMIs masked,
        // and a MOV SS interrupt shadow.
        ev.exception.injected = 1;
        ev.exception.nr = 6;
        ev.nmi.masked = 1;
        ev.interrupt.shadow = 1;
    }
}

/// The guest TSC the test writes to vCPU 0 (vCPU n gets n << 32 more).
const TSC_VALUE: u64 = 0x1234_5678_9abc;

/// Whether KVM applied a host-initiated TSC write: it reports success but ignores it on some
/// hosts (PVM, where the guest reads the host's TSC), and the TSC then keeps the host's value.
fn tsc_is_restored(written: u64, read: u64) -> bool {
    (written..written + 60 * 5_000_000_000).contains(&read)
}

/// Makes `later` comparable with `earlier` where time legitimately moved between the saves.
fn normalise_vcpu(earlier: &VcpuState, later: &mut VcpuState) {
    // The TSC runs: it was restored to the earlier value and has advanced since. Accept up to
    // a minute of it (at 5 GHz at most).
    let (t0, t1) = (
        msr(earlier, MSR_IA32_TSC).unwrap(),
        msr(later, MSR_IA32_TSC).unwrap(),
    );
    assert!(t1 >= t0, "tsc went backwards: {t0:#x} -> {t1:#x}");
    assert!(
        t1 - t0 < 60 * 5_000_000_000,
        "tsc jumped: {t0:#x} -> {t1:#x}"
    );
    set_msr(later, MSR_IA32_TSC, t0);
    // KVM_GET_LAPIC computes the timer's current count at the time of the call.
    let tmcct = lapic_reg(&earlier.lapic, APIC_TMCCT);
    set_lapic_reg(&mut later.lapic, APIC_TMCCT, tmcct);
}

fn save_all(vm: &TestVm) -> Vec<VcpuState> {
    vm.vcpus
        .iter()
        .map(|v| save_vcpu(v, &vm.msrs).unwrap())
        .collect()
}

#[test]
fn host_capabilities() {
    let vm = test_vm(1);
    let caps = vm.msrs.caps();
    eprintln!("kvm caps: {caps:#?}");
    eprintln!(
        "{} msrs saved: {:x?}",
        vm.msrs.indices().len(),
        vm.msrs.indices()
    );
    let ix = vm.msrs.indices();
    assert_eq!(
        ix.first(),
        Some(&MSR_IA32_TSC),
        "tsc must be restored first"
    );
    if ix.contains(&MSR_IA32_TSC_DEADLINE) {
        assert_eq!(ix.last(), Some(&MSR_IA32_TSC_DEADLINE), "tsc deadline last");
    }
    for index in [
        MSR_IA32_SYSENTER_EIP,
        MSR_KERNEL_GS_BASE,
        MSR_LSTAR,
        MSR_IA32_CR_PAT,
    ] {
        assert!(ix.contains(&index), "msr {index:#x} not saved");
    }
}

#[test]
fn vcpu_state_round_trips_into_a_fresh_vm() {
    let src = test_vm(2);
    // Distinctive state, applied through restore_vcpu itself (its ordering makes the TSC
    // deadline and the injected exception stick).
    for (i, vcpu) in src.vcpus.iter().enumerate() {
        let mut state = save_vcpu(vcpu, &src.msrs).unwrap();
        customise_vcpu(&mut state, &src.msrs, i as u64);
        restore_vcpu(vcpu, &state).unwrap();
    }
    let saved = save_all(&src);

    // The values took.
    let s0 = &saved[0];
    assert_eq!(s0.regs.rflags, 0x247);
    assert_eq!(s0.regs.rip, 0x10_0000);
    assert_eq!(s0.sregs.cr3, regs::PML4_ADDR);
    assert_ne!(s0.sregs.cr4 & CR4_OSXSAVE, 0);
    assert_eq!(msr(s0, MSR_IA32_SYSENTER_EIP), Some(0xffff_ffff_8100_0000));
    assert_eq!(msr(s0, MSR_KERNEL_GS_BASE), Some(0xffff_8880_0000_0000));
    assert_eq!(lapic_reg(&s0.lapic, APIC_TPR), 0x20);
    assert_eq!(lapic_reg(&saved[1].lapic, APIC_TPR), 0x21);
    let tsc = msr(s0, MSR_IA32_TSC).unwrap();
    if !tsc_is_restored(TSC_VALUE, tsc) {
        eprintln!("kvm ignores host-initiated tsc writes here: tsc reads {tsc:#x}");
    }
    if src.msrs.caps().tsc_deadline_timer {
        assert_eq!(
            lapic_reg(&s0.lapic, APIC_LVTT),
            APIC_LVT_TIMER_TSCDEADLINE | 0xec
        );
        // Armed, in the future: KVM reads 0 once it fired or if the LVT timer was not in
        // TSC-deadline mode when the MSR was written.
        let deadline = msr(s0, MSR_IA32_TSC_DEADLINE).unwrap();
        assert!(deadline > tsc, "deadline {deadline:#x}, tsc {tsc:#x}");
    }
    if let Some(ev) = &s0.vcpu_events {
        assert_eq!((ev.exception.injected, ev.exception.nr), (1, 6));
        assert_eq!(ev.nmi.masked, 1);
    }
    if let Some(xcrs) = &s0.xcrs {
        assert_eq!(xcrs.xcrs[0].value, 0x7);
    }
    match &s0.fpu {
        FpuState::Xsave(area) => assert_eq!(area[160], 0xa0),
        FpuState::Fpu(fpu) => assert_eq!(fpu.xmm[0][0], 0xa0),
    }
    // The application processor is still waiting for INIT / SIPI.
    assert_ne!(saved[1].mp_state, s0.mp_state);

    // Through the encoding, into a fresh VM, and saved again.
    let dst = test_vm(2);
    for (vcpu, state) in dst.vcpus.iter().zip(&saved) {
        let bytes = state.to_bytes().unwrap();
        let decoded = VcpuState::from_bytes(&bytes, VCPU_STATE_VERSION).unwrap();
        assert_eq!(&decoded, state);
        restore_vcpu(vcpu, &decoded).unwrap();
    }
    let mut again = save_all(&dst);
    for (earlier, later) in saved.iter().zip(again.iter_mut()) {
        normalise_vcpu(earlier, later);
        assert_eq!(earlier, later);
    }
}

#[test]
fn vm_state_without_a_pit() {
    let src = test_vm_with_pit(1, false);
    let state = save_vm(&src.vm).unwrap();
    assert_eq!(state.pit, None);
    let decoded = VmState::from_bytes(&state.to_bytes().unwrap(), VM_STATE_VERSION).unwrap();
    assert_eq!(decoded, state);
    restore_vm(&test_vm_with_pit(1, false).vm, &decoded).unwrap();
    // A PIT on one side only is a different machine: refused either way.
    assert!(matches!(
        restore_vm(&test_vm(1).vm, &decoded),
        Err(KvmStateError::NoPit)
    ));
    let with_pit = save_vm(&test_vm(1).vm).unwrap();
    assert!(restore_vm(&src.vm, &with_pit).is_err());
}

#[test]
fn vm_state_round_trips_into_a_fresh_vm() {
    let src = test_vm(1);
    let mut state = save_vm(&src.vm).unwrap();
    // Channel 2 (the speaker's, which raises no interrupt) reprogrammed; channel 0 stays off
    // so no PIT interrupt changes the PIC / IOAPIC between the saves.
    let pit = state.pit.as_mut().expect("a pit");
    pit.channels[2].count = 0x1234;
    pit.channels[2].mode = 2;
    pit.channels[2].rw_mode = 3;
    state.pic_master.irq_base = 0x20;
    state.pic_master.imr = 0xfa;
    state.pic_slave.irq_base = 0x28;
    state.pic_slave.imr = 0xbf;
    // IOAPIC pin 4: vector 0x31, masked, to APIC 1.
    let entry = 0x0100_0000_0001_0031;
    state.ioapic.set_redirection(4, entry);
    if let Some(clock) = &mut state.clock {
        clock.clock = 0x1234_5678_9000;
    }
    restore_vm(&src.vm, &state).unwrap();
    let saved = save_vm(&src.vm).unwrap();
    assert_eq!(saved.pit.as_ref().unwrap().channels[2].count, 0x1234);
    assert_eq!(saved.pic_master.imr, 0xfa);
    assert_eq!(saved.ioapic.redirection(4), Some(entry));
    if let Some(clock) = &saved.clock {
        assert!(clock.clock >= 0x1234_5678_9000);
    }

    let dst = test_vm(1);
    let bytes = saved.to_bytes().unwrap();
    let decoded = VmState::from_bytes(&bytes, VM_STATE_VERSION).unwrap();
    assert_eq!(decoded, saved);
    restore_vm(&dst.vm, &decoded).unwrap();
    let mut again = save_vm(&dst.vm).unwrap();
    // KVM_SET_PIT2 stamps each channel with the load time (host nanoseconds) of its count.
    let (saved_pit, again_pit) = (saved.pit.as_ref().unwrap(), again.pit.as_mut().unwrap());
    for (e, l) in saved_pit.channels.iter().zip(again_pit.channels.iter_mut()) {
        l.count_load_time = e.count_load_time;
    }
    // kvmclock continues from the restored value; its other fields describe the host clock
    // at the time of the read.
    if let (Some(e), Some(l)) = (&saved.clock, &mut again.clock) {
        assert!(l.clock >= e.clock, "kvmclock went backwards");
        assert!(l.clock - e.clock < 60_000_000_000, "kvmclock jumped");
        *l = *e;
    }
    assert_eq!(saved, again);
}

#[test]
fn restore_names_the_msr_kvm_refuses() {
    let vm = test_vm(1);
    let mut state = save_vcpu(&vm.vcpus[0], &vm.msrs).unwrap();
    state.msrs.push(MsrValue {
        index: 0xdead_beef,
        data: 1,
    });
    let err = restore_vcpu(&vm.vcpus[0], &state).unwrap_err();
    assert!(
        matches!(err, KvmStateError::MsrSet(0xdead_beef)),
        "unexpected error {err}"
    );
    assert!(err.to_string().contains("0xdeadbeef"), "{err}");
}

/// A state built without KVM, for the decoding tests.
fn synthetic_vcpu_state() -> VcpuState {
    VcpuState {
        mp_state: Default::default(),
        regs: Default::default(),
        sregs: Default::default(),
        fpu: FpuState::Xsave(vec![0x5a; 4096]),
        xcrs: Some(Default::default()),
        debugregs: None,
        lapic: Default::default(),
        msrs: vec![MsrValue {
            index: MSR_IA32_TSC,
            data: 42,
        }],
        vcpu_events: Some(Default::default()),
        tsc_khz: Some(2_000_000),
    }
}

/// A small deterministic generator for garbage.
fn lcg(seed: &mut u64) -> u8 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (*seed >> 33) as u8
}

#[test]
fn damaged_encodings_are_rejected_without_panicking() {
    let state = synthetic_vcpu_state();
    let good = state.to_bytes().unwrap();
    assert_eq!(
        VcpuState::from_bytes(&good, VCPU_STATE_VERSION).unwrap(),
        state
    );
    let text = String::from_utf8(good.clone()).unwrap();

    // Damage at every byte of the JSON structure, and at every 31st byte inside the long byte
    // arrays (all positions would take seconds in a debug build).
    let positions: Vec<usize> = (0..good.len())
        .filter(|&i| i % 31 == 0 || !(good[i].is_ascii_digit() || good[i] == b','))
        .collect();
    // Truncations.
    for &cut in &positions {
        assert!(VcpuState::from_bytes(&good[..cut], VCPU_STATE_VERSION).is_err());
    }
    // Single-byte damage: an error, or (a digit of a number changed) a state that still
    // validates; never a panic.
    let mut seed = 1;
    for &pos in &positions {
        let mut bad = good.clone();
        bad[pos] = lcg(&mut seed);
        if let Ok(s) = VcpuState::from_bytes(&bad, VCPU_STATE_VERSION) {
            s.validate().unwrap();
        }
    }
    // Garbage.
    for len in [0, 1, 7, 100, 5000] {
        let junk: Vec<u8> = (0..len).map(|_| lcg(&mut seed)).collect();
        assert!(VcpuState::from_bytes(&junk, VCPU_STATE_VERSION).is_err());
        assert!(VmState::from_bytes(&junk, VM_STATE_VERSION).is_err());
    }

    let rejects = |json: &str| {
        let r = VcpuState::from_bytes(json.as_bytes(), VCPU_STATE_VERSION);
        assert!(r.is_err(), "accepted: {}", &json[..json.len().min(200)]);
        r.unwrap_err()
    };
    // `n` bytes of value `b` as a JSON array.
    let bytes = |b: &str, n: usize| format!("[{}]", vec![b; n].join(","));
    let lapic = format!("\"lapic\":{}", bytes("0", 1024));
    assert!(text.contains(&lapic));
    // A struct one byte short, one byte long, with a value that is no byte, or in the hex
    // string of encoding version 1.
    let with_lapic = |v: String| text.replacen(&lapic, &format!("\"lapic\":{v}"), 1);
    rejects(&with_lapic(bytes("0", 1023)));
    rejects(&with_lapic(bytes("0", 1025)));
    rejects(&with_lapic(format!("[256{}", &bytes("0", 1023)[1..])));
    rejects(&with_lapic(format!("[-1{}", &bytes("0", 1023)[1..])));
    rejects(&with_lapic(format!("[\"zz\"{}", &bytes("0", 1023)[1..])));
    rejects(&with_lapic(format!("\"{}\"", "00".repeat(1024))));
    // An XSAVE area that is too small, or not whole words.
    let area = bytes("90", 4096);
    assert!(text.contains(&area));
    rejects(&text.replacen(&area, &bytes("90", 4095), 1));
    rejects(&text.replacen(&area, &bytes("90", 4098), 1));
    // Unknown and missing fields, wrong types.
    rejects(&text.replacen("\"tsc_khz\"", "\"tsc_hz\"", 1));
    rejects(&text.replacen(
        "\"msrs\":[",
        "\"msrs\":[{\"index\":1,\"data\":2,\"x\":3},",
        1,
    ));
    rejects(&text.replacen("\"index\":16", "\"index\":-16", 1));
    rejects(&text.replacen("\"data\":42", "\"data\":1e400", 1));
    rejects("{}");
    rejects("null");
    rejects("[]");
    // Too many MSRs.
    let mut many = state.clone();
    many.msrs = vec![MsrValue { index: 1, data: 1 }; 5000];
    rejects(std::str::from_utf8(&many.to_bytes().unwrap()).unwrap());
    // Deep nesting is refused by serde_json's recursion limit, not a stack overflow.
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    rejects(&deep);

    // Oversized input is refused before parsing; unknown versions are refused.
    let huge = vec![b' '; MAX_VCPU_STATE_BYTES + 1];
    assert!(matches!(
        VcpuState::from_bytes(&huge, VCPU_STATE_VERSION),
        Err(KvmStateError::TooLarge { .. })
    ));
    assert!(matches!(
        VcpuState::from_bytes(&good, VCPU_STATE_VERSION + 1),
        Err(KvmStateError::Version { version, .. }) if version == VCPU_STATE_VERSION + 1
    ));
    assert!(matches!(
        VmState::from_bytes(b"{}", 0),
        Err(KvmStateError::Version { .. })
    ));

    // The legacy FPU form decodes with its exact size too.
    let mut legacy = state.clone();
    legacy.fpu = FpuState::Fpu(kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    });
    let bytes = legacy.to_bytes().unwrap();
    assert_eq!(
        VcpuState::from_bytes(&bytes, VCPU_STATE_VERSION).unwrap(),
        legacy
    );
    let text = String::from_utf8(bytes).unwrap();
    // One byte short of a register.
    let fpr = "\"fpu\":{\"fpu\":{\"fpr\":[[0,0,";
    assert!(text.contains(fpr));
    rejects(&text.replacen(fpr, "\"fpu\":{\"fpu\":{\"fpr\":[[0,", 1));
}

#[test]
fn damaged_vm_state_is_rejected() {
    let vm = test_vm(1);
    let state = save_vm(&vm.vm).unwrap();
    let good = state.to_bytes().unwrap();
    for cut in 0..good.len() {
        assert!(VmState::from_bytes(&good[..cut], VM_STATE_VERSION).is_err());
    }
    let text = String::from_utf8(good).unwrap();
    // The IOAPIC state one byte short.
    let start = text.find("\"ioapic\":[").unwrap() + 10;
    let mut short = text.clone();
    let first = short[start..].find(',').unwrap() + 1;
    short.replace_range(start..start + first, "");
    assert!(VmState::from_bytes(short.as_bytes(), VM_STATE_VERSION).is_err());
    let mut oversized = text.clone();
    oversized.push_str(&" ".repeat(70 << 10));
    assert!(matches!(
        VmState::from_bytes(oversized.as_bytes(), VM_STATE_VERSION),
        Err(KvmStateError::TooLarge { .. })
    ));
}
