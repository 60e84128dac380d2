//! Drains that meet faults: a destination that refuses its guests (they
//! go to another host), the drained host's agent killed mid-drain (its
//! guests never start elsewhere behind its back; the drain finishes once
//! it is back), a destination's agent killed mid-drain (the guests wait
//! for it and go there once it is back), etcd frozen or killed and restarted mid-drain (what runs
//! finishes, nothing new starts until it answers). In every case each guest ends up running
//! exactly once.

use std::time::Duration;

use testkit::controller::Controller;
use testkit::etcd::Etcd;
use testkit::{wait_until, TestBed};

use super::drain::{all_moved_off_a, hosts_registered, livemig, mix, running, stdout};

fn drains(bed: &TestBed, etcd: &Etcd) -> Vec<serde_json::Value> {
    let out = livemig(bed, etcd, &["drains", "--json"]);
    serde_json::from_slice(&out.stdout).unwrap_or_default()
}

/// Follows the drain to its end; its report.
fn report(bed: &TestBed, etcd: &Etcd, id: &str) -> serde_json::Value {
    let out = livemig(bed, etcd, &["drain", "--watch", id, "--json"]);
    let last = stdout(&out).lines().last().unwrap_or_default().to_string();
    serde_json::from_str(&last).unwrap_or_else(|_| panic!("{out:?}"))
}

/// Waits until the drain has a guest whose migration runs.
async fn wait_guest_moving(bed: &TestBed, etcd: &Etcd) {
    wait_until(Duration::from_secs(60), "a guest to be moving", || async {
        drains(bed, etcd)
            .first()?
            .get("guests")?
            .as_array()?
            .iter()
            .any(|g| g["state"] == "migrating" && g["job_id"].is_string())
            .then_some(())
    })
    .await;
}

