//! The source's Perform phase: `migrate`, then watch it to the end.
//!
//! Watching polls `query-migrate` (QEMU's `MIGRATION` events wake the loop
//! early). A cancel request or the timeout sends `migrate_cancel`, and the
//! loop keeps watching: a late cancel can still end in `completed`, and only
//! QEMU's final state says what happened.

use std::time::Duration;

use qmp::commands::migration::{
    Migrate, MigrateCancel, MigrateStartPostcopy, MigrationStatus, QueryMigrate,
};
use qmp::{Client, EventKind};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::job::JobStats;

/// How to watch a migration.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    pub poll_interval: Duration,
    /// Abort (cancel) if not completed after this long.
    pub timeout: Option<Duration>,
    /// Switch to post-copy once the first pass over memory is done.
    pub postcopy_after_precopy: bool,
    /// How long to wait for QEMU to settle after `migrate_cancel`.
    pub cancel_grace: Duration,
}

impl Default for WatchOptions {
    fn default() -> Self {
        WatchOptions {
            poll_interval: Duration::from_millis(250),
            timeout: None,
            postcopy_after_precopy: false,
            cancel_grace: Duration::from_secs(30),
        }
    }
}

/// Why we asked QEMU to cancel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelReason {
    User,
    Timeout(Duration),
}

/// How the Perform phase ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// QEMU switched over; the source is paused (`postmigrate`).
    Completed { stats: JobStats },
    /// QEMU gave up; the source guest still has its memory.
    Failed { error: String, stats: JobStats },
    /// Cancelled at our request.
    Cancelled {
        reason: CancelReason,
        stats: JobStats,
    },
}

/// Live figures published while watching.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Progress {
    pub stats: JobStats,
    pub max_cpu_throttle_pct: u64,
    pub postcopy_started: bool,
}

/// Starts the migration to `uri` and watches it until QEMU finishes it.
pub async fn run(
    qmp: &Client,
    uri: &str,
    options: &WatchOptions,
    cancel: &CancellationToken,
    progress: &watch::Sender<Progress>,
) -> Outcome {
    let mut events = qmp.events();
    if let Err(e) = qmp
        .execute(&Migrate {
            uri: uri.to_string(),
            resume: None,
        })
        .await
    {
        return Outcome::Failed {
            error: format!("QEMU refused to start the migration: {e}"),
            stats: JobStats::default(),
        };
    }
    let started = Instant::now();
    let deadline = options.timeout.map(|t| started + t);
    let mut cancel_reason: Option<CancelReason> = None;
    let mut cancel_sent_at: Option<Instant> = None;
    let mut last = JobStats::default();
    let mut postcopy_requested = false;

    loop {
        let stats = match qmp.execute(&QueryMigrate).await {
            Ok(info) => {
                let status = info.status;
                let stats = JobStats::from_qemu(&info).merged_over(&last);
                if let Some(status) = status {
                    if status.is_finished() {
                        return finish(status, info.error_desc, stats, cancel_reason);
                    }
                }
                stats
            }
            Err(e) => {
                return Outcome::Failed {
                    error: format!("lost contact with the source QEMU: {e}"),
                    stats: last,
                };
            }
        };
        progress.send_modify(|p| {
            p.max_cpu_throttle_pct = p
                .max_cpu_throttle_pct
                .max(stats.cpu_throttle_pct.unwrap_or(0));
            p.stats = stats.clone();
        });
        last = stats;

        if options.postcopy_after_precopy
            && !postcopy_requested
            && cancel_reason.is_none()
            && last.iteration.unwrap_or(0) >= 2
        {
            postcopy_requested = true;
            match qmp.execute(&MigrateStartPostcopy).await {
                Ok(_) => progress.send_modify(|p| p.postcopy_started = true),
                Err(e) => tracing::warn!(error = %e, "could not switch to post-copy"),
            }
        }

        if cancel_reason.is_none() {
            let timed_out = deadline.is_some_and(|d| Instant::now() >= d);
            let reason = if cancel.is_cancelled() {
                Some(CancelReason::User)
            } else if timed_out {
                Some(CancelReason::Timeout(options.timeout.unwrap_or_default()))
            } else {
                None
            };
            if let Some(reason) = reason {
                if progress.borrow().postcopy_started {
                    // The destination already runs the guest: cancelling
                    // now would lose it. Let post-copy finish.
                    tracing::warn!("cancel requested during post-copy; letting it finish");
                } else {
                    cancel_reason = Some(reason);
                    cancel_sent_at = Some(Instant::now());
                    if let Err(e) = qmp.execute(&MigrateCancel).await {
                        tracing::warn!(error = %e, "migrate_cancel failed");
                    }
                }
            }
        } else if cancel_sent_at.is_some_and(|t| t.elapsed() > options.cancel_grace) {
            return Outcome::Failed {
                error: format!(
                    "QEMU did not finish cancelling within {:?}",
                    options.cancel_grace
                ),
                stats: last,
            };
        }

        let sleep = tokio::time::sleep(options.poll_interval);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => break,
                _ = cancel.cancelled(), if cancel_reason.is_none() => break,
                event = events.recv() => match event {
                    Ok(e) if matches!(e.kind(), EventKind::Migration { status } if status.is_finished()) => break,
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                },
            }
        }
    }
}

fn finish(
    status: MigrationStatus,
    error: Option<String>,
    stats: JobStats,
    cancel_reason: Option<CancelReason>,
) -> Outcome {
    match status {
        MigrationStatus::Completed => Outcome::Completed { stats },
        MigrationStatus::Cancelled => Outcome::Cancelled {
            reason: cancel_reason.unwrap_or(CancelReason::User),
            stats,
        },
        _ => match cancel_reason {
            // Cancelling can surface as `failed` on some versions.
            Some(reason) if error.is_none() => Outcome::Cancelled { reason, stats },
            _ => Outcome::Failed {
                error: error.unwrap_or_else(|| "QEMU reported the migration failed".into()),
                stats,
            },
        },
    }
}
