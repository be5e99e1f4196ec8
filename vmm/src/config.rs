//! What a VM is built from: the parsed, validated form of `hopvm run`'s options.
//!
//! Parsing lives here rather than in the CLI so that tests and other front ends (the QEMU-style
//! command line, the migration destination) build the same [`VmConfig`] with the same checks.

use std::path::PathBuf;

/// Errors in a VM configuration value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A size such as `256M` could not be parsed.
    #[error("invalid size '{0}': expected a number with an optional K, M, G or T suffix")]
    InvalidSize(String),
    /// The memory size is outside what hopvm supports.
    #[error("memory size {0} is out of range: from 1M up to {1}")]
    MemoryRange(String, String),
    /// A serial backend other than `stdio`, `file:PATH` or `null`.
    #[error("invalid serial backend '{0}': expected stdio, file:PATH or null")]
    InvalidSerial(String),
    /// A malformed `--debug-exit` value.
    #[error("invalid debug-exit '{0}': expected iobase=0x…,iosize=…")]
    InvalidDebugExit(String),
    /// A malformed `--disk` value.
    #[error("invalid disk '{0}': {1}")]
    InvalidDisk(String, &'static str),
    /// A malformed `--net` value.
    #[error("invalid net '{0}': {1}")]
    InvalidNet(String, &'static str),
}

/// The smallest guest RAM hopvm accepts.
pub const MIN_MEMORY: u64 = 1 << 20;
/// The largest guest RAM hopvm accepts (1 TiB); the host's own limit is checked at mmap time.
pub const MAX_MEMORY: u64 = 1 << 40;
/// Default guest RAM size.
pub const DEFAULT_MEMORY: u64 = 256 << 20;

/// The default CPU model: everything KVM offers, as QEMU's `-cpu host`.
pub const DEFAULT_CPU: &str = "host";

/// Where the guest's COM1 output goes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SerialConfig {
    /// hopvm's standard output (and input from standard input when it is a terminal).
    #[default]
    Stdio,
    /// A file, created or truncated.
    File(PathBuf),
    /// Discarded.
    Null,
}

impl std::str::FromStr for SerialConfig {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stdio" => Ok(Self::Stdio),
            "null" => Ok(Self::Null),
            _ => match s.strip_prefix("file:") {
                Some(path) if !path.is_empty() => Ok(Self::File(PathBuf::from(path))),
                _ => Err(ConfigError::InvalidSerial(s.to_string())),
            },
        }
    }
}

/// The isa-debug-exit port range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DebugExitConfig {
    /// First I/O port.
    pub iobase: u16,
    /// Number of ports.
    pub iosize: u16,
}

impl Default for DebugExitConfig {
    fn default() -> Self {
        Self {
            iobase: 0xf4,
            iosize: 4,
        }
    }
}

impl std::str::FromStr for DebugExitConfig {
    type Err = ConfigError;

    /// Parses QEMU's spelling, `iobase=0xf4,iosize=0x4` (either key may be left out).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ConfigError::InvalidDebugExit(s.to_string());
        let mut config = Self::default();
        for part in crate::qemu_opts::split_options(s)
            .iter()
            .filter(|p| !p.is_empty())
        {
            let (key, value) = part.split_once('=').ok_or_else(bad)?;
            let value = parse_int(value).ok_or_else(bad)?;
            let value = u16::try_from(value).map_err(|_| bad())?;
            match key {
                "iobase" => config.iobase = value,
                "iosize" => config.iosize = value,
                _ => return Err(bad()),
            }
        }
        if config.iosize == 0 || u32::from(config.iobase) + u32::from(config.iosize) > 0x1_0000 {
            return Err(bad());
        }
        Ok(config)
    }
}

/// A virtio-blk disk on a raw image (`--disk PATH[,readonly=on][,serial=STR]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// The raw image file.
    pub path: PathBuf,
    /// Offer the disk read-only (VIRTIO_BLK_F_RO; writes fail).
    pub readonly: bool,
    /// What the guest reads with VIRTIO_BLK_T_GET_ID (up to 20 bytes; empty by default, as
    /// QEMU without `serial=`).
    pub serial: String,
    /// The PCI device number (QEMU's `addr=`); the first free one from 2 on if none.
    pub slot: Option<u8>,
}

/// A virtio-net card on a tap device (`--net tap=NAME[,mac=…]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// The tap interface (created if it does not exist).
    pub tap: String,
    /// Instead of `tap`: an inherited descriptor of a tap someone else opened (QEMU's
    /// `-netdev tap,fd=N`, as libvirt passes it).
    pub fd: Option<i32>,
    /// The card's MAC address (none: QEMU's default for the card's position).
    pub mac: Option<[u8; 6]>,
    /// The PCI device number (QEMU's `addr=`); the first free one if none.
    pub slot: Option<u8>,
    /// The card's name for `announce-self`'s `interfaces` (QEMU's `-device …,id=`); none:
    /// QEMU's generated `virtio-net-pci.N`, N the card's position.
    pub id: Option<String>,
}

