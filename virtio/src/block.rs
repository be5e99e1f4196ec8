//! virtio-blk on a raw image file.
//!
//! Requests (§5.2.6): IN (read), OUT (write), FLUSH (`fdatasync`), GET_ID, and on a writable
//! disk DISCARD (`fallocate` punching a hole; advisory: a file system without holes answers OK
//! and keeps the data) and WRITE_ZEROES (`fallocate` zeroing the range, or zeroes written when
//! the file system cannot); one segment of up to 64 MiB per request. Anything else answers
//! VIRTIO_BLK_S_UNSUPP. A read-only disk offers VIRTIO_BLK_F_RO and fails writes with
//! VIRTIO_BLK_S_IOERR. Requests are served on the `virtio-io` thread, synchronously and whole,
//! so none is ever in flight when the device's state is saved.
//!
//! For block migration, every write, write-zeroes and discard marks the chunks it touched in
//! the disk's [`DirtyBitmap`] once it has reached the image (a no-op unless a migration
//! tracks them): see [`migration::block`].

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use migration::block::{BlockDisk, DirtyBitmap};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_queue::{Queue, QueueOwnedT, QueueT, Reader, Writer};

use crate::{GuestMemoryMmap, QueueError, VirtioBackend};

/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
/// The request queue's maximum size.
pub const QUEUE_SIZE: u16 = 256;
/// The virtio device ID of a block device.
pub const DEVICE_TYPE: u16 = 2;
/// Bytes moved per read or write system call.
const CHUNK: usize = 64 << 10;
/// Most sectors one DISCARD or WRITE_ZEROES segment may cover (64 MiB: zeroes written by hand
/// where the file system cannot, under the device's lock, must not keep a vCPU waiting long).
const MAX_ZERO_SECTORS: u32 = 1 << 17;

/// Errors opening a disk image.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image could not be opened.
    #[error("cannot open disk image {0}: {1}")]
    Open(String, #[source] std::io::Error),
    /// The image is read-only but the disk was not asked for read-only.
    #[error("disk image {0} is read-only: add readonly=on")]
    ReadOnlyFile(String),
    /// The image is not a regular file or block device.
    #[error("disk image {0} is not a regular file")]
    NotAFile(String),
    /// The image is smaller than one sector.
    #[error("disk image {0} is smaller than one sector ({1} bytes)")]
    TooSmall(String, u64),
}

/// A virtio-blk device's back-end.
pub struct Block {
    path: PathBuf,
    file: File,
    capacity: u64,
    readonly: bool,
    serial: Vec<u8>,
    dirty: Arc<DirtyBitmap>,
}

