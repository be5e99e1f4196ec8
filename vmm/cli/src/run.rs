//! Running a VM to the end: resets, the terminal, and hopvm's exit status.
//!
//! A reset (i8042 command 0xFE, triple fault, KVM reset event) rebuilds the VM from its
//! configuration, as a PC's firmware reloads the kernel — unless `--no-reboot` asks hopvm to end
//! instead, with status 0 as QEMU does. Exit statuses follow QEMU where QEMU has one:
//!
//! | status | meaning |
//! |---|---|
//! | `(v << 1) \| 1` | the guest wrote `v` to isa-debug-exit |
//! | 0 | powered off, or reset / triple fault under `--no-reboot`, or Ctrl-A x |
//! | 1 | hopvm could not build or boot the VM |
//! | 2 | bad command line |
//! | 3 | a vCPU failed: emulation failure, entry failure, unexpected exit |

use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use serde_json::json;

use vmm::bus::lock;
use vmm::config::{SerialConfig, VmConfig};
use vmm::instance::Instance;
use vmm::runstate::RunState;
use vmm::vcpu::VmEvent;
use vmm::vm::{SharedWriter, VmError};

/// Exit status when hopvm cannot build or boot the VM.
pub const EXIT_ERROR: i32 = 1;
/// Exit status for a bad command line.
pub const EXIT_USAGE: i32 = 2;
/// Exit status when a vCPU cannot continue.
pub const EXIT_VCPU_FAILURE: i32 = 3;

/// Puts a terminal in raw mode and restores it when dropped.
struct RawTerminal {
    fd: i32,
    saved: libc::termios,
}

impl RawTerminal {
    fn enter(fd: i32) -> Option<Self> {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(fd) } != 1 {
            return None;
        }
        // SAFETY: termios is plain data; zeroed is a valid value to be overwritten.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd is a terminal and `saved` is a valid termios to fill.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw edits the struct it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        raw.c_oflag |= libc::OPOST | libc::ONLCR; // keep "\n" → "\r\n" for hopvm's own lines
                                                  // SAFETY: fd is a terminal; raw is a valid termios.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(Self { fd, saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores the settings read from the same terminal.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

/// Forwards standard input to COM1 — from a terminal (where Ctrl-A x ends hopvm like QEMU's
/// `-serial mon:stdio`, and Ctrl-A Ctrl-A sends a literal Ctrl-A) or from a pipe, as test
/// runners use it (kvm-unit-tests answers "press a key" prompts that way).
fn spawn_input_thread(instance: Arc<Instance>, terminal: bool) {
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 64];
        let mut escape = false;
        while let Ok(n) = stdin.read(&mut buf) {
            if n == 0 {
                break;
            }
            let mut bytes = Vec::with_capacity(n);
            for &b in &buf[..n] {
                if !terminal {
                    bytes.push(b);
                    continue;
                }
                match (escape, b) {
                    (true, b'x') => {
                        let _ = instance.vm.event_sender().send(VmEvent::Quit);
                        return;
                    }
                    (false, 0x01) => escape = true,
                    (_, other) => {
                        escape = false;
                        bytes.push(other);
                    }
                }
            }
            let _machine = lock(&instance.vm.machine);
            lock(&instance.vm.devices.serial).enqueue_input(&bytes);
        }
    });
}

/// Sets up logging: `RUST_LOG`-style filter, quiet (errors only) by default.
pub fn init_logging() {
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("error"))
        .format_timestamp_micros()
        .try_init();
}

/// What [`RunOptions::on_ready`] runs once the VM exists and its monitor listens.
pub type OnReady = Box<dyn FnOnce(&Arc<Instance>) -> Result<(), crate::qemu_launch::LaunchError>>;

/// How a QEMU-style start differs from `hopvm run`'s ([`run_with`]).
#[derive(Default)]
pub struct RunOptions {
    /// COM1's output instead of the one `config.serial` names.
    pub serial_out: Option<SharedWriter>,
    /// The monitor, instead of `config.qmp`.
    pub monitor: Option<qmp::commands::MonitorListen>,
    /// The guest's make-up for the monitor (chardevs, devices, topology).
    pub domain: Option<qmp::domain::DomainInfo>,
    /// `-no-shutdown`: a guest power-off stops the guest (run state `shutdown`) and hopvm
    /// waits for the monitor (`quit`, `system_reset`) instead of ending.
    pub no_shutdown: bool,
    /// `-machine dump-guest-core=off`: guest RAM is left out of hopvm's core dumps.
    pub no_dump_guest_core: bool,
    /// Called once the monitor listens (pid file, `-daemonize`'s parent released).
    pub on_ready: Option<OnReady>,
}

/// Boots `config` (or waits for its incoming migration) and runs it until it ends; returns
/// hopvm's exit status.
pub fn run(config: &VmConfig) -> Result<i32, RunError> {
    run_with(config, RunOptions::default())
}

/// Marks guest RAM as left out of core dumps (QEMU's `dump-guest-core=off`).
fn exclude_from_core_dumps(instance: &Instance) {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    for region in instance.vm.memory.iter() {
        let Some(ptr) = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .ok()
        else {
            continue;
        };
        // SAFETY: the range is one whole guest RAM mapping of this process; MADV_DONTDUMP
        // only changes what a core dump includes.
        unsafe {
            libc::madvise(
                ptr.cast(),
                usize::try_from(region.len()).unwrap_or(0),
                libc::MADV_DONTDUMP,
            )
        };
    }
}

