//! The QMP monitor server: a listening socket, one protocol session per client, and event
//! broadcast.
//!
//! QEMU serves one client per `-qmp` socket; hopvm accepts several at once (a management tool
//! and a human with `socat`, say), each with its own capabilities negotiation. The design goal
//! is that no client can hurt the VM or the other clients:
//!
//! * Each client has a reader thread (parse, dispatch, queue the reply) and a writer thread
//!   (drain the queue into the socket). Commands run one at a time across all clients, like
//!   QEMU's single dispatcher, so backends need not expect concurrent commands.
//! * Events are formatted once and pushed onto each negotiated client's queue without waiting:
//!   [`EventSender::emit`] never blocks on a socket. A client whose queue is full (it stopped
//!   reading) is disconnected instead; replies never overflow because the reader stops reading
//!   requests while the queue is full, which pushes back on a client that sends without reading.
//! * Input is parsed by the bounded [`JsonStreamParser`], so garbage or a huge line costs one
//!   error reply and at most one message's worth of memory.
//! * The Unix socket is created with mode 0600 (set on the socket before `bind`, so there is
//!   no window with looser permissions), a stale socket left by a dead process is replaced,
//!   and a live one is not.
//! * The TCP monitor authenticates nobody: anyone who reaches the port controls the VM. Keep
//!   it on a trusted interface (loopback), or give it `tls-creds=ID` (QEMU's
//!   `-chardev socket,…,tls-creds=ID`): every client then runs a TLS 1.3 handshake first —
//!   on a thread of its own, so a silent client holds up nobody — and with the credentials'
//!   `verify-peer=on` must show a certificate signed by their CA.
//! * [`QmpServer::shutdown`] stops accepting, lets every client's queued replies drain for a
//!   short grace period (so the reply to `quit` gets out), then closes all connections and
//!   removes the socket file.

use std::collections::VecDeque;

use migration::transport::tls::{ServerTls, TlsChannel, TlsReader, TlsWriter};
use std::fmt;
use std::io::{self, Read};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use serde_json::Value;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::fds::{MonitorFds, ReceivedFds};
use crate::json::{JsonLimits, JsonStreamParser};
use crate::protocol::{format_event, greeting, QmpBackend, Session, Timestamp};

/// Errors setting up the QMP server.
#[derive(Debug, thiserror::Error)]
pub enum QmpServerError {
    /// The address is not `unix:PATH` or `tcp:HOST:PORT`.
    #[error("invalid qmp address '{0}': expected unix:PATH or tcp:HOST:PORT, optionally followed by ,server=on,wait=off")]
    InvalidAddress(String),
    /// An option after the address is unknown or malformed.
    #[error("invalid option '{option}' in qmp address '{spec}'")]
    InvalidOption {
        /// The whole address.
        spec: String,
        /// The offending option.
        option: String,
    },
    /// `server=off` asks for a client connection, which hopvm does not make.
    #[error("qmp client mode (server=off) is not supported: '{0}'")]
    ClientMode(String),
    /// The path does not fit in a `sockaddr_un`.
    #[error("qmp socket path {0} is too long")]
    PathTooLong(PathBuf),
    /// Another process is serving on the socket.
    #[error("qmp socket {0} is in use by another process")]
    InUse(PathBuf),
    /// Something other than a socket is in the way.
    #[error("cannot create qmp socket {0}: a file that is not a socket is in the way")]
    NotASocket(PathBuf),
    /// A system call failed while creating the listening socket.
    #[error("cannot listen on qmp address {address}: {source}")]
    Listen {
        /// The address being set up.
        address: String,
        /// The failure.
        #[source]
        source: io::Error,
    },
    /// A thread could not be started.
    #[error("cannot start the qmp server thread: {0}")]
    Spawn(#[source] io::Error),
    /// `tls-creds=ID` names credentials that cannot serve (none with that id, a client
    /// endpoint); or the caller gave none.
    #[error("qmp monitor: {0}")]
    Tls(#[source] migration::transport::tls::TlsError),
}

/// Where the monitor listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QmpAddress {
    /// A Unix socket at this path.
    Unix(PathBuf),
    /// A TCP socket (port 0 picks a free port).
    Tcp {
        /// Host name or address; empty means all IPv4 addresses.
        host: String,
        /// Port.
        port: u16,
    },
}

/// A parsed `--qmp` argument, in QEMU's `-qmp` syntax: `unix:PATH` or `tcp:HOST:PORT`, then
/// optionally `,server` / `,server=on` and `,nowait` / `,wait=off` (`,,` is a literal comma).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpListenSpec {
    /// The address.
    pub address: QmpAddress,
    /// Whether the VM should wait for a client before it starts ([`QmpServer::wait_for_client`]).
    /// As in QEMU, `,server` alone implies waiting; the bare address does not.
    pub wait: bool,
    /// `tls-creds=ID`: clients must complete a TLS handshake with these credentials.
    pub tls_creds: Option<String>,
    /// `tls-authz=ID`: and their certificate's distinguished name must be allowed by this
    /// authorization object (looked up at each connection, as QEMU does).
    pub tls_authz: Option<String>,
}

