//! Descriptors passed to the monitor: QEMU's `getfd` / `closefd`.
//!
//! A client sends a descriptor with SCM_RIGHTS over the QMP unix socket (with the `getfd`
//! command's bytes or just before them); `getfd {"fdname": NAME}` files the last one received
//! under NAME, replacing (and closing) an older one of that name; `closefd` closes it; and
//! `migrate` / `migrate-incoming` with `fd:NAME` take it over ([`NamedFds`]). As in QEMU the
//! table belongs to the monitor (one `--qmp` socket), not to one connection, and a descriptor
//! received but never named is closed when the next one arrives or the client leaves.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::Mutex;

use migration::transport::NamedFds;
use vmm_sync::lock;

use crate::protocol::{Args, ErrorClass, QmpError};

/// Most descriptors one monitor keeps by name: a client cannot exhaust hopvm's descriptor
/// table through `getfd`.
pub const MAX_NAMED_FDS: usize = 256;

/// The descriptors a client passed with its latest message, waiting for `getfd`.
#[derive(Debug, Default)]
pub struct ReceivedFds(Vec<OwnedFd>);

impl ReceivedFds {
    /// Nothing received.
    pub fn new() -> Self {
        ReceivedFds(Vec::new())
    }

    /// Descriptors that arrived with a read: they replace any that were not claimed (QEMU's
    /// character device keeps only the latest message's descriptors).
    pub fn replace(&mut self, fds: Vec<OwnedFd>) {
        if !fds.is_empty() {
            self.0 = fds;
        }
    }

    /// Takes the descriptor for a `getfd` (the last one received, as QEMU's
    /// `qemu_chr_fe_get_msgfd`); the others of the same message are closed.
    fn take(&mut self) -> Option<OwnedFd> {
        let last = self.0.pop();
        self.0.clear();
        last
    }

    /// Whether descriptors are waiting.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// One monitor's named descriptors.
#[derive(Debug, Default)]
pub struct MonitorFds {
    named: Mutex<BTreeMap<String, OwnedFd>>,
}

impl MonitorFds {
    /// An empty table.
    pub fn new() -> Self {
        MonitorFds::default()
    }

    /// `getfd`: files the descriptor just received under `fdname`.
    pub fn getfd(
        &self,
        arguments: &serde_json::Map<String, serde_json::Value>,
        received: &mut ReceivedFds,
    ) -> Result<(), QmpError> {
        let mut args = Args::new(arguments);
        let name = args.required_str("fdname")?;
        args.finish()?;
        let fd = received
            .take()
            .ok_or_else(|| QmpError::generic("No file descriptor supplied via SCM_RIGHTS"))?;
        if name.bytes().next().is_some_and(|b| b.is_ascii_digit()) {
            return Err(QmpError::invalid_parameter_value(
                "fdname",
                "a name not starting with a digit",
            ));
        }
        let mut named = lock(&self.named);
        if !named.contains_key(name) && named.len() >= MAX_NAMED_FDS {
            return Err(QmpError::new(
                ErrorClass::GenericError,
                format!("Too many file descriptors: at most {MAX_NAMED_FDS} can be named"),
            ));
        }
        // An older descriptor of the same name is closed (dropped) as QEMU does.
        named.insert(name.to_owned(), fd);
        Ok(())
    }

    /// `closefd`: closes the descriptor named `fdname`.
    pub fn closefd(
        &self,
        arguments: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<(), QmpError> {
        let mut args = Args::new(arguments);
        let name = args.required_str("fdname")?;
        args.finish()?;
        lock(&self.named)
            .remove(name)
            .map(drop)
            .ok_or_else(|| QmpError::generic(format!("File descriptor named '{name}' not found")))
    }

    /// How many descriptors are named.
    pub fn len(&self) -> usize {
        lock(&self.named).len()
    }

    /// Whether no descriptor is named.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl NamedFds for MonitorFds {
    fn take_fd(&self, name: &str) -> Option<OwnedFd> {
        lock(&self.named).remove(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Map, Value};

    fn args(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    fn fd() -> OwnedFd {
        std::fs::File::open("/dev/null").unwrap().into()
    }

    #[test]
    fn getfd_closefd_and_take() {
        let table = MonitorFds::new();
        let mut rx = ReceivedFds::new();
        let err = table
            .getfd(&args(json!({"fdname": "m"})), &mut rx)
            .unwrap_err();
        assert_eq!(err.desc, "No file descriptor supplied via SCM_RIGHTS");
        rx.replace(vec![fd(), fd()]);
        let err = table
            .getfd(&args(json!({"fdname": "1x"})), &mut rx)
            .unwrap_err();
        assert_eq!(
            err.desc,
            "Parameter 'fdname' expects a name not starting with a digit"
        );
        // The refused descriptors are gone: a later getfd has none.
        assert!(rx.is_empty());
        rx.replace(vec![fd()]);
        table.getfd(&args(json!({"fdname": "m"})), &mut rx).unwrap();
        rx.replace(vec![fd()]);
        table.getfd(&args(json!({"fdname": "m"})), &mut rx).unwrap();
        assert_eq!(table.len(), 1);
        assert!(table.take_fd("m").is_some());
        assert!(table.take_fd("m").is_none());
        let err = table.closefd(&args(json!({"fdname": "m"}))).unwrap_err();
        assert_eq!(err.desc, "File descriptor named 'm' not found");
        rx.replace(vec![fd()]);
        table.getfd(&args(json!({"fdname": "n"})), &mut rx).unwrap();
        table.closefd(&args(json!({"fdname": "n"}))).unwrap();
        assert!(table.is_empty());
        let err = table.closefd(&args(json!({}))).unwrap_err();
        assert_eq!(err.desc, "Parameter 'fdname' is missing");
    }

    #[test]
    fn the_table_is_bounded() {
        let table = MonitorFds::new();
        let mut rx = ReceivedFds::new();
        for i in 0..MAX_NAMED_FDS {
            rx.replace(vec![fd()]);
            table
                .getfd(&args(json!({"fdname": format!("f{i}")})), &mut rx)
                .unwrap();
        }
        rx.replace(vec![fd()]);
        let err = table
            .getfd(&args(json!({"fdname": "one-more"})), &mut rx)
            .unwrap_err();
        assert!(err.desc.contains("Too many"), "{}", err.desc);
        // Replacing an existing name is still allowed.
        rx.replace(vec![fd()]);
        table
            .getfd(&args(json!({"fdname": "f0"})), &mut rx)
            .unwrap();
    }
}
