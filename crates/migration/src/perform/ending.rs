//! How a job ends: a cancel (ours or at the timeout), the other timeout
//! actions, and the outcome once QEMU reports the end.

use std::time::Duration;

use protocol::job::{ActionKind, JobStats};
use protocol::TimeoutAction;
use qmp::commands::migration::{MigrateCancel, MigrationStatus, QueryMigrate};
use qmp::commands::vm::Stop;
use tokio::time::Instant;

use super::watch::Watch;
use super::{settled_stats, Outcome, PerformError};

/// Why we asked QEMU to cancel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelReason {
    /// `domjobabort`, or the agent cancelling for the user.
    User,
    /// The timeout, with its length.
    Timeout(Duration),
}

impl Watch<'_> {
    /// We asked QEMU to cancel and wait for it to finish.
    pub fn cancelling(&self) -> bool {
        self.cancelling.is_some()
    }

    /// QEMU took longer than the grace period to settle a cancel.
    pub fn cancel_overdue(&self) -> bool {
        self.cancelling
            .is_some_and(|(_, at)| at.elapsed() > self.options.cancel_grace)
    }

    /// Cancels the migration, unless it is in post-copy: the destination
    /// runs the guest then, and cancelling would lose it.
    pub async fn cancel(&mut self, reason: CancelReason, why: String) {
        // Ask QEMU rather than trust our flag: post-copy may have been
        // started from outside this loop (`migrate-postcopy`).
        let in_postcopy = matches!(
            self.qmp.execute(&QueryMigrate).await,
            Ok(info) if info.status.is_some_and(MigrationStatus::is_postcopy)
        );
        if in_postcopy {
            self.update(|p| p.postcopy_started = true);
        }
        let postcopy_started = self.progress_postcopy_started();
        if postcopy_started {
            if !self.cancel_refused {
                self.record(
                    ActionKind::Cancel,
                    None,
                    format!("ignored during post-copy: {why}"),
                );
            }
            self.cancel_refused |= reason == CancelReason::User;
            return;
        }
        self.cancelling = Some((reason, Instant::now()));
        self.record(ActionKind::Cancel, None, why);
        if let Err(e) = self.qmp.execute(&MigrateCancel).await {
            tracing::warn!(error = %e, "migrate_cancel failed");
        }
    }

    /// Runs the timeout action once the timeout has passed.
    pub async fn check_timeout(&mut self) {
        let Some(timeout) = self
            .options
            .timeout
            .filter(|t| !self.timeout_done && self.elapsed() >= *t)
        else {
            return;
        };
        self.timeout_done = true;
        let why = format!("not completed within the {}s timeout", timeout.as_secs());
        let reason = CancelReason::Timeout(timeout);
        match self.options.timeout_action {
            TimeoutAction::Abort => self.cancel(reason, why).await,
            TimeoutAction::Postcopy => {
                if !self.start_postcopy(why.clone()).await {
                    self.cancel(reason, why).await;
                }
            }
            TimeoutAction::Suspend => match self.qmp.execute(&Stop).await {
                Ok(_) => {
                    self.update(|p| p.suspended = true);
                    self.record(
                        ActionKind::Suspend,
                        None,
                        format!("{why}; guest paused so the copy finishes"),
                    );
                }
                Err(e) => {
                    self.cancel(reason, format!("{why}; could not pause: {e}"))
                        .await
                }
            },
        }
    }

    /// QEMU reported the end: lift the throttle first, then settle the
    /// figures and say how it ended.
    pub async fn end(
        &mut self,
        status: MigrationStatus,
        error: Option<String>,
        mut stats: JobStats,
    ) -> Outcome {
        self.release().await;
        if status == MigrationStatus::Completed {
            stats = settled_stats(self.qmp, stats).await;
            let paused = self.paused_for(stats.total_time_ms);
            tracing::info!(
                qemu_downtime_ms = ?stats.downtime_ms,
                qemu_total_ms = ?stats.total_time_ms,
                paused_ms = ?paused,
                "migration completed"
            );
            if let Some(paused) = paused {
                stats.downtime_ms = Some(stats.downtime_ms.unwrap_or(0).max(paused));
            }
        }
        self.publish(&stats);
        if let Some(e) = self.storage_failed.take() {
            if status != MigrationStatus::Completed {
                return Outcome::Failed {
                    error: PerformError::Storage(e),
                    stats,
                };
            }
        }
        let reason = self.cancelling.map(|(reason, _)| reason);
        match status {
            MigrationStatus::Completed => Outcome::Completed { stats },
            MigrationStatus::Cancelled => Outcome::Cancelled {
                reason: reason.unwrap_or(CancelReason::User),
                stats,
            },
            _ => match reason {
                // Cancelling can surface as `failed` on some versions.
                Some(reason) if error.is_none() => Outcome::Cancelled { reason, stats },
                _ => Outcome::Failed {
                    error: PerformError::Qemu(
                        error.unwrap_or_else(|| "QEMU reported the migration failed".into()),
                    ),
                    stats,
                },
            },
        }
    }
}
