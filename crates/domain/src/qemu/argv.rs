//! The QEMU command line for a domain, as a vector (never through a shell).
//!
//! Values inside QEMU's `key=value,...` option syntax have their commas
//! doubled; values passed as whole arguments (`-kernel`, `-append`) are
//! passed verbatim.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::definition::{Accel, DomainDefinition, NicNetwork};
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
    /// The tap device of each bridged NIC, in the definition's order (the
    /// agent creates them).
    pub taps: &'a [String],
    /// How QEMU is confined.
    pub hardening: Hardening<'a>,
}

/// The id of the TLS credentials a QEMU presents as a migration's source.
pub const TLS_CLIENT_ID: &str = "livemig-tls-client";
/// The id of the TLS credentials a QEMU presents as a migration's
/// destination.
pub const TLS_SERVER_ID: &str = "livemig-tls-server";

/// How QEMU is confined; the agent decides from its config and what the
/// binary supports.
#[derive(Debug, Clone, Copy, Default)]
pub struct Hardening<'a> {
    /// Filter system calls (`-sandbox`, the binary must have seccomp).
    pub sandbox: bool,
    /// Drop to this user once QEMU has opened its files.
    pub user: Option<&'a str>,
    /// Spell that `-run-with user=` (QEMU 9.1+) rather than `-runas`.
    pub run_with: bool,
    /// Load the agent's TLS credentials (QEMU's file names) at start, for
    /// `migrate --tls`: read while QEMU can still read them.
    pub tls_credentials: Option<&'a Path>,
}

/// The `-drive` id (QEMU's block backend) of the disk the guest calls
/// `target`.
pub fn drive_id(target: &str) -> String {
    format!("drive-{target}")
}

