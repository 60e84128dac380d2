//! A guest that only a throttle above 99 % gets through the link, migrated
//! with livemig's controller: livemig holds QEMU's switchover back and
//! switches over itself. Its own test binary, so that this CPU-hungry guest
//! does not run beside the other tests' guests and skew their measurements.

use std::path::Path;

use guest::Workload;
use migration::{ConvergeMode, JobStatus, MigrateFlags};
use protocol::types::DomainState;
use testkit::TestBed;

/// Rewrites 256 MiB as fast as TCG runs (the benchmark's `hot` workload).
const HOT: Workload = Workload {
    working_set_mib: 256,
    spin: 0,
    report_ms: 500,
};

#[tokio::test]
async fn a_hot_guest_is_paused_by_livemig_for_the_switchover() {
    assert!(
        Path::new(converge::throttle::CPU_V1_ROOT)
            .join("tasks")
            .exists(),
        "this test needs the cgroup v1 cpu controller at {}",
        converge::throttle::CPU_V1_ROOT
    );
    let bed = TestBed::new().await;
    let a = bed.host("a").await;
    let b = bed.host("b").await;
    a.define_and_start(bed.definition("vm", 512, HOT)).await;
    a.wait_guest_passes("vm", 1).await;

    let record = a
        .migrate(
            "vm",
            &b,
            MigrateFlags {
                live: true,
                converge: Some(ConvergeMode::Adaptive),
                bandwidth: Some(64),
                timeout: Some(120),
                ..Default::default()
            },
        )
        .await;

    assert_eq!(record.status, JobStatus::Completed, "{record:#?}");
    assert!(record.max_cpu_throttle_pct > 99.0, "{:#?}", record.actions);
    let kinds: Vec<&str> = record.actions.iter().map(|a| a.action.as_str()).collect();
    let hold = kinds.iter().position(|k| *k == "hold");
    let switchover = kinds.iter().position(|k| *k == "switchover");
    assert!(
        matches!((hold, switchover), (Some(h), Some(s)) if h < s),
        "QEMU's switchover held, then livemig's: {kinds:?}"
    );
    // The downtime counts from livemig's pause, and stays in the limit.
    assert!(record.downtime_ms.unwrap() <= 300, "{record:#?}");

    assert_eq!(b.state("vm").await, Some(DomainState::Running));
    assert!(a.qemu_pids().is_empty(), "QEMU left on the source");
    let log = b.wait_guest_passes("vm", 2).await;
    assert!(log.memory_intact(), "{:?}", log.corruptions);
}
