//! The client against a real QEMU (`-machine none`, no guest needed).

use std::process::Stdio;
use std::time::Duration;

use qmp::commands::migration::{
    CapabilityStatus, MigrateSetCapabilities, MigrateSetParameters, MigrationCapability,
    MigrationParameters, QueryMigrate, QueryMigrateCapabilities, QueryMigrateParameters,
};
use qmp::commands::vm::{QueryStatus, QueryVersion, Quit, RunState};
use qmp::{Client, EventKind};

struct Qemu {
    child: tokio::process::Child,
    _dir: tempfile::TempDir,
    client: Client,
}

async fn start_qemu() -> Qemu {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("qmp.sock");
    let child = tokio::process::Command::new("qemu-system-x86_64")
        .args([
            "-machine",
            "none",
            "-nodefaults",
            "-display",
            "none",
            "-qmp",
        ])
        .arg(format!("unix:{},server=on,wait=off", socket.display()))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("qemu-system-x86_64 is installed");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let client = loop {
        match Client::connect(&socket, Duration::from_secs(5)).await {
            Ok(c) => break c,
            Err(e) if tokio::time::Instant::now() > deadline => panic!("QMP never came up: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    Qemu {
        child,
        _dir: dir,
        client,
    }
}

#[tokio::test]
async fn typed_queries_decode_real_replies() {
    let qemu = start_qemu().await;
    let version = qemu.client.execute(&QueryVersion).await.unwrap();
    assert_eq!(version.qemu, qemu.client.greeting().version.qemu);
    let status = qemu.client.execute(&QueryStatus).await.unwrap();
    assert_ne!(status.status, RunState::Unknown);
    let info = qemu.client.execute(&QueryMigrate).await.unwrap();
    assert_eq!(info.status, None, "no migration yet");
    let params = qemu.client.execute(&QueryMigrateParameters).await.unwrap();
    assert!(params.max_bandwidth.unwrap() > 0);
    assert!(params.names().iter().any(|n| n == "downtime-limit"));
}

#[tokio::test]
async fn capabilities_and_parameters_can_be_set_and_read_back() {
    let qemu = start_qemu().await;
    let c = &qemu.client;
    c.execute(&MigrateSetCapabilities {
        capabilities: vec![CapabilityStatus {
            capability: MigrationCapability::AutoConverge,
            state: true,
        }],
    })
    .await
    .unwrap();
    let caps = c.execute(&QueryMigrateCapabilities).await.unwrap();
    let ac = caps
        .iter()
        .find(|s| s.capability == MigrationCapability::AutoConverge)
        .unwrap();
    assert!(ac.state);

    c.execute(&MigrateSetParameters(MigrationParameters {
        cpu_throttle_initial: Some(35),
        downtime_limit: Some(123),
        ..Default::default()
    }))
    .await
    .unwrap();
    let params = c.execute(&QueryMigrateParameters).await.unwrap();
    assert_eq!(params.cpu_throttle_initial, Some(35));
    assert_eq!(params.downtime_limit, Some(123));
}

#[tokio::test]
async fn an_unknown_capability_is_a_typed_generic_error() {
    let qemu = start_qemu().await;
    let err = qemu
        .client
        .execute(&MigrateSetCapabilities {
            capabilities: vec![CapabilityStatus {
                capability: MigrationCapability::Other("no-such-capability".into()),
                state: true,
            }],
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no-such-capability"), "{err}");
}

#[tokio::test]
async fn quit_emits_shutdown_and_then_the_connection_closes() {
    let mut qemu = start_qemu().await;
    let mut events = qemu.client.events();
    qemu.client.execute(&Quit).await.unwrap();
    let event = tokio::time::timeout(Duration::from_secs(10), events.recv())
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(
        event.kind(),
        EventKind::Shutdown { guest: false, .. }
    ));
    let status = tokio::time::timeout(Duration::from_secs(10), qemu.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    tokio::time::timeout(Duration::from_secs(5), async {
        while !qemu.client.is_closed() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
}
