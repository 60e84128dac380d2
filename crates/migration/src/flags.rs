//! Migration flags: one type for the CLI options (`livemig migrate ...`,
//! with virsh's names and meanings) and the request body the agents pass.

use serde::{Deserialize, Serialize};

/// What the user asked of a migration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
#[serde(default)]
pub struct MigrateFlags {
    /// Live migration: the guest keeps running while its memory is copied
    /// (without it, the guest is paused for the whole copy).
    #[cfg_attr(feature = "cli", arg(long))]
    pub live: bool,
    /// Migrate only the definition; the domain must not be running.
    #[cfg_attr(feature = "cli", arg(long))]
    pub offline: bool,
    /// Let QEMU throttle the vCPUs when dirtying outpaces the transfer.
    #[cfg_attr(feature = "cli", arg(long))]
    pub auto_converge: bool,
    /// Initial auto-converge throttle, percent (QEMU default 20).
    #[cfg_attr(feature = "cli", arg(long, value_name = "PCT"))]
    pub auto_converge_initial: Option<u8>,
    /// Auto-converge throttle increment, percent (QEMU default 10).
    #[cfg_attr(feature = "cli", arg(long, value_name = "PCT"))]
    pub auto_converge_increment: Option<u8>,
    /// Compress repeated pages (XBZRLE).
    #[cfg_attr(feature = "cli", arg(long))]
    pub compressed: bool,
    /// Send memory over several connections (multifd).
    #[cfg_attr(feature = "cli", arg(long))]
    pub parallel: bool,
    /// Number of parallel connections (QEMU default 2).
    #[cfg_attr(feature = "cli", arg(long, value_name = "N"))]
    pub parallel_connections: Option<u8>,
    /// Enable post-copy (switch with `migrate-postcopy`).
    #[cfg_attr(feature = "cli", arg(long))]
    pub postcopy: bool,
    /// Switch to post-copy automatically after the first pre-copy pass.
    #[cfg_attr(feature = "cli", arg(long))]
    pub postcopy_after_precopy: bool,
    /// Limit the migration bandwidth, MiB/s.
    #[cfg_attr(feature = "cli", arg(long, value_name = "MiB/s"))]
    pub bandwidth: Option<u64>,
    /// Maximum tolerable downtime, milliseconds (QEMU default 300).
    #[cfg_attr(feature = "cli", arg(long, value_name = "MS"))]
    pub downtime: Option<u64>,
    /// Abort the migration if it has not completed after this many seconds;
    /// the source keeps running. (virsh suspends the guest instead.)
    #[cfg_attr(feature = "cli", arg(long, value_name = "S"))]
    pub timeout: Option<u64>,
    /// Make the domain persistent on the destination.
    #[cfg_attr(feature = "cli", arg(long))]
    pub persistent: bool,
    /// Remove the domain's definition from the source after success.
    #[cfg_attr(feature = "cli", arg(long))]
    pub undefine_source: bool,
    /// Leave the domain paused on the destination.
    #[cfg_attr(feature = "cli", arg(long))]
    pub suspend: bool,
    /// Use QEMU's dirty-limit throttle instead of auto-converge (QEMU 8.1+
    /// with a KVM dirty ring).
    #[cfg_attr(feature = "cli", arg(long))]
    pub dirty_limit: bool,
    /// Address for the migration data (`tcp:HOST:PORT`); by default the
    /// destination agent picks one.
    #[cfg_attr(feature = "cli", arg(long, value_name = "URI"))]
    pub migrateuri: Option<String>,
}

/// Flags that contradict each other or are out of range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidFlags(pub String);

fn invalid<T>(message: impl Into<String>) -> Result<T, InvalidFlags> {
    Err(InvalidFlags(message.into()))
}

/// A QEMU migration capability a flag needs, and on which side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Requirement {
    /// The user-facing feature ("auto-converge migration").
    pub feature: &'static str,
    /// The QEMU capability or parameter name.
    pub name: &'static str,
    pub kind: RequirementKind,
    pub destination: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequirementKind {
    Capability,
    Parameter,
}

