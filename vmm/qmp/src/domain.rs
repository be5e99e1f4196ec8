//! What a running hopvm guest is made of, as QMP describes it to a management tool after
//! start-up (libvirt's `domain-start` sequence): its character devices (`query-chardev`),
//! vCPUs and their host threads (`query-cpus-fast`), the QOM tree libvirt reads — the vCPU
//! objects at `/machine/unattached/device[N]` with one property per CPU feature, and
//! `/machine/peripheral` with the devices named on the command line (`qom-list`, `qom-get`) —
//! and the I/O threads, block devices and block jobs hopvm does not have (empty lists).

use std::sync::OnceLock;

use serde_json::{json, Map, Value};

use crate::protocol::{Args, ErrorClass, QmpError};
use vmm::arch::cpu_model::{self, CpuModel};

/// The commands this module answers.
pub const DOMAIN_COMMANDS: &[&str] = &[
    "query-chardev",
    "query-cpus-fast",
    "qom-list",
    "qom-get",
    "query-iothreads",
    "query-named-block-nodes",
    "query-block",
    "query-jobs",
    "system_powerdown",
];

/// A character device: its id and QEMU's description of its backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChardevInfo {
    /// The `-chardev id=`.
    pub label: String,
    /// `file`, `unix:PATH,server=on`, …
    pub filename: String,
}

/// The guest's make-up as the command line gave it.
#[derive(Debug, Default)]
pub struct DomainInfo {
    /// Character devices.
    pub chardevs: Vec<ChardevInfo>,
    /// Devices named with `-device …,id=ID`: (id, type).
    pub peripherals: Vec<(String, String)>,
    /// The `-cpu` option.
    pub cpu: String,
    /// vCPUs.
    pub cpus: u8,
    /// vCPUs per socket (`-smp cores= × threads=`; 1 = one socket per vCPU... as given).
    pub cores: u8,
    /// Threads per core.
    pub threads: u8,
    /// The guest has ACPI tables (no `-no-acpi`).
    pub acpi: bool,
    cpu_props: OnceLock<Result<CpuProps, cpu_model::CpuModelError>>,
}

/// The vCPU object's properties.
#[derive(Debug)]
struct CpuProps {
    typename: String,
    features: Vec<(&'static str, bool)>,
    unavailable: Vec<&'static str>,
    identity: cpu_model::CpuIdentity,
}

const CPU_PATH_PREFIX: &str = "/machine/unattached/device[";

impl DomainInfo {
    /// A guest of `cpus` vCPUs of model `cpu` (the `-cpu` syntax), one core and one thread per
    /// socket unless [`DomainInfo::cores`] / [`DomainInfo::threads`] say otherwise.
    pub fn new(cpu: &str, cpus: u8) -> Self {
        Self {
            cpu: cpu.to_string(),
            cpus,
            cores: 1,
            threads: 1,
            acpi: true,
            ..Self::default()
        }
    }

    fn cpu_props(&self) -> Result<&CpuProps, QmpError> {
        self.cpu_props
            .get_or_init(|| {
                let model: CpuModel = self.cpu.parse()?;
                let supported = cpu_model::host_supported_cpuid()?;
                let cpuid = model.apply(&supported)?;
                Ok(CpuProps {
                    typename: format!("{}-x86_64-cpu", model.base().name()),
                    features: cpu_model::feature_states(&cpuid),
                    unavailable: model.unavailable_features(&supported),
                    identity: cpu_model::identity(&cpuid),
                })
            })
            .as_ref()
            .map_err(|e| QmpError::generic(e.to_string()))
    }

    /// (socket, core, thread) of vCPU `index`.
    fn topology(&self, index: u8) -> (u32, u32, u32) {
        let cores = u32::from(self.cores.max(1));
        let threads = u32::from(self.threads.max(1));
        let i = u32::from(index);
        (i / (cores * threads), (i / threads) % cores, i % threads)
    }

