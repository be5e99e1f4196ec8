//! What this hopvm binary and host provide, as QMP describes it: the introspection commands
//! management tools (libvirt's capability probe) ask before they start a guest —
//! `query-target`, `query-kvm`, `query-machines`, `query-cpu-definitions`,
//! `query-cpu-model-expansion`, `qom-list-types`, `qom-list-properties`,
//! `device-list-properties`, `query-command-line-options`, `query-qmp-schema` — and
//! [`ProbeCommands`], the monitor of a machine-less hopvm (`-machine none`), which answers
//! them without building a guest.
//!
//! Every answer describes hopvm, not QEMU: its one machine (`pc-i440fx-7.2`, alias `pc`), its
//! CPU models with the features this host's KVM cannot give, the devices and objects its
//! command line accepts and their properties, the options it parses. A type hopvm does not have
//! is answered as QEMU answers for a type it was built without (`DeviceNotFound`).

use std::sync::mpsc::Sender;
use std::sync::Mutex;

use kvm_bindings::CpuId;
use serde_json::{json, Map, Value};

use crate::protocol::{version_info, Args, ErrorClass, QmpBackend, QmpError};
use crate::{commands, schema};
use vmm::arch::cpu_model::{self, CpuModel};

/// The machine type hopvm builds, its alias and the RAM object's id.
pub const MACHINE: &str = "pc-i440fx-7.2";
/// `MACHINE`'s alias.
pub const MACHINE_ALIAS: &str = "pc";
/// Most vCPUs a hopvm guest can have (`-smp` takes a byte).
pub const MAX_CPUS: u32 = 255;

/// The commands this module answers.
pub const INTROSPECTION_COMMANDS: &[&str] = &[
    "query-target",
    "query-kvm",
    "query-machines",
    "query-cpu-definitions",
    "query-cpu-model-expansion",
    "qom-list-types",
    "qom-list-properties",
    "device-list-properties",
    "query-command-line-options",
    "query-qmp-schema",
];

/// What the host offers, found once.
#[derive(Debug, Clone)]
pub struct HostInfo {
    /// `/dev/kvm` can be opened.
    pub kvm_present: bool,
    /// Guests run under KVM (the accelerator asked for includes it, and it is present).
    pub kvm_enabled: bool,
    /// KVM's supported CPUID, when present.
    supported: Option<CpuId>,
}

impl HostInfo {
    /// Looks at the host; `kvm_wanted` is whether the accelerator list includes `kvm`.
    pub fn probe(kvm_wanted: bool) -> Self {
        let supported = cpu_model::host_supported_cpuid().ok();
        let kvm_present = supported.is_some();
        Self {
            kvm_present,
            kvm_enabled: kvm_wanted && kvm_present,
            supported,
        }
    }

    fn supported(&self) -> Option<&CpuId> {
        self.supported.as_ref().filter(|_| self.kvm_enabled)
    }
}

/// A QOM type hopvm has: its name, parent, whether abstract, and its properties
/// (name, type, description).
struct TypeDef {
    name: &'static str,
    parent: Option<&'static str>,
    is_abstract: bool,
    props: &'static [(&'static str, &'static str, &'static str)],
}

const fn ty(
    name: &'static str,
    parent: &'static str,
    props: &'static [(&'static str, &'static str, &'static str)],
) -> TypeDef {
    TypeDef {
        name,
        parent: Some(parent),
        is_abstract: false,
        props,
    }
}

const fn abstract_ty(name: &'static str, parent: Option<&'static str>) -> TypeDef {
    TypeDef {
        name,
        parent,
        is_abstract: true,
        props: &[],
    }
}

