//! Job history in SQLite (`STATE_DIR/history.db`, WAL, synchronous writes).
//!
//! Each finished job is one row in `jobs` (with the record as JSON for
//! fields added later), its timeline in `samples` (one per poll) and its
//! actions in `events`, written in one transaction. The schema is
//! versioned: `schema_version` holds the version, and `MIGRATIONS` brings
//! an older database up to date on open.

use std::path::Path;
use std::sync::{Arc, Mutex};

use protocol::job::{ActionKind, JobRecord, JobSummary, Sample, TimedAction};
use rusqlite::{params, Connection, OptionalExtension};

/// Schema migrations; entry `i` takes the schema from version `i` to `i+1`.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    domain TEXT NOT NULL,
    role TEXT NOT NULL,
    status TEXT NOT NULL,
    started_at_ms INTEGER NOT NULL,
    finished_at_ms INTEGER NOT NULL,
    total_time_ms INTEGER NOT NULL,
    downtime_ms INTEGER,
    max_throttle_pct REAL NOT NULL,
    converge TEXT NOT NULL,
    error TEXT,
    record TEXT NOT NULL
);
CREATE INDEX jobs_by_domain ON jobs (domain, finished_at_ms);
CREATE TABLE samples (
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    t_ms INTEGER NOT NULL,
    status TEXT NOT NULL,
    pass INTEGER NOT NULL,
    remaining_bytes INTEGER NOT NULL,
    transferred_bytes INTEGER NOT NULL,
    bandwidth_mib_s REAL NOT NULL,
    dirty_rate_mib_s REAL NOT NULL,
    throttle_pct REAL NOT NULL,
    expected_downtime_ms INTEGER
);
CREATE INDEX samples_by_job ON samples (job_id, t_ms);
CREATE TABLE events (
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    t_ms INTEGER NOT NULL,
    action TEXT NOT NULL,
    value REAL,
    detail TEXT NOT NULL
);
CREATE INDEX events_by_job ON events (job_id, t_ms);
"#,
    r#"
ALTER TABLE samples ADD COLUMN disk_remaining_bytes INTEGER;
ALTER TABLE samples ADD COLUMN disk_dirty_rate_mib_s REAL;
"#,
];

