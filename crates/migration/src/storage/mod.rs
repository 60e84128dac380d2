//! Copying disks that are not on shared storage (`--copy-storage-all`,
//! `--copy-storage-inc`), libvirt's way: the destination's QEMU serves
//! empty images of the same size writable over NBD ([`destination`]); the
//! source's QEMU mirrors each disk into them and keeps mirroring its
//! writes ([`source`]) until the guest is paused at switchover, when the
//! mirrors are completed and the destination's copies are exact. A copy
//! the guest's writes outrun is stopped and reported ([`progress`]) rather
//! than mirrored forever.

pub mod destination;
pub mod pace;
pub mod progress;
pub mod source;

use domain::definition::Disk;
use domain::DomainDefinition;
use protocol::MigrateOptions;

/// What went wrong copying disks.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// `--migrate-disks` names a disk the domain does not have.
    #[error("--migrate-disks names {0}, which the domain has no disk called")]
    NoSuchDisk(String),
    /// QEMU refused a step.
    #[error("{step}")]
    Qemu {
        /// What was being done.
        step: String,
        /// QEMU's error.
        #[source]
        source: qmp::Error,
    },
    /// A mirror ended with an error.
    #[error("the mirror of {target} failed: {message}")]
    MirrorFailed {
        /// The disk.
        target: String,
        /// QEMU's message.
        message: String,
    },
    /// A mirror vanished without saying how it ended.
    #[error("the mirror of {0} ended unexpectedly")]
    MirrorGone(String),
    /// The mirrors did not become ready in time.
    #[error("the disks' bulk copy did not finish within {0:?}")]
    Timeout(std::time::Duration),
    /// The job was cancelled while the disks were copied.
    #[error("cancelled while copying the disks")]
    Cancelled,
    /// The guest writes its disks as fast as the copy sends them.
    #[error(
        "the disk copy does not converge: {} while it sent {:.1} MiB/s, and {:.0} MiB stayed \
         left for {:.0} s; migrate with more --bandwidth, with --converge adaptive (on a host \
         that can throttle the vCPUs), while the guest writes less, or from shared storage",
        .0.writes(),
        .0.copy_rate / 1048576.0,
        .0.left as f64 / 1048576.0,
        .0.secs
    )]
    NotConverging(progress::NoProgress),
}

impl StorageError {
    pub(crate) fn qemu(step: impl Into<String>) -> impl FnOnce(qmp::Error) -> StorageError {
        let step = step.into();
        move |source| StorageError::Qemu { step, source }
    }
}

/// The disks a migration copies, by the guest's names for them: those
/// `--migrate-disks` lists, or else every disk not on shared storage; none
/// without `--copy-storage-all`/`-inc`.
///
/// # Errors
/// [`StorageError::NoSuchDisk`] for a name the domain does not have.
pub fn disks_to_copy<'a>(
    def: &'a DomainDefinition,
    options: &MigrateOptions,
) -> Result<Vec<(String, &'a Disk)>, StorageError> {
    if !options.copy_storage_all && !options.copy_storage_inc {
        return Ok(Vec::new());
    }
    let disks: Vec<(String, &Disk)> = def
        .disks
        .iter()
        .enumerate()
        .map(|(index, disk)| (disk.target_name(index), disk))
        .collect();
    if options.migrate_disks.is_empty() {
        return Ok(disks.into_iter().filter(|(_, d)| !d.shared).collect());
    }
    for wanted in &options.migrate_disks {
        if !disks.iter().any(|(target, _)| target == wanted) {
            return Err(StorageError::NoSuchDisk(wanted.clone()));
        }
    }
    Ok(disks
        .into_iter()
        .filter(|(target, _)| options.migrate_disks.contains(target))
        .collect())
}

/// The export name, job id and node names a copied disk goes by.
pub(crate) fn export_name(target: &str) -> String {
    format!("livemig-{target}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def() -> DomainDefinition {
        DomainDefinition::from_toml(
            "name = \"web\"\nmemory_mib = 64\n[[disks]]\npath = \"/i/os.qcow2\"\nformat = \"qcow2\"\n\
             [[disks]]\npath = \"/s/data.raw\"\nshared = true\n[[disks]]\npath = \"/i/scratch.raw\"\n",
        )
        .unwrap()
    }

    fn targets(options: &MigrateOptions) -> Vec<String> {
        disks_to_copy(&def(), options)
            .unwrap()
            .into_iter()
            .map(|(t, _)| t)
            .collect()
    }

    #[test]
    fn every_local_disk_unless_named() {
        assert!(targets(&MigrateOptions::default()).is_empty());
        let all = MigrateOptions {
            copy_storage_all: true,
            ..Default::default()
        };
        assert_eq!(targets(&all), ["vda", "vdc"]);
        let one = MigrateOptions {
            migrate_disks: vec!["vdc".into()],
            ..all.clone()
        };
        assert_eq!(targets(&one), ["vdc"]);
        let unknown = MigrateOptions {
            migrate_disks: vec!["vdz".into()],
            ..all
        };
        assert!(matches!(
            disks_to_copy(&def(), &unknown),
            Err(StorageError::NoSuchDisk(d)) if d == "vdz"
        ));
    }
}
