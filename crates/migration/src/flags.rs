//! A migration's options, validated: [`Flags`] can only be built from the
//! wire's [`MigrateOptions`] by checking every combination the way libvirt
//! does, and it answers in typed units and with what QEMU must support.

use std::ops::Deref;
use std::time::Duration;

use protocol::{ConvergeMode, MigrateOptions, TimeoutAction};
use types::{Bandwidth, Throttle};

use crate::uri::BadDataUri;

/// Options that contradict each other or are out of range, by their CLI
/// names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidFlags {
    /// Two options that exclude each other.
    #[error("{0} and {1} are mutually exclusive")]
    Exclusive(&'static str, &'static str),
    /// Two options that cannot work together.
    #[error("{0} cannot be combined with {1}")]
    Incompatible(&'static str, &'static str),
    /// An option that needs another.
    #[error("{option} needs {needs}")]
    Needs {
        /// The option given.
        option: &'static str,
        /// What it needs.
        needs: &'static str,
    },
    /// The auto-converge tuning without auto-converge.
    #[error("--auto-converge-initial and --auto-converge-increment need --auto-converge")]
    TuningWithoutAutoConverge,
    /// `--auto-converge` beside another convergence mode.
    #[error(
        "--auto-converge is QEMU's convergence; it cannot be combined with --converge none|adaptive"
    )]
    AutoConvergeAndMode,
    /// An offline migration of a transient definition.
    #[error("offline migration requires --persistent")]
    OfflineNeedsPersistent,
    /// A live-only option with `--offline`.
    #[error("{0} cannot be used with --offline")]
    LiveOnly(&'static str),
    /// A value outside its range.
    #[error("{option} must be between {min} and {max}, got {got}")]
    Range {
        /// The option.
        option: &'static str,
        /// The least value.
        min: &'static str,
        /// The greatest value.
        max: &'static str,
        /// What was given.
        got: String,
    },
    /// A value below its least.
    #[error("{option} must be at least {min}")]
    AtLeast {
        /// The option.
        option: &'static str,
        /// The least value, with its unit.
        min: &'static str,
    },
    /// A bandwidth no link has (its bytes/s would overflow).
    #[error("--bandwidth {0} MiB/s is beyond any link (at most 8 PiB/s)")]
    BandwidthTooLarge(u64),
    /// `--max-downtime` below `--downtime`.
    #[error("--max-downtime cannot be below --downtime")]
    MaxDowntimeBelowDowntime,
    /// A malformed `--migrateuri`.
    #[error(transparent)]
    DataUri(#[from] BadDataUri),
}

/// A QEMU migration capability a flag needs, and on which side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Requirement {
    /// The user-facing feature ("auto-converge migration").
    pub feature: &'static str,
    /// The QEMU capability or parameter name.
    pub name: &'static str,
    /// Capability or parameter.
    pub kind: RequirementKind,
    /// The destination's QEMU needs it too.
    pub destination: bool,
}

/// What kind of QEMU feature a [`Requirement`] names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequirementKind {
    /// A migration capability (`migrate-set-capabilities`).
    Capability,
    /// A migration parameter (`migrate-set-parameters`).
    Parameter,
}

/// A migration's options, checked. Reads through to the options (`flags.live`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Flags {
    options: MigrateOptions,
}

impl Deref for Flags {
    type Target = MigrateOptions;

    fn deref(&self) -> &MigrateOptions {
        &self.options
    }
}

impl TryFrom<MigrateOptions> for Flags {
    type Error = InvalidFlags;

    fn try_from(options: MigrateOptions) -> Result<Flags, InvalidFlags> {
        Flags::new(options)
    }
}

impl Flags {
    /// Checks combinations and ranges the way libvirt does.
    ///
    /// # Errors
    /// [`InvalidFlags`] naming the offending options.
    pub fn new(options: MigrateOptions) -> Result<Flags, InvalidFlags> {
        validate(&options)?;
        Ok(Flags { options })
    }