impl Block {
    /// Opens `path` (read-write unless `readonly`); `serial` is what GET_ID answers.
    pub fn open(path: &Path, readonly: bool, serial: &str) -> Result<Self, BlockError> {
        let name = path.display().to_string();
        let meta = std::fs::metadata(path).map_err(|e| BlockError::Open(name.clone(), e))?;
        if !meta.is_file() {
            return Err(BlockError::NotAFile(name));
        }
        // Root could open a read-only file for writing anyway: refuse as for anyone else.
        if !readonly && meta.permissions().readonly() {
            return Err(BlockError::ReadOnlyFile(name));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(!readonly)
            .open(path)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::EACCES | libc::EROFS | libc::EPERM) if !readonly => {
                    BlockError::ReadOnlyFile(name.clone())
                }
                _ => BlockError::Open(name.clone(), e),
            })?;
        let size = meta.len();
        if size < SECTOR_SIZE {
            return Err(BlockError::TooSmall(name, size));
        }
        let mut serial = serial.as_bytes().to_vec();
        serial.truncate(VIRTIO_BLK_ID_BYTES as usize);
        let capacity = size / SECTOR_SIZE;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            capacity,
            readonly,
            serial,
            dirty: Arc::new(DirtyBitmap::new(capacity * SECTOR_SIZE)),
        })
    }

    /// The disk as block migration sees it, named `name`: a second descriptor of the image
    /// and the bitmap this back-end marks.
    pub fn migration_disk(&self, name: &str) -> Result<BlockDisk, BlockError> {
        let name_err = |e| BlockError::Open(self.path.display().to_string(), e);
        Ok(BlockDisk {
            name: name.to_string(),
            path: self.path.clone(),
            file: self.file.try_clone().map_err(name_err)?,
            size: self.capacity * SECTOR_SIZE,
            dirty: self.dirty.clone(),
        })
    }

    /// The image's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Serves one request; returns the bytes written into the guest's buffers.
    fn handle(&self, mem: &GuestMemoryMmap, chain: RequestChain) -> u32 {
        let (Ok(mut reader), Ok(mut writer)) =
            (Reader::new(mem, chain.clone()), Writer::new(mem, chain))
        else {
            return 0;
        };
        let writable = writer.available_bytes();
        if writable == 0 {
            // Nowhere to put a status: a broken request, used with nothing written.
            return 0;
        }
        let Ok(mut status_writer) = writer.split_at(writable - 1) else {
            return 0;
        };
        let mut header = [0u8; 16];
        let status = if reader.read_exact(&mut header).is_err() {
            VIRTIO_BLK_S_IOERR
        } else {
            let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
            let mut sector = [0u8; 8];
            sector.copy_from_slice(&header[8..16]);
            let sector = u64::from_le_bytes(sector);
            self.request(kind, sector, &mut reader, &mut writer)
        };
        let _ = status_writer.write_all(&[status as u8]);
        (writer.bytes_written() + status_writer.bytes_written()) as u32
    }

    /// The byte range of `len` bytes at `sector`, if it is whole sectors inside the disk.
    fn range(&self, sector: u64, len: usize) -> Option<u64> {
        let len = len as u64;
        let start = sector.checked_mul(SECTOR_SIZE)?;
        let end = start.checked_add(len)?;
        (len % SECTOR_SIZE == 0 && end <= self.capacity * SECTOR_SIZE).then_some(start)
    }

    fn request(
        &self,
        kind: u32,
        sector: u64,
        reader: &mut Reader<'_, BitmapSlice<'_>>,
        writer: &mut Writer<'_, BitmapSlice<'_>>,
    ) -> u32 {
        let ok = |r: std::io::Result<()>| match r {
            Ok(()) => VIRTIO_BLK_S_OK,
            Err(e) => {
                log::warn!("virtio-blk {}: {e}", self.path.display());
                VIRTIO_BLK_S_IOERR
            }
        };
        match kind {
            VIRTIO_BLK_T_IN => {
                let Some(mut pos) = self.range(sector, writer.available_bytes()) else {
                    return VIRTIO_BLK_S_IOERR;
                };
                let mut buf = vec![0u8; CHUNK.min(writer.available_bytes())];
                ok((|| {
                    while writer.available_bytes() > 0 {
                        let n = buf.len().min(writer.available_bytes());
                        self.file.read_exact_at(&mut buf[..n], pos)?;
                        writer.write_all(&buf[..n])?;
                        pos += n as u64;
                    }
                    Ok(())
                })())
            }
            VIRTIO_BLK_T_OUT => {
                if self.readonly {
                    return VIRTIO_BLK_S_IOERR;
                }
                let Some(mut pos) = self.range(sector, reader.available_bytes()) else {
                    return VIRTIO_BLK_S_IOERR;
                };
                let mut buf = vec![0u8; CHUNK.min(reader.available_bytes())];
                let start = pos;
                let result = (|| {
                    while reader.available_bytes() > 0 {
                        let n = buf.len().min(reader.available_bytes());
                        reader.read_exact(&mut buf[..n])?;
                        self.file.write_all_at(&buf[..n], pos)?;
                        pos += n as u64;
                    }
                    Ok(())
                })();
                // After the data reached the image (even part of it): a migration that
                // read the chunk before sends it again.
                self.dirty.mark(start, pos - start);
                ok(result)
            }
            VIRTIO_BLK_T_FLUSH => {
                if self.readonly {
                    VIRTIO_BLK_S_OK
                } else {
                    ok(self.file.sync_data())
                }
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                if self.readonly {
                    return VIRTIO_BLK_S_IOERR;
                }
                // One segment: sector, number of sectors, flags (bit 0: unmap allowed).
                let mut seg = [0u8; 16];
                if reader.available_bytes() != 16 || reader.read_exact(&mut seg).is_err() {
                    return VIRTIO_BLK_S_IOERR;
                }
                let sector = u64::from_le_bytes(seg[..8].try_into().unwrap_or_default());
                let count = u32::from_le_bytes(seg[8..12].try_into().unwrap_or_default());
                let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap_or_default());
                let len = u64::from(count) * SECTOR_SIZE;
                let Some(start) = self.range(sector, len as usize) else {
                    return VIRTIO_BLK_S_IOERR;
                };
                if count > MAX_ZERO_SECTORS
                    || flags & !1 != 0
                    || (kind == VIRTIO_BLK_T_DISCARD && flags != 0)
                {
                    return VIRTIO_BLK_S_UNSUPP;
                }
                let status = if kind == VIRTIO_BLK_T_DISCARD {
                    // Advisory: where the file system cannot punch holes, the data stays.
                    let _ = self.fallocate(
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        start,
                        len,
                    );
                    VIRTIO_BLK_S_OK
                } else {
                    ok(self.write_zeroes(start, len))
                };
                self.dirty.mark(start, len);
                status
            }
            VIRTIO_BLK_T_GET_ID => {
                let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
                id[..self.serial.len()].copy_from_slice(&self.serial);
                let n = id.len().min(writer.available_bytes());
                ok(writer.write_all(&id[..n]))
            }
            _ => VIRTIO_BLK_S_UNSUPP,
        }
    }
}

