//! The disks while the memory moves, and at switchover.
//!
//! The mirrors keep copying the guest's writes during the memory copy: each
//! poll reads their bytes and dirty rate into the job's figures. With
//! disks mirrored, QEMU pauses in
//! `pre-switchover` (the `pause-before-switchover` capability): the guest
//! is stopped, its disks still active. The mirrors are completed then, so
//! the destination's images hold every write the guest made, and only
//! then may QEMU go on: at the end of the migration it deactivates the
//! disks, and a mirror still sending would abort the source QEMU.

use protocol::job::{ActionKind, JobStats};
use qmp::commands::migration::{MigrateCancel, MigrateContinue, MigrationStatus};
use tokio::time::Instant;

use super::ending::CancelReason;
use super::watch::Watch;
use crate::storage::source::Mirrors;

impl Watch<'_> {
    /// QEMU's figures with the disks' added, while the mirrors run.
    pub async fn with_disks(&mut self, mut stats: JobStats, mirrors: &Mirrors) -> JobStats {
        if mirrors.is_empty() || mirrors.is_completed() {
            return stats;
        }
        if let Ok(copy) = mirrors.progress(self.qmp).await {
            stats.disk_total_bytes = Some(copy.total);
            stats.disk_processed_bytes = Some(copy.processed);
            if let Some(rates) =
                self.disk_rates
                    .observe(Instant::now(), copy.total, copy.processed, None)
            {
                stats.disk_dirty_rate_bytes_s = Some(rates.dirty as u64);
            }
        }
        stats
    }

    /// QEMU waits in `pre-switchover`: complete the mirrors, then let it
    /// go on; if a mirror fails, cancel (the source's disks are intact).
    pub async fn before_switchover(&mut self, mirrors: &Mirrors) {
        if self.switchover_continued {
            // QEMU has not moved on since the last look.
            return;
        }
        self.switchover_continued = true;
        let started = Instant::now();
        match mirrors.complete(self.qmp).await {
            Ok(()) => {
                if !mirrors.is_empty() {
                    self.record(
                        ActionKind::Switchover,
                        None,
                        format!(
                            "the disks' mirrors completed with the guest paused, in {} ms",
                            started.elapsed().as_millis()
                        ),
                    );
                }
                let go_on = MigrateContinue {
                    state: MigrationStatus::PreSwitchover,
                };
                if let Err(e) = self.qmp.execute(&go_on).await {
                    self.cancel_for_disks(format!("QEMU refused to go on to the switchover: {e}"))
                        .await;
                }
            }
            Err(e) => {
                let why = format!(
                    "the disks' copy did not complete: {}",
                    types::error_chain(&e)
                );
                self.storage_failed = Some(e);
                self.cancel_for_disks(why).await;
            }
        }
    }

    async fn cancel_for_disks(&mut self, why: String) {
        self.cancelling = Some((CancelReason::User, Instant::now()));
        self.record(ActionKind::Cancel, None, why);
        if let Err(e) = self.qmp.execute(&MigrateCancel).await {
            tracing::warn!(error = %e, "migrate_cancel failed");
        }
    }
}
