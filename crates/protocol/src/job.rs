//! Migration jobs as users and scripts see them: live statistics
//! (`domjobinfo`), the timeline, and the record kept when a job ends.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::migrate::ConvergeMode;

mod timeline;

pub use timeline::{work_lost_s, ActionKind, Sample, TimedAction};

/// Which half of a migration an agent runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// It sends the guest.
    Source,
    /// It receives the guest.
    Destination,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Source => "source",
            Role::Destination => "destination",
        })
    }
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
    /// Over.
    Done,
}

/// When a phase began.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhaseTime {
    /// The phase.
    pub phase: Phase,
    /// Ms after the source agent got the command.
    pub at_ms: u64,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Begin => "begin",
            Phase::Prepare => "prepare",
            Phase::Perform => "perform",
            Phase::Finish => "finish",
            Phase::Confirm => "confirm",
            Phase::Cleanup => "cleanup",
            Phase::Done => "done",
        })
    }
}

/// How a job ended, or that it has not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    /// It runs.
    Active,
    /// The guest runs on the destination.
    Completed,
    /// Something failed; the record says what was done about it.
    Failed,
    /// Cancelled on request; the guest stays on the source.
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
    /// QEMU's own word for the migration's state (`active`, `completed`,
    /// ...), as QEMU spells it.
    pub qemu_status: Option<String>,
    /// Milliseconds since QEMU started the migration.
    pub total_time_ms: Option<u64>,
    /// Milliseconds QEMU spent in setup.
    pub setup_time_ms: Option<u64>,
    /// Milliseconds the guest was paused at switchover.
    pub downtime_ms: Option<u64>,
    /// QEMU's estimate of the downtime if it switched over now.
    pub expected_downtime_ms: Option<u64>,
    /// Guest RAM, bytes.
    pub memory_total_bytes: Option<u64>,
    /// Bytes sent so far.
    pub memory_processed_bytes: Option<u64>,
    /// Bytes left to send in this pass.
    pub memory_remaining_bytes: Option<u64>,
    /// Pages sent as "all the same byte".
    pub constant_pages: Option<u64>,
    /// Pages sent whole.
    pub normal_pages: Option<u64>,
    /// Bytes of the pages sent whole.
    pub normal_bytes: Option<u64>,
    /// Transfer rate QEMU measured, MiB/s.
    pub bandwidth_mib_s: Option<f64>,
    /// Pages dirtied per second in the last period (saturates at working
    /// set / pass time, so it under-reports hot writers).
    pub dirty_rate_pages_s: Option<u64>,
    /// Completed passes over memory (dirty-bitmap syncs).
    pub iteration: Option<u64>,
    /// The guest's page size, bytes.
    pub page_size: Option<u64>,
    /// QEMU's own vCPU throttle, percent.
    pub cpu_throttle_pct: Option<u64>,
    /// Pages the destination asked for during post-copy.
    pub postcopy_requests: Option<u64>,
    /// Bytes of the copied disks to mirror in all (grows as the guest
    /// writes), with `--copy-storage-all/-inc`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_total_bytes: Option<u64>,
    /// Bytes of the copied disks mirrored so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_processed_bytes: Option<u64>,
    /// Bytes per second the guest's writes add to the disks' copy (blocks
    /// written again after the mirror sent them), over the last seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_dirty_rate_bytes_s: Option<u64>,
    /// Full-speed guest time, ms, its vCPUs lost on the destination
    /// waiting for post-copy's pages (once it has landed; measured there
    /// from the vCPU threads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub postcopy_work_lost_ms: Option<u64>,
}

impl JobStats {
    /// QEMU's status while the migration is in post-copy.
    pub const POSTCOPY_STATUS: &'static str = "postcopy-active";

    /// QEMU reports the migration in post-copy: the guest runs on the
    /// destination while the rest of its memory follows.
    pub fn in_postcopy(&self) -> bool {
        self.qemu_status.as_deref() == Some(Self::POSTCOPY_STATUS)
    }

    /// Fills the fields `older` has and `self` lacks: QEMU drops the RAM
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
            page_size,
            disk_total_bytes,
            disk_processed_bytes,
            disk_dirty_rate_bytes_s
        );
        self
    }

    /// Bytes of the copied disks left to mirror.
    pub fn disk_remaining_bytes(&self) -> Option<u64> {
        self.disk_total_bytes
            .zip(self.disk_processed_bytes)
            .map(|(total, processed)| total.saturating_sub(processed))
    }

    /// Bytes per second newly dirtied, as QEMU last reported it.
    pub fn dirty_rate_bytes_s(&self) -> Option<u64> {
        self.dirty_rate_pages_s
            .zip(self.page_size)
            .map(|(pages, size)| pages.saturating_mul(size))
    }
}

