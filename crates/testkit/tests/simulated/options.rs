//! The `migrate` options the agent carries out: post-copy after pre-copy,
//! `migrate-postcopy` without `--postcopy`, tuning a job while it runs.

use guest::Workload;
use protocol::domain::DomainState;
use protocol::job::JobStatus;
use protocol::MigrateOptions;
use testkit::output::stdout;
use testkit::{capped, live, TestBed};

const BUSY: Workload = Workload {
    working_set_mib: 16,
    spin: 20_000,
    report_ms: 500,
};

#[tokio::test]
async fn postcopy_after_precopy_moves_a_busy_guest_that_precopy_alone_cannot() {
    let bed = TestBed::simulated().await;
    let (a, b) = bed.two_hosts_running("vm", 64, BUSY).await;

    let record = a
        .migrate_completes(
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

    assert!(record.flags.contains(&"postcopy-after-precopy".to_string()));
}

#[tokio::test]
async fn migrate_postcopy_without_the_flag_is_refused() {
    let bed = TestBed::simulated().await;
    let (a, b) = bed.two_hosts_running("vm", 64, BUSY).await;
    let job = a.migration_in_flight("vm", &b, capped(1)).await;

    let out = a.cli(&["migrate-postcopy", "vm"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not started with --postcopy"));

    a.cli_ok(&["domjobabort", "vm"]);
    assert_eq!(a.wait_job(&job).await.status, JobStatus::Cancelled);
    assert_eq!(a.state("vm").await, Some(DomainState::Running));
}

#[tokio::test]
async fn setspeed_and_setmaxdowntime_apply_to_a_running_job() {
    let bed = TestBed::simulated().await;
    let (a, b) = bed.two_hosts_running("vm", 64, BUSY).await;
    let job = a.migration_in_flight("vm", &b, capped(1)).await;
    let get = |what: &str| stdout(&a.cli_ok(&[what, "vm"])).trim().to_string();
    // The running job's limits: its --bandwidth, QEMU's default downtime.
    assert_eq!(get("migrate-getspeed"), "1");
    assert_eq!(get("migrate-getmaxdowntime"), "300");

    a.cli_ok(&["migrate-setspeed", "vm", "7"]);
    a.cli_ok(&["migrate-setmaxdowntime", "vm", "450"]);

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

#[tokio::test]
async fn dname_lands_the_guest_under_its_new_name_and_the_old_one_is_gone() {
    let bed = TestBed::simulated().await;
    let (a, b) = bed.two_hosts_running("vm", 64, BUSY).await;
    b.define_and_start(bed.definition("taken", 64, Workload::IDLE))
        .await;

    // A name the destination already runs: refused, nothing moves.
    let out = a.cli(&["migrate", "--live", "--dname", "taken", "vm", &b.uri()]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        stdout(&out).contains("domain 'taken' is already running"),
        "{out:?}"
    );
    assert_eq!(a.state("vm").await, Some(DomainState::Running));
    assert_eq!(b.state("taken").await, Some(DomainState::Running));
    assert_eq!(b.state("vm").await, None);

    // virsh's spellings: --dname, --undefinesource.
    a.cli_ok(&[
        "migrate",
        "--live",
        "--persistent",
        "--undefinesource",
        "--dname",
        "web-2",
        "vm",
        &b.uri(),
    ]);
    assert_eq!(b.state("web-2").await, Some(DomainState::Running));
    assert_eq!(b.state("vm").await, None);
    assert_eq!(a.state("vm").await, None, "undefined on the source");
    let on_b = b.list_all().await;
    let web2 = on_b.iter().find(|d| d.name == "web-2").unwrap();
    assert!(web2.persistent, "{web2:?}");
    // The job's record says what it was asked.
    let jobs = a
        .call(protocol::call::Jobs {
            domain: None,
            limit: 10,
        })
        .await
        .unwrap();
    let done = jobs.iter().find(|j| j.status == "completed").unwrap();
    let state = a
        .call(protocol::call::Job {
            id: done.id.clone(),
        })
        .await
        .unwrap();
    let protocol::call::JobState::Ended(record) = state else {
        panic!("{state:?}");
    };
    assert!(
        record.flags.contains(&"dname=web-2".to_string()),
        "{record:?}"
    );
}

#[tokio::test]
async fn xml_changes_host_side_paths_on_the_destination_and_never_what_the_guest_sees() {
    let bed = TestBed::simulated().await;
    let a = bed.host("a").await;
    let b = bed.host("b").await;
    let (here, there) = (bed.images().join("vm-a.raw"), bed.images().join("vm-b.raw"));
    for image in [&here, &there] {
        std::fs::write(image, vec![0u8; 1 << 20]).unwrap();
    }
    let toml = |memory_mib: u32, name: &str, image: &std::path::Path| {
        format!(
            "{}[[disks]]\npath = {:?}\nshared = true\n",
            guest::definition_toml(name, memory_mib, bed.kernel(), Workload::IDLE),
            image.display().to_string()
        )
    };
    a.define_and_start(domain::DomainDefinition::from_toml(&toml(64, "vm", &here)).unwrap())
        .await;
    let file = |name: &str, text: String| {
        let path = bed.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };

    // What the guest sees may not change, nor may the name.
    for (xml, says) in [
        (
            file("bigger.toml", toml(128, "vm", &there)),
            "memory_mib 64 -> 128",
        ),
        (
            file("renamed.toml", toml(64, "other", &there)),
            "--xml defines domain 'other'",
        ),
    ] {
        let out = a.cli(&["migrate", "--live", "--xml", &xml, "vm", &b.uri()]);
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{err}");
        assert_eq!(a.state("vm").await, Some(DomainState::Running));
        assert!(b.qemu_pids().is_empty());
    }

    // Another image path is a host-side change.
    let xml = file("moved.toml", toml(64, "vm", &there));
    a.cli_ok(&["migrate", "--live", "--xml", &xml, "vm", &b.uri()]);
    assert_eq!(b.state("vm").await, Some(DomainState::Running));
    assert_eq!(a.state("vm").await, Some(DomainState::ShutOff));
    let def = stdout(&b.cli_ok(&["dumpdef", "vm"]));
    assert!(
        def.contains("vm-b.raw") && !def.contains("vm-a.raw"),
        "{def}"
    );
}

#[tokio::test]
async fn listen_address_puts_the_stream_on_another_of_the_destination_s_addresses() {
    let bed = TestBed::simulated().await;
    let (a, b) = bed.two_hosts_running("vm", 64, Workload::IDLE).await;

    // Not an address of b's: refused before anything starts there.
    let out = a.cli(&[
        "migrate",
        "--live",
        "--listen-address",
        "192.0.2.1",
        "vm",
        &b.uri(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(stdout(&out).contains("192.0.2.1"), "{out:?}");
    assert_eq!(a.state("vm").await, Some(DomainState::Running));
    b.wait_no_qemu().await;

    // 127.0.0.2 is b's too (all of 127/8 is loopback).
    let record = a
        .migrate_completes(
            "vm",
            &b,
            MigrateOptions {
                listen_address: Some("127.0.0.2".into()),
                ..live()
            },
        )
        .await;
    let data_uri = record.data_uri.unwrap_or_default();
    assert!(data_uri.starts_with("tcp:127.0.0.2:"), "{data_uri}");
}

#[tokio::test]
async fn disks_uri_serves_the_copied_disks_on_the_address_asked_for() {
    let bed = TestBed::simulated().await;
    let a = bed.host_with_local_storage("a", &[]).await;
    let b = bed.host_with_local_storage("b", &[]).await;
    let data: Vec<u8> = (0..2u32 << 20).map(|i| (i % 253) as u8).collect();
    std::fs::write(bed.local_of("a").join("vm.raw"), &data).unwrap();
    let def = domain::DomainDefinition::from_toml(&format!(
        "{}[[disks]]\npath = {:?}\n",
        guest::definition_toml("vm", 64, bed.kernel(), Workload::IDLE),
        bed.local().join("vm.raw").display().to_string(),
    ))
    .unwrap();
    a.define_and_start(def).await;
    // A free port on 127.0.0.3.
    let port = std::net::TcpListener::bind("127.0.0.3:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let job = a
        .migration_until(
            "vm",
            &b,
            MigrateOptions {
                copy_storage_all: true,
                disks_uri: Some(format!("tcp:127.0.0.3:{port}")),
                ..capped(1)
            },
            "the disk copy to be under way",
            |j| j.stats.disk_processed_bytes.unwrap_or(0) > 0,
        )
        .await;
    // b's NBD server listens there, and only there.
    assert!(std::net::TcpStream::connect(("127.0.0.3", port)).is_ok());
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    a.cli_ok(&["migrate-setspeed", "vm", "1000"]);
    let record = a.wait_job(&job).await;
    assert_eq!(record.status, JobStatus::Completed, "{record:#?}");
    let copied = std::fs::read(bed.local_of("b").join("vm.raw")).unwrap();
    assert!(copied == data, "the copy differs");
}

#[tokio::test]
async fn persistent_xml_is_what_the_destination_keeps_for_the_next_start() {
    let bed = TestBed::simulated().await;
    let (a, b) = bed.two_hosts_running("vm", 64, Workload::IDLE).await;
    let next = bed.path().join("next.toml");
    std::fs::write(
        &next,
        guest::definition_toml("vm", 128, bed.kernel(), Workload::IDLE),
    )
    .unwrap();
    let next = next.display().to_string();

    let out = a.cli(&[
        "migrate",
        "--live",
        "--persistent-xml",
        &next,
        "vm",
        &b.uri(),
    ]);
    assert_eq!(out.status.code(), Some(2), "needs --persistent: {out:?}");

    a.cli_ok(&[
        "migrate",
        "--live",
        "--persistent",
        "--persistent-xml",
        &next,
        "vm",
        &b.uri(),
    ]);
    // The guest runs as it ran (64 MiB); its next start takes 128.
    let info = b.dominfo("vm").await.unwrap();
    assert_eq!(info.state, DomainState::Running);
    let ram = info.guest_ram_bytes.unwrap();
    assert!(ram <= 64 << 20 && ram > 63 << 20, "{info:?}");
    let kept = stdout(&b.cli_ok(&["dumpdef", "vm"]));
    assert!(kept.contains("memory_mib = 128"), "{kept}");
}
