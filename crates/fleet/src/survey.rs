//! What a drain needs to know before it moves anything: the hosts from the
//! cluster (registered, cordoned), and the drained host's guests from its
//! agent (their RAM and labels, and measured, how they dirty memory).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cluster::{Cluster, ClusterError, HostRecord};
use converge::model::DirtyModel;
use protocol::call::{self, Call};
use protocol::estimate::EstimateParams;
use protocol::{AgentUri, Client, ClientError};
use types::DomainName;

use crate::plan::{Guest, Host};

/// What a survey (or a drain's step) failed on.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// The cluster's etcd.
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    /// A host the cluster does not have.
    #[error("no host {host:?} in the cluster (registered: {known})")]
    UnknownHost {
        /// The name asked for.
        host: String,
        /// The names it has.
        known: String,
    },
    /// An agent did not answer, or refused.
    #[error("the agent of {host}: {source}")]
    Agent {
        /// The host.
        host: String,
        /// What happened.
        #[source]
        source: ClientError,
    },
    /// The TLS directory for the agents is unusable.
    #[error("cannot use the TLS directory {dir}: {reason}")]
    Tls {
        /// The directory.
        dir: String,
        /// Why.
        reason: String,
    },
}

/// How long one request to an agent may take (an `estimate` measures for
/// a few seconds).
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(30);

