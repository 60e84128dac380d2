//! The record of a job: one constructor, whichever half wrote it and
//! however the job ended.

use std::time::Duration;

use protocol::job::{work_lost_s, JobInfo, JobRecord, JobStats, JobStatus, Phase, PhaseTime, Role};
use tokio::time::Instant;

use crate::flags::Flags;
use crate::job::unix_ms;
use crate::perform::Progress;

/// What identifies a job, the same on both hosts.
#[derive(Debug, Clone)]
pub struct JobIdentity {
    /// The job id.
    pub id: String,
    /// The domain.
    pub domain: String,
    /// Which half this agent runs.
    pub role: Role,
    /// The source agent's URI.
    pub source: String,
    /// The destination agent's URI.
    pub destination: String,
    /// The job's options.
    pub flags: Flags,
    /// Unix time in milliseconds.
    pub started_at_ms: u64,
    /// The other host's certificate name, over TLS.
    pub peer: Option<String>,
}

impl JobIdentity {
    /// The record of the job as it ends now, in `phase`, `elapsed` after
    /// it started, with nothing known of QEMU's side (see
    /// [`with_progress`]).
    pub fn record(&self, status: JobStatus, phase: Phase, elapsed: Duration) -> JobRecord {
        JobRecord {
            id: self.id.clone(),
            domain: self.domain.clone(),
            source: self.source.clone(),
            destination: self.destination.clone(),
            status,
            error: None,
            flags: self.flags.names(),
            auto_converge: self.flags.qemu_auto_converge(),
            total_time_ms: elapsed.as_millis() as u64,
            setup_time_ms: None,
            downtime_ms: None,
            transferred_bytes: 0,
            iterations: 0,
            max_cpu_throttle_pct: 0.0,
            converge: self.flags.converge_mode(),
            actions: Vec::new(),
            phase,
            started_at_ms: self.started_at_ms,
            finished_at_ms: unix_ms(),
            data_uri: None,
            recovery: None,
            role: self.role,
            stats: JobStats::default(),
            phases: Vec::new(),
            first_byte_ms: None,
            predicted_total_ms: None,
            predicted_worst_total_ms: None,
            samples: Vec::new(),
            peer: self.peer.clone(),
        }
    }
}

/// When each phase of a job began, counted from the moment the command
/// reached the agent: where the time before the first byte goes.
#[derive(Debug)]
pub struct PhaseClock {
    begun: Instant,
    entered: std::sync::Mutex<Vec<(Phase, Instant)>>,
}

impl PhaseClock {
    /// A clock started when the command arrived, in `phase`.
    pub fn new(begun: Instant, phase: Phase) -> Self {
        PhaseClock {
            begun,
            entered: std::sync::Mutex::new(vec![(phase, begun)]),
        }
    }

    /// The phase the job is in now.
    pub fn current(&self) -> Phase {
        self.entered
            .lock()
            .expect("phase clock")
            .last()
            .map_or(Phase::Begin, |(phase, _)| *phase)
    }

    /// `phase` begins now.
    pub fn enter(&self, phase: Phase) {
        self.entered
            .lock()
            .expect("phase clock")
            .push((phase, Instant::now()));
    }

    /// Ms from the command to `at`.
    pub fn since_command(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.begun).as_millis() as u64
    }

    /// The phases so far.
    pub fn times(&self) -> Vec<PhaseTime> {
        self.entered
            .lock()
            .expect("phase clock")
            .iter()
            .map(|(phase, at)| PhaseTime {
                phase: *phase,
                at_ms: self.since_command(*at),
            })
            .collect()
    }
}

