//! KVM's dirty ring (`KVM_CAP_DIRTY_LOG_RING`): the guest's written pages as a per-vCPU
//! queue of (slot, page) entries instead of a per-slot bitmap.
//!
//! With the ring, KVM appends an entry to the writing vCPU's ring the first time the guest
//! writes a write-protected page of a slot that logs dirty pages, and leaves the page
//! writable until userspace hands the entry back. The migration's dirty sync then costs in
//! proportion to the pages written, not to the size of guest RAM (a 1 GiB bitmap is 32 KiB
//! to fetch and scan at every sync, however little the guest wrote).
//!
//! KVM's ordering rules, as hopvm follows them:
//! - The ring is a VM-wide setting taken by `KVM_ENABLE_CAP` on the VM fd **before any vCPU
//!   is created** ([`DirtyRings::enable`]); KVM refuses it afterwards.
//! - Each vCPU's ring is mapped from the vCPU fd at `KVM_DIRTY_LOG_PAGE_OFFSET` pages, right
//!   after the vCPU is created ([`DirtyRings::add_vcpu`]).
//! - Harvesting an entry: load its `flags` with acquire ordering; only when `DIRTY` is set are
//!   `slot` and `offset` valid. Then store `RESET` into `flags` with release ordering. Each
//!   harvest scans the whole ring (order does not matter for a set of pages; KVM resets
//!   entries in its own order, from the oldest, and stops at one not harvested yet).
//! - `KVM_RESET_DIRTY_RINGS` on the VM fd then gives every `RESET` entry back to KVM, which
//!   write-protects those pages again: a write after the reset is logged again. A write
//!   between the harvest and the reset is not logged, but the page is read (sent) after the
//!   sync returns, which is after the reset, so it carries that write.
//! - When a ring is nearly full (its size less KVM's reserved entries), the vCPU leaves
//!   `KVM_RUN` with `KVM_EXIT_DIRTY_RING_FULL` and must not re-enter before entries were
//!   reset: the vCPU thread reaps all rings itself ([`DirtyRings::ring_full`], as QEMU does),
//!   keeping every page it finds in the per-slot bitmaps the next sync takes. Never dropped.
//! - The ring and the dirty bitmap are exclusive on hosts without
//!   `KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP` (`KVM_GET_DIRTY_LOG` and `KVM_CLEAR_DIRTY_LOG` fail
//!   on a ring VM), and manual protection must stay off: with `KVM_DIRTY_LOG_INITIALLY_SET`
//!   KVM would not write-protect a slot when logging starts, so the ring would see no writes.
//! - KVM keeps 64 entries in reserve: a vCPU is stopped once its ring is nearly full, before
//!   it can fill it, so a ring is never seen with every entry in use. A host that breaks this
//!   (kvm_pvm's batch emulation runs up to 1024 guest instructions per entry, each able to
//!   log a page, without that stop — [`host_ring_unsafe`]) can write past the end of the ring
//!   over entries not read yet, losing those pages, and its indices stay out of step after.
//!   So every harvest checks for a full ring; once one is seen, the VM's dirty log is
//!   unreliable for good: the sync under way fails (the migration fails, the source runs on
//!   intact) and no migration starts again ([`DirtyRings::check`]). Nor can a vCPU be trusted
//!   to run on: KVM still counts the lost entries, and a small ring stays "full" for good. So
//!   hopvm refuses the ring on a host known to overrun it ([`resolve`]); the check is the
//!   safety net for any other.
//!
//! Entries buffered in the CPU (Intel PML) when a sync runs with the vCPUs running reach the
//! ring at the vCPU's next exit, so they show up in a later sync; the final sync runs with
//! every vCPU stopped (exited), so the last one is complete.
//!
//! Locking: the harvest state is one mutex, a leaf — nothing else is taken while it is held.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_bindings::{
    kvm_dirty_gfn, kvm_enable_cap, KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
    KVM_DIRTY_LOG_PAGE_OFFSET,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use std::os::fd::AsRawFd;

