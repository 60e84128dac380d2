//! Whether a guest can move to another host as defined: the checks a live
//! migration passes before anything starts (libvirt's
//! `qemuMigrationSrcIsSafe` and its CPU rule). `--unsafe` overrides the
//! ones where the user may know better; a disk only this host has cannot
//! be overridden: the destination would find no disk.

use domain::DomainDefinition;

/// Why the guest cannot move as asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unsafe {
    /// A CPU model that passes this host's CPU through.
    #[error(
        "domain '{domain}' runs with CPU model '{cpu}', which passes this host's CPU through: on \
         another host the guest may crash. Define a named model (e.g. cpu = \"Skylake-Server\") \
         or pass --unsafe"
    )]
    HostCpu {
        /// The domain.
        domain: String,
        /// Its CPU model.
        cpu: String,
    },
    /// A disk on this host's storage only.
    #[error(
        "domain '{domain}': disk {target} ({path}) is not on shared storage (shared = false): \
         the destination would find no disk. Copy it with --copy-storage-all (or \
         --copy-storage-inc), or put it on storage both hosts see and mark it shared = true"
    )]
    LocalDisk {
        /// The domain.
        domain: String,
        /// The guest's name for the disk.
        target: String,
        /// Its image.
        path: String,
    },
    /// A shared disk whose writes may sit in this host's page cache.
    #[error(
        "domain '{domain}': disk {target} is on shared storage with cache = \"{cache}\": writes \
         still in this host's page cache would be missing on the destination. Use cache = \
         \"none\" or \"directsync\", or pass --unsafe"
    )]
    CachedSharedDisk {
        /// The domain.
        domain: String,
        /// The guest's name for the disk.
        target: String,
        /// Its cache mode.
        cache: &'static str,
    },
}

/// Checks that `def` can migrate live; `allow_unsafe` is `--unsafe`,
/// `copied` the disks the migration copies (see
/// [`crate::storage::disks_to_copy`]). An offline migration moves only the
/// definition: nothing to check.
///
/// # Errors
/// The first [`Unsafe`] reason found.
pub fn check(
    def: &DomainDefinition,
    offline: bool,
    allow_unsafe: bool,
    copied: &[String],
) -> Result<(), Unsafe> {
    if offline {
        return Ok(());
    }
    let domain = def.name.to_string();
    if let Some(cpu) = def.host_dependent_cpu().filter(|_| !allow_unsafe) {
        return Err(Unsafe::HostCpu {
            domain,
            cpu: cpu.to_string(),
        });
    }
    for (index, disk) in def.disks.iter().enumerate() {
        let target = disk.target_name(index);
        if copied.contains(&target) {
            continue;
        }
        if !disk.shared {
            return Err(Unsafe::LocalDisk {
                domain,
                target,
                path: disk.path.display().to_string(),
            });
        }
        if !disk.cache.safe_on_shared_storage() && !allow_unsafe {
            return Err(Unsafe::CachedSharedDisk {
                domain,
                target,
                cache: disk.cache.as_qemu(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(extra: &str) -> DomainDefinition {
        DomainDefinition::from_toml(&format!(
            "name = \"web\"\nmemory_mib = 64\n{extra}\n[kernel]\npath = \"/k\"\n"
        ))
        .unwrap()
    }

    fn with_disk(disk: &str) -> DomainDefinition {
        let mut d = def("");
        let parsed = DomainDefinition::from_toml(&format!(
            "name = \"web\"\nmemory_mib = 64\n[[disks]]\npath = \"/i/d\"\n{disk}\n"
        ))
        .unwrap();
        d.disks = parsed.disks;
        d
    }

    #[test]
    fn a_host_cpu_needs_unsafe() {
        let d = def("cpu = \"host\"");
        assert!(matches!(
            check(&d, false, false, &[]),
            Err(Unsafe::HostCpu { .. })
        ));
        assert_eq!(check(&d, false, true, &[]), Ok(()));
        assert_eq!(
            check(&d, true, false, &[]),
            Ok(()),
            "offline moves the definition"
        );
    }

    #[test]
    fn a_local_disk_is_refused_even_with_unsafe() {
        let d = with_disk("");
        let err = check(&d, false, true, &[]).unwrap_err();
        assert!(matches!(err, Unsafe::LocalDisk { ref target, .. } if target == "vda"));
        assert!(err.to_string().contains("/i/d"), "{err}");
        assert_eq!(
            check(&with_disk("shared = true"), false, false, &[]),
            Ok(())
        );
        assert_eq!(check(&d, false, false, &["vda".into()]), Ok(()), "copied");
    }

    #[test]
    fn a_cached_shared_disk_needs_unsafe() {
        let d = with_disk("shared = true\ncache = \"writeback\"");
        let err = check(&d, false, false, &[]).unwrap_err();
        assert!(err.to_string().contains("cache = \"writeback\""), "{err}");
        assert_eq!(check(&d, false, true, &[]), Ok(()));
        let direct = with_disk("shared = true\ncache = \"directsync\"");
        assert_eq!(check(&direct, false, false, &[]), Ok(()));
    }
}