impl QmpListenSpec {
    /// A Unix socket that does not make the VM wait.
    pub fn unix(path: impl Into<PathBuf>) -> Self {
        Self {
            address: QmpAddress::Unix(path.into()),
            wait: false,
            tls_creds: None,
            tls_authz: None,
        }
    }

    /// Parses a `--qmp` argument.
    pub fn parse(spec: &str) -> Result<Self, QmpServerError> {
        let invalid = || QmpServerError::InvalidAddress(spec.to_string());
        let (kind, rest) = spec.split_once(':').ok_or_else(invalid)?;
        let mut parts = vmm::qemu_opts::split_options(rest).into_iter();
        let target = parts.next().unwrap_or_default();
        let address = match kind {
            "unix" if !target.is_empty() => QmpAddress::Unix(PathBuf::from(target)),
            "tcp" => parse_tcp(&target).ok_or_else(invalid)?,
            _ => return Err(invalid()),
        };
        let mut server = None;
        let mut wait = None;
        let mut tls_creds = None;
        let mut tls_authz = None;
        for option in parts {
            let bad = || QmpServerError::InvalidOption {
                spec: spec.to_string(),
                option: option.clone(),
            };
            let (key, value) = match option.split_once('=') {
                Some((key, value)) => (key, Some(value)),
                None => (option.as_str(), None),
            };
            match (key, value) {
                ("server", value) => server = Some(parse_flag(value).ok_or_else(bad)?),
                ("wait", value) => wait = Some(parse_flag(value).ok_or_else(bad)?),
                ("nowait", None) => wait = Some(false),
                ("tls-creds", Some(id)) if !id.is_empty() => tls_creds = Some(id.to_string()),
                ("tls-authz", Some(id)) if !id.is_empty() => tls_authz = Some(id.to_string()),
                _ => return Err(bad()),
            }
        }
        if server == Some(false) {
            return Err(QmpServerError::ClientMode(spec.to_string()));
        }
        if tls_authz.is_some() && tls_creds.is_none() {
            return Err(QmpServerError::InvalidOption {
                spec: spec.to_string(),
                option: String::from("tls-authz (needs tls-creds)"),
            });
        }
        Ok(Self {
            address,
            wait: wait.unwrap_or(server.is_some()),
            tls_creds,
            tls_authz,
        })
    }
}

impl FromStr for QmpListenSpec {
    type Err = QmpServerError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        Self::parse(spec)
    }
}

/// QEMU's boolean option values; a bare flag is `on`.
fn parse_flag(value: Option<&str>) -> Option<bool> {
    match value {
        None | Some("on" | "yes" | "true") => Some(true),
        Some("off" | "no" | "false") => Some(false),
        _ => None,
    }
}

/// `HOST:PORT`, where HOST may be empty or a bracketed IPv6 address.
fn parse_tcp(target: &str) -> Option<QmpAddress> {
    let (host, port) = target.rsplit_once(':')?;
    let host = match host.strip_prefix('[') {
        Some(inner) => inner.strip_suffix(']')?,
        None if host.contains(':') => return None,
        None => host,
    };
    Some(QmpAddress::Tcp {
        host: host.to_string(),
        port: port.parse().ok()?,
    })
}

/// Tunables of a [`QmpServer`].
#[derive(Debug, Clone, Copy)]
pub struct QmpServerConfig {
    /// Bounds on one incoming message.
    pub json_limits: JsonLimits,
    /// Outgoing lines a client may have queued: beyond it an event disconnects the client,
    /// and its requests are not read until the queue drains below it.
    pub queue_capacity: usize,
    /// Clients connected at once; further connections are closed at once.
    pub max_clients: usize,
    /// How long [`QmpServer::shutdown`] lets queued replies drain before closing.
    pub shutdown_grace: Duration,
}

impl Default for QmpServerConfig {
    fn default() -> Self {
        Self {
            json_limits: JsonLimits::default(),
            queue_capacity: 1024,
            max_clients: 64,
            shutdown_grace: Duration::from_secs(1),
        }
    }
}

use vmm_sync::{lock, wait, wait_timeout};

/// Most descriptors taken from one read (QEMU's `TCP_MAX_FDS`); a message with more is an
/// error and ends the connection (the kernel closes the excess).
const MAX_FDS_PER_READ: usize = 16;

/// An accepted connection.
#[derive(Debug)]
enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
    /// A TLS session over either (no descriptor passing).
    Tls(Arc<TlsChannel>),
}

impl Conn {
    fn try_clone(&self) -> io::Result<Conn> {
        Ok(match self {
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
            Conn::Tls(t) => Conn::Tls(Arc::clone(t)),
        })
    }

    fn shutdown(&self, how: Shutdown) {
        // Errors only mean the socket is already shut down or disconnected.
        let _ = match self {
            Conn::Unix(s) => s.shutdown(how),
            Conn::Tcp(s) => s.shutdown(how),
            Conn::Tls(t) => {
                let how = match how {
                    Shutdown::Read => libc::SHUT_RD,
                    Shutdown::Write => libc::SHUT_WR,
                    Shutdown::Both => libc::SHUT_RDWR,
                };
                // SAFETY: the descriptor belongs to the channel, alive for the call;
                // shutdown(2) does not touch memory.
                unsafe { libc::shutdown(t.raw_fd(), how) };
                Ok(())
            }
        };
    }

