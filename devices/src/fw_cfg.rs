//! QEMU's firmware configuration interface (fw_cfg), legacy port I/O flavour.
//!
//! Test kernels (kvm-unit-tests' `lib/x86/fwcfg.c`) and firmware ask the VMM about the machine
//! through fw_cfg: the number of CPUs, the RAM size, and named blobs ("files") such as ACPI
//! tables. The guest writes a 16-bit item key to the selector port and then reads the item's
//! bytes one at a time from the data port. QEMU's `hw/nvram/fw_cfg.c` is the reference; key
//! numbers are QEMU's `FW_CFG_*` constants.
//!
//! # Ports
//!
//! Register the device at [`FW_CFG_BASE`] (0x510) with length [`FW_CFG_PORT_LEN`] (2), like
//! QEMU's combined region:
//!
//! * a 16-bit write at offset 0 selects an item (little-endian key) and rewinds to its start;
//! * a byte read at offset 0 or 1 returns the next byte of the selected item, or 0 past its
//!   end, for an unknown key, or after an invalid key was selected;
//! * every other access is invalid in QEMU and does nothing here (reads return 0). Byte writes
//!   in particular are ignored: QEMU dropped the old write channel.
//!
//! # Items
//!
//! [`FwCfg::new`] provides what QEMU provides on every PC: signature "QEMU" (0x00), interface
//! ID 1 (0x01, traditional interface only: no DMA), a zero UUID (0x02), RAM size (0x03, u64),
//! no-graphic flag (0x04), boot CPUs (0x05, u16), boot menu flag (0x0e) and maximum CPUs
//! (0x0f, u16), plus the file directory (0x19). Numbers are little-endian, the directory is
//! big-endian, as in QEMU. [`FwCfg::add_item`] adds or replaces an item by key (for example an
//! arch-local one such as `FW_CFG_ARCH_LOCAL | 2`, the IRQ0 override flag) and
//! [`FwCfg::add_file`] adds a named blob: files are kept sorted by name and numbered from key
//! 0x20, as QEMU does for current machine types, and at most 32 fit. Keys whose low 14 bits are
//! 0x40 or more do not exist.
//!
//! Note that kvm-unit-tests also reads key 0x11 as "MAX_RAM" (treating 0 as "no limit"); QEMU
//! does not define it (0x11 is `FW_CFG_KERNEL_DATA` there) and neither does this device by
//! default, so it reads as 0.
//!
//! # State
//!
//! [`FwCfgState`] holds the items and files as well as the selection, so a restored device
//! answers exactly like the saved one even mid-read.

use serde::{Deserialize, Serialize};

use crate::{le_value, BusDevice, VmRequest};

/// The port the device expects to be registered at.
pub const FW_CFG_BASE: u64 = 0x510;
/// The length of the port range the device expects (selector 0x510, data 0x511).
pub const FW_CFG_PORT_LEN: u64 = 2;

/// Key of the signature item ("QEMU").
pub const FW_CFG_SIGNATURE: u16 = 0x00;
/// Key of the interface ID (u32; bit 0: traditional interface, bit 1: DMA).
pub const FW_CFG_ID: u16 = 0x01;
/// Key of the machine UUID (16 bytes).
pub const FW_CFG_UUID: u16 = 0x02;
/// Key of the RAM size in bytes (u64).
pub const FW_CFG_RAM_SIZE: u16 = 0x03;
/// Key of the no-graphic flag (u16).
pub const FW_CFG_NOGRAPHIC: u16 = 0x04;
/// Key of the number of boot CPUs (u16).
pub const FW_CFG_NB_CPUS: u16 = 0x05;
/// Key of the boot menu flag (u16).
pub const FW_CFG_BOOT_MENU: u16 = 0x0e;
/// Key of the maximum number of CPUs (u16).
pub const FW_CFG_MAX_CPUS: u16 = 0x0f;
/// Key of the file directory.
pub const FW_CFG_FILE_DIR: u16 = 0x19;
/// Key of the first file.
pub const FW_CFG_FILE_FIRST: u16 = 0x20;
/// How many files fit (QEMU's default `x-file-slots`).
pub const FW_CFG_FILE_SLOTS: u16 = 0x20;
/// The write-channel bit of a key (ignored on selection, as in QEMU).
pub const FW_CFG_WRITE_CHANNEL: u16 = 0x4000;
/// The bit that selects the architecture-specific key space.
pub const FW_CFG_ARCH_LOCAL: u16 = 0x8000;
/// The bits of a key that number the item within its key space.
pub const FW_CFG_ENTRY_MASK: u16 = !(FW_CFG_WRITE_CHANNEL | FW_CFG_ARCH_LOCAL);
/// The selection after a key out of range was written.
pub const FW_CFG_INVALID: u16 = 0xffff;

