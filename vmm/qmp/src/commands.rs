//! hopvm's QMP commands: one function per command, with QEMU's names, arguments, replies and
//! error texts.

use std::sync::Arc;

use migration::thread::{AnnounceParameters, Migration, MigrationInfo, MigrationStatus};
use migration::transport::NamedFds;
use serde_json::{json, Map, Value};

use crate::fds::MonitorFds;
use crate::protocol::{version_info, Args, QmpBackend, QmpError};
use crate::server::{QmpListenSpec, QmpServer, QmpServerConfig, QmpServerError};
use vmm::bus::lock;
use vmm::instance::Instance;
use vmm::runstate::RunState;
use vmm::vcpu::VmEvent;

/// Every command hopvm implements.
pub const COMMANDS: &[&str] = &[
    "qmp_capabilities",
    "query-version",
    "query-commands",
    "query-status",
    "stop",
    "cont",
    "system_reset",
    "system_wakeup",
    "quit",
    "migrate",
    "migrate-incoming",
    "migrate_cancel",
    "migrate-continue",
    "query-migrate",
    "migrate-set-capabilities",
    "query-migrate-capabilities",
    "migrate-set-parameters",
    "query-migrate-parameters",
    "migrate_set_speed",
    "migrate_set_downtime",
    "migrate-set-cache-size",
    "query-migrate-cache-size",
    "x-query-migration-timeline",
    "pmemsave",
    "getfd",
    "closefd",
    "object-add",
    "object-del",
    "announce-self",
];

/// Migration capabilities hopvm implements.
const CAPABILITIES: &[&str] = &[
    "xbzrle",
    "events",
    "x-integrity",
    "return-path",
    "auto-converge",
    "pause-before-switchover",
    "late-block-activate",
    "multifd",
    "block",
];
/// QEMU's other capabilities: known, refused with a clear error.
const QEMU_CAPABILITIES: &[&str] = &[
    "rdma-pin-all",
    "zero-blocks",
    "compress",
    "postcopy-ram",
    "x-colo",
    "release-ram",
    "dirty-bitmaps",
    "postcopy-blocktime",
    "x-ignore-shared",
    "validate-uuid",
    "background-snapshot",
    "zero-copy-send",
    "postcopy-preempt",
];

/// QEMU's other migration parameters: known, refused with a clear error.
const QEMU_PARAMETERS: &[&str] = &[
    "compress-level",
    "compress-threads",
    "compress-wait-thread",
    "decompress-threads",
    "x-checkpoint-delay",
    "multifd-compression",
    "multifd-zlib-level",
    "multifd-zstd-level",
    "max-postcopy-bandwidth",
];

/// Largest downtime limit, ms (QEMU's MAX_MIGRATE_DOWNTIME: 2000 s).
const MAX_DOWNTIME_MS: u64 = 2_000_000;

/// Starts the QMP monitor for `instance` on `spec` (`unix:PATH`) and routes the instance's
/// events to it; the guest is described as one `host` vCPU (see [`start_monitor_with`]).
pub fn start_monitor(instance: &Arc<Instance>, spec: &str) -> Result<QmpServer, QmpServerError> {
    let spec: QmpListenSpec = spec.parse()?;
    let commands = Commands::new(instance.clone()).held();
    let gate = Arc::clone(&commands.events_wired);
    let server = QmpServer::bind(&spec, Arc::new(commands), QmpServerConfig::default())?;
    let events = server.events();
    instance.set_event_emitter(Box::new(move |name, data| events.emit(name, data)));
    gate.open();
    Ok(server)
}

/// Where a monitor listens: a `--qmp` address, or a listening socket handed over by the
/// parent (`-chardev socket,fd=N,server=on`).
pub enum MonitorListen {
    /// `unix:PATH` / `tcp:HOST:PORT` with options.
    Spec(String),
    /// An inherited listening socket.
    Listener(std::os::unix::net::UnixListener),
}