    /// Reads input; on a unix socket also the descriptors sent with it (SCM_RIGHTS, at most
    /// [`MAX_FDS_PER_READ`], close-on-exec), which replace those not yet claimed by `getfd`.
    fn read(&mut self, buf: &mut [u8], received: &mut ReceivedFds) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => {
                let mut raw = [-1; MAX_FDS_PER_READ];
                let mut iov = [libc::iovec {
                    iov_base: buf.as_mut_ptr().cast(),
                    iov_len: buf.len(),
                }];
                // SAFETY: the iovec covers `buf`, a live, writable slice that any bytes may be
                // written to, for the duration of the call.
                let (n, count) = unsafe { s.recv_with_fds(&mut iov, &mut raw) }
                    .map_err(|e| io::Error::from_raw_os_error(e.errno()))?;
                let fds = raw
                    .get(..count)
                    .unwrap_or_default()
                    .iter()
                    .map(|&fd| {
                        // SAFETY: recvmsg just installed `fd` in this process for us; nothing
                        // else knows the number, so the OwnedFd is its only owner.
                        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                        // SAFETY: F_GETFD/F_SETFD only change the close-on-exec flag of the
                        // descriptor just received.
                        unsafe {
                            let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFD);
                            if flags != -1 {
                                libc::fcntl(
                                    fd.as_raw_fd(),
                                    libc::F_SETFD,
                                    flags | libc::FD_CLOEXEC,
                                );
                            }
                        }
                        fd
                    })
                    .collect();
                received.replace(fds);
                Ok(n)
            }
            Conn::Tcp(s) => s.read(buf),
            Conn::Tls(t) => TlsReader(Arc::clone(t)).read(buf),
        }
    }

    fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        match self {
            Conn::Unix(s) => s.set_nonblocking(nonblocking),
            Conn::Tcp(s) => s.set_nonblocking(nonblocking),
            // The session's socket stays blocking.
            Conn::Tls(_) if !nonblocking => Ok(()),
            Conn::Tls(_) => Err(io::ErrorKind::Unsupported.into()),
        }
    }

    /// Writes all of `buf` with `MSG_NOSIGNAL`, so a vanished peer is an error, not `SIGPIPE`.
    fn send_all(&self, mut buf: &[u8]) -> io::Result<()> {
        if let Conn::Tls(t) = self {
            let mut w = TlsWriter(Arc::clone(t));
            return io::Write::write_all(&mut w, buf).and_then(|()| io::Write::flush(&mut w));
        }
        while !buf.is_empty() {
            // SAFETY: `buf` is a live slice of `buf.len()` readable bytes, and the descriptor
            // belongs to `self`, which outlives the call.
            let sent = unsafe {
                libc::send(
                    self.as_raw_fd(),
                    buf.as_ptr().cast(),
                    buf.len(),
                    libc::MSG_NOSIGNAL,
                )
            };
            match sent {
                n if n > 0 => buf = buf.get(n as usize..).unwrap_or_default(),
                0 => return Err(io::ErrorKind::WriteZero.into()),
                _ => {
                    let error = io::Error::last_os_error();
                    if error.kind() != io::ErrorKind::Interrupted {
                        return Err(error);
                    }
                }
            }
        }
        Ok(())
    }
}

impl AsRawFd for Conn {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Conn::Unix(s) => s.as_raw_fd(),
            Conn::Tcp(s) => s.as_raw_fd(),
            Conn::Tls(t) => t.raw_fd(),
        }
    }
}

/// The listening socket.
#[derive(Debug)]
enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    fn accept(&self) -> io::Result<Conn> {
        match self {
            Listener::Unix(l) => l.accept().map(|(s, _)| Conn::Unix(s)),
            Listener::Tcp(l) => l.accept().map(|(s, _)| {
                let _ = s.set_nodelay(true);
                Conn::Tcp(s)
            }),
        }
    }

    fn as_raw_fd(&self) -> RawFd {
        match self {
            Listener::Unix(l) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        }
    }
}

/// Whether a client's connection still carries traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Open,
    /// No more requests or events; queued replies are still written.
    Closing,
    Closed,
}

/// A client's outgoing queue and state, under one lock so that a negotiation reply and the
/// events that follow it are queued in order.
#[derive(Debug)]
struct Outbox {
    queue: VecDeque<Arc<str>>,
    negotiated: bool,
    link: Link,
    reader_done: bool,
    writer_done: bool,
}

