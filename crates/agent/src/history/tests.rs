use protocol::job::{JobStats, JobStatus, Phase, Role};

use super::*;

fn record(id: &str, domain: &str, finished: u64) -> JobRecord {
    JobRecord {
        id: id.into(),
        domain: domain.into(),
        source: "tcp://a:1".into(),
        destination: "tcp://b:1".into(),
        status: JobStatus::Completed,
        error: None,
        flags: vec!["live".into()],
        auto_converge: false,
        total_time_ms: 1000,
        setup_time_ms: Some(5),
        downtime_ms: Some(12),
        transferred_bytes: 1 << 20,
        iterations: 3,
        max_cpu_throttle_pct: 97.5,
        converge: protocol::ConvergeMode::Adaptive,
        actions: vec![TimedAction {
            t_ms: 400,
            action: ActionKind::Throttle,
            value: Some(97.5),
            detail: "why".into(),
        }],
        phase: Phase::Done,
        started_at_ms: finished - 1000,
        finished_at_ms: finished,
        data_uri: None,
        recovery: None,
        role: Role::Source,
        stats: JobStats::default(),
        phases: Vec::new(),
        first_byte_ms: None,
        predicted_total_ms: Some(9_000),
        predicted_worst_total_ms: None,
        samples: vec![
            Sample {
                t_ms: 250,
                status: "active".into(),
                remaining_bytes: 10,
                ..Default::default()
            },
            Sample {
                t_ms: 500,
                status: "active".into(),
                remaining_bytes: 5,
                throttle_pct: 97.5,
                ..Default::default()
            },
        ],
        peer: Some("agent-b".into()),
    }
}

#[tokio::test]
async fn a_job_round_trips_with_its_timeline() {
    let dir = tempfile::tempdir().unwrap();
    let history = History::open(&dir.path().join("h.db")).unwrap();
    let job = record("j1", "web", 5000);
    history.save(&job).await.unwrap();
    assert_eq!(history.load("j1").await.unwrap(), Some(job));
    assert_eq!(history.load("nope").await.unwrap(), None);
}

#[tokio::test]
async fn history_survives_reopening_and_lists_newest_first() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("h.db");
    {
        let history = History::open(&path).unwrap();
        history.save(&record("old", "web", 1000)).await.unwrap();
        history.save(&record("new", "web", 9000)).await.unwrap();
        history.save(&record("other", "db", 5000)).await.unwrap();
    }
    let history = History::open(&path).unwrap();
    let all: Vec<String> = history
        .list(None, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|j| j.id)
        .collect();
    assert_eq!(all, ["new", "other", "old"]);
    let web = history.list(Some("web".into()), 1).await.unwrap();
    assert_eq!(web.len(), 1);
    assert_eq!(web[0].id, "new");
    // Read from the record's JSON: no schema change for it.
    assert_eq!(web[0].predicted_total_ms, Some(9_000));
}

#[tokio::test]
async fn saving_again_replaces_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let history = History::open(&dir.path().join("h.db")).unwrap();
    let mut job = record("j", "web", 1000);
    history.save(&job).await.unwrap();
    job.status = JobStatus::Failed;
    job.samples.truncate(1);
    history.save(&job).await.unwrap();
    assert_eq!(history.load("j").await.unwrap(), Some(job));
}

#[test]
fn a_database_from_a_newer_livemig_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("h.db");
    drop(History::open(&path).unwrap());
    let conn = Connection::open(&path).unwrap();
    conn.execute("UPDATE schema_version SET version = 99", [])
        .unwrap();
    drop(conn);
    assert!(matches!(
        History::open(&path),
        Err(HistoryError::TooNew { found: 99, .. })
    ));
}

#[tokio::test]
async fn a_database_from_before_the_disk_samples_is_brought_up_to_date() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("h.db");
    // The first schema, with a job and a sample in it.
    let mut conn = Connection::open(&path).unwrap();
    conn.execute_batch(
        "CREATE TABLE schema_version (version INTEGER NOT NULL);\
         INSERT INTO schema_version (version) VALUES (1);",
    )
    .unwrap();
    conn.execute_batch(MIGRATIONS[0]).unwrap();
    let old = record("old", "web", 1000);
    let tx = conn.transaction().unwrap();
    tx.execute(
        "INSERT INTO jobs (id, domain, role, status, started_at_ms, finished_at_ms, \
         total_time_ms, max_throttle_pct, converge, record) \
         VALUES ('old', 'web', 'source', 'completed', 0, 1000, 1000, 0, 'plain', ?1)",
        [serde_json::to_string(&JobRecord {
            samples: Vec::new(),
            actions: Vec::new(),
            ..old.clone()
        })
        .unwrap()],
    )
    .unwrap();
    tx.execute(
        "INSERT INTO samples (job_id, t_ms, status, pass, remaining_bytes, \
         transferred_bytes, bandwidth_mib_s, dirty_rate_mib_s, throttle_pct) \
         VALUES ('old', 250, 'active', 1, 10, 20, 1.0, 2.0, 0.0)",
        [],
    )
    .unwrap();
    tx.commit().unwrap();
    drop(conn);

    let history = History::open(&path).unwrap();
    let loaded = history.load("old").await.unwrap().unwrap();
    assert_eq!(loaded.samples.len(), 1);
    assert_eq!(loaded.samples[0].remaining_bytes, 10);
    assert_eq!(loaded.samples[0].disk_remaining_bytes, None);
    // New jobs keep their disks' figures.
    let mut job = record("new", "web", 2000);
    job.samples[0].disk_remaining_bytes = Some(4096);
    job.samples[0].disk_dirty_rate_mib_s = Some(1.5);
    history.save(&job).await.unwrap();
    assert_eq!(history.load("new").await.unwrap(), Some(job));
}
