//! What wakes the leader between ticks: a migration ending on a drained
//! host's agent, or switching to post-copy, read from that agent's `watch`
//! stream. The next guest is then admitted, and the link re-split, as the
//! slot frees rather than up to a tick later: in the drain benchmark the
//! long guests waited 0.2–0.4 s for the tick after the short ones ended,
//! on the drain's critical path; and a guest in post-copy, which comes
//! first on its links, waits on the link for every page it lacks.
//!
//! The tick stays: it is what follows each job's progress, and what
//! steps a drain when a watch is down. A watch only ever wakes the
//! leader early.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use protocol::WatchEvent;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::survey::Agents;

/// How long a watch lasts before it is opened again: an agent that went
/// away without closing the connection is not waited on for ever.
const WATCH_FOR: Duration = Duration::from_secs(60);
/// How long to wait before watching again an agent that closed or
/// refused the watch.
const REWATCH_AFTER: Duration = Duration::from_secs(1);

/// Watches the agents of the hosts being drained.
pub(super) struct JobEnds {
    agents: Agents,
    ended: Arc<Notify>,
    watching: BTreeMap<String, Watch>,
}

/// One agent's watch, stopped when dropped.
struct Watch {
    uri: String,
    task: JoinHandle<()>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl JobEnds {
    pub(super) fn new(agents: Agents) -> JobEnds {
        JobEnds {
            agents,
            ended: Arc::new(Notify::new()),
            watching: BTreeMap::new(),
        }
    }

    /// Watches exactly these hosts' agents (host name → agent URI): new
    /// ones are watched, those no longer drained (or at a new URI) are
    /// left.
    pub(super) fn follow(&mut self, sources: &BTreeMap<String, String>) {
        self.watching
            .retain(|host, watch| sources.get(host) == Some(&watch.uri));
        for (host, uri) in sources {
            if self.watching.contains_key(host) {
                continue;
            }
            let task = tokio::spawn(watch_agent(
                self.agents.clone(),
                host.clone(),
                uri.clone(),
                Arc::clone(&self.ended),
            ));
            self.watching.insert(
                host.clone(),
                Watch {
                    uri: uri.clone(),
                    task,
                },
            );
        }
    }

    /// Waits until a job ends (or switches to post-copy) on a watched
    /// agent, at most `most`. One that did since the last wait ends this
    /// one at once.
    pub(super) async fn wait(&self, most: Duration) {
        let _ = tokio::time::timeout(most, self.ended.notified()).await;
    }

    /// How many agents are watched.
    #[cfg(test)]
    fn watched(&self) -> usize {
        self.watching.len()
    }
}

async fn watch_agent(agents: Agents, host: String, uri: String, ended: Arc<Notify>) {
    loop {
        match agents.connect(&host, &uri).await {
            Ok(client) => {
                // A job that ended before the watch was up (a guest that
                // moves in milliseconds) is looked for once now.
                ended.notify_one();
                let mut in_postcopy = BTreeSet::new();
                let watched = client.watch(None, |event| {
                    if wakes(&event, &mut in_postcopy) {
                        ended.notify_one();
                    }
                    true
                });
                if let Ok(Err(e)) = tokio::time::timeout(WATCH_FOR, watched).await {
                    tracing::debug!(%host, error = %e, "the agent's watch ended");
                }
            }
            Err(e) => tracing::debug!(%host, error = %e, "cannot watch the agent"),
        }
        tokio::time::sleep(REWATCH_AFTER).await;
    }
}

/// Whether an agent's watch event wakes the leader: every job's end,
/// and a job's first report in post-copy (which re-splits the links);
/// `in_postcopy` keeps the jobs seen there.
fn wakes(event: &WatchEvent, in_postcopy: &mut BTreeSet<String>) -> bool {
    match event {
        WatchEvent::Ended { record } => {
            in_postcopy.remove(&record.id);
            true
        }
        WatchEvent::Progress { job } => {
            job.stats.in_postcopy() && in_postcopy.insert(job.id.clone())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_the_hosts_drained_are_watched_and_a_moved_agent_is_watched_anew() {
        let mut ends = JobEnds::new(Agents::default());
        let a = ("a".to_string(), "tcp://127.0.0.1:1".to_string());
        let b = ("b".to_string(), "tcp://127.0.0.1:2".to_string());
        ends.follow(&BTreeMap::from([a.clone(), b.clone()]));
        assert_eq!(ends.watched(), 2);
        let first_b = ends.watching["b"].task.id();
        ends.follow(&BTreeMap::from([b.clone()]));
        assert_eq!(ends.watched(), 1);
        assert_eq!(ends.watching["b"].task.id(), first_b);
        ends.follow(&BTreeMap::from([(b.0, "tcp://127.0.0.1:3".to_string())]));
        assert_ne!(ends.watching["b"].task.id(), first_b);
        ends.follow(&BTreeMap::new());
        assert_eq!(ends.watched(), 0);
    }

    fn progress(id: &str, qemu_status: &str) -> WatchEvent {
        WatchEvent::Progress {
            job: Box::new(protocol::job::JobInfo {
                id: id.into(),
                domain: "vm".into(),
                role: protocol::job::Role::Source,
                phase: protocol::job::Phase::Perform,
                status: protocol::job::JobStatus::Active,
                flags: Vec::new(),
                started_at_ms: 0,
                elapsed_ms: 0,
                stats: protocol::job::JobStats {
                    qemu_status: Some(qemu_status.into()),
                    ..Default::default()
                },
                max_cpu_throttle_pct: 0.0,
                throttle_pct: 0.0,
                converge: Default::default(),
                actions: Vec::new(),
                phases: Vec::new(),
                guest_work_lost_s: 0.0,
                bandwidth_limit_mib_s: None,
                downtime_limit_ms: None,
                error: None,
            }),
        }
    }

    #[test]
    fn a_job_wakes_the_leader_once_when_it_switches_to_post_copy() {
        let mut seen = BTreeSet::new();
        assert!(!wakes(&progress("j1", "active"), &mut seen));
        assert!(wakes(&progress("j1", "postcopy-active"), &mut seen));
        // Its later reports in post-copy do not: the split was made.
        assert!(!wakes(&progress("j1", "postcopy-active"), &mut seen));
        // Another job's switch does.
        assert!(wakes(&progress("j2", "postcopy-active"), &mut seen));
        assert!(!wakes(&progress("j3", "completed"), &mut seen));
    }

    #[tokio::test(start_paused = true)]
    async fn an_end_between_two_waits_is_not_lost() {
        let ends = JobEnds::new(Agents::default());
        ends.ended.notify_one();
        let before = tokio::time::Instant::now();
        ends.wait(Duration::from_secs(10)).await;
        assert_eq!(before.elapsed(), Duration::ZERO);
        ends.wait(Duration::from_secs(10)).await;
        assert_eq!(before.elapsed(), Duration::from_secs(10));
    }
}
