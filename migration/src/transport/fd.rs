//! `fd:NAME`: a descriptor handed to hopvm — by name through the monitor (`getfd`, passed with
//! SCM_RIGHTS over the QMP unix socket), or by number when it was inherited at start-up.
//!
//! QEMU's outgoing `fd:` takes a monitor name only; its incoming side also takes a bare number,
//! which then may be *any* descriptor of the process. hopvm accepts a number only if the
//! descriptor was open when the process started ([`record_inherited_fds`]) and was not used
//! since: `migrate fd:5` can never take over hopvm's own KVM, eventfd or socket descriptors.
//!
//! As in QEMU, the migration takes the descriptor over and closes it when done. It is checked
//! first: it must be open, and open for writing (outgoing) or reading (incoming). It is marked
//! close-on-exec so that `exec:` commands or other children do not inherit it.

use std::collections::BTreeSet;
use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::Mutex;

use super::TransportError;

/// Which way the descriptor will be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Access {
    /// Incoming: read the stream from it.
    Read,
    /// Outgoing: write the stream to it.
    Write,
}

/// Where named `fd:` descriptors come from: the monitor's table of descriptors passed with
/// `getfd`. Taking a descriptor removes it from the table (QEMU's `monitor_get_fd`).
pub trait NamedFds {
    /// Removes and returns the descriptor named `name`, if there is one.
    fn take_fd(&self, name: &str) -> Option<OwnedFd>;
}

/// Descriptors that were open when the process started (beyond stdin, stdout and stderr).
static INHERITED: Mutex<BTreeSet<RawFd>> = Mutex::new(BTreeSet::new());

/// Records the descriptors this process inherited from its parent, so that `fd:N` can name
/// them, and marks them close-on-exec. Call first thing in `main`, before anything opens a
/// descriptor: whatever is open at the call counts as handed over.
pub fn record_inherited_fds() {
    let numbers: Vec<RawFd> = match std::fs::read_dir("/proc/self/fd") {
        Ok(dir) => dir
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect(),
        Err(_) => return,
    };
    // The directory's own descriptor is in the list; it is closed now, so the check below
    // drops it.
    let mut inherited = vmm_sync::lock(&INHERITED);
    for fd in numbers.into_iter().filter(|&fd| fd > 2) {
        // SAFETY: F_GETFD/F_SETFD only query and set the close-on-exec flag of a descriptor
        // number; a closed one gives -1 and is skipped.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        if flags == -1 {
            continue;
        }
        // SAFETY: as above, on a descriptor just seen open.
        unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) };
        inherited.insert(fd);
    }
}

