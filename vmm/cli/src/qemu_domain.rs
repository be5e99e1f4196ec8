//! The parts of QEMU's command line a management tool (libvirt) uses to describe a domain,
//! beyond what a person types: options in JSON (`-object {…}`, `-device {…}`,
//! `-audiodev {…}`), objects (`secret`, `memory-backend-ram`), descriptors handed over at
//! start-up (`-add-fd` with `/dev/fdset/N` paths, `-chardev socket,fd=N`), and the guest's
//! make-up the monitor reports afterwards ([`DomainSetup`]).

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::qemu_cli::QemuCliError;
use vmm::qemu_opts::split_options;

/// Where COM1's output goes when a `-device isa-serial` names a chardev.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialTarget {
    /// A file by path (`-chardev file,path=P`).
    Path {
        /// The file.
        path: PathBuf,
        /// `append=on`: keep what is there.
        append: bool,
    },
    /// A descriptor handed over with `-add-fd` (`path=/dev/fdset/N`).
    Fd {
        /// The descriptor number.
        fd: i32,
    },
}

/// What the command line says about the domain beyond [`vmm::config::VmConfig`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DomainSetup {
    /// The monitor as an inherited listening socket.
    pub monitor_fd: Option<i32>,
    /// COM1's chardev, when `-device isa-serial` names one.
    pub serial: Option<SerialTarget>,
    /// `-no-shutdown`: a guest power-off stops the guest instead of ending hopvm.
    pub no_shutdown: bool,
    /// `-machine dump-guest-core=` (default on).
    pub dump_guest_core: bool,
    /// Character devices: (id, QEMU's `query-chardev` filename).
    pub chardevs: Vec<(String, String)>,
    /// Devices with an id: (id, type).
    pub peripherals: Vec<(String, String)>,
    /// `-smp cores=`.
    pub cores: u8,
    /// `-smp threads=`.
    pub threads: u8,
    /// `-sandbox on,…`: the seccomp filter to install.
    pub sandbox: Option<crate::sandbox::Sandbox>,
}

impl DomainSetup {
    /// Defaults: no chardevs, one core and thread per socket, core dumps with guest memory.
    pub fn new() -> Self {
        Self {
            dump_guest_core: true,
            cores: 1,
            threads: 1,
            ..Self::default()
        }
    }
}

/// An option's value as `key → value` strings: QEMU's `key=value,…` syntax or, when it starts
/// with `{`, a JSON object (scalars only; booleans as `on` / `off`). `implied` names the key a
/// bare first element stands for (`-object secret,id=…` → `qom-type=secret`).
pub fn option_map(
    opt: &str,
    value: &str,
    implied: &str,
) -> Result<BTreeMap<String, String>, QemuCliError> {
    let invalid = |why: String| QemuCliError::Invalid(format!("{opt} {value}"), why);
    let mut map = BTreeMap::new();
    if value.trim_start().starts_with('{') {
        let json: serde_json::Value =
            serde_json::from_str(value).map_err(|e| invalid(format!("JSON: {e}")))?;
        let obj = json
            .as_object()
            .ok_or_else(|| invalid(String::from("expected a JSON object")))?;
        for (k, v) in obj {
            let text = match v {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Bool(b) => String::from(if *b { "on" } else { "off" }),
                serde_json::Value::Number(n) => n.to_string(),
                other => return Err(invalid(format!("'{k}': unsupported value {other}"))),
            };
            map.insert(k.clone(), text);
        }
        return Ok(map);
    }
    for (i, part) in split_options(value).into_iter().enumerate() {
        match part.split_once('=') {
            Some((k, v)) => {
                map.insert(k.to_string(), v.to_string());
            }
            None if i == 0 && !implied.is_empty() => {
                map.insert(implied.to_string(), part);
            }
            None => {
                map.insert(part, String::from("on"));
            }
        }
    }
    Ok(map)
}

/// Takes the keys of `map` one by one and refuses what is left over.
pub struct Keys<'a> {
    opt: &'a str,
    map: BTreeMap<String, String>,
}

impl<'a> Keys<'a> {
    /// Keys of option `opt`.
    pub fn new(opt: &'a str, map: BTreeMap<String, String>) -> Self {
        Self { opt, map }
    }

    /// Removes and returns `key`.
    pub fn take(&mut self, key: &str) -> Option<String> {
        self.map.remove(key)
    }

    /// Removes `key`, which must be present.
    pub fn required(&mut self, key: &str) -> Result<String, QemuCliError> {
        self.take(key).ok_or_else(|| {
            QemuCliError::Invalid(
                self.opt.to_string(),
                format!("Parameter '{key}' is missing"),
            )
        })
    }

