//! KVM's dirty ring against KVM's dirty bitmap on the real KVM: a tiny real-mode guest
//! writes one byte into each of a known set of pages; the pages the ring reports must be
//! exactly that set — the same the bitmap reports for the same guest — with the ring so
//! small that the vCPU stops on a full ring (`KVM_EXIT_DIRTY_RING_FULL`) and reaps it on the
//! way. After a harvest KVM must log the same pages again when the guest rewrites them (the
//! reset write-protected them again).

use std::collections::BTreeSet;
use std::sync::Arc;

use kvm_bindings::KVM_EXIT_DIRTY_RING_FULL;
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress};
use vmm::dirty_ring::{self, DirtyRings};
use vmm::memory::{self, GuestMemoryMmap, Layout};

const CODE: u64 = 0x1000;
/// The first page written (guest page frame number) and how many.
const FIRST_PAGE: u64 = 0x10;
const PAGES: u16 = 0xe0;

/// Real-mode code at CODE: for each of PAGES pages from FIRST_PAGE, `es` = page frame and a
/// byte store to es:0, then HLT.
fn code() -> Vec<u8> {
    let mut c = vec![
        0xb8, 0x00, 0x10, // mov ax, 0x1000 (the segment of page 0x10)
        0xb9, // mov cx, PAGES
    ];
    c.extend_from_slice(&PAGES.to_le_bytes());
    c.extend_from_slice(&[
        0x8e, 0xc0, // loop: mov es, ax
        0x26, 0xc6, 0x06, 0x00, 0x00, 0x5a, // mov byte [es:0], 0x5a
        0x05, 0x00, 0x01, // add ax, 0x100 (next page)
        0x49, // dec cx
        0x75, 0xf2, // jnz loop (-14)
        0xf4, // hlt
    ]);
    c
}

struct TestVm {
    vcpu: VcpuFd,
    rings: Option<Arc<DirtyRings>>,
    vm: Arc<VmFd>,
    memory: GuestMemoryMmap,
    _kvm: Kvm,
}

fn test_vm(ring_entries: Option<u32>) -> TestVm {
    let kvm = Kvm::new().expect("open /dev/kvm");
    let vm = Arc::new(kvm.create_vm().unwrap());
    vm.set_tss_address(0xfffb_d000).unwrap();
    let memory = memory::create_guest_memory(&Layout::new(2 << 20)).unwrap();
    let pages = vec![(2u64 << 20) / memory::PAGE_SIZE];
    // The ring before the vCPU (KVM's rule).
    let rings =
        ring_entries.map(|n| Arc::new(DirtyRings::enable(&kvm, vm.clone(), n, pages).unwrap()));
    memory::set_kvm_slots(&vm, &memory, true).unwrap();
    memory.write_slice(&code(), GuestAddress(CODE)).unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    if let Some(r) = &rings {
        r.add_vcpu(0, &vcpu).unwrap();
    }
    let mut sregs = vcpu.get_sregs().unwrap();
    for seg in [&mut sregs.cs, &mut sregs.ds, &mut sregs.es, &mut sregs.ss] {
        seg.base = 0;
        seg.selector = 0;
    }
    vcpu.set_sregs(&sregs).unwrap();
    TestVm {
        vcpu,
        rings,
        vm,
        memory,
        _kvm: kvm,
    }
}

/// Runs the guest from CODE to its HLT; returns the ring-full exits on the way.
fn run(t: &mut TestVm) -> u64 {
    let mut regs = t.vcpu.get_regs().unwrap();
    regs.rip = CODE;
    regs.rflags = 2;
    t.vcpu.set_regs(&regs).unwrap();
    let mut full = 0;
    loop {
        match t.vcpu.run().expect("KVM_RUN") {
            VcpuExit::Hlt => return full,
            VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL) => {
                full += 1;
                t.rings.as_ref().expect("a ring").ring_full().unwrap();
            }
            other => panic!("unexpected exit {other:?}"),
        }
    }
}

fn pages_of(bitmap: &[u64]) -> BTreeSet<u64> {
    (0..bitmap.len() as u64 * 64)
        .filter(|p| bitmap[*p as usize / 64] & (1 << (p % 64)) != 0)
        .collect()
}

fn dirty_pages(t: &TestVm) -> BTreeSet<u64> {
    pages_of(&match &t.rings {
        Some(r) => r.take_slot(0).unwrap(),
        None => t.vm.get_dirty_log(0, 2 << 20).unwrap(),
    })
}

fn written() -> BTreeSet<u64> {
    (FIRST_PAGE..FIRST_PAGE + u64::from(PAGES)).collect()
}