/// Takes an inherited descriptor for another use than a migration (a monitor socket or a
/// serial port's file named on the command line): it is removed from the inherited set, so
/// `fd:N` can no longer name it. `None` if `fd` was not inherited or was taken already.
pub fn take_inherited_fd(fd: RawFd) -> Option<OwnedFd> {
    let mut inherited = vmm_sync::lock(&INHERITED);
    if !inherited.remove(&fd) {
        return None;
    }
    // SAFETY: `fd` was open at start-up and was in the inherited set until the line above,
    // under its lock, so nothing else owns it: the OwnedFd is its only owner.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether `name` is a descriptor number rather than a monitor name (QEMU: a name must not
/// start with a digit).
pub(super) fn is_number(name: &str) -> bool {
    name.bytes().next().is_some_and(|b| b.is_ascii_digit())
}

/// Takes the descriptor `fd:NAME` refers to: a number inherited at start-up, or a name from
/// `named` (the monitor). Checked for `access` before it is taken.
pub(super) fn resolve(
    name: &str,
    named: Option<&dyn NamedFds>,
    access: Access,
) -> Result<File, TransportError> {
    if is_number(name) {
        let fd: RawFd = name
            .parse()
            .map_err(|_| TransportError::FdNotFound(name.to_owned()))?;
        let mut inherited = vmm_sync::lock(&INHERITED);
        if !inherited.contains(&fd) {
            return Err(TransportError::FdNotHandedOver(fd));
        }
        check(fd, access)?;
        inherited.remove(&fd);
        // SAFETY: `fd` was inherited at start-up, is still open (checked above), and was
        // removed from the inherited set under its lock, so nothing else in the process owns
        // it or can take it again: the File is its only owner and closes it exactly once.
        return Ok(unsafe { File::from_raw_fd(fd) });
    }
    let owned = named
        .and_then(|n| n.take_fd(name))
        .ok_or_else(|| TransportError::FdNotFound(name.to_owned()))?;
    use std::os::fd::AsRawFd;
    check(owned.as_raw_fd(), access)?;
    Ok(File::from(owned))
}

/// Checks that `fd` is open for `access` and marks it close-on-exec.
fn check(fd: RawFd, access: Access) -> Result<(), TransportError> {
    let bad = |reason: &'static str| TransportError::BadFd { fd, reason };
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
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::io::{Read, Write};
    use std::os::fd::{AsRawFd, IntoRawFd};

    struct Table(Mutex<BTreeMap<String, OwnedFd>>);

    impl NamedFds for Table {
        fn take_fd(&self, name: &str) -> Option<OwnedFd> {
            vmm_sync::lock(&self.0).remove(name)
        }
    }

    fn temp_file(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("hopvm-mig-fd-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        std::fs::write(&path, b"data").unwrap();
        path
    }

    #[test]
    fn named_descriptors_are_checked_and_taken_once() {
        let path = temp_file("named");
        let ro: OwnedFd = File::open(&path).unwrap().into();
        let rw: OwnedFd = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap()
            .into();
        let table = Table(Mutex::new(BTreeMap::from([
            ("ro".to_owned(), ro),
            ("rw".to_owned(), rw),
        ])));
        let err = resolve("ro", Some(&table), Access::Write).unwrap_err();
        assert!(err.to_string().contains("not open for writing"), "{err}");
        // A refused descriptor is gone from the table (taken, checked, closed), as in QEMU.
        let err = resolve("ro", Some(&table), Access::Read).unwrap_err();
        assert_eq!(
            err.to_string(),
            "File descriptor named 'ro' has not been found"
        );
        let mut f = resolve("rw", Some(&table), Access::Write).unwrap();
        // SAFETY: F_GETFD only queries the descriptor table.
        let cloexec = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFD) } & libc::FD_CLOEXEC;
        assert_ne!(cloexec, 0);
        f.write_all(b"more").unwrap();
        assert!(resolve("rw", Some(&table), Access::Write).is_err());
        assert!(resolve("x", None, Access::Read).is_err());
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }

    #[test]
    fn numbers_only_for_inherited_descriptors() {
        let path = temp_file("num");
        // Opened after start-up and never recorded: refused, and left open.
        let mine = File::open(&path).unwrap();
        let n = mine.as_raw_fd();
        let err = resolve(&n.to_string(), None, Access::Read).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "fd {n} was not handed to hopvm at start-up (pass it with the monitor's getfd)"
            )
        );
        // SAFETY: F_GETFD only queries the descriptor table.
        assert_ne!(unsafe { libc::fcntl(n, libc::F_GETFD) }, -1);
        drop(mine);

        // Recorded as inherited: taken once.
        let fd = File::open(&path).unwrap().into_raw_fd();
        vmm_sync::lock(&INHERITED).insert(fd);
        let mut f = resolve(&fd.to_string(), None, Access::Read).unwrap();
        let mut s = String::new();
        f.read_to_string(&mut s).unwrap();
        assert_eq!(s, "data");
        assert!(matches!(
            resolve(&fd.to_string(), None, Access::Read),
            Err(TransportError::FdNotHandedOver(_))
        ));
        drop(f);
        std::fs::remove_dir_all(path.parent().unwrap()).unwrap();
    }
}
