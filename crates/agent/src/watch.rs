//! `watch`: every job on this agent as it goes, streamed on the
//! connection that asked — its phase, progress and actions twice a second
//! (`watch-interval`) while it runs and as soon as it switches to
//! post-copy, then its record as soon as it ends — for any client that may
//! read (the CLI that started a migration is not the only one that can
//! follow it).

use std::collections::BTreeSet;
use std::sync::Arc;

use domain::DomainName;
use protocol::codec::{read_message, write_message};
use protocol::envelope::{RequestEnvelope, ResponseEnvelope, ResponseResult};
use protocol::{Reply, WatchEvent, PROTOCOL_VERSION};
use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio::sync::broadcast;

use crate::state::Agent;
use crate::table::{JobNews, JobNewsKind};

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
    let mut tick = tokio::time::interval(agent.config.timeouts.watch_interval);
    let mut news = agent.table.job_news();
    loop {
        let mut ended: Vec<String> = Vec::new();
        tokio::select! {
            _ = tick.tick() => {}
            // A job's end, or its switch to post-copy, is told at once,
            // not at the next tick: a drain's controller acts on both.
            heard = news.recv() => match heard {
                Ok(news) => ended.extend(ended_here(news, domain.as_ref())),
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
            match news.try_recv() {
                Ok(news) => ended.extend(ended_here(news, domain.as_ref())),
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

/// The id of a job that ended, if this watch follows its domain (a
/// switch to post-copy is told by the progress the table gives).
fn ended_here(news: JobNews, domain: Option<&DomainName>) -> Option<String> {
    let ours = domain.is_none_or(|d| *d == news.domain);
    (ours && news.kind == JobNewsKind::Ended).then_some(news.job_id)
}