/// One connected client.
#[derive(Debug)]
struct Client {
    id: u64,
    /// A handle for shutting the socket down from other threads.
    conn: Conn,
    outbox: Mutex<Outbox>,
    changed: Condvar,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl Client {
    fn new(id: u64, conn: Conn) -> Self {
        Self {
            id,
            conn,
            outbox: Mutex::new(Outbox {
                queue: VecDeque::new(),
                negotiated: false,
                link: Link::Open,
                reader_done: false,
                writer_done: false,
            }),
            changed: Condvar::new(),
            writer: Mutex::new(None),
        }
    }

    /// Queues a reply; `negotiated` marks the reply that completes negotiation, after which
    /// events are queued too.
    fn push_reply(&self, line: Arc<str>, negotiated: bool) {
        let mut out = lock(&self.outbox);
        if out.link == Link::Closed {
            return;
        }
        out.negotiated |= negotiated;
        out.queue.push_back(line);
        self.changed.notify_all();
    }

    /// Queues an event if the client is negotiated; disconnects it if its queue is full.
    /// Returns false once the client is closed.
    fn push_event(&self, line: &Arc<str>, capacity: usize) -> bool {
        let mut out = lock(&self.outbox);
        if out.link != Link::Open || !out.negotiated {
            return out.link != Link::Closed;
        }
        if out.queue.len() >= capacity {
            log::warn!(
                "qmp client {} is not reading its events, disconnecting it",
                self.id
            );
            drop(out);
            self.close();
            return false;
        }
        out.queue.push_back(Arc::clone(line));
        self.changed.notify_all();
        true
    }

    /// Waits until the queue has room for another reply; false once the client is closing.
    fn wait_for_room(&self, capacity: usize) -> bool {
        let mut out = lock(&self.outbox);
        while out.link == Link::Open && out.queue.len() >= capacity {
            out = wait(&self.changed, out);
        }
        out.link == Link::Open
    }

    /// The reader has stopped: let the writer flush what is queued, then close.
    fn finish_reading(&self) {
        let mut out = lock(&self.outbox);
        out.reader_done = true;
        if out.link == Link::Open {
            out.link = Link::Closing;
        }
        self.changed.notify_all();
    }

    /// Server shutdown: stop reading requests, keep writing queued replies.
    fn begin_close(&self) {
        let mut out = lock(&self.outbox);
        if out.link == Link::Open {
            out.link = Link::Closing;
        }
        self.changed.notify_all();
        drop(out);
        self.conn.shutdown(Shutdown::Read);
    }

    /// Drops whatever is queued and disconnects.
    fn close(&self) {
        let mut out = lock(&self.outbox);
        out.link = Link::Closed;
        out.queue.clear();
        self.changed.notify_all();
        drop(out);
        self.conn.shutdown(Shutdown::Both);
    }

    /// Waits for the writer to finish, at most until `deadline`.
    fn wait_writer_done(&self, deadline: Instant) {
        let mut out = lock(&self.outbox);
        while !out.writer_done {
            let now = Instant::now();
            if now >= deadline {
                return;
            }
            out = wait_timeout(&self.changed, out, deadline - now).0;
        }
    }
}

/// Marks the reader finished when its thread ends, even by a panicking backend.
struct ReaderGuard<'a>(&'a Client);

impl Drop for ReaderGuard<'_> {
    fn drop(&mut self) {
        self.0.finish_reading();
    }
}

/// The connected clients.
#[derive(Debug, Default)]
struct ClientList {
    /// Set by shutdown: no more clients, events go nowhere.
    closed: bool,
    clients: Vec<Arc<Client>>,
    next_id: u64,
    /// Connections accepted so far.
    accepted: u64,
}

#[derive(Debug, Default)]
struct Registry {
    list: Mutex<ClientList>,
    /// Signalled when a client connects or the server shuts down.
    accepted: Condvar,
}

impl Registry {
    fn remove(&self, id: u64) {
        lock(&self.list).clients.retain(|client| client.id != id);
    }
}

/// Broadcasts QMP events to every negotiated client. Cheap to clone and safe to use from any
/// thread; after the server shuts down, events are dropped.
#[derive(Clone)]
pub struct EventSender {
    registry: Arc<Registry>,
    capacity: usize,
}

impl Default for EventSender {
    /// A sender connected to no server (events are dropped), for VMs run without `--qmp`.
    fn default() -> Self {
        Self {
            registry: Arc::default(),
            capacity: 0,
        }
    }
}

impl fmt::Debug for EventSender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventSender").finish_non_exhaustive()
    }
}

impl EventSender {
    /// Emits event `name` stamped with the current time; `data` is omitted when `None`
    /// (QEMU's `STOP`, `RESUME`). Never blocks on a client.
    pub fn emit(&self, name: &str, data: Option<Value>) {
        self.emit_at(name, data.as_ref(), Timestamp::now());
    }

    /// Emits an event with a given timestamp.
    pub fn emit_at(&self, name: &str, data: Option<&Value>, timestamp: Timestamp) {
        let mut list = lock(&self.registry.list);
        if list.closed || list.clients.is_empty() {
            return;
        }
        let line: Arc<str> = format_event(name, data, timestamp).into();
        list.clients
            .retain(|client| client.push_event(&line, self.capacity));
    }
}

/// State shared by the server threads.
struct Shared {
    backend: Arc<dyn QmpBackend>,
    config: QmpServerConfig,
    registry: Arc<Registry>,
    /// Serialises command execution across clients.
    dispatch: Mutex<()>,
    /// Descriptors passed with `getfd`, shared by the monitor's clients as in QEMU.
    fds: MonitorFds,
    /// `tls-creds`: every client's handshake first.
    tls: Option<ServerTls>,
}

/// Where the server listens, for callers and for cleanup.
#[derive(Debug)]
enum Local {
    Unix { path: PathBuf, dev: u64, ino: u64 },
    Tcp(SocketAddr),
}

/// A running QMP monitor. Dropping it shuts it down.
pub struct QmpServer {
    shared: Arc<Shared>,
    wake: EventFd,
    acceptor: Mutex<Option<JoinHandle<()>>>,
    local: Local,
    shut_down: AtomicBool,
}

