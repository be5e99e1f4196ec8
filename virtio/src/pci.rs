//! The virtio 1.x PCI transport ("modern" only, as Cloud Hypervisor's), with MSI-X.
//!
//! BAR 0 (32-bit memory, [`BAR_SIZE`] bytes):
//!
//! | offset | structure | capability |
//! |---|---|---|
//! | 0x0000 | common configuration (`virtio_pci_common_cfg`, 0x38 bytes) | cfg_type 1 |
//! | 0x1000 | ISR status (read clears, lowers INTx) | cfg_type 3 |
//! | 0x2000 | device configuration | cfg_type 4 |
//! | 0x3000 | notifications, 4 bytes per queue (`notify_off_multiplier` 4) | cfg_type 2 |
//! | 0x4000 | MSI-X table (queues + 1 vectors) | MSI-X |
//! | 0x5000 | MSI-X PBA | MSI-X |
//!
//! The guest owns everything it writes: nonsense (a queue size that is not a power of two,
//! rings outside RAM or misaligned, features never offered, an MSI-X vector past the table)
//! is refused the way the specification says, and a queue that cannot be served puts the
//! device in DEVICE_NEEDS_RESET with a configuration interrupt — never a panic, never a stuck
//! vCPU.

use std::sync::{Arc, Mutex};

use devices::pci::{
    PciConfig, PciConfigError, PciConfigState, PciDevice, COMMAND, COMMAND_INTX_DISABLE,
    COMMAND_MEMORY, PCI_MMIO_BASE, PCI_MMIO_END,
};
use devices::SharedIrq;
use event_manager::{EventOps, EventSubscriber, Events};
use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sync::lock;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::{drain, GuestMemoryMmap, IoEventRegistrar, MsiSender, VirtioBackend};

/// PCI vendor ID of virtio devices.
pub const VIRTIO_VENDOR: u16 = 0x1af4;
/// Size of BAR 0.
pub const BAR_SIZE: u64 = 0x8000;
/// Offsets of the structures in BAR 0.
pub const COMMON_OFFSET: u64 = 0x0000;
/// ISR status.
pub const ISR_OFFSET: u64 = 0x1000;
/// Device configuration.
pub const DEVICE_OFFSET: u64 = 0x2000;
/// Notifications.
pub const NOTIFY_OFFSET: u64 = 0x3000;
/// MSI-X table.
pub const MSIX_TABLE_OFFSET: u64 = 0x4000;
/// MSI-X pending bit array.
pub const MSIX_PBA_OFFSET: u64 = 0x5000;
/// Bytes between two queues' notification addresses.
pub const NOTIFY_MULTIPLIER: u32 = 4;
/// Length of the common configuration structure.
const COMMON_LEN: u64 = 0x38;
/// "No MSI-X vector".
pub const NO_VECTOR: u16 = 0xffff;

/// MSI-X capability message control: enable and function mask bits.
const MSIX_ENABLE: u16 = 1 << 15;
const MSIX_FUNCTION_MASK: u16 = 1 << 14;
/// ISR bits.
const ISR_QUEUE: u8 = 1;
const ISR_CONFIG: u8 = 2;

/// Errors restoring a transport's state.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VirtioPciStateError {
    /// The PCI configuration space does not fit this device.
    #[error(transparent)]
    Config(#[from] PciConfigError),
    /// The state has another number of queues or MSI-X vectors than the device.
    #[error("{what}: {got} in the state, the device has {want}")]
    Count {
        /// Which count.
        what: &'static str,
        /// The state's.
        got: usize,
        /// The device's.
        want: usize,
    },
    /// A queue's size is not a power of two up to its maximum.
    #[error("queue {0}: invalid size {1}")]
    QueueSize(usize, u16),
    /// A queue's ring address breaks the ring's alignment.
    #[error("queue {0}: misaligned ring address")]
    QueueAlign(usize),
    /// The driver features contain bits the device never offered.
    #[error("driver features {0:#x} were never offered")]
    Features(u64),
    /// An MSI-X vector number is past the table.
    #[error("msi-x vector {0} past the table")]
    Vector(u16),
    /// The back-end's own state is invalid.
    #[error(transparent)]
    Backend(#[from] crate::BackendStateError),
}

/// One queue's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueState {
    /// Queue size chosen by the driver.
    pub size: u16,
    /// queue_enable.
    pub ready: bool,
    /// Descriptor table address.
    pub desc: u64,
    /// Available (driver) ring address.
    pub avail: u64,
    /// Used (device) ring address.
    pub used: u64,
    /// The device's next available index.
    pub next_avail: u16,
    /// The device's next used index.
    pub next_used: u16,
    /// The queue's MSI-X vector.
    pub msix_vector: u16,
}

/// Everything the guest can observe of a [`VirtioPci`] (every request completed: requests
/// are served whole under the core lock).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtioPciState {
    /// The PCI configuration space (BARs, command, MSI-X control).
    pub config: PciConfigState,
    /// device_feature_select.
    pub device_features_select: u32,
    /// driver_feature_select.
    pub driver_features_select: u32,
    /// The features the driver accepted.
    pub driver_features: u64,
    /// device_status.
    pub status: u8,
    /// config_generation.
    pub config_generation: u8,
    /// queue_select.
    pub queue_select: u16,
    /// msix_config.
    pub msix_config: u16,
    /// The queues.
    pub queues: Vec<QueueState>,
    /// ISR status.
    pub isr: u8,
    /// MSI-X table entries: address, data, vector control.
    pub msix_table: Vec<(u64, u32, u32)>,
    /// MSI-X pending bits.
    pub msix_pba: u64,
    /// The back-end's own state (virtio-net: MAC, pending guest announcement).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<crate::BackendState>,
}

#[derive(Debug, Clone, Copy, Default)]
struct MsixEntry {
    address: u64,
    data: u32,
    control: u32,
}

struct QueueSlot {
    queue: Queue,
    msix_vector: u16,
}

/// What the transport and the `virtio-io` thread share.
pub(crate) struct Core {
    backend: Box<dyn VirtioBackend>,
    mem: GuestMemoryMmap,
    device_features: u64,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    status: u8,
    config_generation: u8,
    queue_select: u16,
    msix_config: u16,
    queues: Vec<QueueSlot>,
    isr: u8,
    msix_table: Vec<MsixEntry>,
    msix_pba: u64,
    msix_enabled: bool,
    msix_masked: bool,
    intx_disabled: bool,
    intx: SharedIrq,
    msi: Arc<dyn MsiSender>,
    /// The VM is paused: notifications are only remembered (bit per queue).
    paused: bool,
    pending: u64,
}

fn new_queue(max: u16) -> Queue {
    Queue::new(max).expect("queue maximum sizes are powers of two up to 32768")
}

impl Core {
    fn driver_ok(&self) -> bool {
        u32::from(self.status) & VIRTIO_CONFIG_S_DRIVER_OK != 0
            && u32::from(self.status) & VIRTIO_CONFIG_S_NEEDS_RESET == 0
    }

    /// Device reset (status 0): everything the driver set up is forgotten.
    fn reset(&mut self) {
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.driver_features = 0;
        self.status = 0;
        self.queue_select = 0;
        self.msix_config = NO_VECTOR;
        for q in &mut self.queues {
            q.queue = new_queue(q.queue.max_size());
            q.msix_vector = NO_VECTOR;
        }
        self.isr = 0;
        self.intx.set_level(false);
        self.backend.reset();
    }

    fn selected(&mut self) -> Option<&mut QueueSlot> {
        self.queues.get_mut(usize::from(self.queue_select))
    }

    fn common_bytes(&self) -> [u8; COMMON_LEN as usize] {
        let mut b = [0u8; COMMON_LEN as usize];
        let mut put = |off: usize, bytes: &[u8]| b[off..off + bytes.len()].copy_from_slice(bytes);
        put(0x00, &self.device_features_select.to_le_bytes());
        let features = match self.device_features_select {
            0 => self.device_features as u32,
            1 => (self.device_features >> 32) as u32,
            _ => 0,
        };
        put(0x04, &features.to_le_bytes());
        put(0x08, &self.driver_features_select.to_le_bytes());
        let driver = match self.driver_features_select {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        };
        put(0x0c, &driver.to_le_bytes());
        put(0x10, &self.msix_config.to_le_bytes());
        put(0x12, &(self.queues.len() as u16).to_le_bytes());
        put(0x14, &[self.status, self.config_generation]);
        put(0x16, &self.queue_select.to_le_bytes());
        if let Some(q) = self.queues.get(usize::from(self.queue_select)) {
            put(0x18, &q.queue.size().to_le_bytes());
            put(0x1a, &q.msix_vector.to_le_bytes());
            put(0x1c, &u16::from(q.queue.ready()).to_le_bytes());
            put(0x1e, &self.queue_select.to_le_bytes());
            put(0x20, &q.queue.desc_table().to_le_bytes());
            put(0x28, &q.queue.avail_ring().to_le_bytes());
            put(0x30, &q.queue.used_ring().to_le_bytes());
        }
        b
    }

