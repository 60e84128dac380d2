//! This host in the cluster (`--cluster`): registered in etcd under a
//! lease while the agent runs, with what a controller places guests by
//! (its agent's address, QEMU, CPU, free RAM, running domains, link,
//! labels), written again every few seconds.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use cluster::{Claim, Cluster, Endpoints, HostRecord, TlsFiles};
use protocol::{ApiError, ErrorCode};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::ClusterSettings;
use crate::state::Agent;

/// How often the record is written again.
const REFRESH: Duration = Duration::from_secs(3);

/// Every how many refreshes the stopped domains' keys are released
/// (`release_stale`): a key left naming this host is rare, and each check
/// costs etcd a transaction per stopped domain.
const RELEASE_EVERY: u32 = 5;

/// This host, joined.
#[derive(Debug, Clone)]
pub(crate) struct Member {
    pub cluster: Cluster,
    /// Its name in the cluster (its agent certificate's).
    pub name: String,
    /// Domains whose switchover the cluster has not been told of yet, by
    /// domain: the host it went to. The cluster still names this host for
    /// them, and must not be believed.
    pub handing_over: Arc<std::sync::Mutex<BTreeMap<String, String>>>,
}

impl Member {
    fn handing_over_to(&self, domain: &str) -> Option<String> {
        self.handing_over
            .lock()
            .expect("hand-over lock")
            .get(domain)
            .cloned()
    }
}

/// Claims `domain` for this host before it starts here: refused if the
/// cluster says another host runs it, or cannot be asked (nothing starts
/// while the cluster cannot tell who runs what). Outside a cluster, always
/// granted.
///
/// # Errors
/// [`ApiError`] naming the host that runs it, or the cluster's error.
pub(crate) async fn claim(agent: &Agent, domain: &str) -> Result<(), ApiError> {
    let Some(member) = agent.cluster.get() else {
        return Ok(());
    };
    if let Some(to) = member.handing_over_to(domain) {
        return Err(ApiError::new(
            ErrorCode::OperationInvalid,
            format!(
                "domain '{domain}' went to {to}, which the cluster has not been told yet: it \
                 runs there"
            ),
        ));
    }
    match member.cluster.claim(domain, &member.name).await {
        Ok(Claim::Granted) => Ok(()),
        Ok(Claim::HeldBy(host)) => Err(ApiError::new(
            ErrorCode::OperationInvalid,
            format!(
                "domain '{domain}' runs on {host}, the cluster says: stop it there, or migrate \
                 it here"
            ),
        )),
        Err(e) => Err(ApiError::new(
            ErrorCode::PeerUnreachable,
            format!(
                "the cluster cannot say who runs '{domain}', so it is not started: {}",
                crate::errors::chain(&e)
            ),
        )),
    }
}

/// May a guest land here: not while the cluster has this host cordoned,
/// nor while the cluster cannot say. Outside a cluster, always.
///
/// # Errors
/// [`ApiError`] saying why, and how to lift a cordon.
pub(crate) async fn takes_guests(agent: &Agent) -> Result<(), ApiError> {
    let Some(member) = agent.cluster.get() else {
        return Ok(());
    };
    let name = &member.name;
    match member.cluster.cordon_of(name).await {
        Ok(None) => Ok(()),
        Ok(Some(cordon)) => Err(ApiError::new(
            ErrorCode::OperationInvalid,
            format!(
                "host {name} is cordoned ({}): no guest lands here until `livemig uncordon {name}`",
                cordon.reason
            ),
        )),
        Err(e) => Err(ApiError::new(
            ErrorCode::PeerUnreachable,
            format!(
                "the cluster cannot say whether {name} takes guests, so it takes none: {}",
                crate::errors::chain(&e)
            ),
        )),
    }
}

