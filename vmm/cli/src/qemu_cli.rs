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
const DEVICE_LIST: &str = "Misc devices:\n\
name \"isa-debug-exit\", bus ISA\n\
name \"pc-testdev\", bus ISA\n\
name \"pci-testdev\", bus PCI, desc \"PCI Test Device\"\n\
name \"hyperv-testdev\", bus ISA\n";

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
-machine pc,accel=kvm[,pit=on|off]   the only machine\n\
-overcommit mem-lock=on|off,cpu-pm=on|off\n\
-enable-kvm, -accel kvm\n\
-serial stdio|null|file:PATH\n\
-device pc-testdev | isa-debug-exit[,iobase=,iosize=] | pci-testdev | hyperv-testdev | ? | help\n\
-qmp unix:PATH[,server,nowait]\n\
-chardev socket,id=ID,path=PATH,server=on,wait=off  with  -mon chardev=ID,mode=control\n\
-incoming URI | defer\n\
-S                      do not start the vCPUs\n\
-no-reboot              exit instead of rebooting\n\
-nodefaults -display none -vnc none -nographic -name NAME   accepted\n\
-global kvm-pit.lost_tick_policy=discard                  accepted\n",
        version_line()
    )
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
    parse_with_launch(args).map(|(action, _)| action)
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

/// Parses QEMU's arguments (without argv[0]): what to run, and how the process starts
/// (`-pidfile`, `-daemonize`).
pub fn parse_with_launch(args: &[String]) -> Result<(QemuAction, Launch), QemuCliError> {
    let mut launch = Launch::default();
    let mut machine_none = false;
    let mut kvm = true;
    let mut config = VmConfig::new("");
    config.kernel = None;
    let mut chardevs: HashMap<String, String> = HashMap::new();
    let mut monitors: Vec<String> = Vec::new();
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
            "-h" | "-help" => return Ok((QemuAction::Print(help_text()), launch)),
            "-version" => return Ok((QemuAction::Print(format!("{}\n", version_line())), launch)),
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
            }
            "-cpu" => config.cpu = value()?,
            "-machine" | "-M" => {
                let v = value()?;
                let parts = split_options(&v);
                let (first, p) = props(&parts);
                if let Some(t) = first.or(p.get("type").copied()) {
                    if !matches!(t, "pc" | "pc-i440fx" | "none") && !t.starts_with("pc-i440fx-") {
                        return Err(QemuCliError::UnsupportedValue(opt.into(), t.into()));
                    }
                    machine_none = t == "none";
                }
                for (k, val) in p {
                    match (k, val) {
                        ("type", _) => {}
                        ("accel", list) => kvm = accel_has_kvm(opt, list)?,
                        ("kernel_irqchip" | "kernel-irqchip", "on") => {}
                        ("pit", pit) => {
                            config.pit =
                                on_off(pit).ok_or_else(|| invalid(&v, format!("{k}={pit}")))?
                        }
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
            }
            "-no-reboot" => config.no_reboot = true,
            // hopvm reads no configuration files and creates no default devices.
            "-nodefaults" | "-nographic" | "-no-user-config" => {}
            "-pidfile" => launch.pidfile = Some(PathBuf::from(value()?)),
            "-daemonize" => launch.daemonize = true,
            "-S" => config.paused = true,
            "-name" => {
                value()?;
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
                let parts = split_options(&v);
                let (first, p) = props(&parts);
                match first.unwrap_or("") {
                    "?" | "help" => {
                        return Ok((QemuAction::Print(DEVICE_LIST.to_string()), launch))
                    }
                    // Always present in hopvm; pci-testdev is accepted but not emulated
                    // (hopvm has no PCI bus), as if the slot were empty.
                    "pc-testdev" | "pci-testdev" => {}
                    // QEMU's Hyper-V test device drives SynIC interrupt routes; hopvm gives
                    // no guest a SynIC (see `-cpu hv-*`), so no guest can use it: accepted,
                    // as QEMU accepts it on a host without KVM Hyper-V support.
                    "hyperv-testdev" => {}
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
                match (backend, p.get("id"), p.get("path")) {
                    (Some("socket"), Some(id), Some(path)) => {
                        // The path goes back into option syntax: re-escape its commas.
                        let mut spec = format!("unix:{}", path.replace(',', ",,"));
                        if p.get("server").is_some_and(|s| *s != "off") {
                            spec.push_str(",server=on");
                        }
                        chardevs.insert((*id).to_string(), spec);
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
            "-incoming" => config.incoming = Some(value()?),
            other => return Err(QemuCliError::Unsupported(other.to_string())),
        }
    }
    for id in monitors {
        let spec = chardevs.get(&id).ok_or_else(|| {
            QemuCliError::Invalid(String::from("-mon"), format!("no chardev {id}"))
        })?;
        config.qmp = Some(spec.clone());
    }
    if machine_none {
        let probe = ProbeConfig {
            qmp: config.qmp,
            qmp_fd: None,
            paused: config.paused,
            kvm,
        };
        return Ok((QemuAction::Probe(Box::new(probe)), launch));
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
    Ok((QemuAction::Run(Box::new(config)), launch))
}

/// Runs hopvm with QEMU's arguments (without argv[0]); returns the process exit status.
pub fn main(args: &[String]) -> i32 {
    match parse_with_launch(args) {
        Ok((QemuAction::Print(text), _)) => {
            print!("{text}");
            0
        }
        Ok((QemuAction::Probe(probe), launch)) => {
            crate::run::init_logging();
            crate::qemu_launch::run_probe(&probe, &launch)
        }
        Ok((QemuAction::Run(config), _launch)) => {
            crate::run::init_logging();
            match crate::run::run(&config) {
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
        assert!(parse(&args("-kernel k -machine q35")).is_err());
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
}
