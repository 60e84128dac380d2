//! Hosts in a cluster: each agent started with `--cluster` registers its
//! host in a real etcd (mutual TLS with the cluster's certificates) while it
//! runs, and is gone from it within its lease of dying.

use std::time::Duration;

use guest::Workload;
use protocol::Role;
use testkit::etcd::Etcd;
use testkit::{bin, wait_until, TestBed};

/// `livemig --cluster ENDPOINT hosts --json`, as an administrator.
fn hosts(bed: &TestBed, etcd: &Etcd) -> Vec<serde_json::Value> {
    let admin = bed.certificate_dir("ops", Role::Admin);
    let out = std::process::Command::new(bin("livemig"))
        .args(["--cluster", &etcd.endpoint, "--tls-dir"])
        .arg(&admin)
        .args(["hosts", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

fn names(hosts: &[serde_json::Value]) -> Vec<&str> {
    hosts.iter().map(|h| h["name"].as_str().unwrap()).collect()
}

#[tokio::test]
async fn agents_register_their_hosts_and_are_gone_within_their_lease_of_dying() {
    let bed = TestBed::simulated().await;
    // etcd serves with the certificate `livemig pki etcd` issues.
    let pki = bed.path().join("pki");
    let out = std::process::Command::new(bin("livemig"))
        .args(["pki", "etcd"])
        .arg(&pki)
        .args(["--host", "127.0.0.1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains(&format!(
            "--cert-file {}",
            pki.join("etcd/cert.pem").display()
        )) && said.contains("--client-cert-auth")
            && said.contains("--cluster https://127.0.0.1:2379"),
        "{said}"
    );
    let etcd = Etcd::start(&bed).await;
    let args = [
        "--cluster",
        &etcd.endpoint,
        "--timeout",
        "cluster-lease=2s",
        "--label",
        "rack=r1",
        "--link",
        "100",
    ];
    let a = bed.host_args("a", &args).await;
    let mut b = bed.host_args("b", &args).await;
    a.define_and_start(bed.definition("vm", 64, Workload::IDLE))
        .await;

    let listed = wait_until(
        Duration::from_secs(20),
        "both hosts registered, with a's guest",
        || async {
            let listed = hosts(&bed, &etcd);
            let a_runs_vm = listed
                .iter()
                .any(|h| h["name"] == "agent-a" && h["domains"] == serde_json::json!(["vm"]));
            (names(&listed) == ["agent-a", "agent-b"] && a_runs_vm).then_some(listed)
        },
    )
    .await;
    let record = &listed[0];
    assert_eq!(record["agent_uri"], a.uri().as_str());
    assert_eq!(record["labels"]["rack"], "r1");
    assert_eq!(record["link_mib_s"], 100);
    assert!(record["ram_free_mib"].as_u64().unwrap() > 0);
    // The space its image directories have for guests' copied disks.
    assert!(record["disk_free_mib"].as_u64().unwrap() > 0);
    assert!(record["qemu_version"].as_str().unwrap().starts_with("7."));

    // b's agent dies without a word: its lease runs out.
    b.crash();
    wait_until(
        Duration::from_secs(15),
        "b to leave the cluster",
        || async { (names(&hosts(&bed, &etcd)) == ["agent-a"]).then_some(()) },
    )
    .await;
    // a stops too.
    drop(a);
    wait_until(
        Duration::from_secs(10),
        "a to leave the cluster",
        || async { hosts(&bed, &etcd).is_empty().then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn a_cluster_that_is_down_plaintext_or_not_given_is_a_clear_error() {
    let bed = TestBed::simulated().await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let agent_cert = bed.certificate("agent-x", Role::Agent, &["127.0.0.1"]);
    let livemigd = |cluster: &str, dir: &str| {
        std::process::Command::new(bin("livemigd"))
            .arg("--state-dir")
            .arg(bed.path().join(dir))
            .args(["--listen", "tls://127.0.0.1:0", "--tls-dir"])
            .arg(&agent_cert)
            .args(["--cluster", cluster, "--hypervisor", "simulated"])
            .output()
            .unwrap()
    };
    for (cluster, says) in [
        (
            format!("https://127.0.0.1:{closed}"),
            "cannot join the cluster",
        ),
        (format!("http://127.0.0.1:{closed}"), "plaintext"),
        ("127.0.0.1:2379".to_string(), "expected https://"),
    ] {
        let out = livemigd(&cluster, "down");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{cluster}: {stderr}");
        assert!(stderr.contains(says), "{cluster}: {stderr}");
    }

    let out = std::process::Command::new(bin("livemig"))
        .arg("hosts")
        .env_remove("LIVEMIG_CLUSTER")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--cluster"),
        "{out:?}"
    );
}

/// `livemig --cluster ENDPOINT list --json`: domain → host.
fn owners(bed: &TestBed, etcd: &Etcd) -> Vec<(String, String)> {
    let admin = bed.certificate_dir("ops", Role::Admin);
    let out = std::process::Command::new(bin("livemig"))
        .args(["--cluster", &etcd.endpoint, "--tls-dir"])
        .arg(&admin)
        .args(["list", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    rows.iter()
        .map(|r| {
            (
                r["name"].as_str().unwrap().to_string(),
                r["host"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn runs_on(domain: &str, host: &str) -> Vec<(String, String)> {
    vec![(domain.to_string(), host.to_string())]
}

#[tokio::test]
async fn the_cluster_says_where_each_domain_runs_and_it_never_starts_on_a_second_host() {
    let bed = TestBed::simulated().await;
    let etcd = Etcd::start(&bed).await;
    let args = ["--cluster", etcd.endpoint.as_str()];
    let a = bed.host_args("a", &args).await;
    let b = bed.host_args("b", &args).await;
    a.define_and_start(bed.definition("vm", 64, Workload::busy(4, 50_000)))
        .await;
    assert_eq!(owners(&bed, &etcd), runs_on("vm", "agent-a"));

    let record = a.migrate_live("vm", &b).await;
    assert_eq!(
        record.status,
        protocol::job::JobStatus::Completed,
        "{record:?}"
    );
    // Handed over at switchover, in one transaction.
    assert_eq!(owners(&bed, &etcd), runs_on("vm", "agent-b"));

    // a keeps its definition, shut off: starting it there would run the
    // guest twice.
    let start = || protocol::Request::Start {
        domain: "vm".parse().unwrap(),
        paused: false,
    };
    let refused = a.request(start()).await.unwrap_err().to_api();
    assert!(refused.message.contains("runs on agent-b"), "{refused:?}");
    assert!(a.qemu_pids().is_empty());

    // Stopped on b, it may start on a.
    b.request(protocol::Request::Destroy {
        domain: "vm".parse().unwrap(),
    })
    .await
    .unwrap();
    wait_until(
        Duration::from_secs(10),
        "b to release the domain",
        || async { owners(&bed, &etcd).is_empty().then_some(()) },
    )
    .await;
    a.request(start()).await.unwrap();
    assert_eq!(owners(&bed, &etcd), runs_on("vm", "agent-a"));
}

#[tokio::test]
async fn a_guest_renamed_on_the_way_is_handed_over_under_its_new_name() {
    let bed = TestBed::simulated().await;
    let etcd = Etcd::start(&bed).await;
    let args = ["--cluster", etcd.endpoint.as_str()];
    let a = bed.host_args("a", &args).await;
    let b = bed.host_args("b", &args).await;
    a.define_and_start(bed.definition("vm", 64, Workload::IDLE))
        .await;
    assert_eq!(owners(&bed, &etcd), runs_on("vm", "agent-a"));

    let record = a
        .migrate(
            "vm",
            &b,
            protocol::MigrateOptions {
                dname: Some("web-2".into()),
                ..testkit::live()
            },
        )
        .await;
    assert_eq!(
        record.status,
        protocol::job::JobStatus::Completed,
        "{record:?}"
    );
    assert_eq!(
        b.state("web-2").await,
        Some(protocol::domain::DomainState::Running)
    );
    // One transaction: the old name gone, the new one on b.
    assert_eq!(owners(&bed, &etcd), runs_on("web-2", "agent-b"));
}

/// `livemig --cluster ENDPOINT ARGS...` as an administrator.
fn cluster_cli(bed: &TestBed, etcd: &Etcd, args: &[&str]) -> std::process::Output {
    let admin = bed.certificate_dir("ops", Role::Admin);
    std::process::Command::new(bin("livemig"))
        .args(["--cluster", &etcd.endpoint, "--tls-dir"])
        .arg(&admin)
        .args(args)
        .output()
        .unwrap()
}

#[tokio::test]
async fn a_cordoned_host_takes_no_guest_until_it_is_uncordoned() {
    let bed = TestBed::simulated().await;
    let etcd = Etcd::start(&bed).await;
    let args = ["--cluster", etcd.endpoint.as_str()];
    let a = bed.host_args("a", &args).await;
    let b = bed.host_args("b", &args).await;
    a.define_and_start(bed.definition("vm", 64, Workload::busy(4, 50_000)))
        .await;
    wait_until(Duration::from_secs(20), "both hosts registered", || async {
        (hosts(&bed, &etcd).len() == 2).then_some(())
    })
    .await;

    let out = cluster_cli(
        &bed,
        &etcd,
        &["cordon", "agent-b", "--reason", "kernel update"],
    );
    assert!(out.status.success(), "{out:?}");
    let listed = hosts(&bed, &etcd);
    assert_eq!(listed[1]["cordoned"]["reason"], "kernel update");
    assert!(listed[0]["cordoned"].is_null());

    let refused = a
        .start_migration(
            "vm",
            &b.uri(),
            protocol::MigrateOptions {
                live: true,
                ..Default::default()
            },
        )
        .await
        .unwrap_err()
        .to_api();
    assert!(
        refused.message.contains("cordoned (kernel update)"),
        "{refused:?}"
    );
    assert!(b.qemu_pids().is_empty());
    assert_eq!(a.qemu_pids().len(), 1, "the guest stays on a");

    // Bad input changes nothing.
    let out = cluster_cli(&bed, &etcd, &["cordon", "agent-z"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no host \"agent-z\""),
        "{out:?}"
    );

    let out = cluster_cli(&bed, &etcd, &["uncordon", "agent-b"]);
    assert!(out.status.success(), "{out:?}");
    let record = a.migrate_live("vm", &b).await;
    assert_eq!(
        record.status,
        protocol::job::JobStatus::Completed,
        "{record:?}"
    );
    let out = cluster_cli(&bed, &etcd, &["uncordon", "agent-b"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not cordoned"),
        "{out:?}"
    );
}

#[tokio::test]
async fn a_policy_chosen_by_labels_sets_what_the_user_did_not() {
    let bed = TestBed::simulated().await;
    let etcd = Etcd::start(&bed).await;
    let args = ["--cluster", etcd.endpoint.as_str()];
    let a = bed.host_args("a", &args).await;
    let b = bed.host_args("b", &args).await;
    let labelled = domain::DomainDefinition::from_toml(&format!(
        "{}[labels]\ntier = \"db\"\n",
        guest::definition_toml("vm", 64, bed.kernel(), Workload::busy(4, 50_000))
    ))
    .unwrap();
    a.define_and_start(labelled).await;

    // Refused before anything is stored.
    for (bad, says) in [
        (vec!["--selector", "tier"], "expected KEY=VALUE"),
        (
            vec!["--selector", "tier=db", "--max-downtime", "400"],
            "--converge adaptive",
        ),
    ] {
        let mut command = vec!["policy", "set", "bad"];
        command.extend(bad);
        let out = cluster_cli(&bed, &etcd, &command);
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(says),
            "{out:?}"
        );
    }
    let out = cluster_cli(
        &bed,
        &etcd,
        &[
            "policy",
            "set",
            "db",
            "--selector",
            "tier=db",
            "--converge",
            "adaptive",
            "--max-downtime",
            "400",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let listed = cluster_cli(&bed, &etcd, &["policy", "list", "--json"]);
    let listed: Vec<serde_json::Value> = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["selector"]["tier"], "db");

    // No option given: the policy's.
    let there = a.migrate_live("vm", &b).await;
    assert_eq!(
        there.status,
        protocol::job::JobStatus::Completed,
        "{there:?}"
    );
    assert_eq!(there.converge, protocol::ConvergeMode::Adaptive);
    // An option given wins.
    let back = b
        .migrate(
            "vm",
            &a,
            protocol::MigrateOptions {
                live: true,
                converge: Some(protocol::ConvergeMode::Qemu),
                ..Default::default()
            },
        )
        .await;
    assert_eq!(back.status, protocol::job::JobStatus::Completed, "{back:?}");
    assert_eq!(back.converge, protocol::ConvergeMode::Qemu);

    assert!(cluster_cli(&bed, &etcd, &["policy", "rm", "db"])
        .status
        .success());
    let out = cluster_cli(&bed, &etcd, &["policy", "rm", "db"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no policy"),
        "{out:?}"
    );
}

/// Hosts a and b in the cluster with short leases, a running "vm" that
/// converges at 8 MiB/s within seconds.
async fn hosts_with_a_moving_guest(bed: &TestBed, etcd: &Etcd) -> (testkit::Host, testkit::Host) {
    let args = [
        "--cluster",
        etcd.endpoint.as_str(),
        "--timeout",
        "cluster-lease=3s",
    ];
    let a = bed.host_args("a", &args).await;
    let b = bed.host_args("b", &args).await;
    let moving = Workload {
        working_set_mib: 16,
        spin: 250_000,
        report_ms: 500,
    };
    a.define_and_start(bed.definition("vm", 64, moving)).await;
    (a, b)
}

/// Migrates "vm" from a to b with `options`, etcd frozen once the
/// destination is prepared: the migration goes on (it needs only the two
/// agents), its switchover cannot be told.
async fn migrates_with_etcd_frozen(
    a: &testkit::Host,
    b: &testkit::Host,
    etcd: &Etcd,
    options: protocol::MigrateOptions,
) {
    let job = a
        .migration_until("vm", b, options, "the memory moving", |j| {
            j.phase == protocol::job::Phase::Perform
        })
        .await;
    etcd.pause();
    let record = a.wait_job(&job).await;
    assert_eq!(
        record.status,
        protocol::job::JobStatus::Completed,
        "{record:?}"
    );
}

/// "vm" moved from a to b without `--persistent` (transient there), then
/// destroyed on b with etcd frozen: b's release cannot reach the cluster.
/// etcd stays frozen.
async fn moved_to_b_and_destroyed_with_etcd_frozen(
    a: &testkit::Host,
    b: &testkit::Host,
    etcd: &Etcd,
) {
    let record = a.migrate("vm", b, testkit::capped(8)).await;
    assert_eq!(
        record.status,
        protocol::job::JobStatus::Completed,
        "{record:?}"
    );
    etcd.pause();
    b.request(protocol::Request::Destroy {
        domain: "vm".parse().unwrap(),
    })
    .await
    .unwrap();
}

/// Waits up to `timeout` for "vm" to start on `a`.
async fn starts_again_on(a: &testkit::Host, timeout: Duration) {
    let start = || protocol::Request::Start {
        domain: "vm".parse().unwrap(),
        paused: false,
    };
    wait_until(timeout, "a to start the guest again", || async {
        a.request(start()).await.ok()
    })
    .await;
}

#[tokio::test]
async fn a_switchover_while_etcd_is_out_of_reach_reaches_the_cluster_once_it_is_back() {
    let bed = TestBed::simulated().await;
    let etcd = Etcd::start(&bed).await;
    let (a, b) = hosts_with_a_moving_guest(&bed, &etcd).await;
    assert_eq!(owners(&bed, &etcd), runs_on("vm", "agent-a"));
    migrates_with_etcd_frozen(&a, &b, &etcd, testkit::capped(8)).await;
    // Meanwhile a's stale copy does not start: the cluster cannot say.
    let start = || protocol::Request::Start {
        domain: "vm".parse().unwrap(),
        paused: false,
    };
    let refused = a.request(start()).await.unwrap_err().to_api();
    assert!(
        refused.message.contains("cannot say") || refused.message.contains("not been told"),
        "{refused:?}"
    );
    // Out of reach for longer than the hosts' leases.
    tokio::time::sleep(Duration::from_secs(4)).await;
    etcd.resume();

    wait_until(
        Duration::from_secs(30),
        "the switchover to reach the cluster",
        || async { (owners(&bed, &etcd) == runs_on("vm", "agent-b")).then_some(()) },
    )
    .await;
    let refused = a.request(start()).await.unwrap_err().to_api();
    assert!(refused.message.contains("runs on agent-b"), "{refused:?}");
    // The hosts registered again.
    wait_until(
        Duration::from_secs(30),
        "both hosts back in the cluster",
        || async { (names(&hosts(&bed, &etcd)) == ["agent-a", "agent-b"]).then_some(()) },
    )
    .await;
    assert!(a.qemu_pids().is_empty());
}

/// A guest that landed without `--persistent` (transient there) and is
/// destroyed while etcd is out of reach: its release is owed, not
/// forgotten with the domain, and once etcd is back the guest may start
/// on its old host again.
#[tokio::test]
async fn a_transient_guest_stopped_while_etcd_is_away_is_released_once_it_is_back() {
    let bed = TestBed::simulated().await;
    let etcd = Etcd::start(&bed).await;
    let (a, b) = hosts_with_a_moving_guest(&bed, &etcd).await;
    moved_to_b_and_destroyed_with_etcd_frozen(&a, &b, &etcd).await;
    assert!(b.qemu_pids().is_empty());
    etcd.resume();

    starts_again_on(&a, Duration::from_secs(60)).await;
    assert_eq!(owners(&bed, &etcd), runs_on("vm", "agent-a"));
    // b told the cluster, and forgets the guest it no longer runs: just
    // after, as its release reaches etcd before its table drops the guest.
    wait_until(
        Duration::from_secs(10),
        "b to forget the transient guest",
        || async { b.list_all().await.is_empty().then_some(()) },
    )
    .await;
}

/// As above, with the agent killed before etcd is back: the release it
/// owed went with it, and the next agent on the host, finding the cluster
/// naming it for a domain it does not know, releases it at its start.
#[tokio::test]
async fn a_release_owed_by_a_killed_agent_is_made_by_the_next() {
    let bed = TestBed::simulated().await;
    let etcd = Etcd::start(&bed).await;
    let (a, mut b) = hosts_with_a_moving_guest(&bed, &etcd).await;
    moved_to_b_and_destroyed_with_etcd_frozen(&a, &b, &etcd).await;
    b.crash();
    etcd.resume();
    assert_eq!(owners(&bed, &etcd), runs_on("vm", "agent-b"));

    b.start_again().await;

    starts_again_on(&a, Duration::from_secs(30)).await;
    assert_eq!(owners(&bed, &etcd), runs_on("vm", "agent-a"));
}

#[tokio::test]
async fn a_switchover_told_after_its_destination_stopped_the_guest_does_not_hold_it_there() {
    let bed = TestBed::simulated().await;
    let etcd = Etcd::start(&bed).await;
    let (a, b) = hosts_with_a_moving_guest(&bed, &etcd).await;
    let persistent = protocol::MigrateOptions {
        // Kept defined there, as a drain's guests are.
        persistent: true,
        ..testkit::capped(8)
    };
    migrates_with_etcd_frozen(&a, &b, &etcd, persistent).await;
    let start = || protocol::Request::Start {
        domain: "vm".parse().unwrap(),
        paused: false,
    };
    // With the cluster told nothing yet, a refuses its stale copy, saying
    // where the guest runs once its own attempt to tell has failed.
    let refused = wait_until(
        Duration::from_secs(20),
        "a to refuse the start, naming b",
        || async {
            let refused = a.request(start()).await.unwrap_err().to_api();
            refused.message.contains("agent-b").then_some(refused)
        },
    )
    .await;
    assert!(refused.message.contains("not been told"), "{refused:?}");
    // b stops the guest while etcd is away: its release cannot reach it,
    // and a's switchover, retried once etcd is back, names b for a guest
    // it no longer runs.
    b.request(protocol::Request::Destroy {
        domain: "vm".parse().unwrap(),
    })
    .await
    .unwrap();
    etcd.resume();
    // b finds the key naming it and lets it go: the guest may start again.
    wait_until(
        Duration::from_secs(60),
        "a to start the guest again",
        || async { a.request(start()).await.ok() },
    )
    .await;
    assert_eq!(owners(&bed, &etcd), runs_on("vm", "agent-a"));
    assert!(b.qemu_pids().is_empty());
}

#[tokio::test]
async fn a_watch_on_the_drains_wakes_for_each_change_to_them_and_survives_etcd_restarting() {
    let bed = TestBed::simulated().await;
    let mut etcd = Etcd::start(&bed).await;
    let cluster = cluster::Cluster::connect(
        &cluster::Endpoints::parse(&etcd.endpoint, false).unwrap(),
        Some(&cluster::TlsFiles {
            dir: bed.certificate_dir("ops", Role::Admin),
        }),
    )
    .await
    .unwrap();
    let cordon = cluster::Cordon {
        reason: "test".into(),
        at_ms: cluster::now_ms(),
    };
    let mut changes = cluster.drains_changes();
    assert!(changes.next(Duration::from_secs(10)).await, "set up");
    assert!(
        !changes.next(Duration::from_secs(1)).await,
        "nothing changed"
    );

    let drain = cluster::DrainRecord::pending("h1", &[], None, cluster::now_ms());
    cluster.start_drain(&drain, &cordon).await.unwrap();
    assert!(
        changes.next(Duration::from_secs(5)).await,
        "a drain recorded"
    );
    // Another kind of key does not wake a watch on the drains.
    cluster.cordon("h9", &cordon).await.unwrap();
    assert!(!changes.next(Duration::from_secs(1)).await, "a cordon");

    etcd.stop();
    etcd.start_again().await;
    while changes.next(Duration::from_secs(3)).await {}
    let drain = cluster::DrainRecord::pending("h2", &[], None, cluster::now_ms());
    wait_until(Duration::from_secs(20), "etcd to take a drain", || async {
        cluster.start_drain(&drain, &cordon).await.ok()
    })
    .await;
    assert!(
        changes.next(Duration::from_secs(10)).await,
        "a drain recorded after etcd restarted"
    );
}
