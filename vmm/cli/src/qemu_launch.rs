//! How a QEMU-style hopvm process starts and ends, as management tools (libvirt) expect of
//! QEMU: `-daemonize` (the parent exits once the monitor listens, with the child's error if it
//! could not start), `-pidfile` (written, locked, removed at exit), termination signals
//! (SIGTERM, SIGINT, SIGHUP end the guest with a SHUTDOWN event, reason `host-signal`), and the
//! machine-less process of `-machine none` that answers the capability probe.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{mpsc, Arc, Mutex};

use crate::qemu_domain::{DomainSetup, SerialTarget};
use qmp::domain::{ChardevInfo, DomainInfo};
use qmp::probe::{HostInfo, ProbeCommands};
use qmp::{QmpListenSpec, QmpServer, QmpServerConfig};
use vmm::config::VmConfig;
use vmm::vcpu::VmEvent;
use vmm::vm::SharedWriter;

/// Process-level options of a QEMU command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Launch {
    /// `-pidfile PATH`.
    pub pidfile: Option<PathBuf>,
    /// `-daemonize`.
    pub daemonize: bool,
}

/// A machine-less hopvm (`-machine none`): a monitor and nothing to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeConfig {
    /// The monitor (`-qmp` / `-chardev` + `-mon`), in `--qmp` syntax.
    pub qmp: Option<String>,
    /// The monitor as an inherited listening socket (`-chardev socket,fd=N`).
    pub qmp_fd: Option<i32>,
    /// `-S`.
    pub paused: bool,
    /// The accelerator list includes `kvm`.
    pub kvm: bool,
}

