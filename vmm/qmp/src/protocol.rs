//! The QMP wire protocol as QEMU 7.2 speaks it: greeting, requests, replies, errors, events,
//! capabilities negotiation, and QAPI-style argument checking.
//!
//! Management tools (libvirt, `qmp-shell`, test harnesses) were written against QEMU, and many
//! of them match on reply shapes and error texts, so everything a client can observe here is
//! copied from QEMU: `monitor/qmp.c` (greeting, the negotiation-mode rewrite of
//! `CommandNotFound`), `qapi/qmp-dispatch.c` (request checks, `id` echo), the
//! `qmp_capabilities` command (`monitor/qmp-cmds-control.c`) and the QObject input visitor
//! (`qapi/qobject-input-visitor.c`, `qapi/qapi-visit-core.c`) whose argument errors [`Args`]
//! reproduces. Replies are written with QEMU's member order and separators, e.g.
//! `{"return": {}, "id": 1}` and `{"id": 7, "error": {"class": …, "desc": …}}`.
//!
//! The commands themselves live behind [`QmpBackend`]; [`Session`] is one connection's state
//! machine and knows nothing about sockets, so it can be tested on its own.

use std::collections::BTreeSet;
use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value};

use crate::fds::{MonitorFds, ReceivedFds};
use crate::json::{write_str, write_value, QmpJsonError};

/// A QEMU version number, as in `query-version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VersionTriple {
    /// Major version.
    pub major: u64,
    /// Minor version.
    pub minor: u64,
    /// Micro (patch) version.
    pub micro: u64,
}

/// The QEMU version hopvm reports, so that tools which gate features on the QEMU version treat
/// it like the QEMU 7.2 of the reference transcripts (Debian's 7.2.22).
pub const QEMU_COMPAT_VERSION: VersionTriple = VersionTriple {
    major: 7,
    minor: 2,
    micro: 22,
};

/// The `package` string of the greeting and `query-version`: `hopvm-<crate version>`.
pub fn package() -> String {
    format!("hopvm-{}", env!("CARGO_PKG_VERSION"))
}

/// Appends the version object, `{"qemu": {"micro": …, "minor": …, "major": …}, "package": …}`,
/// in QEMU's member order.
fn write_version(out: &mut String) {
    let v = QEMU_COMPAT_VERSION;
    out.push_str(&format!(
        "{{\"qemu\": {{\"micro\": {}, \"minor\": {}, \"major\": {}}}, \"package\": ",
        v.micro, v.minor, v.major
    ));
    write_str(out, &package());
    out.push('}');
}

/// The `query-version` reply value (the greeting's `version` member).
pub fn version_info() -> Value {
    let v = QEMU_COMPAT_VERSION;
    serde_json::json!({
        "qemu": {"micro": v.micro, "minor": v.minor, "major": v.major},
        "package": package(),
    })
}

/// The greeting sent when a client connects, newline included. hopvm offers no capabilities
/// (QEMU offers `oob` only on monitors with their own I/O thread).
pub fn greeting() -> String {
    let mut out = String::from("{\"QMP\": {\"version\": ");
    write_version(&mut out);
    out.push_str(", \"capabilities\": []}}\n");
    out
}

/// The QMP error classes hopvm uses (QAPI's `QapiErrorClass`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// Everything that has no class of its own.
    GenericError,
    /// The command does not exist (or is not available yet).
    CommandNotFound,
    /// A device exists but has not been activated.
    DeviceNotActive,
    /// A device does not exist.
    DeviceNotFound,
    /// KVM lacks a capability the request needs.
    KVMMissingCap,
}

impl ErrorClass {
    /// The class name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
            ErrorClass::KVMMissingCap => "KVMMissingCap",
        }
    }
}

