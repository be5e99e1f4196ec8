//! The `hopvm` command line.
//!
//! Errors in arguments are reported on one line (`hopvm: …`) with exit status 2, so scripts and
//! test runners can tell a usage mistake from a guest failure.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::run::{self, EXIT_ERROR, EXIT_USAGE};
use crate::tools;
use crate::tools::demo::DemoArgs;
use crate::tools::migrate::MigrateArgs;
use crate::tools::qmp_shell::QmpArgs;
use vmm::config::{self, DebugExitConfig, SerialConfig, VmConfig};
use vmm::dirty_ring::DirtyRingConfig;

/// hopvm — a small x86-64 virtual machine monitor on Linux KVM.
#[derive(Debug, Parser)]
#[command(name = "hopvm", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// hopvm's subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a kernel and run it until it exits.
    Run(RunArgs),
    /// Live-migrate a memory-dirtying test guest between two hopvm processes on this machine,
    /// showing progress and the guest's output, and check that no memory was corrupted; exit
    /// status 0 when all checks pass, 1 on a failure, 130 when interrupted.
    Demo(DemoArgs),
    /// Drive a running hopvm's live migration over QMP with a progress bar; exit status 0
    /// completed, 1 failed, 2 cancelled (Ctrl-C cancels and leaves the source running).
    Migrate(MigrateArgs),
    /// Send one QMP command to a running hopvm and print the reply, or open an interactive QMP
    /// shell when no command is given.
    Qmp(QmpArgs),
    /// Run with QEMU's command line (the options kvm-unit-tests passes); the same as invoking
    /// hopvm through a link named qemu-system-x86_64. `hopvm qemu -help` lists them.
    #[command(disable_help_flag = true)]
    Qemu {
        /// QEMU options.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

/// `hopvm run` options.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Kernel image: Linux bzImage or vmlinux, Multiboot v1 ELF (e.g. kvm-unit-tests), or PVH ELF.
    /// Optional with --incoming (the migration stream brings the guest's memory).
    #[arg(long, value_name = "PATH", required_unless_present = "incoming")]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk for Linux, or module 0 for Multiboot / PVH kernels.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line (Multiboot kernels see "<kernel path> <cmdline>").
    #[arg(long, value_name = "STR", default_value = "")]
    pub cmdline: String,
    /// Guest RAM: a number with a K, M, G or T suffix; RAM beyond 3G is placed above 4G.
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = config::parse_memory)]
    pub memory: u64,
    /// Number of vCPUs; the first boots, the others wait for INIT/SIPI.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..))]
    pub cpus: u8,
    /// CPU model as QEMU's -cpu: host (all KVM offers), max, qemu64, with ,+feat / ,-feat /
    /// ,vendor=… (x2apic, pcid, invpcid, tsc-deadline, …).
    #[arg(long, value_name = "MODEL", default_value = vmm::config::DEFAULT_CPU)]
    pub cpu: String,
    /// Where COM1 goes: stdio (input from stdin too: a terminal in raw mode, where Ctrl-A x
    /// quits, or a pipe), file:PATH or null.
    #[arg(long, value_name = "BACKEND", default_value = "stdio")]
    pub serial: SerialConfig,
    /// isa-debug-exit port range; a guest write of v ends hopvm with status (v << 1) | 1.
    #[arg(
        long,
        value_name = "iobase=0xf4,iosize=4",
        default_value = "iobase=0xf4,iosize=4"
    )]
    pub debug_exit: DebugExitConfig,
    /// End hopvm with status 0 when the guest resets or triple-faults, instead of rebooting.
    #[arg(long)]
    pub no_reboot: bool,
    /// QMP monitor on a Unix socket (mode 0600; several clients may connect), as QEMU's -qmp;
    /// or on tcp:HOST:PORT, which authenticates nobody: keep it on a trusted interface, or add
    /// ,tls-creds=ID (an --object tls-creds-x509 with endpoint=server) for TLS clients only.
    #[arg(long, value_name = "unix:PATH")]
    pub qmp: Option<String>,
    /// Wait for a live migration on tcp:HOST:PORT (tcp:0:PORT = any address), unix:PATH,
    /// exec:COMMAND (reads its stdout) or fd:N; `defer` waits for QMP migrate-incoming.
    #[arg(long, value_name = "URI")]
    pub incoming: Option<String>,
    /// Do not start the vCPUs (QEMU's -S): `cont` over QMP starts them.
    #[arg(long)]
    pub paused: bool,
    /// A virtio-blk disk on a raw image file (repeatable; `,,` is a comma in the path).
    #[arg(long, value_name = "PATH[,readonly=on][,serial=STR]")]
    pub disk: Vec<config::DiskConfig>,
    /// A virtio-net card on a tap interface, created if needed (repeatable; the MAC defaults
    /// to QEMU's 52:54:00:12:34:56, counting up).
    #[arg(long, value_name = "tap=NAME[,mac=…]")]
    pub net: Vec<config::NetConfig>,
    /// A virtio-rng device fed by the host's getrandom (QEMU's -device virtio-rng-pci).
    #[arg(long)]
    pub rng: bool,
    /// QEMU's PCI test device (-device pci-testdev, 1b36:0005), as kvm-unit-tests' pci and
    /// vmexit tests use it.
    #[arg(long)]
    pub pci_testdev: bool,
    /// Create an object, as QEMU's -object: TLS credentials for migration and the monitor,
    /// tls-creds-x509,id=ID,dir=DIR,endpoint=server|client[,verify-peer=on|off]; who may
    /// connect (tls-authz): authz-simple,id=ID,identity=DN (commas in the DN doubled),
    /// authz-list,id=ID,policy=allow|deny,rules.N.match=…,rules.N.policy=…[,rules.N.format=glob]
    /// or authz-list-file,id=ID,filename=FILE[,refresh=on|off]; or QEMU's JSON form of any of
    /// them. Repeatable.
    #[arg(long, value_name = "TYPE,id=ID,…")]
    pub object: Vec<String>,
    /// How migration learns which pages the guest wrote: off (KVM's dirty bitmap), auto (KVM's
    /// dirty ring where the host offers it and keeps its limit — not kvm_pvm, which overruns
    /// it) or the ring's size in entries per vCPU (a power of two from 256 to 65536), as
    /// QEMU's -accel kvm,dirty-ring-size=N.
    #[arg(long, value_name = "off|auto|N", default_value_t = DirtyRingConfig::default(), value_parser = parse_dirty_ring)]
    pub dirty_ring: DirtyRingConfig,
}