    fn common_write(&mut self, offset: u64, data: &[u8]) {
        let v = data
            .iter()
            .take(8)
            .enumerate()
            .fold(0u64, |v, (i, b)| v | u64::from(*b) << (8 * i));
        let live = self.driver_ok();
        match (offset, data.len()) {
            (0x00, 4) => self.device_features_select = v as u32,
            (0x08, 4) => self.driver_features_select = v as u32,
            (0x0c, 4) if u32::from(self.status) & VIRTIO_CONFIG_S_FEATURES_OK == 0 => {
                match self.driver_features_select {
                    0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v,
                    1 => self.driver_features = (self.driver_features & 0xffff_ffff) | v << 32,
                    _ => {}
                }
            }
            (0x10, 2) => self.msix_config = self.checked_vector(v as u16),
            (0x14, 1) => self.write_status(v as u8),
            (0x16, 2) => self.queue_select = v as u16,
            (0x18, 2) if !live => {
                if let Some(q) = self.selected().filter(|q| !q.queue.ready()) {
                    // virtio-queue refuses (and logs) a size that is not a power of two up to
                    // the maximum; the register then keeps its value.
                    q.queue.set_size(v as u16);
                }
            }
            (0x1a, 2) => {
                let vector = self.checked_vector(v as u16);
                if let Some(q) = self.selected() {
                    q.msix_vector = vector;
                }
            }
            (0x1c, 2) if !live => {
                if let Some(q) = self.selected() {
                    if v == 1 {
                        q.queue.set_ready(true);
                    }
                }
            }
            (0x20 | 0x24 | 0x28 | 0x2c | 0x30 | 0x34, 4) | (0x20 | 0x28 | 0x30, 8) if !live => {
                let Some(q) = self.selected().filter(|q| !q.queue.ready()) else {
                    return;
                };
                let (low, high) = match (offset % 8, data.len()) {
                    (0, 8) => (Some(v as u32), Some((v >> 32) as u32)),
                    (0, _) => (Some(v as u32), None),
                    _ => (None, Some(v as u32)),
                };
                match offset & !7 {
                    0x20 => q.queue.set_desc_table_address(low, high),
                    0x28 => q.queue.set_avail_ring_address(low, high),
                    _ => q.queue.set_used_ring_address(low, high),
                }
            }
            _ => log::debug!(
                "virtio: ignored common config write of {} bytes at {offset:#x}",
                data.len()
            ),
        }
    }

    /// A vector the driver may use: past the table it reads back NO_VECTOR (§4.1.5.1.2).
    fn checked_vector(&self, v: u16) -> u16 {
        if usize::from(v) < self.msix_table.len() {
            v
        } else {
            NO_VECTOR
        }
    }

    fn write_status(&mut self, v: u8) {
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.status;
        let mut new = v;
        let new_bit = |new: u8, bit: u32| u32::from(new) & bit != 0 && u32::from(old) & bit == 0;
        if new_bit(new, VIRTIO_CONFIG_S_FEATURES_OK)
            && (self.driver_features & !self.device_features != 0
                || self.driver_features & (1 << VIRTIO_F_VERSION_1) == 0)
        {
            // Features never offered, or a legacy driver: FEATURES_OK does not stick.
            new &= !(VIRTIO_CONFIG_S_FEATURES_OK as u8);
        }
        // NEEDS_RESET is the device's to set.
        new = (new & !(VIRTIO_CONFIG_S_NEEDS_RESET as u8))
            | (old & VIRTIO_CONFIG_S_NEEDS_RESET as u8);
        self.status = new;
        if new_bit(new, VIRTIO_CONFIG_S_DRIVER_OK) {
            let event_idx = self.event_idx();
            for q in &mut self.queues {
                q.queue.set_event_idx(event_idx);
            }
            let bad = self
                .queues
                .iter()
                .position(|q| q.queue.ready() && !q.queue.is_valid(&self.mem));
            if let Some(i) = bad {
                log::warn!("virtio: queue {i} is not in guest RAM: device needs reset");
                self.needs_reset();
            }
            self.backend.activate(self.driver_features);
        }
    }

    /// Whether the driver accepted VIRTIO_RING_F_EVENT_IDX.
    fn event_idx(&self) -> bool {
        self.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0
    }

    fn needs_reset(&mut self) {
        self.status |= VIRTIO_CONFIG_S_NEEDS_RESET as u8;
        self.config_changed();
    }

    /// The device configuration changed: a new generation and a configuration interrupt.
    fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.signal(self.msix_config, ISR_CONFIG);
    }

    /// Raises an interrupt for `vector` (MSI-X) or sets `isr_bit` and INTx.
    fn signal(&mut self, vector: u16, isr_bit: u8) {
        if self.msix_enabled {
            let Some(entry) = self.msix_table.get(usize::from(vector)).copied() else {
                return;
            };
            if self.msix_masked || entry.control & 1 != 0 {
                self.msix_pba |= 1 << vector;
            } else {
                self.msi.send(vector, entry.address, entry.data);
            }
        } else {
            self.isr |= isr_bit;
            if !self.intx_disabled {
                self.intx.set_level(true);
            }
        }
    }

    /// Delivers pending MSI-X messages whose vectors are no longer masked.
    fn deliver_pending(&mut self) {
        if !self.msix_enabled || self.msix_masked {
            return;
        }
        for (i, e) in self.msix_table.iter().enumerate() {
            if self.msix_pba & (1 << i) != 0 && e.control & 1 == 0 {
                self.msix_pba &= !(1 << i);
                self.msi.send(i as u16, e.address, e.data);
            }
        }
    }

    fn read_isr(&mut self) -> u8 {
        let v = self.isr;
        self.isr = 0;
        self.intx.set_level(false);
        v
    }

    fn msix_read(&self, offset: u64, data: &mut [u8]) {
        let mut bytes = vec![0u8; self.msix_table.len() * 16];
        for (i, e) in self.msix_table.iter().enumerate() {
            bytes[i * 16..i * 16 + 8].copy_from_slice(&e.address.to_le_bytes());
            bytes[i * 16 + 8..i * 16 + 12].copy_from_slice(&e.data.to_le_bytes());
            bytes[i * 16 + 12..i * 16 + 16].copy_from_slice(&e.control.to_le_bytes());
        }
        copy_out(&bytes, offset, data);
    }

    fn msix_write(&mut self, offset: u64, data: &[u8]) {
        if !matches!(data.len(), 4 | 8) || offset % data.len() as u64 != 0 {
            return;
        }
        for (k, chunk) in data.chunks(4).enumerate() {
            let off = offset + 4 * k as u64;
            let Some(e) = self.msix_table.get_mut((off / 16) as usize) else {
                return;
            };
            let v = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            match off % 16 {
                0 => e.address = (e.address & !0xffff_ffff) | u64::from(v),
                4 => e.address = (e.address & 0xffff_ffff) | u64::from(v) << 32,
                8 => e.data = v,
                _ => {
                    e.control = v & 1;
                    continue;
                }
            }
            let (address, data) = (e.address, e.data);
            self.msi.program((off / 16) as u16, address, data);
        }
        self.deliver_pending();
    }

    /// Serves queue `index` after a notification.
    fn process(&mut self, index: usize) {
        if self.paused {
            self.pending |= 1 << index.min(63);
            return;
        }
        if !self.driver_ok() {
            return;
        }
        let Some(slot) = self.queues.get_mut(index) else {
            return;
        };
        if !slot.queue.ready() {
            return;
        }
        let vector = slot.msix_vector;
        let event_idx = slot.queue.event_idx_enabled();
        let first_used = slot.queue.next_used();
        let mut any = false;
        let result = loop {
            let used = match self
                .backend
                .process_queue(index, &mut slot.queue, &self.mem)
            {
                Ok(used) => used,
                Err(e) => break Err(e),
            };
            any |= used;
            if !event_idx {
                break Ok(());
            }
            // EVENT_IDX: ask to be notified from the next entry on (avail_event), then look
            // again in case the driver added one meanwhile — unless nothing moved (a receive
            // queue waiting for frames).
            match slot.queue.enable_notification(&self.mem) {
                Ok(true) if used => {}
                Ok(_) if self.backend.waiting_for_buffers(index) => {
                    // The back-end left available buffers unused because it needs more (a
                    // frame larger than them): be notified of the driver's next one.
                    match wait_for_next_buffer(&slot.queue, &self.mem) {
                        Ok(true) => {}
                        Ok(false) => break Ok(()),
                        Err(e) => break Err(crate::QueueError::Queue(e)),
                    }
                }
                Ok(_) => break Ok(()),
                Err(e) => break Err(crate::QueueError::Queue(e)),
            }
        };
        match result {
            Ok(()) => {
                if any && needs_notification(&slot.queue, &self.mem, first_used) {
                    self.signal(vector, ISR_QUEUE);
                }
            }
            Err(e) => {
                log::warn!("virtio: queue {index}: {e}: device needs reset");
                self.needs_reset();
            }
        }
    }
}

