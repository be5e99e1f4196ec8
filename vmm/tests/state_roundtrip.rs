//! Save → restore of every non-RAM migration section in one process is lossless: the state of
//! every vCPU, the VM-wide KVM state and every device, taken from a guest that has been
//! running, restored into a fresh VM and saved again, comes out the same.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{passes, Capture};
use vmm::config::{SerialConfig, VmConfig};
use vmm::instance::Instance;
use vmm::kvm_state::{VcpuState, VmState, VCPU_STATE_VERSION, VM_STATE_VERSION};
use vmm::vm::SharedWriter;

fn instance(kernel: bool) -> (Arc<Instance>, Capture) {
    let mut c = VmConfig::new(guest_tests::image_path("dirty"));
    if !kernel {
        c.kernel = None;
    }
    c.cmdline = String::from("ws=1");
    c.memory = 32 << 20;
    c.cpus = 2;
    c.serial = SerialConfig::Null;
    let out = Capture::default();
    let i = Instance::new(&c, SharedWriter::new(Box::new(out.clone()))).unwrap();
    (i, out)
}

/// The MSRs and LAPIC bytes that follow the host's clock (this host's KVM ignores host-side
/// TSC writes, so the TSC and a TSC-based deadline read back in host time) are compared for
/// monotonicity instead of equality.
const TIME_MSRS: [u32; 2] = [0x10, 0x6e0];
const LAPIC_TIMER_CURRENT_COUNT: usize = 0x390;

fn normalise(mut s: VcpuState) -> VcpuState {
    s.msrs.retain(|m| !TIME_MSRS.contains(&m.index));
    s.lapic.regs[LAPIC_TIMER_CURRENT_COUNT..LAPIC_TIMER_CURRENT_COUNT + 4].fill(0);
    s
}

#[test]
fn every_section_round_trips() {
    let (src, out) = instance(true);
    src.cont().unwrap();
    out.wait_for(Duration::from_secs(120), "a first pass", |t| passes(t) >= 1);
    src.stop();
    let saved = src.registry.lock().unwrap().save_snapshots().unwrap();
    // cpu 0, cpu 1, kvm-vm, then the devices.
    let devices = saved.len() - 3;
    assert!(devices >= 10, "{devices} device sections");

    let (dst, _) = instance(false);
    dst.registry
        .lock()
        .unwrap()
        .restore_snapshots(&saved, &|_| true)
        .unwrap();
    let again = dst.registry.lock().unwrap().save_snapshots().unwrap();

    for cpu in 0..2 {
        let a = VcpuState::from_bytes(&saved[cpu], VCPU_STATE_VERSION).unwrap();
        let b = VcpuState::from_bytes(&again[cpu], VCPU_STATE_VERSION).unwrap();
        let tsc = |s: &VcpuState| s.msrs.iter().find(|m| m.index == 0x10).map(|m| m.data);
        assert!(tsc(&b) >= tsc(&a), "cpu {cpu}: tsc went backwards");
        assert_eq!(normalise(a), normalise(b), "cpu {cpu}");
    }
    let a = VmState::from_bytes(&saved[2], VM_STATE_VERSION).unwrap();
    let b = VmState::from_bytes(&again[2], VM_STATE_VERSION).unwrap();
    assert_eq!(a.pic_master, b.pic_master);
    assert_eq!(a.pic_slave, b.pic_slave);
    assert_eq!(a.ioapic, b.ioapic);
    let (pa, pb) = (a.pit.expect("a pit"), b.pit.expect("a pit"));
    for (x, y) in pa.channels.iter().zip(pb.channels.iter()) {
        // KVM re-stamps the load time on KVM_SET_PIT2; the rest must match.
        assert_eq!(
            (x.count, x.latched_count, x.mode, x.bcd, x.gate, x.rw_mode),
            (y.count, y.latched_count, y.mode, y.bcd, y.gate, y.rw_mode)
        );
    }
    // Devices: field for field, but for what derives from a running clock — the RTC's time
    // registers (0x00–0x09, century 0x32) and status C's update flags — which move on between
    // the two saves; the RTC's offset from host time must match.
    for i in 3..saved.len() {
        let mut a: serde_json::Value = serde_json::from_slice(&saved[i]).unwrap();
        let mut b: serde_json::Value = serde_json::from_slice(&again[i]).unwrap();
        // Instants on a device's own running clock (the RTC's status-C bookkeeping, the PM
        // timer's count) move forward between the two saves.
        for field in ["flags_ns", "clock_ns"] {
            if let (Some(x), Some(y)) = (a.get(field).cloned(), b.get(field).cloned()) {
                assert!(
                    y.as_i64() >= x.as_i64(),
                    "section {i}: {field} went backwards"
                );
                a[field] = serde_json::Value::Null;
                b[field] = serde_json::Value::Null;
            }
        }
        if a.get("offset_ns").is_some() {
            for v in [&mut a, &mut b] {
                for reg in (0x00..=0x0c).chain([0x32]) {
                    v["data"][reg] = serde_json::Value::Null;
                }
            }
        }
        assert_eq!(a, b, "section {i}");
    }
}
