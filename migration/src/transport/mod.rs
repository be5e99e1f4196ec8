//! Migration transports, addressed by QEMU's migration URIs.
//!
//! hopvm accepts the same URIs as QEMU's `migrate` command and `-incoming` option, so that
//! scripts and habits carry over:
//!
//! | URI | outgoing (`migrate`) | incoming (`--incoming`) |
//! |---|---|---|
//! | `tcp:HOST:PORT` | connect | listen (`tcp:0:PORT`, `tcp::PORT`: any IPv4 address; IPv6 as `tcp:[::1]:PORT`) |
//! | `unix:PATH` | connect | listen (a stale socket file at PATH is replaced) |
//! | `exec:COMMAND` | `sh -c COMMAND`, stream to its stdin | `sh -c COMMAND`, stream from its stdout |
//! | `fd:NAME` | write to the descriptor passed to the monitor with `getfd` as NAME, or to descriptor N inherited at start-up (`fd:N`) | read from it |
//!
//! Anything else fails with QEMU's message, `unknown migration protocol: <uri>`.
//!
//! Listening is split from accepting ([`listen_incoming`] then [`Incoming::accept`]) because
//! the destination must be listening before anything else happens — a source may connect as
//! soon as the destination process has started — while the accept itself blocks until the
//! source shows up.
//!
//! The outgoing side is an [`Outgoing`]: a writer plus what a migration needs around it — a
//! [`ShutdownHandle`] that another thread (a `migrate_cancel`) can use to unblock a writer
//! stuck on a dead or stalled peer, [`Outgoing::peer_gone`] to notice a destination that went
//! away without waiting for the next write to fail, and [`Outgoing::finish`] to close the
//! channel and, for `exec:`, reap the command and report its failure.
//!
//! TLS ([`tls`], QEMU's `tls-creds`) is put on a channel in exactly two places, which every
//! migration channel with `tls-creds` set goes through: [`Outgoing::start_tls`] on the source
//! (after the connect: the handshake, then every write sealed and the return path opened) and,
//! on the destination, [`Incoming::accept_channel_tls`] for the listener's connection or
//! [`IncomingChannel::accept_tls`] for any other accepted socket. Socket channels only, as in
//! QEMU: `exec:` and a pipe `fd:` are refused.
//!
//! `fd:` follows QEMU: the descriptor is *handed over* to the migration, which closes it when
//! done. A name comes from the monitor's `getfd` table ([`NamedFds`]); a number must have been
//! inherited when the process started ([`record_inherited_fds`]) — never one of hopvm's own.

mod exec;
mod fd;

pub use fd::{record_inherited_fds, take_inherited_fd, NamedFds};
mod tcp;
pub mod tls;
mod unix;

use tls::{ClientTls, ServerTls, TlsChannel, TlsError, TlsReader, TlsWriter};

use std::fmt;
use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{ChildStdin, ExitStatus};
use std::str::FromStr;
use std::sync::{Arc, Weak};

/// Errors of migration transports.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The URI has a known protocol but is malformed.
    #[error("invalid migration uri {uri:?}: {reason}")]
    InvalidUri {
        /// The URI as given.
        uri: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The URI's protocol is not one of tcp, unix, exec, fd (QEMU's wording).
    #[error("unknown migration protocol: {0}")]
    UnknownProtocol(String),
    /// Connecting failed.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// Where to.
        addr: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Binding or listening failed.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// Where.
        addr: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Accepting the incoming connection failed.
    #[error("accept failed: {0}")]
    Accept(#[source] io::Error),
    /// The `exec:` command could not be started.
    #[error("cannot run {command:?}: {source}")]
    Spawn {
        /// The command.
        command: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The `exec:` command exited unsuccessfully.
    #[error("command {command:?} failed: {status}")]
    CommandFailed {
        /// The command.
        command: String,
        /// How it exited.
        status: ExitStatus,
    },
    /// An `fd:` descriptor that is not usable.
    #[error("bad fd {fd}: {reason}")]
    BadFd {
        /// The descriptor.
        fd: RawFd,
        /// What is wrong.
        reason: &'static str,
    },
    /// `fd:NAME` names no descriptor passed to the monitor (QEMU's wording).
    #[error("File descriptor named '{0}' has not been found")]
    FdNotFound(String),
    /// `fd:N` is a descriptor the process did not inherit at start-up.
    #[error("fd {0} was not handed to hopvm at start-up (pass it with the monitor's getfd)")]
    FdNotHandedOver(RawFd),
    /// Shutting the channel down failed.
    #[error("shutdown failed: {0}")]
    Shutdown(#[source] io::Error),
    /// Writing, flushing or closing the channel failed.
    #[error("i/o: {0}")]
    Io(#[source] io::Error),
    /// `migrate_cancel` ended the connection attempt.
    #[error("connection cancelled")]
    Cancelled,
    /// TLS could not be set up on the channel (credentials, handshake).
    #[error("{0}")]
    Tls(#[source] TlsError),
    /// TLS was asked for on a channel that is not a socket (QEMU runs TLS on socket channels
    /// only).
    #[error("TLS is not supported on {0} migration channels (use tcp:, unix: or a socket fd:)")]
    TlsUnsupported(&'static str),
    /// The cancel descriptor could not be created.
    #[error("cannot create the cancel descriptor: {0}")]
    CancelFd(#[source] io::Error),
    /// The URI's transport cannot open more than one channel (`exec:`, `fd:`), which the
    /// `multifd` capability needs (QEMU's wording).
    #[error("multifd is not supported by current protocol")]
    MultiChannelUnsupported,
}

/// Interrupts [`connect_outgoing_cancellable`] from another thread (a `migrate_cancel` while
/// the destination does not answer): an eventfd the connecting thread polls beside its socket.
#[derive(Debug)]
pub struct ConnectCancel {
    fd: vmm_sys_util::eventfd::EventFd,
    cancelled: std::sync::atomic::AtomicBool,
}

impl ConnectCancel {
    /// A cancel that has not fired.
    pub fn new() -> Result<Self, TransportError> {
        Ok(Self {
            fd: vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
                .map_err(TransportError::CancelFd)?,
            cancelled: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Fires: a connect in progress returns [`TransportError::Cancelled`], later ones too.
    pub fn cancel(&self) {
        self.cancelled
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = self.fd.write(1);
    }

    /// Whether it has fired.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl AsRawFd for ConnectCancel {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// A parsed migration URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationUri {
    /// `tcp:HOST:PORT`; an empty host or `0` means any address when listening.
    Tcp {
        /// Host name or address, without IPv6 brackets.
        host: String,
        /// Port (0 lets the system choose when listening).
        port: u16,
    },
    /// `unix:PATH`.
    Unix(PathBuf),
    /// `exec:COMMAND`, run with `sh -c`.
    Exec(String),
    /// `fd:NAME`: a descriptor passed to the monitor as NAME, or inherited descriptor N.
    Fd(String),
}

fn invalid(uri: &str, reason: &'static str) -> TransportError {
    TransportError::InvalidUri {
        uri: uri.to_owned(),
        reason,
    }
}

fn parse_tcp(uri: &str, rest: &str) -> Result<MigrationUri, TransportError> {
    if rest.is_empty() {
        return Err(invalid(uri, "missing host and port"));
    }
    let (host, port) = if let Some(bracketed) = rest.strip_prefix('[') {
        let (host, after) = bracketed
            .split_once(']')
            .ok_or_else(|| invalid(uri, "unterminated ipv6 address"))?;
        if host.is_empty() {
            return Err(invalid(uri, "empty ipv6 address"));
        }
        let port = after
            .strip_prefix(':')
            .ok_or_else(|| invalid(uri, "missing port"))?;
        (host, port)
    } else {
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| invalid(uri, "missing port"))?;
        if host.contains(':') {
            return Err(invalid(uri, "ipv6 addresses need brackets"));
        }
        (host, port)
    };
    if port.is_empty() {
        return Err(invalid(uri, "missing port"));
    }
    if !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid(uri, "port is not a number"));
    }
    let port = port
        .parse::<u16>()
        .map_err(|_| invalid(uri, "port out of range"))?;
    Ok(MigrationUri::Tcp {
        host: host.to_owned(),
        port,
    })
}

impl FromStr for MigrationUri {
    type Err = TransportError;

    fn from_str(uri: &str) -> Result<Self, Self::Err> {
        if uri.is_empty() {
            return Err(invalid(uri, "empty"));
        }
        if let Some(rest) = uri.strip_prefix("tcp:") {
            parse_tcp(uri, rest)
        } else if let Some(path) = uri.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(invalid(uri, "missing path"));
            }
            Ok(MigrationUri::Unix(PathBuf::from(path)))
        } else if let Some(cmd) = uri.strip_prefix("exec:") {
            if cmd.trim().is_empty() {
                return Err(invalid(uri, "missing command"));
            }
            Ok(MigrationUri::Exec(cmd.to_owned()))
        } else if let Some(n) = uri.strip_prefix("fd:") {
            if n.is_empty() {
                return Err(invalid(uri, "missing descriptor name"));
            }
            if fd::is_number(n) {
                if !n.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(invalid(
                        uri,
                        "a descriptor name must not start with a digit",
                    ));
                }
                n.parse::<RawFd>()
                    .map_err(|_| invalid(uri, "descriptor out of range"))?;
            }
            Ok(MigrationUri::Fd(n.to_owned()))
        } else {
            Err(TransportError::UnknownProtocol(uri.to_owned()))
        }
    }
}

impl fmt::Display for MigrationUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MigrationUri::Tcp { host, port } if host.contains(':') => {
                write!(f, "tcp:[{host}]:{port}")
            }
            MigrationUri::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
            MigrationUri::Unix(path) => write!(f, "unix:{}", path.display()),
            MigrationUri::Exec(cmd) => write!(f, "exec:{cmd}"),
            MigrationUri::Fd(fd) => write!(f, "fd:{fd}"),
        }
    }
}