/// The `-machine` properties hopvm accepts.
const MACHINE_PROPS: &[(&str, &str, &str)] = &[
    ("type", "string", ""),
    (
        "memory-backend",
        "string",
        "Set RAM backend: a memory-backend-ram object's id",
    ),
    (
        "dump-guest-core",
        "bool",
        "Include guest memory in a core dump (hopvm: off only)",
    ),
    (
        "usb",
        "bool",
        "Set on/off to enable/disable usb (hopvm: off only)",
    ),
    (
        "pit",
        "OnOffAuto",
        "Enable the in-kernel i8254 PIT (hopvm extension)",
    ),
];

/// The non-CPU types hopvm has. CPU types are generated from the CPU models.
static TYPES: &[TypeDef] = &[
    abstract_ty("object", None),
    abstract_ty("machine", Some("object")),
    abstract_ty("generic-pc-machine", Some("machine")),
    ty("pc-i440fx-7.2-machine", "generic-pc-machine", MACHINE_PROPS),
    ty("none-machine", "machine", MACHINE_PROPS),
    abstract_ty("device", Some("object")),
    abstract_ty("cpu", Some("device")),
    abstract_ty("x86_64-cpu", Some("cpu")),
    abstract_ty("isa-device", Some("device")),
    ty(
        "isa-serial",
        "isa-device",
        &[
            ("chardev", "str", "ID of a chardev to use as a backend"),
            (
                "index",
                "uint32",
                "COM port number (hopvm: 0, COM1 at 0x3f8)",
            ),
        ],
    ),
    ty(
        "isa-debug-exit",
        "isa-device",
        &[("iobase", "uint32", ""), ("iosize", "uint32", "")],
    ),
    ty("pc-testdev", "isa-device", &[]),
    abstract_ty("pci-device", Some("device")),
    abstract_ty("virtio-pci", Some("pci-device")),
    ty(
        "virtio-blk-pci",
        "virtio-pci",
        &[
            (
                "drive",
                "str",
                "Node name or ID of a block device to use as a backend",
            ),
            (
                "addr",
                "int32",
                "Slot and optional function number, example: 06.0 or 06",
            ),
            ("serial", "str", ""),
            ("bootindex", "int32", ""),
            ("num-queues", "uint16", "hopvm: 1"),
        ],
    ),
    ty(
        "virtio-net-pci",
        "virtio-pci",
        &[
            ("netdev", "str", "ID of a netdev to use as a backend"),
            (
                "mac",
                "str",
                "Ethernet 6-byte MAC Address, example: 52:54:00:12:34:56",
            ),
            (
                "addr",
                "int32",
                "Slot and optional function number, example: 06.0 or 06",
            ),
            ("bootindex", "int32", ""),
        ],
    ),
    ty(
        "virtio-rng-pci",
        "virtio-pci",
        &[
            ("rng", "link<rng-backend>", "ID of an rng object"),
            (
                "addr",
                "int32",
                "Slot and optional function number, example: 06.0 or 06",
            ),
        ],
    ),
    abstract_ty("rng-backend", Some("object")),
    ty(
        "rng-random",
        "rng-backend",
        &[("filename", "string", "/dev/urandom or /dev/random")],
    ),
    ty("rng-builtin", "rng-backend", &[]),
    abstract_ty("memory-backend", Some("object")),
    ty(
        "memory-backend-ram",
        "memory-backend",
        &[
            ("type", "string", ""),
            ("size", "int", "Size of the memory region (ex: 500M)"),
        ],
    ),
    ty(
        "secret",
        "object",
        &[
            ("type", "string", ""),
            ("format", "QCryptoSecretFormat", "raw or base64"),
            ("file", "string", "File holding the secret"),
            ("data", "string", "The secret itself"),
        ],
    ),
    abstract_ty("chardev", Some("object")),
    ty("chardev-socket", "chardev", &[]),
    ty("chardev-file", "chardev", &[]),
];

/// A CPU model's QOM type name (`qemu64-x86_64-cpu`).
fn cpu_type_name(model: &str) -> String {
    format!("{model}-x86_64-cpu")
}

