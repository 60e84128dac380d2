//! The destination's QEMU side: listen for the migration stream, then wait
//! for it to land.

use std::time::Duration;

use qmp::commands::migration::{MigrateIncoming, MigrateRecover, MigrationStatus, QueryMigrate};
use qmp::commands::vm::{QueryStatus, RunState};
use qmp::Client;
use tokio::time::Instant;

use crate::uri::DataUri;

/// Why the destination QEMU cannot receive.
#[derive(Debug, thiserror::Error)]
pub enum IncomingError {
    /// QEMU could not listen.
    #[error("destination QEMU refused to listen on {uri}")]
    Listen {
        /// Where it was asked to listen.
        uri: String,
        /// QEMU's answer.
        #[source]
        source: qmp::Error,
    },
    /// QEMU would not listen for a post-copy recovery.
    #[error("migrate-recover failed")]
    Recover(#[source] qmp::Error),
    /// QEMU listens, but did not say on which port.
    #[error("destination QEMU did not report the port it listens on")]
    NoListenAddress,
    /// The monitor stopped answering.
    #[error("lost contact with the destination QEMU")]
    Qmp(#[from] qmp::Error),
    /// QEMU reported the incoming migration failed.
    #[error("incoming migration failed on the destination: {0}")]
    Failed(String),
    /// The data did not land in time.
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
        DataUri::Tcp { host, port: 0 } => listening_on(qmp, host).await,
        other => Ok(other.clone()),
    }
}

/// Starts listening on the first free port from `first` to `last` on
/// `host`: QEMU binds it itself (`tcp:HOST:FIRST,to=LAST`), so no other
/// process can take the port between a choice and the bind.
///
/// # Errors
/// [`IncomingError::Listen`] when every port is taken, or
/// [`IncomingError::NoListenAddress`].
pub async fn listen_in_range(
    qmp: &Client,
    host: &str,
    (first, last): (u16, u16),
) -> Result<DataUri, IncomingError> {
    let first_uri = DataUri::Tcp {
        host: host.to_string(),
        port: first,
    };
    let text = format!("{first_uri},to={last}");
    qmp.execute(&MigrateIncoming { uri: text.clone() })
        .await
        .map_err(|source| IncomingError::Listen { uri: text, source })?;
    listening_on(qmp, host).await
}

/// Listens again for a post-copy migration whose stream broke
/// (`migrate-recover`), on a port QEMU picks on `host`.
///
/// # Errors
/// [`IncomingError::Recover`] when QEMU refuses, or
/// [`IncomingError::NoListenAddress`].
pub async fn listen_for_recovery(qmp: &Client, host: &str) -> Result<DataUri, IncomingError> {
    let listen = DataUri::Tcp {
        host: host.to_string(),
        port: 0,
    };
    qmp.execute(&MigrateRecover {
        uri: listen.to_string(),
    })
    .await
    .map_err(IncomingError::Recover)?;
    listening_on(qmp, host).await
}

/// Where QEMU listens, read back from `query-migrate`; the host is kept as
/// given (QEMU may print it differently).
async fn listening_on(qmp: &Client, host: &str) -> Result<DataUri, IncomingError> {
    let port = qmp
        .execute(&QueryMigrate)
        .await?
        .socket_address
        .unwrap_or_default()
        .into_iter()
        .find_map(|a| a.port)
        .and_then(|p| p.parse::<u16>().ok())
        .ok_or(IncomingError::NoListenAddress)?;
    Ok(DataUri::Tcp {
        host: host.to_string(),
        port,
    })
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
