//! Drains: emptying a host of its guests. A drain is one record,
//! `/livemig/drains/ID`, holding what was asked and, as the controller
//! works, every guest's state; a marker, `/livemig/draining/HOST`, makes
//! one drain per host at a time. The operator's CLI creates the record (and
//! cordons the host) in one transaction; from then on only the leading
//! controller writes it, each write conditioned on its leadership and on
//! the record being the one it read, so a controller that took over
//! resumes from exactly what its predecessor recorded.

use etcd_client::{Compare, CompareOp, Txn, TxnOp, TxnOpResponse};
use serde::{Deserialize, Serialize};

use crate::connect::{bounded, decode, Cluster, ClusterError};
use crate::cordon::Cordon;
use crate::leader::Leadership;

const DRAINS: &str = "/livemig/drains/";
const DRAINING: &str = "/livemig/draining/";

/// Where a drain stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DrainState {
    /// Recorded; no controller has planned it yet.
    Pending,
    /// A controller is moving its guests.
    Running,
    /// The host runs no guest.
    Done,
    /// It ended with guests left on the host (each says why).
    Failed,
}

impl DrainState {
    /// Done or failed.
    pub fn ended(self) -> bool {
        matches!(self, DrainState::Done | DrainState::Failed)
    }
}

/// Where one guest of a drain stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GuestState {
    /// Not started yet.
    Waiting,
    /// Its migration runs (or is being started).
    Migrating,
    /// It runs on its destination.
    Moved,
    /// No host could take it; it still runs on the drained host.
    Failed,
}

/// What a guest's migration cost, from its job record.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct GuestCost {
    /// Milliseconds from start to switchover.
    pub time_ms: u64,
    /// Bytes sent.
    pub bytes: u64,
    /// Highest vCPU throttle, percent.
    pub max_throttle_pct: f64,
    /// Milliseconds paused at switchover.
    pub downtime_ms: Option<u64>,
}

/// One guest of a drain.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrainGuest {
    /// The domain.
    pub domain: String,
    /// Its RAM, MiB.
    pub memory_mib: u64,
    /// Where it stands.
    pub state: GuestState,
    /// Where it goes (or went).
    #[serde(default)]
    pub destination: Option<String>,
    /// Its migration job on the drained host's agent.
    #[serde(default)]
    pub job_id: Option<String>,
    /// The migration's predicted time at the bandwidth it was planned
    /// with, seconds.
    #[serde(default)]
    pub predicted_secs: Option<f64>,
    /// Its measured dirty rate, bytes per second (absent: not measured,
    /// planned as idle).
    #[serde(default)]
    pub dirty_rate: Option<f64>,
    /// The memory it keeps rewriting, bytes.
    #[serde(default)]
    pub working_set: Option<f64>,
    /// The dirty rate is only a lower bound (the guest rewrote its whole
    /// working set within the shortest measurement window).
    #[serde(default)]
    pub dirty_rate_is_lower_bound: bool,
    /// What its first pass sends (the memory in use), bytes.
    #[serde(default)]
    pub first_pass_bytes: Option<f64>,
    /// Its labels (which policy applies).
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// How far its migration is, 0 to 1 (never runs backwards).
    #[serde(default)]
    pub progress: f64,
    /// The bandwidth it has now, MiB/s.
    #[serde(default)]
    pub bandwidth_mib_s: Option<u64>,
    /// Seconds its migration should still take, as last seen: the
    /// prediction's rest, or what is left to send at its bandwidth once
    /// it overran the prediction.
    #[serde(default)]
    pub remaining_secs: Option<f64>,
    /// Its migration is in post-copy: the guest runs on its destination
    /// while pages are still on the source.
    #[serde(default)]
    pub postcopy_active: bool,
    /// Hosts it failed to move to, and why.
    #[serde(default)]
    pub failures: Vec<String>,
    /// What moving it cost.
    #[serde(default)]
    pub cost: Option<GuestCost>,
    /// Why it is still on the host, for a failed guest.
    #[serde(default)]
    pub error: Option<String>,
    /// When its migration started (Unix ms).
    #[serde(default)]
    pub started_at_ms: Option<u64>,
    /// When its last attempt failed (Unix ms): a host it failed on is
    /// tried again only after a backoff.
    #[serde(default)]
    pub failed_at_ms: Option<u64>,
    /// Why a waiting guest can go nowhere now: it waits for a host (one
    /// coming back, RAM freed, a cordon lifted) for the controller's
    /// patience, then fails.
    #[serde(default)]
    pub blocked: Option<Blocked>,
}