#[test]
fn ring_reports_exactly_the_pages_written_as_the_bitmap_does() {
    if !dirty_ring::host_offers_ring() {
        eprintln!("skipped: this host's kvm has no dirty ring");
        return;
    }
    // The bitmap, for reference.
    let mut bitmap = test_vm(None);
    run(&mut bitmap);
    let by_bitmap = dirty_pages(&bitmap);
    assert_eq!(by_bitmap, written());
    for p in written() {
        let mut b = [0u8];
        bitmap
            .memory
            .read_slice(&mut b, GuestAddress(p * memory::PAGE_SIZE))
            .unwrap();
        assert_eq!(b[0], 0x5a, "page {p:#x}: the guest did not run as meant");
    }

    // The smallest ring: 256 entries, 64 of them held in reserve by KVM, so the vCPU is
    // stopped on a full ring once it logged 192 pages — at the next entry to the guest,
    // which a host that emulates instructions in batches (kvm_pvm) may not reach before the
    // HLT: how many stops there are is the host's business, the pages are not.
    let mut ring = test_vm(Some(dirty_ring::MIN_ENTRIES));
    let full = run(&mut ring);
    eprintln!("{full} dirty-ring-full exits");
    assert_eq!(dirty_pages(&ring), by_bitmap);
    // Taken: nothing left.
    assert_eq!(dirty_pages(&ring), BTreeSet::new());

    // Rewritten after the harvest: KVM write-protected the pages again at the reset, so
    // every one is logged again.
    run(&mut ring);
    assert_eq!(dirty_pages(&ring), written());

    // A big ring never fills for this guest, and reports the same.
    let mut big = test_vm(Some(4096));
    assert_eq!(run(&mut big), 0);
    assert_eq!(dirty_pages(&big), written());

    // A sound ring is never taken for an overrun.
    for t in [&ring, &big] {
        let rings = t.rings.as_ref().unwrap();
        rings.reap().unwrap();
        assert!(!rings.overrun());
        assert_eq!(dirty_pages(t), BTreeSet::new());
    }
}

/// What a host that lets a vCPU run past its ring's limit leaves behind: a ring with every
/// entry in use, KVM about to write over entries not read yet. Made here by publishing
/// entries through a second mapping of the ring: the next harvest must notice it, and from
/// then on the dirty log refuses to serve a migration.
#[test]
fn a_full_ring_is_an_overrun_and_fails_the_dirty_log() {
    if !dirty_ring::host_offers_ring() {
        eprintln!("skipped: this host's kvm has no dirty ring");
        return;
    }
    let entries = dirty_ring::MIN_ENTRIES;
    let mut t = test_vm(Some(entries));
    run(&mut t);
    let rings = t.rings.clone().unwrap();
    assert_eq!(dirty_pages(&t), written());
    let bytes = entries as usize * 16;
    // SAFETY: a second shared mapping of vCPU 0's ring (as `add_vcpu` maps it), unmapped
    // below; the vCPU is not running.
    let ring = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            std::os::fd::AsRawFd::as_raw_fd(&t.vcpu),
            i64::from(kvm_bindings::KVM_DIRTY_LOG_PAGE_OFFSET) * 4096,
        )
    };
    assert_ne!(ring, libc::MAP_FAILED);
    // Every entry published: slot 0, page i.
    for i in 0..entries as usize {
        // SAFETY: entry i (16 bytes: flags, slot, offset) lies inside the mapping.
        unsafe {
            let e = (ring as *mut u8).add(i * 16);
            (e.add(4) as *mut u32).write_volatile(0);
            (e.add(8) as *mut u64).write_volatile(i as u64);
            (e as *mut u32).write_volatile(1);
        }
    }
    // SAFETY: the mapping made above.
    unsafe { libc::munmap(ring, bytes) };
    let e = rings.take_slot(0).unwrap_err();
    assert!(rings.overrun());
    assert!(e.to_string().contains("overran"), "{e}");
    // And it stays so.
    assert!(rings.check().is_err());
    assert!(rings.take_slot(0).is_err());
}

#[test]
fn ring_sizes_the_host_refuses_are_errors() {
    if !dirty_ring::host_offers_ring() {
        eprintln!("skipped: this host's kvm has no dirty ring");
        return;
    }
    let kvm = Kvm::new().unwrap();
    let (_, max) = dirty_ring::host_ring(&kvm).unwrap();
    assert!(max >= dirty_ring::MIN_ENTRIES);
    assert_eq!(
        dirty_ring::resolve(&kvm, dirty_ring::DirtyRingConfig::Off).unwrap(),
        None
    );
    // `auto`: the ring, unless this host's KVM is known to overrun it.
    let auto = dirty_ring::resolve(&kvm, dirty_ring::DirtyRingConfig::Auto).unwrap();
    match dirty_ring::host_ring_unsafe() {
        Some(_) => assert_eq!(auto, None),
        None => assert_eq!(auto, Some(dirty_ring::AUTO_ENTRIES.min(max))),
    }
    // Enabled once a vCPU exists: KVM refuses, and the error says so.
    let vm = Arc::new(kvm.create_vm().unwrap());
    let _vcpu = vm.create_vcpu(0).unwrap();
    let e = DirtyRings::enable(&kvm, vm, 1024, vec![512])
        .err()
        .expect("refused after the first vcpu");
    assert!(
        e.to_string()
            .contains("kvm refused a dirty ring of 1024 entries"),
        "{e}"
    );
}
