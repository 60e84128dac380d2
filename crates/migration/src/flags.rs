//! Migration flags: one type for the CLI options (`livemig migrate ...`,
//! with virsh's names and meanings) and the request body the agents pass.

use serde::{Deserialize, Serialize};

/// Who makes a busy guest's migration converge.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum ConvergeMode {
    /// Plain pre-copy.
    #[default]
    None,
    /// QEMU's auto-converge (same as --auto-converge).
    Qemu,
    /// livemig's controller: measures, throttles only as much as needed.
    Adaptive,
}

impl ConvergeMode {
    pub fn name(self) -> &'static str {
        match self {
            ConvergeMode::None => "none",
            ConvergeMode::Qemu => "qemu",
            ConvergeMode::Adaptive => "adaptive",
        }
    }
}

/// What to do when `--timeout` expires.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum TimeoutAction {
    /// Cancel the migration; the guest keeps running on the source.
    #[default]
    Abort,
    /// Switch to post-copy (needs --postcopy or --allow-postcopy).
    Postcopy,
    /// Pause the guest so the copy finishes; it resumes on the destination.
    Suspend,
}

/// What the user asked of a migration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
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
    /// the source keeps running. (virsh suspends the guest instead: that is
    /// --timeout-suspend here, or --timeout-action suspend.)
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
    /// Convergence: none, qemu (auto-converge) or adaptive (livemig's
    /// controller).
    #[cfg_attr(feature = "cli", arg(long, value_enum, value_name = "MODE"))]
    pub converge: Option<ConvergeMode>,
    /// What --timeout does: abort (the default), postcopy or suspend.
    #[cfg_attr(feature = "cli", arg(long, value_enum, value_name = "ACTION"))]
    pub timeout_action: Option<TimeoutAction>,
    /// Ceiling a downtime ramp may reach, milliseconds.
    #[cfg_attr(feature = "cli", arg(long, value_name = "MS"))]
    pub max_downtime: Option<u64>,
    /// Highest vCPU throttle, percent (adaptive: up to 99.9 with a host
    /// throttle, 99 with QEMU's).
    #[cfg_attr(feature = "cli", arg(long, value_name = "PCT"))]
    pub max_throttle: Option<f64>,
    /// Enable post-copy so the policy may switch to it when pre-copy cannot
    /// finish in time.
    #[cfg_attr(feature = "cli", arg(long))]
    pub allow_postcopy: bool,
    /// Check everything and predict the migration, without starting it.
    #[cfg_attr(feature = "cli", arg(long))]
    pub dry_run: bool,
    /// Recover this domain's post-copy migration after a network failure
    /// (QEMU's migrate-recover on the destination, migrate resume here).
    #[cfg_attr(feature = "cli", arg(long))]
    pub postcopy_resume: bool,
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
        if self.auto_converge && self.converge_mode() != ConvergeMode::Qemu {
            return invalid("--auto-converge is QEMU's convergence; it cannot be combined with --converge none|adaptive");
        }
        if let Some(pct) = self.max_throttle {
            if !(0.0..=99.9).contains(&pct) {
                return invalid(format!(
                    "--max-throttle must be between 0 and 99.9, got {pct}"
                ));
            }
        }
        if let (Some(max), Some(downtime)) = (self.max_downtime, self.downtime) {
            if max < downtime {
                return invalid("--max-downtime cannot be below --downtime");
            }
        }
        if self.max_downtime == Some(0) {
            return invalid("--max-downtime must be at least 1 ms");
        }
        if self.timeout_action.is_some() && self.timeout.is_none() {
            return invalid("--timeout-action needs --timeout");
        }
        if self.timeout_action == Some(TimeoutAction::Postcopy) && !self.postcopy_enabled() {
            return invalid("--timeout-action postcopy needs --postcopy or --allow-postcopy");
        }
        if self.converge_mode() == ConvergeMode::Adaptive && self.dirty_limit {
            return invalid("--converge adaptive and --dirty-limit are mutually exclusive");
        }
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
                (self.converge.is_some(), "--converge"),
                (self.allow_postcopy, "--allow-postcopy"),
            ];
            if let Some((_, name)) = live_only.iter().find(|(set, _)| *set) {
                return invalid(format!("{name} cannot be used with --offline"));
            }
        }
        if (self.auto_converge_initial.is_some() || self.auto_converge_increment.is_some())
            && !self.qemu_auto_converge()
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
        if self.dirty_limit && self.qemu_auto_converge() {
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
        if self.converge_mode() == ConvergeMode::Qemu {
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
        if self.postcopy_enabled() {
            out.push(both("post-copy migration", "postcopy-ram"));
        }
        if self.dirty_limit {
            out.push(both("dirty-limit migration", "dirty-limit"));
        }
        out
    }

    /// Which convergence the job uses (`--auto-converge` is `qemu`).
    pub fn converge_mode(&self) -> ConvergeMode {
        match (self.converge, self.auto_converge) {
            (Some(mode), _) => mode,
            (None, true) => ConvergeMode::Qemu,
            (None, false) => ConvergeMode::None,
        }
    }

    /// QEMU's auto-converge capability is on for this job.
    pub fn qemu_auto_converge(&self) -> bool {
        self.converge_mode() == ConvergeMode::Qemu
    }

    /// Post-copy must be enabled on both QEMUs before `migrate`.
    pub fn postcopy_enabled(&self) -> bool {
        self.postcopy || self.allow_postcopy
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
            (self.allow_postcopy, "allow-postcopy"),
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
        if let Some(mode) = self.converge {
            names.push(format!("converge={}", enum_name(&mode)));
        }
        if let Some(action) = self.timeout_action {
            names.push(format!("timeout-action={}", enum_name(&action)));
        }
        if let Some(ms) = self.max_downtime {
            names.push(format!("max-downtime={ms}"));
        }
        if let Some(pct) = self.max_throttle {
            names.push(format!("max-throttle={pct}"));
        }
        names
    }
}

fn enum_name<T: Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
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
