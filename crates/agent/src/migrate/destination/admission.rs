//! What a peer may ask of this host in a Prepare. A peer holds an agent
//! certificate, which any host of the cluster has, so one compromised host
//! must not make this one touch a file or an address it was not configured
//! for. The peer proposes, this host decides, as if its own administrator
//! had typed the request here: its QEMU listens only on an address of this
//! host and a port of its range; the images it creates sit only on backing
//! files its confinement allows, down the whole chain; and a peer owns
//! only what it sends: it may not replace a domain defined here unless that
//! domain's guest was handed to it (or an administrator allows it), and its
//! incoming migrations stay within its quotas.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use domain::confine::Confinement;
use domain::definition::DiskFormat;
use domain::DomainDefinition;
use migration::uri::{parse_data_uri, DataUri};
use protocol::migrate::StorageCopy;
use protocol::{ApiError, ErrorCode};

use crate::caller::Caller;
use crate::config::PeerRules;
use crate::errors;
use crate::table::Arrival;

/// How long a host name in a hint may take to resolve.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Ports below this need privileges no migration stream has any use for.
const FIRST_UNPRIVILEGED: u16 = 1024;

/// Where the destination QEMU listens for the data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Listen {
    /// This address and port (0: any free port).
    Uri(DataUri),
    /// The first free port of the configured range on this address.
    Ports(String, (u16, u16)),
}

impl Listen {
    /// The address it listens on.
    pub(super) fn host(&self) -> &str {
        match self {
            Listen::Uri(DataUri::Tcp { host, .. }) | Listen::Ports(host, _) => host,
            Listen::Uri(DataUri::Unix { path }) => path,
        }
    }
}

fn refused(message: String) -> ApiError {
    ApiError::new(ErrorCode::PermissionDenied, message)
}

/// True when `ip` is one of this host's own addresses: something can bind
/// it here.
fn is_own(ip: IpAddr) -> bool {
    !ip.is_unspecified()
        && !ip.is_multicast()
        && std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

/// Where this host's QEMU listens. Without a hint: the address the peer
/// reached this agent on, on a port of `ports` (or any). A hint (the
/// source's `--migrateuri`) is taken only as `tcp:` to one of this host's
/// own addresses, on a port of `ports` (or an unprivileged one when no
/// range is configured).
///
/// # Errors
/// [`ErrorCode::InvalidArgument`] for a URI that does not parse,
/// [`ErrorCode::PermissionDenied`] for one this host does not listen on.
pub(super) async fn listen(
    hint: Option<&str>,
    local_ip: Option<IpAddr>,
    ports: Option<(u16, u16)>,
) -> Result<Listen, ApiError> {
    let Some(hint) = hint else {
        let ip = local_ip.unwrap_or(IpAddr::from([127, 0, 0, 1]));
        return Ok(match ports {
            Some(range) => Listen::Ports(ip.to_string(), range),
            None => Listen::Uri(DataUri::Tcp {
                host: ip.to_string(),
                port: 0,
            }),
        });
    };
    let uri = parse_data_uri(hint).map_err(|e| errors::invalid(e.to_string()))?;
    let DataUri::Tcp { host, port } = uri else {
        return Err(refused(format!(
            "migration URI {hint:?}: a peer may only propose tcp: to one of this host's own \
             addresses, not where else this host's QEMU opens a socket"
        )));
    };
    let ip = own_address(hint, &host).await?;
    match ports {
        Some(range) if port == 0 => return Ok(Listen::Ports(ip.to_string(), range)),
        Some((first, last)) if !(first..=last).contains(&port) => {
            return Err(refused(format!(
                "migration URI {hint:?}: port {port} is outside this host's migration ports \
                 {first}-{last}"
            )))
        }
        None if port != 0 && port < FIRST_UNPRIVILEGED => {
            return Err(refused(format!(
                "migration URI {hint:?}: port {port} is a privileged port"
            )))
        }
        _ => {}
    }
    Ok(Listen::Uri(DataUri::Tcp {
        host: ip.to_string(),
        port,
    }))
}

/// The address `host` names, if every address it names is this host's.
async fn own_address(hint: &str, host: &str) -> Result<IpAddr, ApiError> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let addresses: Vec<IpAddr> = match bare.parse::<IpAddr>() {
        Ok(ip) => vec![ip],
        Err(_) => tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((bare, 0)))
            .await
            .map_err(|_| {
                errors::invalid(format!(
                    "migration URI {hint:?}: {host} did not resolve in time"
                ))
            })?
            .map_err(|e| {
                errors::invalid(format!(
                    "migration URI {hint:?}: cannot resolve {host}: {e}"
                ))
            })?
            .map(|a| a.ip())
            .collect(),
    };
    match addresses.iter().find(|ip| !is_own(**ip)) {
        Some(other) => Err(refused(format!(
            "migration URI {hint:?}: {other} is not an address of this host"
        ))),
        None => addresses.first().copied().ok_or_else(|| {
            errors::invalid(format!("migration URI {hint:?}: {host} names no address"))
        }),
    }
}