enum Conn {
    Tcp(Arc<TcpStream>),
    Unix(Arc<UnixStream>),
    Fd(Arc<File>),
    /// A TLS session over any of the sockets above.
    Tls(Arc<TlsChannel>),
    Exec {
        stdin: Option<ChildStdin>,
        child: Arc<exec::ChildSlot>,
    },
    /// After `finish`.
    Closed,
}

/// The outgoing side of a migration channel: write the stream into it (it is `Write + Send`,
/// so it can be boxed as a `Box<dyn Write + Send>`), then [`finish`](Self::finish) it.
/// Dropping it unfinished is an abort: sockets are shut down and an `exec:` command is
/// stopped.
pub struct Outgoing {
    conn: Conn,
    uri: MigrationUri,
    /// The TLS client this channel ran its handshake with: every further channel of the
    /// migration ([`open_channel`](Self::open_channel)) runs its own with the same one.
    tls: Option<ClientTls>,
}

impl fmt::Debug for Outgoing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Outgoing").field("uri", &self.uri).finish()
    }
}

enum Target {
    Tcp(Weak<TcpStream>),
    Unix(Weak<UnixStream>),
    Fd(Weak<File>),
    Tls(Weak<TlsChannel>),
    Exec(Weak<exec::ChildSlot>),
}

/// Shuts an [`Outgoing`] channel down from another thread, so that a write blocked on a
/// stalled peer returns an error (QEMU's `qemu_file_shutdown` on `migrate_cancel`). Holds
/// no reference that keeps the channel open; once the channel is closed it does nothing.
#[derive(Clone)]
pub struct ShutdownHandle(Arc<Target>);

impl fmt::Debug for ShutdownHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ShutdownHandle")
    }
}

impl ShutdownHandle {
    /// Shuts the channel down: sockets are shut down in both directions, an `exec:` command
    /// is killed. An `fd:` descriptor that is not a socket cannot be shut down (error).
    pub fn shutdown(&self) -> Result<(), TransportError> {
        match &*self.0 {
            Target::Tcp(s) => s
                .upgrade()
                .map_or(Ok(()), |s| shutdown_socket(s.as_raw_fd())),
            Target::Unix(s) => s
                .upgrade()
                .map_or(Ok(()), |s| shutdown_socket(s.as_raw_fd())),
            Target::Fd(f) => f
                .upgrade()
                .map_or(Ok(()), |f| shutdown_socket(f.as_raw_fd())),
            Target::Tls(t) => t.upgrade().map_or(Ok(()), |t| shutdown_socket(t.raw_fd())),
            Target::Exec(c) => c
                .upgrade()
                .map_or(Ok(()), |c| c.kill().map_err(TransportError::Shutdown)),
        }
    }
}

/// `shutdown(SHUT_RDWR)` on a socket descriptor, tolerating one that is no longer connected.
fn shutdown_socket(fd: RawFd) -> Result<(), TransportError> {
    // SAFETY: `fd` is borrowed from a live socket or file object that the caller holds for
    // the duration of the call; shutdown(2) does not touch memory.
    let rc = unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::ENOTCONN) => Ok(()),
        _ => Err(TransportError::Shutdown(err)),
    }
}

/// Whether the peer behind `fd` is gone: the socket was closed or reset by the other end, or
/// the pipe has no reader left. Does not block.
fn fd_peer_gone(fd: RawFd) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: `pfd` is a valid pollfd for the duration of the call and the count is 1; `fd`
    // is borrowed from an object the caller holds. A zero timeout never blocks.
    let rc = unsafe { libc::poll(&mut pfd, 1, 0) };
    rc > 0 && pfd.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLRDHUP) != 0
}

impl Outgoing {
    /// The URI this channel was opened for.
    pub fn uri(&self) -> &MigrationUri {
        &self.uri
    }

    /// A handle to shut this channel down from another thread.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        let target = match &self.conn {
            Conn::Tcp(s) => Target::Tcp(Arc::downgrade(s)),
            Conn::Unix(s) => Target::Unix(Arc::downgrade(s)),
            Conn::Fd(f) => Target::Fd(Arc::downgrade(f)),
            Conn::Tls(t) => Target::Tls(Arc::downgrade(t)),
            Conn::Exec { child, .. } => Target::Exec(Arc::downgrade(child)),
            Conn::Closed => Target::Tcp(Weak::new()),
        };
        ShutdownHandle(Arc::new(target))
    }

    /// A second handle on the channel for reading what the destination sends back (QEMU's
    /// return path): a duplicate of the socket for `tcp:`, `unix:` and a socket `fd:`; `None`
    /// for one-way channels (`exec:`, an `fd:` pipe or file).
    pub fn return_path(&self) -> Option<Box<dyn Read + Send>> {
        match &self.conn {
            Conn::Tcp(s) => s
                .try_clone()
                .ok()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            Conn::Unix(s) => s
                .try_clone()
                .ok()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            Conn::Fd(f) if is_socket(f.as_raw_fd()) => f
                .try_clone()
                .ok()
                .map(|f| Box::new(f) as Box<dyn Read + Send>),
            Conn::Tls(t) => Some(Box::new(TlsReader(t.clone()))),
            _ => None,
        }
    }

    /// Runs TLS on this channel: the handshake with the destination (whose certificate is
    /// checked against `tls`'s CA and host name), then every write is sealed and the return
    /// path decrypted. This is the one place an outgoing migration channel gets TLS: every
    /// channel of a migration with `tls-creds` set goes through it. Socket channels only
    /// (`tcp:`, `unix:`, a socket `fd:`); `exec:` and a pipe `fd:` are refused.
    pub fn start_tls(self, tls: &ClientTls) -> Result<Outgoing, TransportError> {
        self.start_tls_inner(tls, &|| false)
    }

    /// [`start_tls`](Self::start_tls) that `cancel` interrupts while the destination does
    /// not answer the handshake (for the migration thread; [`TransportError::Cancelled`]).
    pub fn start_tls_cancellable(
        self,
        tls: &ClientTls,
        cancel: &ConnectCancel,
    ) -> Result<Outgoing, TransportError> {
        self.start_tls_inner(tls, &|| cancel.is_cancelled())
    }

    fn start_tls_inner(
        mut self,
        tls: &ClientTls,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<Outgoing, TransportError> {
        let sock: std::os::fd::OwnedFd = match std::mem::replace(&mut self.conn, Conn::Closed) {
            Conn::Tcp(s) => Arc::try_unwrap(s)
                .map_err(|_| TransportError::TlsUnsupported("shared"))?
                .into(),
            Conn::Unix(s) => Arc::try_unwrap(s)
                .map_err(|_| TransportError::TlsUnsupported("shared"))?
                .into(),
            Conn::Fd(f) if is_socket(f.as_raw_fd()) => Arc::try_unwrap(f)
                .map_err(|_| TransportError::TlsUnsupported("shared"))?
                .into(),
            Conn::Fd(_) => return Err(TransportError::TlsUnsupported("pipe or file fd:")),
            Conn::Exec { stdin, child } => {
                drop(stdin);
                child.abort();
                return Err(TransportError::TlsUnsupported("exec:"));
            }
            Conn::Tls(_) | Conn::Closed => return Err(TransportError::TlsUnsupported("closed")),
        };
        let channel = tls
            .connect_cancellable(sock, cancelled)
            .map_err(|e| match e {
                TlsError::Cancelled => TransportError::Cancelled,
                e => TransportError::Tls(e),
            })?;
        Ok(Outgoing {
            conn: Conn::Tls(channel),
            uri: self.uri.clone(),
            tls: Some(tls.clone()),
        })
    }

    /// Opens one more channel to this channel's destination (a multifd channel:
    /// [`connect_channel`]); on a TLS channel the new one runs its own handshake, with the
    /// same credentials and host name, before it is returned (QEMU's
    /// `multifd_tls_channel_connect`). `cancel` interrupts the connect and the handshake.
    pub fn open_channel(&self, cancel: &ConnectCancel) -> Result<ChannelStream, TransportError> {
        let plain = connect_channel(&self.uri, cancel)?;
        let Some(tls) = &self.tls else {
            return Ok(plain);
        };
        let sock: std::os::fd::OwnedFd = match plain {
            ChannelStream::Tcp(s) => s.into(),
            ChannelStream::Unix(s) => s.into(),
            ChannelStream::Tls { .. } => return Err(TransportError::TlsUnsupported("closed")),
        };
        let channel = tls
            .connect_cancellable(sock, &|| cancel.is_cancelled())
            .map_err(|e| match e {
                TlsError::Cancelled => TransportError::Cancelled,
                e => TransportError::Tls(e),
            })?;
        Ok(ChannelStream::tls(channel))
    }

    /// Whether this channel runs TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self.conn, Conn::Tls(_))
    }

    /// Shuts the channel down now (see [`ShutdownHandle::shutdown`]).
    pub fn shutdown(&self) -> Result<(), TransportError> {
        self.shutdown_handle().shutdown()
    }

    /// Whether the destination has gone away (closed or reset the connection, closed the
    /// pipe, or the `exec:` command exited). Never blocks; a false answer guarantees nothing.
    pub fn peer_gone(&self) -> bool {
        match &self.conn {
            Conn::Tcp(s) => fd_peer_gone(s.as_raw_fd()),
            Conn::Unix(s) => fd_peer_gone(s.as_raw_fd()),
            Conn::Fd(f) => fd_peer_gone(f.as_raw_fd()),
            Conn::Tls(t) => fd_peer_gone(t.raw_fd()),
            Conn::Exec { stdin, child } => {
                stdin.as_ref().is_none_or(|s| fd_peer_gone(s.as_raw_fd())) || child.exited()
            }
            Conn::Closed => true,
        }
    }

    /// Flushes and closes the channel. Sockets are shut down for writing so the destination
    /// sees the end of the stream; for `exec:` the command's stdin is closed, the command is
    /// waited for, and a non-zero exit is an error.
    pub fn finish(mut self) -> Result<(), TransportError> {
        self.flush().map_err(TransportError::Io)?;
        match std::mem::replace(&mut self.conn, Conn::Closed) {
            Conn::Tcp(s) => half_close(s.shutdown(std::net::Shutdown::Write)),
            Conn::Unix(s) => half_close(s.shutdown(std::net::Shutdown::Write)),
            Conn::Fd(_) | Conn::Closed => Ok(()),
            Conn::Tls(t) => {
                t.close_write().map_err(TransportError::Io)?;
                half_close(shutdown_fd(t.raw_fd(), libc::SHUT_WR))
            }
            Conn::Exec { stdin, child } => {
                drop(stdin);
                let status = child.wait().map_err(TransportError::Io)?;
                if status.success() {
                    Ok(())
                } else {
                    Err(TransportError::CommandFailed {
                        command: child.command().to_owned(),
                        status,
                    })
                }
            }
        }
    }
}