impl fmt::Debug for QmpServer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QmpServer")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

impl QmpServer {
    /// Serves `backend` on a Unix socket at `path` with the default configuration.
    pub fn listen(
        path: impl AsRef<Path>,
        backend: Arc<dyn QmpBackend>,
    ) -> Result<Self, QmpServerError> {
        Self::bind(
            &QmpListenSpec::unix(path.as_ref()),
            backend,
            QmpServerConfig::default(),
        )
    }

    /// Serves `backend` at the address of `spec` (its `wait` flag is the caller's business,
    /// see [`QmpServer::wait_for_client`]).
    pub fn bind(
        spec: &QmpListenSpec,
        backend: Arc<dyn QmpBackend>,
        config: QmpServerConfig,
    ) -> Result<Self, QmpServerError> {
        Self::bind_tls(spec, backend, config, None)
    }

    /// [`bind`](Self::bind) with the TLS credentials the spec's `tls-creds` names (the
    /// caller looks them up); a spec with `tls-creds` and no credentials is an error.
    pub fn bind_tls(
        spec: &QmpListenSpec,
        backend: Arc<dyn QmpBackend>,
        config: QmpServerConfig,
        tls: Option<ServerTls>,
    ) -> Result<Self, QmpServerError> {
        if let (Some(id), None) = (&spec.tls_creds, &tls) {
            return Err(QmpServerError::Tls(
                migration::transport::tls::TlsError::NoCreds(id.clone()),
            ));
        }
        let (listener, local) = match &spec.address {
            QmpAddress::Unix(path) => bind_unix(path)?,
            QmpAddress::Tcp { host, port } => bind_tcp(host, *port)?,
        };
        Self::serve(listener, local, backend, config, tls)
    }

    /// Serves `backend` on a listening Unix socket handed over by the parent process (QEMU's
    /// `-chardev socket,fd=N,server=on`, as libvirt passes the monitor). The socket file is
    /// the parent's: it is left in place at shutdown.
    pub fn from_unix_listener(
        listener: UnixListener,
        backend: Arc<dyn QmpBackend>,
        config: QmpServerConfig,
    ) -> Result<Self, QmpServerError> {
        let path = listener
            .local_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(Path::to_path_buf))
            .unwrap_or_default();
        // dev/ino 0 never match a file, so shutdown never removes the parent's socket.
        let local = Local::Unix {
            path,
            dev: 0,
            ino: 0,
        };
        Self::serve(Listener::Unix(listener), local, backend, config, None)
    }

    fn serve(
        listener: Listener,
        local: Local,
        backend: Arc<dyn QmpBackend>,
        config: QmpServerConfig,
        tls: Option<ServerTls>,
    ) -> Result<Self, QmpServerError> {
        let listen_error = |source| QmpServerError::Listen {
            address: local.to_string(),
            source,
        };
        let nonblocking = match &listener {
            Listener::Unix(l) => l.set_nonblocking(true),
            Listener::Tcp(l) => l.set_nonblocking(true),
        };
        nonblocking.map_err(listen_error)?;
        let wake = EventFd::new(EFD_NONBLOCK).map_err(listen_error)?;
        let acceptor_wake = wake.try_clone().map_err(listen_error)?;

        let shared = Arc::new(Shared {
            backend,
            config,
            registry: Arc::default(),
            dispatch: Mutex::new(()),
            fds: MonitorFds::new(),
            tls,
        });
        let acceptor_shared = Arc::clone(&shared);
        let acceptor = thread::Builder::new()
            .name("qmp-accept".into())
            .spawn(move || accept_loop(&listener, &acceptor_wake, &acceptor_shared))
            .map_err(QmpServerError::Spawn)?;
        Ok(Self {
            shared,
            wake,
            acceptor: Mutex::new(Some(acceptor)),
            local,
            shut_down: AtomicBool::new(false),
        })
    }

    /// A handle for emitting events to this server's clients.
    pub fn events(&self) -> EventSender {
        EventSender {
            registry: Arc::clone(&self.shared.registry),
            capacity: self.shared.config.queue_capacity,
        }
    }

    /// The Unix socket path, when listening on one.
    pub fn socket_path(&self) -> Option<&Path> {
        match &self.local {
            Local::Unix { path, .. } => Some(path),
            Local::Tcp(_) => None,
        }
    }

    /// The TCP address (with the actual port), when listening on TCP.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        match self.local {
            Local::Tcp(addr) => Some(addr),
            Local::Unix { .. } => None,
        }
    }

    /// Clients currently connected.
    pub fn client_count(&self) -> usize {
        lock(&self.shared.registry.list).clients.len()
    }

    /// Waits until at least one client has connected since the server started (QEMU's
    /// `wait=on`), at most `timeout` if given. Returns whether one has.
    pub fn wait_for_client(&self, timeout: Option<Duration>) -> bool {
        let deadline = timeout.map(|t| Instant::now() + t);
        let registry = &self.shared.registry;
        let mut list = lock(&registry.list);
        while list.accepted == 0 && !list.closed {
            match deadline {
                None => list = wait(&registry.accepted, list),
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        break;
                    }
                    list = wait_timeout(&registry.accepted, list, deadline - now).0;
                }
            }
        }
        list.accepted > 0
    }

    /// Stops accepting clients, lets queued replies drain for the configured grace period,
    /// closes every connection and removes the socket file. Idempotent. Must not be called
    /// from inside [`QmpBackend::execute`] (the caller's own reply would be lost).
    pub fn shutdown(&self) {
        if self.shut_down.swap(true, Ordering::SeqCst) {
            return;
        }
        // Waking the acceptor cannot fail short of a full counter, which a shutdown flag
        // written once cannot reach.
        let _ = self.wake.write(1);
        if let Some(acceptor) = lock(&self.acceptor).take() {
            let _ = acceptor.join();
        }
        if let Local::Unix { path, dev, ino } = &self.local {
            // Remove the socket only if it is still ours.
            if let Ok(meta) = std::fs::symlink_metadata(path) {
                if meta.dev() == *dev && meta.ino() == *ino {
                    let _ = std::fs::remove_file(path);
                }
            }
        }

        let registry = &self.shared.registry;
        let clients = {
            let mut list = lock(&registry.list);
            list.closed = true;
            std::mem::take(&mut list.clients)
        };
        registry.accepted.notify_all();
        for client in &clients {
            client.begin_close();
        }
        let deadline = Instant::now() + self.shared.config.shutdown_grace;
        for client in &clients {
            client.wait_writer_done(deadline);
        }
        for client in &clients {
            client.close();
        }
        for client in &clients {
            if let Some(writer) = lock(&client.writer).take() {
                if writer.thread().id() != thread::current().id() {
                    let _ = writer.join();
                }
            }
        }
    }
}