/// The NBD port a peer asked for (`--disks-port`), if this host allows it:
/// within its migration ports, or unprivileged when it has none.
///
/// # Errors
/// [`ErrorCode::PermissionDenied`] naming the port.
pub(super) fn nbd_port(asked: Option<u16>, ports: Option<(u16, u16)>) -> Result<(), ApiError> {
    match (asked, ports) {
        (Some(port), Some((first, last))) if !(first..=last).contains(&port) => Err(refused(
            format!("disks port {port} is outside this host's migration ports {first}-{last}"),
        )),
        (Some(port), None) if port < FIRST_UNPRIVILEGED => {
            Err(refused(format!("disks port {port} is a privileged port")))
        }
        _ => Ok(()),
    }
}

/// The arriving guest's files are its own: no disk (or kernel, initrd)
/// another domain defined or running here names, compared after resolving
/// links. A peer could otherwise run a guest of its own on another
/// domain's disk.
///
/// # Errors
/// [`ErrorCode::PermissionDenied`] naming the file and the domain.
pub(super) async fn own_files(
    arriving: &DomainDefinition,
    others: &[DomainDefinition],
) -> Result<(), ApiError> {
    async fn real(path: &Path) -> std::path::PathBuf {
        tokio::fs::canonicalize(path)
            .await
            .unwrap_or_else(|_| path.to_path_buf())
    }
    fn disks(def: &DomainDefinition) -> Vec<&Path> {
        def.disks.iter().map(|d| d.path.as_path()).collect()
    }
    let mut theirs = Vec::new();
    for other in others.iter().filter(|o| o.name != arriving.name) {
        for path in disks(other) {
            theirs.push((real(path).await, other.name.to_string()));
        }
    }
    for path in disks(arriving) {
        let mine = real(path).await;
        if let Some((_, owner)) = theirs.iter().find(|(p, _)| *p == mine) {
            return Err(refused(format!(
                "disk {} is domain '{owner}''s on this host: an arriving guest may not use it",
                path.display()
            )));
        }
    }
    Ok(())
}

/// The disks a peer copies here: each one of the definition's, once, not
/// on shared storage, and any backing file its new image sits on held to
/// this host's confinement, down its chain.
///
/// # Errors
/// [`ErrorCode::InvalidArgument`] or [`ErrorCode::PermissionDenied`]
/// naming the disk; nothing has been created.
pub(super) async fn storage(
    def: &DomainDefinition,
    copies: &[StorageCopy],
    confinement: &Confinement,
) -> Result<(), ApiError> {
    let mut seen = Vec::new();
    for copy in copies {
        if seen.contains(&&copy.target) {
            return Err(errors::invalid(format!(
                "the source copies disk {} twice",
                copy.target
            )));
        }
        seen.push(&copy.target);
        let disk = def
            .disks
            .iter()
            .enumerate()
            .find(|(index, d)| d.target_name(*index) == copy.target)
            .map(|(_, d)| d)
            .ok_or_else(|| {
                errors::invalid(format!(
                    "the source copies disk {}, which the definition does not have",
                    copy.target
                ))
            })?;
        if disk.shared {
            return Err(errors::invalid(format!(
                "the source copies disk {}, which the definition puts on shared storage",
                copy.target
            )));
        }
        if copy.virtual_size == 0 {
            return Err(errors::invalid(format!(
                "the source copies disk {} with a size of 0",
                copy.target
            )));
        }
        if let Some((file, format)) = &copy.backing {
            backing(&copy.target, file, format, confinement).await?;
        }
    }
    Ok(())
}