/// `shutdown(2)` on a descriptor the caller holds.
fn shutdown_fd(fd: RawFd, how: libc::c_int) -> io::Result<()> {
    // SAFETY: `fd` is borrowed from a live socket object of the caller; shutdown(2) does not
    // touch memory.
    if unsafe { libc::shutdown(fd, how) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn half_close(r: io::Result<()>) -> Result<(), TransportError> {
    match r {
        Err(e) if e.kind() != io::ErrorKind::NotConnected => Err(TransportError::Io(e)),
        _ => Ok(()),
    }
}

impl Write for Outgoing {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // `&TcpStream`, `&UnixStream` and `&File` implement Write; the Arcs are shared only
        // with shutdown handles (as Weak), which never write.
        match &mut self.conn {
            Conn::Tcp(s) => (&**s).write(buf),
            Conn::Unix(s) => (&**s).write(buf),
            Conn::Fd(f) => (&**f).write(buf),
            Conn::Tls(t) => TlsWriter(t.clone()).write(buf),
            Conn::Exec { stdin: Some(s), .. } => s.write(buf),
            Conn::Exec { stdin: None, .. } | Conn::Closed => Err(closed_error()),
        }
    }

    /// One `writev` for many pieces (RAM pages sent from guest memory in place).
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match &mut self.conn {
            Conn::Tcp(s) => (&**s).write_vectored(bufs),
            Conn::Unix(s) => (&**s).write_vectored(bufs),
            Conn::Fd(f) => (&**f).write_vectored(bufs),
            Conn::Tls(t) => TlsWriter(t.clone()).write_vectored(bufs),
            Conn::Exec { stdin: Some(s), .. } => s.write_vectored(bufs),
            Conn::Exec { stdin: None, .. } | Conn::Closed => Err(closed_error()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.conn {
            Conn::Tcp(s) => (&**s).flush(),
            Conn::Unix(s) => (&**s).flush(),
            Conn::Fd(f) => (&**f).flush(),
            Conn::Tls(t) => TlsWriter(t.clone()).flush(),
            Conn::Exec { stdin: Some(s), .. } => s.flush(),
            Conn::Exec { stdin: None, .. } | Conn::Closed => Ok(()),
        }
    }
}

fn closed_error() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "channel closed")
}

impl Drop for Outgoing {
    /// Without [`finish`](Outgoing::finish) the migration failed: shut sockets down so the
    /// destination notices even if a shutdown handle is alive, and stop an `exec:` command.
    fn drop(&mut self) {
        match std::mem::replace(&mut self.conn, Conn::Closed) {
            Conn::Tcp(s) => {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
            Conn::Unix(s) => {
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
            Conn::Tls(t) => {
                let _ = shutdown_fd(t.raw_fd(), libc::SHUT_RDWR);
            }
            Conn::Fd(_) | Conn::Closed => {}
            Conn::Exec { stdin, child } => {
                drop(stdin);
                child.abort();
            }
        }
    }
}

/// Whether `fd` is a socket.
fn is_socket(fd: RawFd) -> bool {
    // SAFETY: fstat only writes the stat buffer it is given; `fd` is borrowed from a live
    // object of the caller.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above; `st` is a valid stat buffer.
    let rc = unsafe { libc::fstat(fd, &mut st) };
    rc == 0 && st.st_mode & libc::S_IFMT == libc::S_IFSOCK
}

/// [`connect_outgoing`] that `cancel` can interrupt while a TCP destination does not answer,
/// for the migration thread (the monitor never waits for a connect).
pub fn connect_outgoing_cancellable(
    uri: &MigrationUri,
    cancel: &ConnectCancel,
) -> Result<Outgoing, TransportError> {
    if cancel.is_cancelled() {
        return Err(TransportError::Cancelled);
    }
    match uri {
        MigrationUri::Tcp { host, port } if !host.is_empty() => Ok(Outgoing {
            conn: Conn::Tcp(Arc::new(tcp::connect_cancellable(host, *port, cancel)?)),
            uri: uri.clone(),
            tls: None,
        }),
        _ => connect_outgoing(uri),
    }
}

/// Opens the outgoing channel for `uri`; `fd:` takes an inherited descriptor number only.
pub fn connect_outgoing(uri: &MigrationUri) -> Result<Outgoing, TransportError> {
    connect_outgoing_with(uri, None)
}

/// Opens the outgoing channel for `uri`, taking `fd:NAME` from `named` (the monitor).
pub fn connect_outgoing_with(
    uri: &MigrationUri,
    named: Option<&dyn NamedFds>,
) -> Result<Outgoing, TransportError> {
    let conn = match uri {
        MigrationUri::Tcp { host, port } => {
            if host.is_empty() {
                return Err(invalid(&uri.to_string(), "missing host"));
            }
            Conn::Tcp(Arc::new(tcp::connect(host, *port)?))
        }
        MigrationUri::Unix(path) => Conn::Unix(Arc::new(unix::connect(path)?)),
        MigrationUri::Exec(cmd) => {
            let (stdin, child) = exec::spawn_outgoing(cmd)?;
            Conn::Exec {
                stdin: Some(stdin),
                child: Arc::new(child),
            }
        }
        MigrationUri::Fd(n) => Conn::Fd(Arc::new(fd::resolve(n, named, fd::Access::Write)?)),
    };
    Ok(Outgoing {
        conn,
        uri: uri.clone(),
        tls: None,
    })
}

enum Listener {
    Tcp(TcpListener),
    Unix(unix::Listening),
    Exec(exec::ExecReader),
    Fd(File),
}

/// The incoming side of a migration, listening (or, for `exec:` and `fd:`, ready) until
/// [`accept`](Self::accept) is called.
pub struct Incoming {
    listener: Listener,
    uri: MigrationUri,
}

impl fmt::Debug for Incoming {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Incoming").field("uri", &self.uri).finish()
    }
}

/// Starts listening for `uri` at once: binds the TCP or Unix socket, starts the `exec:`
/// command, or checks and takes over the `fd:` descriptor (an inherited number only).
pub fn listen_incoming(uri: &MigrationUri) -> Result<Incoming, TransportError> {
    listen_incoming_with(uri, None)
}

/// [`listen_incoming`], taking `fd:NAME` from `named` (the monitor).
pub fn listen_incoming_with(
    uri: &MigrationUri,
    named: Option<&dyn NamedFds>,
) -> Result<Incoming, TransportError> {
    let listener = match uri {
        MigrationUri::Tcp { host, port } => Listener::Tcp(tcp::listen(host, *port)?),
        MigrationUri::Unix(path) => Listener::Unix(unix::listen(path)?),
        MigrationUri::Exec(cmd) => Listener::Exec(exec::spawn_incoming(cmd)?),
        MigrationUri::Fd(n) => Listener::Fd(fd::resolve(n, named, fd::Access::Read)?),
    };
    Ok(Incoming {
        listener,
        uri: uri.clone(),
    })
}

impl Incoming {
    /// The URI this side listens on.
    pub fn uri(&self) -> &MigrationUri {
        &self.uri
    }

    /// The bound address, for `tcp:` (useful with port 0).
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match &self.listener {
            Listener::Tcp(l) => l.local_addr().ok(),
            _ => None,
        }
    }

    /// Like [`accept`](Self::accept), with a channel back to the source where the transport
    /// has one (QEMU's return path: `tcp:`, `unix:` and a socket `fd:`).
    pub fn accept_channel(self) -> Result<IncomingChannel, TransportError> {
        Ok(match self.listener {
            Listener::Tcp(l) => {
                let s = l.accept().map_err(TransportError::Accept)?.0;
                let back = s.try_clone().ok();
                IncomingChannel {
                    input: Box::new(s),
                    return_path: back.map(|b| Box::new(b) as Box<dyn Write + Send>),
                }
            }
            Listener::Unix(l) => {
                let s = l.accept()?;
                let back = s.try_clone().ok();
                IncomingChannel {
                    input: Box::new(s),
                    return_path: back.map(|b| Box::new(b) as Box<dyn Write + Send>),
                }
            }
            Listener::Exec(r) => IncomingChannel {
                input: Box::new(r),
                return_path: None,
            },
            Listener::Fd(f) => {
                let back = if is_socket(f.as_raw_fd()) {
                    f.try_clone().ok()
                } else {
                    None
                };
                IncomingChannel {
                    input: Box::new(f),
                    return_path: back.map(|b| Box::new(b) as Box<dyn Write + Send>),
                }
            }
        })
    }