/// The node name of the disk the guest calls `target`: what block jobs
/// and NBD exports name.
pub fn disk_node(target: &str) -> String {
    format!("disk-{target}")
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
    let accel = match (spec.accel, def.dirty_ring) {
        (Accel::Kvm, Some(entries)) => format!("kvm,dirty-ring-size={entries}"),
        (accel, _) => accel.to_string(),
    };
    push(&["-accel", &accel]);

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
    if let Some(cpu) = &def.cpu {
        push(&["-cpu", cpu]);
    }

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
    for (index, disk) in def.disks.iter().enumerate() {
        let target = disk.target_name(index);
        push(&[
            "-drive",
            &format!(
                "file={},format={},if=none,id={},node-name={},cache={}",
                path_value(&disk.path),
                disk.format.as_qemu(),
                drive_id(&target),
                disk_node(&target),
                disk.cache.as_qemu(),
            ),
            "-device",
            &format!("virtio-blk-pci,drive={},id={target}", drive_id(&target)),
        ]);
    }
    let mut taps = config.taps.iter();
    for (index, nic) in def.nics.iter().enumerate() {
        let backend = match nic.network {
            NicNetwork::User => format!("user,id=net{index}"),
            NicNetwork::Bridge => format!(
                "tap,id=net{index},ifname={},script=no,downscript=no",
                taps.next().expect("a tap for every bridged NIC")
            ),
        };
        // No option ROM: the guests boot their kernel directly, and both
        // sides of a migration must agree on the ROMs anyway.
        push(&[
            "-netdev",
            &backend,
            "-device",
            &format!(
                "virtio-net-pci,netdev=net{index},mac={},romfile=,id=nic{index}",
                nic.mac_address(def.name.as_str(), index)
            ),
        ]);
    }
    if config.incoming {
        push(&["-incoming", "defer"]);
    }
    let hardening = config.hardening;
    if let Some(dir) = hardening.tls_credentials {
        for (id, endpoint) in [(TLS_CLIENT_ID, "client"), (TLS_SERVER_ID, "server")] {
            push(&[
                "-object",
                &format!(
                    "tls-creds-x509,id={id},dir={},endpoint={endpoint},verify-peer=on",
                    path_value(dir)
                ),
            ]);
        }
    }
    if hardening.sandbox {
        // QEMU drops to its user with setuid after the filter is in place,
        // so set*id calls stay allowed when it has one.
        let elevate = if hardening.user.is_some() {
            "allow"
        } else {
            "deny"
        };
        push(&[
            "-sandbox",
            &format!(
                "on,obsolete=deny,elevateprivileges={elevate},spawn=deny,resourcecontrol=deny"
            ),
        ]);
    }
    if let Some(user) = hardening.user {
        if hardening.run_with {
            push(&["-run-with", &format!("user={}", escape_option_value(user))]);
        } else {
            push(&["-runas", user]);
        }
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
        argv_of(&definition(), spec, incoming, &[])
    }

    /// `def` started as `spec` says, with the given taps.
    fn argv_of(
        def: &DomainDefinition,
        spec: &LaunchSpec,
        incoming: bool,
        taps: &[String],
    ) -> Vec<String> {
        build_argv(&LaunchConfig {
            definition: def,
            spec,
            qmp_socket: &PathBuf::from("/run/x,y/qmp.sock"),
            serial_log: &PathBuf::from("/run/serial.log"),
            incoming,
            taps,
            hardening: Hardening::default(),
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
    fn a_kvm_dirty_ring_is_an_accelerator_property() {
        let def = DomainDefinition::from_toml(
            "name = \"vm\"\nmemory_mib = 64\naccel = \"kvm\"\ndirty_ring = 4096\n[kernel]\npath = \"/k\"\n",
        )
        .unwrap();
        let spec = LaunchSpec {
            machine: "pc".into(),
            accel: Accel::Kvm,
            ram: RamLayout::plain(64),
        };
        let argv = argv_of(&def, &spec, false, &[]);
        assert_eq!(value_of(&argv, "-accel"), ["kvm,dirty-ring-size=4096"]);
    }

    #[test]
    fn disks_get_node_names_by_target_and_bridged_nics_their_taps() {
        let def = DomainDefinition::from_toml(
            r#"
name = "web1"
memory_mib = 256
[kernel]
path = "/k"
[[disks]]
path = "/i/a.qcow2"
format = "qcow2"
[[disks]]
path = "/i/b.raw"
cache = "directsync"
target = "vdc"
[[nics]]
network = "user"
[[nics]]
bridge = "br0"
mac = "52:54:00:aa:bb:cc"
"#,
        )
        .unwrap();
        let spec = LaunchSpec {
            machine: "pc".into(),
            accel: Accel::Tcg,
            ram: RamLayout::plain(256),
        };
        let argv = argv_of(&def, &spec, false, &["lm01234567n1".to_string()]);
        assert_eq!(
            value_of(&argv, "-drive"),
            [
                "file=/i/a.qcow2,format=qcow2,if=none,id=drive-vda,node-name=disk-vda,cache=none",
                "file=/i/b.raw,format=raw,if=none,id=drive-vdc,node-name=disk-vdc,cache=directsync",
            ]
        );
        assert_eq!(
            value_of(&argv, "-netdev"),
            [
                "user,id=net0",
                "tap,id=net1,ifname=lm01234567n1,script=no,downscript=no"
            ]
        );
        let devices = value_of(&argv, "-device");
        assert_eq!(devices[0], "virtio-blk-pci,drive=drive-vda,id=vda");
        assert_eq!(devices[1], "virtio-blk-pci,drive=drive-vdc,id=vdc");
        assert!(devices[2].starts_with("virtio-net-pci,netdev=net0,mac=52:54:00:"));
        assert_eq!(
            devices[3],
            "virtio-net-pci,netdev=net1,mac=52:54:00:aa:bb:cc,romfile=,id=nic1"
        );
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

    #[test]
    fn hardening_sandboxes_drops_privileges_and_loads_tls_credentials() {
        let def = definition();
        let spec = LaunchSpec {
            machine: "pc-i440fx-7.2".into(),
            accel: Accel::Tcg,
            ram: RamLayout::plain(256),
        };
        let build = |hardening| {
            build_argv(&LaunchConfig {
                definition: &def,
                spec: &spec,
                qmp_socket: Path::new("/run/qmp.sock"),
                serial_log: Path::new("/run/serial.log"),
                incoming: false,
                taps: &[],
                hardening,
            })
        };
        let none = build(Hardening::default());
        assert!(!none.iter().any(|a| a == "-sandbox" || a == "-runas"));

        let root = build(Hardening {
            sandbox: true,
            ..Default::default()
        });
        assert_eq!(
            value_of(&root, "-sandbox"),
            ["on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]
        );

        let user = build(Hardening {
            sandbox: true,
            user: Some("livemig-qemu"),
            run_with: false,
            tls_credentials: Some(Path::new("/state/qemu-tls")),
        });
        assert!(value_of(&user, "-sandbox")[0].contains("elevateprivileges=allow"));
        assert_eq!(value_of(&user, "-runas"), ["livemig-qemu"]);
        assert_eq!(
            value_of(&user, "-object"),
            [
                "tls-creds-x509,id=livemig-tls-client,dir=/state/qemu-tls,endpoint=client,verify-peer=on",
                "tls-creds-x509,id=livemig-tls-server,dir=/state/qemu-tls,endpoint=server,verify-peer=on",
            ]
        );
        let newer = build(Hardening {
            user: Some("q"),
            run_with: true,
            ..Default::default()
        });
        assert_eq!(value_of(&newer, "-run-with"), ["user=q"]);
    }
}