/// An entry KVM filled in (`KVM_DIRTY_GFN_F_DIRTY`).
const GFN_DIRTY: u32 = 1;
/// An entry userspace harvested (`KVM_DIRTY_GFN_F_RESET`).
const GFN_RESET: u32 = 2;

/// Smallest ring KVM accepts on any host: a page of entries (hosts whose CPUs buffer dirty
/// pages, Intel PML, need 1024 or more: KVM keeps that many entries in reserve).
pub const MIN_ENTRIES: u32 = 256;
/// Largest ring KVM accepts (`KVM_DIRTY_RING_MAX_ENTRIES`); a host may advertise less.
pub const MAX_ENTRIES: u32 = 65536;
/// The size `auto` picks (entries per vCPU, 64 KiB of ring): as QEMU's documentation
/// suggests, and big enough that a vCPU seldom stops on a full ring between two syncs.
pub const AUTO_ENTRIES: u32 = 4096;

/// `KVM_RESET_DIRTY_RINGS` is not wrapped by kvm-ioctls: _IO(KVMIO, 0xc7).
mod ioctls {
    vmm_sys_util::ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, kvm_bindings::KVMIO, 0xc7);
}

/// Errors setting up or reading the dirty ring.
#[derive(Debug, thiserror::Error)]
pub enum DirtyRingError {
    /// `--dirty-ring` / `dirty-ring-size` could not be parsed or is out of range.
    #[error(
        "invalid dirty ring size '{0}': expected off, auto or a power of two from {MIN_ENTRIES} \
         to {MAX_ENTRIES} (entries per vCPU)"
    )]
    InvalidSize(String),
    /// A ring size was asked for but this host's KVM has no dirty ring.
    #[error("dirty ring of {0} entries asked for, but this host's kvm has no dirty ring (KVM_CAP_DIRTY_LOG_RING)")]
    NotOffered(u32),
    /// This host's KVM is known to overrun rings ([`host_ring_unsafe`]).
    #[error(
        "dirty ring of {0} entries asked for, but this host's kvm can overrun it and lose \
         dirty pages ({1}): use --dirty-ring off"
    )]
    Unsafe(u32, String),
    /// The size is more than this host's KVM allows.
    #[error("dirty ring of {0} entries asked for, but this host's kvm allows at most {1}")]
    TooBig(u32, u32),
    /// KVM refused to enable the ring.
    #[error("kvm refused a dirty ring of {0} entries: {1}")]
    Enable(u32, #[source] kvm_ioctls::Error),
    /// A vCPU's ring could not be mapped.
    #[error("cannot map vcpu {0}'s dirty ring: {1}")]
    Map(usize, #[source] std::io::Error),
}

/// How KVM's dirty pages are collected: `hopvm run --dirty-ring off|auto|N`, QEMU's
/// `-accel kvm,dirty-ring-size=N` (0 = off).
///
/// The default is the bitmap, as QEMU's: on the development host (kvm_pvm) the ring's dirty
/// sync was ten times cheaper, but KVM overran the rings of busy guests (see
/// [`host_ring_unsafe`]), which makes the ring unusable for migration there; whole
/// migrations were no faster (README, "Migration benchmark").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DirtyRingConfig {
    /// KVM's dirty bitmap (`KVM_GET_DIRTY_LOG` with manual protection where offered).
    #[default]
    Off,
    /// The ring of [`AUTO_ENTRIES`] where the host offers it and keeps its limit
    /// ([`host_ring_unsafe`]), else the bitmap.
    Auto,
    /// The ring with this many entries per vCPU; an error where the host has no ring.
    Entries(u32),
}

impl DirtyRingConfig {
    /// A ring size in entries as QEMU's `dirty-ring-size` takes it: 0 is off, otherwise a
    /// power of two in [`MIN_ENTRIES`]..=[`MAX_ENTRIES`].
    pub fn from_entries(n: u64) -> Result<Self, DirtyRingError> {
        match n {
            0 => Ok(Self::Off),
            n if n.is_power_of_two()
                && (u64::from(MIN_ENTRIES)..=u64::from(MAX_ENTRIES)).contains(&n) =>
            {
                Ok(Self::Entries(n as u32))
            }
            n => Err(DirtyRingError::InvalidSize(n.to_string())),
        }
    }
}

