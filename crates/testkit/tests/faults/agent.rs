//! An agent killed, restarted or gone for good mid-migration.

use super::*;

#[tokio::test]
async fn destination_agent_killed_during_precopy_and_gone_for_good() {
    let mut t = Bed::new("dak", BUSY).await;
    let job = t.start(live(4)).await;
    t.wait_phase(&job, "pre-copy", precopy).await;

    t.b.crash();
    let record = t.record(&job).await;

    assert_eq!(record.status, JobStatus::Failed);
    mentions(&record, "lost contact with the destination agent");
    // Its orphaned incoming QEMU goes when the agent comes back.
    t.b.start_again().await;
    assert_one_intact_copy(&t.a, &t.b).await;
}

#[tokio::test]
async fn destination_agent_restarted_during_precopy() {
    let mut t = Bed::new("dar", SLOW).await;
    let job = t.start(live(4)).await;
    t.wait_phase(&job, "pre-copy", precopy).await;

    t.b.crash();
    t.b.start_again().await;
    let record = t.record(&job).await;

    assert_eq!(record.status, JobStatus::Completed, "{record:#?}");
    assert_one_intact_copy(&t.b, &t.a).await;
}

#[tokio::test]
async fn source_agent_restarted_during_precopy() {
    let mut t = Bed::new("sar", BUSY).await;
    let job = t.start(live(4)).await;
    t.wait_phase(&job, "pre-copy", precopy).await;

    t.a.crash();
    t.a.start_again().await;

    let record = t.record(&job).await;
    assert_eq!(record.status, JobStatus::Cancelled, "{record:#?}");
    mentions(&record, "source agent restarted");
    assert_eq!(record.recovery.as_deref(), Some("source kept running"));
    assert_one_intact_copy(&t.a, &t.b).await;
}

#[tokio::test]
async fn source_agent_restarted_under_throttle_gives_the_guest_its_cpu_back() {
    let mut t = Bed::new("sat", BUSY).await;
    let job = t.start_throttled().await;

    t.a.crash();
    t.a.start_again().await;

    let record = t.record(&job).await;
    assert_ne!(record.status, JobStatus::Completed);
    if testkit::host_throttle_available() {
        let left = testkit::throttles_held(t.a.state_dir());
        assert!(left.is_empty(), "throttle cgroups left: {left:?}");
    } else {
        eprintln!(
            "skipped the cgroup check: this host has no cgroup v1 cpu controller (the guest's \
             speed is still checked)"
        );
    }
    assert_one_intact_copy(&t.a, &t.b).await;
    let log = t.a.wait_guest_progress(VM, 3).await;
    let rate = guest_rate(&log);
    assert!(rate > 5_000.0, "guest still throttled: {rate:.0} writes/s");
}

/// Writes per second over the last two progress lines of a serial log.
fn guest_rate(log: &guest::SerialLog) -> f64 {
    let (p1, p2) = (
        log.progress[log.progress.len() - 2],
        log.progress[log.progress.len() - 1],
    );
    (p2.writes - p1.writes) as f64 / ((p2.t_ms - p1.t_ms) as f64 / 1000.0)
}

#[tokio::test]
async fn source_agent_killed_under_throttle_and_never_back_gives_the_guest_its_cpu_back() {
    if !testkit::host_throttle_available() {
        eprintln!("skipped: this host has no cgroup cpu controller, so no host throttle to lease");
        return;
    }
    let mut t = Bed::new("sak", BUSY).await;
    let serial = t.a.dominfo(VM).await.unwrap().serial_log.unwrap();
    let job = t.start_throttled().await;
    // The guard holds the lease on the throttle the controller set.
    t.wait_phase(&job, "a heavy throttle", |j| j.throttle_pct >= 90.0)
        .await;
    let state_dir = t.a.state_dir().to_path_buf();
    assert_eq!(testkit::throttles_held(&state_dir).len(), 1);

    // SIGKILL, and no agent comes back.
    t.a.crash();
    wait_until(
        Duration::from_secs(10),
        "the lease's guard to lift the throttle",
        || async { testkit::throttles_held(&state_dir).is_empty().then_some(()) },
    )
    .await;
    let log = wait_until(Duration::from_secs(60), "the guest's progress", || async {
        let log = guest::SerialLog::read(Path::new(&serial)).ok()?;
        assert!(log.errors.is_empty(), "guest error: {:?}", log.errors);
        (log.progress.len() >= 2 && guest_rate(&log) > 5_000.0).then_some(log)
    })
    .await;
    eprintln!(
        "guest at {:.0} writes/s with its agent gone",
        guest_rate(&log)
    );

    // The agent's return finds nothing to lift, and one intact copy.
    t.a.start_again().await;
    assert_one_intact_copy(&t.a, &t.b).await;
}

#[tokio::test]
async fn source_agent_restarted_gracefully_keeps_an_idle_guest_running() {
    let mut t = Bed::new("sag", LIGHT).await;
    let pid = t.a.dominfo(VM).await.unwrap().qemu_pid.unwrap();

    t.a.restart_keeping_guests().await;

    let info = t.a.dominfo(VM).await.unwrap();
    assert_eq!(info.qemu_pid, Some(pid), "the same QEMU, adopted");
    assert_eq!(info.state, DomainState::Running);
    // And it can still be migrated.
    let record = t.a.migrate(VM, &t.b, live(16)).await;
    assert_eq!(record.status, JobStatus::Completed, "{record:#?}");
    assert_one_intact_copy(&t.b, &t.a).await;
}
