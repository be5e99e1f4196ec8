//! hopvm's QMP schema: one table describing every command hopvm's monitor implements (its
//! arguments and reply) and every event it sends, and `query-qmp-schema`'s reply generated from
//! it, in QEMU's `SchemaInfo` format (QAPI introspection).
//!
//! The table is hopvm's own: it lists what hopvm implements and nothing else, so a client that
//! reads capabilities from the schema (libvirt does, with paths such as
//! `query-named-block-nodes/arg-type/flat`) learns what hopvm can do. Type names are readable
//! (`q_obj_migrate-arg`, `MigrationInfo`) rather than QEMU's masked numbers; clients only follow
//! them. A unit test keeps the table and the monitor's command list in step.

use std::collections::BTreeSet;

use serde_json::{json, Map, Value};

/// The type of a member, an argument or a reply.
#[derive(Debug)]
pub enum Ty {
    /// A JSON string.
    Str,
    /// A JSON integer.
    Int,
    /// A JSON boolean.
    Bool,
    /// A JSON number.
    Number,
    /// Any JSON value.
    Any,
    /// One of a fixed set of strings.
    Enum(&'static EnumDef),
    /// A JSON object with known members.
    Object(&'static ObjectDef),
    /// A JSON array of one type.
    List(&'static Ty),
}

/// A named enumeration.
#[derive(Debug)]
pub struct EnumDef {
    /// Its name in the schema.
    pub name: &'static str,
    /// Its values.
    pub values: &'static [&'static str],
}

/// A named object type.
#[derive(Debug)]
pub struct ObjectDef {
    /// Its name in the schema.
    pub name: &'static str,
    /// Its members.
    pub members: &'static [Member],
}

/// A member of an object (or a command's argument).
#[derive(Debug)]
pub struct Member {
    /// Its name.
    pub name: &'static str,
    /// Its type.
    pub ty: Ty,
    /// Whether it may be left out.
    pub optional: bool,
}

/// A command: its arguments and its reply (`None`: an empty object).
#[derive(Debug)]
pub struct CommandDef {
    /// The command's name.
    pub name: &'static str,
    /// Its arguments.
    pub args: &'static [Member],
    /// Its reply.
    pub ret: Option<Ty>,
}

/// An event and its data members.
#[derive(Debug)]
pub struct EventDef {
    /// The event's name.
    pub name: &'static str,
    /// Its data.
    pub data: &'static [Member],
}

const fn m(name: &'static str, ty: Ty) -> Member {
    Member {
        name,
        ty,
        optional: false,
    }
}

const fn opt(name: &'static str, ty: Ty) -> Member {
    Member {
        name,
        ty,
        optional: true,
    }
}

const fn cmd(name: &'static str, args: &'static [Member], ret: Option<Ty>) -> CommandDef {
    CommandDef { name, args, ret }
}

// ---- enumerations ----

static QMP_CAPABILITY: EnumDef = EnumDef {
    name: "QMPCapability",
    values: &["oob"],
};
static RUN_STATE: EnumDef = EnumDef {
    name: "RunState",
    values: &[
        "finish-migrate",
        "inmigrate",
        "internal-error",
        "paused",
        "postmigrate",
        "prelaunch",
        "running",
        "shutdown",
        "suspended",
    ],
};
static MIGRATION_STATUS: EnumDef = EnumDef {
    name: "MigrationStatus",
    values: &[
        "none",
        "setup",
        "cancelling",
        "cancelled",
        "active",
        "completed",
        "failed",
        "pre-switchover",
        "device",
    ],
};
/// The migration capabilities hopvm implements.
static MIGRATION_CAPABILITY: EnumDef = EnumDef {
    name: "MigrationCapability",
    values: &[
        "xbzrle",
        "events",
        "return-path",
        "x-integrity",
        "auto-converge",
        "pause-before-switchover",
        "late-block-activate",
        "multifd",
        "block",
    ],
};
static SYS_EMU_TARGET: EnumDef = EnumDef {
    name: "SysEmuTarget",
    values: &["x86_64"],
};
static CPU_MODEL_EXPANSION_TYPE: EnumDef = EnumDef {
    name: "CpuModelExpansionType",
    values: &["static", "full"],
};
static COMMAND_LINE_PARAMETER_TYPE: EnumDef = EnumDef {
    name: "CommandLineParameterType",
    values: &["string", "boolean", "number", "size"],
};
static SHUTDOWN_CAUSE: EnumDef = EnumDef {
    name: "ShutdownCause",
    values: &[
        "host-error",
        "host-qmp-quit",
        "host-signal",
        "guest-shutdown",
        "guest-reset",
    ],
};
static SCHEMA_META_TYPE: EnumDef = EnumDef {
    name: "SchemaMetaType",
    values: &[
        "builtin",
        "enum",
        "array",
        "object",
        "alternate",
        "command",
        "event",
    ],
};

// ---- object types ----

static VERSION_TRIPLE: ObjectDef = ObjectDef {
    name: "VersionTriple",
    members: &[
        m("major", Ty::Int),
        m("minor", Ty::Int),
        m("micro", Ty::Int),
    ],
};
static VERSION_INFO: ObjectDef = ObjectDef {
    name: "VersionInfo",
    members: &[
        m("qemu", Ty::Object(&VERSION_TRIPLE)),
        m("package", Ty::Str),
    ],
};
static COMMAND_INFO: ObjectDef = ObjectDef {
    name: "CommandInfo",
    members: &[m("name", Ty::Str)],
};
static STATUS_INFO: ObjectDef = ObjectDef {
    name: "StatusInfo",
    members: &[
        m("running", Ty::Bool),
        m("singlestep", Ty::Bool),
        m("status", Ty::Enum(&RUN_STATE)),
    ],
};
static MIGRATION_STATS: ObjectDef = ObjectDef {
    name: "MigrationStats",
    members: &[
        m("transferred", Ty::Int),
        m("remaining", Ty::Int),
        m("total", Ty::Int),
        m("duplicate", Ty::Int),
        m("skipped", Ty::Int),
        m("normal", Ty::Int),
        m("normal-bytes", Ty::Int),
        m("dirty-pages-rate", Ty::Int),
        m("mbps", Ty::Number),
        m("dirty-sync-count", Ty::Int),
        m("page-size", Ty::Int),
        m("pages-per-second", Ty::Int),
        m("precopy-bytes", Ty::Int),
        m("downtime-bytes", Ty::Int),
        m("postcopy-bytes", Ty::Int),
        m("postcopy-requests", Ty::Int),
        m("multifd-bytes", Ty::Int),
        m("dirty-sync-missed-zero-copy", Ty::Int),
    ],
};
static XBZRLE_CACHE_STATS: ObjectDef = ObjectDef {
    name: "XBZRLECacheStats",
    members: &[
        m("cache-size", Ty::Int),
        m("bytes", Ty::Int),
        m("pages", Ty::Int),
        m("cache-miss", Ty::Int),
        m("cache-miss-rate", Ty::Number),
        m("encoding-rate", Ty::Number),
        m("overflow", Ty::Int),
    ],
};
static MIGRATION_INFO: ObjectDef = ObjectDef {
    name: "MigrationInfo",
    members: &[
        opt("status", Ty::Enum(&MIGRATION_STATUS)),
        opt("ram", Ty::Object(&MIGRATION_STATS)),
        opt("disk", Ty::Object(&MIGRATION_STATS)),
        opt("xbzrle-cache", Ty::Object(&XBZRLE_CACHE_STATS)),
        opt("total-time", Ty::Int),
        opt("expected-downtime", Ty::Int),
        opt("downtime", Ty::Int),
        opt("setup-time", Ty::Int),
        opt("cpu-throttle-percentage", Ty::Int),
        opt("error-desc", Ty::Str),
    ],
};
static MIGRATION_CAPABILITY_STATUS: ObjectDef = ObjectDef {
    name: "MigrationCapabilityStatus",
    members: &[
        m("capability", Ty::Enum(&MIGRATION_CAPABILITY)),
        m("state", Ty::Bool),
    ],
};
/// The migration parameters hopvm implements.
pub(crate) static MIGRATION_PARAMETER_MEMBERS: &[Member] = &[
    opt("announce-initial", Ty::Int),
    opt("announce-max", Ty::Int),
    opt("announce-rounds", Ty::Int),
    opt("announce-step", Ty::Int),
    opt("max-bandwidth", Ty::Int),
    opt("downtime-limit", Ty::Int),
    opt("xbzrle-cache-size", Ty::Int),
    opt("throttle-trigger-threshold", Ty::Int),
    opt("cpu-throttle-initial", Ty::Int),
    opt("cpu-throttle-increment", Ty::Int),
    opt("cpu-throttle-tailslow", Ty::Bool),
    opt("max-cpu-throttle", Ty::Int),
    opt("multifd-channels", Ty::Int),
    opt("tls-creds", Ty::Str),
    opt("tls-hostname", Ty::Str),
    opt("tls-authz", Ty::Str),
    opt("block-incremental", Ty::Bool),
];
static MIGRATION_PARAMETERS: ObjectDef = ObjectDef {
    name: "MigrationParameters",
    members: MIGRATION_PARAMETER_MEMBERS,
};
static TARGET_INFO: ObjectDef = ObjectDef {
    name: "TargetInfo",
    members: &[m("arch", Ty::Enum(&SYS_EMU_TARGET))],
};
static KVM_INFO: ObjectDef = ObjectDef {
    name: "KvmInfo",
    members: &[m("enabled", Ty::Bool), m("present", Ty::Bool)],
};
static MACHINE_INFO: ObjectDef = ObjectDef {
    name: "MachineInfo",
    members: &[
        m("name", Ty::Str),
        opt("alias", Ty::Str),
        opt("is-default", Ty::Bool),
        m("cpu-max", Ty::Int),
        m("hotpluggable-cpus", Ty::Bool),
        m("numa-mem-supported", Ty::Bool),
        m("deprecated", Ty::Bool),
        opt("default-cpu-type", Ty::Str),
        opt("default-ram-id", Ty::Str),
    ],
};
static CPU_DEFINITION_INFO: ObjectDef = ObjectDef {
    name: "CpuDefinitionInfo",
    members: &[
        m("name", Ty::Str),
        opt("migration-safe", Ty::Bool),
        m("static", Ty::Bool),
        opt("unavailable-features", Ty::List(&Ty::Str)),
        m("typename", Ty::Str),
        opt("alias-of", Ty::Str),
        m("deprecated", Ty::Bool),
    ],
};
static CPU_MODEL_INFO: ObjectDef = ObjectDef {
    name: "CpuModelInfo",
    members: &[m("name", Ty::Str), opt("props", Ty::Any)],
};
static CPU_MODEL_EXPANSION_INFO: ObjectDef = ObjectDef {
    name: "CpuModelExpansionInfo",
    members: &[m("model", Ty::Object(&CPU_MODEL_INFO))],
};
static OBJECT_TYPE_INFO: ObjectDef = ObjectDef {
    name: "ObjectTypeInfo",
    members: &[
        m("name", Ty::Str),
        opt("abstract", Ty::Bool),
        opt("parent", Ty::Str),
    ],
};
static OBJECT_PROPERTY_INFO: ObjectDef = ObjectDef {
    name: "ObjectPropertyInfo",
    members: &[
        m("name", Ty::Str),
        m("type", Ty::Str),
        opt("description", Ty::Str),
        opt("default-value", Ty::Any),
    ],
};
static COMMAND_LINE_PARAMETER_INFO: ObjectDef = ObjectDef {
    name: "CommandLineParameterInfo",
    members: &[
        m("name", Ty::Str),
        m("type", Ty::Enum(&COMMAND_LINE_PARAMETER_TYPE)),
        opt("help", Ty::Str),
        opt("default", Ty::Str),
    ],
};
static COMMAND_LINE_OPTION_INFO: ObjectDef = ObjectDef {
    name: "CommandLineOptionInfo",
    members: &[
        m("option", Ty::Str),
        m(
            "parameters",
            Ty::List(&Ty::Object(&COMMAND_LINE_PARAMETER_INFO)),
        ),
    ],
};
static SCHEMA_INFO: ObjectDef = ObjectDef {
    name: "SchemaInfo",
    members: &[
        m("name", Ty::Str),
        m("meta-type", Ty::Enum(&SCHEMA_META_TYPE)),
    ],
};
static CHARDEV_INFO: ObjectDef = ObjectDef {
    name: "ChardevInfo",
    members: &[
        m("label", Ty::Str),
        m("filename", Ty::Str),
        m("frontend-open", Ty::Bool),
    ],
};
static CPU_INSTANCE_PROPERTIES: ObjectDef = ObjectDef {
    name: "CpuInstanceProperties",
    members: &[
        opt("socket-id", Ty::Int),
        opt("core-id", Ty::Int),
        opt("thread-id", Ty::Int),
    ],
};
static CPU_INFO_FAST: ObjectDef = ObjectDef {
    name: "CpuInfoFast",
    members: &[
        m("cpu-index", Ty::Int),
        m("qom-path", Ty::Str),
        m("thread-id", Ty::Int),
        opt("props", Ty::Object(&CPU_INSTANCE_PROPERTIES)),
        m("target", Ty::Enum(&SYS_EMU_TARGET)),
    ],
};
/// hopvm has no I/O threads, block devices or block jobs: these lists are always empty, so their
/// element types carry only the members that identify an entry.
static IOTHREAD_INFO: ObjectDef = ObjectDef {
    name: "IOThreadInfo",
    members: &[m("id", Ty::Str), m("thread-id", Ty::Int)],
};
static BLOCK_DEVICE_INFO: ObjectDef = ObjectDef {
    name: "BlockDeviceInfo",
    members: &[m("node-name", Ty::Str), m("file", Ty::Str)],
};
static JOB_INFO: ObjectDef = ObjectDef {
    name: "JobInfo",
    members: &[m("id", Ty::Str), m("status", Ty::Str)],
};
static BLOCK_INFO: ObjectDef = ObjectDef {
    name: "BlockInfo",
    members: &[m("device", Ty::Str), m("locked", Ty::Bool)],
};

/// Every command hopvm's monitor implements. `getfd` / `closefd` are answered by the session
/// itself ([`crate::fds`]).
pub static COMMAND_DEFS: &[CommandDef] = &[
    cmd(
        "qmp_capabilities",
        &[opt("enable", Ty::List(&Ty::Enum(&QMP_CAPABILITY)))],
        None,
    ),
    cmd("query-version", &[], Some(Ty::Object(&VERSION_INFO))),
    cmd(
        "query-commands",
        &[],
        Some(Ty::List(&Ty::Object(&COMMAND_INFO))),
    ),
    cmd("query-status", &[], Some(Ty::Object(&STATUS_INFO))),
    cmd("stop", &[], None),
    cmd("cont", &[], None),
    cmd("system_reset", &[], None),
    cmd("system_wakeup", &[], None),
    cmd("quit", &[], None),
    cmd(
        "migrate",
        &[
            m("uri", Ty::Str),
            opt("blk", Ty::Bool),
            opt("inc", Ty::Bool),
            opt("detach", Ty::Bool),
            opt("resume", Ty::Bool),
        ],
        None,
    ),
    cmd("migrate-incoming", &[m("uri", Ty::Str)], None),
    cmd("migrate_cancel", &[], None),
    cmd(
        "migrate-continue",
        &[m("state", Ty::Enum(&MIGRATION_STATUS))],
        None,
    ),
    cmd("query-migrate", &[], Some(Ty::Object(&MIGRATION_INFO))),
    cmd(
        "migrate-set-capabilities",
        &[m(
            "capabilities",
            Ty::List(&Ty::Object(&MIGRATION_CAPABILITY_STATUS)),
        )],
        None,
    ),
    cmd(
        "query-migrate-capabilities",
        &[],
        Some(Ty::List(&Ty::Object(&MIGRATION_CAPABILITY_STATUS))),
    ),
    cmd("migrate-set-parameters", MIGRATION_PARAMETER_MEMBERS, None),
    cmd(
        "query-migrate-parameters",
        &[],
        Some(Ty::Object(&MIGRATION_PARAMETERS)),
    ),
    cmd("migrate_set_speed", &[m("value", Ty::Int)], None),
    cmd("migrate_set_downtime", &[m("value", Ty::Number)], None),
    cmd("migrate-set-cache-size", &[m("value", Ty::Int)], None),
    cmd("query-migrate-cache-size", &[], Some(Ty::Int)),
    cmd("x-query-migration-timeline", &[], Some(Ty::Any)),
    cmd(
        "pmemsave",
        &[
            m("val", Ty::Int),
            m("size", Ty::Int),
            m("filename", Ty::Str),
        ],
        None,
    ),
    cmd("getfd", &[m("fdname", Ty::Str)], None),
    cmd("closefd", &[m("fdname", Ty::Str)], None),
    // QEMU's object-add is a union on qom-type; hopvm creates tls-creds-x509 and the authz
    // objects (an authz-list's `rules`, an array of objects, is not described here). Its
    // qom-type member is left out on purpose: libvirt takes `object-add/arg-type/qom-type`
    // as the sign that -object accepts JSON, which hopvm's QEMU front end does not parse.
    cmd(
        "object-add",
        &[
            m("id", Ty::Str),
            opt("dir", Ty::Str),
            opt("endpoint", Ty::Str),
            opt("verify-peer", Ty::Bool),
            opt("identity", Ty::Str),
            opt("policy", Ty::Str),
            opt("filename", Ty::Str),
            opt("refresh", Ty::Bool),
        ],
        None,
    ),
    cmd("object-del", &[m("id", Ty::Str)], None),
    cmd(
        "announce-self",
        &[
            m("initial", Ty::Int),
            m("max", Ty::Int),
            m("rounds", Ty::Int),
            m("step", Ty::Int),
            opt("interfaces", Ty::List(&Ty::Str)),
            opt("id", Ty::Str),
        ],
        None,
    ),
    // Introspection: what this hopvm binary and host provide (crate::probe).
    cmd("query-target", &[], Some(Ty::Object(&TARGET_INFO))),
    cmd("query-kvm", &[], Some(Ty::Object(&KVM_INFO))),
    cmd(
        "query-machines",
        &[],
        Some(Ty::List(&Ty::Object(&MACHINE_INFO))),
    ),
    cmd(
        "query-cpu-definitions",
        &[],
        Some(Ty::List(&Ty::Object(&CPU_DEFINITION_INFO))),
    ),
    cmd(
        "query-cpu-model-expansion",
        &[
            m("type", Ty::Enum(&CPU_MODEL_EXPANSION_TYPE)),
            m("model", Ty::Object(&CPU_MODEL_INFO)),
        ],
        Some(Ty::Object(&CPU_MODEL_EXPANSION_INFO)),
    ),
    cmd(
        "qom-list-types",
        &[opt("implements", Ty::Str), opt("abstract", Ty::Bool)],
        Some(Ty::List(&Ty::Object(&OBJECT_TYPE_INFO))),
    ),
    cmd(
        "qom-list-properties",
        &[m("typename", Ty::Str)],
        Some(Ty::List(&Ty::Object(&OBJECT_PROPERTY_INFO))),
    ),
    cmd(
        "device-list-properties",
        &[m("typename", Ty::Str)],
        Some(Ty::List(&Ty::Object(&OBJECT_PROPERTY_INFO))),
    ),
    cmd(
        "query-command-line-options",
        &[opt("option", Ty::Str)],
        Some(Ty::List(&Ty::Object(&COMMAND_LINE_OPTION_INFO))),
    ),
    cmd(
        "query-qmp-schema",
        &[],
        Some(Ty::List(&Ty::Object(&SCHEMA_INFO))),
    ),
    // The running machine (crate::domain).
    cmd(
        "query-chardev",
        &[],
        Some(Ty::List(&Ty::Object(&CHARDEV_INFO))),
    ),
    cmd(
        "query-cpus-fast",
        &[],
        Some(Ty::List(&Ty::Object(&CPU_INFO_FAST))),
    ),
    cmd(
        "qom-list",
        &[m("path", Ty::Str)],
        Some(Ty::List(&Ty::Object(&OBJECT_PROPERTY_INFO))),
    ),
    cmd(
        "qom-get",
        &[m("path", Ty::Str), m("property", Ty::Str)],
        Some(Ty::Any),
    ),
    cmd(
        "query-iothreads",
        &[],
        Some(Ty::List(&Ty::Object(&IOTHREAD_INFO))),
    ),
    cmd(
        "query-named-block-nodes",
        &[opt("flat", Ty::Bool)],
        Some(Ty::List(&Ty::Object(&BLOCK_DEVICE_INFO))),
    ),
    cmd("query-block", &[], Some(Ty::List(&Ty::Object(&BLOCK_INFO)))),
    cmd("query-jobs", &[], Some(Ty::List(&Ty::Object(&JOB_INFO)))),
    cmd("system_powerdown", &[], None),
];

/// Every event hopvm sends.
pub static EVENT_DEFS: &[EventDef] = &[
    EventDef {
        name: "SHUTDOWN",
        data: &[m("guest", Ty::Bool), m("reason", Ty::Enum(&SHUTDOWN_CAUSE))],
    },
    EventDef {
        name: "RESET",
        data: &[m("guest", Ty::Bool), m("reason", Ty::Enum(&SHUTDOWN_CAUSE))],
    },
    EventDef {
        name: "STOP",
        data: &[],
    },
    EventDef {
        name: "POWERDOWN",
        data: &[],
    },
    EventDef {
        name: "RESUME",
        data: &[],
    },
    EventDef {
        name: "SUSPEND",
        data: &[],
    },
    EventDef {
        name: "WAKEUP",
        data: &[],
    },
    EventDef {
        name: "MIGRATION",
        data: &[m("status", Ty::Enum(&MIGRATION_STATUS))],
    },
    EventDef {
        name: "MIGRATION_PASS",
        data: &[m("pass", Ty::Int)],
    },
];

/// The name of the empty object type: the arguments of a command without any, the reply of
/// a command without one, the data of an event without any.
const EMPTY: &str = "q_empty";

/// Builds the `SchemaInfo` list: entities first (commands, events), then the types they use,
/// each once.
struct Generator {
    out: Vec<Value>,
    seen: BTreeSet<String>,
}

impl Generator {
    fn add(&mut self, name: &str, entry: impl FnOnce() -> Value) {
        if self.seen.insert(name.to_string()) {
            let entry = entry();
            self.out.push(entry);
        }
    }

    /// The schema name of `ty`, recording its definition.
    fn ty(&mut self, ty: &Ty) -> String {
        let builtin = |g: &mut Self, name: &str, json_type: &str| {
            g.add(
                name,
                || json!({"name": name, "meta-type": "builtin", "json-type": json_type}),
            );
            name.to_string()
        };
        match ty {
            Ty::Str => builtin(self, "str", "string"),
            Ty::Int => builtin(self, "int", "int"),
            Ty::Bool => builtin(self, "bool", "boolean"),
            Ty::Number => builtin(self, "number", "number"),
            Ty::Any => builtin(self, "any", "value"),
            Ty::Enum(e) => {
                self.add(e.name, || {
                    json!({
                        "name": e.name,
                        "meta-type": "enum",
                        "members": e.values.iter().map(|v| json!({"name": v})).collect::<Vec<_>>(),
                        "values": e.values,
                    })
                });
                e.name.to_string()
            }
            Ty::Object(o) => self.object(o.name, o.members),
            Ty::List(element) => {
                let element = self.ty(element);
                let name = format!("[{element}]");
                self.add(
                    &name,
                    || json!({"name": name, "meta-type": "array", "element-type": element}),
                );
                name
            }
        }
    }

    fn object(&mut self, name: &str, members: &[Member]) -> String {
        if self.seen.contains(name) {
            return name.to_string();
        }
        // Reserve the slot first so that the object precedes its member types.
        self.seen.insert(name.to_string());
        let at = self.out.len();
        self.out.push(Value::Null);
        let members: Vec<Value> = members
            .iter()
            .map(|member| {
                let mut v = Map::new();
                v.insert("name".into(), json!(member.name));
                v.insert("type".into(), json!(self.ty(&member.ty)));
                if member.optional {
                    v.insert("default".into(), Value::Null);
                }
                Value::Object(v)
            })
            .collect();
        self.out[at] = json!({"name": name, "meta-type": "object", "members": members});
        name.to_string()
    }

    fn args(&mut self, owner: &str, members: &[Member]) -> String {
        if members.is_empty() {
            return self.object(EMPTY, &[]);
        }
        self.object(&format!("q_obj_{owner}-arg"), members)
    }
}

/// `query-qmp-schema`'s reply: hopvm's commands and events and the types they use.
pub fn qmp_schema() -> Value {
    let mut g = Generator {
        out: Vec::new(),
        seen: BTreeSet::new(),
    };
    // Entities and types share one namespace; command and event names never clash with the
    // type names above.
    let mut entities = Vec::new();
    for c in COMMAND_DEFS {
        let arg_type = g.args(c.name, c.args);
        let ret_type = match &c.ret {
            Some(ty) => g.ty(ty),
            None => g.object(EMPTY, &[]),
        };
        entities.push(json!({
            "name": c.name,
            "meta-type": "command",
            "arg-type": arg_type,
            "ret-type": ret_type,
        }));
    }
    for e in EVENT_DEFS {
        let arg_type = g.args(e.name, e.data);
        entities.push(json!({"name": e.name, "meta-type": "event", "arg-type": arg_type}));
    }
    entities.extend(g.out);
    Value::Array(entities)
}

/// Whether the schema has a command named `name`.
pub fn has_command(name: &str) -> bool {
    COMMAND_DEFS.iter().any(|c| c.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn by_name(schema: &Value) -> HashMap<String, Value> {
        schema
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e["name"].as_str().unwrap().to_string(), e.clone()))
            .collect()
    }

    /// Follows a libvirt-style path (`command/arg-type/member/...`), as libvirt's
    /// `virQEMUQAPISchemaPathGet` does for plain members.
    fn path_exists(schema: &HashMap<String, Value>, path: &str) -> bool {
        let mut parts = path.split('/');
        let Some(mut cur) = parts.next().and_then(|n| schema.get(n)) else {
            return false;
        };
        for part in parts {
            let next = match part {
                "arg-type" | "ret-type" => cur[part].as_str().map(str::to_string),
                member => cur["members"].as_array().and_then(|ms| {
                    ms.iter()
                        .find(|m| m["name"] == member)
                        .and_then(|m| m["type"].as_str().map(str::to_string))
                }),
            };
            let Some(mut name) = next else {
                return false;
            };
            // Arrays are looked through, as libvirt does.
            while let Some(element) = schema
                .get(&name)
                .filter(|t| t["meta-type"] == "array")
                .and_then(|t| t["element-type"].as_str())
            {
                name = element.to_string();
            }
            match schema.get(&name) {
                Some(t) => cur = t,
                None => return false,
            }
        }
        true
    }

    #[test]
    fn every_referenced_type_is_defined_once() {
        let schema = qmp_schema();
        let list = schema.as_array().unwrap();
        let names = by_name(&schema);
        assert_eq!(names.len(), list.len(), "duplicate names");
        for e in list {
            for key in ["arg-type", "ret-type", "element-type"] {
                if let Some(t) = e.get(key) {
                    assert!(names.contains_key(t.as_str().unwrap()), "{e}");
                }
            }
            for member in e["members"].as_array().into_iter().flatten() {
                if let Some(t) = member.get("type") {
                    assert!(names.contains_key(t.as_str().unwrap()), "{e}");
                }
            }
        }
    }

    #[test]
    fn libvirt_style_paths() {
        let schema = by_name(&qmp_schema());
        assert!(path_exists(
            &schema,
            "query-cpu-model-expansion/arg-type/model/name"
        ));
        assert!(path_exists(
            &schema,
            "migrate-set-parameters/arg-type/max-bandwidth"
        ));
        assert!(path_exists(&schema, "query-migrate/ret-type/ram/mbps"));
        assert!(path_exists(
            &schema,
            "query-named-block-nodes/arg-type/flat"
        ));
        assert!(path_exists(
            &schema,
            "query-cpus-fast/ret-type/props/core-id"
        ));
        // What hopvm does not implement is not there.
        assert!(!path_exists(
            &schema,
            "query-migrate/ret-type/blocked-reasons"
        ));
        assert!(!path_exists(&schema, "device_add"));
        assert!(!path_exists(&schema, "object-add/arg-type/qom-type"));
        assert_eq!(schema["SHUTDOWN"]["meta-type"], "event");
        assert_eq!(schema["query-status"]["arg-type"], EMPTY);
    }
}
