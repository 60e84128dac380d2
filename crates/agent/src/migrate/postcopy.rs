//! Post-copy recovery steps both halves share.

use std::time::Duration;

use protocol::ApiError;
use qmp::commands::migration::{MigratePause, MigrationStatus, QueryMigrate};
use tokio::time::Instant;

use crate::errors;

/// Brings a post-copy migration whose link failed to `postcopy-paused`,
/// where QEMU can recover it. Not in post-copy at all: an error with
/// `not_in_postcopy`'s message.
pub(crate) async fn pause(
    qmp: &qmp::Client,
    not_in_postcopy: impl FnOnce(Option<MigrationStatus>) -> String,
) -> Result<(), ApiError> {
    let status = qmp
        .execute(&QueryMigrate)
        .await
        .map_err(|e| errors::qemu(e.to_string()))?
        .status;
    match status {
        Some(MigrationStatus::PostcopyPaused) => Ok(()),
        Some(MigrationStatus::PostcopyActive) => {
            // The link died without the socket noticing: pause explicitly.
            let _ = qmp.execute(&MigratePause).await;
            wait_status(qmp, MigrationStatus::PostcopyPaused).await
        }
        other => Err(errors::operation_invalid(not_in_postcopy(other))),
    }
}

/// Waits (up to 10 s) for QEMU's migration to reach `want`.
async fn wait_status(qmp: &qmp::Client, want: MigrationStatus) -> Result<(), ApiError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = qmp
            .execute(&QueryMigrate)
            .await
            .map_err(|e| errors::qemu(e.to_string()))?
            .status;
        if status == Some(want) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(errors::qemu(format!(
                "the migration did not reach {want:?} (it is {status:?})"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
