//! `watch`: every job on this agent as it goes, streamed on the
//! connection that asked — its phase, progress and actions twice a second
//! while it runs, then its record as soon as it ends — for any client that
//! may read (the CLI that started a migration is not the only one that can
//! follow it).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use domain::DomainName;
use protocol::codec::{read_message, write_message};
use protocol::envelope::{RequestEnvelope, ResponseEnvelope, ResponseResult};
use protocol::{Reply, WatchEvent, PROTOCOL_VERSION};
use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio::sync::broadcast;

use crate::state::Agent;

/// How often running jobs are reported.
const INTERVAL: Duration = Duration::from_millis(500);

/// Streams events answering request `id` until the client sends anything
/// or hangs up, or a write does not go through in time.
pub(crate) async fn serve<R, W>(
    agent: &Arc<Agent>,
    domain: Option<DomainName>,
    id: u64,
    reader: &mut BufReader<R>,
    write: &mut W,
) where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut running: BTreeSet<String> = BTreeSet::new();
    let mut tick = tokio::time::interval(INTERVAL);
    let mut job_ends = agent.table.job_ends();
    loop {
        let mut ended: Vec<String> = Vec::new();
        tokio::select! {
            _ = tick.tick() => {}
            // A job's end is told at once, not at the next tick.
            heard = job_ends.recv() => match heard {
                Ok(end) => ended.extend(of_this_watch(end, domain.as_ref())),
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            },
            // Anything from the client (or its hanging up) ends the watch.
            _ = read_message::<_, RequestEnvelope>(reader) => return,
        }
        // Every end sent so far, before the table is read: a job gone
        // from the table has been sent, so each end is told once, that of
        // a job that began and ended between two looks too.
        loop {
            match job_ends.try_recv() {
                Ok(end) => ended.extend(of_this_watch(end, domain.as_ref())),
                Err(broadcast::error::TryRecvError::Lagged(_)) => {}
                Err(_) => break,
            }
        }
        let mut events = Vec::new();
        let mut now = BTreeSet::new();
        for view in agent.table.all() {
            if domain.as_ref().is_some_and(|d| *d != view.name) {
                continue;
            }
            if let Some(job) = &view.job {
                now.insert(job.id().to_string());
                events.push(WatchEvent::Progress {
                    job: Box::new(job.info()),
                });
            }
        }
        // The ends heard of, and jobs gone since the last look that were
        // not (a watch that fell behind): their records (written before a
        // job leaves the table).
        for id in &ended {
            running.remove(id);
        }
        let gone: Vec<String> = running.difference(&now).cloned().collect();
        for ended in ended.iter().chain(&gone) {
            match agent.history.load(ended).await {
                Ok(Some(record)) => events.push(WatchEvent::Ended {
                    record: Box::new(record),
                }),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(job = %ended, error = %crate::errors::chain(&e), "watch: no record")
                }
            }
        }
        running = now;
        for event in events {
            let response = ResponseEnvelope {
                version: PROTOCOL_VERSION,
                id,
                result: ResponseResult::Ok(Reply::Watch(Box::new(event))),
            };
            let written = tokio::time::timeout(
                agent.config.timeouts.client_write,
                write_message(write, &response),
            )
            .await;
            if !matches!(written, Ok(Ok(()))) {
                return;
            }
        }
    }
}

/// The id of a job that ended, if this watch follows its domain.
fn of_this_watch(end: (DomainName, String), domain: Option<&DomainName>) -> Option<String> {
    let (name, id) = end;
    domain.is_none_or(|d| *d == name).then_some(id)
}
