//! `unix:PATH`: a Unix stream socket.
//!
//! Listening replaces a *stale* socket file at PATH — one nobody accepts on any more, left by
//! a process that died — as QEMU does, but refuses to touch a live socket or anything that is
//! not a socket. The socket file is removed again once the source has connected or the
//! listener is dropped, unless something else has replaced it meanwhile.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use super::TransportError;

/// Connects to the socket at `path`.
pub(super) fn connect(path: &Path) -> Result<UnixStream, TransportError> {
    UnixStream::connect(path).map_err(|source| TransportError::Connect {
        addr: path.display().to_string(),
        source,
    })
}

/// A bound Unix socket that removes its file when done.
pub(super) struct Listening {
    listener: Option<UnixListener>,
    path: PathBuf,
    /// (device, inode) of the socket file we created.
    id: (u64, u64),
}

fn file_id(path: &Path) -> Option<(u64, u64)> {
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

/// Removes a stale socket file at `path`; errors for anything else in the way.
fn clear_stale(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "path exists and is not a socket",
        ));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(io::Error::new(io::ErrorKind::AddrInUse, "socket is in use")),
        Err(_) => std::fs::remove_file(path),
    }
}

/// Binds and listens at `path`.
pub(super) fn listen(path: &Path) -> Result<Listening, TransportError> {
    let err = |source| TransportError::Listen {
        addr: path.display().to_string(),
        source,
    };
    clear_stale(path).map_err(err)?;
    let listener = UnixListener::bind(path).map_err(err)?;
    Ok(Listening {
        listener: Some(listener),
        path: path.to_owned(),
        id: file_id(path).unwrap_or_default(),
    })
}

impl Listening {
    /// Waits for the one incoming connection.
    pub(super) fn accept(mut self) -> Result<UnixStream, TransportError> {
        let listener = self
            .listener
            .take()
            .ok_or_else(|| TransportError::Accept(io::ErrorKind::NotConnected.into()))?;
        let (stream, _) = listener.accept().map_err(TransportError::Accept)?;
        Ok(stream)
    }
}

impl Listening {
    /// Accepts one connection and keeps listening (multifd: more channels follow).
    pub(super) fn accept_one(&self) -> Result<UnixStream, TransportError> {
        let listener = self
            .listener
            .as_ref()
            .ok_or_else(|| TransportError::Accept(io::ErrorKind::NotConnected.into()))?;
        let (stream, _) = listener.accept().map_err(TransportError::Accept)?;
        Ok(stream)
    }

    /// The listening descriptor (to wait on).
    pub(super) fn raw_fd(&self) -> Result<std::os::fd::RawFd, TransportError> {
        use std::os::fd::AsRawFd;
        self.listener
            .as_ref()
            .map(|l| l.as_raw_fd())
            .ok_or_else(|| TransportError::Accept(io::ErrorKind::NotConnected.into()))
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        if file_id(&self.path) == Some(self.id) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_socket_is_not_replaced() {
        let dir = std::env::temp_dir().join(format!("hopvm-mig-unixlive-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("live.sock");
        let first = listen(&path).unwrap();
        let err = listen(&path).err().unwrap();
        assert!(err.to_string().contains("in use"), "{err}");
        drop(first);
        assert!(!path.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