/// A waiting guest no host can take now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blocked {
    /// Since when (Unix ms).
    pub since_ms: u64,
    /// Why, per host.
    pub why: String,
}

/// A drain, as recorded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrainRecord {
    /// Its id.
    pub id: String,
    /// The host being emptied.
    pub host: String,
    /// Only these hosts may take its guests (empty: any).
    #[serde(default)]
    pub to: Vec<String>,
    /// At most this many of its migrations at once.
    #[serde(default)]
    pub max_parallel: Option<u32>,
    /// Where it stands.
    pub state: DrainState,
    /// Its guests.
    #[serde(default)]
    pub guests: Vec<DrainGuest>,
    /// When it was asked for (Unix ms).
    pub created_at_ms: u64,
    /// When it ended (Unix ms).
    #[serde(default)]
    pub ended_at_ms: Option<u64>,
    /// The controller working on it.
    #[serde(default)]
    pub controller: Option<String>,
    /// Its predicted length from the start, seconds.
    #[serde(default)]
    pub predicted_secs: Option<f64>,
    /// The shortest it could take: the bytes each link must carry at its
    /// bandwidth, or the longest single guest.
    #[serde(default)]
    pub lower_bound_secs: Option<f64>,
    /// What the controller last had to say about it.
    #[serde(default)]
    pub note: Option<String>,
}

/// What starting a drain found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DrainStart {
    /// Recorded, and the host cordoned.
    Started,
    /// The host is being drained already, by this drain.
    AlreadyDraining(String),
}

/// A drain as read, with the revision a write must find unchanged.
#[derive(Debug, Clone, PartialEq)]
pub struct Versioned {
    /// The record.
    pub record: DrainRecord,
    /// Its etcd modification revision.
    pub revision: i64,
}

/// Unix time now, in milliseconds: the clock every record carries.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl DrainRecord {
    /// A drain of `host` asked for at `created_at_ms`, for a controller to
    /// plan; its id names the host and the time.
    pub fn pending(
        host: &str,
        to: &[String],
        max_parallel: Option<u32>,
        created_at_ms: u64,
    ) -> DrainRecord {
        DrainRecord {
            id: format!("{host}-{created_at_ms}"),
            host: host.to_string(),
            to: to.to_vec(),
            max_parallel,
            state: DrainState::Pending,
            guests: Vec::new(),
            created_at_ms,
            ended_at_ms: None,
            controller: None,
            predicted_secs: None,
            lower_bound_secs: None,
            note: None,
        }
    }
}

impl DrainGuest {
    /// A guest not yet started, known only by name and RAM.
    pub fn waiting(domain: &str, memory_mib: u64) -> DrainGuest {
        DrainGuest {
            domain: domain.to_string(),
            memory_mib,
            state: GuestState::Waiting,
            destination: None,
            job_id: None,
            predicted_secs: None,
            dirty_rate: None,
            working_set: None,
            dirty_rate_is_lower_bound: false,
            first_pass_bytes: None,
            labels: std::collections::BTreeMap::new(),
            progress: 0.0,
            bandwidth_mib_s: None,
            remaining_secs: None,
            postcopy_active: false,
            failures: Vec::new(),
            cost: None,
            error: None,
            started_at_ms: None,
            failed_at_ms: None,
            blocked: None,
        }
    }
}

impl Cluster {
    /// Wakes on any change to any drain.
    pub fn drains_changes(&self) -> crate::Changes {
        self.changes(DRAINS)
    }

