use super::*;

fn definition(kernel: &Path, serial: Option<&Path>) -> DomainDefinition {
    let mut text = format!(
        "name = \"vm\"\nmemory_mib = 64\n[kernel]\npath = {:?}\n",
        kernel.display().to_string()
    );
    if let Some(log) = serial {
        text.push_str(&format!(
            "[serial]\nlog = {:?}\n",
            log.display().to_string()
        ));
    }
    DomainDefinition::from_toml(&text).unwrap()
}

fn confinement(root: &Path) -> Confinement {
    Confinement {
        image_dirs: vec![root.join("images")],
        allow_device_nodes: false,
        logs_dir: root.join("state/logs"),
    }
}

#[tokio::test]
async fn images_only_under_the_allowed_directories_links_followed() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    for d in ["images", "elsewhere", "state/logs"] {
        std::fs::create_dir_all(r.join(d)).unwrap();
    }
    std::fs::write(r.join("images/kernel"), b"k").unwrap();
    std::fs::write(r.join("elsewhere/secret"), b"s").unwrap();
    std::os::unix::fs::symlink(r.join("elsewhere/secret"), r.join("images/link")).unwrap();
    let c = confinement(r);

    c.check(&definition(&r.join("images/kernel"), None))
        .await
        .unwrap();
    // Not there yet: allowed, QEMU says so at start.
    c.check(&definition(&r.join("images/new/kernel"), None))
        .await
        .unwrap();
    for refused in [
        r.join("elsewhere/secret"),
        r.join("images/link"),
        PathBuf::from("/etc/passwd"),
    ] {
        let err = c.check(&definition(&refused, None)).await.unwrap_err();
        assert!(
            matches!(err, ConfinementError::OutsideImageDirs { .. }),
            "{refused:?}: {err}"
        );
    }
    let err = c
        .check(&definition(&r.join("images/../elsewhere/secret"), None))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ConfinementError::ParentComponent { .. }),
        "{err}"
    );
    let none = Confinement {
        image_dirs: vec![],
        ..c
    };
    let err = none
        .check(&definition(&r.join("images/kernel"), None))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("none configured"), "{err}");
}

#[tokio::test]
async fn device_nodes_only_when_allowed() {
    let root = tempfile::tempdir().unwrap();
    let c = Confinement {
        image_dirs: vec![PathBuf::from("/dev")],
        allow_device_nodes: false,
        logs_dir: root.path().to_path_buf(),
    };
    let err = c
        .check(&definition(Path::new("/dev/null"), None))
        .await
        .unwrap_err();
    assert!(matches!(err, ConfinementError::DeviceNode { .. }), "{err}");
    let allowed = Confinement {
        allow_device_nodes: true,
        ..c
    };
    allowed
        .check(&definition(Path::new("/dev/null"), None))
        .await
        .unwrap();
}

#[tokio::test]
async fn serial_logs_only_in_the_log_directory() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    for d in ["images", "state/logs"] {
        std::fs::create_dir_all(r.join(d)).unwrap();
    }
    let c = confinement(r);
    let kernel = r.join("images/kernel");
    for own in ["state/logs/vm.serial.log", "state/logs/vm/console.log"] {
        c.check(&definition(&kernel, Some(&r.join(own))))
            .await
            .unwrap();
    }
    for refused in [
        r.join("state/definitions.db"),
        PathBuf::from("/etc/passwd"),
        r.join("state/logs"),
        // Another domain's, the agent's QEMU log, and a name that makes
        // another domain's default.
        r.join("state/logs/web.serial.log"),
        r.join("state/logs/vm.qemu.log"),
        r.join("state/logs/vm.log"),
        r.join("state/logs/vm/deeper/console.log"),
    ] {
        let err = c
            .check(&definition(&kernel, Some(&refused)))
            .await
            .unwrap_err();
        assert!(
            matches!(err, ConfinementError::SerialLogOutside { .. }),
            "{refused:?}: {err}"
        );
    }
}

fn disk_definition(kernel: &Path, disk: &Path, format: &str) -> DomainDefinition {
    let text = format!(
        "name = \"vm\"\nmemory_mib = 64\n[kernel]\npath = {:?}\n[[disks]]\npath = {:?}\nformat = \"{format}\"\n",
        kernel.display().to_string(),
        disk.display().to_string()
    );
    DomainDefinition::from_toml(&text).unwrap()
}

/// `qemu-img create -f qcow2 [-b BACKING -F FORMAT] PATH 1M`.
fn qcow2(path: &Path, backing: Option<(&str, &str)>) {
    let mut command = std::process::Command::new("qemu-img");
    command.args(["create", "-q", "-f", "qcow2", "-u"]);
    if let Some((file, format)) = backing {
        command.args(["-b", file, "-F", format]);
    }
    let out = command
        .arg(path)
        .arg("1M")
        .output()
        .expect("qemu-img (qemu-utils)");
    assert!(out.status.success(), "{out:?}");
}

