//! virtio-blk on a raw image file.
//!
//! Requests (§5.2.6): IN (read), OUT (write), FLUSH (`fdatasync`) and GET_ID; anything else
//! answers VIRTIO_BLK_S_UNSUPP. A read-only disk offers VIRTIO_BLK_F_RO and fails writes with
//! VIRTIO_BLK_S_IOERR. Requests are served on the `virtio-io` thread, synchronously and whole,
//! so none is ever in flight when the device's state is saved.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
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
        Ok(Self {
            path: path.to_path_buf(),
            file,
            capacity: size / SECTOR_SIZE,
            readonly,
            serial,
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
                ok((|| {
                    while reader.available_bytes() > 0 {
                        let n = buf.len().min(reader.available_bytes());
                        reader.read_exact(&mut buf[..n])?;
                        self.file.write_all_at(&buf[..n], pos)?;
                        pos += n as u64;
                    }
                    Ok(())
                })())
            }
            VIRTIO_BLK_T_FLUSH => {
                if self.readonly {
                    VIRTIO_BLK_S_OK
                } else {
                    ok(self.file.sync_data())
                }
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
        }
        f
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_blk_config: capacity (u64) first; the rest of the fields belong to
        // features hopvm does not offer and read as zero.
        let mut bytes = [0u8; 0x40];
        bytes[..8].copy_from_slice(&self.capacity.to_le_bytes());
        for (i, d) in data.iter_mut().enumerate() {
            *d = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| bytes.get(o))
                .copied()
                .unwrap_or(0);
        }
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