/// EVENT_IDX: sets `avail_event` to the driver's current available index, so its next buffer
/// is notified even though earlier ones are still unused; true if one came meanwhile.
fn wait_for_next_buffer(queue: &Queue, mem: &GuestMemoryMmap) -> Result<bool, virtio_queue::Error> {
    let avail = queue.avail_idx(mem, std::sync::atomic::Ordering::Acquire)?;
    let at = queue
        .used_ring()
        .checked_add(4 + 8 * u64::from(queue.size()))
        .ok_or(virtio_queue::Error::AddressOverflow)?;
    vm_memory::Bytes::write_obj(mem, avail.0.to_le(), GuestAddress(at))
        .map_err(virtio_queue::Error::GuestMemory)?;
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    Ok(queue.avail_idx(mem, std::sync::atomic::Ordering::Acquire)? != avail)
}

/// Whether the driver wants an interrupt now that the used ring went from `first_used` to
/// the queue's next used index: always without VIRTIO_RING_F_EVENT_IDX, else when `used_event`
/// is among the entries added (Linux's `vring_need_event`). Counted from the indices, not
/// from `add_used` calls, as a back-end may publish several entries at once.
fn needs_notification(queue: &Queue, mem: &GuestMemoryMmap, first_used: u16) -> bool {
    if !queue.event_idx_enabled() {
        return true;
    }
    let at = queue
        .avail_ring()
        .checked_add(4 + 2 * u64::from(queue.size()));
    // The used ring's entries and index are written before `used_event` is read.
    std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
    let Some(used_event) =
        at.and_then(|a| vm_memory::Bytes::read_obj::<u16>(mem, GuestAddress(a)).ok())
    else {
        return true;
    };
    let used_event = u16::from_le(used_event);
    let new = queue.next_used();
    new.wrapping_sub(used_event).wrapping_sub(1) < new.wrapping_sub(first_used)
}

/// Fills `data` with `bytes` from `offset` on, zeroes past their end: a read of a register
/// block (configuration space, capability, device config) at any offset and width.
pub(crate) fn copy_out(bytes: &[u8], offset: u64, data: &mut [u8]) {
    for (i, d) in data.iter_mut().enumerate() {
        *d = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| bytes.get(o))
            .copied()
            .unwrap_or(0);
    }
}

/// A virtio device on the PCI bus.
pub struct VirtioPci {
    config: PciConfig,
    core: Arc<Mutex<Core>>,
    notify: Arc<Vec<EventFd>>,
    ioevents: Option<Arc<dyn IoEventRegistrar>>,
    registered_at: Option<u64>,
    msix_cap: usize,
}

/// Errors creating a transport.
#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    /// An eventfd could not be created.
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
}

fn virtio_cap(cfg_type: u8, offset: u64, length: u64, extra: Option<u32>) -> Vec<u8> {
    let mut b = vec![
        0x09,
        0,
        if extra.is_some() { 20 } else { 16 },
        cfg_type,
        0,
        0,
        0,
        0,
    ];
    b.extend_from_slice(&(offset as u32).to_le_bytes());
    b.extend_from_slice(&(length as u32).to_le_bytes());
    if let Some(x) = extra {
        b.extend_from_slice(&x.to_le_bytes());
    }
    b
}

impl VirtioPci {
    /// A transport for `backend`, raising `intx` (the slot's INTA# line) or sending MSI-X
    /// messages through `msi`, with its queue notifications registered through `ioevents`
    /// (none: every notification is an MMIO exit the transport forwards itself).
    pub fn new(
        backend: Box<dyn VirtioBackend>,
        mem: GuestMemoryMmap,
        intx: SharedIrq,
        msi: Arc<dyn MsiSender>,
        ioevents: Option<Arc<dyn IoEventRegistrar>>,
    ) -> Result<Self, VirtioPciError> {
        let device_type = backend.device_type();
        let mut config =
            PciConfig::new(VIRTIO_VENDOR, 0x1040 + device_type, backend.pci_class(), 1);
        config.set_subsystem(VIRTIO_VENDOR, 0x1100);
        config.set_interrupt_pin(1);
        config.add_memory_bar(0, BAR_SIZE, false);
        let queues: Vec<QueueSlot> = backend
            .queue_max_sizes()
            .iter()
            .map(|&m| QueueSlot {
                queue: new_queue(m),
                msix_vector: NO_VECTOR,
            })
            .collect();
        let vectors = queues.len() + 1;
        let msix_cap = config.add_capability(
            &[
                &[0x11u8, 0][..],
                &((vectors - 1) as u16).to_le_bytes(),
                &(MSIX_TABLE_OFFSET as u32).to_le_bytes(),
                &(MSIX_PBA_OFFSET as u32).to_le_bytes(),
            ]
            .concat(),
            &[0, 0, 0, 0xc0],
        );
        config.add_capability(&virtio_cap(1, COMMON_OFFSET, COMMON_LEN, None), &[]);
        config.add_capability(&virtio_cap(3, ISR_OFFSET, 1, None), &[]);
        config.add_capability(&virtio_cap(4, DEVICE_OFFSET, 0x1000, None), &[]);
        config.add_capability(
            &virtio_cap(
                2,
                NOTIFY_OFFSET,
                u64::from(NOTIFY_MULTIPLIER) * queues.len() as u64,
                Some(NOTIFY_MULTIPLIER),
            ),
            &[],
        );
        let notify = queues
            .iter()
            .map(|_| EventFd::new(EFD_NONBLOCK).map_err(VirtioPciError::EventFd))
            .collect::<Result<Vec<_>, _>>()?;
        // Indirect descriptor tables are walked by virtio-queue's chains for every device.
        let device_features = backend.features()
            | 1 << VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_INDIRECT_DESC
            | 1 << VIRTIO_RING_F_EVENT_IDX;
        let core = Core {
            backend,
            mem,
            device_features,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            queue_select: 0,
            msix_config: NO_VECTOR,
            queues,
            isr: 0,
            msix_table: vec![
                MsixEntry {
                    control: 1,
                    ..Default::default()
                };
                vectors
            ],
            msix_pba: 0,
            msix_enabled: false,
            msix_masked: false,
            intx_disabled: false,
            intx,
            msi,
            paused: false,
            pending: 0,
        };
        Ok(Self {
            config,
            core: Arc::new(Mutex::new(core)),
            notify: Arc::new(notify),
            ioevents,
            registered_at: None,
            msix_cap,
        })
    }

    /// The event-loop subscriber serving this device's queues.
    pub fn subscriber(&self) -> Arc<dyn EventSubscriber + Send + Sync> {
        Arc::new(QueueHandler {
            core: self.core.clone(),
            notify: self.notify.clone(),
            ready: lock(&self.core).backend.ready_fd(),
        })
    }

    /// Has the back-end announce the guest to the network (virtio-net: one RARP frame, and
    /// with VIRTIO_NET_F_GUEST_ANNOUNCE the guest is asked to announce itself through a
    /// configuration change, once the driver is up).
    pub fn announce(&self) {
        let mut core = lock(&self.core);
        let features = core.driver_features;
        if core.backend.announce(features) && core.driver_ok() {
            core.config_changed();
        }
    }

    /// The handle that pauses this device's back-end with the VM.
    pub fn quiesce(&self) -> Arc<dyn devices::Quiesce> {
        Arc::new(QueueHandler {
            core: self.core.clone(),
            notify: self.notify.clone(),
            ready: None,
        })
    }

    /// Where queue notifications go now, if memory decode is on and BAR 0 is in the window.
    fn notify_base(&self) -> Option<u64> {
        let base = self.config.bar_address(0)?;
        (self.config.command() & COMMAND_MEMORY != 0
            && base >= PCI_MMIO_BASE
            && base + BAR_SIZE <= PCI_MMIO_END)
            .then_some(base + NOTIFY_OFFSET)
    }

