//! `watch [DOMAIN]`: follows every job on an agent as it goes, whoever
//! started it: a line per job a second while it runs (its phase, pass and
//! how far it is, which never runs backwards), and its outcome when it
//! ends; with `--json`, the agent's events as NDJSON.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use protocol::{Client, WatchEvent};

use crate::progress::Completion;

/// How often a running job's line is printed.
const LINE_INTERVAL: Duration = Duration::from_secs(1);

/// What is shown of one job so far.
#[derive(Default)]
struct Shown {
    completion: Completion,
    last: Option<Instant>,
}

/// One event as a line, or none when it is too soon for another.
fn line(event: &WatchEvent, jobs: &mut BTreeMap<String, Shown>) -> Option<String> {
    match event {
        WatchEvent::Progress { job } => {
            let shown = jobs.entry(job.id.clone()).or_default();
            let s = &job.stats;
            let done = shown
                .completion
                .next(s.memory_processed_bytes, s.memory_remaining_bytes);
            if shown.last.is_some_and(|t| t.elapsed() < LINE_INTERVAL) {
                return None;
            }
            shown.last = Some(Instant::now());
            Some(format!(
                "{}  {}  {}  phase {}  pass {}  {:3.0} %  throttle {:.1} %",
                job.domain,
                job.role,
                job.id,
                job.phase,
                s.iteration.unwrap_or(0),
                100.0 * done,
                job.throttle_pct,
            ))
        }
        WatchEvent::Ended { record } => {
            jobs.remove(&record.id);
            let downtime = record
                .downtime_ms
                .map(|d| format!(", downtime {d} ms"))
                .unwrap_or_default();
            let error = record
                .error
                .as_ref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default();
            Some(format!(
                "{}  {}  {}  {} in {:.1} s{downtime}{error}",
                record.domain,
                record.role,
                record.id,
                record.status,
                record.total_time_ms as f64 / 1000.0
            ))
        }
    }
}

/// Runs until the agent closes the connection (or the user interrupts).
///
/// # Errors
/// The agent refused (a role that may not read) or the connection broke.
pub async fn run(client: &Client, domain: Option<&str>, json: bool) -> Result<ExitCode> {
    let domain = domain
        .map(|d| d.parse())
        .transpose()
        .context("bad domain name")?;
    let mut jobs = BTreeMap::new();
    let mut out = std::io::stdout();
    client
        .watch(domain, |event| {
            let text = if json {
                serde_json::to_string(&event).ok()
            } else {
                line(&event, &mut jobs)
            };
            match text {
                Some(text) => writeln!(out, "{text}").and_then(|()| out.flush()).is_ok(),
                None => true,
            }
        })
        .await?;
    Ok(ExitCode::SUCCESS)
}
