//! Hosts in the cluster: each agent keeps a record of its host under a
//! lease it renews; when the agent dies the lease runs out and the record
//! is gone within the lease's time to live.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::PutOptions;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::connect::{decode, Cluster, ClusterError};

/// Where host records live.
const HOSTS: &str = "/livemig/hosts/";

/// What the cluster knows of a host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostRecord {
    /// The host's name: its agent certificate's.
    pub name: String,
    /// Its agent's URI (`tls://HOST:PORT`).
    pub agent_uri: String,
    /// The QEMU version it runs guests with (`7.2.0`).
    pub qemu_version: String,
    /// The host CPU's model name.
    pub cpu_model: String,
    /// Memory available for guests, MiB.
    pub ram_free_mib: u64,
    /// Space free for the disks of guests that arrive with them
    /// (`--copy-storage-all`), MiB: the least among the agent's image
    /// directories, any of which a copied disk may land in. Absent from
    /// an agent that does not report it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_free_mib: Option<u64>,
    /// The domains running there.
    pub domains: Vec<String>,
    /// The bandwidth of its migration link, MiB/s, as configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_mib_s: Option<u32>,
    /// Labels, as configured.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// When the record was last written (Unix ms).
    pub updated_at_ms: u64,
}

/// A host's registration; dropping it stops renewing (the record goes
/// when the lease runs out), [`Registration::leave`] removes it at once.
/// A lease the cluster lost (etcd out of reach for longer than its time to
/// live) is replaced and the record written again as soon as etcd answers.
#[derive(Debug)]
pub struct Registration {
    cluster: Cluster,
    lease: Arc<AtomicI64>,
    latest: watch::Sender<HostRecord>,
    renew: JoinHandle<()>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.renew.abort();
    }
}

/// Grants a lease of `ttl` and writes `record` under it.
async fn put_leased(
    cluster: &Cluster,
    record: &HostRecord,
    ttl: Duration,
) -> Result<i64, ClusterError> {
    let mut client = cluster.client.clone();
    let lease = crate::connect::bounded(client.lease_grant(ttl.as_secs().max(1) as i64, None))
        .await
        .map_err(cluster.etcd_error())?
        .id();
    let value = serde_json::to_vec(record).expect("a host record always serializes");
    crate::connect::bounded(client.put(
        format!("{HOSTS}{}", record.name),
        value,
        Some(PutOptions::new().with_lease(lease)),
    ))
    .await
    .map_err(cluster.etcd_error())?;
    Ok(lease)
}

/// Keeps the lease alive and the record current until aborted; registers
/// again when the lease is lost.
async fn renew(
    cluster: Cluster,
    ttl: Duration,
    lease: Arc<AtomicI64>,
    mut latest: watch::Receiver<HostRecord>,
) {
    let every = (ttl / 3).max(Duration::from_millis(200));
    loop {
        let id = lease.load(Ordering::SeqCst);
        let mut client = cluster.client.clone();
        let kept = crate::connect::bounded(client.lease_keep_alive(id)).await;
        if let Ok((mut keeper, mut answers)) = kept {
            let mut unheard_since = tokio::time::Instant::now();
            // One clock for the renewals: record updates come every few
            // seconds and must not put the next renewal off (a sleep
            // started afresh on each pass through the select would never
            // end while updates come more often than it lasts).
            let mut renewals = tokio::time::interval(every);
            renewals.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = renewals.tick() => {
                        let renewed = async {
                            keeper.keep_alive().await?;
                            answers.message().await
                        };
                        match tokio::time::timeout(every, renewed).await {
                            Ok(Ok(Some(answer))) if answer.ttl() > 0 => {
                                unheard_since = tokio::time::Instant::now();
                            }
                            Ok(Ok(_)) => break,
                            _ if unheard_since.elapsed() > ttl => break,
                            _ => {}
                        }
                    }
                    changed = latest.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        let record = latest.borrow_and_update().clone();
                        let value = serde_json::to_vec(&record).expect("a host record always serializes");
                        let mut client = cluster.client.clone();
                        let put = crate::connect::bounded(client.put(
                            format!("{HOSTS}{}", record.name),
                            value,
                            Some(PutOptions::new().with_lease(id)),
                        ))
                        .await;
                        match put {
                            Err(e) if e.to_string().contains("lease not found") => break,
                            Err(e) => tracing::debug!(error = %e, "cannot update this host's record"),
                            Ok(_) => {}
                        }
                    }
                }
            }
        }
        // The lease is gone, or etcd out of reach: register again once it
        // answers.
        let record = latest.borrow().clone();
        tracing::warn!(host = %record.name, "this host's lease in the cluster was lost; registering again");
        loop {
            match put_leased(&cluster, &record, ttl).await {
                Ok(id) => {
                    lease.store(id, Ordering::SeqCst);
                    tracing::info!(host = %record.name, "registered in the cluster again");
                    break;
                }
                Err(_) => tokio::time::sleep(every).await,
            }
        }
    }
}

impl Cluster {
    /// Registers `record` under a lease of `ttl`, renewed every third of
    /// it until the registration is dropped.
    ///
    /// # Errors
    /// [`ClusterError::Etcd`] if etcd refuses or does not answer.
    pub async fn register(
        &self,
        record: &HostRecord,
        ttl: Duration,
    ) -> Result<Registration, ClusterError> {
        let lease = Arc::new(AtomicI64::new(put_leased(self, record, ttl).await?));
        let (latest, updates) = watch::channel(record.clone());
        let renew = tokio::spawn(renew(self.clone(), ttl, lease.clone(), updates));
        Ok(Registration {
            cluster: self.clone(),
            lease,
            latest,
            renew,
        })
    }

    /// Every host registered now, by name.
    ///
    /// # Errors
    /// [`ClusterError`] if etcd does not answer or a record is malformed.
    pub async fn hosts(&self) -> Result<Vec<HostRecord>, ClusterError> {
        let got = self.get_prefix(HOSTS).await?;
        let mut hosts = got
            .kvs()
            .iter()
            .map(|kv| decode::<HostRecord>(kv.key(), kv.value()))
            .collect::<Result<Vec<_>, _>>()?;
        hosts.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(hosts)
    }
}

impl Registration {
    /// Writes `record` again (its domains, free RAM), under the lease in
    /// force.
    pub fn update(&self, record: &HostRecord) {
        self.latest.send_replace(record.clone());
    }

    /// Leaves the cluster now: the lease is revoked and the record gone.
    ///
    /// # Errors
    /// [`ClusterError::Etcd`].
    pub async fn leave(self) -> Result<(), ClusterError> {
        self.renew.abort();
        crate::connect::bounded(
            self.cluster
                .client
                .clone()
                .lease_revoke(self.lease.load(Ordering::SeqCst)),
        )
        .await
        .map_err(self.cluster.etcd_error())?;
        Ok(())
    }
}
