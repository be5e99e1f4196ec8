//! `fd:N`: an inherited file descriptor (a socket, pipe or file set up by whoever started
//! hopvm).
//!
//! As in QEMU, the migration takes the descriptor over and closes it when done. It is checked
//! first: it must be open, and open for writing (outgoing) or reading (incoming). It is marked
//! close-on-exec so that `exec:` commands or other children do not inherit it.

use std::fs::File;
use std::os::fd::{FromRawFd, RawFd};

use super::TransportError;

/// Which way the descriptor will be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Access {
    /// Incoming: read the stream from it.
    Read,
    /// Outgoing: write the stream to it.
    Write,
}

/// Validates descriptor `fd` for `access` and takes ownership of it.
pub(super) fn take(fd: RawFd, access: Access) -> Result<File, TransportError> {
    let bad = |reason: &str| TransportError::BadFd {
        fd,
        reason: reason.to_owned(),
    };
    if fd < 0 {
        return Err(bad("negative descriptor"));
    }
    // SAFETY: F_GETFL only queries the descriptor table; an unknown descriptor gives -1.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags == -1 {
        return Err(bad("not open"));
    }
    match (access, flags & libc::O_ACCMODE) {
        (Access::Read, libc::O_WRONLY) => return Err(bad("not open for reading")),
        (Access::Write, libc::O_RDONLY) => return Err(bad("not open for writing")),
        _ => {}
    }
    // SAFETY: F_GETFD/F_SETFD only change the descriptor's close-on-exec flag, on a
    // descriptor just checked to be open.
    unsafe {
        let fdflags = libc::fcntl(fd, libc::F_GETFD);
        if fdflags != -1 {
            libc::fcntl(fd, libc::F_SETFD, fdflags | libc::FD_CLOEXEC);
        }
    }
    // SAFETY: `fd` is open (checked above), and by the `fd:N` contract (module docs) it was
    // handed to the migration and nothing else in the process owns or uses it, so the File
    // becomes its only owner and closes it exactly once.
    Ok(unsafe { File::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::IntoRawFd;

    #[test]
    fn checks_access_mode_and_takes_over() {
        let dir = std::env::temp_dir().join(format!("hopvm-mig-fd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        std::fs::write(&path, b"data").unwrap();
        let ro = File::open(&path).unwrap().into_raw_fd();
        let err = take(ro, Access::Write).unwrap_err();
        assert!(err.to_string().contains("not open for writing"), "{err}");
        let mut f = take(ro, Access::Read).unwrap();
        let mut s = String::new();
        f.read_to_string(&mut s).unwrap();
        assert_eq!(s, "data");
        // SAFETY: F_GETFD only queries the descriptor table.
        let cloexec = unsafe { libc::fcntl(ro, libc::F_GETFD) } & libc::FD_CLOEXEC;
        assert_ne!(cloexec, 0);
        drop(f);
        let rw = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap()
            .into_raw_fd();
        let mut f = take(rw, Access::Write).unwrap();
        f.write_all(b"more").unwrap();
        assert!(take(-3, Access::Read).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
