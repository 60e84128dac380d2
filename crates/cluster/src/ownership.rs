//! Which host runs a domain: one key per domain, `/livemig/domains/NAME`,
//! holding the host's name. It is claimed when the domain starts, handed
//! from the source to the destination in one transaction at switchover,
//! and released when the domain stops, each a compare-and-swap on the
//! holder, so the cluster's view never shows two owners and a host whose
//! agent died keeps its domains (no lease: nobody starts them elsewhere
//! behind its back).

use std::collections::BTreeMap;

use etcd_client::{Compare, CompareOp, Txn, TxnOp, TxnOpResponse};

use crate::connect::{Cluster, ClusterError};

/// Where the owners live.
const DOMAINS: &str = "/livemig/domains/";

fn key(domain: &str) -> String {
    format!("{DOMAINS}{domain}")
}

/// What a claim found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The domain is this host's now (or was already).
    Granted,
    /// Another host holds it.
    HeldBy(String),
}

impl Cluster {
    /// Claims `domain` for `host`, unless another host holds it.
    ///
    /// # Errors
    /// [`ClusterError::Etcd`].
    pub async fn claim(&self, domain: &str, host: &str) -> Result<Claim, ClusterError> {
        let key = key(domain);
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key.clone(), host, None)])
            .or_else([TxnOp::get(key, None)]);
        let answer = crate::connect::bounded(self.client.clone().txn(txn))
            .await
            .map_err(self.etcd_error())?;
        if answer.succeeded() {
            return Ok(Claim::Granted);
        }
        let holder = answer.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(got) => got
                .kvs()
                .first()
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
            _ => None,
        });
        Ok(match holder {
            Some(holder) if holder != host => Claim::HeldBy(holder),
            // Ours already, or released in between: ours to take.
            Some(_) => Claim::Granted,
            None => Box::pin(self.claim(domain, host)).await?,
        })
    }

    /// Hands `domain` from `from` to `to`, if `from` holds it. Returns
    /// whether it did.
    ///
    /// # Errors
    /// [`ClusterError::Etcd`].
    pub async fn hand_over(
        &self,
        domain: &str,
        from: &str,
        to: &str,
    ) -> Result<bool, ClusterError> {
        let key = key(domain);
        let txn = Txn::new()
            .when([Compare::value(key.clone(), CompareOp::Equal, from)])
            .and_then([TxnOp::put(key, to, None)]);
        let answer = crate::connect::bounded(self.client.clone().txn(txn))
            .await
            .map_err(self.etcd_error())?;
        Ok(answer.succeeded())
    }

    /// Hands `domain` from `from` to `to` where it runs as `arriving` (the
    /// same name, or the one it was renamed to on the way): in one
    /// transaction, if `from` holds `domain` and `arriving` is nobody's
    /// but `to`'s. Returns whether it did.
    ///
    /// # Errors
    /// [`ClusterError::Etcd`].
    pub async fn hand_over_as(
        &self,
        domain: &str,
        arriving: &str,
        from: &str,
        to: &str,
    ) -> Result<bool, ClusterError> {
        if domain == arriving {
            return self.hand_over(domain, from, to).await;
        }
        let (old, new) = (key(domain), key(arriving));
        for new_is_free in [
            Compare::create_revision(new.clone(), CompareOp::Equal, 0),
            Compare::value(new.clone(), CompareOp::Equal, to),
        ] {
            let txn = Txn::new()
                .when([
                    Compare::value(old.clone(), CompareOp::Equal, from),
                    new_is_free,
                ])
                .and_then([
                    TxnOp::delete(old.clone(), None),
                    TxnOp::put(new.clone(), to, None),
                ]);
            let answer = crate::connect::bounded(self.client.clone().txn(txn))
                .await
                .map_err(self.etcd_error())?;
            if answer.succeeded() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Releases `domain` if `host` holds it. Returns whether it did.
    ///
    /// # Errors
    /// [`ClusterError::Etcd`].
    pub async fn release(&self, domain: &str, host: &str) -> Result<bool, ClusterError> {
        let key = key(domain);
        let txn = Txn::new()
            .when([Compare::value(key.clone(), CompareOp::Equal, host)])
            .and_then([TxnOp::delete(key, None)]);
        let answer = crate::connect::bounded(self.client.clone().txn(txn))
            .await
            .map_err(self.etcd_error())?;
        Ok(answer.succeeded())
    }

    /// Every domain's owner, by domain.
    ///
    /// # Errors
    /// [`ClusterError::Etcd`].
    pub async fn owners(&self) -> Result<BTreeMap<String, String>, ClusterError> {
        let got = self.get_prefix(DOMAINS).await?;
        Ok(got
            .kvs()
            .iter()
            .map(|kv| {
                let key = String::from_utf8_lossy(kv.key());
                (
                    key.trim_start_matches(DOMAINS).to_string(),
                    String::from_utf8_lossy(kv.value()).into_owned(),
                )
            })
            .collect())
    }
}
