//! The domain definition: what a user writes in TOML and the agents persist.
//!
//! ```toml
//! name = "web1"
//! memory_mib = 512
//! vcpus = 1
//! accel = "tcg"            # or "kvm"
//! machine = "pc"           # optional
//! cpu = "Skylake-Server"   # optional; "host" and "max" migrate only with --unsafe
//!
//! [kernel]                 # direct kernel boot ...
//! path = "/var/lib/livemig/images/vmlinuz"
//! cmdline = "console=ttyS0"
//!
//! [disk]                   # ... and/or a disk on shared storage
//! path = "/shared/web1.qcow2"
//! format = "qcow2"
//!
//! [serial]
//! log = "/var/lib/livemig/logs/web1.log"   # optional
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use types::{Accel, DomainName};

const MIN_MEMORY_MIB: u32 = 16;
const MAX_MEMORY_MIB: u32 = 1 << 20;
const MAX_VCPUS: u32 = 255;

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

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
/// A disk image's format.
pub enum DiskFormat {
    #[default]
    /// Raw bytes.
    Raw,
    /// QEMU's copy-on-write format.
    Qcow2,
}

/// Host page cache use for the disk. Migration with shared storage needs the
/// destination to see every write, which `none` guarantees.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskCache {
    #[default]
    /// No host page cache (direct I/O): safe to migrate on shared storage.
    None,
    /// The host page cache, written back later.
    Writeback,
}

/// A disk image on storage both hosts see at the same path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Disk {
    /// The image file.
    pub path: PathBuf,
    #[serde(default)]
    /// Its format.
    pub format: DiskFormat,
    #[serde(default)]
    /// Host cache mode.
    pub cache: DiskCache,
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
    #[serde(default = "default_machine")]
    /// Machine type, or an alias QEMU resolves (`pc`).
    pub machine: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// CPU model (`-cpu`); QEMU's default (`qemu64`) when unset.
    pub cpu: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// Direct kernel boot.
    pub kernel: Option<KernelBoot>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// A disk.
    pub disk: Option<Disk>,
    #[serde(default)]
    /// The serial console.
    pub serial: Serial,
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
    #[error("CPU model {0:?} is not a plain name")]
    /// A CPU model that is not a plain name.
    Cpu(String),
    #[error("the definition has nothing to boot: give [kernel] or [disk]")]
    /// Neither a kernel nor a disk.
    NoBootSource,
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
}

