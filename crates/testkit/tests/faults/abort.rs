//! `domjobabort` in every phase.

use super::*;

#[tokio::test]
async fn domjobabort_right_after_start() {
    let t = Bed::new("ab0", BUSY).await;
    let job = t.start(live(4)).await;
    t.abort().await;
    let record = t.record(&job).await;
    assert_eq!(record.status, JobStatus::Cancelled, "{record:#?}");
    assert_one_intact_copy(&t.a, &t.b).await;
}

#[tokio::test]
async fn domjobabort_during_precopy() {
    let t = Bed::new("ab1", BUSY).await;
    let job = t.start(live(4)).await;
    t.wait_phase(&job, "pre-copy", |j| {
        precopy(j) && j.stats.iteration.unwrap_or(0) >= 1
    })
    .await;
    t.abort().await;
    let record = t.record(&job).await;
    assert_eq!(record.status, JobStatus::Cancelled);
    mentions(&record, "domjobabort");
    assert_one_intact_copy(&t.a, &t.b).await;
}

#[tokio::test]
async fn domjobabort_under_throttle() {
    let t = Bed::new("ab2", BUSY).await;
    let job = t.start_throttled().await;
    t.abort().await;
    let record = t.record(&job).await;
    assert_eq!(record.status, JobStatus::Cancelled);
    assert_one_intact_copy(&t.a, &t.b).await;
}

#[tokio::test]
async fn domjobabort_late_in_precopy_ends_consistently_either_way() {
    // Late in QEMU's auto-converge ramp, a pass or two from switchover:
    // against 8 MiB/s the guest needs 80 % or more, so 50 % comes before
    // the end even when another test's guest shares the CPU.
    let t = Bed::new("ab3", BUSY).await;
    let job = t
        .start(MigrateOptions {
            auto_converge: true,
            ..live(8)
        })
        .await;
    t.wait_phase(&job, "a throttle of 50 % or more", |j| {
        j.stats.cpu_throttle_pct.unwrap_or(0) >= 50
    })
    .await;
    t.abort().await;
    let record = t.record(&job).await;
    // A late cancel may lose the race to the switchover: both endings are
    // fine, as long as exactly one copy runs where the record says.
    match record.status {
        JobStatus::Completed => assert_one_intact_copy(&t.b, &t.a).await,
        JobStatus::Cancelled => assert_one_intact_copy(&t.a, &t.b).await,
        other => panic!("unexpected {other}: {record:#?}"),
    }
}

#[tokio::test]
async fn domjobabort_during_postcopy_is_ignored_and_postcopy_finishes() {
    let t = Bed::new("ab4", BUSY).await;
    let job = t.start_in_postcopy(4, false).await;
    t.abort().await;
    let record = t.record(&job).await;
    assert_eq!(record.status, JobStatus::Completed, "{record:#?}");
    assert!(
        record.actions.iter().any(
            |a| a.action == ActionKind::Cancel && a.detail.contains("ignored during post-copy")
        ),
        "{record:#?}"
    );
    assert_one_intact_copy(&t.b, &t.a).await;
}
