//! Hosts in the cluster: each agent keeps a record of its host under a
//! lease it renews; when the agent dies the lease runs out and the record
//! is gone within the lease's time to live.

use std::collections::BTreeMap;
use std::time::Duration;

use etcd_client::{GetOptions, PutOptions};
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use crate::connect::{Cluster, ClusterError};

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
#[derive(Debug)]
pub struct Registration {
    cluster: Cluster,
    lease: i64,
    key: String,
    renew: JoinHandle<()>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.renew.abort();
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
        let mut client = self.client.clone();
        let lease = client
            .lease_grant(ttl.as_secs().max(1) as i64, None)
            .await
            .map_err(self.etcd_error())?
            .id();
        let key = format!("{HOSTS}{}", record.name);
        let value = serde_json::to_vec(record).expect("a host record always serializes");
        client
            .put(
                key.clone(),
                value,
                Some(PutOptions::new().with_lease(lease)),
            )
            .await
            .map_err(self.etcd_error())?;
        let (mut keeper, mut answers) = client
            .lease_keep_alive(lease)
            .await
            .map_err(self.etcd_error())?;
        let every = (ttl / 3).max(Duration::from_millis(200));
        let name = record.name.clone();
        let renew = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let renewed = async {
                    keeper.keep_alive().await?;
                    answers.message().await
                };
                match tokio::time::timeout(every, renewed).await {
                    Ok(Ok(Some(answer))) if answer.ttl() > 0 => {}
                    Ok(Ok(_)) => {
                        tracing::error!(host = %name, "the cluster let this host's lease expire");
                        return;
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(host = %name, error = %e, "cannot renew this host's lease")
                    }
                    Err(_) => tracing::warn!(host = %name, "renewing this host's lease timed out"),
                }
            }
        });
        Ok(Registration {
            cluster: self.clone(),
            lease,
            key,
            renew,
        })
    }

    /// Every host registered now, by name.
    ///
    /// # Errors
    /// [`ClusterError`] if etcd does not answer or a record is malformed.
    pub async fn hosts(&self) -> Result<Vec<HostRecord>, ClusterError> {
        let mut client = self.client.clone();
        let got = client
            .get(HOSTS, Some(GetOptions::new().with_prefix()))
            .await
            .map_err(self.etcd_error())?;
        let mut hosts = got
            .kvs()
            .iter()
            .map(|kv| {
                serde_json::from_slice::<HostRecord>(kv.value()).map_err(|source| {
                    ClusterError::Record {
                        key: String::from_utf8_lossy(kv.key()).into_owned(),
                        source,
                    }
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        hosts.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(hosts)
    }
}

impl Registration {
    /// Writes `record` again (its domains, free RAM), under the same lease.
    ///
    /// # Errors
    /// [`ClusterError::Etcd`].
    pub async fn update(&self, record: &HostRecord) -> Result<(), ClusterError> {
        let value = serde_json::to_vec(record).expect("a host record always serializes");
        self.cluster
            .client
            .clone()
            .put(
                self.key.clone(),
                value,
                Some(PutOptions::new().with_lease(self.lease)),
            )
            .await
            .map_err(self.cluster.etcd_error())?;
        Ok(())
    }

    /// Leaves the cluster now: the lease is revoked and the record gone.
    ///
    /// # Errors
    /// [`ClusterError::Etcd`].
    pub async fn leave(self) -> Result<(), ClusterError> {
        self.renew.abort();
        self.cluster
            .client
            .clone()
            .lease_revoke(self.lease)
            .await
            .map_err(self.cluster.etcd_error())?;
        Ok(())
    }
}
