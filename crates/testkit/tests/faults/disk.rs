//! The destination's state directory on a full disk.

use super::*;

#[tokio::test]
async fn destination_state_disk_full() {
    // On loopback: `ip netns exec` gives an agent its own mount namespace,
    // and the full disk must be the one the agent writes to.
    let bed = TestBed::new().await;
    let a = bed.host("a").await;
    let b = bed.host("b").await;
    a.define_and_start(bed.definition(VM, 64, LIGHT)).await;
    let domains = b.state_dir().join("domains");
    let mount = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
        .arg(&domains)
        .status()
        .unwrap();
    assert!(mount.success());
    // Fill it page by page: a single large write leaves room for a small one.
    let mut files = 0;
    while std::fs::write(domains.join(format!("filler{files}")), [0u8; 4096]).is_ok() {
        files += 1;
    }
    assert!(
        std::fs::write(domains.join("probe"), b"x").is_err(),
        "the disk is full"
    );

    let flags = MigrateOptions {
        persistent: true,
        ..live(16)
    };
    let record = a.migrate(VM, &b, flags).await;
    std::process::Command::new("umount")
        .arg(&domains)
        .status()
        .unwrap();

    // The guest moved; persisting its definition failed, and the record
    // says so.
    assert_eq!(record.status, JobStatus::Completed, "{record:#?}");
    assert_one_intact_copy(&b, &a).await;
    assert!(!b.dominfo(VM).await.unwrap().persistent);
    let id = record.id.clone();
    let b_record = match b.request(Request::Job { id }).await.unwrap() {
        protocol::Reply::Job {
            record: Some(r), ..
        } => *r,
        other => panic!("{other:?}"),
    };
    mentions(&b_record, "could not persist the definition");
}
