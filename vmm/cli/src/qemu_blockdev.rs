//! QEMU's block-device options as far as hopvm's disks go: `-blockdev` nodes (`file` and `raw`),
//! `-drive if=none,id=…`, and `-device virtio-blk-pci,drive=…` naming one of them, in the
//! keyval or JSON syntax libvirt uses:
//!
//! ```text
//! -blockdev {"driver":"file","filename":"/img","node-name":"s0","auto-read-only":true,"discard":"unmap"}
//! -blockdev {"node-name":"f0","read-only":false,"driver":"raw","file":"s0"}
//! -device {"driver":"virtio-blk-pci","bus":"pci.0","addr":"0x4","drive":"f0","id":"virtio-disk0"}
//! ```
//!
//! A `raw` node may also carry its file inline (`file.driver=file,file.filename=/img`). The
//! devices are resolved once the whole command line is read, so their order does not matter.

use std::collections::BTreeMap;
use std::path::PathBuf;

use vmm::config::DiskConfig;

use crate::qemu_cli::QemuCliError;
use crate::qemu_domain::{option_map, Keys};

/// A block node: an image file, or a raw format node on another node.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    File { filename: String, read_only: bool },
    Raw { file: String, read_only: bool },
}

/// A `virtio-blk-pci` waiting for its drive to be resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PendingDisk {
    drive: String,
    serial: String,
    slot: Option<u8>,
}

/// The block nodes and virtio-blk devices of one command line.
#[derive(Debug, Default)]
pub struct BlockGraph {
    nodes: BTreeMap<String, Node>,
    disks: Vec<PendingDisk>,
}

fn invalid(opt: &str, why: String) -> QemuCliError {
    QemuCliError::Invalid(opt.to_string(), why)
}

/// A PCI `addr=` (`0x4`, `4`, `0x4.0`): the device number, 2 to 31, function 0.
pub fn parse_addr(opt: &str, a: &str) -> Result<u8, QemuCliError> {
    let (dev, func) = a.split_once('.').unwrap_or((a, "0"));
    dev.strip_prefix("0x")
        .map_or_else(|| dev.parse(), |h| u8::from_str_radix(h, 16))
        .ok()
        .filter(|d| (2..32).contains(d) && func == "0")
        .ok_or_else(|| {
            invalid(
                opt,
                format!("addr={a}: expected a free slot 0x2–0x1f, function 0"),
            )
        })
}

impl BlockGraph {
    fn insert(&mut self, opt: &str, name: String, node: Node) -> Result<(), QemuCliError> {
        if name.is_empty() || self.nodes.contains_key(&name) {
            return Err(invalid(
                opt,
                format!("Duplicate or empty node name '{name}'"),
            ));
        }
        self.nodes.insert(name, node);
        Ok(())
    }

    /// Adds a `-blockdev`.
    pub fn add_blockdev(&mut self, opt: &str, value: &str) -> Result<(), QemuCliError> {
        let mut k = Keys::new(opt, option_map(opt, value, "")?);
        let driver = k.required("driver")?;
        let name = k.required("node-name")?;
        let read_only = k.bool("read-only")?.unwrap_or(false);
        k.bool("auto-read-only")?;
        // The guest is never offered discard, so the host-side policy has nothing to do.
        if let Some(d) = k.take("discard") {
            if !matches!(d.as_str(), "unmap" | "ignore") {
                return Err(invalid(
                    opt,
                    format!("discard={d}: expected unmap or ignore"),
                ));
            }
        }
        let node = match driver.as_str() {
            "file" => Node::File {
                filename: k.required("filename")?,
                read_only,
            },
            "raw" => match k.take("file") {
                Some(file) => Node::Raw { file, read_only },
                None => {
                    // The file node inline: file.driver=file,file.filename=….
                    k.only("file.driver", "file")?;
                    let inner = format!("{name}#file");
                    self.insert(
                        opt,
                        inner.clone(),
                        Node::File {
                            filename: k.required("file.filename")?,
                            read_only,
                        },
                    )?;
                    Node::Raw {
                        file: inner,
                        read_only,
                    }
                }
            },
            other => {
                return Err(QemuCliError::UnsupportedValue(
                    opt.into(),
                    format!("driver={other} (hopvm: file and raw)"),
                ))
            }
        };
        k.finish()?;
        self.insert(opt, name, node)
    }

    /// Adds a `-drive if=none,id=ID,file=PATH[,format=raw][,readonly=on]` as node `ID`.
    pub fn add_drive_none(
        &mut self,
        opt: &str,
        id: &str,
        disk: &DiskConfig,
    ) -> Result<(), QemuCliError> {
        self.insert(
            opt,
            id.to_string(),
            Node::File {
                filename: disk.path.display().to_string(),
                read_only: disk.readonly,
            },
        )
    }

    /// Adds a `-device virtio-blk-pci` whose remaining keys are in `k` (`driver` and `id`
    /// already taken).
    pub fn add_device(&mut self, opt: &str, k: &mut Keys<'_>) -> Result<(), QemuCliError> {
        let drive = k.required("drive")?;
        k.only("bus", "pci.0")?;
        let slot = match k.take("addr") {
            None => None,
            Some(a) => Some(parse_addr(opt, &a)?),
        };
        let serial = k.take("serial").unwrap_or_default();
        if serial.len() > 20 {
            return Err(invalid(opt, String::from("serial: at most 20 bytes")));
        }
        // Accepted and meaningless here: hopvm boots its kernel directly.
        k.take("bootindex");
        k.only("num-queues", "1")?;
        self.disks.push(PendingDisk {
            drive,
            serial,
            slot,
        });
        Ok(())
    }

