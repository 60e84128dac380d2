//! Whether a QEMU binary supports what a migration's flags need.

use domain::qemu::QemuBinary;

use protocol::job::Role;

use crate::flags::{Flags, RequirementKind};

/// A feature the QEMU binary on one host lacks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{feature} is not supported by the QEMU binary on {host} ({detail})")]
pub struct Unsupported {
    /// The feature, in words.
    pub feature: String,
    /// The QEMU capability or parameter that is missing.
    pub name: String,
    /// The host, as the user named it.
    pub host: String,
    /// Which binary, which version, what it lacks.
    pub detail: String,
}

/// Checks every requirement of `flags` that applies to `role` against the
/// probed `binary` on `host`.
///
/// # Errors
/// The first [`Unsupported`] feature.
pub fn check(
    flags: &Flags,
    role: Role,
    host: &str,
    binary: &QemuBinary,
) -> Result<(), Unsupported> {
    for req in flags.requirements() {
        if role == Role::Destination && !req.destination {
            continue;
        }
        let lacks = match req.kind {
            RequirementKind::Capability => (!binary.has_capability(req.name))
                .then(|| format!("has no `{}` migration capability", req.name)),
            RequirementKind::Parameter => (!binary.has_parameter(req.name))
                .then(|| format!("has no `{}` migration parameter", req.name)),
            RequirementKind::MultifdCompression => {
                (!binary.multifd_compressions.contains(req.name)).then(|| {
                    let known: Vec<&str> = binary
                        .multifd_compressions
                        .iter()
                        .map(String::as_str)
                        .collect();
                    format!(
                        "was built without {}: its multifd-compression takes {}",
                        req.name,
                        if known.is_empty() {
                            "nothing".to_string()
                        } else {
                            known.join(", ")
                        }
                    )
                })
            }
            RequirementKind::MultifdLevel => (!binary.multifd_levels_apply)
                .then(|| format!("takes `{}` but does not apply it", req.name)),
        };
        if let Some(lacks) = lacks {
            return Err(Unsupported {
                feature: req.feature.to_string(),
                name: req.name.to_string(),
                host: host.to_string(),
                detail: format!(
                    "{}, QEMU {}, {lacks}",
                    binary.path.display(),
                    binary.version,
                ),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use protocol::MigrateOptions;
    use qmp::QemuVersion;

    use super::*;

    fn qemu_7_2() -> QemuBinary {
        QemuBinary {
            path: "/usr/bin/qemu-system-x86_64".into(),
            version: QemuVersion::new(7, 2, 0),
            package: String::new(),
            migration_capabilities: ["auto-converge", "events", "postcopy-ram"]
                .map(String::from)
                .into(),
            migration_parameters: BTreeSet::from(["cpu-throttle-initial".to_string()]),
            commands: BTreeSet::new(),
            machines: vec![],
            kvm_present: false,
            command_line_options: BTreeSet::new(),
            multifd_compressions: BTreeSet::from(["none".to_string(), "zlib".to_string()]),
            multifd_levels_apply: false,
        }
    }

    #[test]
    fn names_the_feature_and_the_host() {
        let flags = Flags::new(MigrateOptions {
            live: true,
            dirty_limit: true,
            ..Default::default()
        })
        .unwrap();
        let err = check(
            &flags,
            Role::Destination,
            "tcp://10.0.0.2:7000",
            &qemu_7_2(),
        )
        .unwrap_err();
        assert!(err.to_string().starts_with(
            "dirty-limit migration is not supported by the QEMU binary on tcp://10.0.0.2:7000"
        ));
    }

    #[test]
    fn a_compression_the_binary_was_built_without_or_a_level_it_ignores_is_named() {
        let zstd = |level| {
            Flags::new(MigrateOptions {
                live: true,
                parallel: true,
                compressed: true,
                comp_methods: vec![protocol::CompMethod::Zstd],
                comp_zstd_level: level,
                ..Default::default()
            })
            .unwrap()
        };
        let mut binary = qemu_7_2();
        binary.migration_capabilities.insert("multifd".into());
        let err = check(&zstd(None), Role::Destination, "dst", &binary).unwrap_err();
        assert!(
            err.to_string()
                .contains("was built without zstd: its multifd-compression takes none, zlib"),
            "{err}"
        );
        binary.multifd_compressions.insert("zstd".into());
        assert!(check(&zstd(None), Role::Destination, "dst", &binary).is_ok());
        // The level matters on the source only.
        assert!(check(&zstd(Some(5)), Role::Destination, "dst", &binary).is_ok());
        let err = check(&zstd(Some(5)), Role::Source, "src", &binary).unwrap_err();
        assert!(
            err.to_string()
                .contains("takes `multifd-zstd-level` but does not apply it"),
            "{err}"
        );
    }

    #[test]
    fn source_only_parameters_are_not_required_of_the_destination() {
        let flags = Flags::new(MigrateOptions {
            auto_converge: true,
            auto_converge_increment: Some(5),
            ..Default::default()
        })
        .unwrap();
        let binary = qemu_7_2();
        assert!(check(&flags, Role::Destination, "dst", &binary).is_ok());
        let err = check(&flags, Role::Source, "src", &binary).unwrap_err();
        assert_eq!(err.name, "cpu-throttle-increment");
    }
}
