//! The controller: several may run; the one that holds the leader key
//! (etcd, under its lease) works, the others wait for it to go. All it
//! decides is in the drain records, so a controller that takes over
//! resumes each drain where the last one left it, and what the agents did
//! meanwhile it reads from them and from the ownership keys.
//!
//! The leader steps every running drain once per tick, and as soon as a
//! migration ends on a drained host's agent (its `watch`, `wake`): it plans
//! a drain the first time (measuring the guests), follows each running
//! migration on its source agent, admits the next ones by the schedule's
//! rule under the caps, re-splits each link among its migrations
//! (`migrate-setspeed`), tries another host for a guest whose destination
//! failed, and ends the drain when the host runs no guest.

mod admit;
mod migrate;
mod step;
mod wake;

use std::collections::BTreeMap;
use std::time::Duration;

use cluster::Cluster;

use crate::schedule::Caps;
use crate::survey::Agents;

use step::step;

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

/// How long an idle leader waits for a change to the drains before it
/// looks anyway.
const IDLE_WAIT: Duration = Duration::from_secs(10);

/// Runs until `shutdown` resolves: waits to lead, then leads until the
/// leadership is lost (and waits again).
pub async fn run(context: Context, shutdown: impl std::future::Future<Output = ()>) {
    tokio::pin!(shutdown);
    let settings = &context.settings;
    let limits = settings.caps.into();
    loop {
        let leadership = tokio::select! {
            _ = &mut shutdown => return,
            campaign = context.cluster.campaign(&settings.name, &limits, settings.lease) => campaign,
        };
        match leadership {
            Ok(Some(leadership)) => {
                tracing::info!(name = %settings.name, "leading");
                let lead = async {
                    // An etcd watch wakes an idle leader for a new drain;
                    // while drains run, the jobs on the agents are looked
                    // at every tick, and each job's end on a drained
                    // host wakes it at once.
                    let mut changes = context.cluster.drains_changes();
                    let mut job_ends = wake::JobEnds::new(context.agents.clone());
                    while leadership.is_leading() {
                        match lead_once(&context, &leadership).await {
                            Led::Busy { sources } => {
                                if let Some(sources) = sources {
                                    job_ends.follow(&sources);
                                }
                                job_ends.wait(settings.tick).await;
                            }
                            Led::Idle => {
                                job_ends.follow(&BTreeMap::new());
                                changes.next(IDLE_WAIT).await;
                            }
                        }
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

/// A migration a drain runs: the links and the destination's RAM it
/// takes are the cluster's, not one drain's.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Moving {
    /// The drain's id.
    pub drain: String,
    /// The drained host.
    pub from: String,
    /// The destination.
    pub to: String,
    /// The guest's RAM, MiB.
    pub memory_mib: u64,
}

fn moving(record: &cluster::DrainRecord) -> impl Iterator<Item = Moving> + '_ {
    record.guests.iter().filter_map(|g| {
        (g.state == cluster::GuestState::Migrating)
            .then(|| g.destination.clone())
            .flatten()
            .map(|to| Moving {
                drain: record.id.clone(),
                from: record.host.clone(),
                to,
                memory_mib: g.memory_mib,
            })
    })
}

/// What the cluster says at the start of a tick, read once and shared by
/// every drain's step.
pub(super) struct Snapshot {
    /// The hosts' records.
    pub records: Vec<cluster::HostRecord>,
    /// The hosts as placement sees them (with their cordons).
    pub hosts: Vec<crate::plan::Host>,
    /// Which host runs each domain.
    pub owners: std::collections::BTreeMap<String, String>,
    /// The migration policies.
    pub policies: Vec<cluster::Policy>,
}

async fn snapshot(cluster: &Cluster) -> Result<Snapshot, crate::survey::FleetError> {
    let (records, hosts) = crate::survey::hosts(cluster).await?;
    Ok(Snapshot {
        records,
        hosts,
        owners: cluster.owners().await?,
        policies: cluster.policies().await?,
    })
}

/// What a round of the leader's found.
enum Led {
    /// No drain runs.
    Idle,
    /// Drains run: the drained hosts' agents (name → URI), if the cluster
    /// could be read.
    Busy {
        sources: Option<BTreeMap<String, String>>,
    },
}

/// Steps every drain that has not ended.
async fn lead_once(context: &Context, leadership: &cluster::Leadership) -> Led {
    let drains = match context.cluster.drains().await {
        Ok(drains) => drains,
        Err(e) => {
            // Nothing new starts while etcd cannot be read; what runs
            // goes on in the agents.
            tracing::warn!(error = %e, "cannot read the drains");
            return Led::Busy { sources: None };
        }
    };
    let drains: Vec<cluster::Versioned> = drains
        .into_iter()
        .filter(|d| !d.record.state.ended())
        .collect();
    if drains.is_empty() {
        return Led::Idle;
    }
    let snapshot = match snapshot(&context.cluster).await {
        Ok(snapshot) => snapshot,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the cluster");
            return Led::Busy { sources: None };
        }
    };
    let sources = drains
        .iter()
        .filter_map(|d| {
            let host = snapshot.records.iter().find(|h| h.name == d.record.host)?;
            Some((host.name.clone(), host.agent_uri.clone()))
        })
        .collect();
    let mut migrating: Vec<Moving> = drains.iter().flat_map(|d| moving(&d.record)).collect();
    for drain in drains {
        let id = drain.record.id.clone();
        let elsewhere: Vec<Moving> = migrating
            .iter()
            .filter(|m| m.drain != id)
            .cloned()
            .collect();
        match step(context, leadership, drain, &snapshot, &elsewhere).await {
            // The next drain sees what this one started.
            Ok(record) => {
                migrating.retain(|m| m.drain != id);
                migrating.extend(moving(&record));
            }
            Err(e) => tracing::warn!(drain = %id, error = %e, "drain step failed"),
        }
    }
    Led::Busy {
        sources: Some(sources),
    }
}
