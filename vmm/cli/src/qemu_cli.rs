//! A QEMU-compatible command line: `hopvm qemu [QEMU options]`, or hopvm invoked through a link
//! named `qemu-system-x86_64`.
//!
//! It accepts the options kvm-unit-tests' `x86/run` and `scripts/arch-run.bash` pass (and the
//! probes they make: `-help`'s first line carries the QEMU version, `-device '?'` lists
//! `"pc-testdev"` and `"pci-testdev"`), so that `QEMU=<link> ./run_tests.sh` runs the suite on
//! hopvm, migration tests included. An option hopvm does not support is refused on one line
//! naming it, with exit status 1, rather than silently ignored.

use std::collections::HashMap;
use std::path::PathBuf;

use crate::qemu_domain::{self, DomainSetup, Keys, QemuObject, SerialTarget};
use crate::qemu_launch::{Launch, ProbeConfig};
use qmp::protocol::QEMU_COMPAT_VERSION;
use vmm::config::{self, DebugExitConfig, SerialConfig, VmConfig};
use vmm::qemu_opts::split_options;

/// Errors in a QEMU command line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QemuCliError {
    /// An option hopvm does not implement.
    #[error("unsupported qemu option '{0}'")]
    Unsupported(String),
    /// An option hopvm implements, with a value it does not.
    #[error("unsupported value for '{0}': {1}")]
    UnsupportedValue(String, String),
    /// An option without its argument.
    #[error("option '{0}' needs an argument")]
    MissingArgument(String),
    /// A malformed value.
    #[error("invalid value for '{0}': {1}")]
    Invalid(String, String),
    /// No `-kernel` (and no `-incoming`).
    #[error("no kernel given: use -kernel")]
    NoKernel,
}

/// What a QEMU command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QemuAction {
    /// Run a VM.
    Run(Box<VmConfig>),
    /// Print this text and exit 0 (`-help`, `-version`, `-device ?`).
    Print(String),
    /// Run no machine (`-machine none`): only the monitor, for capability probes.
    Probe(Box<ProbeConfig>),
}

/// The devices `-device ?` lists, as QEMU prints them.
const DEVICE_LIST: &str = "Storage devices:\n\
name \"virtio-blk-pci\", bus PCI, alias \"virtio-blk\"\n\
\n\
Network devices:\n\
name \"virtio-net-pci\", bus PCI, alias \"virtio-net\"\n\
\n\
Misc devices:\n\
name \"isa-debug-exit\", bus ISA\n\
name \"pc-testdev\", bus ISA\n\
name \"pci-testdev\", bus PCI, desc \"PCI Test Device\"\n\
name \"hyperv-testdev\", bus ISA\n\
name \"virtio-rng-pci\", bus PCI, alias \"virtio-rng\"\n\
name \"edu\", bus PCI\n\
\n\
Uncategorized devices:\n\
name \"intel-iommu\", bus System, desc \"Intel IOMMU (VT-d) DMA Remapping device\"\n";

fn version_line() -> String {
    let v = QEMU_COMPAT_VERSION;
    format!(
        "QEMU emulator version {}.{}.{} (hopvm {})",
        v.major,
        v.minor,
        v.micro,
        env!("CARGO_PKG_VERSION")
    )
}

fn help_text() -> String {
    format!(
        "{}\n\
usage: qemu-system-x86_64 [options]   (hopvm's QEMU-compatible command line)\n\n\
-kernel FILE            kernel image (bzImage, vmlinux, Multiboot, PVH)\n\
-initrd FILE            initrd / Multiboot module 0\n\
-append STRING          kernel command line\n\
-m SIZE                 guest RAM (MiB unless suffixed)\n\
-smp N                  number of vCPUs\n\
-cpu MODEL[,+feat,...]  qemu64 kvm64 Opteron_G1 Skylake-Server max host; +feat -feat feat=on|off\n\
                        (QEMU's CPUID, SVM and vmx-* names), vendor=, hv-passthrough\n\
-machine pc|q35,accel=kvm[,kernel-irqchip=on|split][,pit=on|off]\n\
-overcommit mem-lock=on|off,cpu-pm=on|off\n\
-enable-kvm, -accel kvm[,dirty-ring-size=N]   N: KVM dirty ring entries per vCPU (0 = bitmap)\n\
-serial stdio|null|file:PATH\n\
-device pc-testdev | isa-debug-exit[,iobase=,iosize=] | pci-testdev | hyperv-testdev | ? | help\n\
-device edu | intel-iommu[,intremap=on|off][,aw-bits=39|48]   (q35; intremap: kernel-irqchip=split)\n\
-qmp unix:PATH[,server,nowait]\n\
-chardev socket,id=ID,path=PATH,server=on,wait=off  with  -mon chardev=ID,mode=control\n\
-drive file=PATH,if=virtio[,format=raw][,readonly=on]   virtio-blk disk\n\
-netdev tap,id=ID,ifname=NAME[,script=no,downscript=no]  with  -device virtio-net-pci,netdev=ID[,mac=][,addr=]\n\
-device virtio-rng-pci[,rng=ID][,addr=]  with  -object rng-random,id=ID,filename=/dev/urandom | rng-builtin,id=ID\n\
-blockdev driver=file|raw,node-name=N,… -drive if=none,id=N,file=…  with  -device virtio-blk-pci,drive=N[,addr=][,serial=]\n\
-incoming URI | defer\n\
-S                      do not start the vCPUs\n\
-no-reboot              exit instead of rebooting\n\
-nodefaults -display none -vnc none -nographic -name NAME   accepted\n\
-global kvm-pit.lost_tick_policy=discard                  accepted\n",
        version_line()
    )
}

/// `-device virtio-rng-pci[,rng=ID][,addr=N][,bus=pci.0]` (driver and id already taken): one
/// entropy source; `rng=` must name an `rng-random` / `rng-builtin` object (checked at the end).
fn rng_device(
    opt: &str,
    k: &mut Keys<'_>,
    config: &mut VmConfig,
    backend: &mut Option<String>,
) -> Result<(), QemuCliError> {
    if config.rng.is_some() {
        return Err(QemuCliError::UnsupportedValue(
            opt.into(),
            String::from("a second virtio-rng-pci (hopvm: one)"),
        ));
    }
    k.only("bus", "pci.0")?;
    *backend = k.take("rng");
    let slot = match k.take("addr") {
        None => None,
        Some(a) => Some(crate::qemu_blockdev::parse_addr(opt, &a)?),
    };
    config.rng = Some(config::RngConfig { slot });
    Ok(())
}