    /// Moves the ioeventfds to where the notification structure is now.
    fn sync_ioevents(&mut self) {
        let Some(reg) = self.ioevents.clone() else {
            return;
        };
        let want = self.notify_base();
        if want == self.registered_at {
            return;
        }
        if let Some(old) = self.registered_at.take() {
            for (i, fd) in self.notify.iter().enumerate() {
                let addr = old + u64::from(NOTIFY_MULTIPLIER) * i as u64;
                if let Err(e) = reg.unregister(addr, fd) {
                    log::warn!("virtio: cannot remove the ioeventfd at {addr:#x}: {e}");
                }
            }
        }
        if let Some(new) = want {
            for (i, fd) in self.notify.iter().enumerate() {
                let addr = new + u64::from(NOTIFY_MULTIPLIER) * i as u64;
                if let Err(e) = reg.register(addr, fd) {
                    // The MMIO exit path still forwards the notification.
                    log::warn!("virtio: cannot register an ioeventfd at {addr:#x}: {e}");
                }
            }
            self.registered_at = Some(new);
        }
    }

    /// Copies the MSI-X and INTx-disable bits of the configuration space into the core.
    fn sync_interrupt_bits(&self) {
        let control = self.config.u16(self.msix_cap + 2);
        let mut core = lock(&self.core);
        core.msix_enabled = control & MSIX_ENABLE != 0;
        core.msix_masked = control & MSIX_FUNCTION_MASK != 0;
        core.intx_disabled = self.config.command() & COMMAND_INTX_DISABLE != 0;
        if core.msix_enabled || core.intx_disabled {
            core.intx.set_level(false);
        }
        core.deliver_pending();
    }

    /// A snapshot of everything the guest can observe.
    pub fn state(&self) -> VirtioPciState {
        let core = lock(&self.core);
        VirtioPciState {
            config: self.config.state(),
            device_features_select: core.device_features_select,
            driver_features_select: core.driver_features_select,
            driver_features: core.driver_features,
            status: core.status,
            config_generation: core.config_generation,
            queue_select: core.queue_select,
            msix_config: core.msix_config,
            queues: core
                .queues
                .iter()
                .map(|q| QueueState {
                    size: q.queue.size(),
                    ready: q.queue.ready(),
                    desc: q.queue.desc_table(),
                    avail: q.queue.avail_ring(),
                    used: q.queue.used_ring(),
                    next_avail: q.queue.next_avail(),
                    next_used: q.queue.next_used(),
                    msix_vector: q.msix_vector,
                })
                .collect(),
            isr: core.isr,
            msix_table: core
                .msix_table
                .iter()
                .map(|e| (e.address, e.data, e.control))
                .collect(),
            msix_pba: core.msix_pba,
            backend: core.backend.save_state(),
        }
    }

    /// Replaces the device's state with `state`, after checking all of it.
    pub fn restore(&mut self, state: &VirtioPciState) -> Result<(), VirtioPciStateError> {
        self.config.check(&state.config)?;
        let mut core = lock(&self.core);
        let count = |what, got: usize, want: usize| {
            if got == want {
                Ok(())
            } else {
                Err(VirtioPciStateError::Count { what, got, want })
            }
        };
        count("queues", state.queues.len(), core.queues.len())?;
        count(
            "msi-x vectors",
            state.msix_table.len(),
            core.msix_table.len(),
        )?;
        if state.driver_features & !core.device_features != 0 {
            return Err(VirtioPciStateError::Features(state.driver_features));
        }
        let vectors = core.msix_table.len();
        for v in state
            .queues
            .iter()
            .map(|q| q.msix_vector)
            .chain([state.msix_config])
        {
            if v != NO_VECTOR && usize::from(v) >= vectors {
                return Err(VirtioPciStateError::Vector(v));
            }
        }
        let mut queues = Vec::new();
        for (i, (s, slot)) in state.queues.iter().zip(&core.queues).enumerate() {
            let mut q = new_queue(slot.queue.max_size());
            q.try_set_size(s.size)
                .map_err(|_| VirtioPciStateError::QueueSize(i, s.size))?;
            q.try_set_desc_table_address(GuestAddress(s.desc))
                .and_then(|_| q.try_set_avail_ring_address(GuestAddress(s.avail)))
                .and_then(|_| q.try_set_used_ring_address(GuestAddress(s.used)))
                .map_err(|_| VirtioPciStateError::QueueAlign(i))?;
            q.set_ready(s.ready);
            q.set_event_idx(state.driver_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0);
            q.set_next_avail(s.next_avail);
            q.set_next_used(s.next_used);
            queues.push(QueueSlot {
                queue: q,
                msix_vector: s.msix_vector,
            });
        }
        // The back-end checks its part and takes it only if valid; then the rest is applied.
        core.backend
            .restore_state(state.backend.as_ref(), state.driver_features)?;
        if u32::from(state.status) & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            core.backend.activate(state.driver_features);
        }
        core.queues = queues;
        core.device_features_select = state.device_features_select;
        core.driver_features_select = state.driver_features_select;
        core.driver_features = state.driver_features;
        core.status = state.status;
        core.config_generation = state.config_generation;
        core.queue_select = state.queue_select;
        core.msix_config = state.msix_config;
        core.isr = state.isr;
        core.msix_table = state
            .msix_table
            .iter()
            .map(|&(address, data, control)| MsixEntry {
                address,
                data,
                control: control & 1,
            })
            .collect();
        core.msix_pba = state.msix_pba & ((1u64 << vectors) - 1);
        // Every queue is looked at when the VM runs (as QEMU's devices do on start): buffers
        // made available without a notification this side saw, a tap that became readable
        // before the driver state was here.
        core.pending = (1u64 << core.queues.len().min(63)) - 1;
        for (i, e) in core.msix_table.iter().enumerate() {
            core.msi.program(i as u16, e.address, e.data);
        }
        drop(core);
        self.config.restore(&state.config)?;
        self.sync_interrupt_bits();
        let core = lock(&self.core);
        core.intx
            .set_level(core.isr != 0 && !core.msix_enabled && !core.intx_disabled);
        drop(core);
        self.sync_ioevents();
        Ok(())
    }
}

impl PciDevice for VirtioPci {
    fn config(&self) -> &PciConfig {
        &self.config
    }

    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.config
    }

    fn config_written(&mut self, offset: usize, len: usize) {
        let touches = |start: usize, end: usize| offset < end && offset + len > start;
        if touches(self.msix_cap, self.msix_cap + 4) || touches(COMMAND, COMMAND + 2) {
            self.sync_interrupt_bits();
        }
        self.sync_ioevents();
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if bar != 0 {
            data.fill(0xff);
            return;
        }
        let mut core = lock(&self.core);
        match offset {
            o if o < COMMON_LEN => copy_out(&core.common_bytes(), o, data),
            o if (ISR_OFFSET..ISR_OFFSET + 4).contains(&o) => {
                let isr = if o == ISR_OFFSET { core.read_isr() } else { 0 };
                copy_out(&[isr], 0, data);
            }
            o if (DEVICE_OFFSET..NOTIFY_OFFSET).contains(&o) => {
                core.backend.read_config(o - DEVICE_OFFSET, data)
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                core.msix_read(o - MSIX_TABLE_OFFSET, data)
            }
            o if (MSIX_PBA_OFFSET..MSIX_PBA_OFFSET + 8).contains(&o) => {
                copy_out(&core.msix_pba.to_le_bytes(), o - MSIX_PBA_OFFSET, data)
            }
            _ => data.fill(0),
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar != 0 {
            return;
        }
        match offset {
            o if o < COMMON_LEN => lock(&self.core).common_write(o, data),
            o if (DEVICE_OFFSET..NOTIFY_OFFSET).contains(&o) => lock(&self.core)
                .backend
                .write_config(o - DEVICE_OFFSET, data),
            o if (NOTIFY_OFFSET..MSIX_TABLE_OFFSET).contains(&o) => {
                // A notification that KVM did not catch as an ioeventfd: forward it.
                let rel = o - NOTIFY_OFFSET;
                if rel % u64::from(NOTIFY_MULTIPLIER) == 0 {
                    if let Some(fd) = self
                        .notify
                        .get((rel / u64::from(NOTIFY_MULTIPLIER)) as usize)
                    {
                        let _ = fd.write(1);
                    }
                }
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                lock(&self.core).msix_write(o - MSIX_TABLE_OFFSET, data)
            }
            _ => {}
        }
    }
}