    /// [`accept_channel`](Self::accept_channel) with TLS when `tls` (asked once a source has
    /// connected, so `migrate-set-parameters` may come after the listen) returns a server
    /// configuration: the handshake runs on each connection (verifying the source's
    /// certificate when the credentials say so); a connection that fails it — a plaintext
    /// source, a certificate from another CA, an expired one — is refused with a message on
    /// standard error and the destination keeps listening (`tcp:` and `unix:`; a socket
    /// `fd:` has one connection, whose failure is the error). This is the one place an
    /// incoming migration channel gets TLS.
    pub fn accept_channel_tls(
        self,
        tls: &dyn Fn() -> Result<Option<ServerTls>, TlsError>,
    ) -> Result<IncomingChannel, TransportError> {
        let uri = self.uri.clone();
        let secure = IncomingChannel::accept_tls;
        match self.listener {
            Listener::Tcp(l) => loop {
                let (s, peer) = l.accept().map_err(TransportError::Accept)?;
                let Some(server) = tls().map_err(TransportError::Tls)? else {
                    return Ok(ChannelStream::Tcp(s).into_incoming());
                };
                match secure(s.into(), &server) {
                    Ok(c) => return Ok(c),
                    Err(e) => refused(&uri, &peer.to_string(), &e),
                }
            },
            Listener::Unix(l) => loop {
                let s = l.accept_one()?;
                let Some(server) = tls().map_err(TransportError::Tls)? else {
                    return Ok(ChannelStream::Unix(s).into_incoming());
                };
                match secure(s.into(), &server) {
                    Ok(c) => return Ok(c),
                    Err(e) => refused(&uri, "a local client", &e),
                }
            },
            listener => {
                let Some(server) = tls().map_err(TransportError::Tls)? else {
                    return Incoming { listener, uri }.accept_channel();
                };
                match listener {
                    Listener::Fd(f) if is_socket(f.as_raw_fd()) => {
                        secure(f.into(), &server).map_err(TransportError::Tls)
                    }
                    Listener::Fd(_) => Err(TransportError::TlsUnsupported("pipe or file fd:")),
                    _ => Err(TransportError::TlsUnsupported("exec:")),
                }
            }
        }
    }

    /// Waits for the source and returns the stream to read the migration from. For `exec:`
    /// the reader reports the command's failure when it reaches the end of its output.
    pub fn accept(self) -> Result<Box<dyn Read + Send>, TransportError> {
        Ok(match self.listener {
            Listener::Tcp(l) => Box::new(l.accept().map_err(TransportError::Accept)?.0),
            Listener::Unix(l) => Box::new(l.accept()?),
            Listener::Exec(r) => Box::new(r),
            Listener::Fd(f) => Box::new(f),
        })
    }
}

impl Incoming {
    /// Whether this transport can carry more than one channel (`tcp:`, `unix:`), as the
    /// `multifd` capability needs.
    pub fn multi_channel(&self) -> bool {
        matches!(self.listener, Listener::Tcp(_) | Listener::Unix(_))
    }

    /// Accepts one more connection on the listener without giving it up: the main channel
    /// and every multifd channel come in this way (the one place where a destination
    /// accepts a socket channel; `cancel` ends the wait). `exec:` and `fd:` have no
    /// listener: [`TransportError::MultiChannelUnsupported`].
    pub fn accept_stream(&self, cancel: &ConnectCancel) -> Result<ChannelStream, TransportError> {
        let fd = match &self.listener {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l) => l.raw_fd()?,
            _ => return Err(TransportError::MultiChannelUnsupported),
        };
        wait_readable(fd, cancel)?;
        match &self.listener {
            Listener::Tcp(l) => l
                .accept()
                .map(|(s, _)| ChannelStream::Tcp(s))
                .map_err(TransportError::Accept),
            Listener::Unix(l) => l.accept_one().map(ChannelStream::Unix),
            _ => Err(TransportError::MultiChannelUnsupported),
        }
    }
}

impl Incoming {
    /// [`accept_stream`](Self::accept_stream) with TLS when `tls` (asked once a source has
    /// connected) returns a server configuration: the server handshake runs on each accepted connection, and one that fails it (a plaintext
    /// source, a certificate from another CA…) is refused with a message on standard error
    /// while the destination keeps waiting, as for the main channel
    /// ([`accept_channel_tls`](Self::accept_channel_tls)) and as QEMU does for every
    /// incoming channel (`migration_tls_incoming_handshake` reports the error and drops the
    /// connection).
    pub fn accept_stream_tls(
        &self,
        cancel: &ConnectCancel,
        tls: &dyn Fn() -> Result<Option<ServerTls>, TlsError>,
    ) -> Result<ChannelStream, TransportError> {
        loop {
            let s = self.accept_stream(cancel)?;
            let Some(server) = tls().map_err(TransportError::Tls)? else {
                return Ok(s);
            };
            if let Ok(s) = s.accept_tls(&server, &self.uri) {
                return Ok(s);
            }
            if cancel.is_cancelled() {
                return Err(TransportError::Cancelled);
            }
        }
    }
}

/// Waits until `fd` is readable (a connection to accept) or `cancel` fires.
fn wait_readable(fd: RawFd, cancel: &ConnectCancel) -> Result<(), TransportError> {
    let mut fds = [
        libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: cancel.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        if cancel.is_cancelled() {
            return Err(TransportError::Cancelled);
        }
        // SAFETY: `fds` is a valid array of two pollfds for the duration of the call; both
        // descriptors belong to objects the caller borrows.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(TransportError::Accept(e));
        }
        if fds[1].revents != 0 || cancel.is_cancelled() {
            return Err(TransportError::Cancelled);
        }
        if fds[0].revents != 0 {
            return Ok(());
        }
    }
}

/// One socket channel of a migration (`tcp:` or `unix:`, in clear or under TLS): the main
/// channel or a multifd channel, as [`connect_channel`] / [`Outgoing::open_channel`] open it
/// and [`Incoming::accept_stream`] / [`Incoming::accept_stream_tls`] accept it.
#[derive(Debug)]
pub enum ChannelStream {
    /// A TCP connection.
    Tcp(TcpStream),
    /// A Unix stream socket.
    Unix(UnixStream),
    /// A TLS session over either. Writes are sealed in full records, batched as the main
    /// channel's are; `peeked` holds plaintext that [`peek`](Self::peek) read ahead (a TLS
    /// stream cannot be peeked at in the socket), which reads return first.
    Tls {
        /// The session.
        channel: Arc<TlsChannel>,
        /// Plaintext read ahead, not yet returned by `read`.
        peeked: Vec<u8>,
    },
}

impl ChannelStream {
    fn tls(channel: Arc<TlsChannel>) -> Self {
        Self::Tls {
            channel,
            peeked: Vec::new(),
        }
    }

    /// Whether the channel runs TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self, Self::Tls { .. })
    }

    /// Runs the server side of a TLS handshake on an accepted connection of the incoming
    /// migration on `uri` (≤ [`tls::HANDSHAKE_TIMEOUT`]). A connection that fails it (a
    /// plaintext source, a certificate from another CA…) is refused with a message on
    /// standard error, as for the main channel; the caller goes on waiting.
    pub fn accept_tls(self, server: &ServerTls, uri: &MigrationUri) -> Result<Self, TlsError> {
        let peer = match &self {
            Self::Tcp(t) => t
                .peer_addr()
                .map_or_else(|_| String::from("a TCP client"), |a| a.to_string()),
            _ => String::from("a local client"),
        };
        let sock: std::os::fd::OwnedFd = match self {
            Self::Tcp(t) => t.into(),
            Self::Unix(u) => u.into(),
            Self::Tls { .. } => return Ok(self),
        };
        server.accept(sock).map(Self::tls).inspect_err(|e| {
            refused(uri, &peer, e);
        })
    }

    /// A second handle on the same socket (to shut it down from another thread).
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(match self {
            Self::Tcp(s) => Self::Tcp(s.try_clone()?),
            Self::Unix(s) => Self::Unix(s.try_clone()?),
            Self::Tls { channel, .. } => Self::tls(channel.clone()),
        })
    }

    /// Shuts the socket down in both directions (a blocked read or write returns).
    pub fn shutdown(&self) {
        let _ = shutdown_socket(self.as_raw_fd());
    }

    /// Shuts the sending direction down: the peer reads the end of the stream.
    pub fn finish(&self) -> Result<(), TransportError> {
        half_close(match self {
            Self::Tcp(s) => s.shutdown(std::net::Shutdown::Write),
            Self::Unix(s) => s.shutdown(std::net::Shutdown::Write),
            Self::Tls { channel, .. } => {
                // close_notify first: the peer's reader sees a clean end of the stream.
                channel.close_write().map_err(TransportError::Io)?;
                shutdown_fd(channel.raw_fd(), libc::SHUT_WR)
            }
        })
    }

    /// Reads the first `buf.len()` bytes without consuming them; fewer if the peer closed.
    /// On a TLS channel they are decrypted and kept for the next reads.
    pub fn peek(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Self::Tls { channel, peeked } = self {
            let mut reader = TlsReader(channel.clone());
            while peeked.len() < buf.len() {
                let mut more = vec![0u8; buf.len() - peeked.len()];
                let n = loop {
                    match reader.read(&mut more) {
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        r => break r,
                    }
                };
                match n {
                    Ok(0) => break,
                    Ok(n) => peeked.extend_from_slice(&more[..n]),
                    // A peer gone before sending anything is "fewer bytes", as for a socket.
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
                    Err(e) => return Err(e),
                }
            }
            let n = peeked.len().min(buf.len());
            buf[..n].copy_from_slice(&peeked[..n]);
            return Ok(n);
        }
        loop {
            // SAFETY: `buf` is valid for writes of its length for the duration of the call;
            // the descriptor belongs to `self`.
            let rc = unsafe {
                libc::recv(
                    self.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_PEEK | libc::MSG_WAITALL,
                )
            };
            if rc >= 0 {
                return Ok(rc as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Bounds how long a read may wait (`None`: for ever).
    pub fn set_read_timeout(&self, t: Option<std::time::Duration>) -> io::Result<()> {
        match self {
            Self::Tcp(s) => s.set_read_timeout(t),
            Self::Unix(s) => s.set_read_timeout(t),
            Self::Tls { channel, .. } => channel.set_read_timeout(t),
        }
    }

    /// The main channel as an [`IncomingChannel`], with its return path.
    pub fn into_incoming(self) -> IncomingChannel {
        match self {
            Self::Tcp(s) => {
                let back = s.try_clone().ok();
                IncomingChannel {
                    input: Box::new(s),
                    return_path: back.map(|b| Box::new(b) as Box<dyn Write + Send>),
                }
            }
            Self::Unix(s) => {
                let back = s.try_clone().ok();
                IncomingChannel {
                    input: Box::new(s),
                    return_path: back.map(|b| Box::new(b) as Box<dyn Write + Send>),
                }
            }
            Self::Tls { channel, peeked } => IncomingChannel {
                input: Box::new(io::Cursor::new(peeked).chain(TlsReader(channel.clone()))),
                return_path: Some(Box::new(TlsWriter(channel))),
            },
        }
    }
}

impl AsRawFd for ChannelStream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Self::Tcp(s) => s.as_raw_fd(),
            Self::Unix(s) => s.as_raw_fd(),
            Self::Tls { channel, .. } => channel.raw_fd(),
        }
    }
}

