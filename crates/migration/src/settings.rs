//! Migration capabilities and parameters on one QEMU: what to set for a set
//! of flags, and how to put back what was there before.
//!
//! Capabilities can only change while no migration runs, so they are set
//! before `migrate` / `migrate-incoming` and restored once the job has ended
//! (on whichever QEMU is still running).

use qmp::commands::migration::{
    CapabilityStatus, MigrateSetCapabilities, MigrateSetParameters, MigrationCapability,
    MigrationParameters, QueryMigrateCapabilities, QueryMigrateParameters,
};
use qmp::Client;

use protocol::domain::Tunables;
use protocol::job::Role;
use types::Bandwidth;

use crate::flags::{Convergence, Flags};
use crate::stream_tls::{self, StreamTls};

pub use protocol::migrate::DEFAULT_DOWNTIME_MS;

/// The path's speed where nothing says it (10 GbE, roughly), MiB/s: what
/// `estimate` assumes without a bandwidth, and what the final
/// stop-and-copy of a job capped below it gets (QEMU lifts its own cap
/// for it).
pub const ASSUMED_PATH_MIB_S: u64 = 1024;

/// What a job capped at `cap` is predicted over: the passes at the cap,
/// the final stop-and-copy at the path's own speed (`path`, else
/// [`ASSUMED_PATH_MIB_S`]).
pub fn capped_link(cap: Bandwidth, path: Option<Bandwidth>) -> converge::estimate::Link {
    let path = path
        .or(Bandwidth::from_mib_s(ASSUMED_PATH_MIB_S))
        .map_or(0.0, Bandwidth::as_f64);
    converge::estimate::Link {
        bandwidth: cap.as_f64(),
        switchover: Some(path.max(cap.as_f64())),
    }
}

/// How the adaptive controller throttles vCPUs on the source.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ThrottleVia {
    /// Not at all (no adaptive controller) or from the host (cgroup).
    #[default]
    NotQemu,
    /// Through QEMU's auto-converge throttle, steered by its parameters.
    Qemu,
}

/// The capability states a migration with `flags` needs on `role`'s QEMU.
/// Capabilities we manage but the user did not ask for are set off, so a
/// job never inherits another's settings.
pub fn wanted_capabilities(
    flags: &Flags,
    role: Role,
    via: ThrottleVia,
) -> Vec<(MigrationCapability, bool)> {
    let qemu_throttle = via == ThrottleVia::Qemu && role == Role::Source;
    vec![
        (MigrationCapability::Events, true),
        (
            MigrationCapability::AutoConverge,
            flags.qemu_auto_converge() || qemu_throttle,
        ),
        (MigrationCapability::Xbzrle, flags.stream().compressed),
        (
            MigrationCapability::Multifd,
            flags.stream().multifd.is_some(),
        ),
        (MigrationCapability::PostcopyRam, flags.postcopy_enabled()),
        (
            MigrationCapability::ZeroCopySend,
            flags.stream().zerocopy && role == Role::Source,
        ),
        (
            MigrationCapability::DirtyLimit,
            flags.dirty_limit() && role == Role::Source,
        ),
        // With disks mirrored, QEMU must wait at switchover (guest paused,
        // disks still active) until the mirrors are completed: at the end
        // of the migration it deactivates the disks, and a mirror with
        // writes still to send then aborts the source QEMU.
        (
            MigrationCapability::PauseBeforeSwitchover,
            flags.copies_storage() && role == Role::Source,
        ),
    ]
}

/// Parameters that make QEMU's auto-converge hold the throttle at
/// `throttle`: a controller steers it through these (initial = max = the
/// level, increment 99), and at 0 it only triggers when dirtying outruns
/// sending outright, and then by 1 %.
pub fn qemu_throttle_parameters(throttle: f64) -> MigrationParameters {
    let pct = (throttle * 100.0).round().clamp(1.0, 99.0) as u8;
    MigrationParameters {
        cpu_throttle_initial: Some(pct),
        max_cpu_throttle: Some(pct),
        cpu_throttle_increment: Some(99),
        throttle_trigger_threshold: Some(if throttle > 0.0 { 1 } else { 100 }),
        ..Default::default()
    }
}