/// QEMU's default MAC for the first NIC (52:54:00:12:34:56), the last byte counting up.
pub fn default_mac(index: usize) -> [u8; 6] {
    [
        0x52,
        0x54,
        0x00,
        0x12,
        0x34,
        0x56u8.wrapping_add(index as u8),
    ]
}

/// Parses a MAC address `52:54:00:12:34:56`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next().filter(|p| p.len() == 2)?;
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

impl std::str::FromStr for NetConfig {
    type Err = ConfigError;

    /// Parses `tap=NAME[,mac=52:54:00:12:34:56][,id=ID]` (the MAC defaults to QEMU's first
    /// one; `id` names the card for `announce-self`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why| ConfigError::InvalidNet(s.to_string(), why);
        let mut tap = None;
        let mut mac = None;
        let mut id = None;
        for part in crate::qemu_opts::split_options(s) {
            match part.split_once('=') {
                Some(("tap", v)) if !v.is_empty() => tap = Some(v.to_string()),
                Some(("mac", v)) => {
                    mac = Some(parse_mac(v).ok_or_else(|| bad("mac=xx:xx:xx:xx:xx:xx"))?)
                }
                Some(("id", v)) if !v.is_empty() => id = Some(v.to_string()),
                _ => return Err(bad("expected tap=NAME[,mac=xx:xx:xx:xx:xx:xx][,id=ID]")),
            }
        }
        Ok(Self {
            tap: tap.ok_or_else(|| bad("no tap=NAME"))?,
            fd: None,
            mac,
            slot: None,
            id,
        })
    }
}

/// A virtio-rng entropy source (`--rng`; QEMU's `-device virtio-rng-pci`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RngConfig {
    /// The PCI device number (QEMU's `addr=`); the first free one if none.
    pub slot: Option<u8>,
}

/// Parses QEMU's spelling of a boolean option value.
pub fn parse_on_off(v: &str) -> Option<bool> {
    match v {
        "on" | "yes" | "true" | "y" => Some(true),
        "off" | "no" | "false" | "n" => Some(false),
        _ => None,
    }
}

impl std::str::FromStr for DiskConfig {
    type Err = ConfigError;

    /// Parses `PATH[,readonly=on|off][,serial=STR]` (`,,` is a comma in the path); also takes
    /// `file=PATH` in place of the bare path.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why| ConfigError::InvalidDisk(s.to_string(), why);
        let mut path = None;
        let mut config = Self {
            path: PathBuf::new(),
            readonly: false,
            serial: String::new(),
            slot: None,
        };
        for (i, part) in crate::qemu_opts::split_options(s).into_iter().enumerate() {
            match part.split_once('=') {
                Some(("file", v)) if path.is_none() => path = Some(v.to_string()),
                Some(("readonly", v)) => {
                    config.readonly = parse_on_off(v).ok_or_else(|| bad("readonly=on or off"))?
                }
                Some(("serial", v)) if v.len() <= 20 => config.serial = v.to_string(),
                Some(("serial", _)) => return Err(bad("serial is at most 20 bytes")),
                _ if i == 0 && path.is_none() => path = Some(part),
                _ => return Err(bad("expected PATH[,readonly=on][,serial=STR]")),
            }
        }
        match path.filter(|p| !p.is_empty()) {
            Some(p) => config.path = PathBuf::from(p),
            None => return Err(bad("no image path")),
        }
        Ok(config)
    }
}

/// Parses a decimal or `0x` hexadecimal integer.
pub fn parse_int(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

/// Parses a size like `256M`, `1G`, `512k` or a plain byte count.
///
/// A bare number is bytes; QEMU-style callers, whose bare numbers are MiB, use
/// [`parse_size_with_unit`].
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    parse_size_with_unit(s, 1)
}

/// Parses a size whose bare numbers are in `unit` bytes (QEMU's `-m 256` means MiB).
pub fn parse_size_with_unit(s: &str, unit: u64) -> Result<u64, ConfigError> {
    let bad = || ConfigError::InvalidSize(s.to_string());
    let t = s.trim();
    let (digits, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'B' => 0,
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(bad()),
            };
            (&t[..i], Some(shift))
        }
        _ => (t, None),
    };
    let n: u64 = digits.parse().map_err(|_| bad())?;
    match shift {
        Some(shift) => n.checked_mul(1 << shift),
        None => n.checked_mul(unit),
    }
    .ok_or_else(bad)
}

