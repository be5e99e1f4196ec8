//! virtio-net (§5.1) on a Linux tap device: queue 0 receives, queue 1 transmits, queue 2 is
//! the control queue.
//!
//! The tap is opened with `IFF_VNET_HDR` and a 12-byte header, which is exactly the virtio 1.x
//! `virtio_net_hdr` (with `num_buffers`), so frames cross between the tap and the guest's
//! buffers unchanged. No offloads are offered (no checksum, no GSO), so every frame is a plain
//! Ethernet frame of at most 65535 bytes. Offered: VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS
//! (link up), VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_ANNOUNCE and VIRTIO_NET_F_MRG_RXBUF
//! (a received frame spread over as many receive chains as it takes, `num_buffers` in the
//! first header, the chains published with one store of the used index; without it a frame
//! goes into one chain or is dropped). A frame the tap cannot take right now (its queue is
//! full) is dropped, as a busy link drops it; a received frame waits (in the tap, or read and
//! held) until the guest posts the buffers it needs.
//!
//! The control queue answers the command classes QEMU's does without filtering: RX mode and
//! MAC table (acknowledged; the tap delivers every frame, as promiscuous), MAC address set
//! (the address RARP announcements come from), and ANNOUNCE_ACK; anything else gets
//! VIRTIO_NET_ERR. Self-announce ([`VirtioBackend::announce`]): a RARP frame from the MAC on
//! the tap, and, when the driver accepted GUEST_ANNOUNCE (with CTRL_VQ), VIRTIO_NET_S_ANNOUNCE
//! in the configuration status until the driver acknowledges it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::num::Wrapping;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK, VIRTIO_NET_CTRL_MAC,
    VIRTIO_NET_CTRL_MAC_ADDR_SET, VIRTIO_NET_CTRL_MAC_TABLE_SET, VIRTIO_NET_CTRL_RX,
    VIRTIO_NET_ERR, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_ANNOUNCE, VIRTIO_NET_F_MAC,
    VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS, VIRTIO_NET_OK, VIRTIO_NET_S_ANNOUNCE,
    VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{Queue, QueueOwnedT, QueueT, Reader, Writer};
use vm_memory::{Address, Bytes, GuestAddress};

use crate::{BackendState, BackendStateError, GuestMemoryMmap, QueueError, VirtioBackend};

/// The virtio device ID of a network card.
pub const DEVICE_TYPE: u16 = 1;
/// Each data queue's maximum size.
pub const QUEUE_SIZE: u16 = 256;
/// The control queue's maximum size (QEMU's: 64).
pub const CTRL_QUEUE_SIZE: u16 = 64;
/// The virtio-net header of virtio 1.x (with `num_buffers`).
pub const HEADER_LEN: usize = 12;
/// The largest frame plus its header.
const MAX_PACKET: usize = HEADER_LEN + 65535;
const RX: usize = 0;
const TX: usize = 1;
const CTRL: usize = 2;
/// GUEST_ANNOUNCE works only with the control queue the acknowledgement comes through.
const GUEST_ANNOUNCE: u64 = 1 << VIRTIO_NET_F_GUEST_ANNOUNCE | 1 << VIRTIO_NET_F_CTRL_VQ;

/// virtio-net's own migration state: what the transport does not hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetState {
    /// The MAC the driver set (VIRTIO_NET_CTRL_MAC_ADDR_SET), or the command line's.
    pub mac: [u8; 6],
    /// VIRTIO_NET_S_ANNOUNCE: the guest was asked to announce itself and has not acknowledged.
    pub announce: bool,
}