/// `-drive file=PATH,if=virtio|none[,format=raw][,readonly=on][,id=ID][,media=disk]`: a
/// virtio-blk disk on a raw image (`if=virtio`), or a block node `ID` for a
/// `-device virtio-blk-pci,drive=ID` (`if=none`). Other interfaces and formats are refused (and
/// `serial=`, as QEMU 7.2 refuses it on `-drive`). Returns the disk and, for `if=none`, its id.
fn parse_drive(opt: &str, v: &str) -> Result<(config::DiskConfig, Option<String>), QemuCliError> {
    let parts = split_options(v);
    let (first, p) = props(&parts);
    if let Some(f) = first {
        return Err(QemuCliError::UnsupportedValue(opt.into(), f.into()));
    }
    let file = p
        .get("file")
        .filter(|f| !f.is_empty())
        .ok_or_else(|| QemuCliError::Invalid(opt.into(), format!("{v}: no file=")))?;
    let mut disk = config::DiskConfig {
        path: PathBuf::from(file),
        readonly: false,
        serial: String::new(),
        slot: None,
    };
    for (&k, &val) in &p {
        match (k, val) {
            ("file", _)
            | ("id", _)
            | ("if", "virtio" | "none")
            | ("format", "raw")
            | ("media", "disk") => {}
            ("readonly", val) => {
                disk.readonly = config::parse_on_off(val).ok_or_else(|| {
                    QemuCliError::Invalid(opt.into(), format!("readonly={val}: expected on or off"))
                })?
            }
            _ => {
                return Err(QemuCliError::UnsupportedValue(
                    opt.into(),
                    format!("{k}={val}"),
                ))
            }
        }
    }
    match (p.get("if"), p.get("id")) {
        (Some(&"virtio"), _) => Ok((disk, None)),
        (Some(&"none"), Some(id)) => Ok((disk, Some((*id).to_string()))),
        (Some(&"none"), None) => Err(QemuCliError::Invalid(
            opt.into(),
            format!("{v}: if=none needs an id= for -device …,drive="),
        )),
        _ => Err(QemuCliError::UnsupportedValue(
            opt.into(),
            String::from("a drive without if=virtio or if=none (hopvm has only virtio-blk disks)"),
        )),
    }
}

/// Maps the items of `key=value,flag,...` (split by [`split_options`], so `,,` is a literal
/// comma); a bare first element is returned separately.
fn props(parts: &[String]) -> (Option<&str>, HashMap<&str, &str>) {
    let mut first = None;
    let mut map = HashMap::new();
    for (i, part) in parts.iter().map(String::as_str).enumerate() {
        match part.split_once('=') {
            Some((k, v)) => {
                map.insert(k, v);
            }
            None if i == 0 => first = Some(part),
            None => {
                map.insert(part, "on");
            }
        }
    }
    (first, map)
}

/// QEMU's boolean option values.
fn on_off(v: &str) -> Option<bool> {
    match v {
        "on" | "yes" | "true" => Some(true),
        "off" | "no" | "false" => Some(false),
        _ => None,
    }
}

/// Parses QEMU's arguments (without argv[0]).
pub fn parse(args: &[String]) -> Result<QemuAction, QemuCliError> {
    parse_full(args).map(|(action, _, _)| action)
}

/// A `-chardev` hopvm implements.
#[derive(Debug, Clone)]
enum Chardev {
    /// A listening Unix socket by path, in `--qmp` syntax.
    Socket(String),
    /// A listening socket handed over by the parent.
    SocketFd(i32),
    /// A file (or an `-add-fd` set's descriptor).
    File { path: String, append: bool },
}

/// QEMU's accelerator list (`kvm`, `kvm:tcg`, `tcg`): whether it includes KVM; an unknown
/// accelerator is an error.
fn accel_has_kvm(opt: &str, list: &str) -> Result<bool, QemuCliError> {
    let mut kvm = false;
    for accel in list.split(':') {
        match accel {
            "kvm" => kvm = true,
            "tcg" => {}
            other => return Err(QemuCliError::UnsupportedValue(opt.into(), other.into())),
        }
    }
    Ok(kvm)
}

