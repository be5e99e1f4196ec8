//! Guest RAM: the physical address layout, its mmap backing and its KVM memory slots.
//!
//! The layout is a classic PC's, as QEMU's `pc` machine builds it, so that Linux, Multiboot
//! kernels and kvm-unit-tests see what they expect:
//!
//! ```text
//! 0            0x9fc00      0xe0000     1 MiB                 3 GiB     4 GiB
//! | RAM (639K) | EBDA (res) | BIOS (res) | RAM ...              | PCI hole | RAM above 4 GiB ...
//! ```
//!
//! RAM beyond 3 GiB is moved above 4 GiB so that the IOAPIC, LAPIC and test-device MMIO windows
//! (0xfec00000, 0xfee00000, 0xff000000) never overlap RAM. The whole low range, holes included,
//! is backed by one mapping: the EBDA and BIOS area hold the MP table and ACPI tables, which
//! hopvm writes there like a BIOS would, and are only *reported* as reserved.
//!
//! The mapping carries vm-memory's [`AtomicBitmap`], which marks every page the VMM itself
//! writes through [`vm_memory::Bytes`]; live migration ORs it with KVM's dirty log so that no
//! write, the guest's or hopvm's, is missed.

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// Guest RAM with a dirty bitmap of the VMM's own writes (the migration crate's alias).
pub use migration::ram::GuestMemoryMmap;
/// One region of [`GuestMemoryMmap`].
pub type GuestRegionMmap = vm_memory::GuestRegionMmap<AtomicBitmap>;

/// Errors setting up guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The host could not map guest RAM.
    #[error("cannot allocate guest memory: {0}")]
    Allocate(#[source] vm_memory::mmap::FromRangesError),
    /// KVM refused a memory slot.
    #[error("cannot register guest memory with kvm: {0}")]
    SetSlot(#[source] kvm_ioctls::Error),
    /// The thread registering memory slots died.
    #[error("memory slot registration thread panicked")]
    SlotThread,
}

/// Guest page size (the migration stream's, one definition).
pub use migration::ram::PAGE_SIZE;
/// Start of the Extended BIOS Data Area (the last KiB of base memory).
pub const EBDA_START: u64 = 0x9fc00;
/// Start of the reserved BIOS area (ACPI tables and the MP floating pointer live here).
pub const BIOS_START: u64 = 0xe0000;
/// Start of extended memory.
pub const HIGH_MEMORY_START: u64 = 0x10_0000;
/// Where RAM below 4 GiB ends at most: the PCI hole spans [3 GiB, 4 GiB).
pub const PCI_HOLE_START: u64 = 3 << 30;
/// Where RAM continues above the PCI hole.
pub const RAM_ABOVE_4G_START: u64 = 4 << 30;

/// An E820 / Multiboot memory map entry type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegionType {
    /// Usable RAM.
    Ram = 1,
    /// Reserved (EBDA, BIOS area).
    Reserved = 2,
}

/// One entry of the guest's physical memory map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapEntry {
    /// First byte.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// What it is.
    pub kind: RegionType,
}

/// Where guest RAM of a given size sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Total RAM in bytes.
    pub ram_size: u64,
}

impl Layout {
    /// The layout for `ram_size` bytes of RAM.
    pub fn new(ram_size: u64) -> Self {
        Self { ram_size }
    }

    /// RAM below 4 GiB.
    pub fn below_4g(&self) -> u64 {
        self.ram_size.min(PCI_HOLE_START)
    }

    /// RAM from 4 GiB up.
    pub fn above_4g(&self) -> u64 {
        self.ram_size - self.below_4g()
    }

    /// The backed ranges, (guest address, size): one below the PCI hole, one above 4 GiB.
    pub fn ram_ranges(&self) -> Vec<(GuestAddress, usize)> {
        let mut ranges = vec![(GuestAddress(0), self.below_4g() as usize)];
        if self.above_4g() > 0 {
            ranges.push((GuestAddress(RAM_ABOVE_4G_START), self.above_4g() as usize));
        }
        ranges
    }

    /// The memory map reported to the guest (E820 for Linux, `mmap` for Multiboot).
    pub fn memory_map(&self) -> Vec<MapEntry> {
        let below = self.below_4g();
        let entry = |start, end: u64, kind| MapEntry {
            start,
            len: end - start,
            kind,
        };
        let mut map = vec![entry(0, EBDA_START.min(below), RegionType::Ram)];
        if below > EBDA_START {
            map.push(entry(
                EBDA_START,
                HIGH_MEMORY_START.min(below),
                RegionType::Reserved,
            ));
        }
        if below > HIGH_MEMORY_START {
            map.push(entry(HIGH_MEMORY_START, below, RegionType::Ram));
        }
        if self.above_4g() > 0 {
            map.push(entry(
                RAM_ABOVE_4G_START,
                RAM_ABOVE_4G_START + self.above_4g(),
                RegionType::Ram,
            ));
        }
        map
    }

    /// The highest page-aligned address below 4 GiB (exclusive) that loaders may place data at.
    pub fn low_ram_end(&self) -> u64 {
        self.below_4g()
    }
}

