//! A compromised peer agent in front of a real one: what it cannot make
//! the source do.

use std::sync::Arc;

use guest::Workload;
use protocol::job::JobStatus;
use protocol::{MigrateOptions, Reply};
use testkit::rogue::RoguePeer;
use testkit::{assert_runs_only_on, TestBed};

#[tokio::test]
async fn a_compromised_peer_cannot_make_the_source_run_a_command_or_send_the_guest_elsewhere() {
    let bed = TestBed::simulated().await;
    let (a, b) = bed
        .two_hosts_running("vm", 64, Workload::busy(4, 50_000))
        .await;
    // Where a stolen stream would go: another loopback address, and a
    // socket on the source's host.
    let sink = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
    sink.set_nonblocking(true).unwrap();
    let sink_addr = sink.local_addr().unwrap();
    let socket_path = bed.path().join("stolen.sock");
    let socket_sink = std::os::unix::net::UnixListener::bind(&socket_path).unwrap();
    socket_sink.set_nonblocking(true).unwrap();
    let marker = bed.path().join("owned");

    let cases = [
        (
            format!("exec:touch {}", marker.display()),
            "unsupported transport",
        ),
        (format!("tcp:{sink_addr}"), "which is not its own address"),
        (
            format!("unix:{}", socket_path.display()),
            "a local socket nobody asked for",
        ),
    ];
    for (evil, expected) in cases {
        let answer = evil.clone();
        let rogue = RoguePeer::start(
            &bed,
            &b,
            Arc::new(move |reply| match reply {
                Reply::Prepared { .. } => Reply::Prepared {
                    uri: answer.clone(),
                    nbd_port: None,
                    nbd_host: None,
                },
                other => other,
            }),
        )
        .await;
        let record = rogue
            .migrate_from(
                &a,
                "vm",
                MigrateOptions {
                    live: true,
                    ..Default::default()
                },
            )
            .await;

        assert_eq!(record.status, JobStatus::Failed, "{evil}: {record:?}");
        let error = record.error.clone().unwrap_or_default();
        assert!(error.contains(expected), "{evil}: {error}");
        assert!(
            error.contains(&evil),
            "the error names what was refused: {error}"
        );
        // Nothing was run, nothing connected anywhere.
        assert!(!marker.exists(), "{evil}: the command ran");
        assert!(sink.accept().is_err(), "{evil}: a connection to the sink");
        assert!(
            socket_sink.accept().is_err(),
            "{evil}: a connection to the socket"
        );
        // The real destination was told to tear down.
        b.wait_no_qemu().await;
    }
    assert_runs_only_on("vm", &a, &b, 1).await;
}

#[tokio::test]
async fn a_compromised_peer_cannot_send_the_guest_s_disk_to_another_host() {
    let bed = TestBed::simulated().await;
    let a = bed.host_with_local_storage("a", &[]).await;
    let b = bed.host_with_local_storage("b", &[]).await;
    std::fs::write(bed.local_of("a").join("vm.raw"), vec![0x5au8; 1 << 20]).unwrap();
    let def = domain::DomainDefinition::from_toml(&format!(
        "{}[[disks]]\npath = {:?}\n",
        guest::definition_toml("vm", 64, bed.kernel(), Workload::IDLE),
        bed.local().join("vm.raw").display().to_string(),
    ))
    .unwrap();
    a.define_and_start(def).await;
    // Where a stolen disk would go: another loopback address.
    let sink = std::net::TcpListener::bind("127.0.0.2:0").unwrap();
    sink.set_nonblocking(true).unwrap();
    let port = sink.local_addr().unwrap().port();
    let rogue = RoguePeer::start(
        &bed,
        &b,
        Arc::new(move |reply| match reply {
            Reply::Prepared { uri, .. } => Reply::Prepared {
                uri,
                nbd_port: Some(port),
                nbd_host: Some("127.0.0.2".into()),
            },
            other => other,
        }),
    )
    .await;
    let record = rogue
        .migrate_from(
            &a,
            "vm",
            MigrateOptions {
                live: true,
                copy_storage_all: true,
                ..Default::default()
            },
        )
        .await;

    assert_eq!(record.status, JobStatus::Failed, "{record:?}");
    let error = record.error.clone().unwrap_or_default();
    assert!(
        error.contains("disks server") && error.contains("127.0.0.2"),
        "{error}"
    );
    assert!(sink.accept().is_err(), "a connection to the sink");
    drop(rogue);
    b.wait_no_qemu().await;
    assert_eq!(
        a.state("vm").await,
        Some(protocol::domain::DomainState::Running)
    );
}
