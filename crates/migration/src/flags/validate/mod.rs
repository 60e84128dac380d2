//! Checking a migration's options the way libvirt does: combinations that
//! contradict each other, values out of range, numbers that would
//! overflow.

use protocol::{CompMethod, ConvergeMode, MigrateOptions, TimeoutAction};
use types::Bandwidth;

use super::converge_mode;

mod compression;

use crate::uri::BadDataUri;
use compression::compression;

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
    /// A compression method named twice.
    #[error("--comp-methods names {0} twice")]
    RepeatedMethod(CompMethod),
    /// An XBZRLE cache QEMU would refuse.
    #[error("--comp-xbzrle-cache must be a power of two of at least 4096 bytes, got {0}")]
    XbzrleCache(u64),
    /// A `--dname` that is no domain name.
    #[error("--dname: {0}")]
    Dname(String),
    /// A `--tls-destination` that is no host name or address.
    #[error("--tls-destination {0:?} is not a host name or an IP address")]
    TlsDestination(String),
    /// A `--listen-address` that is no single address of the destination.
    #[error(
        "--listen-address {0:?}: give one of the destination's own IP addresses (not a name, \
         not 0.0.0.0 or ::)"
    )]
    ListenAddress(String),
    /// A `--disks-uri` that is not `tcp:ADDRESS:PORT`.
    #[error("--disks-uri {0:?}: give tcp:ADDRESS:PORT, an address of the destination's own")]
    DisksUri(String),
}

pub(super) fn validate(o: &MigrateOptions) -> Result<(), InvalidFlags> {
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
            (o.tls, "--tls"),
            (o.zerocopy, "--zerocopy"),
            (o.postcopy_bandwidth.is_some(), "--postcopy-bandwidth"),
            (o.xml.is_some(), "--xml"),
            (o.listen_address.is_some(), "--listen-address"),
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
    let copy_storage = o.copy_storage_all || o.copy_storage_inc;
    if o.copy_storage_all && o.copy_storage_inc {
        return Err(Exclusive("--copy-storage-all", "--copy-storage-inc"));
    }
    for (set, option) in [
        (!o.migrate_disks.is_empty(), "--migrate-disks"),
        (o.disks_port.is_some(), "--disks-port"),
        (
            o.copy_storage_synchronous_writes,
            "--copy-storage-synchronous-writes",
        ),
    ] {
        if set && !copy_storage {
            return Err(Needs {
                option,
                needs: "--copy-storage-all or --copy-storage-inc",
            });
        }
    }
    if copy_storage && o.offline {
        return Err(LiveOnly("--copy-storage-all/-inc"));
    }
    if o.disks_port == Some(0) {
        return Err(AtLeast {
            option: "--disks-port",
            min: "1",
        });
    }
    compression(o)?;
    if o.zerocopy {
        if !o.parallel {
            return Err(Needs {
                option: "--zerocopy",
                needs: "--parallel",
            });
        }
        if o.compressed {
            return Err(Incompatible("--zerocopy", "--compressed"));
        }
        if o.tls {
            // QEMU sends the pages themselves; TLS would have to encrypt
            // a copy.
            return Err(Incompatible("--zerocopy", "--tls"));
        }
    }
    if let Some(mib) = o.postcopy_bandwidth {
        if !postcopy_enabled {
            return Err(Needs {
                option: "--postcopy-bandwidth",
                needs: "--postcopy or --allow-postcopy",
            });
        }
        if mib == 0 {
            return Err(AtLeast {
                option: "--postcopy-bandwidth",
                min: "1 MiB/s",
            });
        }
        if Bandwidth::from_mib_s(mib).is_none() {
            return Err(BandwidthTooLarge(mib));
        }
    }
    if o.persistent_xml.is_some() && !o.persistent {
        return Err(Needs {
            option: "--persistent-xml",
            needs: "--persistent",
        });
    }
    if let Some(address) = &o.listen_address {
        let ip = address
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>();
        if !ip.is_ok_and(|ip| !ip.is_unspecified() && !ip.is_multicast()) {
            return Err(ListenAddress(address.clone()));
        }
    }
    if let Some(uri) = &o.disks_uri {
        let tcp = matches!(
            crate::uri::parse_data_uri(uri),
            Ok(crate::uri::DataUri::Tcp { ref host, .. })
                if host.trim_start_matches('[').trim_end_matches(']').parse::<std::net::IpAddr>().is_ok()
        );
        if !tcp {
            return Err(DisksUri(uri.clone()));
        }
        if !(o.copy_storage_all || o.copy_storage_inc) {
            return Err(Needs {
                option: "--disks-uri",
                needs: "--copy-storage-all or --copy-storage-inc",
            });
        }
        if o.disks_port.is_some() {
            return Err(Exclusive("--disks-uri", "--disks-port"));
        }
    }
    if let Some(name) = &o.tls_destination {
        if !o.tls {
            return Err(Needs {
                option: "--tls-destination",
                needs: "--tls",
            });
        }
        let host_name = |n: &str| {
            !n.is_empty()
                && n.len() <= 253
                && n.split('.').all(|label| {
                    !label.is_empty()
                        && label.len() <= 63
                        && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
                        && !label.starts_with('-')
                })
        };
        if name.parse::<std::net::IpAddr>().is_err() && !host_name(name) {
            return Err(TlsDestination(name.clone()));
        }
    }
    if let Some(name) = &o.dname {
        name.parse::<types::DomainName>()
            .map_err(|e| Dname(e.to_string()))?;
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
mod tests;
