//! Disks on one host's storage only, copied with the guest
//! (`--copy-storage-all`, `--copy-storage-inc`, `--migrate-disks`): two
//! agents, each with its own "local" directory at the same path.

use std::path::Path;

use protocol::domain::DomainState;
use protocol::job::JobStatus;
use protocol::{MigrateOptions, Request};
use testkit::capture::Capture;
use testkit::output::stderr;
use testkit::{assert_runs_only_on, create_image, disk_workload, live, Host, TestBed};

fn local_disk(bed: &TestBed, file: &str, format: &str) -> String {
    format!(
        "[[disks]]\npath = {:?}\nformat = \"{format}\"\n",
        bed.local().join(file).display().to_string()
    )
}

/// `qemu-img compare` of two images QEMU may hold open.
fn identical(a: &Path, b: &Path) -> Result<(), String> {
    let out = std::process::Command::new("qemu-img")
        .args(["compare", "-U"])
        .arg(a)
        .arg(b)
        .output()
        .expect("qemu-img");
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// The guest on a, with 48 MiB of data on a disk of a's own, and a
/// `--copy-storage-all` migration to b copying it at 1 MiB/s: under way
/// long enough to interfere with. The job's id.
async fn slow_copy_under_way(bed: &TestBed, a: &Host, b: &Host) -> String {
    let image = bed.local_of("a").join("vm.raw");
    std::fs::write(&image, vec![0x5au8; 48 << 20]).unwrap();
    a.define_and_start(bed.linux_definition(
        "vm",
        192,
        &disk_workload(),
        &local_disk(bed, "vm.raw", "raw"),
    ))
    .await;
    a.wait_guest_disk("vm", 256).await;
    let options = MigrateOptions {
        copy_storage_all: true,
        ..testkit::capped(1)
    };
    a.migration_until("vm", b, options, "the disk copy to be under way", |j| {
        j.stats.disk_processed_bytes.unwrap_or(0) > 0
    })
    .await
}

#[tokio::test]
async fn copy_storage_all_moves_a_local_disk_being_written_and_the_copy_is_exact() {
    let bed = TestBed::new().await;
    let (a, b) = bed.hosts_with_local_storage(None).await;
    create_image(&bed.local_of("a").join("vm.qcow2"), 64, "qcow2");
    a.define_and_start(bed.linux_definition(
        "vm",
        192,
        &disk_workload(),
        &local_disk(&bed, "vm.qcow2", "qcow2"),
    ))
    .await;
    a.wait_guest_disk("vm", 256).await;

    // Without a copy flag the guest would find no disk on b.
    let out = a.cli(&["migrate", "--live", "vm", &b.uri()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("--copy-storage-all"),
        "{}",
        stderr(&out)
    );
    assert!(!bed.local_of("b").join("vm.qcow2").exists());

    // The estimate sees the disk being written, and that its copy keeps
    // up with 16 MiB/s.
    let out = a.cli(&["estimate", "vm", "--bandwidth", "16", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let vda = &report["disks"][0];
    assert_eq!(vda["target"], "vda", "{report:#}");
    assert_eq!(vda["shared"], false, "{report:#}");
    assert_eq!(vda["size_bytes"], 64u64 << 20, "{report:#}");
    let writes = vda["write_bytes_s"].as_f64().unwrap();
    // The workload writes 1 MiB/s (less under a loaded TCG).
    assert!(
        writes > 64.0 * 1024.0 && writes < 4.0 * 1048576.0,
        "{report:#}"
    );
    assert_eq!(vda["copy"]["converges"], true, "{report:#}");
    let text = testkit::output::stdout(&a.cli(&["estimate", "vm", "--bandwidth", "16"]));
    assert!(
        text.contains("vda writes") && text.contains("copy converges"),
        "{text}"
    );

    // --suspend: the guest waits on b, so both images hold the same bytes.
    let record = a
        .migrate(
            "vm",
            &b,
            MigrateOptions {
                copy_storage_all: true,
                suspend: true,
                ..live()
            },
        )
        .await;
    assert_eq!(record.status, JobStatus::Completed, "{record:#?}");
    assert!(record.flags.contains(&"copy-storage-all".to_string()));
    assert!(
        record.stats.disk_total_bytes.unwrap_or(0) > 0,
        "{:?}",
        record.stats
    );
    assert_eq!(b.state("vm").await, Some(DomainState::Paused));
    let (on_a, on_b) = (
        bed.local_of("a").join("vm.qcow2"),
        bed.local_of("b").join("vm.qcow2"),
    );
    identical(&on_a, &on_b).unwrap_or_else(|e| panic!("the copy differs: {e}"));

    b.request(Request::Resume {
        domain: "vm".parse().unwrap(),
    })
    .await
    .unwrap();
    assert_runs_only_on("vm", &b, &a, 2).await;
    // Every block written on a, and since, reads back right on b.
    let log = b.wait_guest_disk("vm", 512).await;
    assert!(log.disk_intact(), "{:?}", log.corruptions);
}

#[tokio::test]
async fn an_abort_during_the_disk_copy_leaves_the_source_on_its_disk_and_nothing_on_the_destination(
) {
    let bed = TestBed::new().await;
    let (a, b) = bed.hosts_with_local_storage(None).await;
    let job = slow_copy_under_way(&bed, &a, &b).await;
    assert!(
        bed.local_of("b").join("vm.raw").exists(),
        "b created the image"
    );
    a.cli_ok(&["domjobabort", "vm"]);
    let record = a.wait_job(&job).await;

    assert_eq!(record.status, JobStatus::Cancelled, "{record:#?}");
    b.wait_no_qemu().await;
    assert!(
        !bed.local_of("b").join("vm.raw").exists(),
        "b removed the half-copied image"
    );
    assert_eq!(b.state("vm").await, None);
    // No mirror, no NBD connection left on a; its guest still checks its
    // disk.
    let jobs = a.qmp("vm", "query-block-jobs").await.unwrap();
    assert_eq!(jobs, serde_json::json!([]));
    let nodes = a.qmp("vm", "query-named-block-nodes").await.unwrap();
    assert!(!nodes.to_string().contains("livemig-nbd"), "{nodes}");
    assert_runs_only_on("vm", &a, &b, 1).await;
    a.wait_guest_disk("vm", 256).await;
}

#[tokio::test]
async fn migrate_disks_copies_the_disks_named_and_inc_only_the_top_image() {
    let bed = TestBed::new().await;
    let (a, b) = bed.hosts_with_local_storage(None).await;
    // vda: a top image on a base both hosts have (shared, read-only);
    // vdb: a scratch disk on a's storage; vdc: shared.
    let base = bed.images().join("base.raw");
    std::fs::write(&base, vec![0x11u8; 4 << 20]).unwrap();
    let top = bed.local_of("a").join("top.qcow2");
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&base)
        .arg(&top)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    create_image(&bed.local_of("a").join("scratch.raw"), 8, "raw");
    let shared = bed.disk_image("shared.raw", 8, "raw");
    let devices = format!(
        "{}{}[[disks]]\npath = {:?}\nshared = true\n",
        local_disk(&bed, "top.qcow2", "qcow2"),
        local_disk(&bed, "scratch.raw", "raw"),
        shared.display().to_string()
    );
    a.define_and_start(bed.linux_definition("vm", 192, &disk_workload(), &devices))
        .await;
    a.wait_guest_disk("vm", 256).await;

    // Naming only vda leaves vdb behind: refused, nothing created.
    let out = a.cli(&[
        "migrate",
        "--live",
        "--copy-storage-inc",
        "--migrate-disks",
        "vda",
        "vm",
        &b.uri(),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("disk vdb"), "{}", stderr(&out));
    assert!(!bed.local_of("b").join("top.qcow2").exists());

    let record = a
        .migrate_completes(
            "vm",
            &b,
            MigrateOptions {
                copy_storage_inc: true,
                migrate_disks: vec!["vda".into(), "vdb".into()],
                ..live()
            },
        )
        .await;
    assert!(record.flags.contains(&"migrate-disks=vda,vdb".to_string()));
    let info = std::process::Command::new("qemu-img")
        .args(["info", "-U", "--output=json"])
        .arg(bed.local_of("b").join("top.qcow2"))
        .output()
        .unwrap();
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(
        info["backing-filename"],
        base.display().to_string(),
        "{info}"
    );
    assert!(bed.local_of("b").join("scratch.raw").exists());
    let log = b.wait_guest_disk("vm", 512).await;
    assert!(log.disk_intact(), "{:?}", log.corruptions);
}

/// Where `haystack` holds `needle`.
fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn with_tls_the_disks_travel_encrypted_too() {
    let bed = TestBed::new().await;
    let net = testkit::netns::NetnsPair::create("nbd").expect("network namespaces");
    let (a, b) = bed.hosts_with_local_storage(Some(&net)).await;
    create_image(&bed.local_of("a").join("vm.qcow2"), 32, "qcow2");
    a.define_and_start(bed.linux_definition(
        "vm",
        192,
        &disk_workload(),
        &local_disk(&bed, "vm.qcow2", "qcow2"),
    ))
    .await;
    a.wait_guest_disk("vm", 256).await;
    let capture = Capture::start(&net.b).expect("a packet capture in b's namespace");

    a.migrate_completes(
        "vm",
        &b,
        MigrateOptions {
            copy_storage_all: true,
            tls: true,
            ..live()
        },
    )
    .await;
    let seen = capture.finish();
    let log = b.wait_guest_disk("vm", 512).await;
    assert!(log.disk_intact(), "{:?}", log.corruptions);

    // The NBD connection: its client asked for TLS (NBD_OPT_STARTTLS, 5)
    // and sent the rest, the export's name included, inside it.
    let streams = seen.client_streams();
    let (port, nbd) = streams
        .iter()
        .find(|(_, s)| contains(s, b"IHAVEOPT"))
        .unwrap_or_else(|| panic!("no NBD connection among {} seen", streams.len()));
    let starttls = [b"IHAVEOPT".as_slice(), &[0, 0, 0, 5]].concat();
    assert!(
        contains(nbd, &starttls),
        "port {port}: {:02x?}",
        &nbd[..nbd.len().min(48)]
    );
    assert!(
        contains(nbd, &[0x16, 0x03]),
        "no TLS handshake on port {port}"
    );
    assert!(
        !contains(nbd, b"livemig-vda"),
        "the export name went in the clear on port {port}"
    );
}

#[tokio::test]
async fn a_link_lost_during_the_disk_copy_fails_the_job_and_leaves_nothing_on_the_destination() {
    let bed = TestBed::new().await.with_timeouts(&["peer-silence=8s"]);
    let net = testkit::netns::NetnsPair::create("cut").expect("network namespaces");
    let (a, b) = bed.hosts_with_local_storage(Some(&net)).await;
    let job = slow_copy_under_way(&bed, &a, &b).await;

    // Down for longer than the agents wait for each other, then back: the
    // mirror's stalled NBD requests can end and the abort reach b.
    net.cut().unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(8 + 10)).await;
    net.restore().unwrap();
    let record = a.wait_job(&job).await;

    assert_eq!(record.status, JobStatus::Failed, "{record:#?}");
    let error = record.error.unwrap_or_default();
    assert!(error.contains("lost contact"), "{error}");
    b.wait_no_qemu().await;
    testkit::wait_until(
        std::time::Duration::from_secs(60),
        "b to remove the half-copied image",
        || async { (!bed.local_of("b").join("vm.raw").exists()).then_some(()) },
    )
    .await;
    let jobs = a.qmp("vm", "query-block-jobs").await.unwrap();
    assert_eq!(jobs, serde_json::json!([]));
    assert_runs_only_on("vm", &a, &b, 1).await;
    let log = a.wait_guest_disk("vm", 256).await;
    assert!(log.disk_intact(), "{:?}", log.corruptions);
}

/// Waits until b has no QEMU and no image of the copy left.
async fn b_gave_up_the_copy(bed: &TestBed, b: &Host) {
    testkit::wait_until(
        std::time::Duration::from_secs(120),
        "b to give up the copy and remove its image",
        || async {
            (b.qemu_pids().is_empty() && !bed.local_of("b").join("vm.raw").exists()).then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn the_destination_agent_killed_during_the_disk_copy_leaves_no_image_once_it_is_back() {
    let bed = TestBed::new()
        .await
        .with_timeouts(&["peer-silence=8s", "orphan=20s"]);
    let (a, mut b) = bed.hosts_with_local_storage(None).await;
    let job = slow_copy_under_way(&bed, &a, &b).await;

    b.crash();
    let record = a.wait_job(&job).await;
    assert_eq!(record.status, JobStatus::Failed, "{record:#?}");
    assert!(
        record
            .error
            .clone()
            .unwrap_or_default()
            .contains("lost contact"),
        "{record:#?}"
    );
    assert_eq!(a.state("vm").await, Some(DomainState::Running));

    // The agent comes back, adopts its orphaned incoming QEMU, and when
    // no source claims it, tears it down with the image it created.
    b.start_again().await;
    b_gave_up_the_copy(&bed, &b).await;
    assert_runs_only_on("vm", &a, &b, 1).await;
    let log = a.wait_guest_disk("vm", 256).await;
    assert!(log.disk_intact(), "{:?}", log.corruptions);
}

#[tokio::test]
async fn the_source_agent_killed_during_the_disk_copy_leaves_the_guest_on_its_disk_and_the_next_copy_works(
) {
    let bed = TestBed::new().await;
    let (mut a, b) = bed.hosts_with_local_storage(None).await;
    slow_copy_under_way(&bed, &a, &b).await;

    a.crash();
    // The destination gives up on a source that went silent: its QEMU and
    // the image it created go.
    b_gave_up_the_copy(&bed, &b).await;
    // The agent comes back and settles the job: the guest runs on a, and
    // the dead job's mirror (failed against the gone server) is swept.
    a.start_again().await;
    testkit::wait_until(
        std::time::Duration::from_secs(60),
        "a to sweep the dead job's mirror",
        || async {
            let jobs = a.qmp("vm", "query-block-jobs").await.ok()?;
            (jobs == serde_json::json!([])).then_some(())
        },
    )
    .await;
    assert_eq!(a.state("vm").await, Some(DomainState::Running));
    a.wait_guest_disk("vm", 256).await;

    // The names the dead job used are free: the next copy goes through.
    let record = a
        .migrate(
            "vm",
            &b,
            MigrateOptions {
                copy_storage_all: true,
                ..live()
            },
        )
        .await;
    assert_eq!(record.status, JobStatus::Completed, "{record:#?}");
    assert_runs_only_on("vm", &b, &a, 1).await;
    let log = b.wait_guest_disk("vm", 256).await;
    assert!(log.disk_intact(), "{:?}", log.corruptions);
}

#[tokio::test]
async fn migrate_setspeed_retunes_the_disks_copy_too() {
    let bed = TestBed::new().await;
    let (a, b) = bed.hosts_with_local_storage(None).await;
    let job = slow_copy_under_way(&bed, &a, &b).await;

    // At 1 MiB/s the 48 MiB would take most of a minute; the new cap
    // reaches the mirror at once, and the memory copy when it starts.
    a.cli_ok(&["migrate-setspeed", "vm", "512"]);
    let jobs = a.qmp("vm", "query-block-jobs").await.unwrap();
    assert_eq!(jobs[0]["speed"], 512u64 << 20, "{jobs}");
    let record = a.wait_job(&job).await;

    assert_eq!(record.status, JobStatus::Completed, "{record:#?}");
    assert_runs_only_on("vm", &b, &a, 1).await;
    let log = b.wait_guest_disk("vm", 256).await;
    assert!(log.disk_intact(), "{:?}", log.corruptions);
}

/// What an operator does to put a guest somewhere particular, on real
/// QEMU: another name there (`--dname`), its disk at another path of the
/// destination's local storage (`--xml`), a definition kept for its next
/// start (`--persistent-xml`), and the memory stream and the disks' NBD
/// server on other addresses of the destination's own (`--listen-address`,
/// `--disks-uri`).
#[tokio::test]
async fn a_guest_lands_renamed_on_the_disk_path_and_addresses_the_operator_gave() {
    let bed = TestBed::new().await;
    let (a, b) = bed.hosts_with_local_storage(None).await;
    let data: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(bed.local_of("a").join("vm.raw"), &data).unwrap();
    let def = |name: &str, memory_mib: u32, image: &str| {
        format!(
            "{}[[disks]]\npath = {:?}\n",
            guest::definition_toml(
                name,
                memory_mib,
                bed.kernel(),
                guest::Workload::busy(4, 50_000),
            ),
            bed.local().join(image).display().to_string()
        )
    };
    a.define_and_start(domain::DomainDefinition::from_toml(&def("vm", 64, "vm.raw")).unwrap())
        .await;
    let file = |name: &str, text: String| {
        let path = bed.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let xml = file("there.toml", def("web-2", 64, "web-2.raw"));
    let next = file("next.toml", def("web-2", 96, "web-2.raw"));

    let out = a.cli(&[
        "migrate",
        "--live",
        "--copy-storage-all",
        "--persistent",
        "--undefinesource",
        "--dname",
        "web-2",
        "--xml",
        &xml,
        "--persistent-xml",
        &next,
        "--listen-address",
        "127.0.0.2",
        "--disks-uri",
        "tcp:127.0.0.3:0",
        "--json",
        "vm",
        &b.uri(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let record: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap()).unwrap();
    let data_uri = record["data_uri"].as_str().unwrap_or_default();
    assert!(data_uri.starts_with("tcp:127.0.0.2:"), "{record}");
    // Under its new name on b, intact, on the path --xml gave; gone from a.
    assert_runs_only_on("web-2", &b, &a, 2).await;
    assert_eq!(a.state("vm").await, None);
    let copied = std::fs::read(bed.local_of("b").join("web-2.raw")).unwrap();
    assert!(copied == data, "the disk copy differs");
    // Kept for the next start: 96 MiB.
    let kept = String::from_utf8_lossy(&b.cli_ok(&["dumpdef", "web-2"]).stdout).into_owned();
    assert!(kept.contains("memory_mib = 96"), "{kept}");
}
