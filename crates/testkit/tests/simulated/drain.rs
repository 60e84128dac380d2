//! Draining a host: `livemig drain` checks and records, a controller (or
//! several, one leading) moves the guests, and the report says what each
//! cost; bad input changes nothing; a leader killed mid-drain loses no
//! guest and moves none twice.

use std::collections::BTreeMap;
use std::time::Duration;

use guest::Workload;
use protocol::Role;
use testkit::controller::Controller;
use testkit::etcd::Etcd;
use testkit::{bin, wait_until, Host, TestBed};

/// `livemig --cluster ENDPOINT ARGS...` as an administrator.
pub(crate) fn livemig(bed: &TestBed, etcd: &Etcd, args: &[&str]) -> std::process::Output {
    let admin = bed.certificate_dir("ops", Role::Admin);
    std::process::Command::new(bin("livemig"))
        .args(["--cluster", &etcd.endpoint, "--tls-dir"])
        .arg(&admin)
        .args(args)
        .output()
        .unwrap()
}

pub(crate) fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub(crate) fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Waits until the cluster lists `n` hosts.
pub(crate) async fn hosts_registered(bed: &TestBed, etcd: &Etcd, n: usize) {
    wait_until(
        Duration::from_secs(20),
        &format!("{n} hosts registered"),
        || async {
            let out = livemig(bed, etcd, &["hosts", "--json"]);
            let hosts: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).ok()?;
            (hosts.len() == n).then_some(())
        },
    )
    .await;
}

/// The cluster's view: domain → host.
pub(crate) fn owners(bed: &TestBed, etcd: &Etcd) -> BTreeMap<String, String> {
    let out = livemig(bed, etcd, &["list", "--json"]);
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

pub(crate) async fn running(host: &Host) -> Vec<String> {
    host.list_all()
        .await
        .into_iter()
        .filter(|d| d.state == protocol::domain::DomainState::Running)
        .map(|d| d.name)
        .collect()
}

/// Three hosts in a cluster with `link` MiB/s each; a runs `guests`.
pub(crate) async fn cluster_of_three(
    bed: &TestBed,
    etcd: &Etcd,
    link: &str,
    guests: &[(&str, Workload)],
) -> (Host, Host, Host) {
    cluster_of_three_with(bed, etcd, link, guests, &[]).await
}

/// As [`cluster_of_three`], with `a_args` for a's agent besides.
pub(crate) async fn cluster_of_three_with(
    bed: &TestBed,
    etcd: &Etcd,
    link: &str,
    guests: &[(&str, Workload)],
    a_args: &[&str],
) -> (Host, Host, Host) {
    let args = ["--cluster", etcd.endpoint.as_str(), "--link", link];
    let mut for_a = args.to_vec();
    for_a.extend(a_args);
    let a = bed.host_args("a", &for_a).await;
    let b = bed.host_args("b", &args).await;
    let c = bed.host_args("c", &args).await;
    for (name, workload) in guests {
        a.define_and_start(bed.definition(name, 64, *workload))
            .await;
    }
    wait_until(
        Duration::from_secs(20),
        "three hosts registered",
        || async {
            let out = livemig(bed, etcd, &["hosts", "--json"]);
            let hosts: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).ok()?;
            let a_runs_all = hosts
                .iter()
                .any(|h| {
                    h["name"] == "agent-a"
                        && h["domains"].as_array().map(Vec::len) == Some(guests.len())
                })
                .then_some(());
            (hosts.len() == 3).then_some(())?;
            a_runs_all
        },
    )
    .await;
    (a, b, c)
}

/// Idle guests, as many as a test takes.
const IDLE_GUESTS: [(&str, Workload); 4] = [
    ("idle1", Workload::IDLE),
    ("idle2", Workload::IDLE),
    ("idle3", Workload::IDLE),
    ("idle4", Workload::IDLE),
];

pub(crate) fn mix() -> Vec<(&'static str, Workload)> {
    vec![
        ("idle1", Workload::IDLE),
        ("idle2", Workload::IDLE),
        ("light", Workload::busy(4, 200_000)),
        ("hot", Workload::busy(16, 0)),
    ]
}

