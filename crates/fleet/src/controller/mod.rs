//! The controller: several may run; the one that holds the leader key
//! (etcd, under its lease) works, the others wait for it to go. All it
//! decides is in the drain records, so a controller that takes over
//! resumes each drain where the last one left it, and what the agents did
//! meanwhile it reads from them and from the ownership keys.
//!
//! The leader steps every running drain once per tick ([`step`]): it plans
//! a drain the first time (measuring the guests), follows each running
//! migration on its source agent, admits the next ones by the schedule's
//! rule under the caps, re-splits each link among its migrations
//! (`migrate-setspeed`), tries another host for a guest whose destination
//! failed, and ends the drain when the host runs no guest.

mod admit;
mod migrate;
mod step;

use std::time::Duration;

use cluster::Cluster;

use crate::schedule::Caps;
use crate::survey::Agents;

pub use step::step;

/// How a controller runs.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Its name, recorded as the leader's.
    pub name: String,
    /// Limits on migrations at once, besides each drain's own.
    pub caps: Caps,
    /// Its leadership's lease: a dead leader is replaced within it.
    pub lease: Duration,
    /// How often it looks at the drains and the jobs.
    pub tick: Duration,
    /// How long a guest waits for a host that can take it (one coming
    /// back, RAM freed, a cordon lifted) before it fails.
    pub patience: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            name: "controller".into(),
            caps: Caps {
                outbound: Some(4),
                inbound: Some(2),
                cluster: Some(16),
            },
            lease: Duration::from_secs(5),
            tick: Duration::from_millis(500),
            patience: Duration::from_secs(300),
        }
    }
}

/// What a controller works with.
#[derive(Debug, Clone)]
pub struct Context {
    /// The cluster.
    pub cluster: Cluster,
    /// The agents.
    pub agents: Agents,
    /// Its settings.
    pub settings: Settings,
}

/// Runs until `shutdown` resolves: waits to lead, then leads until the
/// leadership is lost (and waits again).
pub async fn run(context: Context, shutdown: impl std::future::Future<Output = ()>) {
    tokio::pin!(shutdown);
    let settings = &context.settings;
    loop {
        let leadership = tokio::select! {
            _ = &mut shutdown => return,
            campaign = context.cluster.campaign(&settings.name, settings.lease) => campaign,
        };
        match leadership {
            Ok(Some(leadership)) => {
                tracing::info!(name = %settings.name, "leading");
                let lead = async {
                    while leadership.is_leading() {
                        lead_once(&context, &leadership).await;
                        tokio::time::sleep(settings.tick).await;
                    }
                };
                tokio::select! {
                    _ = &mut shutdown => {
                        leadership.resign().await;
                        return;
                    }
                    () = lead => tracing::warn!(name = %settings.name, "leadership lost"),
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "cannot campaign"),
        }
        tokio::select! {
            _ = &mut shutdown => return,
            () = tokio::time::sleep(settings.tick) => {}
        }
    }
}

async fn lead_once(context: &Context, leadership: &cluster::Leadership) {
    let drains = match context.cluster.drains().await {
        Ok(drains) => drains,
        Err(e) => {
            // Nothing new starts while etcd cannot be read; what runs
            // goes on in the agents.
            tracing::warn!(error = %e, "cannot read the drains");
            return;
        }
    };
    // Every migration the drains run, by drain: the caps and the links
    // are the cluster's, not one drain's.
    let migrating: Vec<(String, String, String)> = drains
        .iter()
        .filter(|d| !d.record.state.ended())
        .flat_map(|d| {
            d.record.guests.iter().filter_map(|g| {
                (g.state == cluster::GuestState::Migrating)
                    .then(|| g.destination.clone())
                    .flatten()
                    .map(|to| (d.record.id.clone(), d.record.host.clone(), to))
            })
        })
        .collect();
    for drain in drains {
        if drain.record.state.ended() {
            continue;
        }
        let id = drain.record.id.clone();
        let elsewhere: Vec<(String, String)> = migrating
            .iter()
            .filter(|(drain, _, _)| *drain != id)
            .map(|(_, from, to)| (from.clone(), to.clone()))
            .collect();
        if let Err(e) = step(context, leadership, drain, &elsewhere).await {
            tracing::warn!(drain = %id, error = %e, "drain step failed");
        }
    }
}