/// One past the highest item number in each key space.
const MAX_ENTRY: u16 = FW_CFG_FILE_FIRST + FW_CFG_FILE_SLOTS;
/// Size of the name field in a directory entry, terminating NUL included.
const FILE_NAME_LEN: usize = 56;

/// Errors configuring fw_cfg items.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FwCfgError {
    /// The key is outside both key spaces or has the write-channel bit set.
    #[error("fw_cfg key {0:#06x} is out of range")]
    KeyOutOfRange(u16),
    /// The key belongs to the file directory or the files.
    #[error("fw_cfg key {0:#06x} is reserved for files; use add_file")]
    ReservedKey(u16),
    /// The file name does not fit the directory's 56-byte name field.
    #[error("fw_cfg file name {0:?} is longer than 55 bytes")]
    NameTooLong(String),
    /// A file of that name exists already.
    #[error("fw_cfg file {0:?} exists already")]
    DuplicateFile(String),
    /// All 32 file slots are taken.
    #[error("no free fw_cfg file slot")]
    NoFileSlot,
    /// A file longer than 4 GiB − 1 (its size must fit the directory's u32).
    #[error("fw_cfg file of {0} bytes is too large")]
    TooLarge(usize),
    /// A restored state's file name is empty or holds a NUL.
    #[error("fw_cfg file name {0:?} is empty or holds a nul byte")]
    BadName(String),
    /// A restored state's items or files are out of order or repeated.
    #[error("fw_cfg state: {0} is out of order or repeated")]
    Unsorted(String),
    /// A restored state's read position is past the end of the selected item.
    #[error("fw_cfg state: read position {offset} is past the selected item's {len} bytes")]
    ReadOffset {
        /// The read position.
        offset: u32,
        /// The selected item's length.
        len: usize,
    },
}

/// Checks that `key` may hold an item (not a file, not the directory, in range).
fn check_item_key(key: u16) -> Result<(), FwCfgError> {
    if key & FW_CFG_WRITE_CHANNEL != 0 || key & FW_CFG_ENTRY_MASK >= MAX_ENTRY {
        return Err(FwCfgError::KeyOutOfRange(key));
    }
    if key & FW_CFG_ARCH_LOCAL == 0 && (key == FW_CFG_FILE_DIR || key >= FW_CFG_FILE_FIRST) {
        return Err(FwCfgError::ReservedKey(key));
    }
    Ok(())
}

/// Everything the guest can observe of a [`FwCfg`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FwCfgState {
    /// Items by key (files and the directory excluded), sorted by key.
    pub items: Vec<(u16, Vec<u8>)>,
    /// Files sorted by name; the n-th has key `FW_CFG_FILE_FIRST + n`.
    pub files: Vec<(String, Vec<u8>)>,
    /// The selected key, or [`FW_CFG_INVALID`].
    pub cur_entry: u16,
    /// The read position within the selected item.
    pub cur_offset: u32,
}

/// QEMU's fw_cfg device; register it at [`FW_CFG_BASE`] with length [`FW_CFG_PORT_LEN`].
#[derive(Debug)]
pub struct FwCfg {
    s: FwCfgState,
    /// The file directory, derived from `s.files`.
    dir: Vec<u8>,
}

