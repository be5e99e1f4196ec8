//! Virtio 1.x devices for hopvm, over the modern PCI transport.
//!
//! * [`pci::VirtioPci`] is the transport: a PCI function (a [`devices::pci::PciDevice`]) whose
//!   BAR 0 holds the common configuration, ISR, device configuration and notification
//!   structures and the MSI-X table and PBA, announced by vendor-specific capabilities as the
//!   virtio 1.x specification (§4.1) lays them out. Queues are rust-vmm's
//!   [`virtio_queue::Queue`].
//! * A device type plugs into the transport through [`VirtioBackend`]: its feature bits, its
//!   configuration space and the processing of a queue. [`block::Block`] is virtio-blk on a
//!   raw image, [`net::Net`] virtio-net on a tap device, [`rng::Entropy`] virtio-rng on the
//!   host's `getrandom`.
//! * Queue notifications arrive on one `EventFd` per queue — written by KVM itself when the
//!   VMM registered it as an ioeventfd on the notification address, or by the transport when
//!   the write reached it as an MMIO exit — and are served by [`event_loop::EventLoop`], one
//!   thread (`virtio-io`) running rust-vmm's `event-manager`, never on a vCPU thread.
//! * Interrupts go out as MSI-X messages through [`MsiSender`] (the VMM's irqfd per vector, or
//!   `KVM_SIGNAL_MSI` where a route could not be set), or
//!   as the legacy INTx line with the ISR register when the driver did not enable MSI-X.
//!
//! Locking: each transport's shared core (`Arc<Mutex<…>>`, the "virtio core" lock) is taken by
//! the vCPU path (under the big lock, through the PCI bus) and by the `virtio-io` thread
//! (without the big lock); disk I/O of a request happens under it, so a request is never half
//! done when a vCPU or a state save looks at the device.

use vmm_sys_util::eventfd::EventFd;

pub mod block;
pub mod event_loop;
pub mod net;
pub mod pci;
pub mod rng;

pub use block::{Block, BlockError};
pub use event_loop::EventLoop;
pub use net::{Net, NetError, NetState};
pub use pci::{VirtioPci, VirtioPciState, VirtioPciStateError};
pub use rng::Entropy;

/// Guest RAM as hopvm maps it (with the dirty bitmap of the VMM's own writes: a device's
/// writes into guest buffers are seen by live migration).
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;

/// Delivers a device's MSI-X messages into the guest.
pub trait MsiSender: Send + Sync {
    /// The guest (re)programmed table entry `vector`: its messages go to `address` with `data`
    /// now (the VMM moves the vector's irqfd route there).
    fn program(&self, _vector: u16, _address: u64, _data: u32) {}
    /// Delivers one message of `vector`, whose table entry holds `address` and `data`.
    fn send(&self, vector: u16, address: u64, data: u32);
}

/// Registers an `EventFd` to be written by the hypervisor when the guest writes the MMIO
/// address `addr` (KVM's ioeventfd), so a queue notification costs no trip through the VMM.
pub trait IoEventRegistrar: Send + Sync {
    /// Starts signalling `fd` on writes of any length to `addr`.
    fn register(&self, addr: u64, fd: &EventFd) -> std::io::Result<()>;
    /// Stops it.
    fn unregister(&self, addr: u64, fd: &EventFd) -> std::io::Result<()>;
}

/// A back-end's own part of a device's migration state (what the transport does not hold).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub enum BackendState {
    /// virtio-net: its MAC and pending guest announcement.
    Net(NetState),
}

/// Errors restoring a back-end's own state.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BackendStateError {
    /// The state is another device type's, or missing where the device has one.
    #[error("back-end state of the wrong device type")]
    WrongType,
    /// A guest announcement is pending but the driver never accepted GUEST_ANNOUNCE.
    #[error("a guest announcement is pending without VIRTIO_NET_F_GUEST_ANNOUNCE negotiated")]
    AnnounceNotNegotiated,
}

/// Why a queue cannot be served: the device then sets DEVICE_NEEDS_RESET.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// The rings are not in guest RAM or the available index is impossible.
    #[error("virtqueue: {0}")]
    Queue(#[source] virtio_queue::Error),
}

/// A virtio device type behind the PCI transport.
pub trait VirtioBackend: Send {
    /// The virtio device ID (2 = block).
    fn device_type(&self) -> u16;
    /// The PCI class code (class << 16 | subclass << 8 | prog-if).
    fn pci_class(&self) -> u32;
    /// The feature bits offered (VIRTIO_F_VERSION_1 is added by the transport).
    fn features(&self) -> u64;
    /// The maximum size of each queue (their number is the slice's length).
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads the device configuration space at `offset`; past its end reads as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device configuration space (ignored by default).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// A host descriptor whose readiness (edge-triggered, readable) means queue `index` has
    /// work (a tap device's incoming frames for the receive queue); none by default.
    fn ready_fd(&self) -> Option<(std::os::fd::RawFd, usize)> {
        None
    }

    /// Tells the network this device's guest is here now (after a migration: QEMU's
    /// self-announce), the driver having accepted `driver_features`; true if the device's
    /// configuration changed (the transport then raises a configuration interrupt). Nothing
    /// by default.
    fn announce(&mut self, _driver_features: u64) -> bool {
        false
    }

    /// Device reset: the back-end forgets what the driver set.
    fn reset(&mut self) {}

    /// The driver set DRIVER_OK having accepted `driver_features` (also on a restore of a
    /// running device).
    fn activate(&mut self, _driver_features: u64) {}

    /// Whether queue `index` has available buffers the back-end left unused because it needs
    /// more of them at once (virtio-net: a frame larger than the receive buffers posted so
    /// far): the transport then asks to be notified of the driver's next buffer.
    fn waiting_for_buffers(&self, _index: usize) -> bool {
        false
    }

    /// The back-end's own migration state, if it has any.
    fn save_state(&self) -> Option<BackendState> {
        None
    }

    /// Checks and takes `state` (from [`VirtioBackend::save_state`] of the source's device),
    /// the driver having accepted `driver_features`; on error nothing changed.
    fn restore_state(
        &mut self,
        state: Option<&BackendState>,
        _driver_features: u64,
    ) -> Result<(), BackendStateError> {
        match state {
            None => Ok(()),
            Some(_) => Err(BackendStateError::WrongType),
        }
    }

    /// Serves every available buffer of queue `index`; true if any was used.
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut virtio_queue::Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, QueueError>;
}

/// Reads an `EventFd`'s counter if it is set, so a level-triggered epoll stops reporting it.
/// (The descriptors are non-blocking: an unset one fails with EAGAIN, which is fine.)
pub(crate) fn drain(fd: &EventFd) {
    let _ = fd.read();
}