impl JobIdentity {
    /// The job while it runs, in `phase`, `elapsed` after it started, with
    /// what the source's watcher has seen so far (the destination has no
    /// `progress`).
    pub fn info(&self, phase: Phase, elapsed: Duration, progress: Option<&Progress>) -> JobInfo {
        let progress = progress.cloned().unwrap_or_default();
        JobInfo {
            id: self.id.clone(),
            domain: self.domain.clone(),
            role: self.role,
            phase,
            status: JobStatus::Active,
            flags: self.flags.names(),
            started_at_ms: self.started_at_ms,
            elapsed_ms: elapsed.as_millis() as u64,
            stats: progress.stats,
            max_cpu_throttle_pct: progress.max_throttle.percent(),
            throttle_pct: progress.throttle.percent(),
            converge: self.flags.converge_mode(),
            guest_work_lost_s: work_lost_s(&progress.samples),
            actions: progress.actions,
            phases: Vec::new(),
            bandwidth_limit_mib_s: progress.bandwidth_limit.map(|b| b.mib_s()),
            downtime_limit_ms: progress.downtime_limit.map(|d| d.as_millis() as u64),
            error: None,
        }
    }
}

/// Adds what the source's watcher saw: QEMU's last figures (`stats`,
/// completed by the last ones published), the timeline and the throttle.
/// A completed job's time is QEMU's own.
pub fn with_progress(mut record: JobRecord, stats: JobStats, progress: &Progress) -> JobRecord {
    let stats = stats.merged_over(&progress.stats);
    if record.status == JobStatus::Completed {
        if let Some(total) = stats.total_time_ms {
            record.total_time_ms = total;
        }
    }
    record.setup_time_ms = stats.setup_time_ms;
    record.downtime_ms = stats.downtime_ms;
    record.transferred_bytes = stats.memory_processed_bytes.unwrap_or(0);
    record.iterations = stats.iteration.unwrap_or(0);
    record.max_cpu_throttle_pct = progress
        .max_throttle
        .percent()
        .max(stats.cpu_throttle_pct.unwrap_or(0) as f64);
    record.actions.clone_from(&progress.actions);
    record.samples.clone_from(&progress.samples);
    if let Some(prediction) = progress.prediction {
        record.predicted_total_ms = Some((prediction.total_secs * 1000.0) as u64);
        record.predicted_worst_total_ms = prediction.worst_secs.map(|w| (w * 1000.0) as u64);
    }
    record.stats = stats;
    record
}

#[cfg(test)]
mod tests {
    use protocol::MigrateOptions;
    use types::Throttle;

    use super::*;

    fn identity() -> JobIdentity {
        JobIdentity {
            id: "j".into(),
            domain: "vm".into(),
            role: Role::Source,
            source: "tcp://a:1".into(),
            destination: "tcp://b:1".into(),
            flags: Flags::new(MigrateOptions {
                live: true,
                auto_converge: true,
                ..Default::default()
            })
            .unwrap(),
            started_at_ms: 1,
            peer: None,
        }
    }

    #[test]
    fn a_completed_job_takes_qemus_time_and_figures() {
        let progress = Progress {
            max_throttle: Throttle::from_percent(40.0),
            stats: JobStats {
                iteration: Some(7),
                ..Default::default()
            },
            ..Default::default()
        };
        let stats = JobStats {
            total_time_ms: Some(1234),
            downtime_ms: Some(20),
            cpu_throttle_pct: Some(50),
            ..Default::default()
        };
        let record = identity().record(JobStatus::Completed, Phase::Done, Duration::from_secs(9));
        let record = with_progress(record, stats, &progress);
        assert_eq!(record.total_time_ms, 1234);
        assert_eq!(record.downtime_ms, Some(20));
        assert_eq!(record.iterations, 7, "kept from the last published figures");
        assert_eq!(record.max_cpu_throttle_pct, 50.0);
        assert!(record.auto_converge);
        assert_eq!(record.flags, ["live", "auto-converge"]);
    }

    #[test]
    fn a_failed_job_takes_the_time_it_ran() {
        let record = identity().record(JobStatus::Failed, Phase::Cleanup, Duration::from_secs(9));
        let stats = JobStats {
            total_time_ms: Some(1234),
            ..Default::default()
        };
        let record = with_progress(record, stats, &Progress::default());
        assert_eq!(record.total_time_ms, 9000);
    }
}