impl Read for ChannelStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.read(buf),
            Self::Unix(s) => s.read(buf),
            Self::Tls { peeked, .. } if !peeked.is_empty() => {
                let n = peeked.len().min(buf.len());
                buf[..n].copy_from_slice(&peeked[..n]);
                peeked.drain(..n);
                Ok(n)
            }
            Self::Tls { channel, .. } => TlsReader(channel.clone()).read(buf),
        }
    }
}

impl Write for ChannelStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.write(buf),
            Self::Unix(s) => s.write(buf),
            Self::Tls { channel, .. } => TlsWriter(channel.clone()).write(buf),
        }
    }

    /// On TLS, the slices (a packet header, then its pages in place in guest memory) are
    /// sealed into full records, a batch at a time, as on the main channel.
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Self::Tcp(s) => s.write_vectored(bufs),
            Self::Unix(s) => s.write_vectored(bufs),
            Self::Tls { channel, .. } => TlsWriter(channel.clone()).write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Tls { channel, .. } => TlsWriter(channel.clone()).flush(),
            _ => Ok(()),
        }
    }
}

/// Opens one more channel to `uri` (a multifd channel: the same URI as the main channel).
/// The one place where a source connects a channel besides the main one; `exec:` and `fd:`
/// cannot: [`TransportError::MultiChannelUnsupported`].
pub fn connect_channel(
    uri: &MigrationUri,
    cancel: &ConnectCancel,
) -> Result<ChannelStream, TransportError> {
    if cancel.is_cancelled() {
        return Err(TransportError::Cancelled);
    }
    match uri {
        MigrationUri::Tcp { host, .. } if host.is_empty() => {
            Err(invalid(&uri.to_string(), "missing host"))
        }
        MigrationUri::Tcp { host, port } => Ok(ChannelStream::Tcp(tcp::connect_cancellable(
            host, *port, cancel,
        )?)),
        MigrationUri::Unix(path) => Ok(ChannelStream::Unix(unix::connect(path)?)),
        MigrationUri::Exec(_) | MigrationUri::Fd(_) => Err(TransportError::MultiChannelUnsupported),
    }
}

/// Whether `uri` can carry more than one channel (`tcp:`, `unix:`), as `multifd` needs.
pub fn supports_multi_channel(uri: &MigrationUri) -> bool {
    matches!(uri, MigrationUri::Tcp { .. } | MigrationUri::Unix(_))
}

/// A connection refused at the TLS handshake: said on standard error, as QEMU reports it.
fn refused(uri: &MigrationUri, peer: &str, e: &TlsError) {
    eprintln!(
        "hopvm: incoming migration on {uri}: refused a connection from {peer}: {e}; still \
         waiting"
    );
}

/// An accepted incoming migration: the stream, and the way back to the source if the
/// transport has one.
pub struct IncomingChannel {
    /// The migration stream.
    pub input: Box<dyn Read + Send>,
    /// Writes to the source (the return path), for two-way transports.
    pub return_path: Option<Box<dyn Write + Send>>,
}

impl IncomingChannel {
    /// Runs the server side of a TLS handshake on an accepted socket and returns the channel
    /// over it (the stream, and the return path in the same session). Every incoming
    /// migration channel with `tls-creds` set goes through here ([`Incoming::accept_channel_tls`]
    /// for the main one; a transport that accepts more channels on one listener, as multifd
    /// does, passes each accepted socket).
    pub fn accept_tls(
        sock: std::os::fd::OwnedFd,
        server: &ServerTls,
    ) -> Result<IncomingChannel, TlsError> {
        server.accept(sock).map(|t| IncomingChannel {
            input: Box::new(TlsReader(t.clone())),
            return_path: Some(Box::new(TlsWriter(t))),
        })
    }
}