/// Formats a byte count the way users write it (`256M`, `4G`, `1536K`).
pub fn format_size(bytes: u64) -> String {
    for (shift, suffix) in [(40, 'T'), (30, 'G'), (20, 'M'), (10, 'K')] {
        if bytes >= 1 << shift && bytes % (1 << shift) == 0 {
            return format!("{}{}", bytes >> shift, suffix);
        }
    }
    bytes.to_string()
}

/// Parses a guest RAM size (`256M`, `4G`) and checks it is one hopvm can give a guest.
pub fn parse_memory(s: &str) -> Result<u64, ConfigError> {
    check_memory(parse_size(s)?)
}

/// Checks that a guest RAM size is within hopvm's range.
pub fn check_memory(bytes: u64) -> Result<u64, ConfigError> {
    if (MIN_MEMORY..=MAX_MEMORY).contains(&bytes) {
        Ok(bytes)
    } else {
        Err(ConfigError::MemoryRange(
            format_size(bytes),
            format_size(MAX_MEMORY),
        ))
    }
}

pub use devices::intel_iommu::IommuConfig;

/// Everything needed to build and boot a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// The kernel image (bzImage, vmlinux, Multiboot ELF or PVH ELF); a migration
    /// destination may do without one.
    pub kernel: Option<PathBuf>,
    /// An initial ramdisk (Linux) or module 0 (Multiboot).
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    pub cmdline: String,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// Number of vCPUs.
    pub cpus: u8,
    /// The CPU model, QEMU's `-cpu` syntax (`host`, `max`, `qemu64`, with `,+feat,-feat`).
    pub cpu: String,
    /// Where COM1 goes.
    pub serial: SerialConfig,
    /// The isa-debug-exit port range.
    pub debug_exit: DebugExitConfig,
    /// End hopvm instead of resetting the VM.
    pub no_reboot: bool,
    /// The QMP monitor socket (`unix:PATH`).
    pub qmp: Option<String>,
    /// Wait for an incoming migration on this URI (`defer`: until QMP `migrate-incoming`).
    pub incoming: Option<String>,
    /// Do not start the vCPUs (QEMU's `-S`): after boot set-up, or after an incoming
    /// migration loaded.
    pub paused: bool,
    /// Give the VM KVM's in-kernel PIT (QEMU's `-machine pit=on`, the default); without it the
    /// guest takes its timers from the LAPIC (and the ACPI PM timer, RTC).
    pub pit: bool,
    /// Lock all of hopvm's memory, guest RAM included, into host RAM (QEMU's
    /// `-overcommit mem-lock=on`).
    pub mem_lock: bool,
    /// Let the guest's HLT, PAUSE (and MWAIT, C-state) run without VM exits where KVM allows
    /// (QEMU's `-overcommit cpu-pm=on`): for vCPUs pinned to host CPUs of their own.
    pub cpu_pm: bool,
    /// Give the guest ACPI tables (RSDP, FADT, MADT, DSDT…); off is QEMU's `-no-acpi`: the
    /// guest finds its CPUs and interrupt routing in the MP table only.
    pub acpi: bool,
    /// Objects to create at start (`--object` / `-object`): `tls-creds-x509,id=…,dir=…,…`,
    /// `authz-simple` / `authz-list` / `authz-list-file` (key=value or JSON, see
    /// [`crate::objects`]).
    pub objects: Vec<String>,
    /// How KVM's dirty pages are collected for migration: the dirty bitmap or the dirty ring
    /// (`--dirty-ring`, QEMU's `-accel kvm,dirty-ring-size=N`).
    pub dirty_ring: crate::dirty_ring::DirtyRingConfig,
    /// virtio-blk disks, in PCI slot order.
    pub disks: Vec<DiskConfig>,
    /// virtio-net cards on tap devices, after the disks in PCI slot order.
    pub nets: Vec<NetConfig>,
    /// A virtio-rng device.
    pub rng: Option<RngConfig>,
    /// The machine type (QEMU's `-machine pc` or `q35`).
    pub machine: MachineType,
    /// Where the IOAPIC and PIC live (QEMU's `kernel-irqchip=on|split`).
    pub irqchip: IrqchipMode,
    /// An Intel VT-d IOMMU (QEMU's `-device intel-iommu`; `q35` with `kernel-irqchip=split`).
    pub intel_iommu: Option<IommuConfig>,
    /// How many of QEMU's edu devices (`-device edu`).
    pub edu: u8,
    /// How many of QEMU's PCI test devices (`-device pci-testdev`).
    pub pci_testdev: u8,
}

/// The machine type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MachineType {
    /// QEMU's `pc`: i440FX host bridge and PIIX3.
    #[default]
    Pc,
    /// QEMU's `q35`: Q35 MCH with ECAM (MCFG) and the ICH9 LPC bridge.
    Q35,
}