/// A job while it runs (and the last one, with `--completed`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobInfo {
    /// The job id.
    pub id: String,
    /// The domain.
    pub domain: String,
    /// Which half this agent runs.
    pub role: Role,
    /// Where it is.
    pub phase: Phase,
    /// Active, or how it ended.
    pub status: JobStatus,
    /// The options given, by name.
    pub flags: Vec<String>,
    /// Unix time in milliseconds.
    pub started_at_ms: u64,
    /// Milliseconds since it started.
    pub elapsed_ms: u64,
    /// QEMU's latest figures.
    pub stats: JobStats,
    /// Highest vCPU throttle so far (QEMU's or livemig's), percent.
    pub max_cpu_throttle_pct: f64,
    /// vCPU throttle in force now, percent.
    #[serde(default)]
    pub throttle_pct: f64,
    /// Who makes it converge.
    #[serde(default)]
    pub converge: ConvergeMode,
    /// The timeline so far.
    #[serde(default)]
    pub actions: Vec<TimedAction>,
    /// When each phase began so far, ms after the source agent got the
    /// command.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub phases: Vec<PhaseTime>,
    /// Estimated impact on the guest so far: seconds of full-speed guest
    /// time lost to the vCPU throttle and, once it has landed, to waiting
    /// for post-copy's pages.
    #[serde(default)]
    pub guest_work_lost_s: f64,
    /// The bandwidth cap in force, MiB/s (`None`: uncapped, or not known).
    #[serde(default)]
    pub bandwidth_limit_mib_s: Option<u64>,
    /// The downtime limit in force, ms.
    #[serde(default)]
    pub downtime_limit_ms: Option<u64>,
    /// Why it failed.
    pub error: Option<String>,
}

/// The record of a finished job: printed as the last line of
/// `migrate --json` and kept in the agent's history. Scripts rely on these
/// field names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// The job id.
    pub id: String,
    /// The domain.
    pub domain: String,
    /// Agent URI of the source host.
    pub source: String,
    /// Agent URI of the destination host.
    pub destination: String,
    /// How it ended.
    pub status: JobStatus,
    /// Why it failed.
    pub error: Option<String>,
    /// The options given, by name.
    pub flags: Vec<String>,
    /// QEMU's auto-converge was on.
    pub auto_converge: bool,
    /// Milliseconds from start to end.
    pub total_time_ms: u64,
    /// QEMU's setup time, ms.
    pub setup_time_ms: Option<u64>,
    /// Milliseconds the guest was paused at switchover.
    pub downtime_ms: Option<u64>,
    /// Bytes sent.
    pub transferred_bytes: u64,
    /// Passes over memory.
    pub iterations: u64,
    /// Highest vCPU throttle seen (QEMU's or livemig's), percent.
    pub max_cpu_throttle_pct: f64,
    /// Who made it converge.
    #[serde(default)]
    pub converge: ConvergeMode,
    /// The timeline of what the job did.
    #[serde(default)]
    pub actions: Vec<TimedAction>,
    /// The phase the job was in when it ended.
    pub phase: Phase,
    /// Unix time in milliseconds.
    pub started_at_ms: u64,
    /// Unix time in milliseconds.
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
    /// When each phase began, ms after the source agent got the command
    /// (the source's record).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub phases: Vec<PhaseTime>,
    /// Ms from the command reaching the source agent to QEMU sending the
    /// memory (`migrate` accepted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_byte_ms: Option<u64>,
    /// What the controller predicted for the job's total time once it had
    /// measured the guest (adaptive jobs on a capped link), ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicted_total_ms: Option<u64>,
    /// The same for the fastest writer the measurement allows, when the
    /// rate was only a lower bound: how sure the prediction was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicted_worst_total_ms: Option<u64>,
    /// The timeline: one sample per poll.
    #[serde(default)]
    pub samples: Vec<Sample>,
    /// The other host's certificate name (over TLS): the only agent that
    /// may look the job up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
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
            converge: self.converge,
            actions: self.actions.clone(),
            phases: self.phases.clone(),
            guest_work_lost_s: work_lost_s(&self.samples)
                + self.stats.postcopy_work_lost_ms.unwrap_or(0) as f64 / 1000.0,
            bandwidth_limit_mib_s: None,
            downtime_limit_ms: None,
            error: self.error.clone(),
        }
    }
}

/// One line of `jobs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSummary {
    /// The job id.
    pub id: String,
    /// The domain.
    pub domain: String,
    /// `source` or `destination`.
    pub role: String,
    /// How it ended.
    pub status: String,
    /// Unix time in milliseconds.
    pub started_at_ms: u64,
    /// Milliseconds from start to end.
    pub total_time_ms: u64,
    /// Milliseconds paused at switchover.
    pub downtime_ms: Option<u64>,
    /// Highest throttle, percent.
    pub max_throttle_pct: f64,
    /// Who made it converge.
    pub converge: String,
    /// Why it failed.
    pub error: Option<String>,
    /// The total time predicted once the guest was measured, ms.
    #[serde(default)]
    pub predicted_total_ms: Option<u64>,
}

#[cfg(test)]
mod tests;