impl std::str::FromStr for DirtyRingConfig {
    type Err = DirtyRingError;

    /// `off`, `auto`, or a number of entries (decimal or 0x hex).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "off" => Ok(Self::Off),
            "auto" => Ok(Self::Auto),
            _ => crate::config::parse_int(s)
                .ok_or_else(|| DirtyRingError::InvalidSize(s.to_string()))
                .and_then(|n| match Self::from_entries(n) {
                    Ok(Self::Off) => Err(DirtyRingError::InvalidSize(s.to_string())),
                    other => other.map_err(|_| DirtyRingError::InvalidSize(s.to_string())),
                }),
        }
    }
}

impl std::fmt::Display for DirtyRingConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Off => f.write_str("off"),
            Self::Auto => f.write_str("auto"),
            Self::Entries(n) => write!(f, "{n}"),
        }
    }
}

/// The dirty-ring capability this host's KVM offers and its largest ring in entries:
/// `KVM_CAP_DIRTY_LOG_RING_ACQ_REL` where offered (for hosts with weak memory ordering; the
/// same ring on x86), else `KVM_CAP_DIRTY_LOG_RING`; `None` without a ring.
pub fn host_ring(kvm: &Kvm) -> Option<(u32, u32)> {
    [KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_DIRTY_LOG_RING]
        .into_iter()
        .find_map(|cap| {
            let bytes = kvm.check_extension_raw(u64::from(cap));
            (bytes > 0).then(|| {
                let entries = bytes as u64 / size_of::<kvm_dirty_gfn>() as u64;
                (cap, entries.min(u64::from(MAX_ENTRIES)) as u32)
            })
        })
}

/// Whether this host's KVM offers the dirty ring (false when /dev/kvm cannot be opened).
pub fn host_offers_ring() -> bool {
    Kvm::new().is_ok_and(|kvm| host_ring(&kvm).is_some())
}

/// Whether this host's KVM is known to overrun dirty rings: kvm_pvm emulates up to
/// `pvm_emul_batch` guest instructions per entry without stopping the vCPU when its ring
/// reaches the soft limit, and a busy guest's writes then run past the entries KVM keeps in
/// reserve — KVM writes over entries userspace has not read (the kernel warns "WARNING …
/// kvm_dirty_ring_push", virt/kvm/dirty_ring.c) and those pages are lost for the dirty log.
/// Seen on the development host with hopvm's and QEMU's busy guests.
pub fn host_ring_unsafe() -> Option<String> {
    let batch = std::fs::read_to_string("/sys/module/kvm_pvm/parameters/pvm_emul_batch").ok()?;
    let batch: u64 = batch.trim().parse().ok()?;
    (batch > 1).then(|| format!("kvm_pvm emulates up to {batch} instructions per entry (pvm_emul_batch) past the ring's limit"))
}

/// What `config` asks of this host: the ring size in entries, or `None` for the bitmap.
pub fn resolve(kvm: &Kvm, config: DirtyRingConfig) -> Result<Option<u32>, DirtyRingError> {
    let host = host_ring(kvm);
    match config {
        DirtyRingConfig::Off => Ok(None),
        DirtyRingConfig::Auto if host_ring_unsafe().is_some() => Ok(None),
        DirtyRingConfig::Auto => Ok(host.map(|(_, max)| AUTO_ENTRIES.min(max))),
        DirtyRingConfig::Entries(n) => match host {
            None => Err(DirtyRingError::NotOffered(n)),
            Some(_) if host_ring_unsafe().is_some() => Err(DirtyRingError::Unsafe(
                n,
                host_ring_unsafe().unwrap_or_default(),
            )),
            Some((_, max)) if n > max => Err(DirtyRingError::TooBig(n, max)),
            Some(_) => Ok(Some(n)),
        },
    }
}

