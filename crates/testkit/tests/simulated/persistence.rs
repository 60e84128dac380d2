//! Definitions and job records on disk.

use guest::Workload;
use protocol::domain::DomainState;
use protocol::job::JobStatus;
use protocol::MigrateOptions;
use protocol::Request;
use testkit::TestBed;

#[tokio::test]
async fn definitions_survive_an_agent_restart() {
    let bed = TestBed::simulated().await;
    let mut a = bed.host("a").await;
    let web = bed.definition("web", 64, Workload::IDLE);
    let db = bed.definition("db", 96, Workload::busy(8, 50_000));
    a.request(testkit::define(&web.clone())).await.unwrap();
    a.define_and_start(db.clone()).await;

    a.restart().await;

    let names: Vec<(String, DomainState)> = a
        .list_all()
        .await
        .into_iter()
        .map(|d| (d.name, d.state))
        .collect();
    assert_eq!(
        names,
        [
            ("db".to_string(), DomainState::ShutOff),
            ("web".to_string(), DomainState::ShutOff)
        ]
    );
    let info = a.dominfo("db").await.unwrap();
    assert_eq!(info.memory_mib, 96);
    assert!(info.persistent);
    // The restored definition boots.
    a.request(Request::Start {
        domain: "db".parse().unwrap(),
        paused: false,
    })
    .await
    .unwrap();
    let log = a.wait_guest_progress("db", 2).await;
    assert!(log.memory_intact());
}

#[tokio::test]
async fn undefine_removes_the_definition_for_good() {
    let bed = TestBed::simulated().await;
    let mut a = bed.host("a").await;
    a.request(testkit::define(&bed.definition("web", 64, Workload::IDLE)))
        .await
        .unwrap();

    let out = a.cli(&["undefine", "web"]);
    assert!(out.status.success());
    a.restart().await;

    assert!(a.list_all().await.is_empty());
}

#[tokio::test]
async fn persistent_migration_with_undefine_source_moves_the_definition() {
    let bed = TestBed::simulated().await;
    let a = bed.host("a").await;
    let mut b = bed.host("b").await;
    a.define_and_start(bed.definition("web", 64, Workload::IDLE))
        .await;

    let record = a
        .migrate(
            "web",
            &b,
            MigrateOptions {
                live: true,
                persistent: true,
                undefine_source: true,
                ..Default::default()
            },
        )
        .await;

    assert_eq!(record.status, JobStatus::Completed, "{record:?}");
    assert!(
        a.dominfo("web").await.is_err(),
        "the source forgot the domain"
    );
    assert!(!a.state_dir().join("domains/web.toml").exists());
    let info = b.dominfo("web").await.unwrap();
    assert!(info.persistent);
    assert_eq!(info.state, DomainState::Running);

    // The record is kept on both sides and shown by domjobinfo --completed.
    let out = b.cli(&["domjobinfo", "--completed", "web"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Incoming migration") && text.contains(&record.id),
        "{text}"
    );
    let out = a.cli(&["job", &record.id, "--json"]);
    let saved: protocol::job::JobRecord = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(saved, record);

    b.restart().await;
    assert_eq!(b.state("web").await, Some(DomainState::ShutOff));
}

/// A destination agent killed after a migration finished there adopts a
/// guest that runs (not a migration to wait for, torn down at the orphan
/// timeout), whether or not it lived to rewrite the run record.
#[tokio::test]
async fn a_destination_agent_killed_after_a_migration_keeps_the_guest_running() {
    let bed = TestBed::simulated_with_agent_processes()
        .await
        .with_timeouts(&["orphan=2s"]);
    let (a, mut b, moved) = web_moved_for_good(&bed).await;
    let pids = b.qemu_pids();
    assert_eq!(pids.len(), 1);

    b.crash();
    b.start_again().await;
    guest_runs_on_past_the_orphan_timeout(&b, &pids).await;

    // Killed after Finish answered but before the run record lost the
    // job: the job record, saved before the answer, settles it.
    b.crash();
    let was = name_the_migration_again(&b, &a, &moved);
    assert!(was.is_null(), "{was}");
    b.start_again().await;
    guest_runs_on_past_the_orphan_timeout(&b, &pids).await;
}

#[tokio::test]
async fn a_destination_agent_killed_before_it_resumed_the_guest_resumes_it_when_the_source_says_done(
) {
    let bed = TestBed::simulated_with_agent_processes()
        .await
        .with_timeouts(&["orphan=2s"]);
    let (a, mut b, moved) = web_moved_for_good(&bed).await;
    let pids = b.qemu_pids();

    // The agent dies with the data landed and the source done, before its
    // Finish resumed the guest and wrote anything down: the guest is
    // paused, the run record still names the migration, the history does
    // not have it. The source, asked, says the job completed: the only
    // copy is here, and it must run, not wait out the orphan timeout.
    b.qmp("web", "stop").await.expect("stop");
    b.crash();
    name_the_migration_again(&b, &a, &moved);
    let history = rusqlite::Connection::open(b.state_dir().join("history.db")).unwrap();
    for table in ["samples", "events"] {
        history
            .execute(
                &format!("DELETE FROM {table} WHERE job_id = ?1"),
                [&moved.record.id],
            )
            .unwrap();
    }
    let deleted = history
        .execute("DELETE FROM jobs WHERE id = ?1", [&moved.record.id])
        .unwrap();
    assert_eq!(deleted, 1, "the destination had recorded the job");
    drop(history);

    b.start_again().await;
    guest_runs_on_past_the_orphan_timeout(&b, &pids).await;
}

/// A migration that completed: its record and the options it ran with.
struct Moved {
    record: protocol::job::JobRecord,
    options: MigrateOptions,
}

/// "web" started on a and migrated live to b for good (defined there,
/// undefined on a).
async fn web_moved_for_good(bed: &TestBed) -> (testkit::Host, testkit::Host, Moved) {
    let a = bed.host("a").await;
    let b = bed.host("b").await;
    a.define_and_start(bed.definition("web", 64, Workload::busy(4, 20_000)))
        .await;
    let options = MigrateOptions {
        live: true,
        persistent: true,
        undefine_source: true,
        ..Default::default()
    };
    let record = a.migrate("web", &b, options.clone()).await;
    assert_eq!(record.status, JobStatus::Completed, "{record:?}");
    (a, b, Moved { record, options })
}

/// Writes b's run record of "web" back as an incoming migration from a
/// (b's agent down): what an agent killed before Finish rewrote it
/// leaves. Returns what the record said instead.
fn name_the_migration_again(
    b: &testkit::Host,
    a: &testkit::Host,
    Moved { record, options }: &Moved,
) -> serde_json::Value {
    let run = b.state_dir().join("run/web.json");
    let mut kept: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&run).unwrap()).unwrap();
    let was = kept["incoming"].take();
    kept["incoming"] = serde_json::json!({
        "id": record.id,
        "peer": a.uri(),
        "flags": options,
        "started_at_ms": record.started_at_ms,
        "created_domain": true,
        "peer_name": "agent-a",
    });
    std::fs::write(&run, serde_json::to_vec(&kept).unwrap()).unwrap();
    was
}