/// Parses QEMU's arguments (without argv[0]): what to run, how the process starts
/// (`-pidfile`, `-daemonize`), and the domain's make-up beyond the VM configuration.
pub fn parse_full(args: &[String]) -> Result<(QemuAction, Launch, DomainSetup), QemuCliError> {
    let mut launch = Launch::default();
    let mut domain = DomainSetup::new();
    let mut machine_none = false;
    let mut kvm = true;
    let mut config = VmConfig::new("");
    config.kernel = None;
    let mut memory_given = false;
    let mut memory_backend: Option<String> = None;
    let mut backends: HashMap<String, u64> = HashMap::new();
    let mut fdsets: HashMap<u32, Vec<i32>> = HashMap::new();
    let mut serial_given = false;
    let mut nodefaults = false;
    let mut serial_chardev: Option<String> = None;
    let mut chardevs: HashMap<String, Chardev> = HashMap::new();
    let mut monitors: Vec<String> = Vec::new();
    let mut blocks = crate::qemu_blockdev::BlockGraph::default();
    let mut nics = crate::qemu_netdev::NetGraph::default();
    let mut rng_objects: Vec<String> = Vec::new();
    let mut rng_backend: Option<String> = None;
    let mut it = args.iter();
    while let Some(raw) = it.next() {
        // QEMU accepts -opt and --opt alike.
        let opt = if raw.starts_with("--") {
            &raw[1..]
        } else {
            raw.as_str()
        };
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| QemuCliError::MissingArgument(opt.to_string()))
        };
        let invalid = |v: &str, why: String| QemuCliError::Invalid(format!("{opt} {v}"), why);
        match opt {
            "-h" | "-help" => return Ok((QemuAction::Print(help_text()), launch, domain)),
            "-version" => {
                return Ok((
                    QemuAction::Print(format!("{}\n", version_line())),
                    launch,
                    domain,
                ))
            }
            "-kernel" => config.kernel = Some(PathBuf::from(value()?)),
            "-initrd" => config.initrd = Some(PathBuf::from(value()?)),
            "-append" => config.cmdline = value()?,
            "-m" => {
                let v = value()?;
                let parts = split_options(&v);
                let (first, p) = props(&parts);
                let size = first.or(p.get("size").copied()).unwrap_or("");
                config.memory = config::parse_size_with_unit(size, 1 << 20)
                    .and_then(config::check_memory)
                    .map_err(|e| invalid(&v, e.to_string()))?;
                memory_given = true;
            }
            "-smp" => {
                let v = value()?;
                let parts = split_options(&v);
                let (first, p) = props(&parts);
                let n = first.or(p.get("cpus").copied()).unwrap_or("1");
                config.cpus = n
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| invalid(&v, String::from("expected a vCPU count")))?;
                let count = |key: &str| -> Result<u8, QemuCliError> {
                    p.get(key).map_or(Ok(1), |n| {
                        n.parse()
                            .ok()
                            .filter(|n| *n > 0)
                            .ok_or_else(|| invalid(&v, format!("{key}={n}")))
                    })
                };
                let (sockets, dies, cores, threads) = (
                    count("sockets")?,
                    count("dies")?,
                    count("cores")?,
                    count("threads")?,
                );
                for key in p.keys() {
                    if !matches!(
                        *key,
                        "cpus" | "sockets" | "dies" | "cores" | "threads" | "maxcpus"
                    ) {
                        return Err(QemuCliError::UnsupportedValue(opt.into(), (*key).into()));
                    }
                }
                if p.contains_key("sockets") || p.contains_key("cores") || p.contains_key("threads")
                {
                    let product = u32::from(sockets)
                        * u32::from(dies)
                        * u32::from(cores)
                        * u32::from(threads);
                    if product != u32::from(config.cpus) {
                        return Err(invalid(
                            &v,
                            format!(
                                "Invalid CPU topology: product of the hierarchy must match \
                                 maxcpus: sockets ({sockets}) * dies ({dies}) * cores ({cores}) \
                                 * threads ({threads}) != maxcpus ({})",
                                config.cpus
                            ),
                        ));
                    }
                }
                if let Some(max) = p.get("maxcpus").filter(|m| **m != n) {
                    return Err(QemuCliError::UnsupportedValue(
                        opt.into(),
                        format!("maxcpus={max} (hopvm cannot hot-plug vCPUs)"),
                    ));
                }
                domain.cores = cores;
                domain.threads = threads;
            }
            "-cpu" => config.cpu = value()?,
            "-machine" | "-M" => {
                let v = value()?;
                let parts = split_options(&v);
                let (first, p) = props(&parts);
                if let Some(t) = first.or(p.get("type").copied()) {
                    config.machine = match t {
                        "pc" | "pc-i440fx" | "none" => config::MachineType::Pc,
                        t if t.starts_with("pc-i440fx-") => config::MachineType::Pc,
                        "q35" | "pc-q35" => config::MachineType::Q35,
                        t if t.starts_with("pc-q35-") => config::MachineType::Q35,
                        _ => return Err(QemuCliError::UnsupportedValue(opt.into(), t.into())),
                    };
                    machine_none = t == "none";
                }
                for (k, val) in p {
                    match (k, val) {
                        ("type", _) => {}
                        ("accel", list) => kvm = accel_has_kvm(opt, list)?,
                        ("kernel_irqchip" | "kernel-irqchip", mode) => {
                            config.irqchip = match mode {
                                "on" | "yes" | "true" => config::IrqchipMode::Kernel,
                                "split" => config::IrqchipMode::Split,
                                "off" | "no" | "false" => {
                                    return Err(invalid(
                                        &v,
                                        String::from(
                                            "kernel-irqchip=off: hopvm has no userspace \
                                             LAPIC (use on or split)",
                                        ),
                                    ))
                                }
                                _ => return Err(invalid(&v, format!("{k}={mode}"))),
                            }
                        }
                        ("pit", pit) => {
                            config.pit =
                                on_off(pit).ok_or_else(|| invalid(&v, format!("{k}={pit}")))?
                        }
                        // hopvm has no USB controller.
                        ("usb", "off" | "no" | "false") => {}
                        ("dump-guest-core", d) => {
                            domain.dump_guest_core =
                                on_off(d).ok_or_else(|| invalid(&v, format!("{k}={d}")))?
                        }
                        ("memory-backend", id) => memory_backend = Some(id.to_string()),
                        _ => {
                            return Err(QemuCliError::UnsupportedValue(
                                opt.into(),
                                format!("{k}={val}"),
                            ))
                        }
                    }
                }
            }
            "-enable-kvm" => {}
            "-overcommit" => {
                let v = value()?;
                let parts = split_options(&v);
                let (first, p) = props(&parts);
                for (k, val) in first.map(|f| (f, "on")).into_iter().chain(p) {
                    let on = on_off(val).ok_or_else(|| invalid(&v, format!("{k}={val}")))?;
                    match k {
                        "mem-lock" => config.mem_lock = on,
                        "cpu-pm" => config.cpu_pm = on,
                        _ => return Err(QemuCliError::UnsupportedValue(opt.into(), k.into())),
                    }
                }
            }
            "-accel" => {
                let v = value()?;
                let parts = split_options(&v);
                let (first, p) = props(&parts);
                kvm = accel_has_kvm(opt, first.or(p.get("accel").copied()).unwrap_or(""))?;
                if let Some(size) = p.get("dirty-ring-size") {
                    config.dirty_ring = config::parse_int(size)
                        .ok_or_else(|| {
                            vmm::dirty_ring::DirtyRingError::InvalidSize((*size).to_string())
                        })
                        .and_then(vmm::dirty_ring::DirtyRingConfig::from_entries)
                        .and_then(vmm::dirty_ring::check_host)
                        .map_err(|e| invalid(&v, e.to_string()))?;
                }
            }
            "-no-reboot" => config.no_reboot = true,
            // hopvm reads no configuration files and creates no default devices.
            "-nographic" | "-no-user-config" => {}
            "-nodefaults" => nodefaults = true,
            "-no-shutdown" => domain.no_shutdown = true,
            "-no-acpi" => config.acpi = false,
            "-uuid" => qemu_domain::check_uuid(&value()?)?,
            "-object" => match qemu_domain::parse_object(&value()?)? {
                (_, QemuObject::Secret) => {}
                (id, QemuObject::MemoryBackendRam(size)) => {
                    backends.insert(id, size);
                }
                (_, QemuObject::TlsCredsX509(spec) | QemuObject::Authz(spec)) => {
                    config.objects.push(spec)
                }
                (id, QemuObject::Rng) => {
                    rng_objects.push(id);
                }
            },
            "-add-fd" => {
                let (set, fd) = qemu_domain::parse_add_fd(&value()?)?;
                fdsets.entry(set).or_default().push(fd);
            }
            "-rtc" => {
                let v = value()?;
                let mut k = Keys::new(opt, qemu_domain::option_map(opt, &v, "")?);
                // hopvm's RTC runs on the host's clock, in UTC.
                k.only("base", "utc")?;
                k.only("clock", "host")?;
                k.finish()?;
            }
            "-boot" => {
                let v = value()?;
                let mut k = Keys::new(opt, qemu_domain::option_map(opt, &v, "order")?);
                // hopvm boots the -kernel image directly: there is no boot device list for
                // strict to restrict.
                let _strict = k.bool("strict")?;
                k.finish()?;
            }
            "-audiodev" => {
                let v = value()?;
                let mut k = Keys::new(opt, qemu_domain::option_map(opt, &v, "driver")?);
                k.required("id")?;
                // No sound devices: the only backend is none.
                k.only("driver", "none")?;
                k.finish()?;
            }
            "-msg" => {
                let v = value()?;
                let mut k = Keys::new(opt, qemu_domain::option_map(opt, &v, "")?);
                // hopvm's few messages carry no timestamp either way.
                let _timestamp = k.bool("timestamp")?;
                k.finish()?;
            }
            "-sandbox" => domain.sandbox = crate::sandbox::parse(&value()?)?,
            "-pidfile" => launch.pidfile = Some(PathBuf::from(value()?)),
            "-daemonize" => launch.daemonize = true,
            "-S" => config.paused = true,
            "-name" => {
                let v = value()?;
                let mut k = Keys::new(opt, qemu_domain::option_map(opt, &v, "guest")?);
                let _guest = k.take("guest");
                let _process = k.take("process");
                // hopvm's threads always carry names (vcpu0, qmp-accept, …).
                let _debug_threads = k.bool("debug-threads")?;
                k.finish()?;
            }
            "-display" | "-vnc" => {
                let v = value()?;
                if v != "none" {
                    return Err(QemuCliError::UnsupportedValue(opt.into(), v));
                }
            }
            "-global" => {
                let v = value()?;
                // KVM's in-kernel PIT already drops ticks a stopped guest missed.
                if v != "kvm-pit.lost_tick_policy=discard" {
                    return Err(QemuCliError::UnsupportedValue(opt.into(), v));
                }
            }
            "-serial" => {
                serial_given = true;
                let v = value()?;
                config.serial = match v.as_str() {
                    "none" => SerialConfig::Null,
                    s => s
                        .parse()
                        .map_err(|e: config::ConfigError| invalid(&v, e.to_string()))?,
                };
            }
            "-device" => {
                let v = value()?;
                if v.trim_start().starts_with('{') {
                    let mut k = Keys::new(opt, qemu_domain::option_map(opt, &v, "driver")?);
                    let driver = k.required("driver")?;
                    let id = k.take("id");
                    match driver.as_str() {
                        "isa-serial" => {
                            serial_chardev = Some(k.required("chardev")?);
                            k.only("index", "0")?;
                            serial_given = true;
                        }
                        "virtio-blk-pci" => blocks.add_device(opt, &mut k)?,
                        "virtio-net-pci" => nics.add_device(opt, &mut k, id.clone())?,
                        "virtio-rng-pci" => rng_device(opt, &mut k, &mut config, &mut rng_backend)?,
                        other => {
                            return Err(QemuCliError::UnsupportedValue(opt.into(), other.into()))
                        }
                    }
                    k.finish()?;
                    if let Some(id) = id {
                        domain.peripherals.push((id, driver));
                    }
                    continue;
                }
                let parts = split_options(&v);
                let (first, p) = props(&parts);
                match first.unwrap_or("") {
                    driver @ ("virtio-blk-pci" | "virtio-net-pci" | "virtio-rng-pci") => {
                        let mut k = Keys::new(opt, qemu_domain::option_map(opt, &v, "driver")?);
                        k.take("driver");
                        let id = k.take("id");
                        match driver {
                            "virtio-blk-pci" => blocks.add_device(opt, &mut k)?,
                            "virtio-net-pci" => nics.add_device(opt, &mut k, id.clone())?,
                            _ => rng_device(opt, &mut k, &mut config, &mut rng_backend)?,
                        }
                        k.finish()?;
                        if let Some(id) = id {
                            domain.peripherals.push((id, driver.to_string()));
                        }
                    }
                    "isa-serial" => {
                        let mut k = Keys::new(opt, qemu_domain::option_map(opt, &v, "driver")?);
                        k.take("driver");
                        let id = k.take("id");
                        serial_chardev = Some(k.required("chardev")?);
                        k.only("index", "0")?;
                        k.finish()?;
                        serial_given = true;
                        if let Some(id) = id {
                            domain.peripherals.push((id, String::from("isa-serial")));
                        }
                    }
                    "?" | "help" => {
                        return Ok((QemuAction::Print(DEVICE_LIST.to_string()), launch, domain))
                    }
                    // Always present in hopvm.
                    "pc-testdev" => {}
                    "pci-testdev" => {
                        // Placed in the first free slot; QEMU's `membar` is not provided.
                        for (key, val) in &p {
                            if !matches!((*key, *val), ("id", _) | ("bus", "pcie.0" | "pci.0")) {
                                return Err(invalid(&v, format!("{key}={val}")));
                            }
                        }
                        config.pci_testdev = config.pci_testdev.saturating_add(1);
                    }
                    // QEMU's Hyper-V test device drives SynIC interrupt routes; hopvm gives
                    // no guest a SynIC (see `-cpu hv-*`), so no guest can use it: accepted,
                    // as QEMU accepts it on a host without KVM Hyper-V support.
                    "hyperv-testdev" => {}
                    "edu" => {
                        // Placed in the first free slot; no other property is taken.
                        for (key, val) in &p {
                            if !matches!((*key, *val), ("id", _) | ("bus", "pcie.0" | "pci.0")) {
                                return Err(invalid(&v, format!("{key}={val}")));
                            }
                        }
                        config.edu = config.edu.saturating_add(1);
                    }
                    "intel-iommu" => {
                        if config.intel_iommu.is_some() {
                            return Err(invalid(&v, String::from("only one intel-iommu")));
                        }
                        let mut iommu = config::IommuConfig::default();
                        for (key, val) in &p {
                            let bad = || invalid(&v, format!("{key}={val}"));
                            match *key {
                                "id" => {}
                                "intremap" => iommu.intremap = on_off(val).ok_or_else(bad)?,
                                "aw-bits" => {
                                    iommu.aw_bits = match *val {
                                        "39" => 39,
                                        "48" => 48,
                                        _ => return Err(bad()),
                                    }
                                }
                                // Not implemented: refused rather than ignored.
                                "eim" | "caching-mode" | "device-iotlb" | "x-scalable-mode"
                                | "dma-drain" | "pt" => {
                                    let default = matches!(*key, "pt" | "dma-drain");
                                    if on_off(val) != Some(default) {
                                        return Err(invalid(
                                            &v,
                                            format!(
                                                "{key}={val} is not supported by hopvm's \
                                                 intel-iommu"
                                            ),
                                        ));
                                    }
                                }
                                _ => return Err(bad()),
                            }
                        }
                        config.intel_iommu = Some(iommu);
                    }
                    "isa-debug-exit" => {
                        let mut spec = Vec::new();
                        for k in ["iobase", "iosize"] {
                            if let Some(val) = p.get(k) {
                                spec.push(format!("{k}={val}"));
                            }
                        }
                        config.debug_exit = spec
                            .join(",")
                            .parse::<DebugExitConfig>()
                            .map_err(|e| invalid(&v, e.to_string()))?;
                    }
                    other => return Err(QemuCliError::UnsupportedValue(opt.into(), other.into())),
                }
            }
            "-qmp" => {
                let v = value()?;
                config.qmp = Some(v);
            }
            "-chardev" => {
                let v = value()?;
                let parts = split_options(&v);
                let (backend, p) = props(&parts);
                match (backend, p.get("id"), p.get("path"), p.get("fd")) {
                    (Some("socket"), Some(id), Some(path), None) => {
                        // The path goes back into option syntax: re-escape its commas.
                        let mut spec = format!("unix:{}", path.replace(',', ",,"));
                        if p.get("server").is_some_and(|s| *s != "off") {
                            spec.push_str(",server=on");
                        }
                        chardevs.insert((*id).to_string(), Chardev::Socket(spec));
                    }
                    (Some("socket"), Some(id), None, None)
                        if p.contains_key("host") && p.contains_key("port") =>
                    {
                        // A TCP monitor; `tls-creds=ID` makes its clients run TLS.
                        let host = p.get("host").copied().unwrap_or_default();
                        let host = if host.contains(':') {
                            format!("[{host}]")
                        } else {
                            host.to_string()
                        };
                        let mut spec =
                            format!("tcp:{host}:{}", p.get("port").copied().unwrap_or_default());
                        if p.get("server").is_some_and(|s| *s != "off") {
                            spec.push_str(",server=on");
                        }
                        if let Some(creds) = p.get("tls-creds") {
                            spec.push_str(&format!(",tls-creds={creds}"));
                        }
                        if let Some(authz) = p.get("tls-authz") {
                            spec.push_str(&format!(",tls-authz={authz}"));
                        }
                        chardevs.insert((*id).to_string(), Chardev::Socket(spec));
                    }
                    (Some("socket"), Some(id), None, Some(fd)) => {
                        if p.get("server")
                            .is_none_or(|s| !matches!(*s, "on" | "yes" | "true"))
                        {
                            return Err(invalid(&v, String::from("fd= needs server=on")));
                        }
                        let fd = fd
                            .parse()
                            .ok()
                            .filter(|fd| *fd > 2)
                            .ok_or_else(|| invalid(&v, format!("fd={fd}")))?;
                        chardevs.insert((*id).to_string(), Chardev::SocketFd(fd));
                    }
                    (Some("file"), Some(id), Some(path), None) => {
                        let mut k = Keys::new(opt, qemu_domain::option_map(opt, &v, "backend")?);
                        for key in ["backend", "id", "path"] {
                            k.take(key);
                        }
                        let append = k.bool("append")?.unwrap_or(false);
                        k.finish()?;
                        chardevs.insert(
                            (*id).to_string(),
                            Chardev::File {
                                path: (*path).to_string(),
                                append,
                            },
                        );
                    }
                    _ => return Err(QemuCliError::UnsupportedValue(opt.into(), v)),
                }
            }
            "-mon" => {
                let v = value()?;
                let parts = split_options(&v);
                let (_, p) = props(&parts);
                match (p.get("chardev"), p.get("mode")) {
                    (Some(id), Some(&"control")) => monitors.push((*id).to_string()),
                    _ => return Err(QemuCliError::UnsupportedValue(opt.into(), v)),
                }
            }
            "-drive" => match parse_drive(opt, &value()?)? {
                (disk, None) => config.disks.push(disk),
                (disk, Some(id)) => blocks.add_drive_none(opt, &id, &disk)?,
            },
            "-blockdev" => blocks.add_blockdev(opt, &value()?)?,
            "-netdev" => nics.add_netdev(opt, &value()?)?,
            "-incoming" => config.incoming = Some(value()?),
            other => return Err(QemuCliError::Unsupported(other.to_string())),
        }
    }
    config.disks.extend(blocks.resolve()?);
    config.nets.extend(nics.resolve()?);
    if let Some(id) = rng_backend.filter(|id| !rng_objects.contains(id)) {
        return Err(QemuCliError::Invalid(
            String::from("-device"),
            format!("virtio-rng-pci,rng={id}: no rng-random or rng-builtin object with that id"),
        ));
    }
    for id in monitors {
        let chardev = chardevs.get(&id).ok_or_else(|| {
            QemuCliError::Invalid(String::from("-mon"), format!("no chardev {id}"))
        })?;
        match chardev {
            Chardev::Socket(spec) => config.qmp = Some(spec.clone()),
            Chardev::SocketFd(fd) => domain.monitor_fd = Some(*fd),
            Chardev::File { .. } => {
                return Err(QemuCliError::UnsupportedValue(
                    String::from("-mon"),
                    format!("chardev={id}: a monitor needs a socket"),
                ))
            }
        }
    }
    // The chardevs as query-chardev describes them.
    let mut ids: Vec<&String> = chardevs.keys().collect();
    ids.sort();
    for id in ids {
        let filename = match &chardevs[id] {
            Chardev::Socket(spec) => spec.clone(),
            Chardev::SocketFd(_) => String::from("unix:,server=on"),
            Chardev::File { .. } => String::from("file"),
        };
        domain.chardevs.push((id.clone(), filename));
    }
    if let Some(id) = serial_chardev {
        let Some(Chardev::File { path, append }) = chardevs.get(&id) else {
            return Err(QemuCliError::UnsupportedValue(
                String::from("-device"),
                format!("isa-serial,chardev={id}: hopvm's serial port writes to a file chardev"),
            ));
        };
        let target = match path.strip_prefix("/dev/fdset/") {
            Some(set) => {
                let fd = set
                    .parse()
                    .ok()
                    .and_then(|set: u32| fdsets.get(&set))
                    .and_then(|fds| fds.first().copied())
                    .ok_or_else(|| {
                        QemuCliError::Invalid(
                            String::from("-chardev"),
                            format!("path={path}: no such -add-fd set"),
                        )
                    })?;
                SerialTarget::Fd { fd }
            }
            None => SerialTarget::Path {
                path: PathBuf::from(path),
                append: *append,
            },
        };
        domain.serial = Some(target);
        config.serial = SerialConfig::Null;
    } else if nodefaults && !serial_given {
        // -nodefaults: no serial port unless one is asked for.
        config.serial = SerialConfig::Null;
    }
    if let Some(id) = &memory_backend {
        let size = *backends.get(id).ok_or_else(|| {
            QemuCliError::Invalid(
                String::from("-machine"),
                format!("memory-backend={id}: no memory-backend-ram object with that id"),
            )
        })?;
        if memory_given && size != config.memory {
            return Err(QemuCliError::Invalid(
                String::from("-machine"),
                format!(
                    "memory-backend={id}: its size ({size}) does not match -m ({})",
                    config.memory
                ),
            ));
        }
        config.memory = config::check_memory(size)
            .map_err(|e| QemuCliError::Invalid(String::from("-object"), e.to_string()))?;
    }
    if machine_none {
        let probe = ProbeConfig {
            qmp: config.qmp,
            qmp_fd: domain.monitor_fd,
            paused: config.paused,
            kvm,
        };
        return Ok((QemuAction::Probe(Box::new(probe)), launch, domain));
    }
    if !kvm {
        return Err(QemuCliError::UnsupportedValue(
            String::from("-accel"),
            String::from("tcg (hopvm runs guests under KVM only)"),
        ));
    }
    if config.kernel.is_none() && config.incoming.is_none() {
        return Err(QemuCliError::NoKernel);
    }
    Ok((QemuAction::Run(Box::new(config)), launch, domain))
}

