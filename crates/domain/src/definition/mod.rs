//! The domain definition: what a user writes in TOML and the agents persist.
//!
//! ```toml
//! name = "web1"
//! memory_mib = 512
//! vcpus = 1
//! accel = "tcg"            # or "kvm"
//! dirty_ring = 4096        # optional, KVM only: a dirty ring of this many
//!                          # entries per vCPU (QEMU then reports each
//!                          # vCPU's dirty rate, and the controller uses it)
//! machine = "pc"           # optional
//! cpu = "Skylake-Server"   # optional; "host" and "max" migrate only with --unsafe
//!
//! [kernel]                 # direct kernel boot ...
//! path = "/var/lib/livemig/images/vmlinuz"
//! cmdline = "console=ttyS0"
//!
//! [[disks]]                # ... and/or disks (vda, vdb, ... in order)
//! path = "/shared/web1.qcow2"
//! format = "qcow2"         # or "raw"
//! cache = "none"           # writeback, writethrough, directsync, unsafe
//! shared = true            # both hosts see the file; else it must be copied
//!
//! [[nics]]                 # virtio-net on a tap on a host bridge ...
//! bridge = "br0"
//! mac = "52:54:00:12:34:56"   # optional
//! [[nics]]                 # ... or on QEMU's user-mode network
//! network = "user"
//!
//! [serial]
//! log = "/var/lib/livemig/logs/web1/console.log"   # optional: the domain's own
//! ```
//!
//! A single `[disk]` table (the older form) is read as the first of
//! `[[disks]]`, on shared storage.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::devices::{disk, nic};
pub use crate::devices::{Disk, DiskCache, DiskError, DiskFormat, Nic, NicError, NicNetwork};
pub use types::{Accel, DomainName};

const MIN_MEMORY_MIB: u32 = 16;
const MAX_MEMORY_MIB: u32 = 1 << 20;
const MAX_VCPUS: u32 = 255;
/// The dirty ring sizes KVM takes: a power of two in this range (KVM's
/// own bounds, as QEMU documents `dirty-ring-size`).
const DIRTY_RING_ENTRIES: std::ops::RangeInclusive<u32> = 1024..=65536;

/// Direct kernel boot (`-kernel`, `-append`, `-initrd`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelBoot {
    /// The kernel image.
    pub path: PathBuf,
    #[serde(default)]
    /// Its command line.
    pub cmdline: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// An initial ramdisk.
    pub initrd: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
/// The guest's serial console.
pub struct Serial {
    /// Where the guest's first serial port is written; the agent picks a
    /// file in its state directory when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<PathBuf>,
}

/// A VM definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainDefinition {
    /// The domain's name.
    pub name: DomainName,
    /// Guest RAM, MiB.
    pub memory_mib: u32,
    #[serde(default = "one")]
    /// vCPUs.
    pub vcpus: u32,
    #[serde(default)]
    /// The accelerator.
    pub accel: Accel,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// KVM's dirty ring, entries per vCPU (`-accel kvm,dirty-ring-size=`):
    /// dirty pages are logged per vCPU, so QEMU can say which vCPUs write.
    pub dirty_ring: Option<u32>,
    #[serde(default = "default_machine")]
    /// Machine type, or an alias QEMU resolves (`pc`).
    pub machine: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// CPU model (`-cpu`); QEMU's default (`qemu64`) when unset.
    pub cpu: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// Direct kernel boot.
    pub kernel: Option<KernelBoot>,
    /// Disks, `vda` first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disks: Vec<Disk>,
    /// Network interfaces.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nics: Vec<Nic>,
    /// The older single `[disk]`: read, then moved to `disks`.
    #[serde(default, rename = "disk", skip_serializing)]
    legacy_disk: Option<Disk>,
    #[serde(default)]
    /// The serial console.
    pub serial: Serial,
    /// Labels a cluster's migration policies select the domain by
    /// (`labels = { tier = "db" }`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
}

fn one() -> u32 {
    1
}

fn default_machine() -> String {
    "pc".into()
}

/// CPU models that pass the host's CPU through.
const HOST_DEPENDENT_CPUS: [&str; 2] = ["host", "max"];