/// The model named by a CPU type name, if hopvm has it.
fn cpu_model_of_type(typename: &str) -> Option<&'static str> {
    let model = typename.strip_suffix("-x86_64-cpu")?;
    cpu_model::BASE_MODELS
        .iter()
        .map(|m| m.name())
        .find(|n| *n == model)
}

/// Every type: the static ones and one per CPU model, as (name, parent, abstract).
fn all_types() -> Vec<(String, Option<&'static str>, bool)> {
    let mut out: Vec<_> = TYPES
        .iter()
        .map(|t| (t.name.to_string(), t.parent, t.is_abstract))
        .collect();
    for m in cpu_model::BASE_MODELS {
        out.push((cpu_type_name(m.name()), Some("x86_64-cpu"), false));
    }
    out
}

fn parent_of(name: &str) -> Option<&'static str> {
    if cpu_model_of_type(name).is_some() {
        return Some("x86_64-cpu");
    }
    TYPES.iter().find(|t| t.name == name).and_then(|t| t.parent)
}

fn implements(name: &str, ancestor: &str) -> bool {
    let mut cur = Some(name.to_string());
    while let Some(n) = cur {
        if n == ancestor {
            return true;
        }
        cur = parent_of(&n).map(str::to_string);
    }
    false
}

fn class_not_found(typename: &str) -> QmpError {
    QmpError::new(
        ErrorClass::DeviceNotFound,
        format!("Class '{typename}' not found"),
    )
}

/// `qom-list-types`.
fn qom_list_types(args: &Map<String, Value>) -> Result<Value, QmpError> {
    let mut a = Args::new(args);
    let wanted = a.optional_str("implements")?;
    let with_abstract = a.optional_bool("abstract")?.unwrap_or(false);
    a.finish()?;
    if let Some(w) = wanted {
        if !all_types().iter().any(|(n, _, _)| n == w) {
            return Err(class_not_found(w));
        }
    }
    let list = all_types()
        .into_iter()
        .filter(|(_, _, is_abstract)| with_abstract || !is_abstract)
        .filter(|(name, _, _)| wanted.is_none_or(|w| implements(name, w)))
        .map(|(name, parent, is_abstract)| {
            let mut v = Map::new();
            v.insert("name".into(), json!(name));
            if is_abstract {
                v.insert("abstract".into(), json!(true));
            }
            if let Some(p) = parent {
                v.insert("parent".into(), json!(p));
            }
            Value::Object(v)
        })
        .collect();
    Ok(Value::Array(list))
}

fn prop_json(name: &str, ty: &str, description: &str) -> Value {
    let mut v = Map::new();
    v.insert("name".into(), json!(name));
    v.insert("type".into(), json!(ty));
    if !description.is_empty() {
        v.insert("description".into(), json!(description));
    }
    Value::Object(v)
}

/// A CPU type's properties: its type name and one boolean per feature.
fn cpu_props() -> Vec<Value> {
    let mut out = vec![
        prop_json("type", "string", ""),
        prop_json("vendor", "string", "CPUID vendor string"),
        prop_json("family", "int", ""),
        prop_json("model", "int", ""),
        prop_json("stepping", "int", ""),
        prop_json("model-id", "string", "CPUID brand string"),
        prop_json(
            "unavailable-features",
            "strList",
            "Features the host cannot give this model",
        ),
    ];
    out.extend(cpu_model::feature_names().map(|name| prop_json(name, "bool", "on/off")));
    out
}

/// The properties of `typename` (QOM's `qom-list-properties`: any type, abstract or not).
fn type_props(typename: &str) -> Result<Vec<Value>, QmpError> {
    if cpu_model_of_type(typename).is_some() {
        return Ok(cpu_props());
    }
    let t = TYPES
        .iter()
        .find(|t| t.name == typename)
        .ok_or_else(|| class_not_found(typename))?;
    Ok(t.props
        .iter()
        .map(|(n, ty, d)| prop_json(n, ty, d))
        .collect())
}