/// The `virtio-io` thread's view of one device: its notification eventfds, and the back-end's
/// own descriptor (a tap) with the queue it feeds.
struct QueueHandler {
    core: Arc<Mutex<Core>>,
    notify: Arc<Vec<EventFd>>,
    ready: Option<(std::os::fd::RawFd, usize)>,
}

/// Event data of the back-end's descriptor (queue indices are below it).
const READY_DATA: u32 = 1 << 16;

impl devices::Quiesce for QueueHandler {
    fn pause(&self) {
        let mut core = lock(&self.core);
        // The vCPUs are parked: a notification they made that the event loop has not served
        // yet is served now, so that nothing the guest made available before it stopped is
        // left behind (a migration saves the device next).
        for (i, fd) in self.notify.iter().enumerate() {
            if fd.read().is_ok() {
                core.process(i);
            }
        }
        core.paused = true;
    }

    fn resume(&self) {
        let mut core = lock(&self.core);
        core.paused = false;
        let pending = std::mem::take(&mut core.pending);
        drop(core);
        // Hand the remembered notifications back to the event loop.
        for (i, fd) in self.notify.iter().enumerate() {
            if pending & (1 << i.min(63)) != 0 {
                let _ = fd.write(1);
            }
        }
    }
}

impl EventSubscriber for QueueHandler {
    fn process(&self, events: Events, _ops: &mut EventOps) {
        if events.data() == READY_DATA {
            if let Some((_, index)) = self.ready {
                lock(&self.core).process(index);
            }
            return;
        }
        let index = events.data() as usize;
        if let Some(fd) = self.notify.get(index) {
            drain(fd);
            lock(&self.core).process(index);
        }
    }

