//! The QEMU command line for a domain, as a vector (never through a shell).
//!
//! Values inside QEMU's `key=value,...` option syntax have their commas
//! doubled; values passed as whole arguments (`-kernel`, `-append`) are
//! passed verbatim.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::definition::{Accel, DiskCache, DiskFormat, DomainDefinition};
use crate::qemu::layout::RamLayout;

/// The parts of a QEMU configuration that are decided when a domain starts
/// and must be identical on both ends of a migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchSpec {
    /// A concrete machine type (`pc-i440fx-7.2`), never an alias such as
    /// `pc`, which means different things to different QEMU versions.
    pub machine: String,
    /// The accelerator.
    pub accel: Accel,
    /// How guest RAM is given to QEMU.
    pub ram: RamLayout,
}

/// Everything [`build_argv`] needs.
#[derive(Debug, Clone, Copy)]
pub struct LaunchConfig<'a> {
    /// The domain.
    pub definition: &'a DomainDefinition,
    /// How to run it.
    pub spec: &'a LaunchSpec,
    /// Where QEMU serves QMP.
    pub qmp_socket: &'a Path,
    /// Where the guest's serial console goes.
    pub serial_log: &'a Path,
    /// Start paused, waiting for `migrate-incoming`.
    pub incoming: bool,
}

/// Escapes a value for QEMU's `key=value,...` syntax.
pub fn escape_option_value(value: &str) -> String {
    value.replace(',', ",,")
}

fn path_value(path: &Path) -> String {
    escape_option_value(&path.to_string_lossy())
}

/// Builds the argument vector (without the binary itself).
pub fn build_argv(config: &LaunchConfig<'_>) -> Vec<String> {
    let def = config.definition;
    let spec = config.spec;
    let mut argv: Vec<String> = Vec::new();
    let mut push = |args: &[&str]| argv.extend(args.iter().map(|s| s.to_string()));

    push(&["-name", &format!("guest={},debug-threads=on", def.name)]);
    push(&["-nodefaults", "-no-user-config", "-display", "none"]);
    push(&["-msg", "timestamp=on"]);
    push(&["-accel", &spec.accel.to_string()]);

    let mut machine = escape_option_value(&spec.machine);
    if spec.ram.backend {
        machine.push_str(",memory-backend=pc.ram");
        push(&[
            "-object",
            &format!("memory-backend-ram,id=pc.ram,size={}", spec.ram.bytes),
        ]);
    }
    push(&["-machine", &machine]);
    push(&["-m", &spec.ram.memory_arg()]);
    push(&["-smp", &def.vcpus.to_string()]);

    push(&[
        "-chardev",
        &format!(
            "socket,id=qmp,path={},server=on,wait=off",
            path_value(config.qmp_socket)
        ),
        "-mon",
        "chardev=qmp,mode=control",
    ]);
    push(&[
        "-chardev",
        &format!("file,id=serial0,path={}", path_value(config.serial_log)),
        "-serial",
        "chardev:serial0",
    ]);

    if let Some(kernel) = &def.kernel {
        push(&["-kernel", &kernel.path.to_string_lossy()]);
        if !kernel.cmdline.is_empty() {
            push(&["-append", &kernel.cmdline]);
        }
        if let Some(initrd) = &kernel.initrd {
            push(&["-initrd", &initrd.to_string_lossy()]);
        }
    }
    if let Some(disk) = &def.disk {
        let format = match disk.format {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        };
        let cache = match disk.cache {
            DiskCache::None => "none",
            DiskCache::Writeback => "writeback",
        };
        push(&[
            "-drive",
            &format!(
                "file={},format={format},if=virtio,cache={cache}",
                path_value(&disk.path)
            ),
        ]);
    }
    if config.incoming {
        push(&["-incoming", "defer"]);
    }
    argv
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn definition() -> DomainDefinition {
        DomainDefinition::from_toml(
            r#"
name = "web1"
memory_mib = 256
vcpus = 2
[kernel]
path = "/k/guest,1.elf"
cmdline = "wss=8 spin=0,x"
[disk]
path = "/shared/a,b.qcow2"
format = "qcow2"
"#,
        )
        .unwrap()
    }

    fn argv(spec: &LaunchSpec, incoming: bool) -> Vec<String> {
        let def = definition();
        build_argv(&LaunchConfig {
            definition: &def,
            spec,
            qmp_socket: &PathBuf::from("/run/x,y/qmp.sock"),
            serial_log: &PathBuf::from("/run/serial.log"),
            incoming,
        })
    }

    fn value_of<'a>(argv: &'a [String], flag: &str) -> Vec<&'a str> {
        argv.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }

    #[test]
    fn commas_in_option_values_are_doubled_but_whole_arguments_are_verbatim() {
        let spec = LaunchSpec {
            machine: "pc-i440fx-7.2".into(),
            accel: Accel::Tcg,
            ram: RamLayout::plain(256),
        };
        let argv = argv(&spec, false);
        assert_eq!(value_of(&argv, "-kernel"), ["/k/guest,1.elf"]);
        assert_eq!(value_of(&argv, "-append"), ["wss=8 spin=0,x"]);
        assert!(value_of(&argv, "-drive")[0].starts_with("file=/shared/a,,b.qcow2,format=qcow2"));
        assert!(value_of(&argv, "-chardev")[0].contains("path=/run/x,,y/qmp.sock,"));
        assert_eq!(value_of(&argv, "-m"), ["256M"]);
        assert_eq!(value_of(&argv, "-smp"), ["2"]);
        assert!(!argv.contains(&"-incoming".to_string()));
    }

    #[test]
    fn workaround_layout_uses_a_sized_backend_and_incoming_waits() {
        let spec = LaunchSpec {
            machine: "pc-i440fx-7.2".into(),
            accel: Accel::Tcg,
            ram: RamLayout {
                bytes: 256 * 1024 * 1024 - 8192,
                backend: true,
            },
        };
        let argv = argv(&spec, true);
        assert_eq!(
            value_of(&argv, "-machine"),
            ["pc-i440fx-7.2,memory-backend=pc.ram"]
        );
        assert_eq!(
            value_of(&argv, "-object"),
            ["memory-backend-ram,id=pc.ram,size=268427264"]
        );
        assert_eq!(value_of(&argv, "-m"), ["262136k"]);
        assert_eq!(value_of(&argv, "-incoming"), ["defer"]);
    }
}