impl fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error reply: a class and a human-readable description (QEMU's texts where QEMU has the
/// same situation).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{desc}")]
pub struct QmpError {
    /// The error class.
    pub class: ErrorClass,
    /// The description, sent verbatim.
    pub desc: String,
}

impl QmpError {
    /// An error of any class.
    pub fn new(class: ErrorClass, desc: impl Into<String>) -> Self {
        Self {
            class,
            desc: desc.into(),
        }
    }

    /// A `GenericError`.
    pub fn generic(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::GenericError, desc)
    }

    /// `CommandNotFound`: "The command NAME has not been found".
    pub fn command_not_found(command: &str) -> Self {
        Self::new(
            ErrorClass::CommandNotFound,
            format!("The command {command} has not been found"),
        )
    }

    /// `DeviceNotFound`: "Device 'ID' not found" (QEMU's `QERR_DEVICE_NOT_FOUND`).
    pub fn device_not_found(device: &str) -> Self {
        Self::new(
            ErrorClass::DeviceNotFound,
            format!("Device '{device}' not found"),
        )
    }

    /// `DeviceNotActive`: "No KIND device has been activated" (QEMU's
    /// `QERR_DEVICE_NOT_ACTIVE`, e.g. for `balloon`).
    pub fn device_not_active(kind: &str) -> Self {
        Self::new(
            ErrorClass::DeviceNotActive,
            format!("No {kind} device has been activated"),
        )
    }

    /// `KVMMissingCap`: "Using KVM without CAP, FEATURE unavailable" (QEMU's
    /// `QERR_KVM_MISSING_CAP`).
    pub fn kvm_missing_cap(capability: &str, feature: &str) -> Self {
        Self::new(
            ErrorClass::KVMMissingCap,
            format!("Using KVM without {capability}, {feature} unavailable"),
        )
    }

    /// "Parameter 'NAME' is missing".
    pub fn missing_parameter(name: &str) -> Self {
        Self::generic(format!("Parameter '{name}' is missing"))
    }

    /// "Invalid parameter type for 'NAME', expected: TYPE", TYPE being one of QAPI's
    /// `integer`, `number`, `boolean`, `string`, `object`, `array` or `null`.
    pub fn invalid_parameter_type(name: &str, expected: &str) -> Self {
        Self::generic(format!(
            "Invalid parameter type for '{name}', expected: {expected}"
        ))
    }

    /// "Parameter 'NAME' expects WHAT" (QEMU's `QERR_INVALID_PARAMETER_VALUE`, e.g. `uint64`).
    pub fn invalid_parameter_value(name: &str, expected: &str) -> Self {
        Self::generic(format!("Parameter '{name}' expects {expected}"))
    }

    /// "Parameter 'NAME' is unexpected".
    pub fn unexpected_parameter(name: &str) -> Self {
        Self::generic(format!("Parameter '{name}' is unexpected"))
    }

    /// "Parameter 'NAME' does not accept value 'VALUE'" (an unknown enumeration value).
    pub fn invalid_enum_value(name: &str, value: &str) -> Self {
        Self::generic(format!(
            "Parameter '{name}' does not accept value '{value}'"
        ))
    }
}

impl From<QmpJsonError> for QmpError {
    fn from(error: QmpJsonError) -> Self {
        Self::generic(error.to_string())
    }
}

/// Wall-clock time of an event, as QEMU stamps it (`g_get_real_time()`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp {
    /// Seconds since the Unix epoch.
    pub seconds: u64,
    /// Microseconds within the second.
    pub microseconds: u32,
}

impl Timestamp {
    /// The current time.
    pub fn now() -> Self {
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Self {
            seconds: since.as_secs(),
            microseconds: since.subsec_micros(),
        }
    }
}

/// A success reply line, newline included: `{"return": VALUE}` or `{"return": VALUE, "id": ID}`.
pub fn format_return(value: &Value, id: Option<&Value>) -> String {
    let mut out = String::from("{\"return\": ");
    write_value(&mut out, value);
    if let Some(id) = id {
        out.push_str(", \"id\": ");
        write_value(&mut out, id);
    }
    out.push_str("}\n");
    out
}

/// An error reply line, newline included: `{"error": {"class": …, "desc": …}}`, or with
/// `"id"` first when the request had one (QEMU's member order).
pub fn format_error(error: &QmpError, id: Option<&Value>) -> String {
    let mut out = String::from("{");
    if let Some(id) = id {
        out.push_str("\"id\": ");
        write_value(&mut out, id);
        out.push_str(", ");
    }
    out.push_str("\"error\": {\"class\": ");
    write_str(&mut out, error.class.as_str());
    out.push_str(", \"desc\": ");
    write_str(&mut out, &error.desc);
    out.push_str("}}\n");
    out
}