/// Reaching agents by the URIs they registered, with an administrator's
/// certificate.
#[derive(Debug, Clone, Default)]
pub struct Agents {
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl Agents {
    /// Agents reached with the certificate in `dir` (`tls://` agents), or
    /// none (`tcp://` agents of an insecure cluster).
    ///
    /// # Errors
    /// [`FleetError::Tls`].
    pub fn new(dir: Option<&Path>) -> Result<Agents, FleetError> {
        let tls = dir
            .map(|dir| {
                tls::TlsDir::load(dir)
                    .and_then(|d| d.client_config())
                    .map_err(|e| FleetError::Tls {
                        dir: dir.display().to_string(),
                        reason: e.to_string(),
                    })
            })
            .transpose()?;
        Ok(Agents { tls })
    }

    /// A connection to `host`'s agent at `uri`.
    ///
    /// # Errors
    /// [`FleetError::Agent`].
    pub async fn connect(&self, host: &str, uri: &str) -> Result<Client, FleetError> {
        let agent_error = |source| FleetError::Agent {
            host: host.to_string(),
            source,
        };
        let uri: AgentUri = uri.parse().map_err(|e: protocol::BadAgentUri| {
            agent_error(ClientError::Connect {
                uri: uri.to_string(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()),
            })
        })?;
        Client::connect_with(&uri, self.tls.as_ref())
            .await
            .map_err(agent_error)
    }

    /// Sends `call` to `host`'s agent over `client`.
    ///
    /// # Errors
    /// [`FleetError::Agent`].
    pub async fn call<C: Call>(
        &self,
        client: &Client,
        host: &str,
        call: C,
    ) -> Result<C::Output, FleetError> {
        client
            .call(call, AGENT_TIMEOUT)
            .await
            .map_err(|source| FleetError::Agent {
                host: host.to_string(),
                source,
            })
    }
}

/// A guest of the drained host.
#[derive(Debug, Clone, PartialEq)]
pub struct Surveyed {
    /// Its cost model.
    pub guest: Guest,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its dirty rate was measured (not assumed idle).
    pub measured: bool,
}

/// The drained host, the hosts that could take its guests, and the
/// guests.
#[derive(Debug, Clone)]
pub struct Survey {
    /// The drained host.
    pub source: Host,
    /// Its record.
    pub source_record: HostRecord,
    /// Every registered host (the drained one too), as placement sees it.
    pub hosts: Vec<Host>,
    /// Their records.
    pub records: Vec<HostRecord>,
    /// The drained host's running guests.
    pub guests: Vec<Surveyed>,
}

/// A link the host did not configure, bytes/s: a gigabit.
pub const DEFAULT_LINK_MIB_S: u32 = 110;

/// `record` as placement sees it.
pub fn host_of(record: &HostRecord, cordon: Option<&cluster::Cordon>) -> Host {
    Host {
        name: record.name.clone(),
        link: f64::from(record.link_mib_s.unwrap_or(DEFAULT_LINK_MIB_S)) * 1048576.0,
        ram_free_bytes: record.ram_free_mib << 20,
        disk_free_bytes: record.disk_free_mib.map(|mib| mib << 20),
        qemu_version: record.qemu_version.clone(),
        cpu_model: record.cpu_model.clone(),
        cordoned: cordon.map(|c| c.reason.clone()),
    }
}

/// The hosts from the cluster, by name, with their cordons.
///
/// # Errors
/// [`FleetError::Cluster`].
pub async fn hosts(cluster: &Cluster) -> Result<(Vec<HostRecord>, Vec<Host>), FleetError> {
    let records = cluster.hosts().await?;
    let cordons = cluster.cordons().await?;
    let hosts = records
        .iter()
        .map(|r| host_of(r, cordons.get(&r.name)))
        .collect();
    Ok((records, hosts))
}

/// Surveys `host` for a drain: its guests' RAM and labels from its agent,
/// and, when `measure` is set, their dirty rates (each guest measured at
/// once, side by side).
///
/// # Errors
/// An unknown host, an etcd or agent that does not answer.
pub async fn survey(
    cluster: &Cluster,
    agents: &Agents,
    host: &str,
    measure: bool,
) -> Result<Survey, FleetError> {
    let (records, hosts) = hosts(cluster).await?;
    let Some(index) = records.iter().position(|r| r.name == host) else {
        let known: Vec<&str> = records.iter().map(|r| r.name.as_str()).collect();
        return Err(FleetError::UnknownHost {
            host: host.to_string(),
            known: if known.is_empty() {
                "none".into()
            } else {
                known.join(", ")
            },
        });
    };
    let record = records[index].clone();
    let client = agents.connect(host, &record.agent_uri).await?;
    let running = agents
        .call(&client, host, call::List { all: false })
        .await?;
    let mut guests = Vec::new();
    for summary in running {
        let Ok(name) = summary.name.parse::<DomainName>() else {
            continue;
        };
        let info = agents
            .call(
                &client,
                host,
                call::DomInfo {
                    domain: name.clone(),
                },
            )
            .await?;
        let memory = info
            .guest_ram_bytes
            .unwrap_or(u64::from(info.memory_mib) << 20);
        guests.push(Surveyed {
            guest: Guest::idle(&summary.name, memory),
            labels: info.labels,
            measured: false,
        });
    }
    if measure {
        measure_guests(agents, host, &record.agent_uri, &mut guests).await;
    }
    Ok(Survey {
        source: hosts[index].clone(),
        source_record: record,
        hosts,
        records,
        guests,
    })
}

/// How old an agent's kept measurement of a guest may be for a drain to
/// plan from it (agents measure their guests every minute by default):
/// the order and placement need each guest's rough cost, and the jobs
/// measure again as they run.
pub const MEASUREMENT_MAX_AGE_S: u64 = 120;

/// Measures every guest at once, each over a connection of its own (an
/// agent answers one request per connection at a time). A guest that
/// cannot be measured keeps the idle model and says so.
async fn measure_guests(agents: &Agents, host: &str, uri: &str, guests: &mut [Surveyed]) {
    let mut tasks = tokio::task::JoinSet::new();
    for (i, surveyed) in guests.iter().enumerate() {
        let agents = agents.clone();
        let host = host.to_string();
        let uri = uri.to_string();
        let name = surveyed.guest.name.clone();
        tasks.spawn(async move {
            let report = async {
                let client = agents.connect(&host, &uri).await?;
                agents
                    .call(
                        &client,
                        &host,
                        call::Estimate {
                            domain: name.parse().expect("listed by the agent"),
                            params: EstimateParams {
                                max_age_s: Some(MEASUREMENT_MAX_AGE_S),
                                ..EstimateParams::default()
                            },
                        },
                    )
                    .await
            }
            .await;
            (i, report)
        });
    }
    while let Some(joined) = tasks.join_next().await {
        let Ok((i, report)) = joined else { continue };
        match report {
            Ok(report) => {
                let guest = &mut guests[i].guest;
                guest.first_pass_bytes = converge::estimate::first_pass_bytes(
                    report.guest_ram_bytes,
                    report.guest_ram_in_use_bytes,
                );
                guest.model = DirtyModel {
                    rate: report.model.rate,
                    working_set: report.model.working_set,
                    rate_is_lower_bound: report.model.rate_is_lower_bound,
                };
                guest.copied_disk_bytes = report
                    .disks
                    .iter()
                    .filter(|d| !d.shared)
                    .map(|d| d.size_bytes)
                    .sum();
                guests[i].measured = true;
            }
            Err(e) => {
                tracing::warn!(guest = %guests[i].guest.name, error = %e, "cannot measure the guest; planned as idle");
            }
        }
    }
}
