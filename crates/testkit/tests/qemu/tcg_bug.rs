//! QEMU before 9.0 loses guest writes when migrating under TCG. The guest's
//! own memory check catches it, and livemig's RAM-layout workaround avoids
//! it: the same migration is run with and without the workaround.

use guest::Workload;
use protocol::job::JobStatus;
use protocol::MigrateOptions;
use testkit::{Host, TestBed};

/// Mostly-idle sweeping with a hot page: the page QEMU's fast dirty sync
/// loses is one that stays in the TCG TLB.
const WORKLOAD: Workload = Workload {
    working_set_mib: 32,
    spin: 3_000,
    report_ms: 500,
};

fn flags() -> MigrateOptions {
    MigrateOptions {
        live: true,
        auto_converge: true,
        bandwidth: Some(64),
        timeout: Some(180),
        ..Default::default()
    }
}

async fn migrate_and_check(bed: &TestBed, a: &Host, b: &Host) -> guest::SerialLog {
    a.define_and_start(bed.definition("vm", 128, WORKLOAD))
        .await;
    let record = a.migrate("vm", b, flags()).await;
    assert_eq!(record.status, JobStatus::Completed, "{record:?}");
    b.wait_guest_passes("vm", 2).await
}

#[tokio::test]
async fn the_memory_check_catches_the_tcg_bug_and_the_workaround_avoids_it() {
    let bed = TestBed::new().await;
    let a = bed.host("a").await;
    let b = bed.host("b").await;
    let caps = a.cli(&["domcapabilities", "--json"]);
    let caps: serde_json::Value = serde_json::from_slice(&caps.stdout).unwrap();
    if caps["tcg_dirty_bitmap_bug"] != true {
        eprintln!(
            "QEMU {} does not have the TCG dirty-bitmap bug; nothing to show",
            caps["qemu"]["version"]
        );
        return;
    }

    let with_workaround = migrate_and_check(&bed, &a, &b).await;
    assert!(
        with_workaround.memory_intact(),
        "corrupted despite the workaround: {:?}",
        with_workaround.corruptions
    );
    let info = b.dominfo("vm").await.unwrap();
    assert!(info
        .tcg_dirty_bitmap_workaround
        .unwrap()
        .starts_with("active"));
    assert_eq!(info.guest_ram_bytes, Some(128 * 1024 * 1024 - 8192));
    drop((a, b));

    let a = bed.host_args("a-off", &["--tcg-workaround", "off"]).await;
    let b = bed.host_args("b-off", &["--tcg-workaround", "off"]).await;
    let without = migrate_and_check(&bed, &a, &b).await;
    assert!(
        !without.memory_intact(),
        "QEMU's TCG bug did not show without the workaround; the memory check may be blind"
    );
}