async fn guest_runs_on_past_the_orphan_timeout(b: &testkit::Host, pids: &[u32]) {
    tokio::time::sleep(std::time::Duration::from_secs(4)).await;
    let info = b.dominfo("web").await.unwrap();
    assert_eq!(info.state, DomainState::Running);
    assert!(info.active_job.is_none(), "{info:?}");
    assert_eq!(b.qemu_pids(), pids, "the same QEMU runs the guest");
    let log = b.wait_guest_progress("web", 2).await;
    assert!(log.memory_intact());
}

#[tokio::test]
async fn offline_migration_moves_only_the_definition() {
    let bed = TestBed::simulated().await;
    let a = bed.host("a").await;
    let b = bed.host("b").await;
    a.request(testkit::define(&bed.definition("cold", 64, Workload::IDLE)))
        .await
        .unwrap();

    let record = a
        .migrate(
            "cold",
            &b,
            MigrateOptions {
                offline: true,
                persistent: true,
                undefine_source: true,
                ..Default::default()
            },
        )
        .await;

    assert_eq!(record.status, JobStatus::Completed, "{record:?}");
    assert!(a.dominfo("cold").await.is_err());
    let info = b.dominfo("cold").await.unwrap();
    assert_eq!(info.state, DomainState::ShutOff);
    assert!(info.persistent);
    assert!(b.qemu_pids().is_empty());
}

#[tokio::test]
async fn kill_9_while_writing_definitions_leaves_old_or_new_never_torn() {
    let bed = TestBed::simulated_with_agent_processes().await;
    let mut a = bed.host("a").await;
    for round in 0..12u32 {
        // Redefine in a tight loop on one connection, and kill the agent
        // at a different moment each round.
        let uri: protocol::AgentUri = a.local_uri().parse().unwrap();
        let kernel = bed.kernel().to_path_buf();
        let writer = tokio::spawn(async move {
            let client = protocol::Client::connect(&uri).await.unwrap();
            for i in 0.. {
                let name = format!("d{}", i % 5);
                let memory = 64 + (i % 7) * 16;
                let definition = domain::DomainDefinition::from_toml(&format!(
                    "name = \"{name}\"\nmemory_mib = {memory}\n[kernel]\npath = {:?}\n",
                    kernel.display().to_string()
                ))
                .unwrap();
                if client
                    .request(
                        testkit::define(&definition),
                        std::time::Duration::from_secs(5),
                    )
                    .await
                    .is_err()
                {
                    return i;
                }
            }
            unreachable!()
        });
        tokio::time::sleep(std::time::Duration::from_millis(30 + 17 * u64::from(round))).await;
        a.crash();
        let writes = writer.await.unwrap();
        a.start_again().await;

        // Every definition on disk parses; the agent skipped none.
        for entry in std::fs::read_dir(a.state_dir().join("domains"))
            .unwrap()
            .flatten()
        {
            let text = std::fs::read_to_string(entry.path()).unwrap();
            assert!(
                domain::DomainDefinition::from_toml(&text).is_ok(),
                "round {round}: torn file {}: {text:?}",
                entry.path().display()
            );
        }
        let log = std::fs::read_to_string(a.state_dir().join("livemigd.log")).unwrap();
        assert!(
            !log.contains("unreadable definition skipped"),
            "round {round}"
        );
        assert!(writes > 0 || round == 0);
        assert!(a.list_all().await.len() <= 5);
    }
}