/// Maps guest RAM for `layout`.
pub fn create_guest_memory(layout: &Layout) -> Result<GuestMemoryMmap, MemoryError> {
    GuestMemoryMmap::from_ranges(&layout.ram_ranges()).map_err(MemoryError::Allocate)
}

/// Registers every RAM region as a KVM memory slot (slot = region index).
///
/// With `log_dirty` KVM tracks the guest's writes per page (`KVM_MEM_LOG_DIRTY_PAGES`);
/// re-registering a slot with a changed flag is how dirty logging is switched on and off.
pub fn set_kvm_slots(vm: &VmFd, mem: &GuestMemoryMmap, log_dirty: bool) -> Result<(), MemoryError> {
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .expect("a mapped region has a host address");
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: if log_dirty {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the host range belongs to `mem`, which outlives the VM: the VM's owner keeps
        // the GuestMemoryMmap alive until the VM fd is closed.
        unsafe { vm.set_user_memory_region(region) }.map_err(MemoryError::SetSlot)?;
    }
    Ok(())
}

/// KVM_CLEAR_DIRTY_LOG is not wrapped by kvm-ioctls: _IOWR(KVMIO, 0xc0, kvm_clear_dirty_log).
mod ioctls {
    vmm_sys_util::ioctl_iowr_nr!(
        KVM_CLEAR_DIRTY_LOG,
        kvm_bindings::KVMIO,
        0xc0,
        kvm_bindings::kvm_clear_dirty_log
    );
}

/// Switches `vm` to manual dirty-log protection, as QEMU does when the host offers it:
/// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` with `KVM_DIRTY_LOG_INITIALLY_SET`. Then
/// `KVM_GET_DIRTY_LOG` only reads the log (it neither clears it nor write-protects pages), a
/// slot that starts logging starts with every page dirty and nothing write-protected, and
/// [`clear_dirty_log`] clears and write-protects pages just before they are sent. Returns
/// whether it is on. Must be called before dirty logging is switched on for any slot.
pub fn enable_manual_dirty_protect(vm: &VmFd) -> bool {
    use kvm_bindings::{
        kvm_enable_cap, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_INITIALLY_SET,
        KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    };
    let want = u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET);
    let offered = vm.check_extension_raw(u64::from(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2));
    if offered < 0 || (offered as u64) & want != want {
        return false;
    }
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        ..Default::default()
    };
    cap.args[0] = want;
    vm.enable_cap(&cap).is_ok()
}

/// Clears KVM's dirty bits of slot `slot` that are set in `bitmap` (bit i = page
/// `first_page + i`) and write-protects those pages again, so that the guest's next write
/// to each is logged (manual protection, [`enable_manual_dirty_protect`]). `first_page` must
/// be a multiple of 64; the range may end at the slot's end.
pub fn clear_dirty_log(
    vm: &VmFd,
    slot: u32,
    first_page: u64,
    num_pages: u32,
    bitmap: &[u64],
) -> std::io::Result<()> {
    if bitmap.len() * 64 < num_pages as usize {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    }
    let mut clear = kvm_bindings::kvm_clear_dirty_log {
        slot,
        num_pages,
        first_page,
        ..Default::default()
    };
    clear.__bindgen_anon_1.dirty_bitmap = bitmap.as_ptr() as *mut _;
    // SAFETY: the struct is valid for the ioctl; KVM reads num_pages bits of `bitmap`, which
    // is at least that long (checked above), and writes nothing back into it.
    let r =
        unsafe { vmm_sys_util::ioctl::ioctl_with_ref(vm, ioctls::KVM_CLEAR_DIRTY_LOG(), &clear) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram_total(map: &[MapEntry]) -> u64 {
        map.iter()
            .filter(|e| e.kind == RegionType::Ram)
            .map(|e| e.len)
            .sum()
    }

    #[test]
    fn small_layout() {
        let layout = Layout::new(256 << 20);
        assert_eq!(layout.ram_ranges(), vec![(GuestAddress(0), 256 << 20)]);
        let map = layout.memory_map();
        assert_eq!(map.len(), 3);
        assert_eq!(
            ram_total(&map),
            (256 << 20) - (HIGH_MEMORY_START - EBDA_START)
        );
        assert_eq!(map[2].start + map[2].len, 256 << 20);
    }

    #[test]
    fn pci_hole() {
        let layout = Layout::new(4 << 30);
        assert_eq!(layout.below_4g(), 3 << 30);
        assert_eq!(layout.above_4g(), 1 << 30);
        let map = layout.memory_map();
        assert_eq!(
            ram_total(&map),
            (4 << 30) - (HIGH_MEMORY_START - EBDA_START)
        );
        for e in map.iter().filter(|e| e.kind == RegionType::Ram) {
            assert!(e.start + e.len <= PCI_HOLE_START || e.start >= RAM_ABOVE_4G_START);
        }
        assert_eq!(map.last().unwrap().start, 4 << 30);
    }

    #[test]
    fn tiny_layout() {
        let map = Layout::new(1 << 20).memory_map();
        assert_eq!(map.len(), 2);
        assert_eq!(map[1].start + map[1].len, 1 << 20);
    }

    #[test]
    fn maps_memory() {
        let mem = create_guest_memory(&Layout::new(2 << 20)).unwrap();
        assert_eq!(mem.num_regions(), 1);
    }
}
