//! Which controller leads: one key, `/livemig/controller/leader`, created
//! in a transaction only while absent and attached to the leader's lease,
//! so it vanishes within the lease of the leader dying and the next
//! campaign wins. Everything the leader writes is conditioned on that key
//! still being under its lease ([`Leadership::guard`]): a leader that was
//! cut off and replaced cannot overwrite its successor's decisions.
//!
//! Beside it, under the same lease, the leader's limits
//! (`/livemig/controller/limits`): what `livemig drain --dry-run` plans
//! with, so that its prediction is the schedule the leader will run.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Compare, CompareOp, PutOptions, Txn, TxnOp, TxnOpResponse};
use serde::{Deserialize, Serialize};

use crate::connect::{bounded, decode, Cluster, ClusterError};

/// Where the controllers' keys are.
const CONTROLLER: &str = "/livemig/controller/";

/// The leader key.
pub const LEADER: &str = "/livemig/controller/leader";

/// The leader's limits.
pub const LIMITS: &str = "/livemig/controller/limits";

/// The limits a controller never exceeds, whatever its schedule (`None`:
/// no limit).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Migrations leaving one host at once.
    pub outbound: Option<u32>,
    /// Migrations arriving at one host at once.
    pub inbound: Option<u32>,
    /// Migrations in the cluster at once.
    pub cluster: Option<u32>,
}

/// This controller leads, while [`Leadership::is_leading`] says so.
#[derive(Debug)]
pub struct Leadership {
    cluster: Cluster,
    lease: i64,
    leading: Arc<AtomicBool>,
    keeper: tokio::task::JoinHandle<()>,
}

impl Leadership {
    /// False once the lease could not be renewed within its time: another
    /// controller may lead by now.
    pub fn is_leading(&self) -> bool {
        self.leading.load(Ordering::SeqCst)
    }

    /// The condition under which a write of the leader's may land.
    pub fn guard(&self) -> Compare {
        Compare::lease(LEADER, CompareOp::Equal, self.lease)
    }

    /// Gives leadership up at once (a clean shutdown), so a standby need
    /// not wait out the lease.
    pub async fn resign(self) {
        self.keeper.abort();
        let _ = bounded(self.cluster.client.clone().lease_revoke(self.lease)).await;
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.keeper.abort();
    }
}

impl Cluster {
    /// Becomes the leader as `name`, with `limits`, if nobody leads;
    /// `None` if another controller does.
    ///
    /// # Errors
    /// [`ClusterError::Etcd`].
    pub async fn campaign(
        &self,
        name: &str,
        limits: &Limits,
        ttl: Duration,
    ) -> Result<Option<Leadership>, ClusterError> {
        let mut client = self.client.clone();
        let lease = bounded(client.lease_grant(ttl.as_secs().max(1) as i64, None))
            .await
            .map_err(self.etcd_error())?
            .id();
        let limits = serde_json::to_vec(limits).expect("limits serialize");
        let txn = Txn::new()
            .when([Compare::create_revision(LEADER, CompareOp::Equal, 0)])
            .and_then([
                TxnOp::put(LEADER, name, Some(PutOptions::new().with_lease(lease))),
                TxnOp::put(LIMITS, limits, Some(PutOptions::new().with_lease(lease))),
            ]);
        let won = bounded(client.txn(txn))
            .await
            .map_err(self.etcd_error())?
            .succeeded();
        if !won {
            let _ = bounded(client.lease_revoke(lease)).await;
            return Ok(None);
        }
        let leading = Arc::new(AtomicBool::new(true));
        let keeper = tokio::spawn(keep(self.clone(), lease, ttl, leading.clone()));
        Ok(Some(Leadership {
            cluster: self.clone(),
            lease,
            leading,
            keeper,
        }))
    }

    /// The leading controller's name, if one leads.
    ///
    /// # Errors
    /// [`ClusterError::Etcd`].
    pub async fn leader(&self) -> Result<Option<String>, ClusterError> {
        let got = bounded(self.client.clone().get(LEADER, None))
            .await
            .map_err(self.etcd_error())?;
        Ok(got
            .kvs()
            .first()
            .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()))
    }

    /// The leading controller's name and limits, if one leads.
    ///
    /// # Errors
    /// [`ClusterError::Etcd`]; [`ClusterError::Record`] for limits that do
    /// not parse.
    pub async fn leader_limits(&self) -> Result<Option<(String, Limits)>, ClusterError> {
        // Both keys in one read, at one revision: never one leader's name
        // with another's limits.
        let got = self.get_prefix(CONTROLLER).await?;
        let value = |key: &str| got.kvs().iter().find(|kv| kv.key() == key.as_bytes());
        let Some(name) = value(LEADER) else {
            return Ok(None);
        };
        let limits = match value(LIMITS) {
            Some(kv) => decode(kv.key(), kv.value())?,
            // A leader that has not said (or an older controller).
            None => Limits::default(),
        };
        Ok(Some((
            String::from_utf8_lossy(name.value()).into_owned(),
            limits,
        )))
    }

    /// Runs `ops` if this controller still leads; returns whether they ran
    /// (and their answers).
    ///
    /// # Errors
    /// [`ClusterError::Etcd`].
    pub(crate) async fn as_leader(
        &self,
        leadership: &Leadership,
        mut compares: Vec<Compare>,
        ops: Vec<TxnOp>,
    ) -> Result<Option<Vec<TxnOpResponse>>, ClusterError> {
        compares.push(leadership.guard());
        let answer = bounded(
            self.client
                .clone()
                .txn(Txn::new().when(compares).and_then(ops)),
        )
        .await
        .map_err(self.etcd_error())?;
        Ok(answer
            .succeeded()
            .then(|| answer.op_responses().into_iter().collect()))
    }
}

/// Renews the lease until it cannot; then says leadership is lost.
async fn keep(cluster: Cluster, lease: i64, ttl: Duration, leading: Arc<AtomicBool>) {
    let every = (ttl / 3).max(Duration::from_millis(200));
    let mut heard = tokio::time::Instant::now();
    let mut client = cluster.client.clone();
    let Ok((mut keeper, mut answers)) = bounded(client.lease_keep_alive(lease)).await else {
        leading.store(false, Ordering::SeqCst);
        return;
    };
    loop {
        tokio::time::sleep(every).await;
        let renewed = async {
            keeper.keep_alive().await?;
            answers.message().await
        };
        match tokio::time::timeout(every, renewed).await {
            Ok(Ok(Some(answer))) if answer.ttl() > 0 => heard = tokio::time::Instant::now(),
            // The lease is gone: someone else may lead.
            Ok(Ok(_)) => break,
            // Unheard for a while: step down before the lease can have
            // run out, so two leaders never act at once in good faith.
            _ if heard.elapsed() > ttl / 2 => break,
            _ => {}
        }
    }
    leading.store(false, Ordering::SeqCst);
}