/// Starts the QMP monitor for `instance`, describing the guest with `domain` (its chardevs,
/// vCPUs and devices), and routes the instance's events to it.
pub fn start_monitor_with(
    instance: &Arc<Instance>,
    listen: MonitorListen,
    domain: crate::domain::DomainInfo,
) -> Result<QmpServer, QmpServerError> {
    let mut commands = Commands::new(instance.clone()).held();
    commands.domain = Arc::new(domain);
    let gate = Arc::clone(&commands.events_wired);
    let backend = Arc::new(commands);
    let server = match listen {
        MonitorListen::Spec(spec) => {
            let spec: QmpListenSpec = spec.parse()?;
            let tls = match &spec.tls_creds {
                None => None,
                Some(id) => Some(
                    instance
                        .migration
                        .tls
                        .server_for(id, spec.tls_authz.as_deref())
                        .map_err(QmpServerError::Tls)?,
                ),
            };
            QmpServer::bind_tls(&spec, backend, QmpServerConfig::default(), tls)?
        }
        MonitorListen::Listener(l) => {
            QmpServer::from_unix_listener(l, backend, QmpServerConfig::default())?
        }
    };
    let events = server.events();
    instance.set_event_emitter(Box::new(move |name, data| events.emit(name, data)));
    gate.open();
    Ok(server)
}

/// Shut until the instance's events go to the monitor: a client quick enough to send
/// commands while the monitor was being set up (the server accepts at once) would otherwise
/// lose the events they cause (a `cont`'s RESUME, a `migrate-incoming`'s MIGRATION).
#[derive(Debug, Default)]
struct Gate {
    open: std::sync::Mutex<bool>,
    opened: std::sync::Condvar,
}

impl Gate {
    fn open(&self) {
        *lock(&self.open) = true;
        self.opened.notify_all();
    }