/// A plain QEMU name (machine type, CPU model): letters, digits, `.`, `_`,
/// `-`.
fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Why a definition was refused.
#[derive(Debug, thiserror::Error)]
pub enum DefinitionError {
    #[error("cannot read definition {path}")]
    /// The file could not be read.
    Read {
        /// The file.
        path: PathBuf,
        #[source]
        /// Why.
        source: std::io::Error,
    },
    #[error("malformed definition: {0}")]
    /// Not TOML, or unknown keys.
    Parse(#[from] toml::de::Error),
    #[error("malformed definition: {0}")]
    /// Not the definition's form, or unknown keys.
    Document(#[from] serde_json::Error),
    #[error("memory_mib must be between {MIN_MEMORY_MIB} and {MAX_MEMORY_MIB}, got {0}")]
    /// RAM out of range.
    Memory(u32),
    #[error("vcpus must be between 1 and {MAX_VCPUS}, got {0}")]
    /// vCPUs out of range.
    Vcpus(u32),
    #[error("machine type {0:?} is not a plain name")]
    /// A machine type that is not a plain name.
    Machine(String),
    #[error("dirty_ring must be a power of two between 1024 and 65536, got {0}")]
    /// A dirty ring size KVM does not take.
    DirtyRing(u32),
    #[error("dirty_ring needs accel = \"kvm\" (a dirty ring is KVM's)")]
    /// A dirty ring on an accelerator that has none.
    DirtyRingWithoutKvm,
    #[error("CPU model {0:?} is not a plain name")]
    /// A CPU model that is not a plain name.
    Cpu(String),
    #[error("the definition has nothing to boot: give [kernel] or [[disks]]")]
    /// Neither a kernel nor a disk.
    NoBootSource,
    /// A label whose key or value is not a plain name.
    #[error(
        "label {key:?} = {value:?}: keys and values are 1 to 64 letters, digits, '.', '_' \
         or '-'"
    )]
    Label {
        /// The key.
        key: String,
        /// The value.
        value: String,
    },
    #[error("{what} path {path:?} must be absolute")]
    /// A relative path.
    RelativePath {
        /// Which path.
        what: &'static str,
        /// The path.
        path: PathBuf,
    },
    #[error("{what} path {path:?} contains a character QEMU cannot take")]
    /// A path QEMU's option syntax cannot carry.
    UnsafePath {
        /// Which path.
        what: &'static str,
        /// The path.
        path: PathBuf,
    },
    #[error("kernel command line contains a control character")]
    /// A control character in the kernel command line.
    Cmdline,
    /// A bad disk.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// A bad NIC.
    #[error(transparent)]
    Nic(#[from] NicError),
    /// Both `[disk]` and `[[disks]]`.
    #[error("give either [disk] or [[disks]], not both")]
    DiskAndDisks,
}

impl DomainDefinition {
    /// Parses and validates a TOML definition.
    ///
    /// # Errors
    /// [`DefinitionError::Parse`] for malformed TOML or unknown keys, the
    /// other variants for values out of range.
    pub fn from_toml(text: &str) -> Result<Self, DefinitionError> {
        let def: DomainDefinition = toml::from_str(text)?;
        let def = def.normalized()?;
        def.validate()?;
        Ok(def)
    }

