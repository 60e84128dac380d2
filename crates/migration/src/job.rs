//! Migration jobs as the user sees them: live statistics (`domjobinfo`) and
//! the record kept when a job ends.

use std::fmt;

use qmp::commands::migration::MigrationInfo;
use serde::{Deserialize, Serialize};

/// Which half of a migration an agent runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Source,
    Destination,
}

/// The phases of a migration, libvirt's v3 shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Source: validate flags, probe both QEMU binaries.
    Begin,
    /// Destination: start QEMU with `-incoming defer`, listen.
    Prepare,
    /// Source: copy memory until QEMU switches over.
    Perform,
    /// Destination: resume the guest.
    Finish,
    /// Source: stop its QEMU (or resume it if Finish failed).
    Confirm,
    /// Undo after a failure.
    Cleanup,
    Done,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = serde_json::to_value(self).ok();
        f.write_str(name.as_ref().and_then(|v| v.as_str()).unwrap_or("?"))
    }
}

/// How a job ended, or that it has not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Active,
    Completed,
    Failed,
    Cancelled,
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            JobStatus::Active => "active",
            JobStatus::Completed => "completed",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        })
    }
}

/// One reading of QEMU's `query-migrate` on the source, in our units.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobStats {
    /// QEMU's own migration status (`active`, `completed`, ...).
    pub qemu_status: Option<String>,
    pub total_time_ms: Option<u64>,
    pub setup_time_ms: Option<u64>,
    pub downtime_ms: Option<u64>,
    pub expected_downtime_ms: Option<u64>,
    pub memory_total_bytes: Option<u64>,
    pub memory_processed_bytes: Option<u64>,
    pub memory_remaining_bytes: Option<u64>,
    pub constant_pages: Option<u64>,
    pub normal_pages: Option<u64>,
    pub normal_bytes: Option<u64>,
    /// Transfer rate QEMU measured, MiB/s.
    pub bandwidth_mib_s: Option<f64>,
    /// Pages dirtied per second in the last period (saturates at working
    /// set / pass time, so it under-reports hot writers).
    pub dirty_rate_pages_s: Option<u64>,
    /// Completed passes over memory (dirty-bitmap syncs).
    pub iteration: Option<u64>,
    pub page_size: Option<u64>,
    pub cpu_throttle_pct: Option<u64>,
    pub postcopy_requests: Option<u64>,
}

impl JobStats {
    /// Converts a `query-migrate` reply.
    pub fn from_qemu(info: &MigrationInfo) -> Self {
        let ram = info.ram.clone().unwrap_or_default();
        let status = info
            .status
            .and_then(|s| serde_json::to_value(s).ok())
            .and_then(|v| v.as_str().map(str::to_string));
        JobStats {
            qemu_status: status,
            total_time_ms: info.total_time,
            setup_time_ms: info.setup_time,
            downtime_ms: info.downtime,
            expected_downtime_ms: info.expected_downtime,
            memory_total_bytes: ram.total,
            memory_processed_bytes: ram.transferred,
            memory_remaining_bytes: ram.remaining,
            constant_pages: ram.duplicate,
            normal_pages: ram.normal,
            normal_bytes: ram.normal_bytes,
            // QEMU reports megabits per second.
            bandwidth_mib_s: ram
                .mbps
                .map(|mbps| mbps * 1e6 / 8.0 / f64::from(1u32 << 20)),
            dirty_rate_pages_s: ram.dirty_pages_rate,
            iteration: ram.dirty_sync_count,
            page_size: ram.page_size,
            cpu_throttle_pct: info.cpu_throttle_percentage,
            postcopy_requests: ram.postcopy_requests,
        }
    }

    /// Fills the fields `other` has and `self` lacks: QEMU drops the RAM
    /// statistics in some states, and a job keeps the last ones it saw.
    pub fn merged_over(mut self, older: &JobStats) -> JobStats {
        macro_rules! keep {
            ($($f:ident),*) => {$( if self.$f.is_none() { self.$f = older.$f.clone(); } )*};
        }
        keep!(
            total_time_ms,
            setup_time_ms,
            memory_total_bytes,
            memory_processed_bytes,
            memory_remaining_bytes,
            constant_pages,
            normal_pages,
            normal_bytes,
            bandwidth_mib_s,
            iteration,
            page_size
        );
        self
    }
}

/// Something the job did, when: a throttle change, a downtime raise, the
/// switch to post-copy, the timeout action, the throttle's release.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimedAction {
    /// Milliseconds since the migration started.
    pub t_ms: u64,
    /// `throttle`, `downtime`, `postcopy`, `cancel`, `suspend`, `release`,
    /// `measure`.
    pub action: String,
    /// The new value, if any (percent for throttle, ms for downtime).
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
    pub remaining_bytes: u64,
    pub transferred_bytes: u64,
    /// MiB/s QEMU measured.
    pub bandwidth_mib_s: f64,
    /// MiB/s newly dirtied (QEMU's figure; saturates for hot writers).
    pub dirty_rate_mib_s: f64,
    /// vCPU throttle in force (QEMU's or livemig's), percent.
    pub throttle_pct: f64,
    pub expected_downtime_ms: Option<u64>,
}

