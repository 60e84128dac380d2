//! The adaptive controller on a Linux guest with several vCPUs, real
//! vCPU threads throttled from the host.

use protocol::MigrateOptions;
use testkit::{disk_workload, live, TestBed};

#[tokio::test]
async fn a_two_vcpu_linux_guest_converges_under_the_adaptive_controller() {
    let bed = TestBed::new().await;
    let a = bed.host("a").await;
    let b = bed.host("b").await;
    let mut definition = bed.linux_definition("vm", 192, &disk_workload(), "");
    definition.vcpus = 2;
    // No disk: the workload's disk writer reports an error without one.
    definition.kernel.as_mut().unwrap().cmdline =
        guest::linux::LinuxWorkload::memory(guest::Workload::busy(16, 2_000)).cmdline();
    a.define_and_start(definition).await;
    let cpus = a.qmp("vm", "query-cpus-fast").await.unwrap();
    assert_eq!(cpus.as_array().unwrap().len(), 2, "{cpus}");

    let record = a
        .migrate_completes(
            "vm",
            &b,
            MigrateOptions {
                converge: Some(protocol::ConvergeMode::Adaptive),
                bandwidth: Some(16),
                timeout: Some(180),
                ..live()
            },
        )
        .await;
    assert!(record.max_cpu_throttle_pct > 0.0, "{record:#?}");
}

/// A 4-vCPU guest where one vCPU writes and three only compute: the
/// controller finds the writer and throttles it alone, so the others keep
/// their speed while the migration converges.
#[tokio::test]
async fn only_the_vcpu_that_writes_is_throttled() {
    if !testkit::host_throttle_available() {
        eprintln!(
            "skipped: single vCPUs are throttled from the host, which has no cpu cgroup here"
        );
        return;
    }
    let bed = TestBed::new().await;
    let a = bed.host("a").await;
    let b = bed.host("b").await;
    let workload = guest::linux::LinuxWorkload {
        spinners: 3,
        ..guest::linux::LinuxWorkload::memory(guest::Workload::busy(32, 2_000))
    };
    let mut definition = bed.linux_definition("vm", 192, &workload, "");
    definition.vcpus = 4;
    a.define_and_start(definition).await;
    a.wait_guest_progress("vm", 6).await;
    let serial_log = a.dominfo("vm").await.unwrap().serial_log.unwrap();
    let before = a.serial("vm").await;
    assert_eq!(before.spinner_cpus(), [1, 2, 3], "{:?}", before.errors);

    let record = a
        .migrate_completes(
            "vm",
            &b,
            MigrateOptions {
                converge: Some(protocol::ConvergeMode::Adaptive),
                bandwidth: Some(16),
                timeout: Some(180),
                ..live()
            },
        )
        .await;

    let writers: Vec<_> = record
        .actions
        .iter()
        .filter(|a| a.action == protocol::job::ActionKind::Writers && a.value.is_some())
        .collect();
    assert_eq!(writers.len(), 1, "{:#?}", record.actions);
    assert_eq!(writers[0].value, Some(1.0), "{:#?}", writers[0]);
    assert!(
        writers[0].detail.starts_with("vCPU 0 write"),
        "{}",
        writers[0].detail
    );
    assert!(record.max_cpu_throttle_pct >= 50.0, "{record:#?}");
    // Each spinner ran during the migration at least half as fast as
    // before it (throttled like the writer, it would have crawled).
    let during = guest::SerialLog::read(std::path::Path::new(&serial_log)).unwrap();
    for cpu in [1, 2, 3] {
        let (speed_before, speed_during) = before.spinner_speeds(&during, cpu, 3000).unwrap();
        assert!(
            speed_during >= 0.5 * speed_before,
            "vCPU {cpu}: {speed_during:.0} loops/s during the migration, {speed_before:.0} before"
        );
    }
    let log = b.wait_guest_passes("vm", 2).await;
    assert!(log.memory_intact(), "{:?}", log.corruptions);
}