/// An event line, newline included:
/// `{"timestamp": {"seconds": S, "microseconds": US}, "event": NAME, "data": DATA}`, without
/// `"data"` when there is none (like QEMU's `STOP` and `RESUME`).
pub fn format_event(name: &str, data: Option<&Value>, timestamp: Timestamp) -> String {
    let mut out = format!(
        "{{\"timestamp\": {{\"seconds\": {}, \"microseconds\": {}}}, \"event\": ",
        timestamp.seconds, timestamp.microseconds
    );
    write_str(&mut out, name);
    if let Some(data) = data {
        out.push_str(", \"data\": ");
        write_value(&mut out, data);
    }
    out.push_str("}\n");
    out
}

/// The commands of a VM, implemented by the VMM.
///
/// [`Session`] handles `qmp_capabilities`, `getfd` and `closefd` itself and asks the backend
/// only about other commands, after negotiation. The server runs one command at a time across all clients (as
/// QEMU does), on the thread of the client that sent it, so a command that blocks stalls every
/// monitor: long work (migration) should be started and polled, like in QEMU. Do not shut the
/// server down from inside [`QmpBackend::execute`]; request it and do it from another thread.
pub trait QmpBackend: Send + Sync {
    /// Runs `command` with its `arguments` (an empty map when the request had none).
    ///
    /// Check arguments with [`Args`] in the order of the command's schema, to report the
    /// error QEMU would report first. `Ok(Value::Null)` is sent as `{}`, like a QAPI command
    /// without a return type.
    fn execute(&self, command: &str, arguments: &Map<String, Value>) -> Result<Value, QmpError>;

    /// [`execute`](Self::execute) for a command that may use the descriptors the client
    /// named with `getfd` (`migrate fd:NAME`). By default the table is not needed.
    fn execute_with_fds(
        &self,
        command: &str,
        arguments: &Map<String, Value>,
        fds: &MonitorFds,
    ) -> Result<Value, QmpError> {
        let _ = fds;
        self.execute(command, arguments)
    }

    /// Whether `command` exists; unknown commands get `CommandNotFound`.
    fn has_command(&self, command: &str) -> bool;
}

/// Typed access to a command's arguments with QEMU's error texts.
///
/// Like QAPI's input visitor: every accessor consumes a member, a missing required member, a
/// member of the wrong type or a member left over at [`Args::finish`] is an error, and names
/// in errors are full paths (`caps[0].state`). Optional members that are present must have the
/// right type (`null` is not "absent").
///
/// ```
/// # use qmp::protocol::{Args, QmpError};
/// # fn f(arguments: &serde_json::Map<String, serde_json::Value>) -> Result<(), QmpError> {
/// let mut args = Args::new(arguments);
/// let uri = args.required_str("uri")?;
/// let detach = args.optional_bool("detach")?.unwrap_or(false);
/// args.finish()?;
/// # let _ = (uri, detach); Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Args<'a> {
    map: &'a Map<String, Value>,
    path: String,
    consumed: BTreeSet<&'a str>,
}

impl<'a> Args<'a> {
    /// The arguments of a command (the request's `"arguments"` object).
    pub fn new(map: &'a Map<String, Value>) -> Self {
        Self::nested(map, String::new())
    }

    fn nested(map: &'a Map<String, Value>, path: String) -> Self {
        Self {
            map,
            path,
            consumed: BTreeSet::new(),
        }
    }

    /// For commands without arguments: fails with "Parameter 'X' is unexpected" if there are any.
    pub fn expect_none(map: &'a Map<String, Value>) -> Result<(), QmpError> {
        Self::new(map).finish()
    }

