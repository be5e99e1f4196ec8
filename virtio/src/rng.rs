//! virtio-rng (§5.4): every buffer the driver offers is filled with bytes from the host's
//! `getrandom(2)` (the same pool as QEMU's default `rng-random` on `/dev/urandom`), up to
//! 64 KiB per buffer.

use std::io::Write;

use virtio_queue::{Queue, QueueOwnedT, QueueT, Writer};

use crate::{GuestMemoryMmap, QueueError, VirtioBackend};

/// The virtio device ID of an entropy source.
pub const DEVICE_TYPE: u16 = 4;
/// The request queue's maximum size.
pub const QUEUE_SIZE: u16 = 256;
/// Most bytes given for one buffer.
const MAX_BYTES: usize = 64 << 10;

/// A virtio-rng device's back-end.
#[derive(Debug, Default)]
pub struct Entropy;

impl Entropy {
    /// An entropy source on the host's `getrandom`.
    pub fn new() -> Self {
        Self
    }
}

/// Fills `buf` from `getrandom(2)`.
fn fill(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: getrandom writes at most `rest.len()` bytes into `rest`, which we own.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        } else {
            done += n as usize;
        }
    }
    Ok(())
}

impl VirtioBackend for Entropy {
    fn device_type(&self) -> u16 {
        DEVICE_TYPE
    }

    fn pci_class(&self) -> u32 {
        // "Other" (PCI_CLASS_OTHERS), as QEMU's virtio-rng-pci.
        0xff_00_00
    }

    fn features(&self) -> u64 {
        0
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // virtio-rng has no configuration space.
        data.fill(0);
    }

    fn process_queue(
        &mut self,
        _index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, QueueError> {
        let mut used = false;
        let mut buf = vec![0u8; MAX_BYTES];
        loop {
            let chains: Vec<_> = queue.iter(mem).map_err(QueueError::Queue)?.collect();
            if chains.is_empty() {
                break;
            }
            for chain in chains {
                let head = chain.head_index();
                let len = match Writer::new(mem, chain) {
                    Ok(mut w) => {
                        let n = w.available_bytes().min(MAX_BYTES);
                        match fill(&mut buf[..n]).and_then(|()| w.write_all(&buf[..n])) {
                            Ok(()) => n as u32,
                            Err(e) => {
                                log::warn!("virtio-rng: {e}");
                                0
                            }
                        }
                    }
                    // A chain the queue cannot walk: used, with nothing written.
                    Err(_) => 0,
                };
                queue.add_used(mem, head, len).map_err(QueueError::Queue)?;
                used = true;
            }
        }
        Ok(used)
    }
}