/// [`run`] with the differences of a QEMU-style start.
pub fn run_with(config: &VmConfig, mut options: RunOptions) -> Result<i32, RunError> {
    let out = match options.serial_out.take() {
        Some(out) => out,
        None => SharedWriter::open(&config.serial)?,
    };
    let terminal = match config.serial {
        SerialConfig::Stdio => RawTerminal::enter(std::io::stdin().as_raw_fd()),
        _ => None,
    };
    let instance = Instance::new(config, out.clone())?;
    for spec in &config.objects {
        let object = vmm::objects::parse_object(spec).map_err(RunError::Object)?;
        instance
            .migration
            .tls
            .add_object(object)
            .map_err(RunError::ObjectTable)?;
    }
    if options.no_dump_guest_core {
        exclude_from_core_dumps(&instance);
    }
    if config.serial == SerialConfig::Stdio {
        spawn_input_thread(instance.clone(), terminal.is_some());
    }
    instance.set_autostart(!config.paused);
    // Listen for an incoming migration before the monitor comes up, so that a client that
    // sees `inmigrate` can connect at once.
    match config.incoming.as_deref() {
        None => {}
        Some("defer") => instance.defer_incoming(),
        Some(uri) => instance.incoming(uri).map_err(RunError::Instance)?,
    }
    let listen = match options.monitor.take() {
        Some(listen) => Some(listen),
        None => config.qmp.clone().map(qmp::commands::MonitorListen::Spec),
    };
    let _monitor = match listen {
        Some(listen) => {
            let domain = options.domain.take().unwrap_or_else(|| {
                let mut d = qmp::domain::DomainInfo::new(&config.cpu, config.cpus);
                d.acpi = config.acpi;
                d
            });
            Some(
                qmp::commands::start_monitor_with(&instance, listen, domain)
                    .map_err(RunError::Monitor)?,
            )
        }
        None => None,
    };
    if let Some(ready) = options.on_ready.take() {
        ready(&instance)?;
    }
    if config.incoming.is_none() && !config.paused {
        instance.cont().map_err(RunError::Instance)?;
    }
    let status = loop {
        let event = if instance.runstate() == RunState::Suspended {
            // Suspended to RAM: wake on the RTC alarm (checked every 20 ms, as a chipset
            // would notice it) or on QMP system_wakeup.
            match instance
                .vm
                .wait_event_timeout(std::time::Duration::from_millis(20))
            {
                Some(event) => event,
                None if instance.rtc_wake_due() => {
                    instance.wakeup(true)?;
                    continue;
                }
                None => continue,
            }
        } else {
            instance.vm.wait_event()
        };
        match event {
            VmEvent::Exit(code) => break code,
            VmEvent::PowerOff => {
                instance.emit(
                    "SHUTDOWN",
                    Some(json!({"guest": true, "reason": "guest-shutdown"})),
                );
                if options.no_shutdown {
                    // As QEMU's -no-shutdown: stopped in state `shutdown`, for the monitor
                    // to quit or reset.
                    instance.stop();
                    lock(&instance.vm.machine).runstate = RunState::Shutdown;
                    continue;
                }
                break 0;
            }
            VmEvent::Quit => {
                let reason = match crate::qemu_launch::terminating_signal() {
                    Some(_) => "host-signal",
                    None => "host-qmp-quit",
                };
                instance.emit("SHUTDOWN", Some(json!({"guest": false, "reason": reason})));
                break 0;
            }
            event @ (VmEvent::Reset | VmEvent::TripleFault) if config.no_reboot => {
                log::info!("guest {event:?} with --no-reboot: exiting");
                instance.emit(
                    "SHUTDOWN",
                    Some(json!({"guest": true, "reason": "guest-reset"})),
                );
                break 0;
            }
            event @ (VmEvent::Reset | VmEvent::TripleFault) => {
                log::info!("guest {event:?}: resetting");
                instance.reset(true)?;
            }
            VmEvent::Suspend => instance.suspend(),
            VmEvent::Wakeup => instance.wakeup(false)?,
            VmEvent::Fatal(msg) => {
                lock(&instance.vm.machine).runstate = RunState::InternalError;
                let _ = lock(&instance.vm.devices.serial).flush_output();
                drop(terminal);
                eprintln!("hopvm: {msg}");
                return Ok(EXIT_VCPU_FAILURE);
            }
        }
    };
    // Everything the guest printed reaches the host before hopvm ends.
    let _ = lock(&instance.vm.devices.serial).flush_output();
    let mut out = out;
    let _ = std::io::Write::flush(&mut out);
    Ok(status)
}

/// Errors that end `hopvm run` before the guest does.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The VM could not be built or reset.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Starting it (or its incoming migration) failed.
    #[error(transparent)]
    Instance(#[from] vmm::instance::InstanceError),
    /// An `--object` could not be created.
    #[error("-object: {0}")]
    Object(#[source] vmm::objects::ObjectError),
    /// Two `--object`s with one id.
    #[error("-object: {0}")]
    ObjectTable(#[source] migration::transport::tls::TlsObjectError),
    /// The QMP monitor could not be started.
    #[error("cannot start the qmp monitor: {0}")]
    Monitor(#[source] qmp::QmpServerError),
    /// The process could not finish starting (pid file, monitor descriptor).
    #[error(transparent)]
    Launch(#[from] crate::qemu_launch::LaunchError),
}