/// A backing file a new image is to sit on (`--copy-storage-inc`): a plain
/// absolute name, raw or qcow2, existing, confined with its chain.
async fn backing(
    target: &str,
    file: &str,
    format: &str,
    confinement: &Confinement,
) -> Result<(), ApiError> {
    let format = match format {
        "raw" => DiskFormat::Raw,
        "qcow2" => DiskFormat::Qcow2,
        other => {
            return Err(errors::invalid(format!(
                "disk {target}: backing format {other:?} is neither raw nor qcow2"
            )))
        }
    };
    let path = Path::new(file);
    if !path.is_absolute() {
        return Err(refused(format!(
            "disk {target}: backing file {file:?} is not an absolute file name (a protocol, a \
             JSON description and relative names are refused)"
        )));
    }
    confinement
        .check_image("backing file", path, format)
        .await
        .map_err(|e| refused(format!("disk {target}: {}", errors::chain(&e))))?;
    match tokio::fs::metadata(path).await {
        Ok(m) if m.is_file() || confinement.allow_device_nodes => Ok(()),
        Ok(_) => Err(refused(format!(
            "disk {target}: backing file {file:?} is not a regular file"
        ))),
        Err(e) => Err(ApiError::new(
            ErrorCode::Storage,
            format!("disk {target}: backing file {file:?} is not on this host: {e}"),
        )),
    }
}

/// What a guest arriving from `caller` takes here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Claim<'a> {
    /// The domain's name.
    pub name: &'a str,
    /// Its guest RAM, MiB (0 for an offline migration: no VM).
    pub memory_mib: u64,
    /// The images it creates, bytes.
    pub disk_bytes: u64,
}

/// May `caller` have `claim` arrive, given what the table holds
/// (`arrival`): an administrator may; an agent certificate only for a new
/// domain or one whose guest was handed to it (or that `rules` let it
/// replace), within its quotas counted over the incoming migrations it has
/// under way.
///
/// # Errors
/// [`ErrorCode::PermissionDenied`] saying which rule, and what the
/// administrator can change.
pub(super) fn admit(
    arrival: &Arrival<'_>,
    caller: &Caller,
    rules: &PeerRules,
    claim: Claim<'_>,
) -> Result<(), ApiError> {
    let peer = match (caller.role(), caller.name()) {
        (protocol::Role::Agent, Some(peer)) => peer,
        // Administrators are trusted with this host already.
        _ => return Ok(()),
    };
    let name = claim.name;
    if let Some(bound) = arrival.existing {
        if bound != Some(peer) && !rules.may_replace(peer) {
            return Err(refused(format!(
                "domain '{name}' is defined on this host and its guest was not handed to \
                 {peer}: a peer may not replace it (an administrator here can undefine it, \
                 or allow {peer} with --allow-replace {peer})"
            )));
        }
    }
    let mine: Vec<_> = arrival
        .incoming
        .iter()
        .filter(|j| j.prepared_by.as_deref() == Some(peer))
        .collect();
    if mine.len() >= rules.max_jobs {
        return Err(refused(format!(
            "{peer} already has {} incoming migrations under way here, its limit \
             (--peer-max-jobs)",
            mine.len()
        )));
    }
    if claim.memory_mib > 0 {
        let memory: u64 = mine
            .iter()
            .filter(|j| !j.ident.flags.offline())
            .map(|j| u64::from(j.definition.memory_mib))
            .sum::<u64>()
            + claim.memory_mib;
        if memory > rules.max_memory_mib {
            return Err(refused(format!(
                "'{name}' would bring the guest RAM of {peer}'s incoming migrations to {memory} \
                 MiB, over its limit of {} MiB (--peer-max-memory)",
                rules.max_memory_mib
            )));
        }
    }
    let disk: u64 = mine.iter().map(|j| j.disk_bytes).sum::<u64>() + claim.disk_bytes;
    if disk > rules.max_disk_gib << 30 {
        return Err(refused(format!(
            "'{name}' would bring the disks {peer}'s incoming migrations create to {} GiB, over \
             its limit of {} GiB (--peer-max-disk)",
            disk.div_ceil(1 << 30),
            rules.max_disk_gib
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
