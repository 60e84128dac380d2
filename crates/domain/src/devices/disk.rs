//! Disks: virtio-blk devices backed by image files.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The most disks a domain may have (`vda` to `vdz`).
pub const MAX_DISKS: usize = 26;

/// A disk image's format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    /// Raw bytes.
    #[default]
    Raw,
    /// QEMU's copy-on-write format.
    Qcow2,
}

impl DiskFormat {
    /// QEMU's name for it.
    pub fn as_qemu(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

/// How the host caches the disk's I/O (QEMU's `cache=`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskCache {
    /// Direct I/O, flushes honoured: safe to migrate on shared storage.
    #[default]
    None,
    /// The host page cache, written back later.
    Writeback,
    /// The host page cache, every write synced.
    Writethrough,
    /// Direct I/O, every write synced: safe on shared storage.
    Directsync,
    /// The host page cache, flushes ignored: a crash loses writes.
    Unsafe,
}

impl DiskCache {
    /// QEMU's name for it.
    pub fn as_qemu(self) -> &'static str {
        match self {
            DiskCache::None => "none",
            DiskCache::Writeback => "writeback",
            DiskCache::Writethrough => "writethrough",
            DiskCache::Directsync => "directsync",
            DiskCache::Unsafe => "unsafe",
        }
    }

    /// Whether a guest on shared storage may migrate with it: only modes
    /// that bypass the source host's page cache leave nothing there the
    /// destination would not read (libvirt's rule too).
    pub fn safe_on_shared_storage(self) -> bool {
        matches!(self, DiskCache::None | DiskCache::Directsync)
    }
}

/// A virtio-blk disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Disk {
    /// The image file.
    pub path: PathBuf,
    /// Its format.
    #[serde(default)]
    pub format: DiskFormat,
    /// Host cache mode.
    #[serde(default)]
    pub cache: DiskCache,
    /// Both hosts see this file at this path (shared storage): a migration
    /// moves only memory. A disk that is not shared is copied with
    /// `--copy-storage-all` or refused.
    #[serde(default)]
    pub shared: bool,
    /// The guest's name for it (`vda`, `vdb`, ...) [default: by position].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// Why a disk was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiskError {
    /// More than [`MAX_DISKS`].
    #[error("a domain has at most {MAX_DISKS} disks, got {0}")]
    TooMany(usize),
    /// A target that is not `vd` and a letter.
    #[error("disk target {0:?} is not vda to vdz")]
    Target(String),
    /// Two disks with one target.
    #[error("two disks are named {0}")]
    DuplicateTarget(String),
}

impl Disk {
    /// The guest's name for the disk at `index`: its `target`, or `vda`,
    /// `vdb`, ... by position.
    pub fn target_name(&self, index: usize) -> String {
        self.target
            .clone()
            .unwrap_or_else(|| format!("vd{}", (b'a' + index as u8) as char))
    }
}

/// Checks a domain's disks: how many, and their targets.
///
/// # Errors
/// The first problem found.
pub fn validate(disks: &[Disk]) -> Result<(), DiskError> {
    if disks.len() > MAX_DISKS {
        return Err(DiskError::TooMany(disks.len()));
    }
    let mut seen = Vec::new();
    for (index, disk) in disks.iter().enumerate() {
        let target = disk.target_name(index);
        let letter = target.strip_prefix("vd").unwrap_or_default();
        if letter.len() != 1 || !letter.bytes().all(|b| b.is_ascii_lowercase()) {
            return Err(DiskError::Target(target));
        }
        if seen.contains(&target) {
            return Err(DiskError::DuplicateTarget(target));
        }
        seen.push(target);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn disk(target: Option<&str>) -> Disk {
        Disk {
            path: "/i/d".into(),
            format: DiskFormat::Raw,
            cache: DiskCache::None,
            shared: false,
            target: target.map(str::to_string),
        }
    }

    #[test]
    fn targets_default_by_position_and_must_be_distinct() {
        assert_eq!(disk(None).target_name(0), "vda");
        assert_eq!(disk(None).target_name(2), "vdc");
        assert!(validate(&[disk(None), disk(None)]).is_ok());
        assert_eq!(
            validate(&[disk(None), disk(Some("vda"))]),
            Err(DiskError::DuplicateTarget("vda".into()))
        );
        assert_eq!(
            validate(&[disk(Some("sda"))]),
            Err(DiskError::Target("sda".into()))
        );
    }

    #[test]
    fn only_direct_io_modes_are_safe_on_shared_storage() {
        let safe: Vec<_> = [
            DiskCache::None,
            DiskCache::Writeback,
            DiskCache::Writethrough,
            DiskCache::Directsync,
            DiskCache::Unsafe,
        ]
        .into_iter()
        .filter(|c| c.safe_on_shared_storage())
        .collect();
        assert_eq!(safe, [DiskCache::None, DiskCache::Directsync]);
    }
}