#[tokio::test]
async fn a_qcow2_disk_is_confined_down_its_whole_backing_chain() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    for d in ["images", "elsewhere", "state/logs"] {
        std::fs::create_dir_all(r.join(d)).unwrap();
    }
    let kernel = r.join("images/kernel");
    std::fs::write(&kernel, b"k").unwrap();
    std::fs::write(r.join("images/base.raw"), vec![0u8; 1 << 20]).unwrap();
    std::fs::write(r.join("elsewhere/secret"), b"s").unwrap();
    let c = confinement(r);
    let s = |p: PathBuf| p.display().to_string();

    // Inside, two deep, relative and absolute names: allowed.
    qcow2(
        &r.join("images/mid.qcow2"),
        Some((&s(r.join("images/base.raw")), "raw")),
    );
    qcow2(&r.join("images/top.qcow2"), Some(("mid.qcow2", "qcow2")));
    c.check(&disk_definition(
        &kernel,
        &r.join("images/top.qcow2"),
        "qcow2",
    ))
    .await
    .unwrap();

    // Two deep, the bottom outside.
    qcow2(
        &r.join("images/leak.qcow2"),
        Some((&s(r.join("elsewhere/secret")), "raw")),
    );
    qcow2(&r.join("images/over.qcow2"), Some(("leak.qcow2", "qcow2")));
    let err = c
        .check(&disk_definition(
            &kernel,
            &r.join("images/over.qcow2"),
            "qcow2",
        ))
        .await
        .unwrap_err();
    let ConfinementError::Backing { inner, .. } = &err else {
        panic!("{err}");
    };
    assert!(
        matches!(**inner, ConfinementError::OutsideImageDirs { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("secret"), "{err}");

    // The same file opened as raw names nothing.
    c.check(&disk_definition(
        &kernel,
        &r.join("images/over.qcow2"),
        "raw",
    ))
    .await
    .unwrap();

    // A protocol, JSON, '..', an unrecorded format.
    for (name, backing, format, expected) in [
        ("nbd.qcow2", "nbd://10.0.0.1:10809/x", "raw", "protocol"),
        (
            "json.qcow2",
            "json:{\"file.filename\":\"/etc/shadow\"}",
            "raw",
            "JSON",
        ),
        ("up.qcow2", "../elsewhere/secret", "raw", "'..'"),
        ("vmdk.qcow2", "base.raw", "vmdk", "recorded format"),
    ] {
        let path = r.join("images").join(name);
        let out = std::process::Command::new("qemu-img")
            .args([
                "create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", format,
            ])
            .arg(&path)
            .arg("1M")
            .output()
            .unwrap();
        assert!(out.status.success(), "{name}: {out:?}");
        let err = c
            .check(&disk_definition(&kernel, &path, "qcow2"))
            .await
            .unwrap_err();
        assert!(
            matches!(err, ConfinementError::Image { .. }) && err.to_string().contains(expected),
            "{name}: {err}"
        );
    }

    // A chain that loops.
    qcow2(
        &r.join("images/loop-a.qcow2"),
        Some(("loop-b.qcow2", "qcow2")),
    );
    qcow2(
        &r.join("images/loop-b.qcow2"),
        Some(("loop-a.qcow2", "qcow2")),
    );
    let err = c
        .check(&disk_definition(
            &kernel,
            &r.join("images/loop-a.qcow2"),
            "qcow2",
        ))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("deeper than"), "{err}");

    // Backing for a migration's new image: the same rules.
    c.check_image(
        "backing file",
        &r.join("images/top.qcow2"),
        DiskFormat::Qcow2,
    )
    .await
    .unwrap();
    let err = c
        .check_image("backing file", &r.join("elsewhere/secret"), DiskFormat::Raw)
        .await
        .unwrap_err();
    assert!(
        matches!(err, ConfinementError::OutsideImageDirs { .. }),
        "{err}"
    );
}

#[tokio::test]
async fn a_link_to_nothing_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    for d in ["images", "elsewhere", "state/logs"] {
        std::fs::create_dir_all(r.join(d)).unwrap();
    }
    let kernel = r.join("images/kernel");
    std::fs::write(&kernel, b"k").unwrap();
    // Whatever created the disk would follow the link out.
    std::os::unix::fs::symlink(r.join("elsewhere/new.raw"), r.join("images/new.raw")).unwrap();
    let c = confinement(r);
    let err = c
        .check(&disk_definition(&kernel, &r.join("images/new.raw"), "raw"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ConfinementError::DanglingLink { .. }),
        "{err}"
    );
    // A missing file under a real directory is still fine.
    c.check(&disk_definition(
        &kernel,
        &r.join("images/later.raw"),
        "raw",
    ))
    .await
    .unwrap();
}
