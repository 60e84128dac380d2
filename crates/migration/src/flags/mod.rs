//! A migration's options, validated: [`Flags`] can only be built from the
//! wire's [`MigrateOptions`] by checking every combination the way libvirt
//! does, and it answers in typed units and with what QEMU must support.

use std::time::Duration;

use protocol::{CompMethod, ConvergeMode, MigrateOptions, TimeoutAction};
use types::{Bandwidth, Throttle};

mod parts;
mod validate;

pub use parts::{Convergence, DiskCopy, Landing, Limits, Mode, Postcopy, Storage, Stream};
use validate::validate;
pub use validate::InvalidFlags;

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
    /// A value of `multifd-compression` (`zlib`, `zstd`: a build option).
    MultifdCompression,
    /// A multifd compression level the binary really applies (QEMU 7.2
    /// takes `multifd-zlib-level` and `multifd-zstd-level` and ignores
    /// them).
    MultifdLevel,
}

/// A migration's options, checked, and parsed into the parts they decide
/// (see `parts`); the options themselves travel as given
/// ([`Flags::options`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Flags {
    options: MigrateOptions,
    mode: Mode,
    convergence: Convergence,
    postcopy: Postcopy,
    storage: Storage,
    stream: Stream,
    limits: Limits,
    landing: Landing,
}

impl TryFrom<MigrateOptions> for Flags {
    type Error = InvalidFlags;

    fn try_from(options: MigrateOptions) -> Result<Flags, InvalidFlags> {
        Flags::new(options)
    }
}

impl Flags {
    /// Checks combinations and ranges the way libvirt does, then parses.
    ///
    /// # Errors
    /// [`InvalidFlags`] naming the offending options.
    pub fn new(options: MigrateOptions) -> Result<Flags, InvalidFlags> {
        validate(&options)?;
        let (mode, convergence, postcopy, storage, stream, limits, landing) =
            parts::parts(&options);
        Ok(Flags {
            options,
            mode,
            convergence,
            postcopy,
            storage,
            stream,
            limits,
            landing,
        })
    }

    /// The options as they travel.
    pub fn options(&self) -> &MigrateOptions {
        &self.options
    }

    /// How the guest travels.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// The guest runs during the copy.
    pub fn live(&self) -> bool {
        self.mode == Mode::Live
    }

    /// Only the definition moves.
    pub fn offline(&self) -> bool {
        self.mode == Mode::Offline
    }

    /// Who makes the guest converge.
    pub fn convergence(&self) -> Convergence {
        self.convergence
    }

    /// Whether and how post-copy may come.
    pub fn postcopy(&self) -> Postcopy {
        self.postcopy
    }

    /// The disks.
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The stream.
    pub fn stream(&self) -> &Stream {
        &self.stream
    }

    /// The limits.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// How the guest lands.
    pub fn landing(&self) -> &Landing {
        &self.landing
    }

    /// `--unsafe`: the safety checks of what the destination sees are off.
    pub fn unsafe_migration(&self) -> bool {
        self.options.unsafe_migration
    }

    /// `--dirty-limit`.
    pub fn dirty_limit(&self) -> bool {
        self.options.dirty_limit
    }

    /// `--dry-run`: check and estimate, start nothing.
    pub fn dry_run(&self) -> bool {
        self.options.dry_run
    }

    /// `--postcopy-resume`: recover a broken post-copy.
    pub fn postcopy_resume(&self) -> bool {
        self.options.postcopy_resume
    }

    /// Which convergence the job uses (`--auto-converge` is `qemu`).
    pub fn converge_mode(&self) -> ConvergeMode {
        self.convergence.mode()
    }

    /// QEMU's auto-converge capability is on for this job.
    pub fn qemu_auto_converge(&self) -> bool {
        matches!(self.convergence, Convergence::Qemu { .. })
    }

    /// Disks are copied with the memory (`--copy-storage-all/-inc`).
    pub fn copies_storage(&self) -> bool {
        self.storage.copy().is_some()
    }

    /// Post-copy must be enabled on both QEMUs before `migrate`.
    pub fn postcopy_enabled(&self) -> bool {
        self.postcopy.enabled()
    }

    /// The bandwidth cap asked for.
    pub fn bandwidth(&self) -> Option<Bandwidth> {
        self.limits.bandwidth
    }

    /// The downtime limit asked for.
    pub fn downtime(&self) -> Option<Duration> {
        self.limits.downtime
    }

    /// The ceiling of a downtime ramp.
    pub fn max_downtime(&self) -> Option<Duration> {
        self.limits.max_downtime
    }

    /// When the timeout action runs.
    pub fn timeout(&self) -> Option<Duration> {
        self.limits.timeout.map(|(after, _)| after)
    }

    /// What runs at the timeout.
    pub fn timeout_action(&self) -> TimeoutAction {
        self.limits
            .timeout
            .map(|(_, action)| action)
            .unwrap_or_default()
    }

