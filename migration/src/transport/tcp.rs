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
