//! The destination's half of a disk copy: an NBD server exporting the new
//! images writable, until the guest runs here (or the job is torn down).

use domain::qemu::argv::{disk_node, TLS_SERVER_ID};
use qmp::commands::block::{BlockExportAddNbd, LegacyInetAddress, NbdServerStart, NbdServerStop};
use qmp::Client;

use super::{export_name, StorageError};
use crate::stream_tls::AUTHZ_ID;

/// Serves `targets` (the guest's disk names) writable over NBD on
/// `host`, on `port` (0: any free one) or the first free one up to `to`,
/// QEMU binding it; with `tls`, only to the certificates the job's TLS
/// authorization admits (set up with the migration settings).
///
/// # Errors
/// [`StorageError::Qemu`]; the server is stopped again.
pub async fn serve(
    qmp: &Client,
    host: &str,
    (port, to): (u16, Option<u16>),
    targets: &[String],
    tls: bool,
) -> Result<(), StorageError> {
    qmp.execute(&NbdServerStart {
        addr: LegacyInetAddress::range(host, port, to),
        tls_creds: tls.then(|| TLS_SERVER_ID.to_string()),
        tls_authz: tls.then(|| AUTHZ_ID.to_string()),
    })
    .await
    .map_err(StorageError::qemu(format!(
        "cannot start the NBD server on {host}:{port}"
    )))?;
    for target in targets {
        let export = BlockExportAddNbd {
            kind: "nbd",
            id: export_name(target),
            node_name: disk_node(target),
            name: export_name(target),
            writable: true,
        };
        if let Err(e) = qmp.execute(&export).await {
            stop(qmp).await;
            return Err(StorageError::Qemu {
                step: format!("cannot export {target} over NBD"),
                source: e,
            });
        }
    }
    Ok(())
}

/// Stops the NBD server and its exports; one not running is fine.
pub async fn stop(qmp: &Client) {
    if let Err(e) = qmp.execute(&NbdServerStop).await {
        tracing::debug!(error = %e, "no NBD server to stop");
    }
}
