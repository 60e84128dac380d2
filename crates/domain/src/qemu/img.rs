//! `qemu-img` (Debian's `qemu-utils`): creating the images a copied disk
//! lands in.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::process::Command;

use crate::definition::DiskFormat;

/// How long `qemu-img create` may take (it writes metadata only).
pub const CREATE_TIMEOUT: Duration = Duration::from_secs(30);

/// Why an image was not created.
#[derive(Debug, thiserror::Error)]
pub enum ImgError {
    /// Something is already there: never overwritten.
    #[error("{0} already exists")]
    Exists(PathBuf),
    /// `qemu-img` would not run.
    #[error("cannot run qemu-img (install qemu-utils)")]
    Spawn(#[source] std::io::Error),
    /// It ran and failed.
    #[error("qemu-img create {path}: {message}")]
    Failed {
        /// The image.
        path: PathBuf,
        /// What it said.
        message: String,
    },
    /// It did not finish in time.
    #[error("qemu-img create {0} took over {CREATE_TIMEOUT:?}")]
    Timeout(PathBuf),
}

/// Creates an empty image of `virtual_size` bytes at `path`, on top of
/// `backing` (file, format) if given. A file already at `path` is left
/// alone and reported.
///
/// # Errors
/// [`ImgError`].
pub async fn create(
    path: &Path,
    format: DiskFormat,
    virtual_size: u64,
    backing: Option<(&str, &str)>,
) -> Result<(), ImgError> {
    if tokio::fs::symlink_metadata(path).await.is_ok() {
        return Err(ImgError::Exists(path.to_path_buf()));
    }
    let mut command = Command::new("qemu-img");
    command.args(["create", "-q", "-f", format.as_qemu()]);
    if let Some((file, backing_format)) = backing {
        command.args(["-b", file, "-F", backing_format]);
    }
    command
        .arg(path)
        .arg(virtual_size.to_string())
        .kill_on_drop(true);
    let out = tokio::time::timeout(CREATE_TIMEOUT, command.output())
        .await
        .map_err(|_| ImgError::Timeout(path.to_path_buf()))?
        .map_err(ImgError::Spawn)?;
    if !out.status.success() {
        return Err(ImgError::Failed {
            path: path.to_path_buf(),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn creates_an_image_of_the_size_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        create(&base, DiskFormat::Raw, 1 << 20, None).await.unwrap();
        assert_eq!(std::fs::metadata(&base).unwrap().len(), 1 << 20);
        let top = dir.path().join("top.qcow2");
        create(
            &top,
            DiskFormat::Qcow2,
            1 << 20,
            Some((base.to_str().unwrap(), "raw")),
        )
        .await
        .unwrap();
        let info = std::process::Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(&top)
            .output()
            .unwrap();
        let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
        assert_eq!(info["virtual-size"], 1 << 20);
        assert_eq!(info["backing-filename"], base.to_str().unwrap());
        assert!(matches!(
            create(&base, DiskFormat::Raw, 2 << 20, None).await,
            Err(ImgError::Exists(_))
        ));
        assert_eq!(std::fs::metadata(&base).unwrap().len(), 1 << 20);
    }
}