    /// The highest throttle the controller may use, if limited.
    pub fn max_throttle(&self) -> Option<Throttle> {
        self.limits.max_throttle
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
        let both_param = |feature, name| Requirement {
            feature,
            name,
            kind: RequirementKind::Parameter,
            destination: true,
        };
        let mut out = Vec::new();
        if self.stream.tls {
            out.push(both_param("TLS-encrypted migration", "tls-creds"));
            out.push(both_param(
                "authorizing the migration's source by its certificate",
                "tls-authz",
            ));
        }
        if self.qemu_auto_converge() {
            // libvirt sets it on the destination too; harmless, and it keeps
            // both QEMUs' view of the job the same.
            out.push(both("auto-converge migration", "auto-converge"));
        }
        if matches!(
            self.convergence,
            Convergence::Qemu {
                initial: Some(_),
                ..
            }
        ) {
            out.push(source_param(
                "setting the initial auto-converge throttle",
                "cpu-throttle-initial",
            ));
        }
        if matches!(
            self.convergence,
            Convergence::Qemu {
                increment: Some(_),
                ..
            }
        ) {
            out.push(source_param(
                "setting the auto-converge throttle increment",
                "cpu-throttle-increment",
            ));
        }
        if self.stream.compressed {
            out.push(both("compressed (XBZRLE) migration", "xbzrle"));
        }
        if self.stream.xbzrle_cache.is_some() {
            out.push(both_param("sizing the XBZRLE cache", "xbzrle-cache-size"));
        }
        if let Some((method, level)) = self.stream.multifd_compression {
            out.push(Requirement {
                feature: if method == CompMethod::Zlib {
                    "zlib compression of multifd's channels"
                } else {
                    "zstd compression of multifd's channels"
                },
                name: method.name(),
                kind: RequirementKind::MultifdCompression,
                destination: true,
            });
            if level.is_some() {
                out.push(Requirement {
                    feature: if method == CompMethod::Zlib {
                        "setting zlib's level (--comp-zlib-level)"
                    } else {
                        "setting zstd's level (--comp-zstd-level)"
                    },
                    name: if method == CompMethod::Zlib {
                        "multifd-zlib-level"
                    } else {
                        "multifd-zstd-level"
                    },
                    kind: RequirementKind::MultifdLevel,
                    destination: false,
                });
            }
        }
        if self.stream.zerocopy {
            out.push(Requirement {
                feature: "zero-copy sending (--zerocopy)",
                name: "zero-copy-send",
                kind: RequirementKind::Capability,
                destination: false,
            });
        }
        if self.limits.postcopy_bandwidth.is_some() {
            out.push(source_param(
                "capping the post-copy bandwidth",
                "max-postcopy-bandwidth",
            ));
        }
        if self.stream.multifd.is_some() {
            out.push(both("parallel (multifd) migration", "multifd"));
        }
        if self.postcopy_enabled() {
            out.push(both("post-copy migration", "postcopy-ram"));
        }
        if self.dirty_limit() {
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
            (o.tls, "tls"),
            (o.unsafe_migration, "unsafe"),
            (o.copy_storage_all, "copy-storage-all"),
            (o.copy_storage_inc, "copy-storage-inc"),
            (
                o.copy_storage_synchronous_writes,
                "copy-storage-synchronous-writes",
            ),
            (o.zerocopy, "zerocopy"),
            (o.xml.is_some(), "xml"),
            (o.persistent_xml.is_some(), "persistent-xml"),
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
            ("disks-port", o.disks_port.map(u64::from)),
            ("comp-zlib-level", o.comp_zlib_level.map(u64::from)),
            ("comp-zstd-level", o.comp_zstd_level.map(u64::from)),
            ("comp-xbzrle-cache", o.comp_xbzrle_cache),
            ("postcopy-bandwidth", o.postcopy_bandwidth),
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
        if !o.migrate_disks.is_empty() {
            names.push(format!("migrate-disks={}", o.migrate_disks.join(",")));
        }
        if !o.comp_methods.is_empty() {
            let methods: Vec<&str> = o.comp_methods.iter().map(|m| m.name()).collect();
            names.push(format!("comp-methods={}", methods.join(",")));
        }
        if let Some(dname) = &o.dname {
            names.push(format!("dname={dname}"));
        }
        if let Some(name) = &o.tls_destination {
            names.push(format!("tls-destination={name}"));
        }
        names
    }
}

pub(crate) fn converge_mode(o: &MigrateOptions) -> ConvergeMode {
    match (o.converge, o.auto_converge) {
        (Some(mode), _) => mode,
        (None, true) => ConvergeMode::Qemu,
        (None, false) => ConvergeMode::None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn live() -> MigrateOptions {
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
    fn options_come_out_as_parts() {
        let f = Flags::new(MigrateOptions {
            auto_converge: true,
            auto_converge_initial: Some(40),
            allow_postcopy: true,
            copy_storage_inc: true,
            migrate_disks: vec!["vda".into()],
            parallel: true,
            timeout: Some(30),
            timeout_action: Some(TimeoutAction::Postcopy),
            suspend: true,
            ..live()
        })
        .unwrap();
        assert_eq!(f.mode(), Mode::Live);
        assert_eq!(
            f.convergence(),
            Convergence::Qemu {
                initial: Some(40),
                increment: None
            }
        );
        assert!(f.postcopy().by_policy() && !f.postcopy().on_command());
        let copy = f.storage().copy().unwrap();
        assert!(copy.incremental);
        assert_eq!(copy.disks, ["vda"]);
        assert_eq!(f.stream().multifd, Some(None));
        assert_eq!(
            f.limits().timeout,
            Some((Duration::from_secs(30), TimeoutAction::Postcopy))
        );
        assert!(f.landing().suspend);
        let plain = Flags::new(MigrateOptions::default()).unwrap();
        assert_eq!(plain.mode(), Mode::Paused);
        assert_eq!(plain.convergence(), Convergence::None);
        assert_eq!(plain.postcopy(), Postcopy::Off);
        assert_eq!(*plain.storage(), Storage::Shared);
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
