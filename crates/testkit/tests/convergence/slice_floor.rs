//! The fastest writer with `--allow-postcopy`: one slice of CPU lets it
//! dirty more than the downtime lets through, so no throttle finishes it.
//! The pre-flight's probe says so within the first pass, and the
//! controller switches to post-copy without throttling the guest first.
//! Its own test binary, so that this CPU-hungry guest does not run beside
//! the other tests' guests.

use guest::Workload;
use protocol::domain::DomainState;
use protocol::job::{ActionKind, JobRecord, JobStatus};
use protocol::{ConvergeMode, MigrateOptions};
use testkit::{capped, Host, TestBed};

/// The benchmark's `hot` workload: rewrites 256 MiB as fast as TCG runs,
/// 23–30 MiB per millisecond of vCPU time on an idle machine
/// (docs/CONVERGENCE.md), 10 with another CPU-bound process on the host, against
/// the 3.2 MiB that half of a 100 ms downtime carries at 64 MiB/s (half of
/// QEMU's 300 ms was too close: a slow probe read below it once in CI).
const FASTEST: Workload = Workload {
    working_set_mib: 256,
    spin: 0,
    report_ms: 500,
};

#[tokio::test]
async fn the_fastest_writer_goes_to_postcopy_from_the_probe_without_a_throttle() {
    assert!(
        testkit::host_throttle_available(),
        "this test needs a cgroup cpu controller at {}",
        migration::vcpu_throttle::cgroup::Hierarchy::default_root().display()
    );
    let bed = TestBed::with_agent_processes().await;
    let (a, b) = bed.two_hosts_running("vm", 512, FASTEST).await;
    a.wait_guest_passes("vm", 1).await;

    let job = a
        .migration_until("vm", &b, adaptive_with_postcopy(), "post-copy", |j| {
            j.stats.qemu_status.as_deref() == Some("postcopy-active")
        })
        .await;
    // The guest runs on the destination while its pages arrive (the
    // destination resumes it as it sees the switch, moments after the
    // source does), not only once the last has come.
    testkit::wait_until(
        std::time::Duration::from_secs(30),
        "the guest to run on the destination in post-copy",
        || async {
            let status = b.qmp("vm", "query-status").await.ok()?;
            // Read after: seen running with post-copy still on.
            let still = a
                .job_active(&job)
                .await
                .is_some_and(|j| j.stats.qemu_status.as_deref() == Some("postcopy-active"));
            assert!(
                still,
                "post-copy ended before the guest ran on the destination: {status}"
            );
            (status["status"] == "running").then_some(())
        },
    )
    .await;
    let record = a.wait_job(&job).await;

    assert_eq!(record.status, JobStatus::Completed, "{record:#?}");
    let postcopy = postcopy_after_the_probe(&record);
    let why = &record.actions[postcopy].detail;
    assert!(
        why.contains("(the probe: ") && why.contains("100 ms downtime"),
        "{why}"
    );
    // Decided from the probe, so the guest was never throttled.
    assert!(
        record
            .actions
            .iter()
            .all(|a| a.action != ActionKind::Throttle),
        "{:#?}",
        record.actions
    );
    assert_eq!(record.max_cpu_throttle_pct, 0.0, "{record:#?}");
    // What post-copy cost it instead: the whole-speed writer waits on the
    // destination for most pages it touches, and the work lost says so.
    let lost_ms = record
        .stats
        .postcopy_work_lost_ms
        .expect("the destination measured post-copy's cost");
    let postcopy_ms = record
        .total_time_ms
        .saturating_sub(record.actions[postcopy].t_ms);
    assert!(
        lost_ms > postcopy_ms / 4 && lost_ms <= postcopy_ms + 500,
        "{lost_ms} ms lost in {postcopy_ms} ms of post-copy"
    );
    assert_eq!(record.as_info().guest_work_lost_s, lost_ms as f64 / 1000.0);

    landed_intact(&a, &b).await;
}

/// The same writer over a working set the link sends in under a second:
/// the measurement from shortly before the job fills its 1 s window, so
/// it says only that the guest dirties at least 48 MiB/s, under the
/// link's 64. Its first pass is over before a measurement of the job's
/// own would be, so the probe goes by the earlier one, at once.
#[tokio::test]
async fn a_writer_measured_below_the_link_but_only_from_below_is_probed_at_once() {
    assert!(
        testkit::host_throttle_available(),
        "this test needs a cgroup cpu controller at {}",
        migration::vcpu_throttle::cgroup::Hierarchy::default_root().display()
    );
    let bed = TestBed::with_agent_processes().await;
    let small = Workload {
        working_set_mib: 48,
        ..FASTEST
    };
    let (a, b) = bed.two_hosts_running("vm", 256, small).await;
    a.wait_guest_passes("vm", 1).await;
    let out = a.cli(&["estimate", "vm", "--bandwidth", "64", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let estimate: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let model = &estimate["model"];
    assert_eq!(model["rate_is_lower_bound"], true, "{model}");
    assert!(
        model["rate"].as_f64().unwrap() < 64.0 * 1024.0 * 1024.0,
        "{model}"
    );

    let record = a.migrate("vm", &b, adaptive_with_postcopy()).await;

    assert_eq!(record.status, JobStatus::Completed, "{record:#?}");
    postcopy_after_the_probe(&record);
    let throttled = record
        .actions
        .iter()
        .position(|a| a.action == ActionKind::Throttle);
    assert_eq!(throttled, None, "{:#?}", record.actions);

    landed_intact(&a, &b).await;
}

/// Adaptive with post-copy allowed, a 100 ms downtime, at 64 MiB/s.
fn adaptive_with_postcopy() -> MigrateOptions {
    MigrateOptions {
        converge: Some(ConvergeMode::Adaptive),
        allow_postcopy: true,
        downtime: Some(100),
        timeout: Some(120),
        ..capped(64)
    }
}

/// Where in the timeline post-copy came, checked to come after the probe.
fn postcopy_after_the_probe(record: &JobRecord) -> usize {
    let probe = record
        .actions
        .iter()
        .position(|a| a.action == ActionKind::Measure && a.detail.starts_with("probe: vCPU 0"))
        .unwrap_or_else(|| panic!("no slice probe: {:#?}", record.actions));
    let postcopy = record
        .actions
        .iter()
        .position(|a| a.action == ActionKind::Postcopy)
        .unwrap_or_else(|| panic!("no post-copy: {:#?}", record.actions));
    assert!(probe < postcopy, "{:#?}", record.actions);
    postcopy
}

/// The guest runs on b alone, its memory intact.
async fn landed_intact(a: &Host, b: &Host) {
    assert_eq!(b.state("vm").await, Some(DomainState::Running));
    assert!(a.qemu_pids().is_empty(), "QEMU left on the source");
    let log = b.wait_guest_passes("vm", 2).await;
    assert!(log.memory_intact(), "{:?}", log.corruptions);
}
