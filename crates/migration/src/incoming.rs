//! The destination's QEMU side: listen for the migration stream, then wait
//! for it to land.

use std::time::Duration;

use qmp::commands::migration::{MigrateIncoming, MigrationStatus, QueryMigrate};
use qmp::commands::vm::{QueryStatus, RunState};
use qmp::Client;
use tokio::time::Instant;

use crate::uri::{parse_data_uri, DataUri};

#[derive(Debug, thiserror::Error)]
pub enum IncomingError {
    #[error("destination QEMU refused to listen on {uri}")]
    Listen {
        uri: String,
        #[source]
        source: qmp::Error,
    },
    #[error("destination QEMU did not report the port it listens on")]
    NoListenAddress,
    #[error("lost contact with the destination QEMU")]
    Qmp(#[from] qmp::Error),
    #[error("incoming migration failed on the destination: {0}")]
    Failed(String),
    #[error("the incoming migration did not complete within {0:?}")]
    Timeout(Duration),
}

/// Starts listening. With `tcp:HOST:0` QEMU picks a free port, which is read
/// back so the source can be told the real address.
///
/// # Errors
/// [`IncomingError::Listen`] when QEMU cannot bind, or
/// [`IncomingError::NoListenAddress`].
pub async fn listen(qmp: &Client, uri: &DataUri) -> Result<DataUri, IncomingError> {
    let text = uri.to_string();
    qmp.execute(&MigrateIncoming { uri: text.clone() })
        .await
        .map_err(|source| IncomingError::Listen { uri: text, source })?;
    match uri {
        DataUri::Tcp { host, port: 0 } => {
            let info = qmp.execute(&QueryMigrate).await?;
            let port = info
                .socket_address
                .unwrap_or_default()
                .into_iter()
                .find_map(|a| a.port)
                .ok_or(IncomingError::NoListenAddress)?;
            parse_data_uri(&format!("tcp:{host}:{port}"))
                .map(|mut actual| {
                    // Keep the host as given: QEMU may print it differently.
                    if let DataUri::Tcp { host: h, .. } = &mut actual {
                        h.clone_from(host);
                    }
                    actual
                })
                .map_err(|_| IncomingError::NoListenAddress)
        }
        other => Ok(other.clone()),
    }
}

/// Waits until the incoming migration has fully arrived (QEMU leaves the
/// `inmigrate` run state and reports `completed`).
///
/// # Errors
/// [`IncomingError::Failed`] if QEMU reports failure, [`IncomingError::Timeout`].
pub async fn wait_complete(qmp: &Client, timeout: Duration) -> Result<(), IncomingError> {
    let deadline = Instant::now() + timeout;
    loop {
        let info = qmp.execute(&QueryMigrate).await?;
        match info.status {
            Some(MigrationStatus::Completed) => {
                let status = qmp.execute(&QueryStatus).await?;
                if status.status != RunState::Inmigrate {
                    return Ok(());
                }
            }
            Some(MigrationStatus::Failed) | Some(MigrationStatus::Cancelled) => {
                return Err(IncomingError::Failed(
                    info.error_desc
                        .unwrap_or_else(|| "QEMU reported failure".into()),
                ));
            }
            _ => {}
        }
        if Instant::now() >= deadline {
            return Err(IncomingError::Timeout(timeout));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