/// The parameters to set on `role`'s QEMU.
pub fn wanted_parameters(
    flags: &Flags,
    tunables: Tunables,
    role: Role,
    via: ThrottleVia,
) -> MigrationParameters {
    let stream = flags.stream();
    let mut p = MigrationParameters {
        multifd_channels: stream.multifd.flatten(),
        xbzrle_cache_size: stream.xbzrle_cache,
        ..Default::default()
    };
    if stream.multifd.is_some() {
        // Both ends must agree on it; "none" so a job never inherits
        // another's.
        p.multifd_compression = Some(
            stream
                .multifd_compression
                .map_or("none", |(method, _)| method.name())
                .to_string(),
        );
    }
    if role == Role::Source {
        match stream.multifd_compression {
            Some((protocol::CompMethod::Zlib, level)) => p.multifd_zlib_level = level,
            Some((protocol::CompMethod::Zstd, level)) => p.multifd_zstd_level = level,
            _ => {}
        }
        let bandwidth = job_bandwidth(flags, tunables);
        p.max_bandwidth = Some(bandwidth.unwrap_or(Bandwidth::UNLIMITED).bytes_per_sec());
        if flags.postcopy_enabled() {
            // The cap holds in post-copy too (QEMU's default is unlimited),
            // unless post-copy has a cap of its own.
            let postcopy = flags.limits().postcopy_bandwidth.or(bandwidth);
            p.max_postcopy_bandwidth = Some(postcopy.map_or(0, Bandwidth::bytes_per_sec));
        }
        p.downtime_limit = flags
            .downtime()
            .map(|d| d.as_millis() as u64)
            .or(tunables.downtime_ms);
        if let Convergence::Qemu { initial, increment } = flags.convergence() {
            p.cpu_throttle_initial = initial;
            p.cpu_throttle_increment = increment;
        }
        if let Some(max) = flags.max_downtime().map(|d| d.as_millis() as u64) {
            // The limit starts at --downtime (QEMU's 300 ms by default) and
            // the policy may raise it up to --max-downtime.
            p.downtime_limit = p.downtime_limit.or(Some(max.min(DEFAULT_DOWNTIME_MS)));
        }
        if via == ThrottleVia::Qemu {
            let steer = qemu_throttle_parameters(0.0);
            p.cpu_throttle_initial = steer.cpu_throttle_initial;
            p.max_cpu_throttle = steer.max_cpu_throttle;
            p.cpu_throttle_increment = steer.cpu_throttle_increment;
            p.throttle_trigger_threshold = steer.throttle_trigger_threshold;
        }
    }
    p
}

/// The bandwidth cap of a job: the flag, else the domain's tunable (a
/// tunable beyond any link counts as no cap).
pub fn job_bandwidth(flags: &Flags, tunables: Tunables) -> Option<Bandwidth> {
    flags
        .bandwidth()
        .or_else(|| tunables.bandwidth_mib_s.and_then(Bandwidth::from_mib_s))
}

