//! The destination's part in copying disks: the new images (created empty,
//! removed again unless the guest lands) and the NBD server the source
//! mirrors into.

use std::path::PathBuf;

use domain::qemu::{img, sockets};
use domain::DomainDefinition;
use migration::storage::destination;
use protocol::migrate::StorageCopy;
use protocol::ApiError;

use crate::errors;

/// Creates an empty image for each disk the source copies: at the path the
/// definition names, of the source disk's size, in its format, on the
/// shared backing file with `--copy-storage-inc`. Nothing is overwritten.
///
/// # Errors
/// [`ApiError`] naming the disk; images made so far are removed.
pub(crate) async fn create_images(
    def: &DomainDefinition,
    copies: &[StorageCopy],
) -> Result<Vec<PathBuf>, ApiError> {
    let mut created = Vec::new();
    for copy in copies {
        let disk = def
            .disks
            .iter()
            .enumerate()
            .find(|(index, d)| d.target_name(*index) == copy.target)
            .map(|(_, d)| d);
        let Some(disk) = disk else {
            remove_images(&created).await;
            return Err(errors::invalid(format!(
                "the source copies disk {}, which the definition does not have",
                copy.target
            )));
        };
        let backing = copy
            .backing
            .as_ref()
            .map(|(file, format)| (file.as_str(), format.as_str()));
        if let Err(e) = img::create(&disk.path, disk.format, copy.virtual_size, backing).await {
            remove_images(&created).await;
            return Err(errors::operation_invalid(format!(
                "cannot create the image of disk {}: {}",
                copy.target,
                errors::chain(&e)
            )));
        }
        created.push(disk.path.clone());
    }
    Ok(created)
}

/// Removes images a failed migration created here.
pub(crate) async fn remove_images(paths: &[PathBuf]) {
    for path in paths {
        match tokio::fs::remove_file(path).await {
            Ok(()) => tracing::info!(image = %path.display(), "removed the half-copied image"),
            Err(e) => {
                tracing::warn!(image = %path.display(), error = %e, "could not remove the half-copied image")
            }
        }
    }
}

/// Serves the copied disks over NBD on `host`, from QEMU `pid`; returns
/// the port. QEMU binds it itself: the one asked for, else the first free
/// one of `range`, else any; the port it took is read from the sockets it
/// listens on (the one that was not there before), so no port is picked by
/// binding and releasing it first.
///
/// # Errors
/// [`ApiError`] if no port is free or QEMU refuses.
pub(crate) async fn serve(
    qmp: &qmp::Client,
    pid: u32,
    host: &str,
    (asked, range): (Option<u16>, Option<(u16, u16)>),
    copies: &[StorageCopy],
    tls: bool,
) -> Result<u16, ApiError> {
    let ports = match (asked, range) {
        (Some(port), _) => (port, None),
        (None, Some((first, last))) => (first, Some(last)),
        (None, None) => (0, None),
    };
    let before = sockets::listening(pid).await.unwrap_or_default();
    let targets: Vec<String> = copies.iter().map(|c| c.target.clone()).collect();
    if let Err(e) = destination::serve(qmp, host, ports, &targets, tls).await {
        return Err(match (asked, range) {
            (None, Some((first, last))) => errors::operation_invalid(format!(
                "no free port in {first}-{last} on {host} for the disks' NBD server (widen \
                 migration_ports): {}",
                errors::chain(&e)
            )),
            _ => errors::qemu_failed(&e),
        });
    }
    if let Some(port) = asked {
        return Ok(port);
    }
    let after = sockets::listening(pid).await.map_err(|e| {
        errors::qemu(format!(
            "cannot tell which port QEMU's NBD server took: {e}"
        ))
    })?;
    let mut new = after.difference(&before).map(|a| a.port());
    match (new.next(), new.next()) {
        (Some(port), None) => Ok(port),
        _ => {
            destination::stop(qmp).await;
            Err(errors::qemu(format!(
                "cannot tell which port QEMU's NBD server took on {host}"
            )))
        }
    }
}