/// Every guest runs exactly once, none on a, and the cluster agrees.
pub(crate) async fn all_moved_off_a(
    bed: &TestBed,
    etcd: &Etcd,
    a: &Host,
    b: &Host,
    c: &Host,
    n: usize,
) {
    assert!(running(a).await.is_empty(), "a still runs guests");
    let mut moved = running(b).await;
    moved.extend(running(c).await);
    moved.sort();
    let mut expected: Vec<String> = mix().iter().map(|(n, _)| n.to_string()).collect();
    expected.truncate(n);
    expected.sort();
    assert_eq!(moved, expected, "every guest runs once, on b or c");
    let owners = owners(bed, etcd);
    for guest in &expected {
        assert_ne!(owners.get(guest).map(String::as_str), Some("agent-a"));
    }
}

#[tokio::test]
async fn a_drain_moves_every_guest_off_the_host_and_reports_what_each_cost() {
    let bed = TestBed::simulated().await;
    let etcd = Etcd::start(&bed).await;
    let (a, b, c) = cluster_of_three(&bed, &etcd, "100", &mix()).await;
    let _controller = Controller::start(&bed, &etcd, "c1", &["--lease", "2"]);

    // The plan first: where each would go, nothing recorded.
    let out = livemig(&bed, &etcd, &["drain", "agent-a", "--dry-run", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let plan: serde_json::Value = serde_json::from_str(stdout(&out).trim()).unwrap();
    assert_eq!(plan["guests"].as_array().unwrap().len(), 4, "{plan}");
    let predicted = plan["predicted_s"].as_f64().unwrap();
    let bound = plan["lower_bound_s"].as_f64().unwrap();
    assert!(predicted >= bound && bound > 0.0, "{plan}");
    let out = livemig(&bed, &etcd, &["drains", "--json"]);
    assert_eq!(stdout(&out).trim(), "[]", "a dry run records nothing");

    let out = livemig(&bed, &etcd, &["drain", "agent-a", "--wait", "--json"]);
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let report: serde_json::Value =
        serde_json::from_str(stdout(&out).lines().last().unwrap()).unwrap();
    assert_eq!(report["event"], "report");
    let drain = &report["drain"];
    assert_eq!(drain["state"], "done", "{drain}");
    for guest in drain["guests"].as_array().unwrap() {
        assert_eq!(guest["state"], "moved", "{guest}");
        let to = guest["destination"].as_str().unwrap();
        assert!(to == "agent-b" || to == "agent-c", "{guest}");
        let cost = &guest["cost"];
        assert!(cost["time_ms"].as_u64().unwrap() > 0, "{guest}");
        assert!(cost["bytes"].as_u64().unwrap() > 0, "{guest}");
    }
    // Spread over both hosts.
    let to: Vec<&str> = drain["guests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["destination"].as_str().unwrap())
        .collect();
    assert!(to.contains(&"agent-b") && to.contains(&"agent-c"), "{to:?}");
    all_moved_off_a(&bed, &etcd, &a, &b, &c, 4).await;

    // a stays cordoned; the drain is listed as done; the text report.
    let out = livemig(&bed, &etcd, &["hosts"]);
    assert!(stdout(&out)
        .lines()
        .any(|l| l.starts_with("agent-a") && l.contains("cordoned")));
    let out = livemig(&bed, &etcd, &["drains"]);
    assert!(stdout(&out).contains("done"), "{}", stdout(&out));
    let id = drain["id"].as_str().unwrap();
    let out = livemig(&bed, &etcd, &["drain", "--watch", id]);
    assert!(out.status.success(), "{out:?}");
    let text = stdout(&out);
    assert!(text.contains("agent-a runs no guest"), "{text}");
    assert!(text.contains("hot") && text.contains("MiB"), "{text}");
}

/// The guests' `[start, end)` in a dry run's plan, with their hosts.
fn planned(plan: &serde_json::Value) -> Vec<(f64, f64, String)> {
    plan["guests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                g["start_s"].as_f64().unwrap(),
                g["end_s"].as_f64().unwrap(),
                g["to"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// The most planned migrations running at once (into `to`, if given).
fn most_at_once(plan: &[(f64, f64, String)], to: Option<&str>) -> usize {
    plan.iter()
        .map(|(start, _, _)| {
            plan.iter()
                .filter(|(s, e, t)| s <= start && start < e && to.is_none_or(|to| t == to))
                .count()
        })
        .max()
        .unwrap_or(0)
}

/// A dry run plans under the limits the leading controller will keep (a
/// controller's defaults, said so, when none leads) and under the drain's
/// own `--max-parallel`; a drain recorded with no controller leading says
/// it will wait for one.
#[tokio::test]
async fn a_dry_run_plans_under_the_leading_controller_s_limits() {
    let bed = TestBed::simulated().await;
    let etcd = Etcd::start(&bed).await;
    let (_a, _b, _c) = cluster_of_three(&bed, &etcd, "100", &IDLE_GUESTS).await;
    let dry_run = |extra: &[&str]| {
        let mut args = vec!["drain", "agent-a", "--dry-run", "--json"];
        args.extend(extra);
        let out = livemig(&bed, &etcd, &args);
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_str::<serde_json::Value>(stdout(&out).trim()).unwrap()
    };

    let plan = dry_run(&[]);
    assert_eq!(plan["controller"], serde_json::Value::Null, "{plan}");
    assert_eq!(plan["caps"]["outbound"], 4, "{plan}");
    assert_eq!(plan["caps"]["inbound"], 2, "{plan}");
    assert_eq!(most_at_once(&planned(&plan), None), 4, "{plan}");
    let text = stdout(&livemig(&bed, &etcd, &["drain", "agent-a", "--dry-run"]));
    assert!(text.contains("no controller leads"), "{text}");
    let text = stdout(&livemig(&bed, &etcd, &["drains"]));
    assert!(
        text.contains("no controller leads: drains wait until a livemig-controller runs"),
        "{text}"
    );
    let plan = dry_run(&["--max-parallel", "1"]);
    assert_eq!(plan["caps"]["outbound"], 1, "{plan}");
    assert_eq!(most_at_once(&planned(&plan), None), 1, "{plan}");

    let mut controller = Controller::start(
        &bed,
        &etcd,
        "c1",
        &["--lease", "2", "--max-outbound", "3", "--max-inbound", "1"],
    );
    let plan = wait_until(Duration::from_secs(20), "c1 to lead", || async {
        let plan = dry_run(&[]);
        (plan["controller"] == "c1").then_some(plan)
    })
    .await;
    assert_eq!(plan["caps"]["outbound"], 3, "{plan}");
    assert_eq!(plan["caps"]["inbound"], 1, "{plan}");
    let schedule = planned(&plan);
    assert!(most_at_once(&schedule, None) <= 2, "{plan}");
    for host in ["agent-b", "agent-c"] {
        assert_eq!(most_at_once(&schedule, Some(host)), 1, "{plan}");
    }
    let text = stdout(&livemig(&bed, &etcd, &["drain", "agent-a", "--dry-run"]));
    assert!(
        text.contains("under the limits of controller c1, leading: 3 out and 1 in per host"),
        "{text}"
    );
    let text = stdout(&livemig(&bed, &etcd, &["drains"]));
    assert!(
        text.contains("controller c1 leads, at most 3 out and 1 in per host, 16 in the cluster"),
        "{text}"
    );

    // Its lease runs out with it.
    controller.kill();
    wait_until(Duration::from_secs(20), "no controller to lead", || async {
        (dry_run(&[])["controller"].is_null()).then_some(())
    })
    .await;
    let out = livemig(&bed, &etcd, &["drain", "agent-a"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no controller leads the cluster: the drain waits"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn a_drain_that_cannot_be_done_is_refused_and_changes_nothing() {
    let bed = TestBed::simulated().await;
    let etcd = Etcd::start(&bed).await;
    let args = ["--cluster", etcd.endpoint.as_str()];
    let a = bed.host_args("a", &args).await;
    let b = bed.host_args("b", &args).await;
    a.define_and_start(bed.definition("vm", 64, Workload::IDLE))
        .await;
    hosts_registered(&bed, &etcd, 2).await;
    let refused = |args: &[&str], says: &str| {
        let out = livemig(&bed, &etcd, args);
        assert!(!out.status.success(), "{args:?}: {out:?}");
        let err = stderr(&out);
        assert!(err.contains(says), "{args:?}: {err}");
    };
    refused(&["drain", "agent-z"], "no host \"agent-z\" in the cluster");
    refused(
        &["drain", "agent-a", "--to", "agent-z"],
        "--to agent-z: no such host",
    );
    refused(
        &["drain", "agent-a", "--to", "agent-a"],
        "the host being drained",
    );
    let out = livemig(&bed, &etcd, &["cordon", "agent-b", "--reason", "firmware"]);
    assert!(out.status.success(), "{out:?}");
    refused(
        &["drain", "agent-a", "--to", "agent-b"],
        "cordoned (firmware)",
    );
    // The only other host is cordoned: vm has nowhere to go, said per VM.
    refused(&["drain", "agent-a"], "vm: agent-b: cordoned (firmware)");
    let out = livemig(&bed, &etcd, &["uncordon", "agent-b"]);
    assert!(out.status.success(), "{out:?}");

    // Nothing was recorded and a is not cordoned.
    let out = livemig(&bed, &etcd, &["drains", "--json"]);
    assert_eq!(stdout(&out).trim(), "[]");
    let out = livemig(&bed, &etcd, &["hosts"]);
    assert!(!stdout(&out).contains("cordoned"), "{}", stdout(&out));

    // Recorded (no controller runs), a second drain of a is refused.
    let out = livemig(&bed, &etcd, &["drain", "agent-a"]);
    assert!(out.status.success(), "{out:?}");
    refused(&["drain", "agent-a"], "being drained already");
    let out = livemig(&bed, &etcd, &["drain", "--watch", "no-such-drain"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("no drain no-such-drain"), "{out:?}");
    // Without a controller nothing moved.
    assert_eq!(running(&a).await, ["vm"]);
    assert!(running(&b).await.is_empty());
}

#[tokio::test]
async fn killing_the_leading_controller_mid_drain_loses_no_guest_and_moves_none_twice() {
    let bed = TestBed::simulated().await;
    let etcd = Etcd::start(&bed).await;
    // A slow link, so the drain is still running when its leader dies.
    let (a, b, c) = cluster_of_three(&bed, &etcd, "24", &mix()).await;
    let mut first = Controller::start(&bed, &etcd, "first", &["--lease", "2"]);
    // The first leads before the second starts.
    let cluster = cluster::Cluster::connect(
        &cluster::Endpoints::parse(&etcd.endpoint, false).unwrap(),
        Some(&cluster::TlsFiles {
            dir: bed.certificate_dir("ops", Role::Admin),
        }),
    )
    .await
    .unwrap();
    wait_until(Duration::from_secs(20), "first to lead", || async {
        (cluster.leader().await.ok()?.as_deref() == Some("first")).then_some(())
    })
    .await;
    let _second = Controller::start(&bed, &etcd, "second", &["--lease", "2"]);

    let out = livemig(&bed, &etcd, &["drain", "agent-a", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let record: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = record["id"].as_str().unwrap().to_string();

    // Kill the leader while a guest moves.
    wait_until(Duration::from_secs(60), "a guest to be moving", || async {
        let out = livemig(&bed, &etcd, &["drains", "--json"]);
        let drains: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).ok()?;
        let drain = drains.first()?;
        if drain["state"] != "pending" {
            assert_eq!(drain["controller"], "first", "{drain}");
        }
        drain["guests"]
            .as_array()?
            .iter()
            .any(|g| g["state"] == "migrating" && g["job_id"].is_string())
            .then_some(())
    })
    .await;
    first.kill();
    wait_until(Duration::from_secs(20), "second to lead", || async {
        (cluster.leader().await.ok()?.as_deref() == Some("second")).then_some(())
    })
    .await;

    let out = livemig(&bed, &etcd, &["drain", "--watch", &id, "--json"]);
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let report: serde_json::Value =
        serde_json::from_str(stdout(&out).lines().last().unwrap()).unwrap();
    assert_eq!(report["drain"]["state"], "done", "{report}");
    all_moved_off_a(&bed, &etcd, &a, &b, &c, 4).await;

    // Each guest left a exactly once: one completed outgoing job each.
    let jobs = a
        .call(protocol::call::Jobs {
            domain: None,
            limit: 100,
        })
        .await
        .unwrap();
    let mut completed: BTreeMap<String, usize> = BTreeMap::new();
    for job in &jobs {
        if job.status == "completed" {
            *completed.entry(job.domain.clone()).or_default() += 1;
        }
    }
    assert_eq!(completed.len(), 4, "{jobs:?}");
    assert!(completed.values().all(|&n| n == 1), "{completed:?}");
}

#[tokio::test]
async fn a_drain_carries_a_guest_s_local_disk_with_it_and_leaves_a_shared_one_in_place() {
    let bed = TestBed::simulated().await;
    let etcd = Etcd::start(&bed).await;
    let args = ["--cluster", etcd.endpoint.as_str(), "--link", "100"];
    let a = bed.host_with_local_storage("a", &args).await;
    let b = bed.host_with_local_storage("b", &args).await;
    let c = bed.host_with_local_storage("c", &args).await;
    // A 4 MiB disk only a has, and one every host sees.
    let data: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(bed.local_of("a").join("data.raw"), &data).unwrap();
    let shared = bed.images().join("shared.raw");
    std::fs::write(&shared, vec![0x5au8; 1 << 20]).unwrap();
    let def = domain::DomainDefinition::from_toml(&format!(
        "{}[[disks]]\npath = {:?}\n[[disks]]\npath = {:?}\nshared = true\n",
        guest::definition_toml("db", 64, bed.kernel(), Workload::IDLE),
        bed.local().join("data.raw").display().to_string(),
        shared.display().to_string(),
    ))
    .unwrap();
    a.define_and_start(def).await;
    a.define_and_start(bed.definition("web", 64, Workload::IDLE))
        .await;
    hosts_registered(&bed, &etcd, 3).await;
    let _controller = Controller::start(&bed, &etcd, "c1", &["--lease", "2"]);

    let out = livemig(&bed, &etcd, &["drain", "agent-a", "--wait", "--json"]);
    assert!(out.status.success(), "{}\n{}", stdout(&out), stderr(&out));
    let report: serde_json::Value =
        serde_json::from_str(stdout(&out).lines().last().unwrap()).unwrap();
    assert_eq!(report["drain"]["state"], "done", "{report}");
    let db = report["drain"]["guests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["domain"] == "db")
        .unwrap();
    let to = db["destination"].as_str().unwrap();
    let (there, other) = match to {
        "agent-b" => (&b, ("c", &c)),
        "agent-c" => (&c, ("b", &b)),
        _ => panic!("{db}"),
    };
    assert!(running(there).await.contains(&"db".to_string()));
    assert!(running(&a).await.is_empty());
    // The local disk arrived whole on the host that runs db, and nowhere
    // else; the shared one was not copied.
    let host = to.trim_start_matches("agent-");
    let copied = std::fs::read(bed.local_of(host).join("data.raw")).unwrap();
    assert!(copied == data, "the copy of db's local disk differs");
    let (other_name, other_host) = other;
    if !running(other_host).await.contains(&"db".to_string()) {
        assert!(!bed.local_of(other_name).join("data.raw").exists());
    }
    assert!(!bed.local_of(host).join("shared.raw").exists());
    assert_eq!(std::fs::read(&shared).unwrap(), vec![0x5au8; 1 << 20]);
}

/// A migration's end on the drained host wakes the controller (the
/// agent's `watch`), so the next guest goes then, not at the next tick:
/// with a minute between ticks and one migration at a time, three guests
/// move within seconds.
#[tokio::test]
async fn a_migration_s_end_admits_the_next_at_once_not_at_the_next_tick() {
    let bed = TestBed::simulated().await;
    let etcd = Etcd::start(&bed).await;
    let guests = &IDLE_GUESTS[..3];
    let (a, b, c) = cluster_of_three(&bed, &etcd, "100", guests).await;
    let _controller = Controller::start(
        &bed,
        &etcd,
        "c1",
        &["--lease", "2", "--tick-ms", "60000", "--max-outbound", "1"],
    );

    let out = livemig(&bed, &etcd, &["drain", "agent-a", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    wait_until(
        Duration::from_secs(30),
        "the drain done, well within its first tick",
        || async {
            let out = livemig(&bed, &etcd, &["drains", "--json"]);
            let drains: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).ok()?;
            (drains.first()?["state"] == "done").then_some(())
        },
    )
    .await;
    assert!(running(&a).await.is_empty());
    let mut moved = running(&b).await;
    moved.extend(running(&c).await);
    moved.sort();
    assert_eq!(moved, ["idle1", "idle2", "idle3"]);
}
