//! The Linux test guest (Debian's cloud kernel, busybox, our workload)
//! under the agents: its memory, its disk and its network across a live
//! migration.

use protocol::MigrateOptions;
use testkit::{disk_workload, live, TestBed};

#[tokio::test]
async fn a_linux_guest_on_a_shared_disk_migrates_live_with_memory_and_disk_intact() {
    let bed = TestBed::new().await;
    let a = bed.host("a").await;
    let b = bed.host("b").await;
    let disk = bed.disk_image("vm.qcow2", 32, "qcow2");
    let definition = bed.linux_definition(
        "vm",
        192,
        &disk_workload(),
        &format!(
            "[[disks]]\npath = {:?}\nformat = \"qcow2\"\nshared = true\n\
             [[nics]]\nnetwork = \"user\"\n",
            disk.display().to_string()
        ),
    );
    a.define_and_start(definition).await;
    a.wait_guest_disk("vm", 256).await;

    let record = a
        .migrate_completes(
            "vm",
            &b,
            MigrateOptions {
                auto_converge: true,
                ..live()
            },
        )
        .await;

    assert!(record.downtime_ms.is_some(), "{record:?}");
    // Every block the guest wrote on a reads back as written on b.
    let log = b.wait_guest_disk("vm", 512).await;
    assert!(
        log.memory_intact() && log.disk_intact(),
        "{:?}",
        log.corruptions
    );
}
