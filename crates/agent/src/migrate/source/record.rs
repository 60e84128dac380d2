//! How a job ended, and its record: written to the history, kept as the
//! domain's last job, counted in the metrics.

use protocol::job::{JobStats, JobStatus, Phase};

use super::run::Run;
use crate::errors;

/// How a job ended, before it becomes a record.
pub(super) struct Ending {
    pub status: JobStatus,
    pub error: Option<String>,
    pub recovery: Option<String>,
    pub stats: JobStats,
    pub data_uri: Option<String>,
}

impl Ending {
    pub fn failed(error: String, stats: JobStats) -> Self {
        Ending {
            status: JobStatus::Failed,
            error: Some(error),
            recovery: None,
            stats,
            data_uri: None,
        }
    }

    pub fn completed(stats: JobStats, note: Option<String>) -> Self {
        Ending {
            status: JobStatus::Completed,
            error: None,
            recovery: note,
            stats,
            data_uri: None,
        }
    }
}

impl Run {
    /// Writes the record and releases the domain.
    pub async fn conclude(self, ending: Ending) {
        if ending.status == JobStatus::Completed {
            self.set_phase(Phase::Done);
        }
        let phase = self.job.clock.current();
        let mut record = self
            .job
            .ident
            .record(ending.status, phase, self.job.started.elapsed());
        record.error = ending.error;
        record.recovery = ending.recovery;
        record.data_uri = ending.data_uri;
        record.phases = self.job.clock.times();
        record.first_byte_ms = self
            .progress
            .borrow()
            .migrating_since
            .map(|at| self.job.clock.since_command(at));
        let record =
            migration::record::with_progress(record, ending.stats, &self.progress.borrow());
        match record.status {
            JobStatus::Completed => tracing::info!(
                total_ms = record.total_time_ms,
                downtime_ms = ?record.downtime_ms,
                max_throttle = record.max_cpu_throttle_pct,
                "migration completed"
            ),
            _ => {
                tracing::error!(status = %record.status, error = ?record.error, recovery = ?record.recovery, "migration did not complete")
            }
        }
        self.agent.metrics.job_finished(&record);
        if let Err(e) = self.agent.history.save(&record).await {
            tracing::error!(error = %errors::chain(&e), "could not save the job record");
        }
        let completed = record.status == JobStatus::Completed;
        self.agent
            .table
            .end_job(&self.name, &self.job.ident.id, record);
        if completed {
            // The guest is the destination's now; it may hand it back.
            self.agent.bind(&self.name, self.peer.name()).await;
        }
        self.agent.persist_run(&self.name).await;
        self.agent.table.drop_if_transient_and_idle(&self.name);
    }
}