    fn wait(&self) {
        let mut open = lock(&self.open);
        while !*open {
            open = self.opened.wait(open).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// The QMP commands of one [`Instance`].
pub struct Commands {
    instance: Arc<Instance>,
    host: std::sync::OnceLock<crate::probe::HostInfo>,
    domain: Arc<crate::domain::DomainInfo>,
    /// Commands wait for it ([`Gate`]).
    events_wired: Arc<Gate>,
}

impl Commands {
    /// Commands acting on `instance`.
    pub fn new(instance: Arc<Instance>) -> Self {
        Self {
            instance,
            host: std::sync::OnceLock::new(),
            domain: Arc::new(crate::domain::DomainInfo::new("host", 1)),
            events_wired: Arc::new(Gate {
                open: std::sync::Mutex::new(true),
                opened: std::sync::Condvar::new(),
            }),
        }
    }

    /// Commands that wait until [`Gate::open`] (the monitor's events are wired).
    fn held(mut self) -> Self {
        self.events_wired = Arc::new(Gate::default());
        self
    }

    /// The host as the introspection commands describe it (looked at once, on first use).
    fn host(&self) -> &crate::probe::HostInfo {
        self.host
            .get_or_init(|| crate::probe::HostInfo::probe(true))
    }

    fn query_status(&self) -> Value {
        let rs = self.instance.runstate();
        json!({"status": rs.as_str(), "singlestep": false, "running": rs == RunState::Running})
    }

    fn migrate(&self, args: &Map<String, Value>, fds: &MonitorFds) -> Result<Value, QmpError> {
        let mut a = Args::new(args);
        let uri = a.required_str("uri")?;
        let blk = a.optional_bool("blk")?.unwrap_or(false);
        let inc = a.optional_bool("inc")?.unwrap_or(false);
        let _detach = a.optional_bool("detach")?;
        let resume = a.optional_bool("resume")?.unwrap_or(false);
        a.finish()?;
        if resume {
            return Err(QmpError::generic(
                "not supported: hopvm has no postcopy to resume",
            ));
        }
        let m = &self.instance.migration;
        if blk || inc {
            // As QEMU: for this migration only (the `block` section forgets them at its end).
            if m.status().is_running() {
                return Err(QmpError::generic("There's a migration process in progress"));
            }
            let mut s = lock(&m.block.settings);
            s.blk = blk;
            s.inc = inc;
        }
        self.instance
            .migrate_with(uri, Some(fds as &dyn NamedFds))
            .map(|_| Value::Null)
            .map_err(|e| {
                if blk || inc {
                    let mut s = lock(&m.block.settings);
                    s.blk = false;
                    s.inc = false;
                }
                QmpError::generic(e.to_string())
            })
    }

    fn migrate_incoming(
        &self,
        args: &Map<String, Value>,
        fds: &MonitorFds,
    ) -> Result<Value, QmpError> {
        let mut a = Args::new(args);
        let uri = a.required_str("uri")?;
        a.finish()?;
        if self.instance.incoming_status().is_some() {
            return Err(QmpError::generic(
                "The incoming migration has already been started",
            ));
        }
        if !self.instance.incoming_deferred() {
            return Err(QmpError::generic(
                "'-incoming' was not specified on the command line",
            ));
        }
        self.instance
            .incoming_with(uri, Some(fds as &dyn NamedFds))
            .map(|_| Value::Null)
            .map_err(|e| QmpError::generic(e.to_string()))
    }

    /// QEMU's `migrate-continue`: the paused (`pause-before-switchover`) migration goes on.
    fn migrate_continue(&self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        let mut a = Args::new(args);
        let name = a.required_str("state")?;
        a.finish()?;
        let m = &self.instance.migration;
        // hopvm's states (the schema's MigrationStatus): no postcopy, COLO or unplug ones.
        let state = MigrationStatus::from_qemu_name(name)
            .ok_or_else(|| QmpError::invalid_enum_value("state", name))?;
        m.continue_from(state)
            .map(|()| Value::Null)
            .map_err(|e| QmpError::generic(e.to_string()))
    }

    /// As QEMU's `qmp_query_migrate`: an outgoing migration, once one was started, is what
    /// `query-migrate` describes; the incoming migration that brought the guest here shows only
    /// until then.
    fn query_migrate(&self) -> Value {
        let info = self.instance.migration.info();
        if info.status == MigrationStatus::None {
            if let Some(status) = self.instance.incoming_status() {
                return json!({"status": status.as_str()});
            }
        }
        migrate_info_json(&info)
    }

    fn set_capabilities(&self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        let mut a = Args::new(args);
        let list = a.required_array("capabilities")?;
        let mut changes = Vec::new();
        for mut cap in list.objects()? {
            let name = cap.required_str("capability")?;
            let state = cap.required_bool("state")?;
            cap.finish()?;
            if !CAPABILITIES.contains(&name) {
                if QEMU_CAPABILITIES.contains(&name) {
                    return Err(QmpError::generic(format!(
                        "hopvm does not support the migration capability '{name}'"
                    )));
                }
                return Err(QmpError::invalid_enum_value("capability", name));
            }
            changes.push((name, state));
        }
        a.finish()?;
        let m = &self.instance.migration;
        if m.status().is_running() {
            return Err(QmpError::generic("There's a migration process in progress"));
        }
        for (name, state) in changes {
            match name {
                "xbzrle" => lock(&m.xbzrle).enabled = state,
                "x-integrity" => m.set_integrity_enabled(state),
                "return-path" => m.set_return_path_enabled(state),
                "auto-converge" => m.set_auto_converge_enabled(state),
                "pause-before-switchover" => m.set_pause_before_switchover_enabled(state),
                "late-block-activate" => m.set_late_block_activate_enabled(state),
                "multifd" => m.multifd.set_enabled(state),
                "block" => lock(&m.block.settings).capability = state,
                _ => m.set_events_enabled(state),
            }
        }
        Ok(Value::Null)
    }

    fn query_capabilities(&self) -> Value {
        capabilities_json(&self.instance.migration)
    }

    fn set_parameters(&self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        if let Some(name) = QEMU_PARAMETERS.iter().find(|p| args.contains_key(**p)) {
            return Err(QmpError::generic(format!(
                "hopvm does not support the migration parameter '{name}'"
            )));
        }
        let mut a = Args::new(args);
        let bandwidth = a.optional_u64("max-bandwidth")?;
        let downtime = a.optional_u64("downtime-limit")?;
        let cache = a.optional_u64("xbzrle-cache-size")?;
        let m = &self.instance.migration;
        let mut throttle = m.throttle_parameters();
        let percent =
            |a: &mut Args, name: &str, field: &str, max: u64| match a.optional_u64(name)? {
                Some(v) if v < 1 || v > max => Err(QmpError::invalid_parameter_value(
                    field,
                    &format!("an integer in the range of 1 to {max}"),
                )),
                v => Ok(v.map(|v| v as u32)),
            };
        let threshold = percent(
            &mut a,
            "throttle-trigger-threshold",
            "throttle_trigger_threshold",
            100,
        )?;
        let initial = percent(&mut a, "cpu-throttle-initial", "cpu_throttle_initial", 99)?;
        let increment = percent(
            &mut a,
            "cpu-throttle-increment",
            "cpu_throttle_increment",
            99,
        )?;
        let tailslow = a.optional_bool("cpu-throttle-tailslow")?;
        let block_incremental = a.optional_bool("block-incremental")?;
        let channels = match a.optional_u64("multifd-channels")? {
            Some(v) if !(1..=255).contains(&v) => {
                return Err(QmpError::invalid_parameter_value(
                    "multifd_channels",
                    "a value between 1 and 255",
                ))
            }
            v => v.map(|v| v as u8),
        };
        let max_throttle = a.optional_u64("max-cpu-throttle")?;
        let announce = announce_parameters(&mut a, m.announce_parameters())?;
        // TLS: the credentials object's id ("" = plain), the name the destination's
        // certificate must carry ("" = the URI's host) and the authorization object the
        // source's certificate must satisfy on the destination ("" = any the CA signed). As
        // in QEMU, the ids are looked up when a channel opens, not here.
        let tls_creds = str_or_null(&mut a, "tls-creds")?;
        let tls_hostname = str_or_null(&mut a, "tls-hostname")?;
        let tls_authz = str_or_null(&mut a, "tls-authz")?;
        a.finish()?;
        throttle.trigger_threshold = threshold.unwrap_or(throttle.trigger_threshold);
        throttle.initial = initial.unwrap_or(throttle.initial);
        throttle.increment = increment.unwrap_or(throttle.increment);
        throttle.tailslow = tailslow.unwrap_or(throttle.tailslow);
        if let Some(v) = max_throttle {
            // As QEMU: checked against the initial percentage being set with it.
            if v < u64::from(throttle.initial) || v > 99 {
                return Err(QmpError::invalid_parameter_value(
                    "max_cpu_throttle",
                    "an integer in the range of cpu_throttle_initial to 99",
                ));
            }
            throttle.max = v as u32;
        }
        if let Some(d) = downtime {
            if d > MAX_DOWNTIME_MS {
                return Err(QmpError::invalid_parameter_value(
                    "downtime_limit",
                    "an integer in the range of 0 to 2000000 milliseconds",
                ));
            }
        }
        if let Some(c) = cache {
            check_cache_size(c)?;
        }
        m.set_throttle_parameters(throttle);
        m.set_announce_parameters(announce);
        if let Some(v) = tls_creds {
            m.tls.set_creds(v);
        }
        if let Some(v) = tls_hostname {
            m.tls.set_hostname(v);
        }
        if let Some(v) = tls_authz {
            m.tls.set_authz(v);
        }
        if let Some(b) = bandwidth {
            m.set_max_bandwidth(b);
        }
        if let Some(d) = downtime {
            m.set_downtime_limit_ms(d);
        }
        if let Some(c) = cache {
            lock(&m.xbzrle).cache_size = c;
        }
        if let Some(n) = channels {
            m.multifd.set_channels(n);
        }
        if let Some(b) = block_incremental {
            lock(&m.block.settings).incremental = b;
        }
        Ok(Value::Null)
    }

    fn query_parameters(&self) -> Value {
        parameters_json(&self.instance.migration)
    }

    fn set_speed(&self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        let mut a = Args::new(args);
        let value = a.required_i64("value")?;
        a.finish()?;
        self.instance
            .migration
            .set_max_bandwidth(value.max(0) as u64);
        Ok(Value::Null)
    }

    fn set_downtime(&self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        let mut a = Args::new(args);
        let seconds = a.required_f64("value")?;
        a.finish()?;
        if !(0.0..=(MAX_DOWNTIME_MS / 1000) as f64).contains(&seconds) {
            return Err(QmpError::invalid_parameter_value(
                "downtime_limit",
                "an integer in the range of 0 to 2000000 milliseconds",
            ));
        }
        self.instance
            .migration
            .set_downtime_limit_ms((seconds * 1000.0).round() as u64);
        Ok(Value::Null)
    }

    fn set_cache_size(&self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        let mut a = Args::new(args);
        let value = a.required_i64("value")?;
        a.finish()?;
        let value = u64::try_from(value).map_err(|_| {
            QmpError::invalid_parameter_value(
                "cache size",
                "a power of two no less than the target page size",
            )
        })?;
        check_cache_size(value)?;
        lock(&self.instance.migration.xbzrle).cache_size = value;
        Ok(Value::Null)
    }
}

/// A `StrOrNull` migration parameter (`tls-creds`, `tls-hostname`, `tls-authz`): JSON null
/// resets it to "", as in QEMU.
fn str_or_null<'a>(a: &mut Args<'a>, name: &str) -> Result<Option<&'a str>, QmpError> {
    match a.optional_value(name) {
        None => Ok(None),
        Some(Value::Null) => Ok(Some("")),
        Some(v) => v
            .as_str()
            .map(Some)
            .ok_or_else(|| QmpError::invalid_parameter_type(name, "string")),
    }
}

/// QEMU's `object-add`, for the object types hopvm has: `tls-creds-x509` (id, dir,
/// endpoint, verify-peer), loaded at once as QEMU does, and the authorization objects
/// `authz-simple` (identity), `authz-list` (policy, rules) and `authz-list-file` (filename,
/// refresh); `authz-pam` is refused.
fn object_add(inst: &Instance, args: &Map<String, Value>) -> Result<Value, QmpError> {
    use migration::transport::tls::{authz, TlsCredsX509, TlsObject};
    let mut a = Args::new(args);
    let ty = a.required_str("qom-type")?;
    if authz::is_authz_type(ty) {
        let object =
            TlsObject::authz_from_json(args).map_err(|e| QmpError::generic(e.to_string()))?;
        return inst
            .migration
            .tls
            .add_object(object)
            .map(|()| Value::Null)
            .map_err(|e| QmpError::generic(e.to_string()));
    }
    let id = a.required_str("id")?;
    if ty != "tls-creds-x509" {
        return Err(QmpError::invalid_parameter_value(
            "qom-type",
            "tls-creds-x509, authz-simple, authz-list or authz-list-file (the object types \
             hopvm creates)",
        ));
    }
    let dir = a.required_str("dir")?;
    let endpoint = a.optional_str("endpoint")?.unwrap_or("client");
    let verify = a.optional_bool("verify-peer")?.unwrap_or(true);
    let _ = a.optional_str("priority")?;
    a.finish()?;
    let verify = if verify { "on" } else { "off" };
    let creds = TlsCredsX509::from_props([
        ("id", id),
        ("dir", dir),
        ("endpoint", endpoint),
        ("verify-peer", verify),
    ])
    .map_err(|e| QmpError::generic(e.to_string()))?;
    inst.migration
        .tls
        .add_object(creds)
        .map(|()| Value::Null)
        .map_err(|e| QmpError::generic(e.to_string()))
}

/// QEMU's `pmemsave`: writes `size` bytes of guest physical memory from `val` to a file.
fn pmemsave(inst: &Instance, args: &Map<String, Value>) -> Result<Value, QmpError> {
    use vm_memory::{Bytes, GuestAddress};
    let mut a = Args::new(args);
    let addr = a.required_u64("val")?;
    let size = a.required_u64("size")?;
    let filename = a.required_str("filename")?;
    a.finish()?;
    let mut file = std::fs::File::create(filename)
        .map_err(|e| QmpError::generic(format!("Could not open '{filename}': {e}")))?;
    let invalid = || QmpError::generic(format!("Invalid addr {addr:#x}/size {size} specified"));
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0u64;
    while done < size {
        let n = (size - done).min(buf.len() as u64) as usize;
        let at = addr.checked_add(done).ok_or_else(invalid)?;
        inst.vm
            .memory
            .read_slice(&mut buf[..n], GuestAddress(at))
            .map_err(|_| invalid())?;
        std::io::Write::write_all(&mut file, &buf[..n])
            .map_err(|e| QmpError::generic(format!("writing {filename}: {e}")))?;
        done += n as u64;
    }
    Ok(Value::Null)
}

fn check_cache_size(size: u64) -> Result<(), QmpError> {
    if size < 4096 || !size.is_power_of_two() {
        return Err(QmpError::invalid_parameter_value(
            "xbzrle_cache_size",
            "a power of two no less than the target page size",
        ));
    }
    Ok(())
}

/// `query-migrate-capabilities`' reply (also the probe's, with its defaults).
pub(crate) fn capabilities_json(m: &Migration) -> Value {
    json!([
        {"state": lock(&m.xbzrle).enabled, "capability": "xbzrle"},
        {"state": m.events_enabled(), "capability": "events"},
        {"state": m.integrity_enabled(), "capability": "x-integrity"},
        {"state": m.return_path_enabled(), "capability": "return-path"},
        {"state": m.auto_converge_enabled(), "capability": "auto-converge"},
        {"state": m.pause_before_switchover_enabled(), "capability": "pause-before-switchover"},
        {"state": m.late_block_activate_enabled(), "capability": "late-block-activate"},
        {"state": m.multifd.settings().enabled, "capability": "multifd"},
        {"state": lock(&m.block.settings).capability, "capability": "block"},
    ])
}

/// The `announce-*` members of `migrate-set-parameters` over `current`, checked as QEMU 7.2's
/// `migrate_params_check` does (with its texts).
fn announce_parameters(
    a: &mut Args<'_>,
    current: AnnounceParameters,
) -> Result<AnnounceParameters, QmpError> {
    let mut p = current;
    for (name, field, low, high, value) in [
        (
            "announce-initial",
            "announce_initial",
            0,
            100_000,
            &mut p.initial,
        ),
        ("announce-max", "announce_max", 0, 100_000, &mut p.max),
        ("announce-rounds", "announce_rounds", 0, 1000, &mut p.rounds),
        ("announce-step", "announce_step", 1, 10_000, &mut p.step),
    ] {
        if let Some(v) = a.optional_u64(name)? {
            if v < low || v > high {
                // QEMU's text says 0 for announce_step too, which refuses 0.
                return Err(QmpError::invalid_parameter_value(
                    field,
                    &format!("a value between 0 and {high}"),
                ));
            }
            *value = v;
        }
    }
    Ok(p)
}

/// QMP `announce-self` (QEMU's `AnnounceParameters`: `initial`, `max`, `rounds`, `step`, all
/// required and unchecked as in QEMU, `interfaces`, `id`).
fn announce_self(inst: &Instance, args: &Map<String, Value>) -> Result<Value, QmpError> {
    let mut a = Args::new(args);
    let int = |a: &mut Args<'_>, name| a.required_i64(name).map(|v| v.max(0) as u64);
    let params = AnnounceParameters {
        initial: int(&mut a, "initial")?,
        max: int(&mut a, "max")?,
        rounds: int(&mut a, "rounds")?,
        step: int(&mut a, "step")?,
    };
    let interfaces = match a.optional_array("interfaces")? {
        Some(l) => Some(l.strs()?.into_iter().map(String::from).collect()),
        None => None,
    };
    let id = a.optional_str("id")?.unwrap_or("").to_string();
    a.finish()?;
    inst.announce_self(vmm::announce::AnnounceTimer::Named(id), params, interfaces);
    Ok(Value::Null)
}

/// `query-migrate-parameters`' reply (also the probe's, with its defaults).
pub(crate) fn parameters_json(m: &Migration) -> Value {
    let t = m.throttle_parameters();
    let an = m.announce_parameters();
    json!({
        "announce-initial": an.initial,
        "announce-max": an.max,
        "announce-rounds": an.rounds,
        "announce-step": an.step,
        "max-bandwidth": m.max_bandwidth(),
        "downtime-limit": m.downtime_limit_ms(),
        "xbzrle-cache-size": lock(&m.xbzrle).cache_size,
        "throttle-trigger-threshold": t.trigger_threshold,
        "cpu-throttle-initial": t.initial,
        "cpu-throttle-increment": t.increment,
        "cpu-throttle-tailslow": t.tailslow,
        "max-cpu-throttle": t.max,
        "multifd-channels": m.multifd.settings().channels,
        "tls-creds": m.tls.creds(),
        "tls-hostname": m.tls.hostname(),
        "tls-authz": m.tls.authz(),
        "block-incremental": lock(&m.block.settings).incremental,
    })
}

/// `query-migrate`'s reply for the source, shaped per state as QEMU's
/// `fill_source_migration_info`.
pub fn migrate_info_json(i: &MigrationInfo) -> Value {
    let mut v = Map::new();
    match i.status {
        MigrationStatus::None => return json!({}),
        MigrationStatus::Setup => {
            v.insert("status".into(), json!("setup"));
            return Value::Object(v);
        }
        MigrationStatus::Cancelled => return json!({"status": "cancelled"}),
        MigrationStatus::Failed => {
            v.insert("status".into(), json!("failed"));
            if let Some(e) = &i.error {
                v.insert("error-desc".into(), json!(e));
            }
            return Value::Object(v);
        }
        _ => {}
    }
    v.insert("status".into(), json!(i.status.as_str()));
    v.insert("total-time".into(), json!(i.total_time_ms));
    v.insert("setup-time".into(), json!(i.setup_time_ms));
    if i.status == MigrationStatus::Completed {
        v.insert("downtime".into(), json!(i.downtime_ms));
    } else {
        v.insert("expected-downtime".into(), json!(i.expected_downtime_ms));
    }
    v.insert(
        "ram".into(),
        json!({
            "transferred": i.transferred,
            "remaining": i.remaining,
            "total": i.total,
            "duplicate": i.duplicate,
            "skipped": 0,
            "normal": i.normal,
            "normal-bytes": i.normal_bytes,
            "dirty-pages-rate": i.dirty_pages_rate,
            "mbps": i.mbps,
            "dirty-sync-count": i.dirty_sync_count,
            "page-size": 4096,
            "pages-per-second": i.pages_per_second,
            "precopy-bytes": i.precopy_bytes,
            "downtime-bytes": i.downtime_bytes,
            "postcopy-bytes": 0,
            "postcopy-requests": 0,
            "multifd-bytes": i.multifd_bytes,
            "dirty-sync-missed-zero-copy": 0,
        }),
    );
    if let Some(d) = &i.disk {
        // QEMU's `disk` is a MigrationStats whose only filled fields are these three.
        v.insert(
            "disk".into(),
            json!({
                "transferred": d.transferred,
                "remaining": d.remaining,
                "total": d.total,
                "duplicate": 0,
                "skipped": 0,
                "normal": 0,
                "normal-bytes": 0,
                "dirty-pages-rate": 0,
                "mbps": 0.0,
                "dirty-sync-count": 0,
                "page-size": 0,
                "pages-per-second": 0,
                "precopy-bytes": 0,
                "downtime-bytes": 0,
                "postcopy-bytes": 0,
                "postcopy-requests": 0,
                "multifd-bytes": 0,
                "dirty-sync-missed-zero-copy": 0,
            }),
        );
    }
    if i.cpu_throttle_percentage > 0 {
        v.insert(
            "cpu-throttle-percentage".into(),
            json!(i.cpu_throttle_percentage),
        );
    }
    if i.xbzrle {
        let lookups = i.xbzrle_pages + i.xbzrle_cache_miss;
        v.insert(
            "xbzrle-cache".into(),
            json!({
                "cache-size": i.xbzrle_cache_size,
                "bytes": i.xbzrle_bytes,
                "pages": i.xbzrle_pages,
                "cache-miss": i.xbzrle_cache_miss,
                "cache-miss-rate": if lookups > 0 { i.xbzrle_cache_miss as f64 / lookups as f64 } else { 0.0 },
                "encoding-rate": if i.xbzrle_bytes > 0 { (i.xbzrle_pages * 4096) as f64 / i.xbzrle_bytes as f64 } else { 0.0 },
                "overflow": i.xbzrle_overflow,
            }),
        );
    }
    Value::Object(v)
}

impl QmpBackend for Commands {
    fn execute(&self, command: &str, args: &Map<String, Value>) -> Result<Value, QmpError> {
        self.events_wired.wait();
        let none = |args| Args::expect_none(args);
        let inst = &self.instance;
        match command {
            "query-version" => none(args).map(|_| version_info()),
            "query-commands" => none(args).map(|_| {
                let all = COMMANDS
                    .iter()
                    .chain(crate::probe::INTROSPECTION_COMMANDS)
                    .chain(crate::domain::DOMAIN_COMMANDS);
                Value::Array(all.map(|c| json!({"name": c})).collect())
            }),
            "query-status" => none(args).map(|_| self.query_status()),
            "stop" => none(args).map(|_| {
                inst.stop();
                Value::Null
            }),
            "cont" => {
                none(args)?;
                inst.cont()
                    .map(|_| Value::Null)
                    .map_err(|e| QmpError::generic(e.to_string()))
            }
            "system_reset" => {
                none(args)?;
                inst.reset(false)
                    .map(|_| Value::Null)
                    .map_err(|e| QmpError::generic(e.to_string()))
            }
            "system_wakeup" => {
                none(args)?;
                if inst.runstate() != RunState::Suspended {
                    return Err(QmpError::generic(
                        "Unable to wake up: guest is not in suspended state",
                    ));
                }
                let _ = inst.vm.event_sender().send(VmEvent::Wakeup);
                Ok(Value::Null)
            }
            "system_powerdown" => {
                crate::domain::system_powerdown(&self.domain, args, |n, d| inst.emit(n, d))
            }
            "quit" => none(args).map(|_| {
                let _ = inst.vm.event_sender().send(VmEvent::Quit);
                Value::Null
            }),
            // Without the monitor's table `fd:` takes inherited numbers only.
            "migrate" => self.migrate(args, &MonitorFds::new()),
            "migrate-incoming" => self.migrate_incoming(args, &MonitorFds::new()),
            "migrate_cancel" => none(args).map(|_| {
                inst.migration.cancel();
                Value::Null
            }),
            "migrate-continue" => self.migrate_continue(args),
            "query-migrate" => none(args).map(|_| self.query_migrate()),
            "migrate-set-capabilities" => self.set_capabilities(args),
            "query-migrate-capabilities" => none(args).map(|_| self.query_capabilities()),
            "migrate-set-parameters" => self.set_parameters(args),
            "query-migrate-parameters" => none(args).map(|_| self.query_parameters()),
            "migrate_set_speed" => self.set_speed(args),
            "migrate_set_downtime" => self.set_downtime(args),
            "migrate-set-cache-size" => self.set_cache_size(args),
            "x-query-migration-timeline" => none(args)
                .map(|_| serde_json::to_value(inst.migration.timeline()).unwrap_or(Value::Null)),
            "pmemsave" => pmemsave(inst, args),
            "announce-self" => announce_self(inst, args),
            "object-add" => object_add(inst, args),
            "object-del" => {
                let mut a = Args::new(args);
                let id = a.required_str("id")?;
                a.finish()?;
                inst.migration
                    .tls
                    .remove_object(id)
                    .map(|()| Value::Null)
                    .map_err(|e| QmpError::generic(e.to_string()))
            }
            "query-migrate-cache-size" => {
                none(args).map(|_| json!(lock(&inst.migration.xbzrle).cache_size))
            }
            other => crate::probe::execute(self.host(), other, args)
                .or_else(|| crate::domain::execute(&self.domain, other, args))
                .unwrap_or_else(|| Err(QmpError::command_not_found(other))),
        }
    }