/// For each parameter `wanted` sets, the value `before` had.
fn previous_values(
    wanted: &MigrationParameters,
    before: &MigrationParameters,
) -> MigrationParameters {
    MigrationParameters {
        // Bandwidth and downtime can also change while the job runs
        // (`retune`, the policy), so they are always put back.
        max_bandwidth: before.max_bandwidth,
        downtime_limit: before.downtime_limit,
        max_postcopy_bandwidth: wanted
            .max_postcopy_bandwidth
            .and(before.max_postcopy_bandwidth),
        cpu_throttle_initial: wanted.cpu_throttle_initial.and(before.cpu_throttle_initial),
        cpu_throttle_increment: wanted
            .cpu_throttle_increment
            .and(before.cpu_throttle_increment),
        cpu_throttle_tailslow: wanted
            .cpu_throttle_tailslow
            .and(before.cpu_throttle_tailslow),
        max_cpu_throttle: wanted.max_cpu_throttle.and(before.max_cpu_throttle),
        throttle_trigger_threshold: wanted
            .throttle_trigger_threshold
            .and(before.throttle_trigger_threshold),
        multifd_channels: wanted.multifd_channels.and(before.multifd_channels),
        xbzrle_cache_size: wanted.xbzrle_cache_size.and(before.xbzrle_cache_size),
        multifd_compression: wanted
            .multifd_compression
            .as_ref()
            .and(before.multifd_compression.clone()),
        multifd_zlib_level: wanted.multifd_zlib_level.and(before.multifd_zlib_level),
        multifd_zstd_level: wanted.multifd_zstd_level.and(before.multifd_zstd_level),
        tls_creds: wanted.tls_creds.as_ref().and(before.tls_creds.clone()),
        tls_hostname: wanted
            .tls_hostname
            .as_ref()
            .and(before.tls_hostname.clone()),
        tls_authz: wanted.tls_authz.as_ref().and(before.tls_authz.clone()),
        other: Default::default(),
    }
}

/// What a QEMU had before we changed it.
#[derive(Debug, Clone, Default)]
pub struct Previous {
    capabilities: Vec<CapabilityStatus>,
    parameters: MigrationParameters,
}

/// Sets capabilities and parameters for a job, and its stream's TLS
/// (`tls`, for `--tls`; without it TLS is turned off); returns what to
/// restore.
///
/// # Errors
/// The QMP error of the first command QEMU refuses; in that case whatever
/// was already changed has been put back.
pub async fn apply(
    qmp: &Client,
    flags: &Flags,
    tunables: Tunables,
    role: Role,
    via: ThrottleVia,
    tls: Option<&StreamTls>,
) -> Result<Previous, qmp::Error> {
    let current = qmp.execute(&QueryMigrateCapabilities).await?;
    let mut previous = Previous::default();
    let mut changes = Vec::new();
    for (capability, state) in wanted_capabilities(flags, role, via) {
        match current.iter().find(|c| c.capability == capability) {
            Some(now) if now.state != state => {
                previous.capabilities.push(now.clone());
                changes.push(CapabilityStatus { capability, state });
            }
            Some(_) => {}
            // Missing and wanted: the requirement check should have caught
            // it; let QEMU say so.
            None if state => changes.push(CapabilityStatus { capability, state }),
            None => {}
        }
    }
    if !changes.is_empty() {
        qmp.execute(&MigrateSetCapabilities {
            capabilities: changes,
        })
        .await?;
    }

    let mut wanted = wanted_parameters(flags, tunables, role, via);
    let before = qmp.execute(&QueryMigrateParameters).await?;
    let tls_parameters = match tls {
        Some(tls) => stream_tls::set_up(qmp, tls).await,
        None => Ok(stream_tls::turned_off(&before)),
    };
    match tls_parameters {
        Ok(p) => {
            wanted.tls_creds = p.tls_creds;
            wanted.tls_hostname = p.tls_hostname;
            wanted.tls_authz = p.tls_authz;
        }
        Err(e) => {
            let _ = restore(qmp, &previous).await;
            return Err(e);
        }
    }
    previous.parameters = previous_values(&wanted, &before);
    if wanted != MigrationParameters::default() {
        if let Err(e) = qmp.execute(&MigrateSetParameters(wanted)).await {
            let _ = restore(qmp, &previous).await;
            return Err(e);
        }
    }
    Ok(previous)
}