impl fmt::Debug for IncomingChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IncomingChannel")
            .field("return_path", &self.return_path.is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::thread;

    fn uri(s: &str) -> MigrationUri {
        s.parse().unwrap()
    }

    #[test]
    fn channel_types_are_send() {
        fn send<T: Send>() {}
        send::<Outgoing>();
        send::<Incoming>();
        send::<ShutdownHandle>();
        fn sync<T: Sync>() {}
        sync::<ShutdownHandle>();
    }

    #[test]
    fn parse_and_display() {
        let cases = [
            (
                "tcp:localhost:4444",
                MigrationUri::Tcp {
                    host: "localhost".into(),
                    port: 4444,
                },
            ),
            (
                "tcp:0:4444",
                MigrationUri::Tcp {
                    host: "0".into(),
                    port: 4444,
                },
            ),
            (
                "tcp::4444",
                MigrationUri::Tcp {
                    host: "".into(),
                    port: 4444,
                },
            ),
            (
                "tcp:[::1]:4444",
                MigrationUri::Tcp {
                    host: "::1".into(),
                    port: 4444,
                },
            ),
            ("unix:/tmp/m.sock", MigrationUri::Unix("/tmp/m.sock".into())),
            (
                "exec:cat > /tmp/x",
                MigrationUri::Exec("cat > /tmp/x".into()),
            ),
            ("fd:3", MigrationUri::Fd("3".into())),
            ("fd:migrate", MigrationUri::Fd("migrate".into())),
        ];
        for (s, expect) in cases {
            let parsed = uri(s);
            assert_eq!(parsed, expect, "{s}");
            assert_eq!(parsed.to_string(), s);
            assert_eq!(uri(&parsed.to_string()), parsed);
        }
    }

    #[test]
    fn malformed_uris() {
        let cases = [
            ("", "empty"),
            ("tcp:", "missing host and port"),
            ("tcp:host", "missing port"),
            ("tcp:host:", "missing port"),
            ("tcp:host:notaport", "port is not a number"),
            ("tcp:host:-1", "port is not a number"),
            ("tcp:host:65536", "port out of range"),
            ("tcp:::1:4444", "ipv6 addresses need brackets"),
            ("tcp:[::1", "unterminated ipv6 address"),
            ("tcp:[::1]", "missing port"),
            ("tcp:[]:1", "empty ipv6 address"),
            ("unix:", "missing path"),
            ("exec:", "missing command"),
            ("exec:   ", "missing command"),
            ("fd:", "missing descriptor name"),
            ("fd:3abc", "a descriptor name must not start with a digit"),
            ("fd:99999999999", "descriptor out of range"),
        ];
        for (s, reason) in cases {
            match s.parse::<MigrationUri>() {
                Err(TransportError::InvalidUri { uri, reason: r }) => {
                    assert_eq!(uri, s);
                    assert_eq!(r, reason, "{s}");
                }
                other => panic!("{s}: {other:?}"),
            }
        }
        for s in ["bogus:x", "TCP:a:1", "file:/x", "rdma:a:1", "x"] {
            let err = s.parse::<MigrationUri>().unwrap_err();
            assert_eq!(err.to_string(), format!("unknown migration protocol: {s}"));
        }
        let err = "tcp:host".parse::<MigrationUri>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid migration uri \"tcp:host\": missing port"
        );
    }

    fn round_trip(listen: &MigrationUri, connect: &MigrationUri) {
        let incoming = listen_incoming(listen).unwrap();
        let payload: Vec<u8> = (0..300_000u32).map(|i| (i * 7) as u8).collect();
        let expect = payload.clone();
        let connect = connect.clone();
        let sender = thread::spawn(move || {
            let mut out = connect_outgoing(&connect).unwrap();
            assert!(!out.peer_gone());
            out.write_all(&payload).unwrap();
            out.finish().unwrap();
        });
        let mut r = incoming.accept().unwrap();
        let mut got = Vec::new();
        r.read_to_end(&mut got).unwrap();
        sender.join().unwrap();
        assert_eq!(got.len(), expect.len());
        assert!(got == expect);
    }

    #[test]
    fn tcp_round_trip() {
        // Bind port 0 to find a free port, then listen on it with the any-address form.
        let l = listen_incoming(&uri("tcp:127.0.0.1:0")).unwrap();
        let port = l.local_addr().unwrap().port();
        assert_ne!(port, 0);
        drop(l);
        round_trip(
            &uri(&format!("tcp:0:{port}")),
            &uri(&format!("tcp:127.0.0.1:{port}")),
        );
        round_trip(
            &uri(&format!("tcp::{port}")),
            &uri(&format!("tcp:localhost:{port}")),
        );
    }

    #[test]
    fn tcp_any_address_forms() {
        for host in ["", "0"] {
            let l = listen_incoming(&uri(&format!("tcp:{host}:0"))).unwrap();
            let addr = l.local_addr().unwrap();
            assert!(addr.ip().is_unspecified(), "{addr}");
        }
        assert!(matches!(
            connect_outgoing(&uri("tcp::4444")),
            Err(TransportError::InvalidUri { .. })
        ));
    }

    #[test]
    fn tcp_ipv6_round_trip() {
        let Ok(l) = listen_incoming(&uri("tcp:[::1]:0")) else {
            eprintln!("no ipv6 loopback here; skipped");
            return;
        };
        let port = l.local_addr().unwrap().port();
        let payload = b"over ipv6".to_vec();
        let sender = thread::spawn(move || {
            let mut out = connect_outgoing(&uri(&format!("tcp:[::1]:{port}"))).unwrap();
            out.write_all(&payload).unwrap();
            out.finish().unwrap();
        });
        let mut got = Vec::new();
        l.accept().unwrap().read_to_end(&mut got).unwrap();
        sender.join().unwrap();
        assert_eq!(got, b"over ipv6");
    }

    #[test]
    fn tcp_errors() {
        // Nobody listens on a port we just released.
        let l = listen_incoming(&uri("tcp:127.0.0.1:0")).unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let err = connect_outgoing(&uri(&format!("tcp:127.0.0.1:{port}"))).unwrap_err();
        assert!(matches!(err, TransportError::Connect { .. }), "{err}");
        // A port in use.
        let l = listen_incoming(&uri("tcp:127.0.0.1:0")).unwrap();
        let port = l.local_addr().unwrap().port();
        let err = listen_incoming(&uri(&format!("tcp:127.0.0.1:{port}"))).unwrap_err();
        assert!(matches!(err, TransportError::Listen { .. }), "{err}");
    }

    #[test]
    fn tcp_peer_death_and_shutdown() {
        let l = listen_incoming(&uri("tcp:127.0.0.1:0")).unwrap();
        let port = l.local_addr().unwrap().port();
        let mut out = connect_outgoing(&uri(&format!("tcp:127.0.0.1:{port}"))).unwrap();
        let reader = l.accept().unwrap();
        assert!(!out.peer_gone());
        drop(reader);
        let mut gone = false;
        for _ in 0..200 {
            if out.peer_gone() {
                gone = true;
                break;
            }
            thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(gone, "peer death not noticed");
        // Writes eventually fail rather than block or succeed forever.
        let chunk = vec![0u8; 64 * 1024];
        let mut failed = false;
        for _ in 0..1000 {
            if out.write_all(&chunk).is_err() {
                failed = true;
                break;
            }
        }
        assert!(failed);

        // Shutdown from another thread unblocks a writer stuck on a peer that reads nothing.
        let l = listen_incoming(&uri("tcp:127.0.0.1:0")).unwrap();
        let port = l.local_addr().unwrap().port();
        let mut out = connect_outgoing(&uri(&format!("tcp:127.0.0.1:{port}"))).unwrap();
        let _reader = l.accept().unwrap();
        let handle = out.shutdown_handle();
        let writer = thread::spawn(move || {
            let chunk = vec![0u8; 1 << 20];
            loop {
                if let Err(e) = out.write_all(&chunk) {
                    return e;
                }
            }
        });
        thread::sleep(std::time::Duration::from_millis(100));
        handle.shutdown().unwrap();
        let err = writer.join().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe, "{err}");
        // The channel is gone now; the handle does nothing.
        handle.shutdown().unwrap();
    }

    #[test]
    fn unix_round_trip() {
        let dir = std::env::temp_dir().join(format!("hopvm-mig-unix-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.sock");
        // A stale socket file from an earlier run is replaced.
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let u = MigrationUri::Unix(path.clone());
        round_trip(&u, &u);
        assert!(!path.exists(), "socket file left behind");
        // A regular file is not replaced.
        std::fs::write(&path, b"keep").unwrap();
        assert!(matches!(
            listen_incoming(&u),
            Err(TransportError::Listen { .. })
        ));
        assert_eq!(std::fs::read(&path).unwrap(), b"keep");
        // Nobody listening.
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            connect_outgoing(&u),
            Err(TransportError::Connect { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn exec_round_trip() {
        let dir = std::env::temp_dir().join(format!("hopvm-mig-exec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("stream");
        let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let mut out = connect_outgoing(&uri(&format!("exec:cat > '{}'", file.display()))).unwrap();
        out.write_all(&payload).unwrap();
        out.finish().unwrap();
        let incoming = listen_incoming(&uri(&format!("exec:cat '{}'", file.display()))).unwrap();
        let mut got = Vec::new();
        incoming.accept().unwrap().read_to_end(&mut got).unwrap();
        assert!(got == payload);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn exec_failures() {
        // Outgoing: the command fails; finish reports its status.
        let mut out = connect_outgoing(&uri("exec:exit 3")).unwrap();
        let _ = out.write_all(&[0u8; 1 << 20]);
        match out.finish() {
            Err(TransportError::CommandFailed { command, status }) => {
                assert_eq!(command, "exit 3");
                assert_eq!(status.code(), Some(3));
            }
            Err(TransportError::Io(e)) => assert_eq!(e.kind(), io::ErrorKind::BrokenPipe),
            other => panic!("{other:?}"),
        }
        // A command that stops reading: peer death is noticed.
        let out = connect_outgoing(&uri("exec:true")).unwrap();
        let mut gone = false;
        for _ in 0..400 {
            if out.peer_gone() {
                gone = true;
                break;
            }
            thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(gone);
        drop(out);
        // Incoming: the command's failure surfaces at the end of its output.
        let incoming = listen_incoming(&uri("exec:printf abc; exit 4")).unwrap();
        let mut r = incoming.accept().unwrap();
        let mut got = Vec::new();
        let err = r.read_to_end(&mut got).unwrap_err();
        assert_eq!(got, b"abc");
        assert!(err.to_string().contains("exit status: 4"), "{err}");
        // Cancelling kills a command that never reads.
        let out = connect_outgoing(&uri("exec:exec sleep 30")).unwrap();
        let h = out.shutdown_handle();
        let start = std::time::Instant::now();
        h.shutdown().unwrap();
        match out.finish() {
            Err(TransportError::CommandFailed { status, .. }) => assert!(!status.success()),
            other => panic!("{other:?}"),
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(10));
        // Dropping an unfinished outgoing exec does not hang on a command that never exits.
        let out = connect_outgoing(&uri("exec:exec sleep 30")).unwrap();
        let start = std::time::Instant::now();
        drop(out);
        assert!(start.elapsed() < std::time::Duration::from_secs(10));
        // And dropping an incoming reader early stops its command.
        let incoming = listen_incoming(&uri("exec:exec sleep 30")).unwrap();
        let r = incoming.accept().unwrap();
        let start = std::time::Instant::now();
        drop(r);
        assert!(start.elapsed() < std::time::Duration::from_secs(10));
    }

    fn pipe() -> (File, File) {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
        assert_eq!(rc, 0);
        // SAFETY: pipe2 just created both descriptors and nothing else owns them.
        unsafe {
            use std::os::fd::FromRawFd;
            (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1]))
        }
    }

    /// A monitor's `getfd` table, for the tests.
    struct Named(std::sync::Mutex<std::collections::BTreeMap<String, std::os::fd::OwnedFd>>);

    impl Named {
        fn new(fds: Vec<(&str, std::os::fd::OwnedFd)>) -> Self {
            Named(std::sync::Mutex::new(
                fds.into_iter().map(|(n, f)| (n.to_owned(), f)).collect(),
            ))
        }
    }

    impl NamedFds for Named {
        fn take_fd(&self, name: &str) -> Option<std::os::fd::OwnedFd> {
            vmm_sync::lock(&self.0).remove(name)
        }
    }

    fn fd_uri(name: &str) -> MigrationUri {
        MigrationUri::Fd(name.to_owned())
    }

    #[test]
    fn fd_round_trip() {
        let (r, w) = pipe();
        let named = Named::new(vec![("in", r.into()), ("out", w.into())]);
        let incoming = listen_incoming_with(&fd_uri("in"), Some(&named)).unwrap();
        let mut out = connect_outgoing_with(&fd_uri("out"), Some(&named)).unwrap();
        let reader = thread::spawn(move || {
            let mut data = Vec::new();
            incoming.accept().unwrap().read_to_end(&mut data).unwrap();
            data
        });
        out.write_all(b"QEVM stream").unwrap();
        out.finish().unwrap();
        assert_eq!(reader.join().unwrap(), b"QEVM stream");
    }

    #[test]
    fn fd_errors() {
        let (r, w) = pipe();
        // hopvm's own descriptors (here: a pipe this process made) are never `fd:N` targets.
        let own = w.as_raw_fd();
        let err = connect_outgoing(&fd_uri(&own.to_string())).unwrap_err();
        assert!(
            matches!(err, TransportError::FdNotHandedOver(n) if n == own),
            "{err}"
        );
        let err = listen_incoming(&fd_uri("nosuch")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "File descriptor named 'nosuch' has not been found"
        );
        // Wrong direction: a write end cannot be the incoming side.
        let named = Named::new(vec![("w", w.into()), ("r", r.into())]);
        let err = listen_incoming_with(&fd_uri("w"), Some(&named)).unwrap_err();
        assert!(err.to_string().contains("not open for reading"), "{err}");
        let out = connect_outgoing_with(&fd_uri("r"), Some(&named));
        assert!(out
            .unwrap_err()
            .to_string()
            .contains("not open for writing"));
        let (_r2, w2) = pipe();
        let named = Named::new(vec![("w", w2.into())]);
        let out = connect_outgoing_with(&fd_uri("w"), Some(&named)).unwrap();
        // A pipe cannot be shut down.
        assert!(matches!(out.shutdown(), Err(TransportError::Shutdown(_))));
        drop(out);
    }

    #[test]
    fn fd_socket_shutdown_and_peer_death() {
        let (a, b) = UnixStream::pair().unwrap();
        let named = Named::new(vec![("sock", a.into())]);
        let out = connect_outgoing_with(&fd_uri("sock"), Some(&named)).unwrap();
        assert!(!out.peer_gone());
        drop(b);
        assert!(out.peer_gone());
        out.shutdown().unwrap();
    }

    mod tls_channels {
        use super::*;
        use crate::transport::tls::test_certs::Ca;
        use crate::transport::tls::{Endpoint, TlsCredsX509};

        struct Dirs {
            root: PathBuf,
        }

        impl Dirs {
            fn new(name: &str) -> Self {
                let root =
                    std::env::temp_dir().join(format!("hopvm-tls-{name}-{}", std::process::id()));
                let _ = std::fs::remove_dir_all(&root);
                std::fs::create_dir_all(&root).unwrap();
                Self { root }
            }
            fn path(&self, p: &str) -> PathBuf {
                self.root.join(p)
            }
            /// A CA with a destination directory `dst` for `names` and a source directory
            /// `src` signed by it.
            fn credentials(&self, names: &[&str]) -> Ca {
                let ca = Ca::new("ca");
                ca.server_dir(&self.path("dst"), names, false);
                ca.client_dir(&self.path("src"), false);
                ca
            }
        }

        impl Drop for Dirs {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.root);
            }
        }

        fn server(dir: &std::path::Path) -> ServerTls {
            TlsCredsX509::load("s", dir, Endpoint::Server, true)
                .unwrap()
                .server()
                .unwrap()
        }

        fn client(dir: &std::path::Path, host: &str) -> ClientTls {
            TlsCredsX509::load("c", dir, Endpoint::Client, true)
                .unwrap()
                .client(Some(host))
                .unwrap()
        }

        /// A listener whose accept loop reads `len` bytes, answers on the return path, then
        /// reads to the end; reports the payload (or its error).
        fn destination(
            server: ServerTls,
            len: usize,
        ) -> (u16, thread::JoinHandle<Result<Vec<u8>, TransportError>>) {
            let l = listen_incoming(&uri("tcp:127.0.0.1:0")).unwrap();
            let port = l.local_addr().unwrap().port();
            let h = thread::spawn(move || {
                let mut ch = l.accept_channel_tls(&|| Ok(Some(server.clone())))?;
                // Small reads: records pile up in rustls' buffers and must still come out,
                // before the source has closed anything.
                let mut got = Vec::new();
                let mut buf = [0u8; 1000];
                while got.len() < len {
                    let want = (len - got.len()).min(buf.len());
                    match ch
                        .input
                        .read(&mut buf[..want])
                        .map_err(TransportError::Io)?
                    {
                        0 => break,
                        n => got.extend_from_slice(&buf[..n]),
                    }
                }
                let back = ch.return_path.as_mut().unwrap();
                back.write_all(b"verdict").map_err(TransportError::Io)?;
                back.flush().map_err(TransportError::Io)?;
                ch.input.read_to_end(&mut got).map_err(TransportError::Io)?;
                Ok(got)
            });
            (port, h)
        }

        fn tcp_to(port: u16) -> MigrationUri {
            uri(&format!("tcp:127.0.0.1:{port}"))
        }

        #[test]
        fn tls_round_trip_with_return_path() {
            let d = Dirs::new("rt");
            d.credentials(&["localhost", "127.0.0.1"]);
            let payload: Vec<u8> = (0..8u32 << 20)
                .map(|i| (i * 31 + (i >> 13)) as u8)
                .collect();
            let (port, dst) = destination(server(&d.path("dst")), payload.len());
            let out = connect_outgoing(&tcp_to(port)).unwrap();
            let mut out = out.start_tls(&client(&d.path("src"), "localhost")).unwrap();
            assert!(out.is_tls());
            let mut back = out.return_path().unwrap();
            // A reader blocked on the return path while the writer sends 8 MiB; the verdict
            // comes only once the destination has every byte, before the source closes.
            let (verdict_tx, verdict) = std::sync::mpsc::channel();
            thread::spawn(move || {
                let mut v = [0u8; 7];
                let _ = verdict_tx.send(back.read_exact(&mut v).map(|()| v));
            });
            let halves = payload.split_at(3 << 20);
            out.write_all(halves.0).unwrap();
            // The rest as the migration thread writes: many slices (pages, headers, empty
            // ones), more than one batch per call.
            let sizes = [4096usize, 0, 1, 4095, 17, 65536, 8];
            let mut slices = Vec::new();
            let (mut at, mut k) = (0, 0);
            while at < halves.1.len() {
                let n = sizes[k % sizes.len()].min(halves.1.len() - at);
                slices.push(io::IoSlice::new(&halves.1[at..at + n]));
                at += n;
                k += 1;
            }
            let n = out.write_vectored(&slices).unwrap();
            assert_eq!(n, halves.1.len());
            out.flush().unwrap();
            let v = verdict
                .recv_timeout(std::time::Duration::from_secs(60))
                .expect("no verdict: the stream's end is stuck in the destination's TLS buffers");
            assert_eq!(&v.unwrap(), b"verdict");
            out.finish().unwrap();
            let got = dst.join().unwrap().unwrap();
            assert!(got == payload, "payload differs");
        }

        /// A destination that refuses one connection keeps listening for the right one.
        fn refused_then_accepted(d: &Dirs, bad: impl FnOnce(&Ca, u16) -> String, expect: &str) {
            let ca = d.credentials(&["localhost"]);
            let (port, dst) = destination(server(&d.path("dst")), 17);
            let err = bad(&ca, port);
            assert!(err.contains(expect), "{err}");
            let out = connect_outgoing(&tcp_to(port)).unwrap();
            let mut out = out.start_tls(&client(&d.path("src"), "localhost")).unwrap();
            out.write_all(b"after the refusal").unwrap();
            out.finish().unwrap();
            assert_eq!(dst.join().unwrap().unwrap(), b"after the refusal");
        }

        /// Sends through `out` until the destination's refusal surfaces; its error text.
        fn write_until_refused(mut out: Outgoing) -> String {
            let chunk = vec![7u8; 64 << 10];
            for _ in 0..10_000 {
                if let Err(e) = out.write_all(&chunk).and_then(|()| out.flush()) {
                    return e.to_string();
                }
            }
            panic!("the destination accepted the stream")
        }

        /// A source with the client certificate in `dir`, refused by the destination: its
        /// handshake or its first writes fail.
        fn rogue_source(dir: &std::path::Path, port: u16) -> String {
            let rogue = TlsCredsX509::load("r", dir, Endpoint::Client, false)
                .unwrap()
                .client(Some("localhost"))
                .unwrap();
            match connect_outgoing(&tcp_to(port)).unwrap().start_tls(&rogue) {
                Err(e) => e.to_string(),
                Ok(out) => write_until_refused(out),
            }
        }

        #[test]
        fn tls_refusals() {
            // A client certificate from another CA: the destination refuses it; the source's
            // write fails naming the alert.
            let d = Dirs::new("otherca");
            refused_then_accepted(
                &d,
                |_, port| {
                    Ca::new("other").client_dir(&d.path("rogue"), false);
                    rogue_source(&d.path("rogue"), port)
                },
                "UnknownCA",
            );
            // An expired client certificate from the right CA.
            let d = Dirs::new("expired");
            refused_then_accepted(
                &d,
                |ca, port| {
                    ca.client_dir(&d.path("rogue"), true);
                    rogue_source(&d.path("rogue"), port)
                },
                "CertificateExpired",
            );
            // A plaintext source: the destination refuses it, the source's stream fails.
            let d = Dirs::new("plain");
            refused_then_accepted(
                &d,
                |_, port| write_until_refused(connect_outgoing(&tcp_to(port)).unwrap()),
                "",
            );
        }

        #[test]
        fn tls_source_checks_the_destination() {
            let d = Dirs::new("srccheck");
            let ca = Ca::new("ca");
            ca.client_dir(&d.path("src"), false);
            let cases = [
                (
                    "wronghost",
                    &["elsewhere"][..],
                    false,
                    "not valid for name \"localhost\"",
                ),
                ("expired", &["localhost"][..], true, "expired"),
            ];
            for (name, names, expired, expect) in cases {
                ca.server_dir(&d.path(name), names, expired);
                let l = listen_incoming(&uri("tcp:127.0.0.1:0")).unwrap();
                let port = l.local_addr().unwrap().port();
                let srv = server(&d.path(name));
                let dst = thread::spawn(move || {
                    l.accept_channel_tls(&|| Ok(Some(srv.clone()))).map(drop)
                });
                let out = connect_outgoing(&tcp_to(port)).unwrap();
                let err = out
                    .start_tls(&client(&d.path("src"), "localhost"))
                    .unwrap_err()
                    .to_string();
                assert!(err.contains(expect), "{name}: {err}");
                // The destination saw the source hang up and goes on listening: connect a
                // plaintext peer to end its accept loop (it is refused too, then EOF).
                drop(connect_outgoing(&tcp_to(port)).unwrap());
                assert!(!dst.is_finished() || dst.join().is_ok());
            }
            // Another CA for the destination's certificate.
            Ca::new("other").server_dir(&d.path("other"), &["localhost"], false);
            let l = listen_incoming(&uri("tcp:127.0.0.1:0")).unwrap();
            let port = l.local_addr().unwrap().port();
            let srv = server(&d.path("other"));
            thread::spawn(move || l.accept_channel_tls(&|| Ok(Some(srv.clone()))).map(drop));
            let err = connect_outgoing(&tcp_to(port))
                .unwrap()
                .start_tls(&client(&d.path("src"), "localhost"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("UnknownIssuer"), "{err}");
            assert!(
                err.starts_with("TLS handshake failed: invalid peer certificate"),
                "{err}"
            );
        }

        /// `migrate_cancel` on a TLS channel: a writer blocked on a destination that reads
        /// nothing is unblocked by the shutdown handle, and the destination's death is seen.
        #[test]
        fn tls_shutdown_and_peer_death() {
            let d = Dirs::new("shutdown");
            d.credentials(&["localhost"]);
            let l = listen_incoming(&uri("tcp:127.0.0.1:0")).unwrap();
            let port = l.local_addr().unwrap().port();
            let srv = server(&d.path("dst"));
            let (held_tx, held) = std::sync::mpsc::channel();
            let dst = thread::spawn(move || {
                let ch = l.accept_channel_tls(&|| Ok(Some(srv.clone()))).unwrap();
                // Hold the channel without reading until told.
                let _ = held.recv();
                drop(ch);
            });
            let mut out = connect_outgoing(&tcp_to(port))
                .unwrap()
                .start_tls(&client(&d.path("src"), "localhost"))
                .unwrap();
            let handle = out.shutdown_handle();
            let writer = thread::spawn(move || {
                let chunk = vec![0u8; 1 << 20];
                loop {
                    if let Err(e) = out.write_all(&chunk) {
                        return (e, out);
                    }
                }
            });
            thread::sleep(std::time::Duration::from_millis(100));
            handle.shutdown().unwrap();
            let (err, out) = writer.join().unwrap();
            assert_eq!(err.kind(), io::ErrorKind::BrokenPipe, "{err}");
            assert!(out.is_tls());
            drop(out);
            // The handle outlives the channel and does nothing then.
            handle.shutdown().unwrap();
            held_tx.send(()).unwrap();
            dst.join().unwrap();

            // A destination that goes away is noticed without writing.
            let l = listen_incoming(&uri("tcp:127.0.0.1:0")).unwrap();
            let port = l.local_addr().unwrap().port();
            let srv = server(&d.path("dst"));
            let (go_tx, go) = std::sync::mpsc::channel();
            let dst = thread::spawn(move || {
                let ch = l.accept_channel_tls(&|| Ok(Some(srv.clone()))).unwrap();
                let _ = go.recv();
                drop(ch);
            });
            let out = connect_outgoing(&tcp_to(port))
                .unwrap()
                .start_tls(&client(&d.path("src"), "localhost"))
                .unwrap();
            assert!(!out.peer_gone());
            go_tx.send(()).unwrap();
            dst.join().unwrap();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while !out.peer_gone() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "peer death not noticed"
                );
                thread::sleep(std::time::Duration::from_millis(5));
            }
        }

        /// `migrate_cancel` while the destination accepted the connection but never answers
        /// the handshake: the source gives up at once, not at the handshake timeout.
        #[test]
        fn tls_handshake_is_cancellable() {
            let d = Dirs::new("hscancel");
            Ca::new("ca").client_dir(&d.path("src"), false);
            let silent = TcpListener::bind("127.0.0.1:0").unwrap();
            let port = silent.local_addr().unwrap().port();
            let out = connect_outgoing(&tcp_to(port)).unwrap();
            let _peer = silent.accept().unwrap();
            let cancel = Arc::new(ConnectCancel::new().unwrap());
            let c = Arc::clone(&cancel);
            let start = std::time::Instant::now();
            let canceller = thread::spawn(move || {
                thread::sleep(std::time::Duration::from_millis(300));
                c.cancel();
            });
            let err = out
                .start_tls_cancellable(&client(&d.path("src"), "localhost"), &cancel)
                .unwrap_err();
            canceller.join().unwrap();
            assert!(matches!(err, TransportError::Cancelled), "{err}");
            assert!(
                start.elapsed() < tls::HANDSHAKE_TIMEOUT / 2,
                "{:?}",
                start.elapsed()
            );
        }

        #[test]
        fn tls_credentials_errors() {
            let d = Dirs::new("creds");
            let ca = Ca::new("ca");
            ca.server_dir(&d.path("dst"), &["localhost"], false);
            let s = TlsCredsX509::parse_object(&format!(
                "tls-creds-x509,id=t0,dir={},endpoint=server",
                d.path("dst").display()
            ))
            .unwrap();
            assert_eq!(
                (s.id(), s.endpoint(), s.verify_peer()),
                ("t0", Endpoint::Server, true)
            );
            assert_eq!(
                s.client(Some("h")).unwrap_err().to_string(),
                "Expecting TLS credentials with a client endpoint"
            );
            // A client object in a directory without client certificates is fine (QEMU's
            // client certificate is optional); one without a CA is not.
            let c = TlsCredsX509::parse_object(&format!(
                "tls-creds-x509,id=c,dir={},endpoint=client,verify-peer=off",
                d.path("dst").display()
            ))
            .unwrap();
            assert_eq!(
                c.server().unwrap_err().to_string(),
                "Expecting TLS credentials with a server endpoint"
            );
            assert_eq!(
                c.client(None).unwrap_err().to_string(),
                "No hostname available for TLS"
            );
            let err = TlsCredsX509::parse_object(&format!(
                "tls-creds-x509,id=c,dir={}",
                d.path("nowhere").display()
            ))
            .unwrap_err()
            .to_string();
            assert!(err.starts_with("Unable to access credentials"), "{err}");
            assert!(err.contains("ca-cert.pem"), "{err}");
            for bad in [
                "tls-creds-x509,dir=/x",
                "tls-creds-x509,id=x",
                "tls-creds-psk,id=x,dir=/x",
                "tls-creds-x509,id=x,dir=/x,endpoint=middle",
                "tls-creds-x509,id=x,dir=/x,verify-peer=maybe",
                "tls-creds-x509,id=x,dir=/x,colour=red",
            ] {
                assert!(TlsCredsX509::parse_object(bad).is_err(), "{bad}");
            }
            // A key that is not PEM.
            std::fs::write(d.path("dst").join("server-key.pem"), "junk").unwrap();
            let err = TlsCredsX509::load("x", &d.path("dst"), Endpoint::Server, true)
                .unwrap_err()
                .to_string();
            assert!(err.contains("server-key.pem"), "{err}");
        }

        /// Multifd channels over TLS: a TLS main channel opens further channels that run
        /// their own handshake (same credentials, same host name); the destination's accept
        /// refuses a plaintext connection and goes on, and peeking at a TLS channel's first
        /// bytes leaves them for the reads.
        #[test]
        fn tls_extra_channels_handshake_and_peek() {
            let d = Dirs::new("channels");
            d.credentials(&["localhost"]);
            let l = listen_incoming(&uri("tcp:127.0.0.1:0")).unwrap();
            let port = l.local_addr().unwrap().port();
            let srv = server(&d.path("dst"));
            let dst = thread::spawn(move || {
                let cancel = ConnectCancel::new().unwrap();
                let tls = || Ok(Some(srv.clone()));
                // Each accepted and told apart first, then read to the end.
                let mut streams = Vec::new();
                for _ in 0..3 {
                    let mut s = l.accept_stream_tls(&cancel, &tls).unwrap();
                    assert!(s.is_tls());
                    let mut magic = [0u8; 4];
                    assert_eq!(s.peek(&mut magic).unwrap(), 4);
                    streams.push((magic, s));
                }
                let mut got = Vec::new();
                for (magic, mut s) in streams {
                    let mut all = Vec::new();
                    if &magic == b"QEVM" {
                        let mut ch = s.into_incoming();
                        ch.input.read_to_end(&mut all).unwrap();
                    } else {
                        s.read_to_end(&mut all).unwrap();
                    }
                    assert_eq!(&all[..4], &magic);
                    got.push(all);
                }
                got
            });
            let tcp = tcp_to(port);
            let tcp = match tcp {
                MigrationUri::Tcp { port, .. } => MigrationUri::Tcp {
                    host: String::from("localhost"),
                    port,
                },
                u => u,
            };
            let mut main = connect_outgoing(&tcp)
                .unwrap()
                .start_tls(&client(&d.path("src"), "localhost"))
                .unwrap();
            main.write_all(b"QEVM main channel").unwrap();
            main.flush().unwrap();
            // A plaintext connection in between: refused, the destination keeps accepting.
            drop(connect_outgoing(&tcp).unwrap());
            let cancel = ConnectCancel::new().unwrap();
            let mut extra = Vec::new();
            for i in 0..2u8 {
                let mut c = main.open_channel(&cancel).unwrap();
                assert!(c.is_tls());
                // Both slices in one call, sealed together.
                let n = c
                    .write_vectored(&[
                        io::IoSlice::new(&[0x11, 0x22, 0x33, 0x44]),
                        io::IoSlice::new(&[i; 5000]),
                    ])
                    .unwrap();
                assert_eq!(n, 5004);
                c.flush().unwrap();
                extra.push(c);
            }
            main.finish().unwrap();
            for c in &extra {
                c.finish().unwrap();
            }
            let got = dst.join().unwrap();
            assert_eq!(got.len(), 3);
            assert_eq!(got[0], b"QEVM main channel");
            for (i, g) in got[1..].iter().enumerate() {
                assert_eq!(g.len(), 5004);
                assert!(g[4..].iter().all(|b| *b == i as u8));
            }
            // A plaintext main channel opens plaintext channels.
            let l = listen_incoming(&uri("tcp:127.0.0.1:0")).unwrap();
            let plain = connect_outgoing(&tcp_to(l.local_addr().unwrap().port())).unwrap();
            assert!(!plain.open_channel(&cancel).unwrap().is_tls());
        }

        #[test]
        fn tls_refused_on_exec_and_pipes() {
            let d = Dirs::new("exec");
            let ca = Ca::new("ca");
            ca.client_dir(&d.path("src"), false);
            let out = connect_outgoing(&uri("exec:cat > /dev/null")).unwrap();
            let err = out.start_tls(&client(&d.path("src"), "h")).unwrap_err();
            assert_eq!(
                err.to_string(),
                "TLS is not supported on exec: migration channels (use tcp:, unix: or a socket fd:)"
            );
        }
    }
}