    /// The full name of member `name` for error messages.
    pub fn full_name(&self, name: &str) -> String {
        if self.path.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.path)
        }
    }

    /// Consumes member `name`, if present.
    fn take(&mut self, name: &str) -> Option<&'a Value> {
        let (key, value) = self.map.get_key_value(name)?;
        self.consumed.insert(key.as_str());
        Some(value)
    }

    fn require(&mut self, name: &str) -> Result<&'a Value, QmpError> {
        self.take(name)
            .ok_or_else(|| QmpError::missing_parameter(&self.full_name(name)))
    }

    /// Any JSON value (QAPI's `any`).
    pub fn required_value(&mut self, name: &str) -> Result<&'a Value, QmpError> {
        self.require(name)
    }

    /// Any JSON value, if present.
    pub fn optional_value(&mut self, name: &str) -> Option<&'a Value> {
        self.take(name)
    }

    /// A string (`str`).
    pub fn required_str(&mut self, name: &str) -> Result<&'a str, QmpError> {
        let value = self.require(name)?;
        as_str(value, &self.full_name(name))
    }

    /// A string, if present.
    pub fn optional_str(&mut self, name: &str) -> Result<Option<&'a str>, QmpError> {
        self.take(name)
            .map(|value| as_str(value, &self.full_name(name)))
            .transpose()
    }

    /// A boolean (`bool`).
    pub fn required_bool(&mut self, name: &str) -> Result<bool, QmpError> {
        let value = self.require(name)?;
        as_bool(value, &self.full_name(name))
    }

    /// A boolean, if present.
    pub fn optional_bool(&mut self, name: &str) -> Result<Option<bool>, QmpError> {
        self.take(name)
            .map(|value| as_bool(value, &self.full_name(name)))
            .transpose()
    }

    /// A signed integer (`int`): JSON integers only, `1.0` is a number, not an integer.
    pub fn required_i64(&mut self, name: &str) -> Result<i64, QmpError> {
        let value = self.require(name)?;
        as_i64(value, &self.full_name(name))
    }

    /// A signed integer, if present.
    pub fn optional_i64(&mut self, name: &str) -> Result<Option<i64>, QmpError> {
        self.take(name)
            .map(|value| as_i64(value, &self.full_name(name)))
            .transpose()
    }

    /// An unsigned integer (`uint64` or `size`). Like QEMU, a negative integer is accepted
    /// and wraps (`-1` is `u64::MAX`); range-check the result where that matters.
    pub fn required_u64(&mut self, name: &str) -> Result<u64, QmpError> {
        let value = self.require(name)?;
        as_u64(value, &self.full_name(name))
    }

    /// An unsigned integer, if present.
    pub fn optional_u64(&mut self, name: &str) -> Result<Option<u64>, QmpError> {
        self.take(name)
            .map(|value| as_u64(value, &self.full_name(name)))
            .transpose()
    }

    /// A number (`number`); integers are accepted.
    pub fn required_f64(&mut self, name: &str) -> Result<f64, QmpError> {
        let value = self.require(name)?;
        as_f64(value, &self.full_name(name))
    }

    /// A number, if present.
    pub fn optional_f64(&mut self, name: &str) -> Result<Option<f64>, QmpError> {
        self.take(name)
            .map(|value| as_f64(value, &self.full_name(name)))
            .transpose()
    }

    /// A value of an enumeration: a string among `allowed`. Like QEMU, the error for an
    /// unknown value names the member alone, not its full path.
    pub fn required_enum(&mut self, name: &str, allowed: &[&str]) -> Result<&'a str, QmpError> {
        let value = self.require(name)?;
        as_enum(value, &self.full_name(name), name, allowed)
    }

    /// A value of an enumeration, if present.
    pub fn optional_enum(
        &mut self,
        name: &str,
        allowed: &[&str],
    ) -> Result<Option<&'a str>, QmpError> {
        self.take(name)
            .map(|value| as_enum(value, &self.full_name(name), name, allowed))
            .transpose()
    }

    /// A nested object, checked with its own [`Args`] (call [`Args::finish`] on it too).
    pub fn required_object(&mut self, name: &str) -> Result<Args<'a>, QmpError> {
        let value = self.require(name)?;
        as_object(value, self.full_name(name))
    }

    /// A nested object, if present.
    pub fn optional_object(&mut self, name: &str) -> Result<Option<Args<'a>>, QmpError> {
        self.take(name)
            .map(|value| as_object(value, self.full_name(name)))
            .transpose()
    }

    /// An array (`['T']`), whose elements are checked through [`ArgList`].
    pub fn required_array(&mut self, name: &str) -> Result<ArgList<'a>, QmpError> {
        let value = self.require(name)?;
        as_array(value, self.full_name(name))
    }

    /// An array, if present.
    pub fn optional_array(&mut self, name: &str) -> Result<Option<ArgList<'a>>, QmpError> {
        self.take(name)
            .map(|value| as_array(value, self.full_name(name)))
            .transpose()
    }

    /// Fails with "Parameter 'X' is unexpected" for the first member no accessor consumed.
    pub fn finish(self) -> Result<(), QmpError> {
        match self
            .map
            .keys()
            .find(|key| !self.consumed.contains(key.as_str()))
        {
            Some(key) => Err(QmpError::unexpected_parameter(&self.full_name(key))),
            None => Ok(()),
        }
    }
}

/// The elements of an array argument, with their full names (`caps[0]`) for errors.
#[derive(Debug, Clone)]
pub struct ArgList<'a> {
    items: &'a [Value],
    path: String,
}