fn start_drain(bed: &TestBed, etcd: &Etcd) -> String {
    let out = livemig(bed, etcd, &["drain", "agent-a", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let record: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    record["id"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn a_destination_that_refuses_its_guests_sends_them_to_another_host() {
    let bed = TestBed::simulated().await;
    let etcd = Etcd::start(&bed).await;
    let cluster = ["--cluster", etcd.endpoint.as_str(), "--link", "100"];
    let a = bed.host_args("a", &cluster).await;
    // b takes no guest from a peer: every migration there fails.
    let mut refusing = cluster.to_vec();
    refusing.extend(["--peer-max-memory", "1"]);
    let b = bed.host_args("b", &refusing).await;
    let c = bed.host_args("c", &cluster).await;
    for (name, workload) in mix() {
        a.define_and_start(bed.definition(name, 64, workload)).await;
    }
    hosts_registered(&bed, &etcd, 3).await;
    let _controller = Controller::start(&bed, &etcd, "c1", &["--lease", "2"]);

    let id = start_drain(&bed, &etcd);
    let report = report(&bed, &etcd, &id);
    let drain = &report["drain"];
    assert_eq!(drain["state"], "done", "{drain}");
    let guests = drain["guests"].as_array().unwrap();
    for g in guests {
        assert_eq!(g["destination"], "agent-c", "{g}");
    }
    // Those placed on b first say why they did not stay there.
    let refused: Vec<&serde_json::Value> = guests
        .iter()
        .filter(|g| !g["failures"].as_array().unwrap().is_empty())
        .collect();
    assert!(!refused.is_empty(), "{drain}");
    for g in refused {
        let failure = g["failures"][0].as_str().unwrap();
        assert!(failure.starts_with("agent-b: "), "{failure}");
    }
    assert!(running(&a).await.is_empty());
    assert!(running(&b).await.is_empty());
    assert_eq!(running(&c).await.len(), 4);
}

#[tokio::test]
async fn the_drained_hosts_agent_killed_mid_drain_loses_no_guest_and_the_drain_finishes() {
    let bed = TestBed::simulated().await;
    let etcd = Etcd::start(&bed).await;
    let (mut a, b, c) = super::drain::cluster_of_three_with(
        &bed,
        &etcd,
        "24",
        &mix(),
        &["--timeout", "cluster-lease=2s"],
    )
    .await;
    let _controller = Controller::start(&bed, &etcd, "c1", &["--lease", "2"]);
    let id = start_drain(&bed, &etcd);
    wait_guest_moving(&bed, &etcd).await;
    a.crash();
    // Its lease runs out; the controller waits for it, and no guest of a
    // starts anywhere else meanwhile.
    wait_until(
        Duration::from_secs(20),
        "the drain to wait for a",
        || async {
            let drains = drains(&bed, &etcd);
            let note = drains.first()?.get("note")?.as_str()?.to_string();
            note.contains("not registered").then_some(())
        },
    )
    .await;
    let elsewhere = running(&b).await.len() + running(&c).await.len();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        running(&b).await.len() + running(&c).await.len() <= elsewhere + 1,
        "guests started elsewhere while a was away"
    );

    a.start_again().await;
    let report = report(&bed, &etcd, &id);
    assert_eq!(report["drain"]["state"], "done", "{report}");
    all_moved_off_a(&bed, &etcd, &a, &b, &c, 4).await;
}

#[tokio::test]
async fn a_destination_agent_killed_mid_drain_takes_its_guests_once_it_is_back() {
    let bed = TestBed::simulated().await;
    let etcd = Etcd::start(&bed).await;
    let cluster = [
        "--cluster",
        etcd.endpoint.as_str(),
        "--link",
        "24",
        "--timeout",
        "cluster-lease=2s",
    ];
    let a = bed.host_args("a", &cluster).await;
    let mut b = bed.host_args("b", &cluster).await;
    for (name, workload) in mix() {
        a.define_and_start(bed.definition(name, 64, workload)).await;
    }
    hosts_registered(&bed, &etcd, 2).await;
    let _controller = Controller::start(&bed, &etcd, "c1", &["--lease", "2"]);
    let out = livemig(
        &bed,
        &etcd,
        &["drain", "agent-a", "--to", "agent-b", "--json"],
    );
    assert!(out.status.success(), "{out:?}");
    let id = serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    wait_guest_moving(&bed, &etcd).await;
    b.crash();
    // b's lease runs out: the drain's guests wait for a host, none fails.
    wait_until(
        Duration::from_secs(30),
        "a guest to wait for a host",
        || async {
            drains(&bed, &etcd)
                .first()?
                .get("guests")?
                .as_array()?
                .iter()
                .any(|g| g["blocked"]["why"].is_string())
                .then_some(())
        },
    )
    .await;
    let drain = drains(&bed, &etcd).remove(0);
    assert_eq!(drain["state"], "running", "{drain}");

    b.start_again().await;
    let report = report(&bed, &etcd, &id);
    let drain = &report["drain"];
    assert_eq!(drain["state"], "done", "{drain}");
    assert!(running(&a).await.is_empty());
    let mut on_b = running(&b).await;
    on_b.sort();
    let mut all: Vec<String> = mix().iter().map(|(n, _)| n.to_string()).collect();
    all.sort();
    assert_eq!(on_b, all, "every guest runs once, on b");
    let owners = super::drain::owners(&bed, &etcd);
    assert!(owners.values().all(|h| h == "agent-b"), "{owners:?}");
}

#[tokio::test]
async fn etcd_frozen_mid_drain_starts_nothing_new_and_the_drain_finishes_once_it_is_back() {
    let bed = TestBed::simulated().await;
    let etcd = Etcd::start(&bed).await;
    let (a, b, c) = super::drain::cluster_of_three(&bed, &etcd, "24", &mix()).await;
    let _controller = Controller::start(&bed, &etcd, "c1", &["--lease", "5"]);
    let id = start_drain(&bed, &etcd);
    wait_guest_moving(&bed, &etcd).await;
    etcd.pause();
    let frozen_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    tokio::time::sleep(Duration::from_secs(8)).await;
    // No migration began on a while etcd could not record it.
    let started_meanwhile = jobs_started_since(&a, frozen_at + 1000).await;
    etcd.resume();
    assert!(started_meanwhile.is_empty(), "{started_meanwhile:?}");

    let report = report(&bed, &etcd, &id);
    assert_eq!(report["drain"]["state"], "done", "{report}");
    all_moved_off_a(&bed, &etcd, &a, &b, &c, 4).await;
}

#[tokio::test]
async fn etcd_stopped_and_restarted_mid_drain_starts_nothing_new_and_the_drain_finishes() {
    let bed = TestBed::simulated().await;
    let mut etcd = Etcd::start(&bed).await;
    let (a, b, c) = super::drain::cluster_of_three(&bed, &etcd, "24", &mix()).await;
    let _controller = Controller::start(&bed, &etcd, "c1", &["--lease", "5"]);
    let id = start_drain(&bed, &etcd);
    wait_guest_moving(&bed, &etcd).await;
    etcd.stop();
    let stopped_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    tokio::time::sleep(Duration::from_secs(6)).await;
    let started_meanwhile = jobs_started_since(&a, stopped_at + 1000).await;
    etcd.start_again().await;
    assert!(started_meanwhile.is_empty(), "{started_meanwhile:?}");

    let report = report(&bed, &etcd, &id);
    assert_eq!(report["drain"]["state"], "done", "{report}");
    all_moved_off_a(&bed, &etcd, &a, &b, &c, 4).await;
}

/// Ids of a's outgoing jobs, finished or running, that began after
/// `since_ms`.
async fn jobs_started_since(a: &testkit::Host, since_ms: u64) -> Vec<String> {
    let mut ids: Vec<String> = a
        .call(protocol::call::Jobs {
            domain: None,
            limit: 100,
        })
        .await
        .unwrap()
        .into_iter()
        .filter(|j| j.started_at_ms > since_ms)
        .map(|j| j.id)
        .collect();
    for domain in a.list_all().await {
        let Ok(info) = a.dominfo(&domain.name).await else {
            continue;
        };
        let Some(id) = info.active_job else { continue };
        if let Ok(protocol::call::JobState::Active(job)) =
            a.call(protocol::call::Job { id: id.clone() }).await
        {
            if job.started_at_ms > since_ms {
                ids.push(id);
            }
        }
    }
    ids
}