impl Drop for QmpServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl fmt::Display for Local {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Local::Unix { path, .. } => write!(f, "unix:{}", path.display()),
            Local::Tcp(addr) => write!(f, "tcp:{addr}"),
        }
    }
}

fn bind_tcp(host: &str, port: u16) -> Result<(Listener, Local), QmpServerError> {
    let host = if host.is_empty() { "0.0.0.0" } else { host };
    let listen_error = |source| QmpServerError::Listen {
        address: format!("tcp:{host}:{port}"),
        source,
    };
    let listener = TcpListener::bind((host, port)).map_err(listen_error)?;
    let addr = listener.local_addr().map_err(listen_error)?;
    Ok((Listener::Tcp(listener), Local::Tcp(addr)))
}

/// Creates a Unix socket at `path` with mode 0600, replacing a stale socket file.
fn bind_unix(path: &Path) -> Result<(Listener, Local), QmpServerError> {
    let listen_error = |source| QmpServerError::Listen {
        address: format!("unix:{}", path.display()),
        source,
    };
    let mut addr = libc::sockaddr_un {
        sun_family: libc::AF_UNIX as libc::sa_family_t,
        sun_path: [0; 108],
    };
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(QmpServerError::PathTooLong(path.to_path_buf()));
    }
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    let addr_len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;

    remove_stale_socket(path)?;

    // SAFETY: socket(2) with constant arguments; the result is checked below.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(listen_error(io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a freshly created descriptor that nothing else owns.
    let socket = unsafe { OwnedFd::from_raw_fd(fd) };
    // Linux creates the socket file with the socket inode's mode (less the umask): setting it
    // first means the file never exists with looser permissions.
    // SAFETY: fchmod(2) on a descriptor we own.
    if unsafe { libc::fchmod(socket.as_raw_fd(), 0o600) } < 0 {
        return Err(listen_error(io::Error::last_os_error()));
    }
    // SAFETY: `addr` is an initialised sockaddr_un and `addr_len` covers the family and the
    // NUL-terminated path within it.
    let bound = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            std::ptr::addr_of!(addr).cast(),
            addr_len as libc::socklen_t,
        )
    };
    if bound < 0 {
        return Err(listen_error(io::Error::last_os_error()));
    }
    // SAFETY: listen(2) on a bound socket we own.
    if unsafe { libc::listen(socket.as_raw_fd(), 16) } < 0 {
        let error = io::Error::last_os_error();
        let _ = std::fs::remove_file(path);
        return Err(listen_error(error));
    }
    // In case the file system ignored the socket's mode.
    let meta = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::symlink_metadata(path))
        .map_err(|error| {
            let _ = std::fs::remove_file(path);
            listen_error(error)
        })?;
    Ok((
        Listener::Unix(UnixListener::from(socket)),
        Local::Unix {
            path: path.to_path_buf(),
            dev: meta.dev(),
            ino: meta.ino(),
        },
    ))
}

/// Removes a socket file nobody listens on; refuses to touch a live socket or another file.
fn remove_stale_socket(path: &Path) -> Result<(), QmpServerError> {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(QmpServerError::NotASocket(path.to_path_buf()));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(QmpServerError::InUse(path.to_path_buf())),
        Err(_) => match std::fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(QmpServerError::Listen {
                address: format!("unix:{}", path.display()),
                source,
            }),
        },
    }
}