/// `options` with the cluster's policy for `domain` (by its labels) where
/// the user gave nothing. Outside a cluster, or with no labels, unchanged.
///
/// # Errors
/// [`ApiError`] when the cluster cannot be asked: no migration starts on
/// settings that may not be the ones the operator set.
pub(crate) async fn with_policy(
    agent: &Agent,
    domain: &domain::DomainName,
    options: protocol::MigrateOptions,
) -> Result<protocol::MigrateOptions, ApiError> {
    let Some(member) = agent.cluster.get() else {
        return Ok(options);
    };
    let Ok(view) = agent.table.get(domain) else {
        return Ok(options);
    };
    if view.definition.labels.is_empty() {
        return Ok(options);
    }
    let policies = member.cluster.policies().await.map_err(|e| {
        ApiError::new(
            ErrorCode::PeerUnreachable,
            format!(
                "the cluster cannot say which policy applies to '{domain}', so it is not \
                 migrated: {}",
                crate::errors::chain(&e)
            ),
        )
    })?;
    Ok(
        match cluster::policy::choose(&policies, &view.definition.labels) {
            Some(policy) => {
                tracing::info!(%domain, policy = %policy.name, "migration policy applies");
                policy.apply(options)
            }
            None => options,
        },
    )
}

/// The domain stopped here: the cluster forgets it ran here. False when
/// the cluster could not be told: until [`release_stale`] tells it, the
/// cluster holds the guest off every other host, so the domain stays in
/// the table (a transient one too) for that to find.
pub(crate) async fn release(agent: &Agent, domain: &str) -> bool {
    let Some(member) = agent.cluster.get() else {
        return true;
    };
    match member.cluster.release(domain, &member.name).await {
        Ok(_) => true,
        Err(e) => {
            tracing::warn!(domain, error = %crate::errors::chain(&e), "the cluster could not be told the domain stopped here");
            false
        }
    }
}

/// How long a switchover keeps trying to reach the cluster.
const HAND_OVER_FOR: Duration = Duration::from_secs(3600);

/// Switchover: the domain runs on `to` (its certificate's name) now, as
/// `arriving` (its name there, which `--dname` may change). If
/// the cluster cannot be reached, this keeps trying in the background:
/// until it succeeds the cluster still names this host, and nothing would
/// stop a start of the stale copy here once it is back.
pub(crate) async fn hand_over(agent: &Agent, domain: &str, arriving: &str, to: Option<&str>) {
    let (Some(member), Some(to)) = (agent.cluster.get().cloned(), to) else {
        return;
    };
    let (domain, arriving, to) = (domain.to_string(), arriving.to_string(), to.to_string());
    match member
        .cluster
        .hand_over_as(&domain, &arriving, &member.name, &to)
        .await
    {
        Ok(true) => {
            tracing::info!(%domain, %to, "the cluster says the domain runs on its destination")
        }
        Ok(false) => {
            tracing::warn!(%domain, %to, "the cluster did not have the domain on this host")
        }
        Err(e) => {
            tracing::warn!(%domain, error = %crate::errors::chain(&e), "the cluster could not be told of the switchover; trying again");
            member
                .handing_over
                .lock()
                .expect("hand-over lock")
                .insert(domain.clone(), to.clone());
            tokio::spawn(async move {
                let told = || {
                    member
                        .handing_over
                        .lock()
                        .expect("hand-over lock")
                        .remove(&domain);
                };
                let deadline = tokio::time::Instant::now() + HAND_OVER_FOR;
                let mut wait = Duration::from_millis(500);
                while tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(10));
                    match member
                        .cluster
                        .hand_over_as(&domain, &arriving, &member.name, &to)
                        .await
                    {
                        Ok(done) => {
                            tracing::info!(%domain, %to, handed_over = done, "the cluster was told of the switchover");
                            told();
                            return;
                        }
                        Err(e) => {
                            tracing::debug!(error = %crate::errors::chain(&e), "the cluster is still out of reach")
                        }
                    }
                }
                // Still refused here: the guest runs on its destination.
                tracing::error!(%domain, %to, "the cluster was never told of the switchover");
            });
        }
    }
}