    /// Reads a definition file; relative paths inside it are taken relative
    /// to the file's directory, as a user editing it would expect.
    ///
    /// # Errors
    /// As [`DomainDefinition::from_toml`], plus [`DefinitionError::Read`].
    pub fn from_file(path: &Path) -> Result<Self, DefinitionError> {
        let text = std::fs::read_to_string(path).map_err(|source| DefinitionError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut def: DomainDefinition = toml::from_str::<DomainDefinition>(&text)?.normalized()?;
        let base = match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let base = std::path::absolute(&base).unwrap_or(base);
        def.resolve_paths(&base);
        def.validate()?;
        Ok(def)
    }

    /// Parses and validates a definition as it travels: the TOML file's
    /// keys as a JSON object.
    ///
    /// # Errors
    /// [`DefinitionError::Document`] for unknown keys or wrong types, the
    /// other variants for values out of range.
    pub fn from_document(document: serde_json::Value) -> Result<Self, DefinitionError> {
        let def: DomainDefinition = serde_json::from_value(document)?;
        let def = def.normalized()?;
        def.validate()?;
        Ok(def)
    }

    /// Moves an older `[disk]` into `disks`: it meant a disk on shared
    /// storage.
    fn normalized(mut self) -> Result<Self, DefinitionError> {
        if let Some(mut disk) = self.legacy_disk.take() {
            if !self.disks.is_empty() {
                return Err(DefinitionError::DiskAndDisks);
            }
            disk.shared = true;
            self.disks.push(disk);
        }
        Ok(self)
    }

    /// The CPU model, if it passes the host's CPU through (`host`, `max`): a
    /// guest started with one may use features another host lacks, so it
    /// migrates only with `--unsafe`.
    pub fn host_dependent_cpu(&self) -> Option<&str> {
        self.cpu
            .as_deref()
            .filter(|cpu| HOST_DEPENDENT_CPUS.contains(cpu))
    }

    /// The definition as it travels (see [`DomainDefinition::from_document`]).
    pub fn to_document(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("a definition always serializes")
    }

    /// The definition as TOML, as persisted by the agent.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a definition always serializes")
    }

    fn resolve_paths(&mut self, base: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let Some(k) = &mut self.kernel {
            fix(&mut k.path);
            if let Some(i) = &mut k.initrd {
                fix(i);
            }
        }
        for d in &mut self.disks {
            fix(&mut d.path);
        }
        if let Some(l) = &mut self.serial.log {
            fix(l);
        }
    }

    /// Checks every value; names are checked by their type when parsed.
    ///
    /// # Errors
    /// The first problem found.
    pub fn validate(&self) -> Result<(), DefinitionError> {
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(DefinitionError::Memory(self.memory_mib));
        }
        if !(1..=MAX_VCPUS).contains(&self.vcpus) {
            return Err(DefinitionError::Vcpus(self.vcpus));
        }
        if let Some(entries) = self.dirty_ring {
            if !DIRTY_RING_ENTRIES.contains(&entries) || !entries.is_power_of_two() {
                return Err(DefinitionError::DirtyRing(entries));
            }
            if self.accel != Accel::Kvm {
                return Err(DefinitionError::DirtyRingWithoutKvm);
            }
        }
        if !is_plain_name(&self.machine) {
            return Err(DefinitionError::Machine(self.machine.clone()));
        }
        if let Some(cpu) = self.cpu.as_deref().filter(|c| !is_plain_name(c)) {
            return Err(DefinitionError::Cpu(cpu.to_string()));
        }
        if self.kernel.is_none() && self.disks.is_empty() {
            return Err(DefinitionError::NoBootSource);
        }
        if let Some((key, value)) = self
            .labels
            .iter()
            .find(|(k, v)| !is_plain_name(k) || !is_plain_name(v))
        {
            return Err(DefinitionError::Label {
                key: key.clone(),
                value: value.clone(),
            });
        }
        let mut paths: Vec<(&'static str, &Path)> = Vec::new();
        if let Some(k) = &self.kernel {
            paths.push(("kernel", &k.path));
            if let Some(i) = &k.initrd {
                paths.push(("initrd", i));
            }
            if k.cmdline.chars().any(char::is_control) {
                return Err(DefinitionError::Cmdline);
            }
        }
        disk::validate(&self.disks)?;
        nic::validate(self.name.as_str(), &self.nics)?;
        for d in &self.disks {
            paths.push(("disk", &d.path));
        }
        if let Some(l) = &self.serial.log {
            paths.push(("serial log", l));
        }
        for (what, path) in paths {
            if path.is_relative() {
                return Err(DefinitionError::RelativePath {
                    what,
                    path: path.to_path_buf(),
                });
            }
            if path
                .to_str()
                .is_none_or(|s| s.chars().any(char::is_control))
            {
                return Err(DefinitionError::UnsafePath {
                    what,
                    path: path.to_path_buf(),
                });
            }
        }
        Ok(())
    }
}

mod abi;
#[cfg(test)]
mod tests;
