//! The destination's part in copying disks: the new images (created empty,
//! removed again unless the guest lands) and the NBD server the source
//! mirrors into.

use std::net::TcpListener;
use std::path::PathBuf;

use domain::qemu::img;
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

/// A port for the NBD server on `host`: the one asked for, else a free one
/// from `range`, else any free one.
fn nbd_port(host: &str, asked: Option<u16>, range: Option<(u16, u16)>) -> Result<u16, ApiError> {
    if let Some(port) = asked {
        return Ok(port);
    }
    let free = |port: u16| {
        TcpListener::bind((host, port))
            .ok()
            .and_then(|l| l.local_addr().ok())
            .map(|a| a.port())
    };
    match range {
        Some((first, last)) => (first..=last).find_map(free).ok_or_else(|| {
            errors::operation_invalid(format!(
                "no free port in {first}-{last} on {host} for the disks' NBD server: widen \
                 migration_ports"
            ))
        }),
        None => free(0).ok_or_else(|| {
            errors::operation_invalid(format!("no free port on {host} for the NBD server"))
        }),
    }
}

/// Serves the copied disks over NBD on `host`; returns the port.
///
/// # Errors
/// [`ApiError`] if no port is free or QEMU refuses.
pub(crate) async fn serve(
    qmp: &qmp::Client,
    host: &str,
    asked: Option<u16>,
    range: Option<(u16, u16)>,
    copies: &[StorageCopy],
    tls: bool,
) -> Result<u16, ApiError> {
    let port = nbd_port(host, asked, range)?;
    let targets: Vec<String> = copies.iter().map(|c| c.target.clone()).collect();
    destination::serve(qmp, host, port, &targets, tls)
        .await
        .map_err(|e| errors::qemu_failed(&e))?;
    Ok(port)
}