/// Types libvirt 9.0 asks `qom-list-properties` about on every QEMU (no capability guards the
/// question) and whose `DeviceNotFound` answer crashes its daemon (`virQEMUCapsProbeQMPObjectProps`):
/// hopvm answers an empty property list. `qom-list-types` does not list them, so libvirt
/// still knows hopvm has neither and never asks for one.
const UNGUARDED_ABSENT_TYPES: &[&str] = &["memory-backend-file", "memory-backend-memfd"];

fn qom_list_properties(args: &Map<String, Value>) -> Result<Value, QmpError> {
    let mut a = Args::new(args);
    let typename = a.required_str("typename")?;
    a.finish()?;
    if UNGUARDED_ABSENT_TYPES.contains(&typename) {
        return Ok(json!([]));
    }
    type_props(typename).map(Value::Array)
}

/// `device-list-properties`: a non-abstract device type's properties, as QEMU checks it.
fn device_list_properties(args: &Map<String, Value>) -> Result<Value, QmpError> {
    let mut a = Args::new(args);
    let typename = a.required_str("typename")?;
    a.finish()?;
    let Some((_, _, is_abstract)) = all_types().into_iter().find(|(n, _, _)| n == typename) else {
        return Err(QmpError::device_not_found(typename));
    };
    if !implements(typename, "device") {
        return Err(QmpError::invalid_parameter_value("typename", "device type"));
    }
    if is_abstract {
        return Err(QmpError::invalid_parameter_value(
            "typename",
            "non-abstract device type",
        ));
    }
    type_props(typename).map(Value::Array)
}

/// The options of hopvm's QEMU command line, with the parameters it accepts, as QEMU's
/// option groups are named (`boot-opts`, `smp-opts`, …): (option, [(parameter, type)]).
const COMMAND_LINE_OPTIONS: &[(&str, &[(&str, &str)])] = &[
    (
        "machine",
        &[
            ("type", "string"),
            ("accel", "string"),
            ("memory-backend", "string"),
            ("dump-guest-core", "boolean"),
            ("usb", "boolean"),
            ("kernel_irqchip", "string"),
            ("pit", "boolean"),
        ],
    ),
    ("accel", &[("accel", "string")]),
    (
        "smp-opts",
        &[
            ("cpus", "number"),
            ("sockets", "number"),
            ("cores", "number"),
            ("threads", "number"),
            ("maxcpus", "number"),
        ],
    ),
    ("boot-opts", &[("strict", "boolean")]),
    ("name", &[("guest", "string"), ("debug-threads", "boolean")]),
    ("msg", &[("timestamp", "boolean")]),
    (
        "overcommit",
        &[("mem-lock", "boolean"), ("cpu-pm", "boolean")],
    ),
    ("rtc", &[("base", "string")]),
    (
        "chardev",
        &[
            ("backend", "string"),
            ("id", "string"),
            ("path", "string"),
            ("fd", "string"),
            ("server", "boolean"),
            ("wait", "boolean"),
            ("append", "boolean"),
        ],
    ),
    (
        "mon",
        &[("chardev", "string"), ("mode", "string"), ("id", "string")],
    ),
    (
        "add-fd",
        &[("fd", "number"), ("set", "number"), ("opaque", "string")],
    ),
    ("memory", &[("size", "size")]),
    (
        "sandbox",
        &[
            ("enable", "boolean"),
            ("obsolete", "string"),
            ("elevateprivileges", "string"),
            ("spawn", "string"),
            ("resourcecontrol", "string"),
        ],
    ),
];

fn query_command_line_options(args: &Map<String, Value>) -> Result<Value, QmpError> {
    let mut a = Args::new(args);
    let option = a.optional_str("option")?;
    a.finish()?;
    let list: Vec<Value> = COMMAND_LINE_OPTIONS
        .iter()
        .filter(|(name, _)| option.is_none_or(|o| o == *name))
        .map(|(name, params)| {
            let params: Vec<Value> = params
                .iter()
                .map(|(p, t)| json!({"name": p, "type": t}))
                .collect();
            json!({"option": name, "parameters": params})
        })
        .collect();
    if let (Some(o), true) = (option, list.is_empty()) {
        return Err(QmpError::generic(format!("invalid option name: {o}")));
    }
    Ok(Value::Array(list))
}