/// Where the interrupt controllers are emulated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IrqchipMode {
    /// All in KVM: PICs, IOAPIC, LAPICs (and the PIT).
    #[default]
    Kernel,
    /// LAPICs in KVM, the IOAPIC in hopvm (`KVM_CAP_SPLIT_IRQCHIP`); no PIC and no PIT.
    Split,
}

impl VmConfig {
    /// A configuration with defaults for everything but the kernel.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: Some(kernel.into()),
            initrd: None,
            cmdline: String::new(),
            memory: DEFAULT_MEMORY,
            cpus: 1,
            cpu: String::from(DEFAULT_CPU),
            serial: SerialConfig::Stdio,
            debug_exit: DebugExitConfig::default(),
            no_reboot: false,
            qmp: None,
            incoming: None,
            paused: false,
            pit: true,
            mem_lock: false,
            cpu_pm: false,
            acpi: true,
            objects: Vec::new(),
            dirty_ring: crate::dirty_ring::DirtyRingConfig::default(),
            disks: Vec::new(),
            nets: Vec::new(),
            rng: None,
            machine: MachineType::Pc,
            irqchip: IrqchipMode::Kernel,
            intel_iommu: None,
            edu: 0,
            pci_testdev: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("4g"), Ok(4 << 30));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size_with_unit("64", 1 << 20), Ok(64 << 20));
        assert!(parse_size("").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("-1M").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert_eq!(format_size(256 << 20), "256M");
        assert_eq!(format_size(3 << 30), "3G");
        assert_eq!(format_size(1000), "1000");
    }

    #[test]
    fn memory_range() {
        assert!(check_memory(1 << 20).is_ok());
        assert!(check_memory((1 << 20) - 1).is_err());
        assert!(check_memory(MAX_MEMORY + 1).is_err());
    }

    #[test]
    fn serial() {
        assert_eq!("stdio".parse(), Ok(SerialConfig::Stdio));
        assert_eq!("null".parse(), Ok(SerialConfig::Null));
        assert_eq!(
            "file:/tmp/x".parse(),
            Ok(SerialConfig::File(PathBuf::from("/tmp/x")))
        );
        assert!("file:".parse::<SerialConfig>().is_err());
        assert!("tcp:1".parse::<SerialConfig>().is_err());
    }

    #[test]
    fn disks() {
        let d: DiskConfig = "/tmp/a.img".parse().unwrap();
        assert_eq!(d.path, PathBuf::from("/tmp/a.img"));
        assert!(!d.readonly);
        let d: DiskConfig = "/tmp/a,,b.img,readonly=on,serial=xyz".parse().unwrap();
        assert_eq!(d.path, PathBuf::from("/tmp/a,b.img"));
        assert!(d.readonly);
        assert_eq!(d.serial, "xyz");
        let d: DiskConfig = "file=/x,readonly=off".parse().unwrap();
        assert_eq!((d.path, d.readonly), (PathBuf::from("/x"), false));
        for bad in [
            "",
            ",readonly=on",
            "/x,readonly=maybe",
            "/x,cache=none",
            "/x,serial=123456789012345678901",
            "file=",
        ] {
            assert!(bad.parse::<DiskConfig>().is_err(), "{bad}");
        }
    }

    #[test]
    fn nets() {
        let n: NetConfig = "tap=hop0".parse().unwrap();
        assert_eq!((n.tap.as_str(), n.mac), ("hop0", None));
        let n: NetConfig = "tap=t1,mac=02:00:00:00:00:01".parse().unwrap();
        assert_eq!(n.mac, Some([2, 0, 0, 0, 0, 1]));
        assert_eq!(n.id, None);
        let n: NetConfig = "tap=t1,id=net0".parse().unwrap();
        assert_eq!(n.id.as_deref(), Some("net0"));
        assert_eq!(default_mac(1), [0x52, 0x54, 0, 0x12, 0x34, 0x57]);
        for bad in [
            "",
            "tap=",
            "tap=x,id=",
            "mac=02:00:00:00:00:01",
            "tap=x,mac=1:2:3:4:5:6",
            "tap=x,vhost=on",
        ] {
            assert!(bad.parse::<NetConfig>().is_err(), "{bad}");
        }
    }

    #[test]
    fn debug_exit() {
        assert_eq!(
            "iobase=0x501,iosize=2".parse(),
            Ok(DebugExitConfig {
                iobase: 0x501,
                iosize: 2
            })
        );
        assert_eq!("iosize=0x4".parse(), Ok(DebugExitConfig::default()));
        assert!("iobase=0x10000".parse::<DebugExitConfig>().is_err());
        assert!("iobase=0xffff,iosize=2".parse::<DebugExitConfig>().is_err());
        assert!("iosize=0".parse::<DebugExitConfig>().is_err());
        assert!("port=1".parse::<DebugExitConfig>().is_err());
        assert!("iobase".parse::<DebugExitConfig>().is_err());
    }
}