    fn init(&self, ops: &mut EventOps) {
        for (i, fd) in self.notify.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(fd, i as u32, EventSet::IN)) {
                log::error!("virtio: cannot watch queue {i}'s notifications: {e}");
            }
        }
        if let Some((fd, _)) = self.ready {
            // Edge-triggered: the back-end reads until the descriptor is empty or the guest
            // has no buffers left; a notification of that queue resumes it.
            let set = EventSet::IN | EventSet::EDGE_TRIGGERED;
            if let Err(e) = ops.add(Events::with_data_raw(fd, READY_DATA, set)) {
                log::error!("virtio: cannot watch the back-end's descriptor: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::block::Block;

    #[derive(Default)]
    struct Msis(Mutex<Vec<(u64, u32)>>, Mutex<Vec<(u16, u64, u32)>>);
    impl MsiSender for Msis {
        fn program(&self, vector: u16, address: u64, data: u32) {
            self.1.lock().unwrap().push((vector, address, data));
        }
        fn send(&self, vector: u16, address: u64, data: u32) {
            assert!(
                self.1.lock().unwrap().contains(&(vector, address, data)),
                "programmed"
            );
            self.0.lock().unwrap().push((address, data));
        }
    }
    #[derive(Default)]
    struct Line(AtomicUsize, Mutex<bool>);
    impl devices::IrqLine for Line {
        fn set_level(&self, high: bool) {
            if high && !*self.1.lock().unwrap() {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
            *self.1.lock().unwrap() = high;
        }
    }

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const HDR: u64 = 0x4000;
    const DATA: u64 = 0x10000;
    const STATUS: u64 = 0x5000;

    struct Rig {
        dev: VirtioPci,
        mem: GuestMemoryMmap,
        msis: Arc<Msis>,
        line: Arc<Line>,
        avail_idx: u16,
        image: PathBuf,
    }

    use std::path::PathBuf;

    fn rig(name: &str, readonly: bool, sectors: u64) -> Rig {
        rig_with(name, readonly, sectors, None)
    }

    fn rig_with(name: &str, readonly: bool, sectors: u64, mem: Option<GuestMemoryMmap>) -> Rig {
        let image =
            std::env::temp_dir().join(format!("hopvm-virtio-{name}-{}", std::process::id()));
        std::fs::write(&image, vec![0u8; (sectors * 512) as usize]).unwrap();
        let mem = mem.unwrap_or_else(|| {
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
        });
        let msis = Arc::new(Msis::default());
        let line = Arc::new(Line::default());
        let blk = Block::open(&image, readonly, "hopvm-disk0").unwrap();
        let mut dev =
            VirtioPci::new(Box::new(blk), mem.clone(), line.clone(), msis.clone(), None).unwrap();
        dev.config_mut().set_bar_address(0, PCI_MMIO_BASE);
        dev.config_mut()
            .write(COMMAND, &[COMMAND_MEMORY as u8 | 4, 0]);
        dev.config_written(COMMAND, 2);
        Rig {
            dev,
            mem,
            msis,
            line,
            avail_idx: 0,
            image,
        }
    }

    impl Drop for Rig {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.image);
        }
    }

    impl Rig {
        fn w(&mut self, off: u64, v: u64, len: usize) {
            self.dev.bar_write(0, off, &v.to_le_bytes()[..len]);
        }
        fn r(&mut self, off: u64, len: usize) -> u64 {
            let mut b = [0u8; 8];
            self.dev.bar_read(0, off, &mut b[..len]);
            u64::from_le_bytes(b)
        }
        /// The driver's initialisation: features, one queue of 16, DRIVER_OK.
        fn init(&mut self, features_hi: u32) {
            self.init_with(0, features_hi);
        }

        fn init_with(&mut self, features_lo: u32, features_hi: u32) {
            self.w(0x14, 1, 1);
            self.w(0x14, 3, 1);
            self.w(0x08, 0, 4);
            self.w(0x0c, u64::from(features_lo), 4);
            self.w(0x08, 1, 4);
            self.w(0x0c, u64::from(features_hi), 4);
            self.w(0x14, 0xb, 1);
            self.w(0x16, 0, 2);
            self.w(0x18, 16, 2);
            self.w(0x20, DESC, 4);
            self.w(0x24, 0, 4);
            self.w(0x28, AVAIL, 8);
            self.w(0x30, USED, 8);
            self.w(0x1c, 1, 2);
            self.w(0x14, 0xf, 1);
        }
        fn desc(&self, i: u64, addr: u64, len: u32, flags: u16, next: u16) {
            let d = DESC + 16 * i;
            self.mem.write_obj(addr, GuestAddress(d)).unwrap();
            self.mem.write_obj(len, GuestAddress(d + 8)).unwrap();
            self.mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
            self.mem.write_obj(next, GuestAddress(d + 14)).unwrap();
        }
        /// Makes one flush request (header, status) available in queue 0's first slot,
        /// without notifying the device.
        fn queue_flush(&self) {
            self.mem.write_obj(0u16, GuestAddress(AVAIL + 4)).unwrap();
            self.mem.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
            self.desc(0, HDR, 16, 1, 1);
            self.desc(1, STATUS, 1, 2, 0);
            self.mem.write_obj(4u32, GuestAddress(HDR)).unwrap();
        }
        /// One request: header, `len` data bytes (device-writable for reads), status.
        fn request(&mut self, kind: u32, sector: u64, len: u32) -> (u8, u32) {
            self.mem.write_obj(kind, GuestAddress(HDR)).unwrap();
            self.mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
            self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
            let data_flags = if matches!(kind, 1 | 11 | 13) { 1 } else { 3 };
            self.desc(0, HDR, 16, 1, 1);
            if len > 0 {
                self.desc(1, DATA, len, data_flags, 2);
                self.desc(2, STATUS, 1, 2, 0);
            } else {
                self.desc(1, STATUS, 1, 2, 0);
            }
            let slot = u64::from(self.avail_idx % 16);
            self.mem
                .write_obj(0u16, GuestAddress(AVAIL + 4 + 2 * slot))
                .unwrap();
            self.avail_idx = self.avail_idx.wrapping_add(1);
            self.mem
                .write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
                .unwrap();
            // The notification, as an MMIO write, then the event loop's turn.
            self.w(NOTIFY_OFFSET, 0, 2);
            assert_eq!(self.dev.notify[0].read().unwrap(), 1);
            lock(&self.dev.core).process(0);
            let used_idx: u16 = self.mem.read_obj(GuestAddress(USED + 2)).unwrap();
            assert_eq!(used_idx, self.avail_idx);
            let slot = u64::from((used_idx - 1) % 16);
            let len: u32 = self
                .mem
                .read_obj(GuestAddress(USED + 4 + 8 * slot + 4))
                .unwrap();
            (self.mem.read_obj(GuestAddress(STATUS)).unwrap(), len)
        }
    }

    /// EVENT_IDX: a back-end waiting for more buffers sets `avail_event` to the driver's
    /// index (not the next unused entry), so the driver's next buffer is notified; and the
    /// interrupt check counts every entry published since the processing began.
    #[test]
    fn event_idx_helpers() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut q = new_queue(16);
        q.set_size(16);
        q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        q.set_used_ring_address(Some(USED as u32), Some(0));
        q.set_event_idx(true);
        q.set_ready(true);
        mem.write_obj(7u16, GuestAddress(AVAIL + 2)).unwrap();
        assert!(!wait_for_next_buffer(&q, &mem).unwrap());
        let avail_event: u16 = mem.read_obj(GuestAddress(USED + 4 + 8 * 16)).unwrap();
        assert_eq!(avail_event, 7);
        // used_event 4: entries 3..6 published at once include it, 5..6 do not.
        mem.write_obj(4u16, GuestAddress(AVAIL + 4 + 2 * 16))
            .unwrap();
        q.set_next_used(6);
        assert!(needs_notification(&q, &mem, 3));
        assert!(!needs_notification(&q, &mem, 5));
        q.set_event_idx(false);
        assert!(needs_notification(&q, &mem, 5));
    }

    #[test]
    fn pci_identity_and_capabilities() {
        let r = rig("ids", false, 8);
        let c = r.dev.config();
        assert_eq!(c.read_dword(0), 0x1042_1af4);
        assert_eq!(c.read_dword(2) >> 8, 0x01_00_00);
        assert_eq!(c.read_dword(0x2c / 4), 0x1100_1af4);
        // Walk the capability list: MSI-X, then common, ISR, device, notify.
        let mut p = c.read_dword(0x34 / 4) as usize & 0xff;
        let mut seen = Vec::new();
        while p != 0 {
            let d = c.read_dword(p / 4);
            let id = d & 0xff;
            seen.push(if id == 9 {
                (d >> 24) as u8
            } else {
                0x80 | id as u8
            });
            p = (d >> 8 & 0xff) as usize;
        }
        assert_eq!(seen, [0x91, 1, 3, 4, 2]);
    }

    #[test]
    fn write_read_flush_get_id_with_msix() {
        let mut r = rig("rw", false, 64);
        r.init(1);
        assert_eq!(r.r(0x14, 1), 0xf, "DRIVER_OK accepted");
        // MSI-X on, vector 1 for the queue.
        let cap = r.dev.msix_cap;
        r.dev.config_mut().write(cap + 3, &[0x80]);
        r.dev.config_written(cap + 3, 1);
        r.w(MSIX_TABLE_OFFSET + 16, 0xfee0_0000, 4);
        r.w(MSIX_TABLE_OFFSET + 24, 0x41, 4);
        r.w(MSIX_TABLE_OFFSET + 28, 0, 4);
        r.w(0x1a, 1, 2);
        assert_eq!(r.r(0x1a, 2), 1);
        let pattern: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
        r.mem.write_slice(&pattern, GuestAddress(DATA)).unwrap();
        assert_eq!(r.request(1, 8, 4096), (0, 1));
        let disk = std::fs::read(&r.image).unwrap();
        assert_eq!(&disk[8 * 512..8 * 512 + 4096], &pattern[..]);
        r.mem.write_slice(&[0u8; 4096], GuestAddress(DATA)).unwrap();
        assert_eq!(r.request(0, 8, 4096), (0, 4097));
        let mut back = vec![0u8; 4096];
        r.mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
        assert_eq!(back, pattern);
        assert_eq!(r.request(4, 0, 0), (0, 1));
        assert_eq!(r.request(8, 0, 20), (0, 21));
        let mut id = [0u8; 20];
        r.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id[..11], b"hopvm-disk0");
        // Past the end, unaligned length, unknown type.
        assert_eq!(r.request(0, 63, 1024).0, 1);
        assert_eq!(r.request(1, 0, 100).0, 1);
        assert_eq!(r.request(0, u64::MAX, 512).0, 1);
        assert_eq!(r.request(99, 0, 512).0, 2);
        let msis = r.msis.0.lock().unwrap().clone();
        assert_eq!(msis.len(), 8);
        assert!(msis.iter().all(|&m| m == (0xfee0_0000, 0x41)));
        // Masked vector: pending bit, delivered on unmask.
        r.w(MSIX_TABLE_OFFSET + 28, 1, 4);
        r.request(4, 0, 0);
        assert_eq!(r.r(MSIX_PBA_OFFSET, 8), 2);
        assert_eq!(r.msis.0.lock().unwrap().len(), 8);
        r.w(MSIX_TABLE_OFFSET + 28, 0, 4);
        assert_eq!(r.r(MSIX_PBA_OFFSET, 8), 0);
        assert_eq!(r.msis.0.lock().unwrap().len(), 9);
        assert_eq!(r.line.0.load(Ordering::SeqCst), 0, "no INTx under MSI-X");
    }

    #[test]
    fn event_idx_suppresses_and_rearms() {
        let mut r = rig("eventidx", false, 16);
        r.init_with(1 << 29, 1);
        assert_eq!(r.r(0x14, 1), 0xf);
        // avail_event follows next_avail; used_event 0: the first completion interrupts.
        assert_eq!(r.request(4, 0, 0).0, 0);
        let avail_event: u16 = r.mem.read_obj(GuestAddress(USED + 4 + 8 * 16)).unwrap();
        assert_eq!(avail_event, 1);
        assert_eq!(r.line.0.load(Ordering::SeqCst), 1);
        r.r(ISR_OFFSET, 1);
        // used_event = 5: completions 2 to 5 raise nothing, the 6th (used idx 6) does.
        r.mem
            .write_obj(5u16, GuestAddress(AVAIL + 4 + 2 * 16))
            .unwrap();
        for _ in 0..4 {
            assert_eq!(r.request(4, 0, 0).0, 0);
        }
        assert_eq!(r.line.0.load(Ordering::SeqCst), 1, "suppressed");
        assert_eq!(r.request(4, 0, 0).0, 0);
        assert_eq!(r.line.0.load(Ordering::SeqCst), 2);
        let avail_event: u16 = r.mem.read_obj(GuestAddress(USED + 4 + 8 * 16)).unwrap();
        assert_eq!(avail_event, 6);
        // The state carries it: a restored device keeps using EVENT_IDX.
        let state = r.dev.state();
        let mut other = rig_with("eventidx2", false, 16, Some(r.mem.clone()));
        other.dev.restore(&state).unwrap();
        assert!(lock(&other.dev.core).queues[0].queue.event_idx_enabled());
    }

    #[test]
    fn indirect_descriptor_tables() {
        let mut r = rig("indirect", false, 16);
        r.w(0x00, 0, 4);
        assert_ne!(
            r.r(0x04, 4) & (1 << 28),
            0,
            "VIRTIO_RING_F_INDIRECT_DESC offered"
        );
        r.init_with(1 << 28, 1);
        assert_eq!(r.r(0x14, 1), 0xf);
        // One descriptor (INDIRECT) pointing at a table of three: header, data, status.
        const TABLE: u64 = 0x6000;
        let put = |i: u64, addr: u64, len: u32, flags: u16, next: u16| {
            let d = TABLE + 16 * i;
            r.mem.write_obj(addr, GuestAddress(d)).unwrap();
            r.mem.write_obj(len, GuestAddress(d + 8)).unwrap();
            r.mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
            r.mem.write_obj(next, GuestAddress(d + 14)).unwrap();
        };
        put(0, HDR, 16, 1, 1);
        put(1, DATA, 512, 1, 2);
        put(2, STATUS, 1, 2, 0);
        r.mem.write_obj(1u32, GuestAddress(HDR)).unwrap();
        r.mem.write_obj(3u64, GuestAddress(HDR + 8)).unwrap();
        r.mem
            .write_slice(&[0x42u8; 512], GuestAddress(DATA))
            .unwrap();
        r.desc(0, TABLE, 48, 4, 0);
        r.mem.write_obj(0u16, GuestAddress(AVAIL + 4)).unwrap();
        r.mem.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
        lock(&r.dev.core).process(0);
        let st: u8 = r.mem.read_obj(GuestAddress(STATUS)).unwrap();
        assert_eq!(st, 0);
        let disk = std::fs::read(&r.image).unwrap();
        assert!(disk[3 * 512..4 * 512].iter().all(|&b| b == 0x42));
        // A table whose length is not a multiple of 16: the chain is refused, nothing written.
        r.desc(0, TABLE, 40, 4, 0);
        r.mem.write_obj(0u16, GuestAddress(AVAIL + 6)).unwrap();
        r.mem.write_obj(2u16, GuestAddress(AVAIL + 2)).unwrap();
        lock(&r.dev.core).process(0);
        let used: u16 = r.mem.read_obj(GuestAddress(USED + 2)).unwrap();
        assert_eq!(used, 2, "used, with nothing written");
    }

    #[test]
    fn write_zeroes_and_discard() {
        let mut r = rig("zero", false, 16);
        r.w(0x00, 0, 4);
        assert_eq!(
            r.r(0x04, 4) & (3 << 13),
            3 << 13,
            "DISCARD and WRITE_ZEROES offered"
        );
        assert_eq!(
            r.r(DEVICE_OFFSET + 0x30, 4),
            1 << 17,
            "max_write_zeroes_sectors"
        );
        r.init(1);
        r.mem
            .write_slice(&[0x77u8; 8192], GuestAddress(DATA))
            .unwrap();
        assert_eq!(r.request(1, 0, 8192).0, 0);
        let segment = |r: &Rig, sector: u64, count: u32, flags: u32| {
            r.mem.write_obj(sector, GuestAddress(DATA)).unwrap();
            r.mem.write_obj(count, GuestAddress(DATA + 8)).unwrap();
            r.mem.write_obj(flags, GuestAddress(DATA + 12)).unwrap();
        };
        segment(&r, 2, 3, 1);
        assert_eq!(r.request(13, 0, 16).0, 0);
        let disk = std::fs::read(&r.image).unwrap();
        assert!(disk[..1024].iter().all(|&b| b == 0x77));
        assert!(disk[1024..2560].iter().all(|&b| b == 0));
        assert!(disk[2560..8192].iter().all(|&b| b == 0x77));
        segment(&r, 8, 8, 0);
        assert_eq!(r.request(11, 0, 16).0, 0);
        // Past the end, unknown flags, unmap on a discard, two segments.
        segment(&r, 15, 2, 0);
        assert_eq!(r.request(13, 0, 16).0, 1);
        segment(&r, 0, 1, 2);
        assert_eq!(r.request(13, 0, 16).0, 2);
        segment(&r, 0, 1, 1);
        assert_eq!(r.request(11, 0, 16).0, 2);
        assert_eq!(r.request(13, 0, 32).0, 1);
        // A read-only disk offers neither and fails both.
        let mut ro = rig("zero-ro", true, 16);
        ro.w(0x00, 0, 4);
        assert_eq!(ro.r(0x04, 4) & (3 << 13), 0);
        ro.init(1);
        segment(&ro, 0, 1, 0);
        assert_eq!(ro.request(13, 0, 16).0, 1);
        assert_eq!(ro.request(11, 0, 16).0, 1);
    }

    #[test]
    fn readonly_disk_and_intx() {
        let mut r = rig("ro", true, 8);
        // VIRTIO_BLK_F_RO offered.
        r.w(0x00, 0, 4);
        assert_ne!(r.r(0x04, 4) & (1 << 5), 0);
        r.init(1);
        assert_eq!(
            r.request(1, 0, 512).0,
            1,
            "write to a read-only disk: IOERR"
        );
        assert_eq!(r.request(0, 0, 512).0, 0);
        assert_eq!(r.line.0.load(Ordering::SeqCst), 1);
        assert_eq!(r.r(ISR_OFFSET, 1), 1);
        assert!(!*r.line.1.lock().unwrap(), "reading the ISR lowers INTx");
        assert_eq!(r.r(ISR_OFFSET, 1), 0);
        // Capacity in the device configuration.
        assert_eq!(r.r(DEVICE_OFFSET, 8), 8);
    }

    #[test]
    fn bad_driver_input_never_panics() {
        let mut r = rig("bad", false, 8);
        // A legacy driver (no VERSION_1): FEATURES_OK does not stick.
        r.w(0x14, 3, 1);
        r.w(0x14, 0xb, 1);
        assert_eq!(r.r(0x14, 1), 3);
        r.w(0x14, 0, 1);
        // Nonsense queue sizes and addresses are refused by the queue.
        r.w(0x14, 3, 1);
        r.w(0x08, 1, 4);
        r.w(0x0c, 1, 4);
        r.w(0x14, 0xb, 1);
        r.w(0x18, 15, 2);
        assert_eq!(r.r(0x18, 2), 256, "not a power of two");
        r.w(0x18, 1024, 2);
        assert_eq!(r.r(0x18, 2), 256, "above the maximum");
        r.w(0x20, 0x1001, 8);
        assert_eq!(r.r(0x20, 8), 0, "misaligned");
        // Rings outside guest RAM: DRIVER_OK then NEEDS_RESET and a config interrupt.
        r.w(0x20, 0xdead_0000, 8);
        r.w(0x1c, 1, 2);
        r.w(0x14, 0xf, 1);
        assert_eq!(r.r(0x14, 1), 0x4f);
        assert_eq!(r.r(ISR_OFFSET, 1), 2);
        // A notification now does nothing.
        r.w(NOTIFY_OFFSET, 0, 2);
        assert_eq!(r.dev.notify[0].read().unwrap(), 1);
        lock(&r.dev.core).process(0);
        // Vector past the table reads back NO_VECTOR; odd widths and offsets everywhere.
        r.w(0x1a, 7, 2);
        assert_eq!(r.r(0x1a, 2), u64::from(NO_VECTOR));
        r.w(0x16, 9, 2);
        assert_eq!(r.r(0x18, 2), 0, "no such queue");
        for off in [
            0u64, 3, 0x37, 0x1001, 0x2fff, 0x3002, 0x4003, 0x4ffc, 0x5004, 0x7fff,
        ] {
            for len in [1usize, 2, 4, 8] {
                r.w(off, u64::MAX, len);
                r.r(off, len);
            }
        }
        // Reset recovers.
        r.w(0x14, 0, 1);
        assert_eq!(r.r(0x14, 1), 0);
        r.init(1);
        assert_eq!(r.r(0x14, 1), 0xf);
        assert_eq!(r.request(0, 0, 512).0, 0);
    }

    #[test]
    fn paused_device_serves_nothing_until_resumed() {
        let mut r = rig("pause", false, 8);
        r.init(1);
        let q = r.dev.quiesce();
        q.pause();
        r.queue_flush();
        lock(&r.dev.core).process(0);
        let used: u16 = r.mem.read_obj(GuestAddress(USED + 2)).unwrap();
        assert_eq!(used, 0, "nothing served while paused");
        q.resume();
        assert_eq!(
            r.dev.notify[0].read().unwrap(),
            1,
            "the notification is handed back"
        );
        lock(&r.dev.core).process(0);
        let used: u16 = r.mem.read_obj(GuestAddress(USED + 2)).unwrap();
        assert_eq!(used, 1);
    }

    /// A notification the event loop has not served when the device pauses (the vCPU made
    /// it just before it parked) is served by the pause, before a state save can see the
    /// request half-way; a restored device looks at every queue once it resumes.
    #[test]
    fn pause_serves_a_pending_notification_and_restore_rearms() {
        let mut r = rig("pause-pending", false, 8);
        r.init(1);
        r.queue_flush();
        // The guest's notification, not yet served by the event loop.
        r.w(NOTIFY_OFFSET, 0, 2);
        let q = r.dev.quiesce();
        q.pause();
        let used: u16 = r.mem.read_obj(GuestAddress(USED + 2)).unwrap();
        assert_eq!(used, 1, "served by the pause");
        assert!(r.dev.notify[0].read().is_err(), "and consumed");
        let state = r.dev.state();
        r.dev.restore(&state).unwrap();
        q.resume();
        assert_eq!(r.dev.notify[0].read().unwrap(), 1, "every queue looked at");
    }

    /// A request queued just before the source paused (its notification only remembered there)
    /// is served by the destination when the guest resumes: once, not lost.
    #[test]
    fn a_request_queued_before_the_save_is_served_after_the_restore() {
        let mut r = rig("inflight", false, 8);
        r.init(1);
        let q = r.dev.quiesce();
        q.pause();
        r.queue_flush();
        lock(&r.dev.core).process(0);
        let state = r.dev.state();
        // The destination: same RAM (as migrated), a device restored from the state, paused
        // until the guest resumes.
        let mut other = rig_with("inflight2", false, 8, Some(r.mem.clone()));
        let q2 = other.dev.quiesce();
        q2.pause();
        other.dev.restore(&state).unwrap();
        q2.resume();
        assert_eq!(
            other.dev.notify[0].read().unwrap(),
            1,
            "the ready queue is looked at"
        );
        lock(&other.dev.core).process(0);
        let used: u16 = r.mem.read_obj(GuestAddress(USED + 2)).unwrap();
        assert_eq!(used, 1, "served once");
        lock(&other.dev.core).process(0);
        let used: u16 = r.mem.read_obj(GuestAddress(USED + 2)).unwrap();
        assert_eq!(used, 1, "not twice");
    }

    #[test]
    fn rng_fills_every_buffer() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let msis = Arc::new(Msis::default());
        let line = Arc::new(Line::default());
        let mut dev = VirtioPci::new(
            Box::new(crate::rng::Entropy::new()),
            mem.clone(),
            line.clone(),
            msis.clone(),
            None,
        )
        .unwrap();
        assert_eq!(dev.config().read_dword(0), 0x1044_1af4);
        assert_eq!(dev.config().read_dword(2) >> 8, 0xff_00_00);
        dev.config_mut().set_bar_address(0, PCI_MMIO_BASE);
        dev.config_mut().write(COMMAND, &[COMMAND_MEMORY as u8, 0]);
        dev.config_written(COMMAND, 2);
        let mut r = Rig {
            dev,
            mem,
            msis,
            line,
            avail_idx: 0,
            image: PathBuf::from("/nonexistent"),
        };
        r.init(1);
        // Two writable buffers of 4 KiB in one chain, and a read-only one (gets nothing).
        r.mem.write_slice(&[0u8; 8192], GuestAddress(DATA)).unwrap();
        r.desc(0, DATA, 4096, 3, 1);
        r.desc(1, DATA + 4096, 4096, 2, 0);
        r.mem.write_obj(0u16, GuestAddress(AVAIL + 4)).unwrap();
        r.mem.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
        lock(&r.dev.core).process(0);
        let len: u32 = r.mem.read_obj(GuestAddress(USED + 8)).unwrap();
        assert_eq!(len, 8192);
        let mut got = vec![0u8; 8192];
        r.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert!(
            got.iter().filter(|&&b| b == 0).count() < 200,
            "random bytes"
        );
        r.desc(0, DATA, 16, 0, 0);
        r.mem.write_obj(0u16, GuestAddress(AVAIL + 6)).unwrap();
        r.mem.write_obj(2u16, GuestAddress(AVAIL + 2)).unwrap();
        lock(&r.dev.core).process(0);
        let len: u32 = r.mem.read_obj(GuestAddress(USED + 16)).unwrap();
        assert_eq!(len, 0);
        assert_eq!(r.line.0.load(Ordering::SeqCst), 1, "INTx raised");
    }

    #[test]
    fn an_avail_index_beyond_the_queue_needs_reset() {
        let mut r = rig("idx", false, 8);
        r.init(1);
        r.mem.write_obj(100u16, GuestAddress(AVAIL + 2)).unwrap();
        lock(&r.dev.core).process(0);
        assert_ne!(r.r(0x14, 1) & 0x40, 0);
    }

    #[test]
    fn state_round_trip_and_rejection() {
        let mut r = rig("state", false, 8);
        r.init(1);
        r.request(1, 0, 512);
        let state = r.dev.state();
        let json = serde_json::to_string(&state).unwrap();
        let state: VirtioPciState = serde_json::from_str(&json).unwrap();
        // A second device on the same RAM takes the state and goes on where the first
        // stopped.
        let mut other = rig_with("state2", false, 8, Some(r.mem.clone()));
        other.dev.restore(&state).unwrap();
        assert_eq!(other.dev.state(), state);
        other.avail_idx = r.avail_idx;
        assert_eq!(other.request(0, 0, 512).0, 0);
        let mut other = rig("state3", false, 8);
        let before = other.dev.state();
        for bad in [
            VirtioPciState {
                queues: vec![],
                ..state.clone()
            },
            VirtioPciState {
                driver_features: 1 << 60,
                ..state.clone()
            },
            VirtioPciState {
                msix_config: 5,
                ..state.clone()
            },
            {
                let mut s = state.clone();
                s.queues[0].size = 3;
                s
            },
            {
                let mut s = state.clone();
                s.queues[0].used = 1;
                s
            },
            {
                let mut s = state.clone();
                s.config.bytes[2] = 0;
                s
            },
        ] {
            assert!(other.dev.restore(&bad).is_err());
            assert_eq!(other.dev.state(), before, "nothing applied");
        }
    }
}