/// Claims what runs here with no job (and not yet in the cluster's view:
/// started before joining, or landed while the cluster was not told).
async fn claim_running(agent: &Agent, member: &Member) {
    for d in agent.table.all() {
        if d.vm.is_none() || d.job.is_some() {
            continue;
        }
        match member.cluster.claim(d.name.as_str(), &member.name).await {
            Ok(Claim::Granted) => {
                // Destroyed (and released) while the claim was on its way:
                // a key written after that release would name this host
                // for a guest it no longer runs, and hold the guest off
                // every other host for good (the drain benchmark's reset
                // once met a guest owned by a host with no such domain).
                let runs = agent.table.get(&d.name).is_ok_and(|now| now.vm.is_some());
                if !runs {
                    let _ = release(agent, d.name.as_str()).await;
                }
            }
            Ok(Claim::HeldBy(host)) => {
                tracing::error!(domain = %d.name, %host, "runs here, but the cluster says it runs on another host")
            }
            Err(e) => {
                tracing::debug!(error = %crate::errors::chain(&e), "cannot claim running domains")
            }
        }
    }
}

/// Releases what the cluster may say runs here but does not: a release
/// that could not reach etcd when the guest stopped, or a source's
/// switchover retried after etcd came back and landing after this host
/// had stopped the guest. Either would hold the guest off every other
/// host for good. Each domain defined here with no QEMU and no job is
/// released if the cluster names this host (a compare-and-delete: one
/// transaction per stopped domain, no read of every owner, which a
/// thousand agents doing every few seconds would make etcd's busiest
/// work). A domain with an operation under way (its lock held: a start
/// claims before its QEMU runs) is left for the next round, as is one
/// whose switchover the cluster has not been told of. A transient guest
/// stays in the table, stopped, while its release is owed ([`release`]),
/// and goes once it is told.
async fn release_stale(agent: &Agent, member: &Member) {
    for d in agent.table.all() {
        if d.vm.is_some() || d.job.is_some() || member.handing_over_to(d.name.as_str()).is_some() {
            continue;
        }
        let Ok(lock) = agent.table.op_lock(&d.name) else {
            continue;
        };
        // Held across the release: a start must not claim in between.
        let Ok(_held) = lock.try_lock() else {
            continue;
        };
        let stopped = agent
            .table
            .get(&d.name)
            .is_ok_and(|now| now.vm.is_none() && now.job.is_none());
        if !stopped {
            continue;
        }
        match member.cluster.release(d.name.as_str(), &member.name).await {
            Ok(true) => {
                tracing::warn!(domain = %d.name, "the cluster said this stopped domain runs here; released");
                agent.table.drop_if_transient_and_idle(&d.name);
            }
            Ok(false) => agent.table.drop_if_transient_and_idle(&d.name),
            Err(e) => {
                tracing::debug!(error = %crate::errors::chain(&e), "cannot release stopped domains");
                return;
            }
        }
    }
}

/// Releases, once at the agent's start (after it has adopted what runs
/// here), every domain the cluster says runs on this host that this host
/// does not know: a transient guest stopped while etcd was out of reach
/// was kept in the table until the cluster could be told (`release`), and
/// an agent that died meanwhile took that with it. One read of every
/// owner, at start only.
pub(crate) async fn release_unknown(agent: &Agent) {
    let Some(member) = agent.cluster.get() else {
        return;
    };
    let owners = match member.cluster.owners().await {
        Ok(owners) => owners,
        Err(e) => {
            tracing::warn!(error = %crate::errors::chain(&e), "cannot read which domains the cluster says run here");
            return;
        }
    };
    for (domain, host) in owners {
        if host != member.name {
            continue;
        }
        let known = domain
            .parse()
            .is_ok_and(|name: domain::DomainName| agent.table.get(&name).is_ok());
        if known {
            continue;
        }
        match member.cluster.release(&domain, &member.name).await {
            Ok(true) => {
                tracing::warn!(%domain, "the cluster said a domain unknown here runs here; released")
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(%domain, error = %crate::errors::chain(&e), "cannot release a domain unknown here");
                return;
            }
        }
    }
}

/// Why the host could not join its cluster.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// etcd unreachable, the endpoint bad, the certificate refused.
    #[error(transparent)]
    Cluster(#[from] cluster::ClusterError),
    /// The host's name could not be read from its certificate.
    #[error("cannot name this host in the cluster")]
    Name(#[from] tls::TlsError),
}

/// The first line of `/proc/cpuinfo` that says `key`.
fn cpuinfo(key: &str) -> Option<String> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    text.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
}