impl Block {
    fn fallocate(&self, mode: libc::c_int, start: u64, len: u64) -> std::io::Result<()> {
        let (Ok(off), Ok(len)) = (libc::off_t::try_from(start), libc::off_t::try_from(len)) else {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        };
        // SAFETY: fallocate on a descriptor this struct owns; no memory is passed.
        if unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, len) } == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// Zeroes `[start, start + len)`: `FALLOC_FL_ZERO_RANGE` where the file system has it,
    /// else zeroes written.
    fn write_zeroes(&self, start: u64, len: u64) -> std::io::Result<()> {
        if len == 0
            || self
                .fallocate(
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                    start,
                    len,
                )
                .is_ok()
        {
            return Ok(());
        }
        let zeroes = vec![0u8; CHUNK];
        let mut pos = start;
        while pos < start + len {
            let n = (start + len - pos).min(CHUNK as u64) as usize;
            self.file.write_all_at(&zeroes[..n], pos)?;
            pos += n as u64;
        }
        Ok(())
    }
}

type RequestChain<'a> = virtio_queue::DescriptorChain<&'a GuestMemoryMmap>;
type BitmapSlice<'a> =
    <vm_memory::bitmap::AtomicBitmap as vm_memory::bitmap::WithBitmapSlice<'a>>::S;

impl VirtioBackend for Block {
    fn device_type(&self) -> u16 {
        DEVICE_TYPE
    }

    fn pci_class(&self) -> u32 {
        // Mass storage, SCSI (what QEMU's virtio-blk-pci reports).
        0x01_00_00
    }

    fn features(&self) -> u64 {
        let mut f = 1 << VIRTIO_BLK_F_FLUSH;
        if self.readonly {
            f |= 1 << VIRTIO_BLK_F_RO;
        } else {
            f |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        f
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_blk_config: capacity (u64) first; then the discard and write-zeroes
        // limits (one segment of up to 64 MiB, sector-aligned, unmap allowed); the fields of
        // features hopvm does not offer read as zero.
        let mut bytes = [0u8; 0x40];
        bytes[..8].copy_from_slice(&self.capacity.to_le_bytes());
        if !self.readonly {
            for (off, v) in [
                (0x24, MAX_ZERO_SECTORS),
                (0x28, 1),
                (0x2c, 1),
                (0x30, MAX_ZERO_SECTORS),
                (0x34, 1),
            ] {
                bytes[off..off + 4].copy_from_slice(&v.to_le_bytes());
            }
            bytes[0x38] = 1;
        }
        crate::pci::copy_out(&bytes, offset, data);
    }

    fn process_queue(
        &mut self,
        _index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, QueueError> {
        let mut used = false;
        loop {
            let chains: Vec<_> = queue.iter(mem).map_err(QueueError::Queue)?.collect();
            if chains.is_empty() {
                break;
            }
            for chain in chains {
                let head = chain.head_index();
                let len = self.handle(mem, chain);
                queue.add_used(mem, head, len).map_err(QueueError::Queue)?;
                used = true;
            }
        }
        Ok(used)
    }
}