impl FwCfg {
    /// A device with QEMU's standard items for `ram_size` bytes of RAM, `nb_cpus` boot CPUs
    /// and at most `max_cpus` CPUs.
    pub fn new(ram_size: u64, nb_cpus: u16, max_cpus: u16) -> Self {
        let items = vec![
            (FW_CFG_SIGNATURE, b"QEMU".to_vec()),
            (FW_CFG_ID, 1u32.to_le_bytes().to_vec()),
            (FW_CFG_UUID, vec![0; 16]),
            (FW_CFG_RAM_SIZE, ram_size.to_le_bytes().to_vec()),
            (FW_CFG_NOGRAPHIC, 0u16.to_le_bytes().to_vec()),
            (FW_CFG_NB_CPUS, nb_cpus.to_le_bytes().to_vec()),
            (FW_CFG_BOOT_MENU, 0u16.to_le_bytes().to_vec()),
            (FW_CFG_MAX_CPUS, max_cpus.to_le_bytes().to_vec()),
        ];
        let mut dev = Self {
            s: FwCfgState {
                items,
                files: Vec::new(),
                cur_entry: FW_CFG_INVALID,
                cur_offset: 0,
            },
            dir: Vec::new(),
        };
        dev.rebuild_dir();
        dev
    }

    /// Adds the item `key` with contents `data`, replacing an item of that key.
    ///
    /// `key` may be in the generic or (with [`FW_CFG_ARCH_LOCAL`]) the architecture key
    /// space, but not the directory or file keys of the generic space.
    pub fn add_item(&mut self, key: u16, data: Vec<u8>) -> Result<(), FwCfgError> {
        check_item_key(key)?;
        match self.s.items.binary_search_by_key(&key, |(k, _)| *k) {
            Ok(i) => self.s.items[i].1 = data,
            Err(i) => self.s.items.insert(i, (key, data)),
        }
        Ok(())
    }

    /// Adds a named blob, listed in the file directory. Files are numbered in name order, so
    /// adding a file may renumber those sorting after it (as in QEMU, files are meant to be
    /// added before the guest starts); see [`FwCfg::file_key`].
    pub fn add_file(&mut self, name: &str, data: Vec<u8>) -> Result<(), FwCfgError> {
        if name.len() >= FILE_NAME_LEN {
            return Err(FwCfgError::NameTooLong(name.to_owned()));
        }
        if u32::try_from(data.len()).is_err() {
            return Err(FwCfgError::TooLarge(data.len()));
        }
        let i = match self.s.files.binary_search_by(|(n, _)| n.as_str().cmp(name)) {
            Ok(_) => return Err(FwCfgError::DuplicateFile(name.to_owned())),
            Err(i) => i,
        };
        if self.s.files.len() >= usize::from(FW_CFG_FILE_SLOTS) {
            return Err(FwCfgError::NoFileSlot);
        }
        self.s.files.insert(i, (name.to_owned(), data));
        self.rebuild_dir();
        Ok(())
    }

    /// The key the file `name` currently has.
    pub fn file_key(&self, name: &str) -> Option<u16> {
        let i = self
            .s
            .files
            .binary_search_by(|(n, _)| n.as_str().cmp(name))
            .ok()?;
        Some(FW_CFG_FILE_FIRST + i as u16)
    }

    /// A snapshot of everything the guest can observe.
    pub fn state(&self) -> FwCfgState {
        self.s.clone()
    }