    fn execute_with_fds(
        &self,
        command: &str,
        args: &Map<String, Value>,
        fds: &MonitorFds,
    ) -> Result<Value, QmpError> {
        self.events_wired.wait();
        match command {
            "migrate" => self.migrate(args, fds),
            "migrate-incoming" => self.migrate_incoming(args, fds),
            _ => self.execute(command, args),
        }
    }

    fn has_command(&self, command: &str) -> bool {
        COMMANDS.contains(&command)
            || crate::probe::INTROSPECTION_COMMANDS.contains(&command)
            || crate::domain::DOMAIN_COMMANDS.contains(&command)
    }
}

#[cfg(test)]
mod schema_tests {
    use super::COMMANDS;
    use crate::probe::INTROSPECTION_COMMANDS;
    use crate::schema::COMMAND_DEFS;

    /// The schema describes exactly the commands the monitor implements.
    #[test]
    fn schema_lists_every_command() {
        let implemented: Vec<&str> = COMMANDS
            .iter()
            .chain(INTROSPECTION_COMMANDS)
            .chain(crate::domain::DOMAIN_COMMANDS)
            .copied()
            .collect();
        for c in &implemented {
            assert!(
                COMMAND_DEFS.iter().any(|d| d.name == *c),
                "{c} not in schema"
            );
        }
        for d in COMMAND_DEFS {
            assert!(implemented.contains(&d.name), "{} not implemented", d.name);
        }
    }

    /// The schema's migration capabilities and parameters are the ones the monitor takes.
    #[test]
    fn schema_lists_migration_settings() {
        let schema = crate::schema::qmp_schema();
        let entry = |name: &str| {
            schema
                .as_array()
                .unwrap()
                .iter()
                .find(|e| e["name"] == name)
                .cloned()
                .unwrap()
        };
        let caps: Vec<String> = entry("MigrationCapability")["values"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        let mut want: Vec<String> = super::CAPABILITIES.iter().map(|c| c.to_string()).collect();
        let mut have = caps;
        want.sort();
        have.sort();
        assert_eq!(have, want);
        for p in super::QEMU_PARAMETERS {
            assert!(
                !crate::schema::MIGRATION_PARAMETER_MEMBERS
                    .iter()
                    .any(|m| m.name == *p),
                "{p} is refused by migrate-set-parameters but in the schema"
            );
        }
    }
}