fn query_machines(host: &HostInfo) -> Value {
    if !host.kvm_enabled {
        // hopvm runs guests under KVM only: without it there is no machine to offer.
        return json!([]);
    }
    json!([{
        "name": MACHINE,
        "alias": MACHINE_ALIAS,
        "is-default": true,
        "cpu-max": MAX_CPUS,
        "hotpluggable-cpus": false,
        "numa-mem-supported": false,
        "deprecated": false,
        "default-cpu-type": cpu_type_name("qemu64"),
        "default-ram-id": "pc.ram",
    }])
}

fn query_cpu_definitions(host: &HostInfo) -> Value {
    let Some(supported) = host.supported() else {
        return json!([]);
    };
    let list: Vec<Value> = cpu_model::BASE_MODELS
        .iter()
        .filter_map(|m| {
            let model: CpuModel = m.name().parse().ok()?;
            let unavailable = model.unavailable_features(supported);
            let fixed = !matches!(m, cpu_model::BaseModel::Max | cpu_model::BaseModel::Host);
            Some(json!({
                "name": m.name(),
                "typename": cpu_type_name(m.name()),
                "unavailable-features": unavailable,
                "static": false,
                "migration-safe": fixed,
                "deprecated": false,
            }))
        })
        .collect();
    Value::Array(list)
}

/// `query-cpu-model-expansion`: the model with its properties applied, built on this host's
/// KVM, each feature on or off as a guest would see it.
fn cpu_model_expansion(host: &HostInfo, args: &Map<String, Value>) -> Result<Value, QmpError> {
    let mut a = Args::new(args);
    let kind = a.required_enum("type", &["static", "full"])?;
    let mut model = a.required_object("model")?;
    let name = model.required_str("name")?;
    let props = model.optional_value("props");
    model.finish()?;
    a.finish()?;
    let Some(supported) = host.supported() else {
        return Err(QmpError::generic(
            "CPU model expansion needs KVM: hopvm has no other accelerator",
        ));
    };
    let mut spec = name.to_string();
    match props {
        None => {}
        Some(Value::Object(props)) => {
            for (k, v) in props {
                match (k.as_str(), v) {
                    // hopvm's models carry no feature that would block migration.
                    ("migratable", Value::Bool(_)) => {}
                    (k, Value::Bool(on)) => {
                        spec.push_str(&format!(",{k}={}", if *on { "on" } else { "off" }))
                    }
                    (k, Value::Number(n)) => spec.push_str(&format!(",{k}={n}")),
                    (k, Value::String(s)) => {
                        spec.push_str(&format!(",{k}={}", s.replace(',', ",,")))
                    }
                    (k, _) => {
                        return Err(QmpError::invalid_parameter_type(
                            &format!("model.props.{k}"),
                            "a scalar",
                        ))
                    }
                }
            }
        }
        Some(_) => {
            return Err(QmpError::invalid_parameter_type("model.props", "object"));
        }
    }
    let cpu: CpuModel = spec
        .parse()
        .map_err(|e: cpu_model::CpuModelError| QmpError::generic(e.to_string()))?;
    let cpuid = cpu
        .apply(supported)
        .map_err(|e| QmpError::generic(e.to_string()))?;
    let mut features: Map<String, Value> = cpu_model::feature_states(&cpuid)
        .into_iter()
        .map(|(n, on)| (n.to_string(), json!(on)))
        .collect();
    if kind == "full" {
        let id = cpu_model::identity(&cpuid);
        features.insert("vendor".into(), json!(id.vendor));
        features.insert("family".into(), json!(id.family));
        features.insert("model".into(), json!(id.model));
        features.insert("stepping".into(), json!(id.stepping));
        features.insert("model-id".into(), json!(id.model_id));
    }
    let name = if kind == "static" { "base" } else { name };
    Ok(json!({"model": {"name": name, "props": features}}))
}