#[derive(Debug, thiserror::Error)]
/// Why the history could not be read or written.
pub enum HistoryError {
    #[error("job history database error")]
    /// SQLite failed.
    Sqlite(#[from] rusqlite::Error),
    #[error(
        "job history database is from a newer livemig (schema {found}, this one knows {known})"
    )]
    /// A database from a newer livemig.
    TooNew {
        /// Its schema version.
        found: i64,
        /// The newest this livemig knows.
        known: i64,
    },
    #[error("job history task failed")]
    /// The blocking task died.
    Task(#[from] tokio::task::JoinError),
    #[error("job record does not serialize")]
    /// A record that does not serialize.
    Json(#[from] serde_json::Error),
}

/// An action kind as stored; one this version does not know reads as
/// unknown.
fn action_kind(name: &str) -> ActionKind {
    serde_json::from_value(serde_json::Value::String(name.to_string()))
        .unwrap_or(ActionKind::Unknown)
}

/// The job history of one agent.
#[derive(Debug, Clone)]
pub struct History {
    conn: Arc<Mutex<Connection>>,
}

fn migrate(conn: &mut Connection) -> Result<(), HistoryError> {
    conn.execute_batch("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")?;
    let version: i64 = conn
        .query_row("SELECT version FROM schema_version", [], |r| r.get(0))
        .optional()?
        .unwrap_or(0);
    let known = MIGRATIONS.len() as i64;
    if version > known {
        return Err(HistoryError::TooNew {
            found: version,
            known,
        });
    }
    for (i, step) in MIGRATIONS.iter().enumerate().skip(version as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(step)?;
        tx.execute("DELETE FROM schema_version", [])?;
        tx.execute(
            "INSERT INTO schema_version (version) VALUES (?1)",
            [i as i64 + 1],
        )?;
        tx.commit()?;
        tracing::info!(version = i + 1, "job history schema migrated");
    }
    Ok(())
}

impl History {
    /// Opens (creating and migrating as needed) the database at `path`.
    ///
    /// # Errors
    /// [`HistoryError`] if it cannot be opened or is from a newer schema.
    pub fn open(path: &Path) -> Result<History, HistoryError> {
        let mut conn = Connection::open(path)?;
        // WAL: readers never block the writer; FULL: a committed job
        // survives a power cut (Finish relies on it).
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        migrate(&mut conn)?;
        Ok(History {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, HistoryError> + Send + 'static,
    ) -> Result<T, HistoryError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || f(&mut conn.lock().expect("history lock"))).await?
    }

    /// Stores a finished job (replacing an earlier version of it).
    ///
    /// # Errors
    /// [`HistoryError`] if the transaction fails; nothing is written then.
    pub async fn save(&self, record: &JobRecord) -> Result<(), HistoryError> {
        let record = record.clone();
        let mut slim = record.clone();
        slim.samples.clear();
        slim.actions.clear();
        let json = serde_json::to_string(&slim)?;
        self.with(move |conn| {
            let tx = conn.transaction()?;
            tx.execute("DELETE FROM jobs WHERE id = ?1", [&record.id])?;
            tx.execute(
                "INSERT INTO jobs (id, domain, role, status, started_at_ms, finished_at_ms, \
                 total_time_ms, downtime_ms, max_throttle_pct, converge, error, record) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                params![
                    record.id,
                    record.domain,
                    serde_json::to_value(record.role)?
                        .as_str()
                        .unwrap_or_default(),
                    record.status.to_string(),
                    record.started_at_ms as i64,
                    record.finished_at_ms as i64,
                    record.total_time_ms as i64,
                    record.downtime_ms.map(|d| d as i64),
                    record.max_cpu_throttle_pct,
                    record.converge.name(),
                    record.error,
                    json,
                ],
            )?;
            {
                let mut insert = tx.prepare(
                    "INSERT INTO samples (job_id, t_ms, status, pass, remaining_bytes, \
                     transferred_bytes, bandwidth_mib_s, dirty_rate_mib_s, throttle_pct, \
                     expected_downtime_ms, disk_remaining_bytes, disk_dirty_rate_mib_s) \
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
                )?;
                for s in &record.samples {
                    insert.execute(params![
                        record.id,
                        s.t_ms as i64,
                        s.status,
                        s.pass as i64,
                        s.remaining_bytes as i64,
                        s.transferred_bytes as i64,
                        s.bandwidth_mib_s,
                        s.dirty_rate_mib_s,
                        s.throttle_pct,
                        s.expected_downtime_ms.map(|d| d as i64),
                        s.disk_remaining_bytes.map(|b| b as i64),
                        s.disk_dirty_rate_mib_s,
                    ])?;
                }
                let mut insert = tx.prepare(
                    "INSERT INTO events (job_id, t_ms, action, value, detail) \
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                )?;
                for a in &record.actions {
                    insert.execute(params![
                        record.id,
                        a.t_ms as i64,
                        a.action.name(),
                        a.value,
                        a.detail
                    ])?;
                }
            }
            tx.commit()?;
            Ok(())
        })
        .await
    }

    /// A job by id, with its timeline and actions.
    pub async fn load(&self, id: &str) -> Result<Option<JobRecord>, HistoryError> {
        let id = id.to_string();
        self.with(move |conn| {
            let Some(json): Option<String> = conn
                .query_row("SELECT record FROM jobs WHERE id = ?1", [&id], |r| r.get(0))
                .optional()?
            else {
                return Ok(None);
            };
            let mut record: JobRecord = serde_json::from_str(&json)?;
            let mut stmt = conn.prepare(
                "SELECT t_ms, status, pass, remaining_bytes, transferred_bytes, bandwidth_mib_s, \
                 dirty_rate_mib_s, throttle_pct, expected_downtime_ms, disk_remaining_bytes, \
                 disk_dirty_rate_mib_s FROM samples \
                 WHERE job_id = ?1 ORDER BY t_ms",
            )?;
            record.samples = stmt
                .query_map([&id], |r| {
                    Ok(Sample {
                        t_ms: r.get::<_, i64>(0)? as u64,
                        status: r.get(1)?,
                        pass: r.get::<_, i64>(2)? as u64,
                        remaining_bytes: r.get::<_, i64>(3)? as u64,
                        transferred_bytes: r.get::<_, i64>(4)? as u64,
                        bandwidth_mib_s: r.get(5)?,
                        dirty_rate_mib_s: r.get(6)?,
                        throttle_pct: r.get(7)?,
                        expected_downtime_ms: r.get::<_, Option<i64>>(8)?.map(|d| d as u64),
                        disk_remaining_bytes: r.get::<_, Option<i64>>(9)?.map(|b| b as u64),
                        disk_dirty_rate_mib_s: r.get(10)?,
                    })
                })?
                .collect::<Result<_, _>>()?;
            let mut stmt = conn.prepare(
                "SELECT t_ms, action, value, detail FROM events WHERE job_id = ?1 ORDER BY rowid",
            )?;
            record.actions = stmt
                .query_map([&id], |r| {
                    Ok(TimedAction {
                        t_ms: r.get::<_, i64>(0)? as u64,
                        action: action_kind(&r.get::<_, String>(1)?),
                        value: r.get(2)?,
                        detail: r.get(3)?,
                    })
                })?
                .collect::<Result<_, _>>()?;
            Ok(Some(record))
        })
        .await
    }

    /// The most recent jobs, newest first, optionally of one domain.
    pub async fn list(
        &self,
        domain: Option<String>,
        limit: u32,
    ) -> Result<Vec<JobSummary>, HistoryError> {
        self.with(move |conn| {
            let mut stmt = conn.prepare(
                "SELECT id, domain, role, status, started_at_ms, total_time_ms, downtime_ms, \
                 max_throttle_pct, converge, error, \
                 json_extract(record, '$.predicted_total_ms') FROM jobs \
                 WHERE ?1 IS NULL OR domain = ?1 ORDER BY finished_at_ms DESC LIMIT ?2",
            )?;
            let rows = stmt
                .query_map(params![domain, limit], |r| {
                    Ok(JobSummary {
                        id: r.get(0)?,
                        domain: r.get(1)?,
                        role: r.get(2)?,
                        status: r.get(3)?,
                        started_at_ms: r.get::<_, i64>(4)? as u64,
                        total_time_ms: r.get::<_, i64>(5)? as u64,
                        downtime_ms: r.get::<_, Option<i64>>(6)?.map(|d| d as u64),
                        max_throttle_pct: r.get(7)?,
                        converge: r.get(8)?,
                        error: r.get(9)?,
                        predicted_total_ms: r.get::<_, Option<i64>>(10)?.map(|p| p as u64),
                    })
                })?
                .collect::<Result<_, _>>()?;
            Ok(rows)
        })
        .await
    }
}

#[cfg(test)]
mod tests;
