//! Cordoned hosts: no new guest lands on one (no incoming migration, no
//! placement), while what runs there goes on. One key per host,
//! `/livemig/cordons/NAME`, with who cordoned it, why and when; not under
//! a lease, so a cordon outlives the agent (a host cordoned for
//! maintenance stays cordoned across its reboot).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::connect::{decode, Cluster, ClusterError};

/// Where cordons live.
const CORDONS: &str = "/livemig/cordons/";

/// Why a host is cordoned.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cordon {
    /// Why, as the operator said.
    pub reason: String,
    /// When (Unix ms).
    pub at_ms: u64,
}

impl Cluster {
    /// Cordons `host`.
    ///
    /// # Errors
    /// [`ClusterError::Etcd`].
    pub async fn cordon(&self, host: &str, cordon: &Cordon) -> Result<(), ClusterError> {
        let value = serde_json::to_vec(cordon).expect("a cordon always serializes");
        crate::connect::bounded(
            self.client
                .clone()
                .put(format!("{CORDONS}{host}"), value, None),
        )
        .await
        .map_err(self.etcd_error())?;
        Ok(())
    }

    /// Uncordons `host`; returns whether it was cordoned.
    ///
    /// # Errors
    /// [`ClusterError::Etcd`].
    pub async fn uncordon(&self, host: &str) -> Result<bool, ClusterError> {
        let deleted =
            crate::connect::bounded(self.client.clone().delete(format!("{CORDONS}{host}"), None))
                .await
                .map_err(self.etcd_error())?;
        Ok(deleted.deleted() > 0)
    }

    /// The cordon on `host`, if any.
    ///
    /// # Errors
    /// [`ClusterError`].
    pub async fn cordon_of(&self, host: &str) -> Result<Option<Cordon>, ClusterError> {
        let key = format!("{CORDONS}{host}");
        let got = crate::connect::bounded(self.client.clone().get(key.clone(), None))
            .await
            .map_err(self.etcd_error())?;
        got.kvs()
            .first()
            .map(|kv| decode(kv.key(), kv.value()))
            .transpose()
    }

    /// Every cordon, by host.
    ///
    /// # Errors
    /// [`ClusterError`].
    pub async fn cordons(&self) -> Result<BTreeMap<String, Cordon>, ClusterError> {
        let got = self.get_prefix(CORDONS).await?;
        got.kvs()
            .iter()
            .map(|kv| {
                let key = String::from_utf8_lossy(kv.key());
                let cordon = decode(kv.key(), kv.value())?;
                Ok((key.trim_start_matches(CORDONS).to_string(), cordon))
            })
            .collect()
    }
}