    /// The options as they travel.
    pub fn options(&self) -> &MigrateOptions {
        &self.options
    }

    /// Which convergence the job uses (`--auto-converge` is `qemu`).
    pub fn converge_mode(&self) -> ConvergeMode {
        converge_mode(&self.options)
    }

    /// QEMU's auto-converge capability is on for this job.
    pub fn qemu_auto_converge(&self) -> bool {
        self.converge_mode() == ConvergeMode::Qemu
    }

    /// Post-copy must be enabled on both QEMUs before `migrate`.
    pub fn postcopy_enabled(&self) -> bool {
        self.postcopy || self.allow_postcopy
    }

    /// The bandwidth cap asked for.
    pub fn bandwidth(&self) -> Option<Bandwidth> {
        // Checked in `new`.
        self.options.bandwidth.and_then(Bandwidth::from_mib_s)
    }

    /// The downtime limit asked for.
    pub fn downtime(&self) -> Option<Duration> {
        self.options.downtime.map(Duration::from_millis)
    }

    /// The ceiling of a downtime ramp.
    pub fn max_downtime(&self) -> Option<Duration> {
        self.options.max_downtime.map(Duration::from_millis)
    }

    /// When the timeout action runs.
    pub fn timeout(&self) -> Option<Duration> {
        self.options.timeout.map(Duration::from_secs)
    }

    /// What runs at the timeout.
    pub fn timeout_action(&self) -> TimeoutAction {
        self.options.timeout_action.unwrap_or_default()
    }

