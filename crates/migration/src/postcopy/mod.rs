//! Post-copy steps both halves share: bringing a broken post-copy
//! migration to `postcopy-paused`, where QEMU can recover it, and the
//! destination resuming the guest the moment post-copy starts.

pub mod cost;

use std::time::Duration;

use qmp::commands::migration::{MigratePause, MigrationStatus, QueryMigrate};
use qmp::commands::vm::Cont;
use qmp::{Client, EventKind};
use tokio::time::Instant;

/// How long QEMU gets to reach `postcopy-paused` after `migrate-pause`.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a post-copy migration could not be paused for recovery.
#[derive(Debug, thiserror::Error)]
pub enum PostcopyError {
    /// The migration is not in post-copy: nothing to recover.
    #[error("the migration is not in post-copy (status {0:?})")]
    NotInPostcopy(Option<MigrationStatus>),
    /// QEMU did not answer.
    #[error("QEMU did not answer")]
    Qmp(#[from] qmp::Error),
    /// QEMU did not pause in time.
    #[error("the migration did not reach postcopy-paused (it is {0:?})")]
    NotPaused(Option<MigrationStatus>),
}

/// Brings a post-copy migration whose link failed to `postcopy-paused`.
///
/// # Errors
/// [`PostcopyError::NotInPostcopy`] when there is nothing to recover.
pub async fn pause(qmp: &Client) -> Result<(), PostcopyError> {
    match qmp.execute(&QueryMigrate).await?.status {
        Some(MigrationStatus::PostcopyPaused) => Ok(()),
        Some(MigrationStatus::PostcopyActive) => {
            // The link died without the socket noticing: pause explicitly.
            let _ = qmp.execute(&MigratePause).await;
            let deadline = Instant::now() + PAUSE_TIMEOUT;
            loop {
                let status = qmp.execute(&QueryMigrate).await?.status;
                if status == Some(MigrationStatus::PostcopyPaused) {
                    return Ok(());
                }
                if Instant::now() > deadline {
                    return Err(PostcopyError::NotPaused(status));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        other => Err(PostcopyError::NotInPostcopy(other)),
    }
}

/// In post-copy the destination must run the guest as soon as the source
/// switches over (the pages it lacks are then fetched on demand); Finish
/// comes only when the last page has arrived. Watches the destination QEMU
/// for that and resumes the guest then; the task ends with its vCPUs'
/// clock as they were resumed (what [`cost::measure`] starts from), `None`
/// when the migration ended without post-copy.
pub fn resume_on_postcopy(qmp: Client) -> tokio::task::JoinHandle<Option<cost::VcpuClock>> {
    let mut events = qmp.events();
    tokio::spawn(async move {
        loop {
            match events.recv().await {
                Ok(event) => match event.kind() {
                    EventKind::Migration {
                        status: MigrationStatus::PostcopyActive,
                    } => {
                        // Read before `cont`: the vCPUs sat paused until
                        // now, so the clock starts where post-copy does.
                        let clock = cost::VcpuClock::read(&qmp).await;
                        match qmp.execute(&Cont).await {
                            Ok(_) => tracing::info!(
                                "post-copy started; guest resumed on the destination"
                            ),
                            Err(e) => {
                                tracing::error!(error = %e, "cannot resume the guest for post-copy");
                                return None;
                            }
                        }
                        return clock;
                    }
                    EventKind::Migration { status } if status.is_finished() => return None,
                    _ => {}
                },
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
            }
        }
    })
}
