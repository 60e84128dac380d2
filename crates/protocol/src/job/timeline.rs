//! A job's timeline: what it did, and a reading of it at every poll.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::JobStats;

/// What a job did, in its timeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ActionKind {
    /// The dirty rate measured while the first pass ran (value: MiB/s).
    Measure,
    /// The vCPU throttle changed (value: percent).
    Throttle,
    /// The downtime limit changed (value: ms).
    Downtime,
    /// The bandwidth cap changed (value: MiB/s).
    Bandwidth,
    /// QEMU's own switchover held back or let go (value: QEMU's limit, ms).
    Hold,
    /// livemig paused the guest to switch over.
    Switchover,
    /// The switch to post-copy.
    Postcopy,
    /// The migration was cancelled (or the cancel was ignored).
    Cancel,
    /// The timeout paused the guest.
    Suspend,
    /// The throttle was lifted at the end.
    Release,
    /// The vCPUs found writing memory, the only ones throttled from then on
    /// (value: how many).
    Writers,
    /// The least CPU time the throttle can give the guest lets it dirty
    /// more than the downtime lets through (value: MiB per slice).
    Floor,
    /// A kind from a newer agent.
    #[serde(other)]
    Unknown,
}

impl ActionKind {
    /// The kind's wire name.
    pub fn name(self) -> &'static str {
        match self {
            ActionKind::Measure => "measure",
            ActionKind::Throttle => "throttle",
            ActionKind::Downtime => "downtime",
            ActionKind::Bandwidth => "bandwidth",
            ActionKind::Hold => "hold",
            ActionKind::Switchover => "switchover",
            ActionKind::Postcopy => "postcopy",
            ActionKind::Cancel => "cancel",
            ActionKind::Suspend => "suspend",
            ActionKind::Release => "release",
            ActionKind::Writers => "writers",
            ActionKind::Floor => "floor",
            ActionKind::Unknown => "unknown",
        }
    }
}

impl fmt::Display for ActionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Something the job did, when.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimedAction {
    /// Milliseconds since the migration started.
    pub t_ms: u64,
    /// What.
    pub action: ActionKind,
    /// The new value, if any, in the unit [`ActionKind`] gives.
    #[serde(default)]
    pub value: Option<f64>,
    /// Why, in words.
    pub detail: String,
}

/// One reading of the job, taken at every poll: the timeline a report
/// draws.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Milliseconds since the migration started.
    pub t_ms: u64,
    /// QEMU's migration status.
    pub status: String,
    /// Passes over memory so far.
    pub pass: u64,
    /// Bytes left in this pass.
    pub remaining_bytes: u64,
    /// Bytes sent so far.
    pub transferred_bytes: u64,
    /// MiB/s QEMU measured.
    pub bandwidth_mib_s: f64,
    /// MiB/s newly dirtied (QEMU's figure; saturates for hot writers).
    pub dirty_rate_mib_s: f64,
    /// vCPU throttle in force (QEMU's or livemig's), percent.
    pub throttle_pct: f64,
    /// QEMU's expected downtime, ms.
    pub expected_downtime_ms: Option<u64>,
    /// Bytes of the copied disks left to mirror, with `--copy-storage-*`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_remaining_bytes: Option<u64>,
    /// MiB/s the guest's writes add to the disks' copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_dirty_rate_mib_s: Option<f64>,
}

impl Sample {
    /// A sample of `stats` at `t_ms`, with livemig's throttle in percent.
    pub fn from_stats(t_ms: u64, stats: &JobStats, our_throttle_pct: f64) -> Self {
        Sample {
            t_ms,
            status: stats.qemu_status.clone().unwrap_or_default(),
            pass: stats.iteration.unwrap_or(0),
            remaining_bytes: stats.memory_remaining_bytes.unwrap_or(0),
            transferred_bytes: stats.memory_processed_bytes.unwrap_or(0),
            bandwidth_mib_s: stats.bandwidth_mib_s.unwrap_or(0.0),
            dirty_rate_mib_s: stats
                .dirty_rate_bytes_s()
                .map_or(0.0, |b| types::units::mib(b as f64)),
            throttle_pct: our_throttle_pct.max(stats.cpu_throttle_pct.unwrap_or(0) as f64),
            expected_downtime_ms: stats.expected_downtime_ms,
            disk_remaining_bytes: stats.disk_remaining_bytes(),
            disk_dirty_rate_mib_s: stats
                .disk_dirty_rate_bytes_s
                .map(|b| types::units::mib(b as f64)),
        }
    }
}

/// Seconds of full-speed guest time a throttle timeline cost: the throttle
/// integrated over time.
pub fn work_lost_s(samples: &[Sample]) -> f64 {
    samples
        .windows(2)
        .map(|w| w[1].t_ms.saturating_sub(w[0].t_ms) as f64 / 1000.0 * w[0].throttle_pct / 100.0)
        .sum()
}