impl<'a> ArgList<'a> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether the array is empty.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The raw elements (QAPI `['any']`).
    pub fn values(&self) -> &'a [Value] {
        self.items
    }

    fn element_name(&self, index: usize) -> String {
        format!("{}[{index}]", self.path)
    }

    /// Elements that must all be strings.
    pub fn strs(&self) -> Result<Vec<&'a str>, QmpError> {
        let items: &'a [Value] = self.items;
        items
            .iter()
            .enumerate()
            .map(|(i, value)| as_str(value, &self.element_name(i)))
            .collect()
    }

    /// Elements that must all be values of an enumeration. Like QEMU, an unknown value is
    /// reported as "Parameter 'null' does not accept value 'X'" (list elements have no name).
    pub fn enums(&self, allowed: &[&str]) -> Result<Vec<&'a str>, QmpError> {
        let items: &'a [Value] = self.items;
        items
            .iter()
            .enumerate()
            .map(|(i, value)| as_enum(value, &self.element_name(i), "null", allowed))
            .collect()
    }

    /// Elements that must all be objects, each checked with its own [`Args`].
    pub fn objects(&self) -> Result<Vec<Args<'a>>, QmpError> {
        let items: &'a [Value] = self.items;
        items
            .iter()
            .enumerate()
            .map(|(i, value)| as_object(value, self.element_name(i)))
            .collect()
    }

    /// Elements that must all be integers.
    pub fn i64s(&self) -> Result<Vec<i64>, QmpError> {
        let items: &'a [Value] = self.items;
        items
            .iter()
            .enumerate()
            .map(|(i, value)| as_i64(value, &self.element_name(i)))
            .collect()
    }
}

fn as_str<'a>(value: &'a Value, name: &str) -> Result<&'a str, QmpError> {
    value
        .as_str()
        .ok_or_else(|| QmpError::invalid_parameter_type(name, "string"))
}

fn as_bool(value: &Value, name: &str) -> Result<bool, QmpError> {
    value
        .as_bool()
        .ok_or_else(|| QmpError::invalid_parameter_type(name, "boolean"))
}

fn as_i64(value: &Value, name: &str) -> Result<i64, QmpError> {
    value
        .as_i64()
        .ok_or_else(|| QmpError::invalid_parameter_type(name, "integer"))
}

fn as_u64(value: &Value, name: &str) -> Result<u64, QmpError> {
    value
        .as_u64()
        // QEMU accepts negative values "for backward compatibility".
        .or_else(|| value.as_i64().map(|v| v as u64))
        .ok_or_else(|| QmpError::invalid_parameter_value(name, "uint64"))
}

fn as_f64(value: &Value, name: &str) -> Result<f64, QmpError> {
    match value {
        Value::Number(n) => n.as_f64(),
        _ => None,
    }
    .ok_or_else(|| QmpError::invalid_parameter_type(name, "number"))
}

fn as_enum<'a>(
    value: &'a Value,
    full_name: &str,
    short_name: &str,
    allowed: &[&str],
) -> Result<&'a str, QmpError> {
    let s = as_str(value, full_name)?;
    if allowed.contains(&s) {
        Ok(s)
    } else {
        Err(QmpError::invalid_enum_value(short_name, s))
    }
}

fn as_object(value: &Value, path: String) -> Result<Args<'_>, QmpError> {
    match value {
        Value::Object(map) => Ok(Args::nested(map, path)),
        _ => Err(QmpError::invalid_parameter_type(&path, "object")),
    }
}

fn as_array(value: &Value, path: String) -> Result<ArgList<'_>, QmpError> {
    match value {
        Value::Array(items) => Ok(ArgList { items, path }),
        _ => Err(QmpError::invalid_parameter_type(&path, "array")),
    }
}

/// The QMP capabilities hopvm knows (`QMPCapability`). None is offered.
const KNOWN_CAPABILITIES: &[&str] = &["oob"];

/// One connection's protocol state: capabilities negotiation and request dispatch.
#[derive(Debug, Default)]
pub struct Session {
    negotiated: bool,
}

impl Session {
    /// A connection that has just been greeted.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether `qmp_capabilities` has succeeded (events are sent only then).
    pub fn is_negotiated(&self) -> bool {
        self.negotiated
    }