    fn cpu_index(path: &str) -> Option<u8> {
        path.strip_prefix(CPU_PATH_PREFIX)?
            .strip_suffix(']')?
            .parse()
            .ok()
    }
}

/// The host thread of vCPU `index` (hopvm names them `vcpuN`).
fn vcpu_thread_id(index: u8) -> Option<i64> {
    let want = format!("vcpu{index}");
    std::fs::read_dir("/proc/self/task").ok()?.find_map(|e| {
        let e = e.ok()?;
        let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
        (comm.trim_end() == want)
            .then(|| e.file_name().to_str()?.parse().ok())
            .flatten()
    })
}

fn prop(name: &str, ty: &str) -> Value {
    json!({"name": name, "type": ty})
}

fn device_not_found(path: &str) -> QmpError {
    QmpError::new(
        ErrorClass::DeviceNotFound,
        format!("Device '{path}' not found"),
    )
}

fn qom_list(d: &DomainInfo, path: &str) -> Result<Value, QmpError> {
    let mut out = vec![prop("type", "string")];
    match path {
        "/" => out.push(prop("machine", "child<pc-i440fx-7.2-machine>")),
        "/machine" => {
            out.push(prop("peripheral", "child<container>"));
            out.push(prop("unattached", "child<container>"));
        }
        "/machine/peripheral" => {
            for (id, ty) in &d.peripherals {
                out.push(prop(id, &format!("child<{ty}>")));
            }
        }
        "/machine/unattached" => {
            let ty = d.cpu_props()?.typename.clone();
            for i in 0..d.cpus {
                out.push(prop(&format!("device[{i}]"), &format!("child<{ty}>")));
            }
        }
        p => match DomainInfo::cpu_index(p).filter(|i| *i < d.cpus) {
            Some(_) => {
                let c = d.cpu_props()?;
                for name in ["realized", "hotplugged", "hotpluggable"] {
                    out.push(prop(name, "bool"));
                }
                for name in ["vendor", "model-id"] {
                    out.push(prop(name, "string"));
                }
                for name in ["family", "model", "stepping"] {
                    out.push(prop(name, "int"));
                }
                for (name, _) in &c.features {
                    out.push(prop(name, "bool"));
                }
                out.push(prop("unavailable-features", "strList"));
            }
            None => return Err(device_not_found(p)),
        },
    }
    Ok(Value::Array(out))
}

fn qom_get(d: &DomainInfo, path: &str, property: &str) -> Result<Value, QmpError> {
    let not_found = |ty: &str| QmpError::generic(format!("Property '{ty}.{property}' not found"));
    let Some(_) = DomainInfo::cpu_index(path).filter(|i| *i < d.cpus) else {
        return match (path, property) {
            ("/machine", "type") => Ok(json!("pc-i440fx-7.2-machine")),
            ("/machine/peripheral" | "/machine/unattached", "type") => Ok(json!("container")),
            ("/" | "/machine" | "/machine/peripheral" | "/machine/unattached", _) => {
                Err(not_found("container"))
            }
            _ => Err(device_not_found(path)),
        };
    };
    let c = d.cpu_props()?;
    let id = &c.identity;
    Ok(match property {
        "type" => json!(c.typename),
        "realized" => json!(true),
        "hotplugged" | "hotpluggable" => json!(false),
        "vendor" => json!(id.vendor),
        "model-id" => json!(id.model_id),
        "family" => json!(id.family),
        "model" => json!(id.model),
        "stepping" => json!(id.stepping),
        "unavailable-features" => json!(c.unavailable),
        name => match c.features.iter().find(|(n, _)| *n == name) {
            Some((_, on)) => json!(on),
            None => return Err(not_found(&c.typename)),
        },
    })
}

fn query_cpus_fast(d: &DomainInfo) -> Value {
    let list: Vec<Value> = (0..d.cpus)
        .map(|i| {
            let (socket, core, thread) = d.topology(i);
            let mut v = Map::new();
            v.insert("cpu-index".into(), json!(i));
            v.insert("qom-path".into(), json!(format!("{CPU_PATH_PREFIX}{i}]")));
            // The thread exists once the VM is built; 0 should never be seen.
            v.insert("thread-id".into(), json!(vcpu_thread_id(i).unwrap_or(0)));
            v.insert(
                "props".into(),
                json!({"socket-id": socket, "core-id": core, "thread-id": thread}),
            );
            v.insert("target".into(), json!("x86_64"));
            Value::Object(v)
        })
        .collect();
    Value::Array(list)
}

/// QEMU's `system_powerdown`: the POWERDOWN event, and the ACPI power button for a guest with
/// ACPI. hopvm's ACPI has no power button (no SCI) yet, so for such a guest it is refused
/// rather than pressed in vain; without ACPI (`-no-acpi`) QEMU too only sends the event.
pub fn system_powerdown(
    d: &DomainInfo,
    args: &Map<String, Value>,
    emit: impl FnOnce(&str, Option<Value>),
) -> Result<Value, QmpError> {
    Args::expect_none(args)?;
    if d.acpi {
        return Err(QmpError::generic(
            "hopvm has no ACPI power button yet: system_powerdown works only with -no-acpi",
        ));
    }
    emit("POWERDOWN", None);
    Ok(Value::Null)
}

/// Answers a domain command; `None` when `command` is not one.
pub fn execute(
    d: &DomainInfo,
    command: &str,
    args: &Map<String, Value>,
) -> Option<Result<Value, QmpError>> {
    let none = |args| Args::expect_none(args);
    Some(match command {
        "query-chardev" => none(args).map(|_| {
            Value::Array(
                d.chardevs
                    .iter()
                    .map(|c| {
                        json!({"frontend-open": true, "filename": c.filename, "label": c.label})
                    })
                    .collect(),
            )
        }),
        "query-cpus-fast" => none(args).map(|_| query_cpus_fast(d)),
        "qom-list" => (|| {
            let mut a = Args::new(args);
            let path = a.required_str("path")?;
            a.finish()?;
            qom_list(d, path)
        })(),
        "qom-get" => (|| {
            let mut a = Args::new(args);
            let path = a.required_str("path")?;
            let property = a.required_str("property")?;
            a.finish()?;
            qom_get(d, path, property)
        })(),
        // No I/O threads, block devices or block jobs: libvirt asks for the jobs when it
        // reconnects to a running guest (after a libvirtd restart).
        "query-iothreads" | "query-block" | "query-jobs" => none(args).map(|_| json!([])),
        "query-named-block-nodes" => (|| {
            let mut a = Args::new(args);
            let _flat = a.optional_bool("flat")?;
            a.finish()?;
            Ok(json!([]))
        })(),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn qom_tree_of_a_guest() {
        let mut d = DomainInfo::new("qemu64,svm=off", 2);
        d.peripherals
            .push((String::from("serial0"), String::from("isa-serial")));
        d.chardevs.push(ChardevInfo {
            label: String::from("charserial0"),
            filename: String::from("file"),
        });
        let list = execute(
            &d,
            "qom-list",
            &args(json!({"path": "/machine/peripheral"})),
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            list[1],
            json!({"name": "serial0", "type": "child<isa-serial>"})
        );
        let cpu = json!({"path": "/machine/unattached/device[1]", "property": "svm"});
        assert_eq!(
            execute(&d, "qom-get", &args(cpu)).unwrap().unwrap(),
            json!(false)
        );
        let lm = json!({"path": "/machine/unattached/device[0]", "property": "lm"});
        assert_eq!(
            execute(&d, "qom-get", &args(lm)).unwrap().unwrap(),
            json!(true)
        );
        let bad = json!({"path": "/machine/unattached/device[2]"});
        let err = execute(&d, "qom-list", &args(bad)).unwrap().unwrap_err();
        assert_eq!(err.class, ErrorClass::DeviceNotFound);
        let cpus = execute(&d, "query-cpus-fast", &Map::new())
            .unwrap()
            .unwrap();
        assert_eq!(cpus.as_array().unwrap().len(), 2);
        assert_eq!(cpus[1]["props"]["socket-id"], 1);
        let chardevs = execute(&d, "query-chardev", &Map::new()).unwrap().unwrap();
        assert_eq!(chardevs[0]["label"], "charserial0");
    }
}