/// Errors opening the tap device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// /dev/net/tun could not be opened.
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(#[source] std::io::Error),
    /// The interface name is empty, too long or not a valid name.
    #[error("invalid tap interface name '{0}' (1 to 15 characters, no '/', ':' or spaces)")]
    Name(String),
    /// The kernel refused the tap (no permission, name taken by another kind of device…).
    #[error("cannot create tap device {0}: {1}")]
    Tap(String, #[source] std::io::Error),
    /// A handed-over descriptor is not a tap opened with IFF_VNET_HDR.
    #[error("descriptor {0} is not a tap device opened with IFF_TAP and IFF_VNET_HDR")]
    NotVnetTap(RawFd),
}

/// A virtio-net device's back-end.
pub struct Net {
    tap: File,
    name: String,
    /// The command line's MAC (a device reset returns to it).
    conf_mac: [u8; 6],
    mac: [u8; 6],
    /// VIRTIO_NET_S_ANNOUNCE is set.
    announce: bool,
    /// The driver accepted VIRTIO_NET_F_MRG_RXBUF.
    mrg_rxbuf: bool,
    /// The length of the frame in `buf` waiting for receive buffers (0: none).
    held: usize,
    /// A received frame (with its header).
    buf: Vec<u8>,
    /// A frame to transmit (apart: a received frame may be waiting in `buf`).
    tx_buf: Vec<u8>,
}

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl Net {
    /// Opens (creating it if needed) the tap interface `name`; the guest sees `mac`.
    pub fn open(name: &str, mac: [u8; 6]) -> Result<Self, NetError> {
        if name.is_empty()
            || name.len() > 15
            || name
                .bytes()
                .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace())
        {
            return Err(NetError::Name(name.to_string()));
        }
        let tap = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(NetError::OpenTun)?;
        let mut req = IfReq {
            name: [0; 16],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        let err = |e| NetError::Tap(name.to_string(), e);
        // SAFETY: TUNSETIFF reads a `struct ifreq` (40 bytes, which IfReq is) from a valid
        // pointer and writes the name back into it.
        if unsafe { libc::ioctl(tap.as_raw_fd(), libc::TUNSETIFF, &mut req) } < 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
        let hdr: libc::c_int = HEADER_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from a valid pointer.
        if unsafe { libc::ioctl(tap.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr) } < 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
        Ok(Self::with_tap(tap, name.to_string(), mac))
    }

    /// Takes a tap descriptor someone else opened (libvirt's `-netdev tap,fd=N`): it must be a
    /// tap with IFF_VNET_HDR; it is made non-blocking with the 12-byte header.
    pub fn from_fd(fd: OwnedFd, mac: [u8; 6]) -> Result<Self, NetError> {
        let raw = fd.as_raw_fd();
        let mut req = IfReq {
            name: [0; 16],
            flags: 0,
            _pad: [0; 22],
        };
        // SAFETY: TUNGETIFF writes a `struct ifreq` (IfReq's 40 bytes) to a valid pointer; on
        // a descriptor that is not a tap it fails and writes nothing.
        if unsafe { libc::ioctl(raw, libc::TUNGETIFF, &mut req) } < 0 {
            return Err(NetError::NotVnetTap(raw));
        }
        let want = (libc::IFF_TAP | libc::IFF_VNET_HDR) as libc::c_short;
        if req.flags & want != want {
            return Err(NetError::NotVnetTap(raw));
        }
        let name_len = req.name.iter().position(|&b| b == 0).unwrap_or(16);
        let name = String::from_utf8_lossy(&req.name[..name_len]).into_owned();
        let hdr: libc::c_int = HEADER_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int; F_GETFL / F_SETFL only change the
        // descriptor's status flags.
        unsafe {
            if libc::ioctl(raw, libc::TUNSETVNETHDRSZ, &hdr) < 0 {
                return Err(NetError::Tap(name, std::io::Error::last_os_error()));
            }
            let fl = libc::fcntl(raw, libc::F_GETFL);
            libc::fcntl(raw, libc::F_SETFL, fl | libc::O_NONBLOCK);
        }
        Ok(Self::with_tap(File::from(fd), name, mac))
    }

    fn with_tap(tap: File, name: String, mac: [u8; 6]) -> Self {
        Self {
            tap,
            name,
            conf_mac: mac,
            mac,
            announce: false,
            mrg_rxbuf: false,
            held: 0,
            buf: vec![0; MAX_PACKET],
            tx_buf: vec![0; MAX_PACKET],
        }
    }

    /// The tap interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Guest → tap: every available transmit chain, one frame each.
    fn transmit(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, QueueError> {
        let mut used = false;
        loop {
            let chains: Vec<_> = queue.iter(mem).map_err(QueueError::Queue)?.collect();
            if chains.is_empty() {
                return Ok(used);
            }
            for chain in chains {
                let head = chain.head_index();
                if let Ok(mut r) = Reader::new(mem, chain) {
                    let n = r.available_bytes().min(MAX_PACKET);
                    if n > HEADER_LEN && r.read_exact(&mut self.tx_buf[..n]).is_ok() {
                        if let Err(e) = (&self.tap).write(&self.tx_buf[..n]) {
                            if e.kind() != std::io::ErrorKind::WouldBlock {
                                log::warn!("virtio-net {}: {e}", self.name);
                            }
                        }
                    }
                }
                queue.add_used(mem, head, 0).map_err(QueueError::Queue)?;
                used = true;
            }
        }
    }

    /// Control commands: each chain holds `class`, `command` and the command's data, read
    /// by the device, then one byte the device writes: VIRTIO_NET_OK or VIRTIO_NET_ERR.
    fn control(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, QueueError> {
        let mut used = false;
        loop {
            let chains: Vec<_> = queue.iter(mem).map_err(QueueError::Queue)?.collect();
            if chains.is_empty() {
                return Ok(used);
            }
            for chain in chains {
                let head = chain.head_index();
                let len = match (Reader::new(mem, chain.clone()), Writer::new(mem, chain)) {
                    (Ok(mut r), Ok(mut w)) if w.available_bytes() >= 1 => {
                        let mut cmd = [0u8; 2];
                        let ack = if r.read_exact(&mut cmd).is_ok() {
                            self.command(cmd[0], cmd[1], &mut r)
                        } else {
                            VIRTIO_NET_ERR as u8
                        };
                        match w.write_all(&[ack]) {
                            Ok(()) => 1,
                            Err(_) => 0,
                        }
                    }
                    // No room for the acknowledgement (or descriptors outside RAM): the
                    // chain is returned unanswered.
                    _ => 0,
                };
                queue.add_used(mem, head, len).map_err(QueueError::Queue)?;
                used = true;
            }
        }
    }

    /// One control command; its data is in `data`.
    fn command<B: vm_memory::bitmap::BitmapSlice>(
        &mut self,
        class: u8,
        cmd: u8,
        data: &mut Reader<'_, B>,
    ) -> u8 {
        let ok = match (u32::from(class), u32::from(cmd)) {
            // Promiscuous, all-multicast … (1 byte each): the tap delivers everything.
            (VIRTIO_NET_CTRL_RX, 0..=5) => data.available_bytes() >= 1,
            (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_TABLE_SET) => true,
            (VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET) => {
                let mut mac = [0u8; 6];
                let ok = data.available_bytes() == 6 && data.read_exact(&mut mac).is_ok();
                if ok {
                    self.mac = mac;
                }
                ok
            }
            (VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK) if self.announce => {
                self.announce = false;
                true
            }
            _ => false,
        };
        if ok {
            VIRTIO_NET_OK as u8
        } else {
            VIRTIO_NET_ERR as u8
        }
    }

    /// Tap → guest: frames while there are receive buffers. A frame waits in `held` while
    /// the buffers it needs are not there yet.
    fn receive(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, QueueError> {
        let mut used = false;
        loop {
            if self.held == 0 {
                if queue
                    .avail_idx(mem, Ordering::Acquire)
                    .map_err(QueueError::Queue)?
                    == Wrapping(queue.next_avail())
                {
                    // No buffer: the frame stays in the tap.
                    return Ok(used);
                }
                match (&self.tap).read(&mut self.buf) {
                    Ok(n) if n >= HEADER_LEN => self.held = n,
                    Ok(_) => continue,
                    Err(e) => {
                        // Nothing to receive (or the tap went away).
                        if e.kind() != std::io::ErrorKind::WouldBlock {
                            log::warn!("virtio-net {}: {e}", self.name);
                        }
                        return Ok(used);
                    }
                }
            }
            if !self.place(queue, mem)? {
                return Ok(used);
            }
            self.held = 0;
            used = true;
        }
    }

    /// Puts the held frame into the guest's receive buffers: one chain, or with
    /// VIRTIO_NET_F_MRG_RXBUF as many as it takes (`num_buffers` in the header), published
    /// together. False if the buffers are not there yet (the frame stays held). A frame that
    /// can never fit (a buffer that takes nothing, or more than the whole ring) is dropped:
    /// its chains are used with length 0.
    fn place(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, QueueError> {
        let n = self.held;
        let start = queue.next_avail();
        let mut chains = Vec::new();
        let mut room = 0;
        let mut drop = false;
        while room < n {
            let Some(chain) = queue.iter(mem).map_err(QueueError::Queue)?.next() else {
                if chains.len() >= usize::from(queue.size()) {
                    drop = true;
                    break;
                }
                queue.set_next_avail(start);
                return Ok(false);
            };
            let cap = Writer::new(mem, chain.clone())
                .map(|w| w.available_bytes())
                .unwrap_or(0);
            room += cap;
            chains.push(chain);
            if cap == 0 || (!self.mrg_rxbuf && room < n) {
                // Without mergeable buffers a frame goes into one chain or is dropped.
                drop = true;
                break;
            }
        }
        self.buf[10..12].copy_from_slice(&(chains.len() as u16).to_le_bytes());
        let mut used = Vec::with_capacity(chains.len());
        let mut off = 0;
        for chain in chains {
            let head = chain.head_index();
            let mut len = 0;
            if !drop {
                if let Ok(mut w) = Writer::new(mem, chain) {
                    let take = w.available_bytes().min(n - off);
                    if w.write_all(&self.buf[off..off + take]).is_ok() {
                        len = take;
                        off += take;
                    }
                }
            }
            used.push((head, len as u32));
        }
        publish(queue, mem, &used)?;
        Ok(true)
    }
}
/// Adds `used` (head, length) to the used ring with one store of its index, so the driver
/// sees a frame's buffers together: the entries but the last are written first, the last goes
/// through `add_used`, which publishes them all.
fn publish(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    used: &[(u16, u32)],
) -> Result<(), QueueError> {
    let Some((&(last_head, last_len), rest)) = used.split_last() else {
        return Ok(());
    };
    let size = queue.size();
    let first = queue.next_used();
    for (i, &(head, len)) in rest.iter().enumerate() {
        let slot = u64::from(first.wrapping_add(i as u16) % size);
        let addr = GuestAddress(queue.used_ring())
            .checked_add(4 + 8 * slot)
            .ok_or(QueueError::Queue(virtio_queue::Error::AddressOverflow))?;
        mem.write_obj(u32::from(head).to_le(), addr)
            .and_then(|()| mem.write_obj(len.to_le(), addr.unchecked_add(4)))
            .map_err(|e| QueueError::Queue(virtio_queue::Error::GuestMemory(e)))?;
    }
    queue.set_next_used(first.wrapping_add(rest.len() as u16));
    queue
        .add_used(mem, last_head, last_len)
        .map_err(QueueError::Queue)
}

/// The self-announce frame QEMU sends after a migration: a broadcast RARP request ("reverse
/// request", opcode 3) from `mac`, padded to 60 bytes, behind a zeroed virtio-net header.
pub fn rarp_frame(mac: [u8; 6]) -> Vec<u8> {
    let mut f = vec![0u8; HEADER_LEN];
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&0x8035u16.to_be_bytes());
    f.extend_from_slice(&1u16.to_be_bytes()); // hardware: Ethernet
    f.extend_from_slice(&0x0800u16.to_be_bytes()); // protocol: IPv4
    f.extend_from_slice(&[6, 4]);
    f.extend_from_slice(&3u16.to_be_bytes()); // reverse request
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0; 4]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0; 4]);
    f.resize(HEADER_LEN + 60, 0);
    f
}

impl VirtioBackend for Net {
    fn announce(&mut self, driver_features: u64) -> bool {
        if let Err(e) = (&self.tap).write(&rarp_frame(self.mac)) {
            if e.kind() != std::io::ErrorKind::WouldBlock {
                log::warn!("virtio-net {}: announce: {e}", self.name);
            }
        }
        if driver_features & GUEST_ANNOUNCE == GUEST_ANNOUNCE {
            self.announce = true;
            return true;
        }
        false
    }

    fn reset(&mut self) {
        self.announce = false;
        self.mac = self.conf_mac;
        self.mrg_rxbuf = false;
        // A frame read for the old driver's buffers is dropped, as a link drops it.
        self.held = 0;
    }

    fn waiting_for_buffers(&self, index: usize) -> bool {
        index == RX && self.held != 0
    }

    fn activate(&mut self, driver_features: u64) {
        self.mrg_rxbuf = driver_features & 1 << VIRTIO_NET_F_MRG_RXBUF != 0;
    }

    fn save_state(&self) -> Option<BackendState> {
        Some(BackendState::Net(NetState {
            mac: self.mac,
            announce: self.announce,
        }))
    }

    fn restore_state(
        &mut self,
        state: Option<&BackendState>,
        driver_features: u64,
    ) -> Result<(), BackendStateError> {
        match state {
            // A source without the back-end's part: nothing the driver set.
            None => {
                self.reset();
                Ok(())
            }
            Some(BackendState::Net(s)) => {
                if s.announce && driver_features & GUEST_ANNOUNCE != GUEST_ANNOUNCE {
                    return Err(BackendStateError::AnnounceNotNegotiated);
                }
                self.mac = s.mac;
                self.announce = s.announce;
                self.held = 0;
                Ok(())
            }
            #[allow(unreachable_patterns)]
            Some(_) => Err(BackendStateError::WrongType),
        }
    }

    fn device_type(&self) -> u16 {
        DEVICE_TYPE
    }

    fn pci_class(&self) -> u32 {
        // Network controller, Ethernet.
        0x02_00_00
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_NET_F_MAC
            | 1 << VIRTIO_NET_F_STATUS
            | 1 << VIRTIO_NET_F_MRG_RXBUF
            | GUEST_ANNOUNCE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE, CTRL_QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_net_config: mac[6], status (u16).
        let mut bytes = [0u8; 8];
        bytes[..6].copy_from_slice(&self.mac);
        let status = VIRTIO_NET_S_LINK_UP
            | if self.announce {
                VIRTIO_NET_S_ANNOUNCE
            } else {
                0
            };
        bytes[6..8].copy_from_slice(&(status as u16).to_le_bytes());
        crate::pci::copy_out(&bytes, offset, data);
    }

    fn ready_fd(&self) -> Option<(RawFd, usize)> {
        Some((self.tap.as_raw_fd(), RX))
    }

    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, QueueError> {
        match index {
            RX => self.receive(queue, mem),
            TX => self.transmit(queue, mem),
            CTRL => self.control(queue, mem),
            _ => Ok(false),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const DATA: u64 = 0x4000;
    const ACK: u64 = 0x5000;

    /// A tap-backed device (needs root, as the CI machine is) and a control queue of 16 in
    /// 1 MiB of guest memory.
    fn net(tag: &str) -> (Net, Queue, GuestMemoryMmap) {
        let name = format!("hvu{tag}{}", std::process::id() % 10_000);
        let n = Net::open(&name, [2, 0, 0, 0, 0, 1]).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut q = Queue::new(16).unwrap();
        q.set_size(16);
        q.set_desc_table_address(Some(DESC as u32), Some(0));
        q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        q.set_used_ring_address(Some(USED as u32), Some(0));
        q.set_ready(true);
        (n, q, mem)
    }

    /// One control command with `data`: the ack byte and the used length.
    fn command(
        n: &mut Net,
        q: &mut Queue,
        mem: &GuestMemoryMmap,
        cmd: [u8; 2],
        data: &[u8],
    ) -> (u8, u32) {
        let desc = |i: u64, addr: u64, len: u32, flags: u16, next: u16| {
            let d = DESC + 16 * i;
            mem.write_obj(addr, GuestAddress(d)).unwrap();
            mem.write_obj(len, GuestAddress(d + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
            mem.write_obj(next, GuestAddress(d + 14)).unwrap();
        };
        mem.write_slice(&cmd, GuestAddress(DATA)).unwrap();
        mem.write_slice(data, GuestAddress(DATA + 2)).unwrap();
        mem.write_obj(0xeeu8, GuestAddress(ACK)).unwrap();
        desc(0, DATA, 2 + data.len() as u32, 1, 1);
        desc(1, ACK, 1, 2, 0);
        let idx: u16 = mem.read_obj(GuestAddress(AVAIL + 2)).unwrap();
        mem.write_obj(0u16, GuestAddress(AVAIL + 4 + 2 * u64::from(idx % 16)))
            .unwrap();
        mem.write_obj(idx.wrapping_add(1), GuestAddress(AVAIL + 2))
            .unwrap();
        assert!(n.process_queue(CTRL, q, mem).unwrap());
        let len: u32 = mem
            .read_obj(GuestAddress(USED + 4 + 8 * u64::from(idx % 16) + 4))
            .unwrap();
        (mem.read_obj(GuestAddress(ACK)).unwrap(), len)
    }

    fn status(n: &Net) -> u16 {
        let mut b = [0u8; 2];
        n.read_config(6, &mut b);
        u16::from_le_bytes(b)
    }

    #[test]
    fn control_queue_commands() {
        let (mut n, mut q, mem) = net("c");
        let (ok, err) = (VIRTIO_NET_OK as u8, VIRTIO_NET_ERR as u8);
        // Promiscuous on: acknowledged (the tap delivers everything).
        assert_eq!(command(&mut n, &mut q, &mem, [0, 0], &[1]), (ok, 1));
        assert_eq!(command(&mut n, &mut q, &mem, [1, 0], &[0; 8]), (ok, 1));
        // The MAC: set, then read back from the configuration space and used by RARP.
        let mac = [2, 0, 0, 0, 0, 0x42];
        assert_eq!(command(&mut n, &mut q, &mem, [1, 1], &mac), (ok, 1));
        let mut cfg = [0u8; 6];
        n.read_config(0, &mut cfg);
        assert_eq!(cfg, mac);
        assert_eq!(command(&mut n, &mut q, &mem, [1, 1], &mac[..5]), (err, 1));
        // An acknowledgement with nothing pending, unknown classes and commands: errors.
        assert_eq!(command(&mut n, &mut q, &mem, [3, 0], &[]), (err, 1));
        assert_eq!(command(&mut n, &mut q, &mem, [9, 0], &[]), (err, 1));
        assert_eq!(command(&mut n, &mut q, &mem, [0, 9], &[1]), (err, 1));
        // Announce: the status bit with GUEST_ANNOUNCE only, cleared by the acknowledgement.
        assert!(!n.announce(0));
        assert_eq!(status(&n), VIRTIO_NET_S_LINK_UP as u16);
        assert!(n.announce(GUEST_ANNOUNCE));
        assert_eq!(
            status(&n),
            (VIRTIO_NET_S_LINK_UP | VIRTIO_NET_S_ANNOUNCE) as u16
        );
        assert_eq!(command(&mut n, &mut q, &mem, [3, 0], &[]), (ok, 1));
        assert_eq!(status(&n), VIRTIO_NET_S_LINK_UP as u16);
        // A device reset forgets the driver's MAC and a pending announcement.
        assert!(n.announce(GUEST_ANNOUNCE));
        n.reset();
        n.read_config(0, &mut cfg);
        assert_eq!(
            (cfg, status(&n)),
            ([2, 0, 0, 0, 0, 1], VIRTIO_NET_S_LINK_UP as u16)
        );
    }

    /// A chain without room for the acknowledgement is returned unanswered, not a failure.
    #[test]
    fn control_chain_without_ack_room() {
        let (mut n, mut q, mem) = net("r");
        let d = DESC;
        mem.write_obj(DATA, GuestAddress(d)).unwrap();
        mem.write_obj(2u32, GuestAddress(d + 8)).unwrap();
        mem.write_obj(0u16, GuestAddress(d + 12)).unwrap();
        mem.write_obj(0u16, GuestAddress(AVAIL + 4)).unwrap();
        mem.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
        assert!(n.process_queue(CTRL, &mut q, &mem).unwrap());
        let len: u32 = mem.read_obj(GuestAddress(USED + 8)).unwrap();
        assert_eq!(len, 0);
    }

    /// Receive chains of `len` writable bytes each in descriptors `first`… (buffer of
    /// descriptor d at DATA + 0x1000 × d), made available.
    fn rx_buffers(mem: &GuestMemoryMmap, first: u16, count: u16, len: u32) {
        let idx: u16 = mem.read_obj(GuestAddress(AVAIL + 2)).unwrap();
        for i in 0..count {
            let d = first + i;
            let at = DESC + 16 * u64::from(d);
            mem.write_obj(DATA + 0x1000 * u64::from(d), GuestAddress(at))
                .unwrap();
            mem.write_obj(len, GuestAddress(at + 8)).unwrap();
            mem.write_obj(2u16, GuestAddress(at + 12)).unwrap();
            let slot = u64::from(idx.wrapping_add(i) % 16);
            mem.write_obj(d, GuestAddress(AVAIL + 4 + 2 * slot))
                .unwrap();
        }
        mem.write_obj(idx.wrapping_add(count), GuestAddress(AVAIL + 2))
            .unwrap();
    }

    /// VIRTIO_NET_F_MRG_RXBUF: a frame spread over as many buffers as it takes, `num_buffers`
    /// in the first one's header, all published with one index store; not enough buffers
    /// yet: the frame waits; without the feature a frame too big for one buffer is dropped.
    #[test]
    fn mergeable_receive_buffers() {
        let (mut n, mut q, mem) = net("m");
        n.activate(1 << VIRTIO_NET_F_MRG_RXBUF);
        let frame: Vec<u8> = (0..HEADER_LEN + 250).map(|i| i as u8).collect();
        n.buf[..frame.len()].copy_from_slice(&frame);
        n.held = frame.len();
        // Two buffers of 100 bytes: not enough, nothing used, the frame still held.
        rx_buffers(&mem, 0, 2, 100);
        assert!(!n.place(&mut q, &mem).unwrap());
        assert_eq!((q.next_avail(), q.next_used()), (0, 0));
        let used_idx: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
        assert_eq!(used_idx, 0);
        // A frame transmitted meanwhile leaves the waiting one alone.
        let mut tx = Queue::new(16).unwrap();
        tx.set_size(16);
        tx.set_desc_table_address(Some(0x6000), Some(0));
        tx.set_avail_ring_address(Some(0x7000), Some(0));
        tx.set_used_ring_address(Some(0x8000), Some(0));
        tx.set_ready(true);
        mem.write_slice(&[0xab; 100], GuestAddress(0x9000)).unwrap();
        mem.write_obj(0x9000u64, GuestAddress(0x6000)).unwrap();
        mem.write_obj(100u32, GuestAddress(0x6008)).unwrap();
        mem.write_obj(1u16, GuestAddress(0x7002)).unwrap();
        assert!(n.process_queue(TX, &mut tx, &mem).unwrap());
        // A third: 100 + 100 + 62 bytes, num_buffers 3, one index store of 3.
        rx_buffers(&mem, 2, 1, 100);
        assert!(n.place(&mut q, &mem).unwrap());
        let used_idx: u16 = mem.read_obj(GuestAddress(USED + 2)).unwrap();
        assert_eq!(used_idx, 3);
        let mut got = Vec::new();
        for i in 0..3u64 {
            let id: u32 = mem.read_obj(GuestAddress(USED + 4 + 8 * i)).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(USED + 8 + 8 * i)).unwrap();
            assert_eq!((id, len), (i as u32, [100, 100, 62][i as usize]));
            let mut b = vec![0u8; len as usize];
            mem.read_slice(&mut b, GuestAddress(DATA + 0x1000 * i))
                .unwrap();
            got.extend(b);
        }
        assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3, "num_buffers");
        assert_eq!(&got[12..], &frame[12..]);
        // Without the feature: one 100-byte buffer cannot take it: dropped (length 0).
        n.reset();
        n.held = frame.len();
        rx_buffers(&mem, 3, 1, 100);
        assert!(n.place(&mut q, &mem).unwrap());
        let len: u32 = mem.read_obj(GuestAddress(USED + 8 + 8 * 3)).unwrap();
        assert_eq!(len, 0);
    }

    #[test]
    fn state_round_trip_and_rejection() {
        let (mut a, mut q, mem) = net("a");
        command(&mut a, &mut q, &mem, [1, 1], &[2, 0, 0, 0, 0, 7]);
        a.announce(GUEST_ANNOUNCE);
        let s = a.save_state();
        let (mut b, _, _) = net("b");
        b.restore_state(s.as_ref(), GUEST_ANNOUNCE).unwrap();
        assert_eq!(b.save_state(), s);
        assert_eq!(
            status(&b),
            (VIRTIO_NET_S_LINK_UP | VIRTIO_NET_S_ANNOUNCE) as u16
        );
        // A pending announcement the driver could not have: refused, nothing taken.
        let (mut c, _, _) = net("d");
        let before = c.save_state();
        assert_eq!(
            c.restore_state(s.as_ref(), 1 << VIRTIO_NET_F_CTRL_VQ),
            Err(BackendStateError::AnnounceNotNegotiated)
        );
        assert_eq!(c.save_state(), before);
    }

    #[test]
    fn rarp() {
        let f = rarp_frame([2, 0, 0, 0, 0, 1]);
        assert_eq!(f.len(), HEADER_LEN + 60);
        let e = &f[HEADER_LEN..];
        assert_eq!(&e[..6], &[0xff; 6]);
        assert_eq!(&e[6..12], &[2, 0, 0, 0, 0, 1]);
        assert_eq!(&e[12..14], &[0x80, 0x35]);
        assert_eq!(&e[20..22], &[0, 3]);
        assert_eq!(&e[22..28], &[2, 0, 0, 0, 0, 1]);
    }

    #[test]
    fn a_descriptor_that_is_no_tap_is_refused() {
        let f = File::open("/dev/null").unwrap();
        assert!(matches!(
            Net::from_fd(OwnedFd::from(f), [0; 6]),
            Err(NetError::NotVnetTap(_))
        ));
    }

    #[test]
    fn bad_tap_names() {
        for bad in ["", "a/b", "a:b", "a b", "sixteen-chars-xx"] {
            assert!(
                matches!(Net::open(bad, [0; 6]), Err(NetError::Name(_))),
                "{bad}"
            );
        }
    }
}
