//! The link between the hosts: cut, shaped, lossy, unroutable.

use super::*;

#[tokio::test]
async fn link_cut_during_precopy_for_good() {
    let t = Bed::new("lcg", BUSY).await;
    let job = t.start(live(4)).await;
    t.wait_phase(&job, "pre-copy", precopy).await;

    t.net.cut().unwrap();
    let record = t.record(&job).await;
    t.net.restore().unwrap();

    assert_eq!(record.status, JobStatus::Failed);
    mentions(&record, "lost contact with the destination agent");
    assert_one_intact_copy(&t.a, &t.b).await;
}

#[tokio::test]
async fn link_cut_during_precopy_and_back_before_the_timeout() {
    let t = Bed::new("lcr", SLOW).await;
    let job = t.start(live(4)).await;
    t.wait_phase(&job, "pre-copy", precopy).await;

    t.net.cut().unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    t.net.restore().unwrap();
    let record = t.record(&job).await;

    assert_eq!(record.status, JobStatus::Completed, "{record:#?}");
    assert_one_intact_copy(&t.b, &t.a).await;
}

#[tokio::test]
async fn link_cut_under_throttle_and_back() {
    let t = Bed::new("lct", BUSY).await;
    let job = t
        .start(MigrateOptions {
            converge: Some(ConvergeMode::Adaptive),
            ..live(8)
        })
        .await;
    t.wait_phase(&job, "the controller to throttle", throttled)
        .await;

    t.net.cut().unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    t.net.restore().unwrap();
    let record = t.record(&job).await;

    assert_eq!(record.status, JobStatus::Completed, "{record:#?}");
    assert_one_intact_copy(&t.b, &t.a).await;
}

/// Migrates the guest with auto-converge over a shaped link; returns the
/// record and the packets the shaping dropped.
async fn migrate_over_shaped_link(t: &Bed, shape: impl FnOnce(&NetnsPair)) -> (JobRecord, u64) {
    shape(&t.net);
    let record =
        t.a.migrate(
            VM,
            &t.b,
            MigrateOptions {
                auto_converge: true,
                // Steps an operator would pick for a slow link: the guest
                // needs about half its CPU taken against 5 MB/s, which
                // the first step gives.
                auto_converge_initial: Some(50),
                auto_converge_increment: Some(20),
                timeout: Some(150),
                ..live(16)
            },
        )
        .await;
    let dropped = t.net.dropped_packets().unwrap();
    t.net.unshape().unwrap();
    (record, dropped)
}

#[tokio::test]
async fn slow_congested_link_with_auto_converge() {
    let t = Bed::new("slw", MODERATE).await;
    // No netem in this kernel: a token bucket at 40 Mbit/s with up to
    // 200 ms of queueing stands in for a slow, laggy link.
    let (record, _) =
        migrate_over_shaped_link(&t, |net| net.shape("40mbit", "200ms").unwrap()).await;

    assert_eq!(record.status, JobStatus::Completed, "{record:#?}");
    assert_one_intact_copy(&t.b, &t.a).await;
}

#[tokio::test]
async fn lossy_link_with_auto_converge() {
    let t = Bed::new("lss", MODERATE).await;
    // 40 Mbit/s with a 100 KB queue: TCP overruns it and loses packets
    // (several percent) all through the migration.
    let (record, dropped) =
        migrate_over_shaped_link(&t, |net| net.shape_lossy("40mbit", 100_000).unwrap()).await;

    assert_eq!(record.status, JobStatus::Completed, "{record:#?}");
    assert!(dropped > 0, "the link lost no packets");
    assert_one_intact_copy(&t.b, &t.a).await;
}

#[tokio::test]
async fn unroutable_destination_is_refused_before_anything_starts() {
    let t = Bed::new("bad", LIGHT).await;
    let nowhere = format!("tls://{}9:7000", &t.net.b_ip[..t.net.b_ip.len() - 1]);

    let err =
        t.a.start_migration(VM, &nowhere, live(16))
            .await
            .unwrap_err();

    assert!(
        err.to_string()
            .contains("destination agent is down or unreachable"),
        "{err}"
    );
    assert_one_intact_copy(&t.a, &t.b).await;
}