#[cfg(test)]
mod fuzz {
    //! A driver writing random values at random places: configuration space, every BAR
    //! register, MSI-X, and random rings and descriptors in RAM. Nothing may panic and a reset
    //! must always bring the device back.

    use vm_memory::{Bytes, GuestAddress};

    use super::tests_support::*;
    use super::*;

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    #[test]
    fn random_driver_never_panics() {
        for seed in 1..=8u64 {
            let (mut dev, mem, _img) = device(&format!("fuzz{seed}"));
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            for _ in 0..4000 {
                let r = rng.next();
                let len = [1usize, 2, 4, 8][(r & 3) as usize];
                let value = rng.next();
                match (r >> 2) % 8 {
                    0 => {
                        let off = (rng.next() % 0x110) as usize;
                        dev.config_mut().write(off, &value.to_le_bytes()[..len]);
                        dev.config_written(off, len);
                    }
                    1 | 2 => {
                        // The common configuration, where most of the state is.
                        let off = rng.next() % 0x40;
                        dev.bar_write(0, off, &value.to_le_bytes()[..len]);
                    }
                    3 => {
                        let off = rng.next() % BAR_SIZE;
                        dev.bar_write((rng.next() % 3) as usize, off, &value.to_le_bytes()[..len]);
                    }
                    4 => {
                        let mut b = [0u8; 8];
                        dev.bar_read(0, rng.next() % (BAR_SIZE + 16), &mut b[..len]);
                    }
                    5 => {
                        // Random bytes where a driver would put rings and descriptors.
                        let addr = rng.next() % 0x8000;
                        let _ = mem.write_obj(value, GuestAddress(addr));
                    }
                    6 => lock(&dev.core).process((rng.next() % 3) as usize),
                    _ => {
                        // A plausible driver set-up, so processing is reached often.
                        for (off, v, l) in [
                            (0x14u64, 0u64, 1usize),
                            (0x14, 3, 1),
                            (0x08, 1, 4),
                            (0x0c, 1, 4),
                            (0x14, 0xb, 1),
                            (0x18, 1 << (rng.next() % 9), 2),
                            (0x20, rng.next() % 0x8000, 8),
                            (0x28, rng.next() % 0x8000, 8),
                            (0x30, rng.next() % 0x8000, 8),
                            (0x1c, 1, 2),
                            (0x14, 0xf, 1),
                        ] {
                            dev.bar_write(0, off, &v.to_le_bytes()[..l]);
                        }
                    }
                }
            }
            // A reset always recovers.
            dev.bar_write(0, 0x14, &[0]);
            let mut s = [0u8];
            dev.bar_read(0, 0x14, &mut s);
            assert_eq!(s[0], 0);
            let state = dev.state();
            let json = serde_json::to_string(&state).unwrap();
            let back: VirtioPciState = serde_json::from_str(&json).unwrap();
            let (mut other, _, _img2) = device(&format!("fuzz{seed}b"));
            // Whatever the guest did, its state restores into a fresh device, or is refused.
            let _ = other.restore(&back);
        }
    }
}