/// Puts capabilities and parameters back as they were before [`apply`].
///
/// # Errors
/// The QMP error of a refused command.
pub async fn restore(qmp: &Client, previous: &Previous) -> Result<(), qmp::Error> {
    if !previous.capabilities.is_empty() {
        qmp.execute(&MigrateSetCapabilities {
            capabilities: previous.capabilities.clone(),
        })
        .await?;
    }
    if previous.parameters != MigrationParameters::default() {
        qmp.execute(&MigrateSetParameters(previous.parameters.clone()))
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use protocol::MigrateOptions;

    use super::*;

    fn flags(options: MigrateOptions) -> Flags {
        Flags::new(options).unwrap()
    }

    #[test]
    fn auto_converge_on_both_sides_and_off_when_not_asked() {
        let on = flags(MigrateOptions {
            auto_converge: true,
            ..Default::default()
        });
        for role in [Role::Source, Role::Destination] {
            assert!(wanted_capabilities(&on, role, ThrottleVia::NotQemu)
                .contains(&(MigrationCapability::AutoConverge, true)));
            assert!(
                wanted_capabilities(&Flags::default(), role, ThrottleVia::NotQemu)
                    .contains(&(MigrationCapability::AutoConverge, false))
            );
        }
    }

    #[test]
    fn source_gets_bandwidth_downtime_and_throttle_destination_only_channels() {
        let flags = flags(MigrateOptions {
            bandwidth: Some(64),
            auto_converge: true,
            auto_converge_initial: Some(30),
            parallel: true,
            parallel_connections: Some(4),
            ..Default::default()
        });
        let tunables = Tunables {
            bandwidth_mib_s: Some(10),
            downtime_ms: Some(500),
        };
        let src = wanted_parameters(&flags, tunables, Role::Source, ThrottleVia::NotQemu);
        assert_eq!(src.max_bandwidth, Some(64 << 20), "the flag wins");
        assert_eq!(src.downtime_limit, Some(500), "the stored tunable applies");
        assert_eq!(src.cpu_throttle_initial, Some(30));
        assert_eq!(src.multifd_channels, Some(4));
        let dst = wanted_parameters(&flags, tunables, Role::Destination, ThrottleVia::NotQemu);
        assert_eq!(
            dst,
            MigrationParameters {
                multifd_channels: Some(4),
                multifd_compression: Some("none".into()),
                ..Default::default()
            }
        );
    }

    #[test]
    fn zstd_on_both_ends_its_level_and_zero_copy_on_the_source() {
        let zstd = flags(MigrateOptions {
            live: true,
            parallel: true,
            compressed: true,
            comp_methods: vec![protocol::CompMethod::Zstd],
            comp_zstd_level: Some(5),
            ..Default::default()
        });
        for role in [Role::Source, Role::Destination] {
            let p = wanted_parameters(&zstd, Tunables::default(), role, ThrottleVia::NotQemu);
            assert_eq!(p.multifd_compression.as_deref(), Some("zstd"), "{role:?}");
            let level = (role == Role::Source).then_some(5);
            assert_eq!(p.multifd_zstd_level, level, "{role:?}");
        }
        let zerocopy = flags(MigrateOptions {
            live: true,
            parallel: true,
            zerocopy: true,
            ..Default::default()
        });
        let on = |role| {
            wanted_capabilities(&zerocopy, role, ThrottleVia::NotQemu)
                .contains(&(MigrationCapability::ZeroCopySend, true))
        };
        assert!(on(Role::Source) && !on(Role::Destination));
    }

    #[test]
    fn post_copy_has_its_own_cap_when_given_else_the_job_s() {
        let cap = |postcopy_bandwidth| {
            let f = flags(MigrateOptions {
                live: true,
                postcopy: true,
                bandwidth: Some(64),
                postcopy_bandwidth,
                ..Default::default()
            });
            wanted_parameters(&f, Tunables::default(), Role::Source, ThrottleVia::NotQemu)
                .max_postcopy_bandwidth
        };
        assert_eq!(cap(None), Some(64 << 20));
        assert_eq!(cap(Some(8)), Some(8 << 20));
    }

    #[test]
    fn no_bandwidth_means_unlimited_like_virsh() {
        let p = wanted_parameters(
            &Flags::default(),
            Tunables::default(),
            Role::Source,
            ThrottleVia::NotQemu,
        );
        assert_eq!(p.max_bandwidth, Some(Bandwidth::UNLIMITED.bytes_per_sec()));
    }
}
