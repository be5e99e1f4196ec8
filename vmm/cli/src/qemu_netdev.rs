//! QEMU's `-netdev tap,id=…,ifname=…|fd=N` and `-device virtio-net-pci,netdev=…[,mac=][,addr=]`,
//! in the keyval or JSON syntax; the devices are resolved against the netdevs once the whole
//! command line is read.

use std::collections::BTreeMap;

use vmm::config::{parse_mac, NetConfig};

use crate::qemu_cli::QemuCliError;
use crate::qemu_domain::{option_map, Keys};

/// A `virtio-net-pci` waiting for its netdev.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PendingNic {
    netdev: String,
    mac: Option<[u8; 6]>,
    slot: Option<u8>,
    id: Option<String>,
}

/// A tap netdev: by name, or a descriptor handed over.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Tap {
    Name(String),
    Fd(i32),
}

/// The tap netdevs and virtio-net devices of one command line.
#[derive(Debug, Default)]
pub struct NetGraph {
    taps: BTreeMap<String, Tap>,
    nics: Vec<PendingNic>,
}

fn invalid(opt: &str, why: String) -> QemuCliError {
    QemuCliError::Invalid(opt.to_string(), why)
}

impl NetGraph {
    /// Adds a `-netdev`.
    pub fn add_netdev(&mut self, opt: &str, value: &str) -> Result<(), QemuCliError> {
        let mut k = Keys::new(opt, option_map(opt, value, "type")?);
        k.only("type", "tap")?;
        let id = k.required("id")?;
        let tap = match (k.take("ifname"), k.take("fd")) {
            (Some(name), None) => Tap::Name(name),
            (None, Some(fd)) => Tap::Fd(
                fd.parse()
                    .map_err(|_| invalid(opt, format!("fd={fd}: expected a descriptor number")))?,
            ),
            _ => {
                return Err(QemuCliError::UnsupportedValue(
                    opt.into(),
                    String::from("a tap needs exactly one of ifname= and fd="),
                ))
            }
        };
        // hopvm never runs scripts and has no vhost: only the values that say so.
        k.only("script", "no")?;
        k.only("downscript", "no")?;
        k.only("vhost", "off")?;
        k.finish()?;
        if self.taps.insert(id.clone(), tap).is_some() {
            return Err(invalid(opt, format!("Duplicate ID '{id}' for netdev")));
        }
        Ok(())
    }

    /// Adds a `-device virtio-net-pci` whose remaining keys are in `k` (`driver` and `id`
    /// already taken; `id` names the card for `announce-self`).
    pub fn add_device(
        &mut self,
        opt: &str,
        k: &mut Keys<'_>,
        id: Option<String>,
    ) -> Result<(), QemuCliError> {
        let netdev = k.required("netdev")?;
        k.only("bus", "pci.0")?;
        let mac = match k.take("mac") {
            None => None,
            Some(m) => Some(parse_mac(&m).ok_or_else(|| invalid(opt, format!("mac={m}")))?),
        };
        let slot = match k.take("addr") {
            None => None,
            Some(a) => Some(crate::qemu_blockdev::parse_addr(opt, &a)?),
        };
        k.take("bootindex");
        self.nics.push(PendingNic {
            netdev,
            mac,
            slot,
            id,
        });
        Ok(())
    }

    /// The cards, in `-device` order.
    pub fn resolve(&self) -> Result<Vec<NetConfig>, QemuCliError> {
        let mut used: Vec<&String> = Vec::new();
        self.nics
            .iter()
            .map(|n| {
                let tap = self.taps.get(&n.netdev).ok_or_else(|| {
                    invalid("-device", format!("netdev={}: no such -netdev", n.netdev))
                })?;
                if used.contains(&&n.netdev) {
                    return Err(invalid(
                        "-device",
                        format!("netdev={}: already in use by another device", n.netdev),
                    ));
                }
                used.push(&n.netdev);
                let (name, fd) = match tap {
                    Tap::Name(name) => (name.clone(), None),
                    Tap::Fd(fd) => (String::new(), Some(*fd)),
                };
                Ok(NetConfig {
                    tap: name,
                    fd,
                    mac: n.mac,
                    slot: n.slot,
                    id: n.id.clone(),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(g: &mut NetGraph, v: &str) -> Result<(), QemuCliError> {
        let mut k = Keys::new("-device", option_map("-device", v, "driver")?);
        k.take("driver");
        let id = k.take("id");
        g.add_device("-device", &mut k, id)?;
        k.finish()
    }

    #[test]
    fn taps_and_cards() {
        let mut g = NetGraph::default();
        g.add_netdev("-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no")
            .unwrap();
        g.add_netdev(
            "-netdev",
            r#"{"type":"tap","id":"n1","ifname":"tap1","vhost":false}"#,
        )
        .unwrap();
        device(
            &mut g,
            "virtio-net-pci,netdev=n0,mac=52:54:00:00:00:01,addr=0x3",
        )
        .unwrap();
        device(
            &mut g,
            r#"{"driver":"virtio-net-pci","netdev":"n1","id":"net1"}"#,
        )
        .unwrap();
        let nets = g.resolve().unwrap();
        assert_eq!(nets.len(), 2);
        assert_eq!(nets[0].tap, "tap0");
        assert_eq!(nets[0].mac, Some([0x52, 0x54, 0, 0, 0, 1]));
        assert_eq!(nets[0].slot, Some(3));
        assert_eq!((nets[1].tap.as_str(), nets[1].mac), ("tap1", None));
        let mut g = NetGraph::default();
        g.add_netdev("-netdev", r#"{"type":"tap","fd":"25","id":"hostnet0"}"#)
            .unwrap();
        device(&mut g, "virtio-net-pci,netdev=hostnet0").unwrap();
        assert_eq!(g.resolve().unwrap()[0].fd, Some(25));
    }

    #[test]
    fn refused() {
        let mut g = NetGraph::default();
        for bad in [
            "user,id=u0",
            "tap,id=t0,fd=x",
            "tap,id=t0,fd=25,ifname=y",
            "tap,id=t0",
            "tap,id=t0,ifname=x,vhost=on",
            "tap,id=t0,ifname=x,script=/etc/qemu-ifup",
            "tap,ifname=x",
        ] {
            assert!(g.add_netdev("-netdev", bad).is_err(), "{bad}");
        }
        g.add_netdev("-netdev", "tap,id=t,ifname=x").unwrap();
        assert!(g.add_netdev("-netdev", "tap,id=t,ifname=y").is_err());
        assert!(device(&mut g, "virtio-net-pci,netdev=t,mac=zz").is_err());
        assert!(device(&mut g, "virtio-net-pci").is_err());
        device(&mut g, "virtio-net-pci,netdev=t").unwrap();
        device(&mut g, "virtio-net-pci,netdev=t").unwrap();
        assert!(g.resolve().is_err(), "one netdev, two cards");
        let mut g2 = NetGraph::default();
        device(&mut g2, "virtio-net-pci,netdev=none").unwrap();
        assert!(g2.resolve().is_err());
    }
}
