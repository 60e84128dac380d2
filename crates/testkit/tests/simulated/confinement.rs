//! No request makes an agent's VM open a file it was not configured for:
//! images only from the agent's image directories, device nodes only when
//! allowed, a qcow2 image's whole backing chain, no link to nothing, serial
//! logs only the domain's own; checked on the agent for every definition,
//! however it arrives.

use std::time::Duration;

use guest::Workload;
use protocol::domain::DefinitionDoc;
use protocol::job::JobStatus;
use protocol::{AgentUri, Client, ErrorCode, Request, Role};
use serde_json::json;
use testkit::{assert_runs_only_on, TestBed};

#[tokio::test]
async fn definitions_naming_files_outside_what_the_host_allows_are_refused_untouched() {
    let bed = TestBed::simulated().await;
    let a = bed.host("a").await;
    // An administrator, over the network, sending definitions as raw
    // documents: no CLI-side check helps.
    let admin = bed.certificate("root", Role::Admin, &[]);
    let config = tls::TlsDir::load(&admin).unwrap().client_config().unwrap();
    let uri: AgentUri = a.uri().parse().unwrap();
    let client = Client::connect_with(&uri, Some(&config)).await.unwrap();

    let victim = bed.path().join("victim.txt");
    std::fs::write(&victim, "precious").unwrap();
    let device = bed.images().join("null");
    nix::sys::stat::mknod(
        &device,
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o600),
        nix::sys::stat::makedev(1, 3),
    )
    .unwrap();
    let kernel = bed.kernel().display().to_string();
    let images = bed.images().display().to_string();
    // A qcow2 inside whose backing file is the victim: QEMU would serve
    // its bytes to the guest.
    let leak = bed.images().join("leak.qcow2");
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b"])
        .arg(&victim)
        .arg(&leak)
        .arg("1M")
        .output()
        .expect("qemu-img (qemu-utils)");
    assert!(out.status.success(), "{out:?}");
    // A link to nothing: creating the image would follow it out.
    let dangling = bed.images().join("new.raw");
    std::os::unix::fs::symlink(bed.path().join("planted.raw"), &dangling).unwrap();
    let other_log = a.state_dir().join("logs/web.serial.log");
    let cases = [
        (
            json!({"name": "vm", "memory_mib": 64, "kernel": {"path": victim}}),
            "outside the image directories",
        ),
        (
            json!({"name": "vm", "memory_mib": 64, "kernel": {"path": format!("{images}/../victim.txt")}}),
            "contains '..'",
        ),
        (
            json!({"name": "vm", "memory_mib": 64, "kernel": {"path": kernel},
                "serial": {"log": victim}}),
            "is not vm's own",
        ),
        (
            json!({"name": "vm", "memory_mib": 64, "kernel": {"path": kernel},
                "serial": {"log": other_log}}),
            "is not vm's own",
        ),
        (
            json!({"name": "vm", "memory_mib": 64, "kernel": {"path": kernel},
                "disks": [{"path": leak, "format": "qcow2"}]}),
            "the backing chain of",
        ),
        (
            json!({"name": "vm", "memory_mib": 64, "kernel": {"path": kernel},
                "disks": [{"path": dangling}]}),
            "a symbolic link to a missing file",
        ),
        (
            json!({"name": "vm", "memory_mib": 64, "disk": {"path": device}}),
            "is a device node",
        ),
        (
            json!({"name": "vm", "memory_mib": 0, "kernel": {"path": kernel}}),
            "memory_mib must be between",
        ),
    ];
    for (document, expected) in cases {
        let refused = client
            .request(
                Request::Define {
                    definition: DefinitionDoc(document.clone()),
                },
                Duration::from_secs(30),
            )
            .await
            .unwrap_err()
            .to_api();
        assert_eq!(refused.code, ErrorCode::InvalidDefinition, "{document}");
        assert!(
            refused.message.contains(expected),
            "{document}: {}",
            refused.message
        );
    }

    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    assert!(!bed.path().join("planted.raw").exists());
    assert!(a.list_all().await.is_empty(), "nothing defined");
    let saved = std::fs::read_dir(a.state_dir().join("domains"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(saved, 0, "nothing written");
    assert!(a.qemu_pids().is_empty());
}

#[tokio::test]
async fn a_destination_that_does_not_allow_the_guest_s_images_refuses_it_at_prepare() {
    let bed = TestBed::simulated().await;
    let a = bed.host("a").await;
    let elsewhere = bed.path().join("b-images");
    std::fs::create_dir(&elsewhere).unwrap();
    let b = bed.host_with_image_dirs("b", vec![elsewhere]).await;
    a.define_and_start(bed.definition("vm", 64, Workload::busy(4, 50_000)))
        .await;

    let record = a.migrate_live("vm", &b).await;

    assert_eq!(record.status, JobStatus::Failed, "{record:?}");
    let error = record.error.unwrap_or_default();
    assert!(error.contains("outside the image directories"), "{error}");
    assert_runs_only_on("vm", &a, &b, 1).await;
    assert!(
        b.list_all().await.is_empty(),
        "b keeps no trace of the guest"
    );
}