/// Answers an introspection command; `None` when `command` is not one.
pub fn execute(
    host: &HostInfo,
    command: &str,
    args: &Map<String, Value>,
) -> Option<Result<Value, QmpError>> {
    let none = |args| Args::expect_none(args);
    Some(match command {
        "query-target" => none(args).map(|_| json!({"arch": "x86_64"})),
        "query-kvm" => {
            none(args).map(|_| json!({"enabled": host.kvm_enabled, "present": host.kvm_present}))
        }
        "query-machines" => none(args).map(|_| query_machines(host)),
        "query-cpu-definitions" => none(args).map(|_| query_cpu_definitions(host)),
        "query-cpu-model-expansion" => cpu_model_expansion(host, args),
        "qom-list-types" => qom_list_types(args),
        "qom-list-properties" => qom_list_properties(args),
        "device-list-properties" => device_list_properties(args),
        "query-command-line-options" => query_command_line_options(args),
        "query-qmp-schema" => none(args).map(|_| schema::qmp_schema()),
        _ => return None,
    })
}

/// The monitor of a machine-less hopvm (`-machine none`, as libvirt's capability probe
/// starts it): introspection, the run state, the migration settings' defaults, `quit`.
/// Commands that need a guest are refused.
pub struct ProbeCommands {
    host: HostInfo,
    running: Mutex<bool>,
    quit: Mutex<Sender<()>>,
    migration: migration::thread::Migration,
}

impl ProbeCommands {
    /// A probe monitor; `quit` is signalled when a client sends `quit`.
    pub fn new(host: HostInfo, paused: bool, quit: Sender<()>) -> Self {
        Self {
            host,
            running: Mutex::new(!paused),
            quit: Mutex::new(quit),
            migration: migration::thread::Migration::new(),
        }
    }
}

impl QmpBackend for ProbeCommands {
    fn execute(&self, command: &str, args: &Map<String, Value>) -> Result<Value, QmpError> {
        if let Some(result) = execute(&self.host, command, args) {
            return result;
        }
        let none = |args| Args::expect_none(args);
        let m = &self.migration;
        match command {
            "query-version" => none(args).map(|_| version_info()),
            "query-commands" => none(args).map(|_| {
                Value::Array(
                    schema::COMMAND_DEFS
                        .iter()
                        .map(|c| json!({"name": c.name}))
                        .collect(),
                )
            }),
            "query-status" => none(args).map(|_| {
                let running = *vmm_sync::lock(&self.running);
                let status = if running { "running" } else { "prelaunch" };
                json!({"status": status, "singlestep": false, "running": running})
            }),
            "cont" => none(args).map(|_| {
                *vmm_sync::lock(&self.running) = true;
                Value::Null
            }),
            "stop" => none(args).map(|_| Value::Null),
            "quit" => none(args).map(|_| {
                let _ = vmm_sync::lock(&self.quit).send(());
                Value::Null
            }),
            "query-migrate" => none(args).map(|_| json!({})),
            "query-migrate-capabilities" => none(args).map(|_| commands::capabilities_json(m)),
            "query-migrate-parameters" => none(args).map(|_| commands::parameters_json(m)),
            other if schema::has_command(other) => Err(QmpError::generic(format!(
                "{other}: this hopvm has no machine (-machine none)"
            ))),
            other => Err(QmpError::command_not_found(other)),
        }
    }