/// `--dirty-ring`: the syntax, then what this host's KVM can give.
fn parse_dirty_ring(s: &str) -> Result<DirtyRingConfig, vmm::dirty_ring::DirtyRingError> {
    vmm::dirty_ring::check_host(s.parse()?)
}

impl From<RunArgs> for VmConfig {
    fn from(a: RunArgs) -> Self {
        VmConfig {
            kernel: a.kernel,
            initrd: a.initrd,
            cmdline: a.cmdline,
            memory: a.memory,
            cpus: a.cpus,
            cpu: a.cpu,
            serial: a.serial,
            debug_exit: a.debug_exit,
            no_reboot: a.no_reboot,
            qmp: a.qmp,
            incoming: a.incoming,
            paused: a.paused,
            objects: a.object,
            dirty_ring: a.dirty_ring,
            disks: a.disk,
            nets: a.net,
            rng: a.rng.then(config::RngConfig::default),
            pci_testdev: u8::from(a.pci_testdev),
            ..VmConfig::new("")
        }
    }
}

/// Reduces a clap error to its first line, without clap's "error: " prefix.
fn one_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let first = text
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("invalid arguments");
    first.trim_start_matches("error: ").to_string()
}

/// Runs hopvm with `args` (including argv[0]); returns the process exit status.
pub fn main_with_args<I, T>(args: I) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version.
            let _ = e.print();
            return 0;
        }
        Err(e) => {
            eprintln!("hopvm: {}", one_line(&e));
            return EXIT_USAGE;
        }
    };
    run::init_logging();
    match cli.command {
        Command::Run(args) => match run::run(&args.into()) {
            Ok(status) => status,
            Err(e) => {
                eprintln!("hopvm: {e}");
                EXIT_ERROR
            }
        },
        Command::Demo(args) => tools::demo::command(&args),
        Command::Migrate(args) => tools::migrate::command(&args),
        Command::Qmp(args) => tools::qmp_shell::command(&args),
        Command::Qemu { args } => crate::qemu_cli::main(&args),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("hopvm").chain(args.iter().copied()))
    }

    #[test]
    fn run_defaults_and_options() {
        let Command::Run(a) = parse(&["run", "--kernel", "k"]).unwrap().command else {
            unreachable!()
        };
        let c = VmConfig::from(a);
        assert_eq!(c, VmConfig::new("k"));
        let Command::Run(a) = parse(&[
            "run",
            "--kernel",
            "k",
            "--memory",
            "4G",
            "--cpus",
            "4",
            "--serial",
            "null",
            "--debug-exit",
            "iobase=0x501,iosize=2",
            "--no-reboot",
            "--cmdline",
            "a b",
            "--initrd",
            "i",
        ])
        .unwrap()
        .command
        else {
            unreachable!()
        };
        assert_eq!(a.memory, 4 << 30);
        assert_eq!(a.cpus, 4);
        assert_eq!(a.serial, SerialConfig::Null);
        assert_eq!(a.debug_exit.iobase, 0x501);
        assert!(a.no_reboot);
        assert_eq!(a.cmdline, "a b");
    }

    #[test]
    fn bad_arguments_are_one_line() {
        for args in [
            &["run"][..],
            &["run", "--kernel", "k", "--memory", "lots"],
            &["run", "--kernel", "k", "--memory", "512K"],
            &["run", "--kernel", "k", "--cpus", "0"],
            &["run", "--kernel", "k", "--serial", "tcp:1"],
            &["run", "--kernel", "k", "--bogus"],
            &["fly"],
        ] {
            let e = parse(args).unwrap_err();
            let line = one_line(&e);
            assert!(!line.contains('\n') && !line.is_empty(), "{args:?}: {line}");
        }
        let e = parse(&["run", "--kernel", "k", "--dirty-ring", "1000"]).unwrap_err();
        assert!(
            one_line(&e).contains("invalid dirty ring size '1000'"),
            "{}",
            one_line(&e)
        );
        let Command::Run(a) = parse(&["run", "--kernel", "k", "--dirty-ring", "off"])
            .unwrap()
            .command
        else {
            unreachable!()
        };
        assert_eq!(VmConfig::from(a).dirty_ring, DirtyRingConfig::Off);
        let e = parse(&["run", "--kernel", "k", "--memory", "lots"]).unwrap_err();
        assert!(
            one_line(&e).contains("invalid size 'lots'"),
            "{}",
            one_line(&e)
        );
    }
}