impl MigrateFlags {
    /// Checks combinations the way libvirt does.
    ///
    /// # Errors
    /// [`InvalidFlags`] naming the offending options.
    pub fn validate(&self) -> Result<(), InvalidFlags> {
        if self.live && self.offline {
            return invalid("--live and --offline are mutually exclusive");
        }
        if self.offline {
            if !self.persistent {
                return invalid("offline migration requires --persistent");
            }
            let live_only = [
                (self.auto_converge, "--auto-converge"),
                (self.postcopy, "--postcopy"),
                (self.compressed, "--compressed"),
                (self.parallel, "--parallel"),
                (self.dirty_limit, "--dirty-limit"),
                (self.suspend, "--suspend"),
            ];
            if let Some((_, name)) = live_only.iter().find(|(set, _)| *set) {
                return invalid(format!("{name} cannot be used with --offline"));
            }
        }
        if (self.auto_converge_initial.is_some() || self.auto_converge_increment.is_some())
            && !self.auto_converge
        {
            return invalid(
                "--auto-converge-initial and --auto-converge-increment need --auto-converge",
            );
        }
        for (value, name) in [
            (self.auto_converge_initial, "--auto-converge-initial"),
            (self.auto_converge_increment, "--auto-converge-increment"),
        ] {
            if let Some(pct) = value {
                if !(1..=99).contains(&pct) {
                    return invalid(format!("{name} must be between 1 and 99, got {pct}"));
                }
            }
        }
        if self.parallel_connections.is_some() && !self.parallel {
            return invalid("--parallel-connections needs --parallel");
        }
        if self.parallel_connections == Some(0) {
            return invalid("--parallel-connections must be at least 1");
        }
        if self.postcopy_after_precopy && !self.postcopy {
            return invalid("--postcopy-after-precopy needs --postcopy");
        }
        if self.compressed && self.parallel {
            return invalid("--compressed (XBZRLE) cannot be combined with --parallel (multifd)");
        }
        if self.dirty_limit && self.auto_converge {
            return invalid("--dirty-limit and --auto-converge are mutually exclusive");
        }
        if self.bandwidth == Some(0) {
            return invalid("--bandwidth must be at least 1 MiB/s");
        }
        if self.timeout == Some(0) {
            return invalid("--timeout must be at least 1 second");
        }
        if let Some(uri) = &self.migrateuri {
            crate::uri::parse_data_uri(uri).map_err(|e| InvalidFlags(e.to_string()))?;
        }
        Ok(())
    }

    /// What the QEMU binaries must support for these flags; checked on both
    /// hosts before anything starts.
    pub fn requirements(&self) -> Vec<Requirement> {
        let both = |feature, name| Requirement {
            feature,
            name,
            kind: RequirementKind::Capability,
            destination: true,
        };
        let source_param = |feature, name| Requirement {
            feature,
            name,
            kind: RequirementKind::Parameter,
            destination: false,
        };
        let mut out = Vec::new();
        if self.auto_converge {
            // libvirt sets it on the destination too; harmless, and it keeps
            // both QEMUs' view of the job the same.
            out.push(both("auto-converge migration", "auto-converge"));
        }
        if self.auto_converge_initial.is_some() {
            out.push(source_param(
                "setting the initial auto-converge throttle",
                "cpu-throttle-initial",
            ));
        }
        if self.auto_converge_increment.is_some() {
            out.push(source_param(
                "setting the auto-converge throttle increment",
                "cpu-throttle-increment",
            ));
        }
        if self.compressed {
            out.push(both("compressed (XBZRLE) migration", "xbzrle"));
        }
        if self.parallel {
            out.push(both("parallel (multifd) migration", "multifd"));
        }
        if self.postcopy {
            out.push(both("post-copy migration", "postcopy-ram"));
        }
        if self.dirty_limit {
            out.push(both("dirty-limit migration", "dirty-limit"));
        }
        out
    }

