//! QMP, the QEMU Machine Protocol: hopvm's monitor.
//!
//! hopvm is meant to be driven like QEMU, by the same tools, so its monitor speaks QMP exactly
//! as QEMU 7.2 does on the wire: the same greeting, capabilities negotiation, reply and event
//! shapes, error classes and error texts (see the reference transcripts). The pieces:
//!
//! * [`json`] cuts the client's byte stream into JSON messages the way QEMU's lexer does,
//!   including its error recovery, within fixed memory bounds;
//! * [`protocol`] is the per-connection state machine ([`Session`]), the reply and event
//!   formats, the [`QmpBackend`] trait the VMM implements its commands behind, and [`Args`]
//!   for checking command arguments with QEMU's messages;
//! * [`fds`] keeps the descriptors clients pass with SCM_RIGHTS (`getfd`, `closefd`) for
//!   `migrate fd:NAME`;
//! * [`schema`] is the table of hopvm's commands and events and `query-qmp-schema` made from
//!   it; [`probe`] answers the introspection commands (machines, CPU models, types) and is the
//!   whole monitor of a machine-less hopvm (`-machine none`, libvirt's capability probe);
//! * [`domain`] describes a running guest's make-up (chardevs, vCPUs, the QOM tree libvirt
//!   reads);
//! * [`server`] serves sessions on a Unix (or TCP) socket to several clients at once and
//!   broadcasts events through [`EventSender`] without ever blocking the VMM.

pub mod commands;
pub mod domain;
pub mod fds;
pub mod json;
pub mod probe;
pub mod protocol;
pub mod schema;
pub mod server;

/// The QMP client, crate `qmp-client` (its own crate so that guest-tests can use it without
/// depending on the VMM).
pub use qmp_client as client;

pub use protocol::{ArgList, Args, ErrorClass, QmpBackend, QmpError, Session, Timestamp};
pub use server::{
    EventSender, QmpAddress, QmpListenSpec, QmpServer, QmpServerConfig, QmpServerError,
};
