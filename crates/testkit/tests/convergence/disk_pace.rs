//! Disk copies that the guest's writes outrun: measured rates, so run
//! alone on the machine.

use protocol::job::JobStatus;
use protocol::MigrateOptions;
use testkit::output::stderr;
use testkit::{assert_runs_only_on, create_image, disk_workload, Host, TestBed};

fn local_disk(bed: &TestBed, file: &str, format: &str) -> String {
    format!(
        "[[disks]]\npath = {:?}\nformat = \"{format}\"\n",
        bed.local().join(file).display().to_string()
    )
}

#[tokio::test]
async fn a_disk_written_faster_than_the_link_fails_as_not_converging_instead_of_mirroring_forever()
{
    // A copy that sets no new low for 10 s does not converge (production:
    // 30 s).
    let bed = TestBed::new().await.with_timeouts(&["disk-progress=10s"]);
    let (a, b) = bed.hosts_with_local_storage(None).await;
    // Cycling over all 16 MiB at 8 MiB/s against a 1 MiB/s copy: the
    // writes lap the copy.
    busy_disk_on_a(&bed, &a, 16, 8192).await;
    // The estimate says so beforehand, and what throttle would help.
    let out = a.cli(&["estimate", "vm", "--bandwidth", "1", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let copy = &report["disks"][0]["copy"];
    assert_eq!(copy["converges"], false, "{report:#}");
    let throttle = copy["adaptive"]["throttle_pct"].as_f64().unwrap_or(0.0);
    assert!(throttle > 50.0 && throttle < 100.0, "{report:#}");

    let record = a
        .migrate(
            "vm",
            &b,
            MigrateOptions {
                copy_storage_all: true,
                ..testkit::capped(1)
            },
        )
        .await;

    assert_eq!(record.status, JobStatus::Failed, "{record:#?}");
    let error = record.error.unwrap_or_default();
    assert!(error.contains("does not converge"), "{error}");
    // The guest's own write rate, not only what its writes added.
    assert!(error.contains("the guest wrote its disks at"), "{error}");
    eprintln!("{error}");
    b.wait_no_qemu().await;
    assert!(!bed.local_of("b").join("vm.raw").exists());
    assert_runs_only_on("vm", &a, &b, 1).await;
    let jobs = a.qmp("vm", "query-block-jobs").await.unwrap();
    assert_eq!(jobs, serde_json::json!([]));
    a.wait_guest_disk("vm", 256).await;
}

#[tokio::test]
async fn an_adaptive_job_throttles_a_guest_whose_disk_writes_outrun_the_copy_until_it_is_in_sync() {
    let bed = TestBed::new().await;
    let (a, b) = bed.hosts_with_local_storage(None).await;
    // Cycling over its 8 MiB disk as fast as it can (tens of MiB/s),
    // against a 1 MiB/s copy: unthrottled, the writes lap the copy.
    busy_disk_on_a(&bed, &a, 8, 65536).await;

    let options = MigrateOptions {
        copy_storage_all: true,
        converge: Some(protocol::ConvergeMode::Adaptive),
        ..testkit::capped(1)
    };
    let host_throttle = testkit::host_throttle_available();
    let job = a
        .start_migration("vm", &b.uri(), options)
        .await
        .expect("migration starts");
    if !host_throttle {
        // QEMU's own throttle acts only once the memory moves: the copy is
        // stopped as not converging, as without --converge adaptive.
        let record = a.wait_job(&job).await;
        assert_eq!(record.status, JobStatus::Failed, "{record:#?}");
        assert!(record
            .error
            .unwrap_or_default()
            .contains("does not converge"));
        assert_runs_only_on("vm", &a, &b, 1).await;
        return;
    }
    // The disks in sync (the memory moves), or the job over.
    testkit::wait_until(
        std::time::Duration::from_secs(90),
        "the disks in sync",
        || async {
            match a.job_active(&job).await {
                Some(j) if j.phase != protocol::job::Phase::Perform => None,
                _ => Some(()),
            }
        },
    )
    .await;
    // In sync: the memory may move at full speed now.
    a.cli_ok(&["migrate-setspeed", "vm", "512"]);
    let record = a.wait_job(&job).await;

    assert_eq!(record.status, JobStatus::Completed, "{record:#?}");
    for action in &record.actions {
        eprintln!(
            "{:>6} ms {} {:?} {}",
            action.t_ms, action.action, action.value, action.detail
        );
    }
    let disk_throttle = record
        .actions
        .iter()
        .find(|x| x.action == protocol::job::ActionKind::Throttle)
        .expect("a throttle");
    assert!(
        disk_throttle.detail.contains("disk writes outrun the copy"),
        "{disk_throttle:?}"
    );
    assert!(
        disk_throttle.value.unwrap_or(0.0) > 50.0,
        "{disk_throttle:?}"
    );
    assert!(
        record
            .actions
            .iter()
            .any(|x| x.action == protocol::job::ActionKind::Release
                && x.detail.contains("disks are in sync")),
        "{:#?}",
        record.actions
    );
    // The timeline starts with the copy: samples carry the disks' bytes and
    // their dirty rate, and the throttle shows in the guest work lost.
    let disk_samples: Vec<_> = record
        .samples
        .iter()
        .filter(|s| s.disk_remaining_bytes.is_some())
        .collect();
    assert!(disk_samples.len() > 5, "{}", disk_samples.len());
    assert!(disk_samples
        .iter()
        .any(|s| s.disk_dirty_rate_mib_s.unwrap_or(0.0) > 0.5));
    assert!(record.max_cpu_throttle_pct > 50.0);
    assert_runs_only_on("vm", &b, &a, 1).await;
    let log = b.wait_guest_disk("vm", 256).await;
    assert!(log.disk_intact(), "{:?}", log.corruptions);
}

/// The Linux guest on a, rewriting all of its `mib` MiB raw disk (a's own)
/// at up to `kib_s` KiB/s; returns once it has written and checked a
/// first round of blocks.
async fn busy_disk_on_a(bed: &TestBed, a: &Host, mib: u32, kib_s: u32) {
    create_image(&bed.local_of("a").join("vm.raw"), mib, "raw");
    let workload = guest::linux::LinuxWorkload {
        disk_kib_s: kib_s,
        disk_blocks: mib * 256,
        ..disk_workload()
    };
    a.define_and_start(bed.linux_definition(
        "vm",
        192,
        &workload,
        &local_disk(bed, "vm.raw", "raw"),
    ))
    .await;
    a.wait_guest_disk("vm", 256).await;
}