    /// The options that were given, by their CLI names, for job records.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = [
            (self.live, "live"),
            (self.offline, "offline"),
            (self.auto_converge, "auto-converge"),
            (self.compressed, "compressed"),
            (self.parallel, "parallel"),
            (self.postcopy, "postcopy"),
            (self.postcopy_after_precopy, "postcopy-after-precopy"),
            (self.persistent, "persistent"),
            (self.undefine_source, "undefine-source"),
            (self.suspend, "suspend"),
            (self.dirty_limit, "dirty-limit"),
        ]
        .iter()
        .filter(|(set, _)| *set)
        .map(|(_, name)| name.to_string())
        .collect();
        let valued = [
            (
                "auto-converge-initial",
                self.auto_converge_initial.map(u64::from),
            ),
            (
                "auto-converge-increment",
                self.auto_converge_increment.map(u64::from),
            ),
            (
                "parallel-connections",
                self.parallel_connections.map(u64::from),
            ),
            ("bandwidth", self.bandwidth),
            ("downtime", self.downtime),
            ("timeout", self.timeout),
        ];
        names.extend(
            valued
                .iter()
                .filter_map(|(name, v)| v.map(|v| format!("{name}={v}"))),
        );
        if let Some(uri) = &self.migrateuri {
            names.push(format!("migrateuri={uri}"));
        }
        names
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags() -> MigrateFlags {
        MigrateFlags {
            live: true,
            ..Default::default()
        }
    }

    #[test]
    fn plain_live_and_auto_converge_are_valid() {
        assert!(flags().validate().is_ok());
        let f = MigrateFlags {
            auto_converge: true,
            auto_converge_initial: Some(30),
            auto_converge_increment: Some(5),
            ..flags()
        };
        assert!(f.validate().is_ok());
    }

    #[test]
    fn contradictions_are_refused_with_the_option_names() {
        let cases = [
            (
                MigrateFlags {
                    offline: true,
                    ..flags()
                },
                "--live and --offline",
            ),
            (
                MigrateFlags {
                    live: false,
                    offline: true,
                    ..Default::default()
                },
                "--persistent",
            ),
            (
                MigrateFlags {
                    auto_converge_initial: Some(20),
                    ..flags()
                },
                "need --auto-converge",
            ),
            (
                MigrateFlags {
                    auto_converge: true,
                    auto_converge_increment: Some(100),
                    ..flags()
                },
                "between 1 and 99",
            ),
            (
                MigrateFlags {
                    compressed: true,
                    parallel: true,
                    ..flags()
                },
                "--compressed",
            ),
            (
                MigrateFlags {
                    postcopy_after_precopy: true,
                    ..flags()
                },
                "needs --postcopy",
            ),
            (
                MigrateFlags {
                    dirty_limit: true,
                    auto_converge: true,
                    ..flags()
                },
                "mutually exclusive",
            ),
            (
                MigrateFlags {
                    migrateuri: Some("udp:1.2.3.4:5".into()),
                    ..flags()
                },
                "udp",
            ),
        ];
        for (f, expected) in cases {
            let err = f.validate().unwrap_err();
            assert!(err.0.contains(expected), "{err} / {expected}");
        }
    }

    #[test]
    fn auto_converge_is_required_on_both_sides() {
        let f = MigrateFlags {
            auto_converge: true,
            auto_converge_initial: Some(40),
            ..flags()
        };
        let req = f.requirements();
        assert!(req
            .iter()
            .any(|r| r.name == "auto-converge" && r.destination));
        assert!(req
            .iter()
            .any(|r| r.name == "cpu-throttle-initial" && !r.destination));
        assert!(flags().requirements().is_empty());
    }

    #[test]
    fn names_list_what_was_given() {
        let f = MigrateFlags {
            auto_converge: true,
            bandwidth: Some(64),
            ..flags()
        };
        assert_eq!(f.names(), ["live", "auto-converge", "bandwidth=64"]);
    }
}