/// Polls `fds` for input for at most `timeout_ms` (-1: forever); returns which are ready.
fn poll_in(fds: &[RawFd], timeout_ms: i32) -> io::Result<Vec<bool>> {
    let mut pollfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: `pollfds` is a live array of `pollfds.len()` pollfd structures.
        let ready = unsafe {
            libc::poll(
                pollfds.as_mut_ptr(),
                pollfds.len() as libc::nfds_t,
                timeout_ms,
            )
        };
        if ready >= 0 {
            return Ok(pollfds.iter().map(|p| p.revents != 0).collect());
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

fn accept_loop(listener: &Listener, wake: &EventFd, shared: &Arc<Shared>) {
    let fds = [listener.as_raw_fd(), wake.as_raw_fd()];
    loop {
        match poll_in(&fds, -1) {
            Ok(ready) if ready.get(1) == Some(&true) => return,
            Ok(_) => {}
            Err(error) => {
                log::error!("qmp: cannot wait for clients: {error}");
                return;
            }
        }
        loop {
            match listener.accept() {
                Ok(conn) => match &shared.tls {
                    None => add_client(conn, shared),
                    Some(tls) => secure_client(conn, tls.clone(), shared),
                },
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => break,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => {
                    // Out of descriptors or memory: back off instead of spinning, but stay
                    // responsive to shutdown.
                    log::warn!("qmp: cannot accept a client: {error}");
                    if matches!(poll_in(&fds[1..], 100), Ok(ready) if ready.first() == Some(&true))
                    {
                        return;
                    }
                    break;
                }
            }
        }
    }
}

/// Runs a new client's TLS handshake on a thread of its own (a client that says nothing
/// holds up no one, and gives up after the handshake timeout), then starts its threads; a
/// client that fails the handshake (plaintext, a certificate the CA did not sign) is closed.
fn secure_client(conn: Conn, tls: ServerTls, shared: &Arc<Shared>) {
    let (sock, peer): (OwnedFd, String) = match conn {
        Conn::Unix(s) => (s.into(), String::from("a local client")),
        Conn::Tcp(s) => {
            let peer = s
                .peer_addr()
                .map_or_else(|_| String::from("a TCP client"), |a| a.to_string());
            (s.into(), peer)
        }
        Conn::Tls(_) => return,
    };
    let shared = Arc::clone(shared);
    let spawned = thread::Builder::new()
        .name("qmp-tls".into())
        .spawn(move || match tls.accept(sock) {
            Ok(channel) => add_client(Conn::Tls(channel), &shared),
            // On standard error, as the migration's refusals: who was refused, and why
            // (a failed handshake, a tls-authz denial naming the certificate's DN).
            Err(e) => eprintln!("hopvm: qmp: refused a connection from {peer}: {e}"),
        });
    if let Err(e) = spawned {
        log::warn!("qmp: cannot start a client's TLS handshake: {e}");
    }
}

/// Starts the threads of a new client.
fn add_client(conn: Conn, shared: &Arc<Shared>) {
    let registry = &shared.registry;
    let id = {
        let mut list = lock(&registry.list);
        if list.closed {
            return;
        }
        if list.clients.len() >= shared.config.max_clients {
            log::warn!(
                "qmp: refusing a client, {} are connected already",
                list.clients.len()
            );
            return;
        }
        list.next_id += 1;
        list.next_id
    };
    let setup = || -> io::Result<()> {
        conn.set_nonblocking(false)?;
        let client = Arc::new(Client::new(id, conn.try_clone()?));
        let writer_conn = conn.try_clone()?;
        let reader_conn = conn.try_clone()?;
        // Listed before its threads start: a client that disconnects at once has its writer
        // remove it from the list, which must find it there (listing it afterwards would
        // leak the entry, and `max_clients` leaked entries lock every client out).
        {
            let mut list = lock(&registry.list);
            if list.closed {
                drop(list);
                client.close();
                return Ok(());
            }
            list.clients.push(Arc::clone(&client));
            list.accepted += 1;
            registry.accepted.notify_all();
        }
        let writer_client = Arc::clone(&client);
        let writer_registry = Arc::clone(registry);
        let writer = match thread::Builder::new()
            .name(format!("qmp-write-{id}"))
            .spawn(move || writer_loop(&writer_client, &writer_conn, &writer_registry))
        {
            Ok(writer) => writer,
            Err(error) => {
                client.close();
                registry.remove(id);
                return Err(error);
            }
        };
        *lock(&client.writer) = Some(writer);

        let reader_client = Arc::clone(&client);
        let reader_shared = Arc::clone(shared);
        if let Err(error) = thread::Builder::new()
            .name(format!("qmp-read-{id}"))
            .spawn(move || reader_loop(&reader_client, reader_conn, &reader_shared))
        {
            // The writer sees the close and removes the client.
            client.close();
            return Err(error);
        }
        log::debug!("qmp: client {id} connected");
        Ok(())
    };
    if let Err(error) = setup() {
        log::warn!("qmp: cannot serve a client: {error}");
    }
}

/// Reads requests, answers them in order, and applies backpressure.
fn reader_loop(client: &Client, mut conn: Conn, shared: &Shared) {
    let _guard = ReaderGuard(client);
    client.push_reply(greeting().into(), false);
    let capacity = shared.config.queue_capacity;
    let mut session = Session::new();
    let mut parser = JsonStreamParser::new(shared.config.json_limits);
    let mut buf = vec![0u8; 16 * 1024];
    let mut received = ReceivedFds::new();
    loop {
        if !client.wait_for_room(capacity) {
            return;
        }
        let n = match conn.read(&mut buf, &mut received) {
            Ok(0) => return,
            Ok(n) => n,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return,
        };
        let mut open = true;
        parser.feed(buf.get(..n).unwrap_or_default(), &mut |message| {
            if !open {
                return;
            }
            let was_negotiated = session.is_negotiated();
            let reply = {
                let _dispatch = lock(&shared.dispatch);
                session.handle_with_fds(
                    shared.backend.as_ref(),
                    message,
                    &shared.fds,
                    &mut received,
                )
            };
            client.push_reply(reply.into(), !was_negotiated && session.is_negotiated());
            open = client.wait_for_room(capacity);
        });
        if !open {
            return;
        }
    }
}

/// A line as QEMU's monitor puts it on the wire: every `\n` as `\r\n` (`monitor_puts`).
/// libvirt cuts its input at `\r\n` and sees nothing in a bare `\n` stream.
fn crlf(line: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(line.len() + 1);
    for &b in line.as_bytes() {
        if b == b'\n' {
            out.push(b'\r');
        }
        out.push(b);
    }
    out
}

/// Writes queued lines until the client closes, then disconnects it.
fn writer_loop(client: &Client, conn: &Conn, registry: &Registry) {
    loop {
        let line = {
            let mut out = lock(&client.outbox);
            loop {
                if out.link == Link::Closed {
                    break None;
                }
                if let Some(line) = out.queue.pop_front() {
                    // Room for the reader's next reply.
                    client.changed.notify_all();
                    break Some(line);
                }
                if out.link == Link::Closing && out.reader_done {
                    break None;
                }
                out = wait(&client.changed, out);
            }
        };
        let Some(line) = line else { break };
        if let Err(error) = conn.send_all(&crlf(&line)) {
            log::debug!("qmp: client {} went away: {error}", client.id);
            break;
        }
    }
    client.close();
    {
        let mut out = lock(&client.outbox);
        out.writer_done = true;
        client.changed.notify_all();
    }
    registry.remove(client.id);
    log::debug!("qmp: client {} disconnected", client.id);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemu_style_addresses() {
        let unix = |path: &str, wait| QmpListenSpec {
            address: QmpAddress::Unix(path.into()),
            wait,
            tls_creds: None,
            tls_authz: None,
        };
        assert_eq!(
            QmpListenSpec::parse("unix:/tmp/q.sock").unwrap(),
            unix("/tmp/q.sock", false)
        );
        assert_eq!(
            QmpListenSpec::parse("unix:/tmp/q.sock,server=on,wait=off").unwrap(),
            unix("/tmp/q.sock", false)
        );
        assert_eq!(
            QmpListenSpec::parse("unix:/tmp/q.sock,server,nowait").unwrap(),
            unix("/tmp/q.sock", false)
        );
        assert_eq!(
            QmpListenSpec::parse("unix:/tmp/q.sock,server").unwrap(),
            unix("/tmp/q.sock", true)
        );
        assert_eq!(
            QmpListenSpec::parse("unix:/tmp/a,,b").unwrap(),
            unix("/tmp/a,b", false)
        );
        assert_eq!(
            QmpListenSpec::parse("tcp:127.0.0.1:4444,server,nowait").unwrap(),
            QmpListenSpec {
                address: QmpAddress::Tcp {
                    host: "127.0.0.1".into(),
                    port: 4444
                },
                wait: false,
                tls_creds: None,
                tls_authz: None,
            }
        );
        let with_authz =
            QmpListenSpec::parse("tcp:127.0.0.1:4444,server=on,tls-creds=tls0,tls-authz=az0")
                .unwrap();
        assert_eq!(with_authz.tls_authz.as_deref(), Some("az0"));
        assert!(QmpListenSpec::parse("tcp:127.0.0.1:4444,server=on,tls-authz=az0").is_err());
        assert_eq!(
            QmpListenSpec::parse("tcp:127.0.0.1:4444,server=on,wait=off,tls-creds=tls0")
                .unwrap()
                .tls_creds
                .as_deref(),
            Some("tls0")
        );
        assert_eq!(
            QmpListenSpec::parse("tcp:[::1]:0").unwrap().address,
            QmpAddress::Tcp {
                host: "::1".into(),
                port: 0
            }
        );
        assert_eq!(
            QmpListenSpec::parse("tcp::4444").unwrap().address,
            QmpAddress::Tcp {
                host: String::new(),
                port: 4444
            }
        );
        for bad in [
            "stdio",
            "/tmp/q.sock",
            "unix:",
            "tcp:host",
            "tcp:h:99999",
            "telnet:x:1",
        ] {
            assert!(
                matches!(
                    QmpListenSpec::parse(bad),
                    Err(QmpServerError::InvalidAddress(_))
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            QmpListenSpec::parse("unix:/q,server=maybe"),
            Err(QmpServerError::InvalidOption { .. })
        ));
        assert!(matches!(
            QmpListenSpec::parse("unix:/q,reconnect=1"),
            Err(QmpServerError::InvalidOption { .. })
        ));
        assert!(matches!(
            QmpListenSpec::parse("unix:/q,server=off"),
            Err(QmpServerError::ClientMode(_))
        ));
    }
}
