//! Post-copy over a link that fails, recovered.

use super::*;

#[tokio::test]
async fn link_cut_during_tls_postcopy_pauses_and_postcopy_resume_recovers() {
    let t = Bed::new("pcr", BUSY).await;
    // Over TLS: the recovered stream is encrypted and authorized too.
    let job = t.start_in_postcopy(2, true).await;

    t.net.cut().unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    t.net.restore().unwrap();
    // Neither side may tear the guest down meanwhile: the destination runs
    // it, the source holds the rest of its memory.
    assert_eq!(t.b.qemu_pids().len(), 1);
    assert_eq!(t.a.qemu_pids().len(), 1);
    let out = t.a.cli(&["migrate", "--postcopy-resume", VM, &t.b.uri()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let record = t.record(&job).await;
    assert_eq!(record.status, JobStatus::Completed, "{record:#?}");
    assert_one_intact_copy(&t.b, &t.a).await;
}