/// Checks `config` against this host's KVM where /dev/kvm can be opened (a size the host
/// cannot give is an error before anything starts); elsewhere the VM build checks it again.
pub fn check_host(config: DirtyRingConfig) -> Result<DirtyRingConfig, DirtyRingError> {
    if let Ok(kvm) = Kvm::new() {
        resolve(&kvm, config)?;
    }
    Ok(config)
}

/// One vCPU's ring, mapped from its fd.
struct Ring {
    entries: *mut kvm_dirty_gfn,
    count: u32,
}

// SAFETY: the mapping belongs to this struct (unmapped on drop) and is only touched under
// the `DirtyRings` mutex; KVM's concurrent writes follow the flags protocol above.
unsafe impl Send for Ring {}

impl Ring {
    fn bytes(&self) -> usize {
        self.count as usize * size_of::<kvm_dirty_gfn>()
    }

    /// Entry `i`'s flags.
    fn flags(&self, i: u32) -> &AtomicU32 {
        // SAFETY: i is taken modulo count, so the entry lies inside the mapping, which lives
        // as long as `self`; `flags` is the entry's first u32, 4-byte aligned, and KVM
        // accesses it atomically too.
        unsafe {
            let entry = self.entries.add((i & (self.count - 1)) as usize);
            &*(std::ptr::addr_of_mut!((*entry).flags) as *const AtomicU32)
        }
    }

    /// Harvests every entry KVM published (flags DIRTY), calling `found(slot, page)` for
    /// each and marking it RESET. The whole ring is scanned rather than walked from a cursor:
    /// the set of pages is what matters, not their order. Returns the entries harvested and
    /// whether every entry of the ring was in use (DIRTY, or RESET and not yet given back):
    /// a full ring, which KVM never lets happen (see [`DirtyRings`]'s overrun check).
    fn harvest(&mut self, mut found: impl FnMut(u32, u64)) -> (u64, bool) {
        let (mut n, mut used) = (0, 0);
        for i in 0..self.count {
            let flags = self.flags(i);
            // Acquire: the entry's slot and offset are valid once DIRTY is seen.
            let f = flags.load(Ordering::Acquire);
            if f != 0 {
                used += 1;
            }
            if f & GFN_DIRTY == 0 {
                continue;
            }
            // SAFETY: entry i lies inside the mapping (i < count); KVM does not write a
            // published entry again before it was reset.
            let (slot, offset) = unsafe {
                let entry = self.entries.add(i as usize);
                (
                    std::ptr::addr_of!((*entry).slot).read_volatile(),
                    std::ptr::addr_of!((*entry).offset).read_volatile(),
                )
            };
            found(slot, offset);
            // Release: hands the entry back only after it was read.
            flags.store(GFN_RESET, Ordering::Release);
            n += 1;
        }
        (n, used == self.count)
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // SAFETY: the exact mapping made in `add_vcpu`; nothing refers to it any more.
        unsafe { libc::munmap(self.entries.cast(), self.bytes()) };
    }
}

/// What the harvest lock protects.
struct Harvest {
    rings: Vec<Ring>,
    /// Pages found dirty and not taken yet, one bitmap per slot (LSB first).
    dirty: Vec<Vec<u64>>,
}

/// The dirty rings of a VM's vCPUs and the pages harvested from them.
pub struct DirtyRings {
    vm: Arc<VmFd>,
    entries: u32,
    /// Pages per slot.
    slot_pages: Vec<u64>,
    harvest: Mutex<Harvest>,
    /// `KVM_EXIT_DIRTY_RING_FULL` exits handled.
    full_exits: AtomicU64,
    /// Time the vCPU threads spent reaping on those exits, ns.
    full_reap_ns: AtomicU64,
    /// A ring was found full: KVM may have written over entries not read yet.
    overrun: AtomicBool,
}

