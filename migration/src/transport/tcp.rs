//! `tcp:HOST:PORT`: a TCP connection (outgoing) or a listening socket (incoming).
//!
//! TCP needs no tuning here: Nagle stays on (the stream is written in large chunks from the
//! output buffer, so it never delays anything) and the kernel's send-buffer autotuning is
//! left alone, which a fixed `SO_SNDBUF` would disable.

use std::io;
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};

use super::TransportError;

/// `host:port` for messages, with IPv6 brackets.
fn display(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

fn resolve(host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
    let addrs: Vec<SocketAddr> = (host, port).to_socket_addrs()?.collect();
    if addrs.is_empty() {
        return Err(io::Error::new(io::ErrorKind::NotFound, "no address found"));
    }
    Ok(addrs)
}

/// Connects to the first address of `host` that accepts.
pub(super) fn connect(host: &str, port: u16) -> Result<TcpStream, TransportError> {
    let err = |source| TransportError::Connect {
        addr: display(host, port),
        source,
    };
    let mut last = None;
    for addr in resolve(host, port).map_err(err)? {
        match TcpStream::connect(addr) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(err(last.unwrap_or_else(|| io::ErrorKind::NotFound.into())))
}

/// Like [`connect`], but the wait for each address's answer ends at once when `cancel` fires
/// (a destination whose SYNs go nowhere would otherwise block for the kernel's whole SYN
/// retry time, about two minutes). Name resolution itself is not interruptible.
pub(super) fn connect_cancellable(
    host: &str,
    port: u16,
    cancel: &super::ConnectCancel,
) -> Result<TcpStream, TransportError> {
    let err = |source| TransportError::Connect {
        addr: display(host, port),
        source,
    };
    let mut last = None;
    for addr in resolve(host, port).map_err(err)? {
        if cancel.is_cancelled() {
            return Err(TransportError::Cancelled);
        }
        match connect_one(addr, cancel) {
            Ok(s) => return Ok(s),
            Err(ConnectOne::Cancelled) => return Err(TransportError::Cancelled),
            Err(ConnectOne::Failed(e)) => last = Some(e),
        }
    }
    Err(err(last.unwrap_or_else(|| io::ErrorKind::NotFound.into())))
}

enum ConnectOne {
    Cancelled,
    Failed(io::Error),
}

impl From<io::Error> for ConnectOne {
    fn from(e: io::Error) -> Self {
        ConnectOne::Failed(e)
    }
}

/// A non-blocking connect to `addr`, waited for with poll(2) on the socket and the cancel
/// descriptor.
fn connect_one(addr: SocketAddr, cancel: &super::ConnectCancel) -> Result<TcpStream, ConnectOne> {
    use socket2::{Domain, Protocol, Socket, Type};
    use std::os::fd::AsRawFd;
    // socket2 opens the socket close-on-exec.
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    sock.set_nonblocking(true)?;
    match sock.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {
            let mut fds = [
                libc::pollfd {
                    fd: sock.as_raw_fd(),
                    events: libc::POLLOUT,
                    revents: 0,
                },
                libc::pollfd {
                    fd: cancel.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            loop {
                // SAFETY: `fds` is a valid array of two pollfds for the duration of the call;
                // both descriptors are owned by objects borrowed for this function.
                let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
                if rc >= 0 {
                    break;
                }
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e.into());
                }
            }
            if fds[1].revents != 0 || cancel.is_cancelled() {
                return Err(ConnectOne::Cancelled);
            }
            if let Some(e) = sock.take_error()? {
                return Err(e.into());
            }
        }
        Err(e) => return Err(e.into()),
    }
    sock.set_nonblocking(false)?;
    Ok(sock.into())
}

/// Binds and listens; an empty host or `0` is any IPv4 address, as in QEMU.
pub(super) fn listen(host: &str, port: u16) -> Result<TcpListener, TransportError> {
    let bind_host = if host.is_empty() || host == "0" {
        "0.0.0.0"
    } else {
        host
    };
    let err = |source| TransportError::Listen {
        addr: display(host, port),
        source,
    };
    let mut last = None;
    for addr in resolve(bind_host, port).map_err(err)? {
        match TcpListener::bind(addr) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    Err(err(last.unwrap_or_else(|| io::ErrorKind::NotFound.into())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_brackets_ipv6() {
        assert_eq!(display("::1", 5), "[::1]:5");
        assert_eq!(display("host", 5), "host:5");
    }

    #[test]
    fn listen_any() {
        let l = listen("", 0).unwrap();
        assert!(l.local_addr().unwrap().ip().is_unspecified());
        let l = listen("127.0.0.1", 0).unwrap();
        assert!(l.local_addr().unwrap().ip().is_loopback());
    }
}