    /// Replaces the device's items, files and selection with those of `state`.
    ///
    /// A state that [`add_item`](Self::add_item) / [`add_file`](Self::add_file) and the guest
    /// could not have produced (keys out of range or reserved, unsorted or duplicate entries,
    /// more than 32 files, over-long names, a read position past the selected item) is
    /// rejected and the device is left as it was.
    pub fn restore(&mut self, state: &FwCfgState) -> Result<(), FwCfgError> {
        let mut prev_key = None;
        for (key, data) in &state.items {
            check_item_key(*key)?;
            if prev_key.is_some_and(|p| p >= *key) {
                return Err(FwCfgError::Unsorted(format!("item {key:#06x}")));
            }
            prev_key = Some(*key);
            if u32::try_from(data.len()).is_err() {
                return Err(FwCfgError::TooLarge(data.len()));
            }
        }
        if state.files.len() > usize::from(FW_CFG_FILE_SLOTS) {
            return Err(FwCfgError::NoFileSlot);
        }
        let mut prev_name: Option<&str> = None;
        for (name, data) in &state.files {
            if name.len() >= FILE_NAME_LEN {
                return Err(FwCfgError::NameTooLong(name.clone()));
            }
            if name.is_empty() || name.contains('\0') {
                return Err(FwCfgError::BadName(name.clone()));
            }
            if prev_name.is_some_and(|p| p >= name.as_str()) {
                return Err(FwCfgError::Unsorted(format!("file {name:?}")));
            }
            prev_name = Some(name);
            if u32::try_from(data.len()).is_err() {
                return Err(FwCfgError::TooLarge(data.len()));
            }
        }
        if state.cur_entry != FW_CFG_INVALID && state.cur_entry & FW_CFG_ENTRY_MASK >= MAX_ENTRY {
            return Err(FwCfgError::KeyOutOfRange(state.cur_entry));
        }
        let mut next = FwCfg {
            s: state.clone(),
            dir: Vec::new(),
        };
        next.rebuild_dir();
        let len = next.item(next.s.cur_entry).map_or(0, <[u8]>::len);
        if next.s.cur_offset as usize > len {
            return Err(FwCfgError::ReadOffset {
                offset: next.s.cur_offset,
                len,
            });
        }
        *self = next;
        Ok(())
    }

    fn rebuild_dir(&mut self) {
        let mut dir = Vec::with_capacity(4 + self.s.files.len() * 64);
        dir.extend_from_slice(&(self.s.files.len() as u32).to_be_bytes());
        for (i, (name, data)) in self.s.files.iter().enumerate() {
            dir.extend_from_slice(&(data.len() as u32).to_be_bytes());
            dir.extend_from_slice(&(FW_CFG_FILE_FIRST + i as u16).to_be_bytes());
            dir.extend_from_slice(&[0, 0]);
            let mut field = [0u8; FILE_NAME_LEN];
            let n = name.len().min(FILE_NAME_LEN - 1);
            field[..n].copy_from_slice(&name.as_bytes()[..n]);
            dir.extend_from_slice(&field);
        }
        self.dir = dir;
    }

    /// The contents of the item selected by `entry`, if it exists.
    fn item(&self, entry: u16) -> Option<&[u8]> {
        if entry == FW_CFG_INVALID {
            return None;
        }
        let key = entry & !FW_CFG_WRITE_CHANNEL;
        if key == FW_CFG_FILE_DIR {
            return Some(&self.dir);
        }
        if (FW_CFG_FILE_FIRST..MAX_ENTRY).contains(&key) {
            let i = usize::from(key - FW_CFG_FILE_FIRST);
            return self.s.files.get(i).map(|(_, d)| d.as_slice());
        }
        self.s
            .items
            .binary_search_by_key(&key, |(k, _)| *k)
            .ok()
            .map(|i| self.s.items[i].1.as_slice())
    }

    fn select(&mut self, key: u16) {
        self.s.cur_offset = 0;
        self.s.cur_entry = if key & FW_CFG_ENTRY_MASK >= MAX_ENTRY {
            FW_CFG_INVALID
        } else {
            key
        };
    }

    fn read_byte(&mut self) -> u8 {
        let offset = self.s.cur_offset as usize;
        match self.item(self.s.cur_entry).and_then(|d| d.get(offset)) {
            Some(&b) => {
                self.s.cur_offset += 1;
                b
            }
            None => 0,
        }
    }
}