    /// Answers one message from the JSON splitter; returns the reply line, newline included.
    /// The connection carries no descriptors (`getfd` finds none).
    pub fn handle(
        &mut self,
        backend: &dyn QmpBackend,
        message: Result<Value, QmpJsonError>,
    ) -> String {
        self.handle_with_fds(
            backend,
            message,
            &MonitorFds::new(),
            &mut ReceivedFds::new(),
        )
    }

    /// [`handle`](Self::handle) on a connection that can pass descriptors: `received` holds
    /// what arrived with the message (for `getfd`), `fds` is the monitor's table.
    pub fn handle_with_fds(
        &mut self,
        backend: &dyn QmpBackend,
        message: Result<Value, QmpJsonError>,
        fds: &MonitorFds,
        received: &mut ReceivedFds,
    ) -> String {
        match message {
            // Parse errors never carry an id.
            Err(error) => format_error(&error.into(), None),
            Ok(request) => self.answer(backend, request, fds, received),
        }
    }

    /// Answers one request; returns the reply line, newline included.
    pub fn handle_request(&mut self, backend: &dyn QmpBackend, request: Value) -> String {
        self.answer(
            backend,
            request,
            &MonitorFds::new(),
            &mut ReceivedFds::new(),
        )
    }

    fn answer(
        &mut self,
        backend: &dyn QmpBackend,
        request: Value,
        fds: &MonitorFds,
        received: &mut ReceivedFds,
    ) -> String {
        let Value::Object(request) = request else {
            return format_error(&QmpError::generic("QMP input must be a JSON object"), None);
        };
        let id = request.get("id");
        match self.dispatch(backend, &request, fds, received) {
            Ok(Value::Null) => format_return(&Value::Object(Map::new()), id),
            Ok(value) => format_return(&value, id),
            Err(mut error) => {
                if !self.negotiated && error.class == ErrorClass::CommandNotFound {
                    // monitor_qmp_dispatch(): "Provide a more useful error message".
                    error.desc =
                        "Expecting capabilities negotiation with 'qmp_capabilities'".into();
                }
                format_error(&error, id)
            }
        }
    }

    fn dispatch(
        &mut self,
        backend: &dyn QmpBackend,
        request: &Map<String, Value>,
        fds: &MonitorFds,
        received: &mut ReceivedFds,
    ) -> Result<Value, QmpError> {
        let command = check_request(request)?;
        let empty = Map::new();
        let arguments = match request.get("arguments") {
            Some(Value::Object(arguments)) => arguments,
            _ => &empty,
        };
        if command == "qmp_capabilities" {
            return self.qmp_capabilities(arguments);
        }
        if self.negotiated {
            match command {
                "getfd" => return fds.getfd(arguments, received).map(|()| Value::Null),
                "closefd" => return fds.closefd(arguments).map(|()| Value::Null),
                _ => {}
            }
        }
        if !self.negotiated || !backend.has_command(command) {
            return Err(QmpError::command_not_found(command));
        }
        backend.execute_with_fds(command, arguments, fds)
    }

    /// `qmp_capabilities`, as in QEMU: arguments first, then the negotiation state.
    fn qmp_capabilities(&mut self, arguments: &Map<String, Value>) -> Result<Value, QmpError> {
        let mut args = Args::new(arguments);
        let enable = match args.optional_array("enable")? {
            Some(list) => list.enums(KNOWN_CAPABILITIES)?,
            None => Vec::new(),
        };
        args.finish()?;
        if self.negotiated {
            return Err(QmpError::new(
                ErrorClass::CommandNotFound,
                "Capabilities negotiation is already complete, command ignored",
            ));
        }
        if !enable.is_empty() {
            // hopvm offers no capability, so every requested one is unavailable.
            return Err(QmpError::generic(format!(
                "Capability {} not available",
                enable.join(", ")
            )));
        }
        self.negotiated = true;
        Ok(Value::Object(Map::new()))
    }
}

