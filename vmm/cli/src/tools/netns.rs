//! "Two hosts" on one machine: two network namespaces joined by a veth pair, made with
//! iproute2's `ip` (as a person would). `hopvm demo --transport netns` and the namespace
//! migration test use it.

use std::process::{Command, Stdio};

/// The source end's address (TEST-NET-1, RFC 5737: only ever assigned inside the namespaces).
pub const SRC_ADDR: &str = "192.0.2.1";
/// The destination end's address.
pub const DST_ADDR: &str = "192.0.2.2";

/// Why a namespace pair could not be made.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// `ip` could not be run.
    #[error("running ip (from iproute2): {0}")]
    Spawn(#[source] std::io::Error),
    /// `ip` failed.
    #[error("`{command}` failed: {output}")]
    Ip {
        /// The command line.
        command: String,
        /// Its stderr.
        output: String,
    },
}

/// Runs `ip ARGS`, failing with its stderr.
pub fn ip(args: &[&str]) -> Result<(), NetnsError> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(NetnsError::Spawn)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(NetnsError::Ip {
            command: format!("ip {}", args.join(" ")),
            output: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// Two network namespaces, `<prefix><pid>-src` and `<prefix><pid>-dst`, joined by a veth
/// pair with [`SRC_ADDR`] and [`DST_ADDR`] and their loopbacks up; deleted on drop (which
/// also deletes the veth pair). Needs root.
pub struct NetnsPair {
    names: Vec<String>,
}

impl NetnsPair {
    /// The source namespace.
    pub fn src(&self) -> &str {
        &self.names[0]
    }

    /// The destination namespace.
    pub fn dst(&self) -> &str {
        &self.names[1]
    }

    /// Creates the pair; `prefix` names the namespaces (the process id is appended, so
    /// concurrent users do not collide). What was created is deleted again on failure.
    pub fn create(prefix: &str) -> Result<Self, NetnsError> {
        let pid = std::process::id();
        let mut pair = Self { names: Vec::new() };
        for side in ["src", "dst"] {
            let name = format!("{prefix}{pid}-{side}");
            ip(&["netns", "add", &name])?;
            pair.names.push(name);
        }
        // veth names are at most 15 bytes: keep them short and unique per prefix and pid.
        let tag: String = prefix
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .skip(5)
            .take(2)
            .collect();
        let (a, b) = (format!("hv{tag}{pid}a"), format!("hv{tag}{pid}b"));
        let (ns_a, ns_b) = (pair.src().to_string(), pair.dst().to_string());
        ip(&[
            "link", "add", &a, "netns", &ns_a, "type", "veth", "peer", "name", &b, "netns", &ns_b,
        ])?;
        for (ns, dev, addr) in [(&ns_a, &a, SRC_ADDR), (&ns_b, &b, DST_ADDR)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(pair)
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = ip(&["netns", "delete", name]);
        }
    }
}
