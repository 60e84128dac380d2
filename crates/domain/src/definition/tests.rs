//! The definition's parsing and validation.

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
fn a_dirty_ring_is_kvms_and_reaches_the_accelerator_option() {
    let def =
        DomainDefinition::from_toml(&format!("accel = \"kvm\"\ndirty_ring = 4096\n{MINIMAL}"))
            .unwrap();
    assert_eq!(def.dirty_ring, Some(4096));
    assert_eq!(DomainDefinition::from_toml(&def.to_toml()).unwrap(), def);
    assert_eq!(
        DomainDefinition::from_document(def.to_document()).unwrap(),
        def
    );
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
fn an_older_single_disk_is_the_first_disk_on_shared_storage() {
    let old = format!("{MINIMAL}[disk]\npath = \"/i/a.qcow2\"\nformat = \"qcow2\"\n");
    let def = DomainDefinition::from_toml(&old).unwrap();
    assert_eq!(def.disks.len(), 1);
    assert!(def.disks[0].shared);
    assert_eq!(def.disks[0].target_name(0), "vda");
    // Saved again, it is a [[disks]] entry.
    let saved = def.to_toml();
    assert!(
        saved.contains("[[disks]]") && !saved.contains("[disk]"),
        "{saved}"
    );
    assert_eq!(DomainDefinition::from_toml(&saved).unwrap(), def);
    let both = format!("{old}[[disks]]\npath = \"/i/b.raw\"\n");
    assert!(matches!(
        DomainDefinition::from_toml(&both),
        Err(DefinitionError::DiskAndDisks)
    ));
}

#[test]
fn disks_and_nics_round_trip_and_are_validated() {
    let text = format!(
            "{MINIMAL}[[disks]]\npath = \"/i/a.qcow2\"\nformat = \"qcow2\"\ncache = \"writeback\"\n\
             [[disks]]\npath = \"/i/b.raw\"\nshared = true\n\
             [[nics]]\nbridge = \"br0\"\nmac = \"52:54:00:00:00:07\"\n[[nics]]\nnetwork = \"user\"\n"
        );
    let def = DomainDefinition::from_toml(&text).unwrap();
    assert_eq!(def.disks[1].target_name(1), "vdb");
    assert_eq!(def.disks[0].cache, DiskCache::Writeback);
    assert_eq!(def.nics[1].network, NicNetwork::User);
    assert_eq!(DomainDefinition::from_toml(&def.to_toml()).unwrap(), def);
    assert_eq!(
        DomainDefinition::from_document(def.to_document()).unwrap(),
        def
    );
    for (bad, expected) in [
        (
            text.replace("bridge = \"br0\"", "bridge = \"br 0\""),
            "not an interface name",
        ),
        (
            text.replace("52:54:00:00:00:07", "ff:ff:ff:ff:ff:ff"),
            "not a unicast",
        ),
        (
            text.replace("shared = true", "target = \"vda\""),
            "two disks are named vda",
        ),
        (text.replace("/i/b.raw", "b.raw"), "absolute"),
    ] {
        let err = DomainDefinition::from_toml(&bad).unwrap_err();
        assert!(err.to_string().contains(expected), "{err} / {expected}");
    }
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
        (
            format!("accel = \"kvm\"\ndirty_ring = 3000\n{MINIMAL}"),
            "power of two between 1024 and 65536, got 3000",
        ),
        (
            format!("accel = \"kvm\"\ndirty_ring = 512\n{MINIMAL}"),
            "got 512",
        ),
        (
            format!("dirty_ring = 4096\n{MINIMAL}"),
            "dirty_ring needs accel = \"kvm\"",
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