    /// Removes a boolean `key` (QEMU's on/off, yes/no, true/false).
    pub fn bool(&mut self, key: &str) -> Result<Option<bool>, QemuCliError> {
        match self.take(key) {
            None => Ok(None),
            Some(v) => match v.as_str() {
                "on" | "yes" | "true" => Ok(Some(true)),
                "off" | "no" | "false" => Ok(Some(false)),
                _ => Err(QemuCliError::Invalid(
                    self.opt.to_string(),
                    format!("Parameter '{key}' expects 'on' or 'off'"),
                )),
            },
        }
    }

    /// Removes `key` if it has exactly the value `only` (the one hopvm implements); another
    /// value is refused.
    pub fn only(&mut self, key: &str, only: &str) -> Result<(), QemuCliError> {
        match self.take(key) {
            Some(v) if v != only => Err(QemuCliError::UnsupportedValue(
                self.opt.to_string(),
                format!("{key}={v} (hopvm: {key}={only} only)"),
            )),
            _ => Ok(()),
        }
    }

    /// Refuses whatever key is left.
    pub fn finish(self) -> Result<(), QemuCliError> {
        match self.map.into_iter().next() {
            None => Ok(()),
            Some((k, v)) => Err(QemuCliError::UnsupportedValue(
                self.opt.to_string(),
                format!("{k}={v}"),
            )),
        }
    }
}

/// A `-object`: what hopvm keeps of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QemuObject {
    /// `secret` (libvirt's master key): checked, not used — hopvm has no encrypted disks or
    /// passwords for it to decrypt.
    Secret,
    /// `memory-backend-ram` of this many bytes.
    MemoryBackendRam(u64),
    /// `tls-creds-x509`, checked (its files read); the canonical `-object` value to create
    /// it from at start.
    TlsCredsX509(String),
    /// `authz-simple`, `authz-list`, `authz-list-file` (`tls-authz`), checked; the `-object`
    /// value (key=value or JSON) to create it from at start.
    Authz(String),
    /// `rng-random` (on `/dev/urandom` or `/dev/random`) or `rng-builtin`: an entropy backend
    /// for `virtio-rng-pci`, which hopvm feeds from `getrandom(2)` either way.
    Rng,
}

/// Parses one `-object`; returns its id and what it is.
pub fn parse_object(value: &str) -> Result<(String, QemuObject), QemuCliError> {
    let opt = "-object";
    // Authorization objects have nested properties (an authz-list's rules): their own parser.
    if vmm::objects::object_type(value)
        .is_some_and(|ty| migration::transport::tls::authz::is_authz_type(&ty))
    {
        let object = vmm::objects::parse_object(value)
            .map_err(|e| QemuCliError::Invalid(format!("{opt} {value}"), e.to_string()))?;
        return Ok((object.id().to_owned(), QemuObject::Authz(value.to_owned())));
    }
    let mut k = Keys::new(opt, option_map(opt, value, "qom-type")?);
    let ty = k.required("qom-type")?;
    let id = k.required("id")?;
    let object = match ty.as_str() {
        "secret" => {
            match k.take("format").as_deref() {
                None | Some("raw" | "base64") => {}
                Some(f) => {
                    return Err(QemuCliError::Invalid(
                        format!("{opt} {value}"),
                        format!("format '{f}': expected raw or base64"),
                    ))
                }
            }
            match (k.take("file"), k.take("data")) {
                (Some(file), None) => {
                    std::fs::metadata(&file).map_err(|e| {
                        QemuCliError::Invalid(
                            format!("{opt} {value}"),
                            format!("Unable to read {file}: {e}"),
                        )
                    })?;
                }
                (None, Some(_)) => {}
                _ => {
                    return Err(QemuCliError::Invalid(
                        format!("{opt} {value}"),
                        String::from("exactly one of 'file' and 'data' is required"),
                    ))
                }
            }
            QemuObject::Secret
        }
        "memory-backend-ram" => {
            let size = k.required("size")?;
            let bytes = vmm::config::parse_size_with_unit(&size, 1)
                .map_err(|e| QemuCliError::Invalid(format!("{opt} {value}"), e.to_string()))?;
            // share=off and prealloc=off are what hopvm's anonymous private memory is.
            k.only("share", "off")?;
            k.only("prealloc", "off")?;
            QemuObject::MemoryBackendRam(bytes)
        }
        "tls-creds-x509" => {
            let dir = k.required("dir")?;
            let endpoint = k.take("endpoint").unwrap_or_else(|| String::from("client"));
            let verify = k.take("verify-peer").unwrap_or_else(|| String::from("on"));
            let _ = k.take("priority");
            let spec = format!(
                "tls-creds-x509,id={id},dir={dir},endpoint={endpoint},verify-peer={verify}"
            );
            migration::transport::tls::TlsCredsX509::parse_object(&spec)
                .map_err(|e| QemuCliError::Invalid(format!("{opt} {value}"), e.to_string()))?;
            QemuObject::TlsCredsX509(spec)
        }
        "rng-random" => {
            if let Some(f) = k.take("filename") {
                if f != "/dev/urandom" && f != "/dev/random" {
                    return Err(QemuCliError::UnsupportedValue(
                        opt.into(),
                        format!("filename={f} (hopvm: /dev/urandom or /dev/random)"),
                    ));
                }
            }
            QemuObject::Rng
        }
        "rng-builtin" => QemuObject::Rng,
        other => {
            return Err(QemuCliError::UnsupportedValue(
                opt.into(),
                format!("qom-type={other}"),
            ))
        }
    };
    k.finish()?;
    Ok((id, object))
}

