//! Which QEMU binary is installed now — its path, size and modification
//! time — so that a probe of its capabilities is reused (across agent
//! restarts too) until the binary changes, as a package upgrade does.

use std::io;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};

use super::QemuBinary;

/// What identifies one build of a binary on disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// The file, resolved through `PATH` for a bare name.
    pub path: PathBuf,
    /// Its size, bytes.
    pub size: u64,
    /// Its modification time, ns since the epoch.
    pub modified_ns: u128,
}

/// A probe, kept with the fingerprint of the binary it was made of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedProbe {
    /// The binary probed.
    pub fingerprint: Fingerprint,
    /// What the probe found.
    pub binary: QemuBinary,
}

/// The fingerprint of `binary` now (a bare name is looked up in `PATH`).
///
/// # Errors
/// The binary cannot be found or read.
pub async fn fingerprint(binary: &Path) -> io::Result<Fingerprint> {
    let path = resolve(binary).await?;
    let meta = tokio::fs::metadata(&path).await?;
    let modified_ns = meta
        .modified()?
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    Ok(Fingerprint {
        path,
        size: meta.len(),
        modified_ns,
    })
}

async fn resolve(binary: &Path) -> io::Result<PathBuf> {
    if binary.components().count() > 1 {
        return Ok(binary.to_path_buf());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(binary);
        if tokio::fs::metadata(&candidate)
            .await
            .is_ok_and(|m| m.is_file())
        {
            return Ok(candidate);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!("{} is not in PATH", binary.display()),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_rewritten_binary_has_another_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        let binary = dir.path().join("qemu-system-x86_64");
        std::fs::write(&binary, b"v1").unwrap();
        let first = fingerprint(&binary).await.unwrap();
        assert_eq!(first, fingerprint(&binary).await.unwrap());
        std::fs::write(&binary, b"v2 longer").unwrap();
        let second = fingerprint(&binary).await.unwrap();
        assert_ne!(first, second);
        assert_eq!(second.size, 9);
    }

    #[tokio::test]
    async fn bare_names_are_found_in_path_and_missing_ones_said() {
        let sh = fingerprint(Path::new("sh")).await.unwrap();
        assert!(sh.path.is_absolute(), "{sh:?}");
        let err = fingerprint(Path::new("no-such-qemu-binary"))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not in PATH"), "{err}");
    }
}