impl BusDevice for FwCfg {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() == 1 && offset < FW_CFG_PORT_LEN {
            data[0] = self.read_byte();
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) -> Option<VmRequest> {
        if offset == 0 && data.len() == 2 {
            self.select(le_value(data) as u16);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(d: &mut FwCfg, key: u16, len: usize) -> Vec<u8> {
        d.write(0, &key.to_le_bytes());
        (0..len)
            .map(|_| {
                let mut b = [0];
                d.read(1, &mut b);
                b[0]
            })
            .collect()
    }

    fn get_u(d: &mut FwCfg, key: u16, len: usize) -> u64 {
        le_value(&get(d, key, len))
    }

    #[test]
    fn standard_items() {
        let mut d = FwCfg::new(512 << 20, 2, 4);
        assert_eq!(get(&mut d, FW_CFG_SIGNATURE, 4), b"QEMU");
        assert_eq!(get_u(&mut d, FW_CFG_ID, 4), 1);
        assert_eq!(get_u(&mut d, FW_CFG_RAM_SIZE, 8), 512 << 20);
        assert_eq!(get_u(&mut d, FW_CFG_NB_CPUS, 2), 2);
        assert_eq!(get_u(&mut d, FW_CFG_MAX_CPUS, 2), 4);
        assert_eq!(get(&mut d, FW_CFG_UUID, 16), [0; 16]);
        // kvm-unit-tests' MAX_RAM: unknown, reads 0.
        assert_eq!(get_u(&mut d, 0x11, 8), 0);
        // Past the end: zeros.
        assert_eq!(get(&mut d, FW_CFG_SIGNATURE, 6), b"QEMU\0\0");
        // Out of range: invalid selection.
        assert_eq!(get(&mut d, 0x40, 2), [0, 0]);
        assert_eq!(d.state().cur_entry, FW_CFG_INVALID);
        // The write-channel bit is ignored on selection.
        assert_eq!(
            get(&mut d, FW_CFG_SIGNATURE | FW_CFG_WRITE_CHANNEL, 4),
            b"QEMU"
        );
        // An empty directory.
        assert_eq!(get(&mut d, FW_CFG_FILE_DIR, 5), [0; 5]);
    }

    #[test]
    fn port_access_rules() {
        let mut d = FwCfg::new(1 << 30, 1, 1);
        d.write(0, &FW_CFG_SIGNATURE.to_le_bytes());
        let mut b = [0];
        d.read(0, &mut b);
        assert_eq!(b[0], b'Q');
        // Byte writes and wide reads do nothing.
        d.write(0, &[0x05]);
        d.write(1, &[0x00]);
        let mut w = [0xaa; 2];
        d.read(0, &mut w);
        assert_eq!(w, [0, 0]);
        d.read(1, &mut b);
        assert_eq!(b[0], b'E');
        d.write(0, &[1, 2, 3, 4]);
        d.read(1, &mut b);
        assert_eq!(b[0], b'M');
    }

    #[test]
    fn items_and_files() {
        let mut d = FwCfg::new(1 << 30, 1, 1);
        d.add_item(FW_CFG_ARCH_LOCAL | 2, 1u32.to_le_bytes().to_vec())
            .unwrap();
        assert_eq!(get_u(&mut d, FW_CFG_ARCH_LOCAL | 2, 4), 1);
        // The arch-local key space is separate.
        assert_eq!(get_u(&mut d, 2, 4), 0);
        d.add_item(0x11, (256u64 << 20).to_le_bytes().to_vec())
            .unwrap();
        assert_eq!(get_u(&mut d, 0x11, 8), 256 << 20);
        d.add_item(FW_CFG_NB_CPUS, 3u16.to_le_bytes().to_vec())
            .unwrap();
        assert_eq!(get_u(&mut d, FW_CFG_NB_CPUS, 2), 3);
        assert_eq!(
            d.add_item(FW_CFG_FILE_DIR, vec![]),
            Err(FwCfgError::ReservedKey(0x19))
        );
        assert_eq!(d.add_item(0x21, vec![]), Err(FwCfgError::ReservedKey(0x21)));
        assert_eq!(
            d.add_item(0x40, vec![]),
            Err(FwCfgError::KeyOutOfRange(0x40))
        );
        assert_eq!(
            d.add_item(0x4001, vec![]),
            Err(FwCfgError::KeyOutOfRange(0x4001))
        );

        d.add_file("etc/zeta", b"zz".to_vec()).unwrap();
        d.add_file("etc/alpha", b"alpha!".to_vec()).unwrap();
        assert_eq!(
            d.add_file("etc/alpha", vec![]),
            Err(FwCfgError::DuplicateFile("etc/alpha".into()))
        );
        assert!(matches!(
            d.add_file(&"x".repeat(56), vec![]),
            Err(FwCfgError::NameTooLong(_))
        ));
        assert_eq!(d.file_key("etc/alpha"), Some(0x20));
        assert_eq!(d.file_key("etc/zeta"), Some(0x21));
        assert_eq!(d.file_key("nope"), None);
        let dir = get(&mut d, FW_CFG_FILE_DIR, 4 + 2 * 64);
        assert_eq!(&dir[..4], &[0, 0, 0, 2]);
        assert_eq!(&dir[4..12], &[0, 0, 0, 6, 0, 0x20, 0, 0]);
        assert_eq!(&dir[12..21], b"etc/alpha");
        assert_eq!(dir[21], 0);
        assert_eq!(&dir[68..76], &[0, 0, 0, 2, 0, 0x21, 0, 0]);
        assert_eq!(&dir[76..84], b"etc/zeta");
        assert_eq!(get(&mut d, 0x20, 6), b"alpha!");
        assert_eq!(get(&mut d, 0x21, 3), b"zz\0");
        for i in 0..30 {
            d.add_file(&format!("f{i:02}"), vec![i]).unwrap();
        }
        assert_eq!(
            d.add_file("one-too-many", vec![]),
            Err(FwCfgError::NoFileSlot)
        );
    }

    #[test]
    fn save_restore_round_trip() {
        let mut d = FwCfg::new(2 << 30, 4, 8);
        d.add_file("etc/table", (0..100).collect()).unwrap();
        get(&mut d, 0x20, 10);
        let json = serde_json::to_string(&d.state()).unwrap();
        let state: FwCfgState = serde_json::from_str(&json).unwrap();
        let mut e = FwCfg::new(1 << 20, 1, 1);
        e.restore(&state).unwrap();
        assert_eq!(e.state(), d.state());
        // Mid-item reads continue identically.
        for dev in [&mut d, &mut e] {
            let mut b = [0];
            dev.read(1, &mut b);
            assert_eq!(b[0], 10);
        }
        assert_eq!(
            get(&mut d, FW_CFG_FILE_DIR, 68),
            get(&mut e, FW_CFG_FILE_DIR, 68)
        );
        assert_eq!(get_u(&mut e, FW_CFG_RAM_SIZE, 8), 2 << 30);
    }

    #[test]
    fn restore_rejects_invalid_state() {
        let mut d = FwCfg::new(2 << 30, 4, 8);
        d.add_file("etc/a", vec![1, 2, 3]).unwrap();
        d.add_file("etc/b", vec![4]).unwrap();
        get(&mut d, FW_CFG_SIGNATURE, 2);
        let good = d.state();
        let mut unsorted = good.clone();
        unsorted.items.swap(0, 1);
        let mut dup_file = good.clone();
        dup_file.files[1].0 = "etc/a".into();
        let mut too_many = good.clone();
        too_many.files = (0..33).map(|i| (format!("f{i:02}"), vec![])).collect();
        let mut long_name = good.clone();
        long_name.files[1].0 = "x".repeat(56);
        let mut nul_name = good.clone();
        nul_name.files[1].0 = "etc/\0".into();
        let mut file_key = good.clone();
        file_key.items.push((FW_CFG_FILE_FIRST, vec![]));
        let cases = [
            (unsorted, "out of order"),
            (dup_file, "out of order"),
            (too_many, "no free fw_cfg file slot"),
            (long_name, "longer than 55"),
            (nul_name, "nul byte"),
            (file_key, "reserved for files"),
            (
                FwCfgState {
                    cur_entry: 0x3fff,
                    ..good.clone()
                },
                "out of range",
            ),
            (
                FwCfgState {
                    cur_offset: 5,
                    ..good.clone()
                },
                "read position 5 is past the selected item's 4 bytes",
            ),
        ];
        for (bad, want) in cases {
            let e = d.restore(&bad).unwrap_err();
            assert!(e.to_string().contains(want), "{e} lacks {want:?}");
            assert_eq!(d.state(), good);
        }
        // Reading on continues where it was.
        assert_eq!(get(&mut d, FW_CFG_FILE_FIRST, 3), [1, 2, 3]);
    }
}
