//! A compromised peer agent (a valid agent certificate, a real agent behind
//! it) answers Prepare with a data URI that would run a command on the
//! source or send the guest's memory elsewhere: the source refuses, sends
//! nothing, keeps the guest running, and the real destination tears down.

use std::sync::Arc;

use guest::Workload;
use protocol::job::JobStatus;
use protocol::MigrateOptions;
use testkit::rogue::RoguePeer;
use testkit::{assert_runs_only_on, TestBed};

#[tokio::test]
async fn with_tls_the_destination_admits_only_the_qemu_of_the_agent_that_asked() {
    let bed = TestBed::new().await;
    let (a, b) = bed
        .two_hosts_running("vm", 64, Workload::busy(4, 50_000))
        .await;
    // The rogue relays everything unchanged: b prepares for the rogue's
    // certificate, while the stream comes from a's QEMU with a's.
    let rogue = RoguePeer::start(&bed, &b, Arc::new(|reply| reply)).await;
    let record = rogue
        .migrate_from(
            &a,
            "vm",
            MigrateOptions {
                live: true,
                tls: true,
                ..Default::default()
            },
        )
        .await;

    assert_eq!(record.status, JobStatus::Failed, "{record:?}");
    let log = std::fs::read_to_string(b.state_dir().join("logs/vm.qemu.log")).unwrap_or_default();
    assert!(
        log.contains("authz check for") && log.contains("CN=agent-a") && log.contains("is denied"),
        "the destination's QEMU refused a's certificate: {log}"
    );
    b.wait_no_qemu().await;
    assert_runs_only_on("vm", &a, &b, 1).await;
}