/// `-add-fd set=N,fd=M[,opaque=…]`: returns (N, M).
pub fn parse_add_fd(value: &str) -> Result<(u32, i32), QemuCliError> {
    let opt = "-add-fd";
    let mut k = Keys::new(opt, option_map(opt, value, "")?);
    let number = |k: &mut Keys<'_>, key: &str| -> Result<i64, QemuCliError> {
        let v = k.required(key)?;
        v.parse()
            .map_err(|_| QemuCliError::Invalid(format!("{opt} {value}"), format!("{key}={v}")))
    };
    let fd = number(&mut k, "fd")?;
    let set = number(&mut k, "set")?;
    let _opaque = k.take("opaque");
    k.finish()?;
    if fd <= 2 {
        return Err(QemuCliError::Invalid(
            format!("{opt} {value}"),
            String::from("fd cannot be a standard I/O stream"),
        ));
    }
    let fd = i32::try_from(fd)
        .map_err(|_| QemuCliError::Invalid(format!("{opt} {value}"), String::from("fd")))?;
    let set = u32::try_from(set)
        .map_err(|_| QemuCliError::Invalid(format!("{opt} {value}"), String::from("set")))?;
    Ok((set, fd))
}

/// `-uuid`: QEMU's 8-4-4-4-12 hexadecimal form.
pub fn check_uuid(value: &str) -> Result<(), QemuCliError> {
    let groups: Vec<&str> = value.split('-').collect();
    let ok = groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_hexdigit()));
    if ok {
        Ok(())
    } else {
        Err(QemuCliError::Invalid(
            format!("-uuid {value}"),
            String::from("Fail to parse UUID string"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_key_value_forms() {
        let a = option_map(
            "-device",
            r#"{"driver":"isa-serial","index":0,"x":true}"#,
            "driver",
        )
        .unwrap();
        let b = option_map("-device", "isa-serial,index=0,x", "driver").unwrap();
        assert_eq!(a, b);
        assert!(option_map("-device", "{\"driver\":", "driver").is_err());
        assert!(option_map("-device", r#"{"a":[1]}"#, "driver").is_err());
    }

    #[test]
    fn objects() {
        let (id, o) =
            parse_object(r#"{"qom-type":"memory-backend-ram","id":"pc.ram","size":134217728}"#)
                .unwrap();
        assert_eq!(
            (id.as_str(), o),
            ("pc.ram", QemuObject::MemoryBackendRam(128 << 20))
        );
        let (_, o) = parse_object("memory-backend-ram,id=m,size=64M").unwrap();
        assert_eq!(o, QemuObject::MemoryBackendRam(64 << 20));
        assert!(parse_object("memory-backend-ram,id=m,size=64M,share=on").is_err());
        assert!(parse_object("memory-backend-file,id=m,size=64M,mem-path=/x").is_err());
        assert!(parse_object("secret,id=s,data=abc").is_ok());
        assert!(parse_object("secret,id=s,file=/nonexistent/key").is_err());
        assert!(parse_object("secret,id=s").is_err());
    }

    #[test]
    fn fd_sets_and_uuids() {
        assert_eq!(
            parse_add_fd("set=0,fd=31,opaque=serial0-source").unwrap(),
            (0, 31)
        );
        assert!(parse_add_fd("set=0,fd=1").is_err());
        assert!(parse_add_fd("set=0").is_err());
        assert!(check_uuid("9a061521-ce5a-4da2-9fa7-8cd95e573f09").is_ok());
        assert!(check_uuid("9a061521-ce5a-4da2-9fa7").is_err());
    }
}