    fn has_command(&self, command: &str) -> bool {
        schema::has_command(command)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> HostInfo {
        HostInfo::probe(true)
    }

    fn args(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn types_and_properties() {
        let h = host();
        let types = execute(&h, "qom-list-types", &Map::new()).unwrap().unwrap();
        let names: Vec<&str> = types
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["name"].as_str().unwrap())
            .collect();
        assert!(names.contains(&"qemu64-x86_64-cpu") && names.contains(&"isa-serial"));
        assert!(!names.contains(&"device"), "abstract types only on request");
        let cpus = execute(
            &h,
            "qom-list-types",
            &args(json!({"implements": "x86_64-cpu"})),
        )
        .unwrap()
        .unwrap();
        assert_eq!(cpus.as_array().unwrap().len(), cpu_model::BASE_MODELS.len());
        let err = execute(
            &h,
            "device-list-properties",
            &args(json!({"typename": "e1000"})),
        )
        .unwrap()
        .unwrap_err();
        assert_eq!(err.class, ErrorClass::DeviceNotFound);
        assert_eq!(err.desc, "Device 'e1000' not found");
        assert!(names.contains(&"virtio-blk-pci") && names.contains(&"virtio-net-pci"));
        let err = execute(
            &h,
            "qom-list-properties",
            &args(json!({"typename": "memory-backend-epc"})),
        )
        .unwrap()
        .unwrap_err();
        assert_eq!(err.class, ErrorClass::DeviceNotFound);
        let absent = execute(
            &h,
            "qom-list-properties",
            &args(json!({"typename": "memory-backend-file"})),
        )
        .unwrap()
        .unwrap();
        assert_eq!(absent, json!([]));
        let props = execute(
            &h,
            "qom-list-properties",
            &args(json!({"typename": "max-x86_64-cpu"})),
        )
        .unwrap()
        .unwrap();
        assert!(props.as_array().unwrap().iter().any(|p| p["name"] == "svm"));
    }

    #[test]
    fn command_line_options() {
        let h = host();
        let all = execute(&h, "query-command-line-options", &Map::new())
            .unwrap()
            .unwrap();
        assert!(all
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o["option"] == "boot-opts"));
        let err = execute(
            &h,
            "query-command-line-options",
            &args(json!({"option": "spice"})),
        )
        .unwrap()
        .unwrap_err();
        assert_eq!(err.desc, "invalid option name: spice");
    }

    #[test]
    fn bad_arguments_are_qmp_errors() {
        let h = host();
        let cases = [
            ("qom-list-types", json!({"implements": "no-such-type"})),
            ("qom-list-types", json!({"abstract": "yes"})),
            ("qom-list-properties", json!({})),
            ("qom-list-properties", json!({"typename": 5})),
            ("device-list-properties", json!({"typename": "device"})),
            ("device-list-properties", json!({"typename": "secret"})),
            (
                "device-list-properties",
                json!({"typename": "isa-serial", "x": 1}),
            ),
            ("query-cpu-model-expansion", json!({"type": "static"})),
            (
                "query-cpu-model-expansion",
                json!({"type": "neither", "model": {"name": "max"}}),
            ),
            (
                "query-cpu-model-expansion",
                json!({"type": "full", "model": {"name": "max", "props": [1]}}),
            ),
            (
                "query-cpu-model-expansion",
                json!({"type": "full", "model": {"name": "max", "props": {"lm": [true]}}}),
            ),
            (
                "query-cpu-model-expansion",
                json!({"type": "full", "model": {"name": "max", "props": {"nosuch": true}}}),
            ),
            (
                "query-cpu-model-expansion",
                json!({"type": "full", "model": {"name": "max", "props": {"family": 1e300}}}),
            ),
            ("query-command-line-options", json!({"option": ""})),
            ("query-machines", json!({"x": 1})),
        ];
        for (command, a) in cases {
            let result = execute(&h, command, &args(a.clone())).unwrap();
            assert!(result.is_err(), "{command} {a}: {result:?}");
        }
    }

    #[test]
    fn introspection_commands_are_in_the_schema() {
        for c in INTROSPECTION_COMMANDS {
            assert!(schema::has_command(c), "{c}");
        }
    }
}