/// Runs hopvm with QEMU's arguments (without argv[0]); returns the process exit status.
pub fn main(args: &[String]) -> i32 {
    match parse_full(args) {
        Ok((QemuAction::Print(text), _, _)) => {
            print!("{text}");
            0
        }
        Ok((QemuAction::Probe(probe), launch, _)) => {
            crate::run::init_logging();
            crate::qemu_launch::run_probe(&probe, &launch)
        }
        Ok((QemuAction::Run(config), launch, domain)) => {
            crate::run::init_logging();
            match crate::qemu_launch::run_domain(&config, &launch, &domain) {
                Ok(status) => status,
                Err(e) => {
                    eprintln!("hopvm: {e}");
                    crate::run::EXIT_ERROR
                }
            }
        }
        Err(e) => {
            eprintln!("hopvm: {e}");
            crate::run::EXIT_ERROR
        }
    }
}

/// True when hopvm was invoked through a link named like a QEMU binary.
pub fn invoked_as_qemu(argv0: &std::ffi::OsStr) -> bool {
    std::path::Path::new(argv0)
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("qemu-system-") || n == "qemu-kvm")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    fn run(s: &str) -> VmConfig {
        match parse(&args(s)).unwrap() {
            QemuAction::Run(c) => *c,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn drives() {
        let c = run("-kernel k -drive file=/tmp/d.img,if=virtio,format=raw \
                     -drive file=/tmp/e,,f.img,if=virtio,readonly=on,id=d1");
        assert_eq!(c.disks.len(), 2);
        assert_eq!(c.disks[0].path, PathBuf::from("/tmp/d.img"));
        assert!(!c.disks[0].readonly);
        assert_eq!(c.disks[1].path, PathBuf::from("/tmp/e,f.img"));
        assert!(c.disks[1].readonly);
        let c = run(
            "-kernel k -blockdev driver=file,node-name=s,filename=/b.img \
                     -blockdev driver=raw,node-name=f,file=s,read-only=on \
                     -drive file=/c.img,if=none,id=c0 \
                     -device virtio-blk-pci,drive=f,addr=0x5 -device virtio-blk-pci,drive=c0",
        );
        assert_eq!(c.disks.len(), 2);
        assert_eq!(
            (c.disks[0].path.to_str(), c.disks[0].readonly),
            (Some("/b.img"), true)
        );
        assert_eq!(c.disks[0].slot, Some(5));
        assert_eq!(c.disks[1].path, PathBuf::from("/c.img"));
        for bad in [
            "-drive file=/x,if=none",
            "-device virtio-blk-pci,drive=nothing",
            "-drive file=/x",
            "-drive file=/x,if=ide",
            "-drive file=/x,if=virtio,format=qcow2",
            "-drive if=virtio",
            "-drive file=/x,if=virtio,readonly=perhaps",
            "-drive file=/x,if=virtio,cache=none",
            "-drive file=/x,if=virtio,serial=abc",
        ] {
            assert!(parse(&args(&format!("-kernel k {bad}"))).is_err(), "{bad}");
        }
    }

    #[test]
    fn rng() {
        let c = run("-kernel k -object rng-random,id=r0,filename=/dev/urandom \
                     -device virtio-rng-pci,rng=r0,addr=0x6");
        assert_eq!(c.rng, Some(config::RngConfig { slot: Some(6) }));
        let c = run("-kernel k -device {\"driver\":\"virtio-rng-pci\",\"id\":\"rng0\"}");
        assert_eq!(c.rng, Some(config::RngConfig { slot: None }));
        for bad in [
            "-device virtio-rng-pci,rng=none",
            "-object rng-random,id=r,filename=/etc/passwd -device virtio-rng-pci,rng=r",
            "-object rng-egd,id=r,chardev=c",
            "-device virtio-rng-pci -device virtio-rng-pci",
            "-device virtio-rng-pci,addr=0x0",
            "-device virtio-rng-pci,max-bytes=1",
        ] {
            assert!(parse(&args(&format!("-kernel k {bad}"))).is_err(), "{bad}");
        }
    }

    #[test]
    fn kvm_unit_tests_command_line() {
        let c = run(
            "--no-reboot -nodefaults -global kvm-pit.lost_tick_policy=discard \
                     -device pc-testdev -device isa-debug-exit,iobase=0xf4,iosize=0x4 \
                     -device pci-testdev -display none -vnc none -serial stdio \
                     -machine accel=kvm -kernel x86/apic.flat -smp 2 -m 64 \
                     -cpu qemu64,+x2apic,+tsc-deadline -append a -initrd env",
        );
        assert_eq!(c.kernel, Some(PathBuf::from("x86/apic.flat")));
        assert_eq!((c.cpus, c.memory), (2, 64 << 20));
        assert_eq!(c.cpu, "qemu64,+x2apic,+tsc-deadline");
        assert_eq!(c.cmdline, "a");
        assert!(c.no_reboot);
        assert_eq!(c.debug_exit, DebugExitConfig::default());
        assert_eq!(c.initrd, Some(PathBuf::from("env")));
        assert_eq!(c.pci_testdev, 1);
        let c = run("-kernel k -device pci-testdev,id=t,bus=pci.0 -device pci-testdev");
        assert_eq!(c.pci_testdev, 2);
        for bad in [
            "-device pci-testdev,membar=1M",
            "-device pci-testdev,addr=0x5",
        ] {
            assert!(parse(&args(&format!("-kernel k {bad}"))).is_err(), "{bad}");
        }
    }

    #[test]
    fn migration_and_monitor_options() {
        let c = run(
            "-kernel k -chardev socket,id=mon1,path=/tmp/q,server=on,wait=off \
                     -mon chardev=mon1,mode=control -incoming unix:/tmp/m -S",
        );
        assert_eq!(c.qmp.as_deref(), Some("unix:/tmp/q,server=on"));
        assert_eq!(c.incoming.as_deref(), Some("unix:/tmp/m"));
        assert!(c.paused);
        // `,,` is a literal comma in a path, as in QEMU.
        let c = run(
            "-kernel k -chardev socket,id=m,path=/tmp/a,,b,server=on -mon chardev=m,mode=control",
        );
        assert_eq!(c.qmp.as_deref(), Some("unix:/tmp/a,,b,server=on"));
        let spec: qmp::QmpListenSpec = c.qmp.unwrap().parse().unwrap();
        assert_eq!(
            spec.address,
            qmp::QmpAddress::Unix(PathBuf::from("/tmp/a,b"))
        );
        let c = run("-incoming defer -qmp unix:/tmp/q,server,nowait");
        assert_eq!(c.kernel, None);
        assert_eq!(c.qmp.as_deref(), Some("unix:/tmp/q,server,nowait"));
    }

    #[test]
    fn q35_split_irqchip_intel_iommu_edu() {
        let c = run("-machine accel=kvm -kernel k -M q35,kernel-irqchip=split \
                     -device intel-iommu,intremap=on,eim=off -device edu");
        assert_eq!(c.machine, config::MachineType::Q35);
        assert_eq!(c.irqchip, config::IrqchipMode::Split);
        assert_eq!(
            c.intel_iommu,
            Some(config::IommuConfig {
                aw_bits: 39,
                intremap: true
            })
        );
        assert_eq!(c.edu, 1);
        let c = run("-kernel k -machine pc-q35-7.2,kernel-irqchip=on -device edu -device edu");
        assert_eq!(
            (c.machine, c.irqchip, c.edu),
            (config::MachineType::Q35, config::IrqchipMode::Kernel, 2)
        );
        let c = run("-kernel k -device intel-iommu,aw-bits=48,caching-mode=off");
        assert_eq!(c.intel_iommu.map(|i| i.aw_bits), Some(48));
        assert_eq!(run("-kernel k").machine, config::MachineType::Pc);
        for bad in [
            "-M q35,kernel-irqchip=off",
            "-M q35,kernel-irqchip=maybe",
            "-device intel-iommu,eim=on",
            "-device intel-iommu,caching-mode=on",
            "-device intel-iommu,aw-bits=40",
            "-device intel-iommu,frobnicate=on",
            "-device intel-iommu -device intel-iommu",
            "-device edu,addr=0x5",
            "-device edu,dma_mask=0xff",
        ] {
            assert!(parse(&args(&format!("-kernel k {bad}"))).is_err(), "{bad}");
        }
    }

    #[test]
    fn machine_pit_and_overcommit() {
        let c = run("-kernel k -machine pit=off");
        assert!(!c.pit && !c.mem_lock && !c.cpu_pm);
        assert!(run("-kernel k -M pc,pit=on").pit);
        let c = run("-kernel k -overcommit cpu-pm=on -overcommit mem-lock=off");
        assert!(c.cpu_pm && !c.mem_lock);
        assert!(run("-kernel k -overcommit mem-lock=on,cpu-pm=off").mem_lock);
        assert!(parse(&args("-kernel k -machine pit=maybe")).is_err());
        assert!(parse(&args("-kernel k -overcommit cpu-pm=sometimes")).is_err());
        assert!(run("-kernel k -overcommit mem-lock").mem_lock);
        assert!(parse(&args("-kernel k -overcommit what=on")).is_err());
    }

    #[test]
    fn accel_dirty_ring_size() {
        use vmm::dirty_ring::DirtyRingConfig;
        assert_eq!(
            run("-kernel k -accel kvm").dirty_ring,
            DirtyRingConfig::default()
        );
        assert_eq!(
            run("-kernel k -accel kvm,dirty-ring-size=0").dirty_ring,
            DirtyRingConfig::Off
        );
        if vmm::dirty_ring::host_offers_ring() {
            if vmm::dirty_ring::host_ring_unsafe().is_none() {
                assert_eq!(
                    run("-kernel k -accel kvm,dirty-ring-size=1024").dirty_ring,
                    DirtyRingConfig::Entries(1024)
                );
            } else {
                let e = parse(&args("-kernel k -accel kvm,dirty-ring-size=1024"))
                    .unwrap_err()
                    .to_string();
                assert!(e.contains("can overrun it"), "{e}");
            }
        }
        for bad in ["1000", "128", "131072", "x", ""] {
            let e = parse(&args(&format!(
                "-kernel k -accel kvm,dirty-ring-size={bad}"
            )))
            .unwrap_err()
            .to_string();
            assert!(
                e.contains(&format!("invalid dirty ring size '{bad}'")),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn probes_and_errors() {
        match parse(&args("-device ?")).unwrap() {
            QemuAction::Print(t) => {
                assert!(t.contains("\"pc-testdev\"") && t.contains("\"pci-testdev\""))
            }
            other => panic!("{other:?}"),
        }
        match parse(&args("-help")).unwrap() {
            QemuAction::Print(t) => assert!(t.starts_with("QEMU emulator version 7.2.")),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            parse(&args("-kernel k -usb")),
            Err(QemuCliError::Unsupported(String::from("-usb")))
        );
        assert!(parse(&args("-kernel k -machine q36")).is_err());
        assert!(parse(&args("-kernel k -machine accel=tcg")).is_err());
        assert!(parse(&args("-kernel k -m lots")).is_err());
        assert!(parse(&args("-kernel k -smp 0")).is_err());
        assert!(parse(&args("-kernel")).is_err());
        assert_eq!(parse(&args("-m 64")), Err(QemuCliError::NoKernel));
        assert!(invoked_as_qemu(std::ffi::OsStr::new(
            "/usr/bin/qemu-system-x86_64"
        )));
        assert!(!invoked_as_qemu(std::ffi::OsStr::new("hopvm")));
    }

    #[test]
    fn tls_objects_and_monitor() {
        let dir = std::env::temp_dir().join(format!("hopvm-qemu-cli-tls-{}", std::process::id()));
        migration::transport::tls::test_certs::Ca::new("ca").server_dir(&dir, &["h"], false);
        let line = format!(
            "-kernel k -object tls-creds-x509,id=tls0,dir={},endpoint=server \
             -chardev socket,id=mon0,host=127.0.0.1,port=4444,server=on,wait=off,tls-creds=tls0 \
             -mon chardev=mon0,mode=control",
            dir.display()
        );
        let (action, _, _) = parse_full(&args(&line)).unwrap();
        let QemuAction::Run(c) = action else {
            panic!("{action:?}")
        };
        assert_eq!(
            c.objects,
            vec![format!(
                "tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer=on",
                dir.display()
            )]
        );
        assert_eq!(
            c.qmp.as_deref(),
            Some("tcp:127.0.0.1:4444,server=on,tls-creds=tls0")
        );
        // Credentials that cannot be read are refused at once, as QEMU does.
        let bad = "-kernel k -object tls-creds-x509,id=t,dir=/nonexistent,endpoint=server";
        let err = parse_full(&args(bad)).unwrap_err().to_string();
        assert!(err.contains("Unable to access credentials"), "{err}");
        // Authorization objects (key=value with dotted rules, or JSON) and the monitor's
        // tls-authz.
        let mut argv = args(&format!(
            "-kernel k -object tls-creds-x509,id=tls0,dir={},endpoint=server \
             -object authz-list,id=az0,policy=deny,rules.0.match=CN=*,rules.0.policy=allow,\
             rules.0.format=glob \
             -chardev socket,id=mon0,host=127.0.0.1,port=4444,server=on,tls-creds=tls0,\
             tls-authz=az0 -mon chardev=mon0,mode=control -object",
            dir.display()
        ));
        let json = r#"{"qom-type": "authz-list", "id": "az1", "rules": [{"match": "CN=a", "policy": "allow"}]}"#;
        argv.push(json.into());
        let (action, _, _) = parse_full(&argv).unwrap();
        let QemuAction::Run(c) = action else {
            panic!("{action:?}")
        };
        assert_eq!(c.objects.len(), 3);
        assert!(c.objects[1].starts_with("authz-list,id=az0,"));
        assert_eq!(c.objects[2], json);
        assert_eq!(
            c.qmp.as_deref(),
            Some("tcp:127.0.0.1:4444,server=on,tls-creds=tls0,tls-authz=az0")
        );
        for (bad, want) in [
            (
                "-kernel k -object authz-pam,id=p,service=x",
                "authz-pam is not supported",
            ),
            (
                "-kernel k -object authz-simple,id=s",
                "Parameter 'identity' is missing",
            ),
            (
                "-kernel k -object authz-list-file,id=f,filename=/nonexistent/acl",
                "Unable to read '/nonexistent/acl'",
            ),
        ] {
            let err = parse_full(&args(bad)).unwrap_err().to_string();
            assert!(err.contains(want), "{bad}: {err}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn libvirt_domain_command_line() {
        // What libvirt 9.0 generates for hopvm (key=value objects, as hopvm's schema has no
        // object-add / device_add).
        let line = "-name guest=g,debug-threads=on -S \
            -object secret,id=masterKey0,format=raw,data=abc \
            -machine pc-i440fx-7.2,usb=off,dump-guest-core=off,memory-backend=pc.ram \
            -accel kvm -cpu qemu64,svm=off -m 128 \
            -object memory-backend-ram,id=pc.ram,size=134217728 -overcommit mem-lock=off \
            -smp 2,sockets=1,cores=2,threads=1 -uuid 9a061521-ce5a-4da2-9fa7-8cd95e573f10 \
            -display none -no-user-config -nodefaults \
            -chardev socket,id=charmonitor,fd=30,server=on,wait=off \
            -mon chardev=charmonitor,id=monitor,mode=control -rtc base=utc -no-shutdown \
            -no-acpi -boot strict=on -kernel k -append ws=4 \
            -add-fd set=0,fd=31,opaque=serial0-source \
            -chardev file,id=charserial0,path=/dev/fdset/0,append=on \
            -device isa-serial,chardev=charserial0,id=serial0,index=0 \
            -audiodev {\"id\":\"audio1\",\"driver\":\"none\"} -msg timestamp=on";
        let (action, launch, domain) = parse_full(&args(line)).unwrap();
        let QemuAction::Run(c) = action else {
            panic!("{action:?}")
        };
        assert_eq!((c.memory, c.cpus, c.acpi), (128 << 20, 2, false));
        assert!(c.paused);
        assert_eq!(c.serial, SerialConfig::Null);
        assert_eq!(launch, Launch::default());
        assert_eq!(domain.monitor_fd, Some(30));
        assert_eq!(domain.serial, Some(SerialTarget::Fd { fd: 31 }));
        assert!(domain.no_shutdown && !domain.dump_guest_core);
        assert_eq!((domain.cores, domain.threads), (2, 1));
        assert_eq!(
            domain.peripherals,
            vec![(String::from("serial0"), String::from("isa-serial"))]
        );
        assert_eq!(domain.chardevs.len(), 2);
        // -m and the backend must agree; the backend alone sets the size.
        let bad =
            "-kernel k -m 64 -object memory-backend-ram,id=r,size=32M -machine memory-backend=r";
        assert!(parse(&args(bad)).is_err());
        let c = run("-kernel k -object memory-backend-ram,id=r,size=32M -machine memory-backend=r");
        assert_eq!(c.memory, 32 << 20);
        assert!(parse(&args("-kernel k -machine usb=on")).is_err());
        assert!(parse(&args("-kernel k -rtc base=localtime")).is_err());
        assert!(parse(&args("-kernel k -audiodev id=a,driver=pa")).is_err());
        assert!(run("-kernel k -sandbox off").kernel.is_some());
        let (_, _, d) = parse_full(&args("-kernel k -sandbox on,spawn=deny")).unwrap();
        assert!(d.sandbox.is_some_and(|s| s.spawn && !s.obsolete));
    }

    #[test]
    fn probe_command_line() {
        let line = "-S -no-user-config -nodefaults -nographic -machine none,accel=kvm:tcg \
            -qmp unix:/tmp/m,server=on,wait=off -pidfile /tmp/p -daemonize";
        let (action, launch, _) = parse_full(&args(line)).unwrap();
        let QemuAction::Probe(p) = action else {
            panic!("{action:?}")
        };
        assert!(p.kvm && p.paused);
        assert_eq!(p.qmp.as_deref(), Some("unix:/tmp/m,server=on,wait=off"));
        assert_eq!(launch.pidfile, Some(PathBuf::from("/tmp/p")));
        assert!(launch.daemonize);
        let (action, _, _) = parse_full(&args("-machine none,accel=tcg")).unwrap();
        assert!(matches!(action, QemuAction::Probe(p) if !p.kvm));
        assert!(parse(&args("-machine none,accel=xen")).is_err());
    }
}