/// Errors starting or running a QEMU-style process.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// fork(2), setsid(2) or pipe(2) failed.
    #[error("cannot daemonize: {0}")]
    Daemonize(#[source] std::io::Error),
    /// The pid file could not be written or is locked by another process.
    #[error("cannot create PID file: {path}: {source}")]
    Pidfile {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The monitor could not be started.
    #[error("cannot start the qmp monitor: {0}")]
    Monitor(#[from] qmp::QmpServerError),
    /// The seccomp sandbox could not be installed.
    #[error(transparent)]
    Sandbox(#[from] crate::sandbox::SandboxError),
    /// The serial port's file could not be opened.
    #[error("cannot open serial output {path}: {source}")]
    Serial {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A descriptor named on the command line was not open when hopvm started (or is named
    /// twice).
    #[error("fd {0} was not passed to hopvm at start-up")]
    NotInherited(i32),
    /// A descriptor named on the command line is not a listening socket.
    #[error("fd {0} is not a listening socket: {1}")]
    BadFd(i32, #[source] std::io::Error),
}

/// The write end of the pipe the daemonized child reports its start-up on.
pub struct Daemon {
    pipe: Option<File>,
}

impl Daemon {
    /// Tells the waiting parent that start-up succeeded, and detaches from the terminal
    /// (standard descriptors to /dev/null), as QEMU's `os_setup_post`.
    pub fn ready(&mut self) {
        if let Some(mut pipe) = self.pipe.take() {
            let _ = pipe.write_all(&[0]);
        }
        if let Ok(null) = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/null")
        {
            for fd in 0..3 {
                // SAFETY: dup2 onto the standard descriptors with a descriptor we own.
                unsafe { libc::dup2(null.as_raw_fd(), fd) };
            }
        }
    }

    /// Tells the waiting parent that start-up failed, with the message it should print.
    pub fn failed(&mut self, message: &str) {
        if let Some(mut pipe) = self.pipe.take() {
            let _ = pipe.write_all(&[1]);
            let _ = pipe.write_all(message.as_bytes());
        }
    }
}

/// Forks into the background as QEMU's `os_daemonize`: the parent waits until the child
/// reports (through a pipe) that it is ready — then exits 0 — or that it failed — then prints
/// the child's message and exits 1. The child is a session leader's child (setsid, fork again),
/// so it never reacquires a terminal. Call it before any thread is started.
pub fn daemonize() -> Result<Daemon, LaunchError> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills the two-element array it is given.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(LaunchError::Daemonize(std::io::Error::last_os_error()));
    }
    // SAFETY: both descriptors were just created and are owned by nothing else.
    let (read_end, write_end) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
    // SAFETY: the process is single-threaded here (the caller's contract), so the child may
    // run arbitrary code after fork.
    match unsafe { libc::fork() } {
        -1 => Err(LaunchError::Daemonize(std::io::Error::last_os_error())),
        0 => {
            drop(read_end);
            // SAFETY: setsid has no memory-safety preconditions.
            unsafe { libc::setsid() };
            // SAFETY: still single-threaded; the intermediate process exits at once.
            match unsafe { libc::fork() } {
                -1 => {
                    let mut d = Daemon {
                        pipe: Some(write_end),
                    };
                    d.failed(&format!(
                        "cannot daemonize: {}",
                        std::io::Error::last_os_error()
                    ));
                    std::process::exit(1)
                }
                0 => Ok(Daemon {
                    pipe: Some(write_end),
                }),
                // SAFETY: _exit ends the intermediate process without running destructors
                // that belong to the grandchild.
                _ => unsafe { libc::_exit(0) },
            }
        }
        _ => {
            drop(write_end);
            let mut read_end = read_end;
            let mut status = [0u8; 1];
            let ok = matches!(read_end.read(&mut status), Ok(1)) && status[0] == 0;
            if !ok {
                let mut message = String::new();
                let _ = read_end.read_to_string(&mut message);
                if message.is_empty() {
                    message = String::from("the daemonized process ended during start-up");
                }
                eprintln!("hopvm: {message}");
                std::process::exit(1);
            }
            std::process::exit(0)
        }
    }
}

/// A written, locked pid file, removed when dropped (QEMU's `qemu_write_pidfile`).
pub struct Pidfile {
    path: PathBuf,
    _file: File,
}

impl Pidfile {
    /// Writes this process's id into `path`, holding a lock on it so that a second hopvm
    /// with the same pid file refuses to start.
    pub fn create(path: &Path) -> Result<Self, LaunchError> {
        let err = |source| LaunchError::Pidfile {
            path: path.display().to_string(),
            source,
        };
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(err)?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
        file.set_len(0).map_err(err)?;
        writeln!(file, "{}", std::process::id()).map_err(err)?;
        Ok(Self {
            path: path.to_path_buf(),
            _file: file,
        })
    }
}

impl Drop for Pidfile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The termination signal that ended the process, 0 if none (read by the run loop to give
/// SHUTDOWN its reason).
static TERMINATING_SIGNAL: AtomicI32 = AtomicI32::new(0);

/// The signal that asked hopvm to end, if one did.
pub fn terminating_signal() -> Option<i32> {
    match TERMINATING_SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

fn termination_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
    }
    set
}

/// Blocks SIGTERM, SIGINT and SIGHUP in the calling thread — and so in every thread started
/// after it — and starts a thread that waits for them: on the first one it records the
/// signal, prints QEMU's "terminating on signal N" and calls `on_signal`. Call it before any
/// other thread is started.
pub fn handle_termination_signals(on_signal: impl Fn() + Send + 'static) {
    let set = termination_set();
    // SAFETY: `set` is a valid signal set; the old mask is not needed.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    let _ = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || loop {
            let mut sig = 0;
            // SAFETY: `set` is valid and `sig` receives the signal number.
            if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                continue;
            }
            if TERMINATING_SIGNAL
                .compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
            {
                eprintln!("hopvm: terminating on signal {sig}");
                on_signal();
            }
        });
}

/// Turns an inherited descriptor into a listening Unix socket for the monitor.
pub fn inherited_listener(fd: i32) -> Result<std::os::unix::net::UnixListener, LaunchError> {
    let owned = migration::transport::take_inherited_fd(fd).ok_or(LaunchError::NotInherited(fd))?;
    let mut accepting: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `accepting`.
    let rc = unsafe {
        libc::getsockopt(
            owned.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut accepting as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(LaunchError::BadFd(fd, std::io::Error::last_os_error()));
    }
    if accepting == 0 {
        return Err(LaunchError::BadFd(
            fd,
            std::io::Error::from_raw_os_error(libc::EINVAL),
        ));
    }
    // SAFETY: fcntl on a descriptor we now own; set close-on-exec as hopvm's own sockets are.
    unsafe { libc::fcntl(owned.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    Ok(std::os::unix::net::UnixListener::from(owned))
}

/// Runs the machine-less process: daemonizes if asked, listens on the monitor, writes the pid
/// file, and serves until `quit` or a termination signal. Returns the exit status.
pub fn run_probe(config: &ProbeConfig, launch: &Launch) -> i32 {
    let mut daemon = if launch.daemonize {
        match daemonize() {
            Ok(d) => Some(d),
            Err(e) => {
                eprintln!("hopvm: {e}");
                return crate::run::EXIT_ERROR;
            }
        }
    } else {
        None
    };
    let (quit_tx, quit_rx) = mpsc::channel();
    let signal_tx = quit_tx.clone();
    handle_termination_signals(move || {
        let _ = signal_tx.send(());
    });
    let started = (|| -> Result<(Option<QmpServer>, Option<Pidfile>), LaunchError> {
        let host = HostInfo::probe(config.kvm);
        let backend = Arc::new(ProbeCommands::new(host, config.paused, quit_tx));
        let server = match (&config.qmp, config.qmp_fd) {
            (_, Some(fd)) => Some(QmpServer::from_unix_listener(
                inherited_listener(fd)?,
                backend,
                QmpServerConfig::default(),
            )?),
            (Some(spec), None) => {
                let spec: QmpListenSpec = spec.parse()?;
                Some(QmpServer::bind(&spec, backend, QmpServerConfig::default())?)
            }
            (None, None) => None,
        };
        let pidfile = launch.pidfile.as_deref().map(Pidfile::create).transpose()?;
        Ok((server, pidfile))
    })();
    let (server, _pidfile) = match started {
        Ok(s) => s,
        Err(e) => {
            let message = e.to_string();
            match daemon.as_mut() {
                Some(d) => d.failed(&message),
                None => eprintln!("hopvm: {message}"),
            }
            return crate::run::EXIT_ERROR;
        }
    };
    if let Some(d) = daemon.as_mut() {
        d.ready();
    }
    let _ = quit_rx.recv();
    drop(server);
    0
}

/// Opens where COM1 writes for a `-device isa-serial,chardev=…` file chardev.
fn open_serial(target: &SerialTarget) -> Result<File, LaunchError> {
    match target {
        SerialTarget::Fd { fd } => migration::transport::take_inherited_fd(*fd)
            .map(File::from)
            .ok_or(LaunchError::NotInherited(*fd)),
        SerialTarget::Path { path, append } => std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .append(*append)
            .truncate(!*append)
            .open(path)
            .map_err(|source| LaunchError::Serial {
                path: path.display().to_string(),
                source,
            }),
    }
}

/// Runs a guest from a QEMU command line: daemonizes if asked, ends on SIGTERM / SIGINT /
/// SIGHUP with SHUTDOWN (reason `host-signal`), writes the pid file once the monitor listens.
pub fn run_domain(
    config: &VmConfig,
    launch: &Launch,
    domain: &DomainSetup,
) -> Result<i32, crate::run::RunError> {
    let daemon = if launch.daemonize {
        Some(daemonize()?)
    } else {
        None
    };
    if let Some(sandbox) = &domain.sandbox {
        if let Err(e) = sandbox.install() {
            let e = LaunchError::from(e);
            if let Some(mut d) = daemon {
                d.failed(&e.to_string());
            }
            return Err(e.into());
        }
    }
    let daemon = Arc::new(Mutex::new(daemon));
    // Set once the VM exists: a signal before that ends the process at once.
    let quit: Arc<Mutex<Option<mpsc::Sender<VmEvent>>>> = Arc::default();
    let signal_quit = Arc::clone(&quit);
    handle_termination_signals(move || match vmm_sync::lock(&signal_quit).as_ref() {
        Some(tx) => {
            let _ = tx.send(VmEvent::Quit);
        }
        None => std::process::exit(0),
    });
    let result = (|| {
        let serial_out = domain
            .serial
            .as_ref()
            .map(open_serial)
            .transpose()?
            .map(|f| SharedWriter::new(Box::new(f)));
        let monitor = domain
            .monitor_fd
            .map(inherited_listener)
            .transpose()?
            .map(qmp::commands::MonitorListen::Listener);
        let mut info = DomainInfo::new(&config.cpu, config.cpus);
        info.cores = domain.cores;
        info.threads = domain.threads;
        info.acpi = config.acpi;
        info.peripherals.clone_from(&domain.peripherals);
        info.chardevs = domain
            .chardevs
            .iter()
            .map(|(label, filename)| ChardevInfo {
                label: label.clone(),
                filename: filename.clone(),
            })
            .collect();
        let ready_daemon = Arc::clone(&daemon);
        let pidfile_path = launch.pidfile.clone();
        let pidfile: Arc<Mutex<Option<Pidfile>>> = Arc::default();
        let held = Arc::clone(&pidfile);
        let on_ready: crate::run::OnReady = Box::new(move |instance| {
            *vmm_sync::lock(&quit) = Some(instance.vm.event_sender());
            if let Some(path) = &pidfile_path {
                *vmm_sync::lock(&held) = Some(Pidfile::create(path)?);
            }
            if let Some(d) = vmm_sync::lock(&ready_daemon).as_mut() {
                d.ready();
            }
            Ok(())
        });
        let options = crate::run::RunOptions {
            serial_out,
            monitor,
            domain: Some(info),
            no_shutdown: domain.no_shutdown,
            no_dump_guest_core: !domain.dump_guest_core,
            on_ready: Some(on_ready),
        };
        let status = crate::run::run_with(config, options);
        drop(pidfile);
        status
    })();
    if let Err(e) = &result {
        if let Some(d) = vmm_sync::lock(&daemon).as_mut() {
            d.failed(&e.to_string());
        }
    }
    result
}
