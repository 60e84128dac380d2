//! A migration's options as the parts they decide, each a type that holds
//! only what can go together: how the guest travels ([`Mode`]), who makes
//! it converge ([`Convergence`]), whether it may end in post-copy
//! ([`Postcopy`]), its disks ([`Storage`]), the stream ([`Stream`]), its
//! limits ([`Limits`]) and how it lands ([`Landing`]). They are built once
//! the options passed [`super::validate`], so a combination it refuses
//! cannot be represented here at all.

use std::time::Duration;

use protocol::{CompMethod, ConvergeMode, MigrateOptions, TimeoutAction};
use types::{Bandwidth, Throttle};

/// How the guest travels.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Mode {
    /// The guest runs during the copy (`--live`).
    Live,
    /// The guest is paused for the copy and resumed on the destination.
    #[default]
    Paused,
    /// Only the definition moves (`--offline`); it must be persistent.
    Offline,
}

/// Who makes a busy guest converge.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub enum Convergence {
    /// Plain pre-copy.
    #[default]
    None,
    /// QEMU's auto-converge, with its throttle steps if given.
    Qemu {
        /// `--auto-converge-initial`, percent.
        initial: Option<u8>,
        /// `--auto-converge-increment`, percent.
        increment: Option<u8>,
    },
    /// livemig's controller.
    Adaptive,
}

impl Convergence {
    /// The mode's name on the wire.
    pub fn mode(&self) -> ConvergeMode {
        match self {
            Convergence::None => ConvergeMode::None,
            Convergence::Qemu { .. } => ConvergeMode::Qemu,
            Convergence::Adaptive => ConvergeMode::Adaptive,
        }
    }
}

/// Whether and how the job may switch to post-copy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Postcopy {
    /// Never (QEMU's capability stays off).
    #[default]
    Off,
    /// The capability is on for both QEMUs.
    Enabled {
        /// `--postcopy`: the user may switch (`migrate-postcopy`).
        on_command: bool,
        /// `--postcopy-after-precopy`: switch after the first pass.
        after_first_pass: bool,
        /// `--allow-postcopy`: the policy may switch where throttling ends.
        by_policy: bool,
    },
}

impl Postcopy {
    /// The capability must be on for both QEMUs before `migrate`.
    pub fn enabled(&self) -> bool {
        matches!(self, Postcopy::Enabled { .. })
    }

    /// The user asked for post-copy (`--postcopy`).
    pub fn on_command(&self) -> bool {
        matches!(
            self,
            Postcopy::Enabled {
                on_command: true,
                ..
            }
        )
    }

    /// Switch once the first pass is over.
    pub fn after_first_pass(&self) -> bool {
        matches!(
            self,
            Postcopy::Enabled {
                after_first_pass: true,
                ..
            }
        )
    }

    /// The policy may switch.
    pub fn by_policy(&self) -> bool {
        matches!(
            self,
            Postcopy::Enabled {
                by_policy: true,
                ..
            }
        )
    }
}

/// Disks that move with the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskCopy {
    /// Only the top image (`--copy-storage-inc`), not the whole chain.
    pub incremental: bool,
    /// `--migrate-disks`: these targets only (all local ones if empty).
    pub disks: Vec<String>,
    /// `--disks-port`.
    pub port: Option<u16>,
    /// `--copy-storage-synchronous-writes`.
    pub synchronous_writes: bool,
}

/// The guest's disks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Storage {
    /// Every disk is on storage both hosts see.
    #[default]
    Shared,
    /// Some are copied.
    Copy(DiskCopy),
}

impl Storage {
    /// The copy, if disks are copied.
    pub fn copy(&self) -> Option<&DiskCopy> {
        match self {
            Storage::Shared => None,
            Storage::Copy(copy) => Some(copy),
        }
    }
}

/// The migration stream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stream {
    /// `--tls`.
    pub tls: bool,
    /// XBZRLE (`--compressed` alone, or with `xbzrle` among
    /// `--comp-methods`; never with multifd).
    pub compressed: bool,
    /// `--comp-xbzrle-cache`, bytes.
    pub xbzrle_cache: Option<u64>,
    /// `--parallel`, with `--parallel-connections` if given.
    pub multifd: Option<Option<u8>>,
    /// zlib or zstd on multifd's channels, with its level if given.
    pub multifd_compression: Option<(CompMethod, Option<u8>)>,
    /// `--zerocopy`.
    pub zerocopy: bool,
    /// `--migrateuri`, checked to parse.
    pub uri: Option<String>,
    /// `--listen-address`.
    pub listen_address: Option<String>,
}

