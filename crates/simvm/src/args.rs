//! The part of QEMU's command line a simulated VM understands.
//!
//! The agent builds one command line for either hypervisor
//! (`domain::qemu::build_argv`), so the simulation reads the same options
//! and refuses what QEMU would refuse before it starts: a missing kernel or
//! disk image, a malformed size, a memory backend that does not match `-m`.
//! Options that only matter to real hardware (`-sandbox`, `-runas`,
//! `-display`, ...) are accepted and ignored.

use std::collections::BTreeMap;
use std::path::PathBuf;

/// What a simulated VM was started with.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Config {
    /// `-name guest=NAME`.
    pub name: Option<String>,
    /// `-machine TYPE`; `none` for a capability probe (no guest).
    pub machine: String,
    /// `-accel tcg|kvm`.
    pub accel: String,
    /// `-accel kvm,dirty-ring-size=N`.
    pub dirty_ring: Option<u32>,
    /// Guest RAM, bytes (0 without a guest).
    pub ram_bytes: u64,
    /// `-smp N`.
    pub vcpus: u32,
    /// The QMP socket (`-chardev socket,id=qmp,path=...`).
    pub qmp_socket: PathBuf,
    /// The serial log (`-chardev file,id=serial0,path=...`).
    pub serial_log: Option<PathBuf>,
    /// `-kernel`.
    pub kernel: Option<PathBuf>,
    /// `-append`.
    pub cmdline: String,
    /// `-drive`s: the block backend's id and its options.
    pub drives: Vec<Drive>,
    /// `-incoming defer`.
    pub incoming: bool,
    /// `-S`: do not start the vCPUs.
    pub paused: bool,
    /// `-object`s by id: their type and options.
    pub objects: BTreeMap<String, (String, BTreeMap<String, String>)>,
}

/// One `-drive`.
#[derive(Debug, Clone, PartialEq)]
pub struct Drive {
    /// `id=` (the block backend).
    pub id: String,
    /// `node-name=`.
    pub node_name: String,
    /// `file=`.
    pub file: PathBuf,
    /// `format=`.
    pub format: String,
    /// `cache=`.
    pub cache: String,
}

/// Why the command line was refused: QEMU's own words where it has them.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ArgsError {
    /// An option without its value.
    #[error("{0} requires an argument")]
    MissingValue(String),
    /// A value QEMU would not parse.
    #[error("{option}: invalid value '{value}'")]
    Invalid {
        /// The option.
        option: String,
        /// Its value.
        value: String,
    },
    /// No QMP socket: nothing could ever talk to the VM.
    #[error("no QMP socket (-chardev socket,id=qmp,path=...)")]
    NoMonitor,
    /// A file the guest needs is not there.
    #[error("could not load kernel '{0}': No such file or directory")]
    Kernel(String),
    /// A disk image is not there.
    #[error("Could not open '{0}': No such file or directory")]
    Drive(String),
    /// `-m` and the memory backend disagree.
    #[error("Machine memory size does not match the size of the memory backend")]
    BackendSize,
}

/// `key=value,...` with QEMU's doubled commas; a leading bare word is
/// returned under the empty key.
pub fn parse_options(text: &str) -> BTreeMap<String, String> {
    let mut parts = Vec::new();
    let mut current = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                current.push(',');
            } else {
                parts.push(std::mem::take(&mut current));
            }
        } else {
            current.push(c);
        }
    }
    parts.push(current);
    parts
        .into_iter()
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (String::new(), p),
        })
        .collect()
}

/// A size with QEMU's suffixes (`512M`, `131064k`); without one, in
/// `bare` units (`-m` counts MiB, an object's `size=` bytes).
pub fn parse_size(text: &str, bare: &str) -> Option<u64> {
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => text.split_at(i),
        None => (text, bare),
    };
    let n: u64 = digits.parse().ok()?;
    let scale = match unit {
        "" | "b" | "B" => 1,
        "k" | "K" => 1 << 10,
        "M" | "m" => 1 << 20,
        "G" | "g" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(scale)
}