/// `MemAvailable` from `/proc/meminfo`, MiB.
fn ram_free_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kib| kib / 1024)
}

/// Free space for copied disks, MiB: the least among `dirs`' file
/// systems (a directory that does not exist yet counts as its nearest
/// existing parent's); `None` when none can be read.
fn disk_free_mib(dirs: &[std::path::PathBuf]) -> Option<u64> {
    dirs.iter()
        .filter_map(|dir| {
            let existing = dir.ancestors().find(|d| d.exists())?;
            let stat = nix::sys::statvfs::statvfs(existing).ok()?;
            Some((stat.blocks_available() as u64).saturating_mul(stat.fragment_size() as u64) >> 20)
        })
        .min()
}

/// This host as the cluster sees it now.
async fn record(agent: &Agent, name: &str, settings: &ClusterSettings) -> HostRecord {
    let qemu_version = match agent.binary().await {
        Ok(binary) => binary.version.to_string(),
        Err(_) => "unknown".into(),
    };
    let domains = agent
        .table
        .all()
        .into_iter()
        .filter(|d| d.vm.is_some())
        .map(|d| d.name.to_string())
        .collect();
    let image_dirs = agent.config.image_dirs.clone();
    let (cpu_model, ram_free_mib, disk_free_mib) = tokio::task::spawn_blocking(move || {
        (
            cpuinfo("model name").unwrap_or_else(|| "unknown".into()),
            ram_free_mib(),
            disk_free_mib(&image_dirs),
        )
    })
    .await
    .unwrap_or_else(|_| ("unknown".into(), 0, None));
    HostRecord {
        name: name.to_string(),
        agent_uri: agent.uri.clone(),
        qemu_version,
        cpu_model,
        ram_free_mib,
        disk_free_mib,
        domains,
        link_mib_s: settings.link_mib_s,
        labels: settings.labels.clone(),
        updated_at_ms: migration::job::unix_ms(),
    }
}

/// Joins the cluster the agent is configured for: connects (with the
/// agent's certificate), registers this host, and keeps the record fresh
/// until `leave` is cancelled, then takes it out at once.
///
/// # Errors
/// [`JoinError`] if the cluster cannot be reached or refuses this host.
pub(crate) async fn join(
    agent: &Arc<Agent>,
    settings: &ClusterSettings,
    leave: CancellationToken,
) -> Result<JoinHandle<()>, JoinError> {
    let endpoints = Endpoints::parse(&settings.endpoints, agent.config.insecure)?;
    let tls = agent
        .config
        .tls_dir
        .as_ref()
        .map(|dir| TlsFiles { dir: dir.clone() });
    let name = match &agent.config.tls_dir {
        Some(dir) => tls::TlsDir::load(dir)?.identity()?.name,
        None => tokio::fs::read_to_string("/proc/sys/kernel/hostname")
            .await
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "localhost".into()),
    };
    let cluster = Cluster::connect(&endpoints, tls.as_ref()).await?;
    let registration = cluster
        .register(
            &record(agent, &name, settings).await,
            agent.config.timeouts.cluster_lease,
        )
        .await?;
    tracing::info!(%endpoints, host = %name, "joined the cluster");
    let member = Member {
        cluster: cluster.clone(),
        name: name.clone(),
        handing_over: Default::default(),
    };
    let _ = agent.cluster.set(member.clone());
    let agent = agent.clone();
    let settings = settings.clone();
    Ok(tokio::spawn(async move {
        let mut round = 0u32;
        loop {
            tokio::select! {
                _ = leave.cancelled() => {
                    if let Err(e) = registration.leave().await {
                        tracing::warn!(error = %crate::errors::chain(&e), "could not leave the cluster; the lease runs out");
                    }
                    return;
                }
                _ = tokio::time::sleep(REFRESH) => {}
            }
            claim_running(&agent, &member).await;
            round += 1;
            if round.is_multiple_of(RELEASE_EVERY) {
                release_stale(&agent, &member).await;
            }
            let now = record(&agent, &name, &settings).await;
            registration.update(&now);
        }
    }))
}
