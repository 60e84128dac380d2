//! The destination QEMU killed mid-migration.

use super::*;

#[tokio::test]
async fn destination_qemu_killed_during_precopy() {
    let t = Bed::new("dqp", BUSY).await;
    let job = t.start(live(4)).await;
    t.wait_phase(&job, "pre-copy", precopy).await;

    t.b.kill_qemu(VM).await;

    let record = t.record(&job).await;
    assert_eq!(record.status, JobStatus::Failed);
    mentions(&record, "migration failed");
    assert_eq!(record.recovery.as_deref(), Some("source kept running"));
    assert_one_intact_copy(&t.a, &t.b).await;
}

#[tokio::test]
async fn destination_qemu_killed_under_throttle() {
    let t = Bed::new("dqt", BUSY).await;
    let job = t.start_throttled().await;

    t.b.kill_qemu(VM).await;

    let record = t.record(&job).await;
    assert_eq!(record.status, JobStatus::Failed);
    assert!(
        record
            .actions
            .iter()
            .any(|a| a.action == ActionKind::Release),
        "{record:#?}"
    );
    assert_one_intact_copy(&t.a, &t.b).await;
}