/// Reads the command line (without the program name).
///
/// # Errors
/// [`ArgsError`] for what QEMU would refuse at start.
pub fn parse(argv: &[String]) -> Result<Config, ArgsError> {
    let mut config = Config {
        accel: "tcg".into(),
        vcpus: 1,
        machine: "pc".into(),
        ..Default::default()
    };
    let mut memory_arg: Option<u64> = None;
    let mut chardevs: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let mut qmp_chardev = None;
    let mut serial_chardev = None;
    let mut args = argv.iter();
    while let Some(option) = args.next() {
        let flag = option.as_str();
        let takes_value = !matches!(
            flag,
            "-S" | "-nodefaults" | "-no-user-config" | "-no-reboot" | "-no-shutdown"
        );
        if !takes_value {
            if flag == "-S" {
                config.paused = true;
            }
            continue;
        }
        let value = args
            .next()
            .ok_or_else(|| ArgsError::MissingValue(flag.to_string()))?;
        let invalid = || ArgsError::Invalid {
            option: flag.to_string(),
            value: value.clone(),
        };
        match flag {
            "-name" => {
                let options = parse_options(value);
                config.name = options.get("guest").or_else(|| options.get("")).cloned();
            }
            "-machine" => {
                let options = parse_options(value);
                config.machine = options
                    .get("")
                    .or_else(|| options.get("type"))
                    .cloned()
                    .unwrap_or_else(|| "pc".into());
            }
            "-accel" => {
                let options = parse_options(value);
                config.accel = options.get("").cloned().ok_or_else(invalid)?;
                if let Some(ring) = options.get("dirty-ring-size") {
                    config.dirty_ring = Some(ring.parse().map_err(|_| invalid())?);
                }
            }
            "-m" => memory_arg = Some(parse_size(value, "M").ok_or_else(invalid)?),
            "-smp" => {
                let options = parse_options(value);
                let cpus = options.get("").or_else(|| options.get("cpus"));
                config.vcpus = cpus
                    .and_then(|c| c.parse().ok())
                    .filter(|&n| n > 0)
                    .ok_or_else(invalid)?;
            }
            "-chardev" => {
                let options = parse_options(value);
                let id = options.get("id").cloned().ok_or_else(invalid)?;
                chardevs.insert(id, options);
            }
            "-mon" => {
                let options = parse_options(value);
                if options.get("mode").map(String::as_str) == Some("control") {
                    qmp_chardev = options.get("chardev").cloned();
                }
            }
            "-serial" => serial_chardev = value.strip_prefix("chardev:").map(str::to_string),
            "-kernel" => config.kernel = Some(PathBuf::from(value)),
            "-append" => config.cmdline = value.clone(),
            "-drive" => {
                let options = parse_options(value);
                let get = |k: &str| options.get(k).cloned().unwrap_or_default();
                config.drives.push(Drive {
                    id: get("id"),
                    node_name: get("node-name"),
                    file: PathBuf::from(get("file")),
                    format: get("format"),
                    cache: get("cache"),
                });
            }
            "-object" => {
                let mut options = parse_options(value);
                let kind = options.remove("").ok_or_else(invalid)?;
                let id = options.remove("id").ok_or_else(invalid)?;
                config.objects.insert(id, (kind, options));
            }
            "-incoming" => config.incoming = true,
            // Host-side confinement and devices the model has no use for.
            _ => {}
        }
    }
    let qmp = qmp_chardev
        .and_then(|id| chardevs.get(&id))
        .and_then(|c| c.get("path"))
        .ok_or(ArgsError::NoMonitor)?;
    config.qmp_socket = PathBuf::from(qmp);
    config.serial_log = serial_chardev
        .and_then(|id| chardevs.get(&id))
        .and_then(|c| c.get("path"))
        .map(PathBuf::from);
    if config.machine == "none" {
        return Ok(config);
    }
    let backend = config
        .objects
        .values()
        .find(|(kind, _)| kind == "memory-backend-ram")
        .and_then(|(_, o)| o.get("size"))
        .and_then(|s| parse_size(s, "B"));
    config.ram_bytes = match (backend, memory_arg) {
        (Some(backend), Some(m)) if backend != m => return Err(ArgsError::BackendSize),
        (Some(bytes), _) | (None, Some(bytes)) => bytes,
        // QEMU's default for x86.
        (None, None) => 128 << 20,
    };
    if let Some(kernel) = &config.kernel {
        if !kernel.is_file() {
            return Err(ArgsError::Kernel(kernel.display().to_string()));
        }
    }
    for drive in &config.drives {
        if std::fs::metadata(&drive.file).is_err() {
            return Err(ArgsError::Drive(drive.file.display().to_string()));
        }
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(text: &[&str]) -> Vec<String> {
        text.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn doubled_commas_stay_in_the_value() {
        let o = parse_options("socket,id=qmp,path=/run/a,,b/q.sock,server=on");
        assert_eq!(o[""], "socket");
        assert_eq!(o["path"], "/run/a,b/q.sock");
    }

    #[test]
    fn sizes_take_qemus_suffixes() {
        assert_eq!(parse_size("512M", "M"), Some(512 << 20));
        assert_eq!(parse_size("131064k", "M"), Some(131_064 << 10));
        assert_eq!(parse_size("512", "M"), Some(512 << 20));
        assert_eq!(parse_size("134209536", "B"), Some(134_209_536));
        assert_eq!(parse_size("1x", "M"), None);
    }

    #[test]
    fn a_probe_command_line_has_no_guest() {
        let c = parse(&argv(&[
            "-machine",
            "none",
            "-chardev",
            "socket,id=qmp,path=/tmp/p.sock,server=on,wait=off",
            "-mon",
            "chardev=qmp,mode=control",
        ]))
        .unwrap();
        assert_eq!(c.machine, "none");
        assert_eq!(c.qmp_socket, PathBuf::from("/tmp/p.sock"));
        assert_eq!(c.ram_bytes, 0);
    }

    #[test]
    fn a_backend_that_does_not_match_dash_m_is_refused() {
        let err = parse(&argv(&[
            "-object",
            "memory-backend-ram,id=pc.ram,size=134209536",
            "-machine",
            "pc-i440fx-7.2,memory-backend=pc.ram",
            "-m",
            "128M",
            "-chardev",
            "socket,id=qmp,path=/tmp/p.sock",
            "-mon",
            "chardev=qmp,mode=control",
        ]))
        .unwrap_err();
        assert_eq!(err, ArgsError::BackendSize);
    }

    #[test]
    fn a_missing_kernel_is_refused_in_qemus_words() {
        let err = parse(&argv(&[
            "-kernel",
            "/nonexistent/k.elf",
            "-chardev",
            "socket,id=qmp,path=/tmp/p.sock",
            "-mon",
            "chardev=qmp,mode=control",
        ]))
        .unwrap_err();
        assert!(err.to_string().contains("could not load kernel"), "{err}");
    }
}