    /// The disks, in `-device` order, with their images found through the nodes.
    pub fn resolve(&self) -> Result<Vec<DiskConfig>, QemuCliError> {
        let mut used = Vec::new();
        self.disks
            .iter()
            .map(|d| {
                if used.contains(&&d.drive) {
                    return Err(invalid(
                        "-device",
                        format!("drive={}: already in use by another device", d.drive),
                    ));
                }
                used.push(&d.drive);
                let mut name = &d.drive;
                let mut readonly = false;
                // A chain of raw nodes ends at a file node (bounded: no node twice).
                for _ in 0..=self.nodes.len() {
                    match self.nodes.get(name) {
                        Some(Node::Raw { file, read_only }) => {
                            readonly |= read_only;
                            name = file;
                        }
                        Some(Node::File {
                            filename,
                            read_only,
                        }) => {
                            return Ok(DiskConfig {
                                path: PathBuf::from(filename),
                                readonly: readonly || *read_only,
                                serial: d.serial.clone(),
                                slot: d.slot,
                            })
                        }
                        None => break,
                    }
                }
                Err(invalid(
                    "-device",
                    format!("drive={}: no such -blockdev or -drive", d.drive),
                ))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(g: &mut BlockGraph, v: &str) -> Result<(), QemuCliError> {
        let mut k = Keys::new("-device", option_map("-device", v, "driver")?);
        k.take("driver");
        k.take("id");
        g.add_device("-device", &mut k)?;
        k.finish()
    }

    #[test]
    fn libvirt_json_blockdevs() {
        let mut g = BlockGraph::default();
        g.add_blockdev(
            "-blockdev",
            r#"{"driver":"file","filename":"/img","node-name":"s0","auto-read-only":true,"discard":"unmap"}"#,
        )
        .unwrap();
        g.add_blockdev(
            "-blockdev",
            r#"{"node-name":"f0","read-only":false,"driver":"raw","file":"s0"}"#,
        )
        .unwrap();
        device(
            &mut g,
            r#"{"driver":"virtio-blk-pci","bus":"pci.0","addr":"0x4","drive":"f0","id":"virtio-disk0","bootindex":1}"#,
        )
        .unwrap();
        let disks = g.resolve().unwrap();
        assert_eq!(disks.len(), 1);
        assert_eq!(disks[0].path, PathBuf::from("/img"));
        assert!(!disks[0].readonly);
        assert_eq!(disks[0].slot, Some(4));
    }

    #[test]
    fn keyval_inline_and_read_only() {
        let mut g = BlockGraph::default();
        g.add_blockdev(
            "-blockdev",
            "driver=raw,node-name=d0,read-only=on,file.driver=file,file.filename=/x.img",
        )
        .unwrap();
        device(&mut g, "virtio-blk-pci,drive=d0,serial=abc").unwrap();
        let d = &g.resolve().unwrap()[0];
        assert_eq!(d.path, PathBuf::from("/x.img"));
        assert!(d.readonly);
        assert_eq!(d.serial, "abc");
        assert_eq!(d.slot, None);
    }

    #[test]
    fn bad_graphs() {
        let mut g = BlockGraph::default();
        assert!(g
            .add_blockdev("-blockdev", "driver=qcow2,node-name=q,file=x")
            .is_err());
        assert!(g
            .add_blockdev("-blockdev", "driver=file,filename=/a")
            .is_err());
        g.add_blockdev("-blockdev", "driver=file,node-name=a,filename=/a")
            .unwrap();
        assert!(g
            .add_blockdev("-blockdev", "driver=file,node-name=a,filename=/b")
            .is_err());
        assert!(g
            .add_blockdev(
                "-blockdev",
                "driver=file,node-name=c,filename=/c,cache.direct=on"
            )
            .is_err());
        assert!(device(&mut g, "virtio-blk-pci,drive=a,addr=0x1").is_err());
        assert!(device(&mut g, "virtio-blk-pci,drive=a,addr=0x3.1").is_err());
        assert!(device(&mut g, "virtio-blk-pci,drive=a,bus=pcie.0").is_err());
        assert!(device(&mut g, "virtio-blk-pci").is_err());
        // A drive nobody defined; a loop of raw nodes; one node for two devices.
        let mut g2 = BlockGraph::default();
        device(&mut g2, "virtio-blk-pci,drive=nope").unwrap();
        assert!(g2.resolve().is_err());
        let mut g3 = BlockGraph::default();
        g3.add_blockdev("-blockdev", "driver=raw,node-name=x,file=y")
            .unwrap();
        g3.add_blockdev("-blockdev", "driver=raw,node-name=y,file=x")
            .unwrap();
        device(&mut g3, "virtio-blk-pci,drive=x").unwrap();
        assert!(g3.resolve().is_err());
        let mut g4 = BlockGraph::default();
        g4.add_blockdev("-blockdev", "driver=file,node-name=a,filename=/a")
            .unwrap();
        device(&mut g4, "virtio-blk-pci,drive=a").unwrap();
        device(&mut g4, "virtio-blk-pci,drive=a").unwrap();
        assert!(g4.resolve().is_err());
    }
}
