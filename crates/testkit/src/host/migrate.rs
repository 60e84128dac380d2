//! Migrations from a host: starting them, waiting on their jobs.

use std::time::Duration;

use protocol::call::{self, JobState};
use protocol::job::{JobInfo, JobRecord, JobStatus};
use protocol::{ClientError, MigrateOptions};

use super::{Host, JOB_TIMEOUT};
use crate::wait_until;

impl Host {
    /// Starts a migration; returns the job id.
    pub async fn start_migration(
        &self,
        name: &str,
        destination: &str,
        flags: MigrateOptions,
    ) -> Result<String, ClientError> {
        let migration = self
            .call(call::Migrate {
                domain: name.parse().expect("valid name"),
                destination: destination.to_string(),
                flags,
            })
            .await?;
        match migration {
            call::Migration::Started(job_id) => Ok(job_id),
            call::Migration::DryRun(_) => panic!("a dry run started no job"),
        }
    }

    /// Starts a migration to `dest` and waits until its live info
    /// satisfies `ready` (`what` names it in a timeout); returns the job id.
    pub async fn migration_until(
        &self,
        name: &str,
        dest: &Host,
        flags: MigrateOptions,
        what: &str,
        ready: impl Fn(&JobInfo) -> bool,
    ) -> String {
        let job = self
            .start_migration(name, &dest.uri(), flags)
            .await
            .expect("migration starts");
        self.wait_job_info(&job, what, ready).await;
        job
    }

    /// Starts a migration to `dest` and waits until QEMU is copying (a
    /// capped bandwidth keeps it there while a test looks); returns the
    /// job id.
    pub async fn migration_in_flight(
        &self,
        name: &str,
        dest: &Host,
        flags: MigrateOptions,
    ) -> String {
        self.migration_until(name, dest, flags, "QEMU to copy", |j| {
            j.stats.qemu_status.as_deref() == Some("active")
        })
        .await
    }

    /// Waits until a running job's live info satisfies `ready`.
    pub async fn wait_job_info(
        &self,
        id: &str,
        what: &str,
        ready: impl Fn(&JobInfo) -> bool,
    ) -> JobInfo {
        wait_until(Duration::from_secs(90), what, || async {
            self.job_active(id).await.filter(|j| ready(j))
        })
        .await
    }

    /// The job's live info, or `None` once it has a record.
    pub async fn job_active(&self, id: &str) -> Option<JobInfo> {
        match self.call(call::Job { id: id.into() }).await.expect("job") {
            JobState::Active(info) => Some(*info),
            JobState::Ended(_) => None,
        }
    }

    /// Waits for a job to end and returns its record.
    pub async fn wait_job(&self, id: &str) -> JobRecord {
        wait_until(JOB_TIMEOUT, &format!("job {id} to end"), || async {
            match self.call(call::Job { id: id.into() }).await.expect("job") {
                JobState::Ended(record) => Some(*record),
                JobState::Active(_) => None,
            }
        })
        .await
    }

    /// Migrates and waits for the record.
    pub async fn migrate(&self, name: &str, dest: &Host, flags: MigrateOptions) -> JobRecord {
        let id = self
            .start_migration(name, &dest.uri(), flags)
            .await
            .expect("migration starts");
        self.wait_job(&id).await
    }

    /// Migrates, and checks what a user would: the job completed and the
    /// guest now runs only on `dest`, intact.
    pub async fn migrate_completes(
        &self,
        name: &str,
        dest: &Host,
        flags: MigrateOptions,
    ) -> JobRecord {
        let record = self.migrate(name, dest, flags).await;
        assert_eq!(record.status, JobStatus::Completed, "{record:#?}");
        crate::assert_runs_only_on(name, dest, self, 2).await;
        record
    }

    /// A plain live migration (`--live`, nothing else), and its record.
    pub async fn migrate_live(&self, name: &str, dest: &Host) -> JobRecord {
        let flags = MigrateOptions {
            live: true,
            ..Default::default()
        };
        self.migrate(name, dest, flags).await
    }

    /// Waits until none of this agent's QEMUs is left (a torn-down
    /// destination).
    pub async fn wait_no_qemu(&self) {
        wait_until(
            Duration::from_secs(60),
            &format!("{} to have no QEMU left", self.name),
            || async { self.qemu_pids().is_empty().then_some(()) },
        )
        .await;
    }
}
