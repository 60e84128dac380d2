//! The other `migrate` options against real QEMU: post-copy (automatic and
//! by command), compression, multifd, non-live, --suspend, and tuning a job
//! while it runs.

use std::time::Duration;

use guest::Workload;
use protocol::domain::DomainState;
use protocol::job::JobStatus;
use protocol::MigrateOptions;
use protocol::Request;
use testkit::{assert_runs_only_on, wait_until, Host, TestBed};

const BUSY: Workload = Workload {
    working_set_mib: 16,
    spin: 20_000,
    report_ms: 500,
};

fn live() -> MigrateOptions {
    MigrateOptions {
        live: true,
        ..Default::default()
    }
}

async fn wait_active(host: &Host, job: &str) {
    wait_until(Duration::from_secs(60), "the job to be active", || async {
        host.job_active(job)
            .await
            .filter(|j| j.stats.qemu_status.as_deref() == Some("active"))
    })
    .await;
}

#[tokio::test]
async fn postcopy_after_precopy_moves_a_busy_guest_that_precopy_alone_cannot() {
    let bed = TestBed::new().await;
    let (a, b) = bed.two_hosts_running("vm", 64, BUSY).await;

    let record = a
        .migrate(
            "vm",
            &b,
            MigrateOptions {
                postcopy: true,
                postcopy_after_precopy: true,
                bandwidth: Some(16),
                timeout: Some(120),
                ..live()
            },
        )
        .await;

    assert_eq!(record.status, JobStatus::Completed, "{record:?}");
    assert!(record.flags.contains(&"postcopy-after-precopy".to_string()));
    assert_runs_only_on("vm", &b, &a, 2).await;
}

#[tokio::test]
async fn migrate_postcopy_switches_a_running_job() {
    let bed = TestBed::new().await;
    let (a, b) = bed.two_hosts_running("vm", 64, BUSY).await;
    let job = a
        .start_migration(
            "vm",
            &b.uri(),
            MigrateOptions {
                postcopy: true,
                bandwidth: Some(16),
                ..live()
            },
        )
        .await
        .unwrap();
    wait_active(&a, &job).await;

    let out = a.cli(&["migrate-postcopy", "vm"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let record = a.wait_job(&job).await;

    assert_eq!(record.status, JobStatus::Completed, "{record:?}");
    assert_runs_only_on("vm", &b, &a, 2).await;
}

#[tokio::test]
async fn migrate_postcopy_without_the_flag_is_refused() {
    let bed = TestBed::new().await;
    let (a, b) = bed.two_hosts_running("vm", 64, BUSY).await;
    let job = a
        .start_migration(
            "vm",
            &b.uri(),
            MigrateOptions {
                bandwidth: Some(1),
                ..live()
            },
        )
        .await
        .unwrap();
    wait_active(&a, &job).await;

    let out = a.cli(&["migrate-postcopy", "vm"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not started with --postcopy"));

    a.cli_ok(&["domjobabort", "vm"]);
    assert_eq!(a.wait_job(&job).await.status, JobStatus::Cancelled);
    assert_eq!(a.state("vm").await, Some(DomainState::Running));
}

#[tokio::test]
async fn compressed_and_parallel_migrations_complete() {
    let bed = TestBed::new().await;
    let (a, b) = bed
        .two_hosts_running("vm", 64, Workload::busy(8, 50_000))
        .await;

    let compressed = a
        .migrate(
            "vm",
            &b,
            MigrateOptions {
                compressed: true,
                ..live()
            },
        )
        .await;
    assert_eq!(compressed.status, JobStatus::Completed, "{compressed:?}");
    assert_runs_only_on("vm", &b, &a, 2).await;

    let parallel = b
        .migrate(
            "vm",
            &a,
            MigrateOptions {
                parallel: true,
                parallel_connections: Some(4),
                ..live()
            },
        )
        .await;
    assert_eq!(parallel.status, JobStatus::Completed, "{parallel:?}");
    assert_runs_only_on("vm", &a, &b, 2).await;
}

#[tokio::test]
async fn non_live_and_suspend_leave_the_guest_paused_only_when_asked() {
    let bed = TestBed::new().await;
    let (a, b) = bed
        .two_hosts_running("vm", 64, Workload::busy(4, 100_000))
        .await;

    // Without --live the guest is paused for the copy, then resumed there.
    let offline_copy = a.migrate("vm", &b, MigrateOptions::default()).await;
    assert_eq!(
        offline_copy.status,
        JobStatus::Completed,
        "{offline_copy:?}"
    );
    assert_runs_only_on("vm", &b, &a, 2).await;

    let suspended = b
        .migrate(
            "vm",
            &a,
            MigrateOptions {
                suspend: true,
                ..live()
            },
        )
        .await;
    assert_eq!(suspended.status, JobStatus::Completed);
    assert_eq!(a.state("vm").await, Some(DomainState::Paused));
    let domstate = |host: &testkit::Host| {
        let out = host.cli(&["domstate", "vm"]);
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(domstate(&a), "paused");
    a.request(Request::Resume {
        domain: "vm".parse().unwrap(),
    })
    .await
    .unwrap();
    assert_eq!(domstate(&a), "running");
    assert_runs_only_on("vm", &a, &b, 2).await;
}

#[tokio::test]
async fn setspeed_and_setmaxdowntime_apply_to_a_running_job() {
    let bed = TestBed::new().await;
    let (a, b) = bed.two_hosts_running("vm", 64, BUSY).await;
    let job = a
        .start_migration(
            "vm",
            &b.uri(),
            MigrateOptions {
                bandwidth: Some(1),
                ..live()
            },
        )
        .await
        .unwrap();
    wait_active(&a, &job).await;
    let get = |what: &str| {
        let out = a.cli(&[what, "vm"]);
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    // The running job's limits: its --bandwidth, QEMU's default downtime.
    assert_eq!(get("migrate-getspeed"), "1");
    assert_eq!(get("migrate-getmaxdowntime"), "300");

    assert!(a.cli(&["migrate-setspeed", "vm", "7"]).status.success());
    assert!(a
        .cli(&["migrate-setmaxdowntime", "vm", "450"])
        .status
        .success());

    let params = a.qmp("vm", "query-migrate-parameters").await.unwrap();
    assert_eq!(params["max-bandwidth"], 7 * 1024 * 1024);
    assert_eq!(params["downtime-limit"], 450);
    assert_eq!(get("migrate-getspeed"), "7");
    assert_eq!(get("migrate-getmaxdowntime"), "450");
    let info = a.dominfo("vm").await.unwrap();
    assert_eq!(info.tunables.bandwidth_mib_s, Some(7));
    a.cli_ok(&["domjobabort", "vm"]);
    let record = a.wait_job(&job).await;
    assert_eq!(record.status, JobStatus::Cancelled);
    // The job's own watcher took both changes, and says so.
    let changed: Vec<(&str, Option<f64>)> = record
        .actions
        .iter()
        .map(|a| (a.action.name(), a.value))
        .filter(|(a, _)| matches!(*a, "bandwidth" | "downtime"))
        .collect();
    assert_eq!(
        changed,
        [("bandwidth", Some(7.0)), ("downtime", Some(450.0))],
        "{:#?}",
        record.actions
    );
    // The job's parameters are undone on the source afterwards.
    let params = a.qmp("vm", "query-migrate-parameters").await.unwrap();
    assert_eq!(params["downtime-limit"], 300);
    // With no job, what the next migration gets: the domain's settings.
    let out = a.cli(&["migrate-getmaxdowntime", "--json", "vm"]);
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["downtime_ms"], 450);
    assert_eq!(got["from"], "domain setting");
}