/// QEMU's `qmp_dispatch_check_obj` without out-of-band support (as when OOB has not been
/// negotiated): returns the command name.
fn check_request(request: &Map<String, Value>) -> Result<&str, QmpError> {
    let mut command = None;
    for (member, value) in request {
        match member.as_str() {
            "execute" => match value {
                Value::String(name) => command = Some(name.as_str()),
                _ => {
                    return Err(QmpError::generic(
                        "QMP input member 'execute' must be a string",
                    ))
                }
            },
            "arguments" => {
                if !value.is_object() {
                    return Err(QmpError::generic(
                        "QMP input member 'arguments' must be an object",
                    ));
                }
            }
            "id" => {}
            other => {
                return Err(QmpError::generic(format!(
                    "QMP input member '{other}' is unexpected"
                )))
            }
        }
    }
    command.ok_or_else(|| QmpError::generic("QMP input lacks member 'execute'"))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    struct Backend;

    impl QmpBackend for Backend {
        fn execute(
            &self,
            command: &str,
            arguments: &Map<String, Value>,
        ) -> Result<Value, QmpError> {
            match command {
                "stop" => Args::expect_none(arguments).map(|()| Value::Null),
                "set" => {
                    let mut args = Args::new(arguments);
                    let caps = args.required_array("caps")?;
                    let mut out = Vec::new();
                    for mut cap in caps.objects()? {
                        let name = cap.required_enum("capability", &["xbzrle", "events"])?;
                        let state = cap.required_bool("state")?;
                        cap.finish()?;
                        out.push(json!([name, state]));
                    }
                    let value = args.optional_u64("value")?;
                    let speed = args.optional_f64("speed")?;
                    args.finish()?;
                    Ok(json!({"caps": out, "value": value, "speed": speed}))
                }
                _ => Err(QmpError::command_not_found(command)),
            }
        }

        fn has_command(&self, command: &str) -> bool {
            matches!(command, "stop" | "set")
        }
    }

    fn run(session: &mut Session, request: &str) -> String {
        let value: Value = serde_json::from_str(request).unwrap();
        session.handle_request(&Backend, value)
    }

    fn negotiated() -> Session {
        let mut session = Session::new();
        assert_eq!(
            run(&mut session, r#"{"execute": "qmp_capabilities"}"#),
            "{\"return\": {}}\n"
        );
        session
    }

    #[test]
    fn greeting_matches_qemu_shape() {
        let expected = format!(
            "{{\"QMP\": {{\"version\": {{\"qemu\": {{\"micro\": 22, \"minor\": 2, \"major\": 7}}, \
             \"package\": \"hopvm-{}\"}}, \"capabilities\": []}}}}\n",
            env!("CARGO_PKG_VERSION")
        );
        assert_eq!(greeting(), expected);
        assert_eq!(
            version_info()["qemu"],
            json!({"major": 7, "minor": 2, "micro": 22})
        );
    }

    #[test]
    fn negotiation_is_required_and_happens_once() {
        let mut session = Session::new();
        assert_eq!(
            run(&mut session, r#"{"execute": "stop", "id": 1}"#),
            "{\"id\": 1, \"error\": {\"class\": \"CommandNotFound\", \"desc\": \
             \"Expecting capabilities negotiation with 'qmp_capabilities'\"}}\n"
        );
        assert_eq!(
            run(&mut session, r#"{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}"#),
            "{\"error\": {\"class\": \"GenericError\", \"desc\": \"Capability oob not available\"}}\n"
        );
        assert!(run(
            &mut session,
            r#"{"execute": "qmp_capabilities", "arguments": {"enable": ["x"]}}"#
        )
        .contains("Parameter 'null' does not accept value 'x'"));
        assert!(run(
            &mut session,
            r#"{"execute": "qmp_capabilities", "arguments": {"enable": [1]}}"#
        )
        .contains("Invalid parameter type for 'enable[0]', expected: string"));
        assert!(!session.is_negotiated());
        assert_eq!(
            run(
                &mut session,
                r#"{"execute": "qmp_capabilities", "id": "a"}"#
            ),
            "{\"return\": {}, \"id\": \"a\"}\n"
        );
        assert!(session.is_negotiated());
        assert_eq!(
            run(&mut session, r#"{"execute": "qmp_capabilities"}"#),
            "{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \
             \"Capabilities negotiation is already complete, command ignored\"}}\n"
        );
        assert_eq!(
            run(&mut session, r#"{"execute": "stop"}"#),
            "{\"return\": {}}\n"
        );
    }

    #[test]
    fn request_shape_errors() {
        let mut session = negotiated();
        let cases = [
            ("[1]", "QMP input must be a JSON object"),
            ("{}", "QMP input lacks member 'execute'"),
            (
                r#"{"execute": 1}"#,
                "QMP input member 'execute' must be a string",
            ),
            (
                r#"{"execute": "stop", "arguments": []}"#,
                "QMP input member 'arguments' must be an object",
            ),
            (
                r#"{"execute": "stop", "extra": 1}"#,
                "QMP input member 'extra' is unexpected",
            ),
            (
                r#"{"exec-oob": "stop"}"#,
                "QMP input member 'exec-oob' is unexpected",
            ),
            (
                r#"{"execute": "nope"}"#,
                "The command nope has not been found",
            ),
        ];
        for (request, desc) in cases {
            let reply: Value = serde_json::from_str(&run(&mut session, request)).unwrap();
            assert_eq!(reply["error"]["desc"], desc, "{request}");
        }
        // Non-object input has no id to echo; other errors echo it.
        assert_eq!(
            run(&mut session, r#"{"execute": "nope", "id": {"a": [1]}}"#),
            "{\"id\": {\"a\": [1]}, \"error\": {\"class\": \"CommandNotFound\", \"desc\": \
             \"The command nope has not been found\"}}\n"
        );
    }

    #[test]
    fn argument_errors_match_qemu() {
        let mut session = negotiated();
        let cases = [
            (json!({}), "Parameter 'caps' is missing"),
            (
                json!({"caps": {}}),
                "Invalid parameter type for 'caps', expected: array",
            ),
            (
                json!({"caps": [1]}),
                "Invalid parameter type for 'caps[0]', expected: object",
            ),
            (
                json!({"caps": [{"state": true}]}),
                "Parameter 'caps[0].capability' is missing",
            ),
            (
                json!({"caps": [{"capability": "bogus", "state": true}]}),
                "Parameter 'capability' does not accept value 'bogus'",
            ),
            (
                json!({"caps": [{"capability": "events", "state": 1}]}),
                "Invalid parameter type for 'caps[0].state', expected: boolean",
            ),
            (
                json!({"caps": [{"capability": "events", "state": true, "x": 1}]}),
                "Parameter 'caps[0].x' is unexpected",
            ),
            (
                json!({"caps": [], "value": "fast"}),
                "Parameter 'value' expects uint64",
            ),
            (
                json!({"caps": [], "value": 1.5}),
                "Parameter 'value' expects uint64",
            ),
            (
                json!({"caps": [], "speed": "x"}),
                "Invalid parameter type for 'speed', expected: number",
            ),
            (
                json!({"caps": [], "speed": null}),
                "Invalid parameter type for 'speed', expected: number",
            ),
            (
                json!({"caps": [], "foo": 1}),
                "Parameter 'foo' is unexpected",
            ),
        ];
        for (arguments, desc) in cases {
            let request = json!({"execute": "set", "arguments": arguments});
            let reply: Value =
                serde_json::from_str(&session.handle_request(&Backend, request)).unwrap();
            assert_eq!(reply["error"]["desc"], desc, "{arguments}");
            assert_eq!(reply["error"]["class"], "GenericError");
        }
        let request = json!({"execute": "set", "arguments": {
            "caps": [{"capability": "events", "state": true}], "value": -1, "speed": 3}});
        let reply: Value =
            serde_json::from_str(&session.handle_request(&Backend, request)).unwrap();
        assert_eq!(
            reply["return"],
            json!({"caps": [["events", true]], "value": u64::MAX, "speed": 3.0})
        );
        assert!(run(
            &mut session,
            r#"{"execute": "stop", "arguments": {"x": 1}}"#
        )
        .contains("Parameter 'x' is unexpected"));
    }

    #[test]
    fn events_and_errors_are_formatted_like_qemu() {
        let ts = Timestamp {
            seconds: 1795653410,
            microseconds: 203328,
        };
        assert_eq!(
            format_event("STOP", None, ts),
            "{\"timestamp\": {\"seconds\": 1795653410, \"microseconds\": 203328}, \"event\": \"STOP\"}\n"
        );
        assert_eq!(
            format_event("MIGRATION", Some(&json!({"status": "setup"})), ts),
            "{\"timestamp\": {\"seconds\": 1795653410, \"microseconds\": 203328}, \
             \"event\": \"MIGRATION\", \"data\": {\"status\": \"setup\"}}\n"
        );
        assert_eq!(
            format_error(&QmpError::device_not_found("x"), None),
            "{\"error\": {\"class\": \"DeviceNotFound\", \"desc\": \"Device 'x' not found\"}}\n"
        );
        assert_eq!(
            format_error(&QmpJsonError::Syntax("expecting value".into()).into(), None),
            "{\"error\": {\"class\": \"GenericError\", \"desc\": \"JSON parse error, expecting value\"}}\n"
        );
    }
}