impl Stream {
    /// Where the user asked the destination to listen for the memory
    /// stream: `--listen-address` (on `--migrateuri`'s port, if given),
    /// else `--migrateuri`.
    pub fn asked_uri(&self) -> Option<String> {
        let Some(address) = &self.listen_address else {
            return self.uri.clone();
        };
        let port = self
            .uri
            .as_deref()
            .and_then(|u| crate::uri::parse_data_uri(u).ok())
            .and_then(|u| match u {
                crate::uri::DataUri::Tcp { port, .. } => Some(port),
                _ => None,
            })
            .unwrap_or(0);
        let bare = address.trim_start_matches('[').trim_end_matches(']');
        Some(if bare.contains(':') {
            format!("tcp:[{bare}]:{port}")
        } else {
            format!("tcp:{bare}:{port}")
        })
    }
}

/// The job's limits, in their units.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Limits {
    /// `--bandwidth`.
    pub bandwidth: Option<Bandwidth>,
    /// `--downtime`.
    pub downtime: Option<Duration>,
    /// `--max-downtime`, never below the downtime.
    pub max_downtime: Option<Duration>,
    /// `--timeout`, and what runs then.
    pub timeout: Option<(Duration, TimeoutAction)>,
    /// `--max-throttle`: the highest throttle the controller may use (and
    /// the estimate assumes).
    pub max_throttle: Option<Throttle>,
    /// `--postcopy-bandwidth`: the cap once in post-copy.
    pub postcopy_bandwidth: Option<Bandwidth>,
}

/// How the guest lands.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Landing {
    /// `--dname`: the name it arrives under, if another.
    pub dname: Option<types::DomainName>,
    /// `--suspend`: paused on the destination.
    pub suspend: bool,
    /// `--persistent`: defined there.
    pub persistent: bool,
    /// `--undefine-source`.
    pub undefine_source: bool,
}

/// The parts of options that passed validation.
pub(super) fn parts(
    o: &MigrateOptions,
) -> (
    Mode,
    Convergence,
    Postcopy,
    Storage,
    Stream,
    Limits,
    Landing,
) {
    let mode = match (o.live, o.offline) {
        (_, true) => Mode::Offline,
        (true, false) => Mode::Live,
        (false, false) => Mode::Paused,
    };
    let convergence = match super::converge_mode(o) {
        ConvergeMode::None => Convergence::None,
        ConvergeMode::Qemu => Convergence::Qemu {
            initial: o.auto_converge_initial,
            increment: o.auto_converge_increment,
        },
        ConvergeMode::Adaptive => Convergence::Adaptive,
    };
    let postcopy = if o.postcopy || o.allow_postcopy {
        Postcopy::Enabled {
            on_command: o.postcopy,
            after_first_pass: o.postcopy_after_precopy,
            by_policy: o.allow_postcopy,
        }
    } else {
        Postcopy::Off
    };
    let storage = if o.copy_storage_all || o.copy_storage_inc {
        Storage::Copy(DiskCopy {
            incremental: o.copy_storage_inc,
            disks: o.migrate_disks.clone(),
            port: o.disks_port,
            synchronous_writes: o.copy_storage_synchronous_writes,
        })
    } else {
        Storage::Shared
    };
    let multifd_compression = o.comp_methods.iter().find(|m| m.multifd()).map(|&m| {
        let level = match m {
            CompMethod::Zlib => o.comp_zlib_level,
            _ => o.comp_zstd_level,
        };
        (m, level)
    });
    let stream = Stream {
        tls: o.tls,
        compressed: o.compressed
            && (o.comp_methods.is_empty() || o.comp_methods.contains(&CompMethod::Xbzrle)),
        xbzrle_cache: o.comp_xbzrle_cache,
        multifd: o.parallel.then_some(o.parallel_connections),
        multifd_compression,
        zerocopy: o.zerocopy,
        uri: o.migrateuri.clone(),
        listen_address: o.listen_address.clone(),
    };
    let limits = Limits {
        bandwidth: o.bandwidth.and_then(Bandwidth::from_mib_s),
        downtime: o.downtime.map(Duration::from_millis),
        max_downtime: o.max_downtime.map(Duration::from_millis),
        timeout: o
            .timeout
            .map(|s| (Duration::from_secs(s), o.timeout_action.unwrap_or_default())),
        max_throttle: o.max_throttle.map(Throttle::from_percent),
        postcopy_bandwidth: o.postcopy_bandwidth.and_then(Bandwidth::from_mib_s),
    };
    let landing = Landing {
        dname: o.dname.as_deref().and_then(|n| n.parse().ok()),
        suspend: o.suspend,
        persistent: o.persistent,
        undefine_source: o.undefine_source,
    };
    (
        mode,
        convergence,
        postcopy,
        storage,
        stream,
        limits,
        landing,
    )
}
