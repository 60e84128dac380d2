//! Live migration between two agents on loopback, with real QEMU and the
//! in-tree guest checking its own memory.

use guest::Workload;
use protocol::domain::DomainState;
use protocol::job::JobStatus;
use protocol::MigrateOptions;
use testkit::{assert_runs_only_on, capped, live, procs, TestBed};

/// 16 MiB rewritten at ~50 MiB/s on this class of machine: against a
/// 16 MiB/s cap every pass leaves the whole working set dirty again, so
/// plain pre-copy cannot converge and auto-converge must throttle.
const BUSY: Workload = Workload {
    working_set_mib: 16,
    spin: 20_000,
    report_ms: 500,
};
const CAP_MIB_S: u64 = 16;

#[tokio::test]
async fn idle_guest_migrates_and_keeps_running_on_the_destination() {
    let bed = TestBed::new().await;
    let (a, b) = bed.two_hosts_running("idle", 64, Workload::IDLE).await;
    let source_pid = a.dominfo("idle").await.unwrap().qemu_pid.unwrap();

    let record = a.migrate("idle", &b, live()).await;

    assert_eq!(record.status, JobStatus::Completed, "{record:?}");
    assert_eq!(record.error, None);
    assert!(!record.auto_converge);
    assert!(record.transferred_bytes > 0);
    assert!(record.downtime_ms.is_some());
    assert_eq!(record.destination, b.uri());
    // Where the time before the first byte went: every phase, in order,
    // and the memory moving once Perform began.
    let phases: Vec<String> = record.phases.iter().map(|p| p.phase.to_string()).collect();
    assert_eq!(
        phases,
        ["begin", "prepare", "perform", "finish", "confirm", "done"],
        "{record:?}"
    );
    assert!(record.phases.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
    let first_byte = record.first_byte_ms.expect("first byte time");
    assert!(first_byte >= record.phases[2].at_ms, "{record:?}");
    eprintln!(
        "phases {:?}, first byte after {first_byte} ms",
        record.phases
    );
    assert!(
        !procs::alive(source_pid),
        "source QEMU {source_pid} still runs"
    );
    assert_runs_only_on("idle", &b, &a, 0).await;
    // The source keeps the (persistent) definition, shut off; the
    // destination got a transient domain, as with virsh without --persistent.
    assert_eq!(a.state("idle").await, Some(DomainState::ShutOff));
    assert!(!b.dominfo("idle").await.unwrap().persistent);
}

#[tokio::test]
async fn busy_guest_without_auto_converge_times_out_and_stays_on_the_source() {
    let bed = TestBed::new().await;
    let (a, b) = bed.two_hosts_running("busy", 64, BUSY).await;

    let record = a
        .migrate(
            "busy",
            &b,
            MigrateOptions {
                bandwidth: Some(CAP_MIB_S),
                timeout: Some(12),
                ..live()
            },
        )
        .await;

    assert_eq!(record.status, JobStatus::Failed, "{record:?}");
    let error = record.error.clone().unwrap();
    assert!(error.contains("timeout"), "{error}");
    assert_eq!(record.max_cpu_throttle_pct, 0.0);
    assert!(record.iterations >= 3, "it kept iterating: {record:?}");
    assert_runs_only_on("busy", &a, &b, 2).await;
    assert!(!a.capability("busy", "auto-converge").await);
}

#[tokio::test]
async fn busy_guest_with_auto_converge_completes_after_throttling() {
    let bed = TestBed::new().await;
    let (a, b) = bed.two_hosts_running("busy", 64, BUSY).await;

    let record = a
        .migrate_completes(
            "busy",
            &b,
            MigrateOptions {
                auto_converge: true,
                bandwidth: Some(CAP_MIB_S),
                timeout: Some(240),
                ..live()
            },
        )
        .await;

    assert!(record.auto_converge);
    assert!(
        record.max_cpu_throttle_pct > 0.0,
        "no throttle seen: {record:?}"
    );
    assert!(record.flags.contains(&"auto-converge".to_string()));
    // The destination QEMU keeps running; its settings are back to default.
    assert!(!b.capability("busy", "auto-converge").await);
}

#[tokio::test]
async fn auto_converge_is_on_for_both_qemus_during_the_job_and_reset_after_an_abort() {
    let bed = TestBed::new().await;
    let (a, b) = bed.two_hosts_running("busy", 64, BUSY).await;
    assert!(!a.capability("busy", "auto-converge").await);

    // A cap this low keeps the job running while we look.
    let job = a
        .migration_in_flight(
            "busy",
            &b,
            MigrateOptions {
                auto_converge: true,
                bandwidth: Some(1),
                ..live()
            },
        )
        .await;
    assert!(a.capability("busy", "auto-converge").await, "source");
    assert!(b.capability("busy", "auto-converge").await, "destination");
    assert_eq!(b.state("busy").await, Some(DomainState::MigratingIn));

    a.request(protocol::Request::DomJobAbort {
        domain: "busy".parse().unwrap(),
    })
    .await
    .unwrap();
    let record = a.wait_job(&job).await;

    assert_eq!(record.status, JobStatus::Cancelled, "{record:?}");
    assert!(record.error.unwrap().contains("domjobabort"));
    assert_runs_only_on("busy", &a, &b, 2).await;
    assert!(
        !a.capability("busy", "auto-converge").await,
        "reset on the source"
    );
}

#[tokio::test]
async fn without_the_flag_auto_converge_stays_off_on_both_qemus() {
    let bed = TestBed::new().await;
    let (a, b) = bed.two_hosts_running("busy", 64, BUSY).await;

    let job = a.migration_in_flight("busy", &b, capped(1)).await;
    assert!(!a.capability("busy", "auto-converge").await, "source");
    assert!(!b.capability("busy", "auto-converge").await, "destination");

    a.cli_ok(&["domjobabort", "busy"]);
    let record = a.wait_job(&job).await;
    assert_eq!(record.status, JobStatus::Cancelled);
    assert_runs_only_on("busy", &a, &b, 2).await;
}

#[tokio::test]
async fn a_failed_migration_puts_the_destinations_own_definition_back() {
    let bed = TestBed::new().await;
    let (a, b) = bed.two_hosts_running("busy", 64, BUSY).await;
    // b knows the domain, not running, with a definition of its own.
    b.request(testkit::define(&bed.definition("busy", 96, Workload::IDLE)))
        .await
        .expect("define on b");

    let record = a
        .migrate(
            "busy",
            &b,
            MigrateOptions {
                bandwidth: Some(1),
                timeout: Some(3),
                ..live()
            },
        )
        .await;

    assert_eq!(record.status, JobStatus::Failed, "{record:#?}");
    let on_b = b.dominfo("busy").await.expect("b still knows the domain");
    assert_eq!(on_b.memory_mib, 96, "b's own definition is back");
    assert!(b.qemu_pids().is_empty());
    assert_eq!(a.dominfo("busy").await.unwrap().memory_mib, 64);
}