impl DirtyRings {
    /// Enables a ring of `entries` entries per vCPU on `vm`, whose memory slots hold
    /// `slot_pages` pages each (slot n = index n). Must run before the first vCPU is created
    /// (KVM refuses it afterwards); `entries` comes from [`resolve`].
    pub fn enable(
        kvm: &Kvm,
        vm: Arc<VmFd>,
        entries: u32,
        slot_pages: Vec<u64>,
    ) -> Result<Self, DirtyRingError> {
        let (cap, _) = host_ring(kvm).ok_or(DirtyRingError::NotOffered(entries))?;
        let mut enable = kvm_enable_cap {
            cap,
            ..Default::default()
        };
        enable.args[0] = u64::from(entries) * size_of::<kvm_dirty_gfn>() as u64;
        vm.enable_cap(&enable)
            .map_err(|e| DirtyRingError::Enable(entries, e))?;
        let dirty = slot_pages
            .iter()
            .map(|p| vec![0; (*p as usize).div_ceil(64)])
            .collect();
        Ok(Self {
            vm,
            entries,
            slot_pages,
            harvest: Mutex::new(Harvest {
                rings: Vec::new(),
                dirty,
            }),
            full_exits: AtomicU64::new(0),
            full_reap_ns: AtomicU64::new(0),
            overrun: AtomicBool::new(false),
        })
    }

    /// Entries per vCPU ring.
    pub fn entries(&self) -> u32 {
        self.entries
    }

