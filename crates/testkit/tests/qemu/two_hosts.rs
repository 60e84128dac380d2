//! Two "hosts" in two network namespaces joined by a veth pair: the agents
//! and their QEMUs only see each other over that link.

use guest::Workload;
use protocol::domain::DomainState;
use protocol::job::JobStatus;
use protocol::MigrateOptions;
use testkit::TestBed;

#[tokio::test]
async fn migration_between_two_network_namespaces() {
    let bed = TestBed::new().await;
    let (net, a, b) = bed.hosts_in_namespaces("mig").await;
    assert!(b.uri().contains(&net.b_ip), "{}", b.uri());
    a.define_and_start(bed.definition("vm", 64, Workload::busy(8, 50_000)))
        .await;

    let record = a
        .migrate(
            "vm",
            &b,
            MigrateOptions {
                live: true,
                auto_converge: true,
                ..Default::default()
            },
        )
        .await;

    assert_eq!(record.status, JobStatus::Completed, "{record:?}");
    let data_uri = record.data_uri.clone().unwrap();
    assert!(
        data_uri.starts_with(&format!("tcp:{}:", net.b_ip)),
        "{data_uri}"
    );
    assert_eq!(b.state("vm").await, Some(DomainState::Running));
    assert!(a.qemu_pids().is_empty());
    let log = b.wait_guest_passes("vm", 2).await;
    assert!(log.memory_intact(), "{:?}", log.corruptions);

    // The agents are only reachable inside their namespaces: the test
    // process, in the root namespace, has no route to them.
    let addr: std::net::SocketAddr = b.uri().trim_start_matches("tls://").parse().unwrap();
    assert!(
        std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(1)).is_err()
    );
}