impl Sample {
    /// A sample from QEMU's statistics at `t_ms`, with our throttle.
    pub fn from_stats(t_ms: u64, stats: &JobStats, our_throttle_pct: f64) -> Self {
        const MIB: f64 = 1024.0 * 1024.0;
        Sample {
            t_ms,
            status: stats.qemu_status.clone().unwrap_or_default(),
            pass: stats.iteration.unwrap_or(0),
            remaining_bytes: stats.memory_remaining_bytes.unwrap_or(0),
            transferred_bytes: stats.memory_processed_bytes.unwrap_or(0),
            bandwidth_mib_s: stats.bandwidth_mib_s.unwrap_or(0.0),
            dirty_rate_mib_s: stats
                .dirty_rate_pages_s
                .zip(stats.page_size)
                .map_or(0.0, |(pages, size)| (pages * size) as f64 / MIB),
            throttle_pct: our_throttle_pct.max(stats.cpu_throttle_pct.unwrap_or(0) as f64),
            expected_downtime_ms: stats.expected_downtime_ms,
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

/// A job while it runs (and the last one, with `--completed`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobInfo {
    pub id: String,
    pub domain: String,
    pub role: Role,
    pub phase: Phase,
    pub status: JobStatus,
    pub flags: Vec<String>,
    /// Unix time in milliseconds.
    pub started_at_ms: u64,
    pub elapsed_ms: u64,
    pub stats: JobStats,
    /// Highest vCPU throttle so far (QEMU's or livemig's), percent.
    pub max_cpu_throttle_pct: f64,
    /// vCPU throttle in force now, percent.
    #[serde(default)]
    pub throttle_pct: f64,
    /// Convergence mode: none, qemu or adaptive.
    #[serde(default)]
    pub converge: String,
    #[serde(default)]
    pub actions: Vec<TimedAction>,
    /// Estimated impact on the guest so far: seconds of full-speed guest
    /// time lost to the vCPU throttle.
    #[serde(default)]
    pub guest_work_lost_s: f64,
    /// The bandwidth cap in force, MiB/s (`None`: uncapped, or not known).
    #[serde(default)]
    pub bandwidth_limit_mib_s: Option<u64>,
    /// The downtime limit in force, ms.
    #[serde(default)]
    pub downtime_limit_ms: Option<u64>,
    pub error: Option<String>,
}

/// The record of a finished job: printed as the last line of
/// `migrate --json` and kept in the agent's history. Scripts rely on these
/// field names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: String,
    pub domain: String,
    /// Agent URI of the source host.
    pub source: String,
    /// Agent URI of the destination host.
    pub destination: String,
    pub status: JobStatus,
    pub error: Option<String>,
    pub flags: Vec<String>,
    pub auto_converge: bool,
    pub total_time_ms: u64,
    pub setup_time_ms: Option<u64>,
    pub downtime_ms: Option<u64>,
    pub transferred_bytes: u64,
    pub iterations: u64,
    /// Highest vCPU throttle seen (QEMU's or livemig's), percent.
    pub max_cpu_throttle_pct: f64,
    /// Convergence mode: none, qemu or adaptive.
    #[serde(default)]
    pub converge: String,
    /// The timeline of what the job did.
    #[serde(default)]
    pub actions: Vec<TimedAction>,
    /// The phase the job was in when it ended.
    pub phase: Phase,
    pub started_at_ms: u64,
    pub finished_at_ms: u64,
    /// Data URI the memory went over.
    #[serde(default)]
    pub data_uri: Option<String>,
    /// What was done to leave the VM running after a failure.
    #[serde(default)]
    pub recovery: Option<String>,
    /// Which half of the migration this agent ran.
    #[serde(default = "source_role")]
    pub role: Role,
    /// The last statistics QEMU reported.
    #[serde(default)]
    pub stats: JobStats,
    /// The timeline: one sample per poll.
    #[serde(default)]
    pub samples: Vec<Sample>,
}

fn source_role() -> Role {
    Role::Source
}

impl JobRecord {
    /// The record shown as job info (`domjobinfo --completed`).
    pub fn as_info(&self) -> JobInfo {
        JobInfo {
            id: self.id.clone(),
            domain: self.domain.clone(),
            role: self.role,
            phase: self.phase,
            status: self.status,
            flags: self.flags.clone(),
            started_at_ms: self.started_at_ms,
            elapsed_ms: self.total_time_ms,
            stats: self.stats.clone(),
            max_cpu_throttle_pct: self.max_cpu_throttle_pct,
            throttle_pct: 0.0,
            converge: self.converge.clone(),
            actions: self.actions.clone(),
            guest_work_lost_s: work_lost_s(&self.samples),
            bandwidth_limit_mib_s: None,
            downtime_limit_ms: None,
            error: self.error.clone(),
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_qemu_units() {
        let info: MigrationInfo = serde_json::from_str(
            r#"{"status":"active","cpu-throttle-percentage":30,"expected-downtime":120,
                "ram":{"total":100,"transferred":40,"remaining":60,"mbps":536.870912,
                       "dirty-sync-count":4,"page-size":4096,"dirty-pages-rate":1000}}"#,
        )
        .unwrap();
        let stats = JobStats::from_qemu(&info);
        assert_eq!(stats.qemu_status.as_deref(), Some("active"));
        assert_eq!(stats.cpu_throttle_pct, Some(30));
        assert_eq!(stats.iteration, Some(4));
        assert!((stats.bandwidth_mib_s.unwrap() - 64.0).abs() < 1e-6);
    }

    #[test]
    fn merge_keeps_the_last_known_ram_figures() {
        let older = JobStats {
            memory_total_bytes: Some(10),
            iteration: Some(3),
            ..Default::default()
        };
        let newer = JobStats {
            qemu_status: Some("completed".into()),
            iteration: Some(5),
            ..Default::default()
        }
        .merged_over(&older);
        assert_eq!(newer.memory_total_bytes, Some(10));
        assert_eq!(newer.iteration, Some(5));
    }
}