    /// Wakes on changes to drain `id`.
    pub fn drain_changes(&self, id: &str) -> crate::Changes {
        self.changes(&record_key(id))
    }
}

fn record_key(id: &str) -> String {
    format!("{DRAINS}{id}")
}

fn marker_key(host: &str) -> String {
    format!("{DRAINING}{host}")
}

fn encode(record: &DrainRecord) -> Vec<u8> {
    serde_json::to_vec(record).expect("a drain record always serializes")
}

impl Cluster {
    /// Records a new drain and cordons its host, unless the host is being
    /// drained already.
    ///
    /// # Errors
    /// [`ClusterError::Etcd`].
    pub async fn start_drain(
        &self,
        record: &DrainRecord,
        cordon: &Cordon,
    ) -> Result<DrainStart, ClusterError> {
        let marker = marker_key(&record.host);
        let cordon = serde_json::to_vec(cordon).expect("a cordon always serializes");
        let txn = Txn::new()
            .when([Compare::create_revision(
                marker.clone(),
                CompareOp::Equal,
                0,
            )])
            .and_then([
                TxnOp::put(marker.clone(), record.id.clone(), None),
                TxnOp::put(record_key(&record.id), encode(record), None),
                TxnOp::put(format!("/livemig/cordons/{}", record.host), cordon, None),
            ])
            .or_else([TxnOp::get(marker, None)]);
        let answer = bounded(self.client.clone().txn(txn))
            .await
            .map_err(self.etcd_error())?;
        if answer.succeeded() {
            return Ok(DrainStart::Started);
        }
        let holder = answer.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(got) => got
                .kvs()
                .first()
                .map(|kv| String::from_utf8_lossy(kv.value()).into_owned()),
            _ => None,
        });
        Ok(DrainStart::AlreadyDraining(holder.unwrap_or_default()))
    }

    /// Every drain, oldest first.
    ///
    /// # Errors
    /// [`ClusterError`].
    pub async fn drains(&self) -> Result<Vec<Versioned>, ClusterError> {
        let got = self.get_prefix(DRAINS).await?;
        let mut drains = got
            .kvs()
            .iter()
            .map(|kv| {
                Ok(Versioned {
                    record: decode(kv.key(), kv.value())?,
                    revision: kv.mod_revision(),
                })
            })
            .collect::<Result<Vec<_>, ClusterError>>()?;
        drains.sort_by(|a, b| {
            (a.record.created_at_ms, &a.record.id).cmp(&(b.record.created_at_ms, &b.record.id))
        });
        Ok(drains)
    }

    /// One drain.
    ///
    /// # Errors
    /// [`ClusterError`].
    pub async fn drain(&self, id: &str) -> Result<Option<Versioned>, ClusterError> {
        let got = bounded(self.client.clone().get(record_key(id), None))
            .await
            .map_err(self.etcd_error())?;
        got.kvs()
            .first()
            .map(|kv| {
                Ok(Versioned {
                    record: decode(kv.key(), kv.value())?,
                    revision: kv.mod_revision(),
                })
            })
            .transpose()
    }

    /// Writes a drain the leader read at `revision`; an ended drain frees
    /// its host for the next one. Returns the new revision, or `None` if
    /// this controller no longer leads or the record changed meanwhile.
    ///
    /// # Errors
    /// [`ClusterError::Etcd`].
    pub async fn save_drain(
        &self,
        leadership: &Leadership,
        record: &DrainRecord,
        revision: i64,
    ) -> Result<Option<i64>, ClusterError> {
        let key = record_key(&record.id);
        let mut ops = vec![TxnOp::put(key.clone(), encode(record), None)];
        if record.state.ended() {
            ops.push(TxnOp::delete(marker_key(&record.host), None));
        }
        let compares = vec![Compare::mod_revision(key, CompareOp::Equal, revision)];
        let answers = self.as_leader(leadership, compares, ops).await?;
        Ok(answers.and_then(|answers| {
            answers.into_iter().find_map(|a| match a {
                TxnOpResponse::Put(put) => put.header().map(|h| h.revision()),
                _ => None,
            })
        }))
    }
}