impl DomainDefinition {
    /// Parses and validates a TOML definition.
    ///
    /// # Errors
    /// [`DefinitionError::Parse`] for malformed TOML or unknown keys, the
    /// other variants for values out of range.
    pub fn from_toml(text: &str) -> Result<Self, DefinitionError> {
        let def: DomainDefinition = toml::from_str(text)?;
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
        let mut def: DomainDefinition = toml::from_str(&text)?;
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
        def.validate()?;
        Ok(def)
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
        if let Some(d) = &mut self.disk {
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
        if !is_plain_name(&self.machine) {
            return Err(DefinitionError::Machine(self.machine.clone()));
        }
        if let Some(cpu) = self.cpu.as_deref().filter(|c| !is_plain_name(c)) {
            return Err(DefinitionError::Cpu(cpu.to_string()));
        }
        if self.kernel.is_none() && self.disk.is_none() {
            return Err(DefinitionError::NoBootSource);
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
        if let Some(d) = &self.disk {
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

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
name = "web1"
memory_mib = 128
[kernel]
path = "/boot/k"
"#;

    #[test]
    fn a_cpu_model_is_a_plain_name_passed_to_qemu() {
        // Top-level keys come before the [kernel] table.
        let named = MINIMAL.replacen(
            "memory_mib = 128",
            "memory_mib = 128\ncpu = \"Skylake-Server\"",
            1,
        );
        let def = DomainDefinition::from_toml(&named).unwrap();
        assert_eq!(def.cpu.as_deref(), Some("Skylake-Server"));
        let bad = MINIMAL.replacen(
            "memory_mib = 128",
            "memory_mib = 128\ncpu = \"qemu64,+vmx\"",
            1,
        );
        assert!(matches!(
            DomainDefinition::from_toml(&bad),
            Err(DefinitionError::Cpu(_))
        ));
    }

    #[test]
    fn minimal_definition_gets_defaults() {
        let def = DomainDefinition::from_toml(MINIMAL).unwrap();
        assert_eq!(def.name.as_str(), "web1");
        assert_eq!(def.vcpus, 1);
        assert_eq!(def.accel, Accel::Tcg);
        assert_eq!(def.machine, "pc");
    }

    #[test]
    fn round_trips_through_toml() {
        let def = DomainDefinition::from_toml(MINIMAL).unwrap();
        assert_eq!(DomainDefinition::from_toml(&def.to_toml()).unwrap(), def);
    }

    #[test]
    fn round_trips_through_its_document_form() {
        let def = DomainDefinition::from_toml(MINIMAL).unwrap();
        assert_eq!(
            DomainDefinition::from_document(def.to_document()).unwrap(),
            def
        );
        let mut bad = def.to_document();
        bad["memory_mib"] = 0.into();
        assert!(matches!(
            DomainDefinition::from_document(bad),
            Err(DefinitionError::Memory(0))
        ));
    }

    #[test]
    fn malformed_toml_names_the_line() {
        let err = DomainDefinition::from_toml("name = \"x\"\nmemory_mib = \n").unwrap_err();
        assert!(matches!(err, DefinitionError::Parse(_)));
        assert!(err.to_string().contains("line 2"), "{err}");
    }

    #[test]
    fn unknown_keys_are_refused_so_typos_do_not_pass_silently() {
        let err = DomainDefinition::from_toml(&format!("{MINIMAL}\nmemroy = 1")).unwrap_err();
        assert!(err.to_string().contains("memroy"), "{err}");
    }

    #[test]
    fn values_out_of_range_are_refused() {
        let cases = [
            (MINIMAL.replace("128", "8"), "memory_mib"),
            (format!("vcpus = 0\n{MINIMAL}"), "vcpus"),
            (MINIMAL.replace("web1", "../x"), "invalid domain name"),
            (MINIMAL.replace("/boot/k", "boot/k"), "absolute"),
            (
                "name = \"a\"\nmemory_mib = 64\n".to_string(),
                "nothing to boot",
            ),
            (
                format!("machine = \"pc,accel=kvm\"\n{MINIMAL}"),
                "machine type",
            ),
        ];
        for (text, expected) in cases {
            let err = DomainDefinition::from_toml(&text).unwrap_err();
            assert!(err.to_string().contains(expected), "{err} / {expected}");
        }
    }

    #[test]
    fn a_bare_file_name_resolves_against_the_working_directory() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("vm.toml"),
            "name = \"a\"\nmemory_mib = 64\n[kernel]\npath = \"guest.elf\"\n",
        )
        .unwrap();
        let cwd = std::env::current_dir().unwrap();
        std::env::set_current_dir(dir.path()).unwrap();
        let def = DomainDefinition::from_file(Path::new("vm.toml"));
        std::env::set_current_dir(cwd).unwrap();
        let kernel = def.unwrap().kernel.unwrap().path;
        assert!(
            kernel.is_absolute() && kernel.ends_with("guest.elf"),
            "{kernel:?}"
        );
    }

    #[test]
    fn file_paths_are_resolved_against_the_definition_directory() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("vm.toml");
        std::fs::write(
            &file,
            "name = \"a\"\nmemory_mib = 64\n[kernel]\npath = \"guest.elf\"\n",
        )
        .unwrap();
        let def = DomainDefinition::from_file(&file).unwrap();
        assert_eq!(def.kernel.unwrap().path, dir.path().join("guest.elf"));
    }
}
