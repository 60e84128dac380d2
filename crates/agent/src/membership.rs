//! This host in the cluster (`--cluster`): registered in etcd under a
//! lease while the agent runs, with what a controller places guests by
//! (its agent's address, QEMU, CPU, free RAM, running domains, link,
//! labels), written again every few seconds.

use std::sync::Arc;
use std::time::Duration;

use cluster::{Cluster, Endpoints, HostRecord, TlsFiles};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::ClusterSettings;
use crate::state::Agent;

/// How often the record is written again.
const REFRESH: Duration = Duration::from_secs(3);

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
    let (cpu_model, ram_free_mib) = tokio::task::spawn_blocking(|| {
        (
            cpuinfo("model name").unwrap_or_else(|| "unknown".into()),
            ram_free_mib(),
        )
    })
    .await
    .unwrap_or_else(|_| ("unknown".into(), 0));
    HostRecord {
        name: name.to_string(),
        agent_uri: agent.uri.clone(),
        qemu_version,
        cpu_model,
        ram_free_mib,
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
    let agent = agent.clone();
    let settings = settings.clone();
    Ok(tokio::spawn(async move {
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
            let now = record(&agent, &name, &settings).await;
            if let Err(e) = registration.update(&now).await {
                tracing::warn!(error = %crate::errors::chain(&e), "cannot update this host's record in the cluster");
            }
        }
    }))
}