    /// Maps the ring of the vCPU just created (vCPU `id`).
    pub fn add_vcpu(&self, id: usize, vcpu: &VcpuFd) -> Result<(), DirtyRingError> {
        let bytes = self.entries as usize * size_of::<kvm_dirty_gfn>();
        // SAFETY: page_size() has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as libc::off_t;
        // SAFETY: maps `bytes` of the vCPU's dirty ring, which KVM exposes at this offset of
        // the vCPU fd for a VM with the ring enabled; a fresh mapping aliases no Rust memory.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                libc::off_t::from(KVM_DIRTY_LOG_PAGE_OFFSET as i32) * page,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(DirtyRingError::Map(id, std::io::Error::last_os_error()));
        }
        crate::bus::lock(&self.harvest).rings.push(Ring {
            entries: ptr.cast(),
            count: self.entries,
        });
        Ok(())
    }

    /// Harvests every ring into the per-slot bitmaps, then hands the entries back to KVM
    /// (`KVM_RESET_DIRTY_RINGS`), which write-protects their pages again. Returns the entries
    /// harvested.
    fn reap_locked(&self, h: &mut Harvest, always_reset: bool) -> std::io::Result<u64> {
        let Harvest { rings, dirty } = h;
        let mut n = 0;
        let mut full = false;
        for ring in rings.iter_mut() {
            let (found, was_full) = ring.harvest(|slot, page| {
                // Slot = address space << 16 | slot id; hopvm uses address space 0 only.
                match dirty.get_mut(slot as usize) {
                    Some(bits) if page < self.slot_pages[slot as usize] => {
                        bits[page as usize / 64] |= 1 << (page % 64);
                    }
                    _ => {
                        // KVM reported a page hopvm does not know: keep the guarantee that
                        // no write is lost by taking every page of every slot as dirty.
                        log::warn!(
                            "dirty ring: entry for slot {slot:#x} page {page:#x} outside guest ram"
                        );
                        for bits in dirty.iter_mut() {
                            bits.fill(!0);
                        }
                    }
                }
            });
            n += found;
            full |= was_full;
        }
        if full && !self.overrun.swap(true, Ordering::Relaxed) {
            log::error!(
                "dirty ring: a vcpu's ring was found full: this host's kvm let it overrun \
                 (kvm_pvm's batch emulation does) and may have written over entries not yet \
                 read; the dirty log of this vm is unreliable from now on, so it cannot be \
                 migrated any more (run it with --dirty-ring off)"
            );
        }
        if n > 0 || always_reset {
            self.reset()?;
        }
        Ok(n)
    }

    /// `KVM_RESET_DIRTY_RINGS`. Newer kernels stop a long reset for a pending signal
    /// (`EINTR`) — a vCPU thread reaping may be kicked meanwhile — having reset part of
    /// the entries: asked again, KVM goes on where it stopped.
    fn reset(&self) -> std::io::Result<u64> {
        loop {
            // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument and only reads the rings of
            // this VM's vCPUs, whose RESET entries were all fully read before.
            let r =
                unsafe { vmm_sys_util::ioctl::ioctl(&*self.vm, ioctls::KVM_RESET_DIRTY_RINGS()) };
            if r >= 0 {
                return Ok(r as u64);
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Reaps every ring (see [`reap_locked`](Self::reap_locked)).
    pub fn reap(&self) -> std::io::Result<u64> {
        self.reap_locked(&mut crate::bus::lock(&self.harvest), false)
    }

    /// Reaps every ring, then takes (and clears) the dirty bitmap of slot `slot`.
    pub fn take_slot(&self, slot: usize) -> std::io::Result<Vec<u64>> {
        let mut h = crate::bus::lock(&self.harvest);
        self.reap_locked(&mut h, false)?;
        self.check()?;
        let words = h
            .dirty
            .get_mut(slot)
            .ok_or_else(|| std::io::Error::other(format!("no memory slot {slot}")))?;
        let empty = vec![0; words.len()];
        Ok(std::mem::replace(words, empty))
    }

    /// A vCPU left `KVM_RUN` with `KVM_EXIT_DIRTY_RING_FULL`: reaps every ring and resets
    /// them, so that it may run again. Its pages wait in the bitmaps for the next sync.
    pub fn ring_full(&self) -> std::io::Result<()> {
        let t0 = Instant::now();
        self.full_exits.fetch_add(1, Ordering::Relaxed);
        let r = self.reap_locked(&mut crate::bus::lock(&self.harvest), true);
        self.full_reap_ns
            .fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        r.map(drop)
    }

    /// Fails once a ring was found overrun ([`DirtyRings`]): from then on the dirty log
    /// cannot be trusted, and a migration must fail rather than send a stale page.
    pub fn check(&self) -> std::io::Result<()> {
        if self.overrun.load(Ordering::Relaxed) {
            return Err(std::io::Error::other(
                "kvm overran a vcpu's dirty ring and may have lost dirty pages: this vm \
                 cannot be migrated safely (run it with --dirty-ring off)",
            ));
        }
        Ok(())
    }

    /// Whether a ring was found overrun.
    pub fn overrun(&self) -> bool {
        self.overrun.load(Ordering::Relaxed)
    }

    /// `KVM_EXIT_DIRTY_RING_FULL` exits so far, and the time the vCPUs spent reaping on them.
    pub fn full_exits(&self) -> (u64, std::time::Duration) {
        (
            self.full_exits.load(Ordering::Relaxed),
            std::time::Duration::from_nanos(self.full_reap_ns.load(Ordering::Relaxed)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<DirtyRingConfig, String> {
        s.parse::<DirtyRingConfig>().map_err(|e| e.to_string())
    }

    #[test]
    fn sizes() {
        assert_eq!(parse("off"), Ok(DirtyRingConfig::Off));
        assert_eq!(parse("auto"), Ok(DirtyRingConfig::Auto));
        assert_eq!(parse("256"), Ok(DirtyRingConfig::Entries(256)));
        assert_eq!(parse("0x1000"), Ok(DirtyRingConfig::Entries(4096)));
        assert_eq!(parse("65536"), Ok(DirtyRingConfig::Entries(65536)));
        for bad in ["", "0", "128", "1000", "131072", "4k", "-4096", "on"] {
            let e = parse(bad).unwrap_err();
            assert!(
                e.starts_with(&format!("invalid dirty ring size '{bad}'")),
                "{bad}: {e}"
            );
        }
        assert!(matches!(
            DirtyRingConfig::from_entries(0),
            Ok(DirtyRingConfig::Off)
        ));
        assert!(DirtyRingConfig::from_entries(3000).is_err());
        for c in [
            DirtyRingConfig::Off,
            DirtyRingConfig::Auto,
            DirtyRingConfig::Entries(1024),
        ] {
            assert_eq!(parse(&c.to_string()), Ok(c));
        }
    }
}