    /// The highest throttle the controller may use, if limited.
    pub fn max_throttle(&self) -> Option<Throttle> {
        self.options.max_throttle.map(Throttle::from_percent)
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
        if self.qemu_auto_converge() {
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

    /// The options that were given, by their CLI names, for job records.
    pub fn names(&self) -> Vec<String> {
        let o = &self.options;
        let mut names: Vec<String> = [
            (o.live, "live"),
            (o.offline, "offline"),
            (o.auto_converge, "auto-converge"),
            (o.compressed, "compressed"),
            (o.parallel, "parallel"),
            (o.postcopy, "postcopy"),
            (o.postcopy_after_precopy, "postcopy-after-precopy"),
            (o.persistent, "persistent"),
            (o.undefine_source, "undefine-source"),
            (o.suspend, "suspend"),
            (o.dirty_limit, "dirty-limit"),
            (o.allow_postcopy, "allow-postcopy"),
        ]
        .iter()
        .filter(|(set, _)| *set)
        .map(|(_, name)| name.to_string())
        .collect();
        let valued = [
            (
                "auto-converge-initial",
                o.auto_converge_initial.map(u64::from),
            ),
            (
                "auto-converge-increment",
                o.auto_converge_increment.map(u64::from),
            ),
            (
                "parallel-connections",
                o.parallel_connections.map(u64::from),
            ),
            ("bandwidth", o.bandwidth),
            ("downtime", o.downtime),
            ("timeout", o.timeout),
        ];
        names.extend(
            valued
                .iter()
                .filter_map(|(name, v)| v.map(|v| format!("{name}={v}"))),
        );
        if let Some(uri) = &o.migrateuri {
            names.push(format!("migrateuri={uri}"));
        }
        if let Some(mode) = o.converge {
            names.push(format!("converge={mode}"));
        }
        if let Some(action) = o.timeout_action {
            names.push(format!("timeout-action={}", action.name()));
        }
        if let Some(ms) = o.max_downtime {
            names.push(format!("max-downtime={ms}"));
        }
        if let Some(pct) = o.max_throttle {
            names.push(format!("max-throttle={pct}"));
        }
        names
    }
}

fn converge_mode(o: &MigrateOptions) -> ConvergeMode {
    match (o.converge, o.auto_converge) {
        (Some(mode), _) => mode,
        (None, true) => ConvergeMode::Qemu,
        (None, false) => ConvergeMode::None,
    }
}

fn validate(o: &MigrateOptions) -> Result<(), InvalidFlags> {
    use InvalidFlags::*;
    let mode = converge_mode(o);
    let postcopy_enabled = o.postcopy || o.allow_postcopy;
    if o.auto_converge && mode != ConvergeMode::Qemu {
        return Err(AutoConvergeAndMode);
    }
    if let Some(pct) = o.max_throttle {
        if !(0.0..=99.9).contains(&pct) {
            return Err(Range {
                option: "--max-throttle",
                min: "0",
                max: "99.9",
                got: pct.to_string(),
            });
        }
    }
    if let (Some(max), Some(downtime)) = (o.max_downtime, o.downtime) {
        if max < downtime {
            return Err(MaxDowntimeBelowDowntime);
        }
    }
    if o.max_downtime == Some(0) {
        return Err(AtLeast {
            option: "--max-downtime",
            min: "1 ms",
        });
    }
    if o.timeout_action.is_some() && o.timeout.is_none() {
        return Err(Needs {
            option: "--timeout-action",
            needs: "--timeout",
        });
    }
    if o.timeout_action == Some(TimeoutAction::Postcopy) && !postcopy_enabled {
        return Err(Needs {
            option: "--timeout-action postcopy",
            needs: "--postcopy or --allow-postcopy",
        });
    }
    if mode == ConvergeMode::Adaptive && o.dirty_limit {
        return Err(Exclusive("--converge adaptive", "--dirty-limit"));
    }
    if o.live && o.offline {
        return Err(Exclusive("--live", "--offline"));
    }
    if o.offline {
        if !o.persistent {
            return Err(OfflineNeedsPersistent);
        }
        let live_only = [
            (o.auto_converge, "--auto-converge"),
            (o.postcopy, "--postcopy"),
            (o.compressed, "--compressed"),
            (o.parallel, "--parallel"),
            (o.dirty_limit, "--dirty-limit"),
            (o.suspend, "--suspend"),
            (o.converge.is_some(), "--converge"),
            (o.allow_postcopy, "--allow-postcopy"),
        ];
        if let Some((_, name)) = live_only.iter().find(|(set, _)| *set) {
            return Err(LiveOnly(name));
        }
    }
    if (o.auto_converge_initial.is_some() || o.auto_converge_increment.is_some())
        && mode != ConvergeMode::Qemu
    {
        return Err(TuningWithoutAutoConverge);
    }
    for (value, option) in [
        (o.auto_converge_initial, "--auto-converge-initial"),
        (o.auto_converge_increment, "--auto-converge-increment"),
    ] {
        if let Some(pct) = value {
            if !(1..=99).contains(&pct) {
                return Err(Range {
                    option,
                    min: "1",
                    max: "99",
                    got: pct.to_string(),
                });
            }
        }
    }
    if o.parallel_connections.is_some() && !o.parallel {
        return Err(Needs {
            option: "--parallel-connections",
            needs: "--parallel",
        });
    }
    if o.parallel_connections == Some(0) {
        return Err(AtLeast {
            option: "--parallel-connections",
            min: "1",
        });
    }
    if o.postcopy_after_precopy && !o.postcopy {
        return Err(Needs {
            option: "--postcopy-after-precopy",
            needs: "--postcopy",
        });
    }
    if o.compressed && o.parallel {
        return Err(Incompatible(
            "--compressed (XBZRLE)",
            "--parallel (multifd)",
        ));
    }
    if o.dirty_limit && mode == ConvergeMode::Qemu {
        return Err(Exclusive("--dirty-limit", "--auto-converge"));
    }
    match o.bandwidth {
        Some(0) => {
            return Err(AtLeast {
                option: "--bandwidth",
                min: "1 MiB/s",
            })
        }
        Some(mib) if Bandwidth::from_mib_s(mib).is_none() => return Err(BandwidthTooLarge(mib)),
        _ => {}
    }
    if o.timeout == Some(0) {
        return Err(AtLeast {
            option: "--timeout",
            min: "1 second",
        });
    }
    if let Some(uri) = &o.migrateuri {
        crate::uri::parse_data_uri(uri)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live() -> MigrateOptions {
        MigrateOptions {
            live: true,
            ..Default::default()
        }
    }

    #[test]
    fn plain_live_and_auto_converge_are_valid() {
        assert!(Flags::new(live()).is_ok());
        let f = MigrateOptions {
            auto_converge: true,
            auto_converge_initial: Some(30),
            auto_converge_increment: Some(5),
            ..live()
        };
        assert!(Flags::new(f).is_ok());
    }

    #[test]
    fn contradictions_are_refused_with_the_option_names() {
        let cases = [
            (
                MigrateOptions {
                    offline: true,
                    ..live()
                },
                "--live and --offline",
            ),
            (
                MigrateOptions {
                    live: false,
                    offline: true,
                    ..Default::default()
                },
                "--persistent",
            ),
            (
                MigrateOptions {
                    auto_converge_initial: Some(20),
                    ..live()
                },
                "need --auto-converge",
            ),
            (
                MigrateOptions {
                    auto_converge: true,
                    auto_converge_increment: Some(100),
                    ..live()
                },
                "between 1 and 99",
            ),
            (
                MigrateOptions {
                    compressed: true,
                    parallel: true,
                    ..live()
                },
                "--compressed",
            ),
            (
                MigrateOptions {
                    postcopy_after_precopy: true,
                    ..live()
                },
                "needs --postcopy",
            ),
            (
                MigrateOptions {
                    dirty_limit: true,
                    auto_converge: true,
                    ..live()
                },
                "mutually exclusive",
            ),
            (
                MigrateOptions {
                    migrateuri: Some("udp:1.2.3.4:5".into()),
                    ..live()
                },
                "udp",
            ),
            (
                MigrateOptions {
                    bandwidth: Some(u64::MAX),
                    ..live()
                },
                "beyond any link",
            ),
        ];
        for (f, expected) in cases {
            let err = Flags::new(f).unwrap_err().to_string();
            assert!(err.contains(expected), "{err} / {expected}");
        }
    }

    #[test]
    fn units_come_out_typed() {
        let f = Flags::new(MigrateOptions {
            bandwidth: Some(64),
            downtime: Some(250),
            timeout: Some(30),
            max_throttle: Some(99.5),
            ..live()
        })
        .unwrap();
        assert_eq!(f.bandwidth().unwrap().bytes_per_sec(), 64 << 20);
        assert_eq!(f.downtime(), Some(Duration::from_millis(250)));
        assert_eq!(f.timeout(), Some(Duration::from_secs(30)));
        assert_eq!(f.max_throttle().unwrap().fraction(), 0.995);
    }

    #[test]
    fn auto_converge_is_required_on_both_sides() {
        let f = Flags::new(MigrateOptions {
            auto_converge: true,
            auto_converge_initial: Some(40),
            ..live()
        })
        .unwrap();
        let req = f.requirements();
        assert!(req
            .iter()
            .any(|r| r.name == "auto-converge" && r.destination));
        assert!(req
            .iter()
            .any(|r| r.name == "cpu-throttle-initial" && !r.destination));
        assert!(Flags::new(live()).unwrap().requirements().is_empty());
    }

    #[test]
    fn names_list_what_was_given() {
        let f = Flags::new(MigrateOptions {
            auto_converge: true,
            bandwidth: Some(64),
            converge: Some(ConvergeMode::Qemu),
            ..live()
        })
        .unwrap();
        assert_eq!(
            f.names(),
            ["live", "auto-converge", "bandwidth=64", "converge=qemu"]
        );
    }
}