#[cfg(test)]
mod tests_support {
    //! A device on a small RAM and image, for tests outside `tests`.

    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use vm_memory::GuestAddress;

    use super::*;
    use crate::block::Block;

    struct NoMsi;
    impl MsiSender for NoMsi {
        fn send(&self, _vector: u16, _address: u64, _data: u32) {}
    }
    struct NoLine(AtomicUsize);
    impl devices::IrqLine for NoLine {
        fn set_level(&self, _high: bool) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// An image removed on drop.
    pub struct Image(PathBuf);
    impl Drop for Image {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// A virtio-blk device on 64 KiB of RAM and a 16-sector image.
    pub fn device(name: &str) -> (VirtioPci, GuestMemoryMmap, Image) {
        let path = std::env::temp_dir().join(format!("hopvm-virtio-{name}-{}", std::process::id()));
        std::fs::write(&path, vec![0u8; 16 * 512]).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let blk = Block::open(&path, false, "").unwrap();
        let mut dev = VirtioPci::new(
            Box::new(blk),
            mem.clone(),
            Arc::new(NoLine(AtomicUsize::new(0))),
            Arc::new(NoMsi),
            None,
        )
        .unwrap();
        dev.config_mut().set_bar_address(0, PCI_MMIO_BASE);
        dev.config_mut().write(COMMAND, &[COMMAND_MEMORY as u8, 0]);
        dev.config_written(COMMAND, 2);
        (dev, mem, Image(path))
    }
}
