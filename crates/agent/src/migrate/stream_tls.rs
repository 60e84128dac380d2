//! This host's rules for encrypted migration streams (`--tls`), and the
//! QEMU set-up for each side from the agent's certificate.

use migration::stream_tls::{StreamTls, TlsPeer};
use migration::Flags;
use protocol::{AgentUri, ApiError};

use crate::caller::{Caller, ConnContext};
use crate::errors;
use crate::state::Agent;

/// Refuses a migration this host will not take part in: one without
/// `--tls` where the config forces it (`migrate_tls_force`), and one with
/// `--tls` on an agent without certificates.
pub(crate) fn check(agent: &Agent, flags: &Flags) -> Result<(), ApiError> {
    if flags.offline() {
        // No stream: only the definition moves, over the agents' TLS.
        return Ok(());
    }
    if agent.config.migrate_tls_force && !flags.stream().tls {
        return Err(errors::operation_invalid(format!(
            "{} only migrates with an encrypted stream (migrate_tls_force): add --tls",
            agent.uri
        )));
    }
    if flags.stream().tls && agent.qemu_credentials.is_none() {
        return Err(errors::operation_invalid(format!(
            "--tls needs certificates on {}: start its livemigd with --tls-dir",
            agent.uri
        )));
    }
    Ok(())
}

/// The source's QEMU set-up, after [`check`]: the destination's
/// certificate must be valid for the host its agent was dialled at, or
/// for `--tls-destination`.
pub(crate) fn source(
    agent: &Agent,
    flags: &Flags,
    destination: &AgentUri,
) -> Result<Option<StreamTls>, ApiError> {
    check(agent, flags)?;
    if !flags.stream().tls {
        return Ok(None);
    }
    let dialled = match destination.host_port() {
        Some((host, _)) => host.trim_start_matches('[').trim_end_matches(']'),
        // A peer on this host's socket: its QEMU listens on loopback.
        None => "localhost",
    };
    // `--tls-destination`: the name its certificate carries when it is
    // dialled by another (an address, say).
    let hostname = flags
        .options()
        .tls_destination
        .as_deref()
        .unwrap_or(dialled);
    Ok(Some(StreamTls {
        credentials: credentials(agent)?,
        peer: TlsPeer::Destination {
            hostname: hostname.to_string(),
        },
    }))
}

/// The destination's QEMU set-up, after [`check`]: only the source agent
/// that asked, as its certificate names it, may send.
pub(crate) fn destination(
    agent: &Agent,
    flags: &Flags,
    ctx: &ConnContext,
) -> Result<Option<StreamTls>, ApiError> {
    check(agent, flags)?;
    if !flags.stream().tls {
        return Ok(None);
    }
    let Caller::Certified(identity) = &ctx.caller else {
        return Err(errors::operation_invalid(format!(
            "--tls admits the source by its agent's certificate, and {} reached {} without one: \
             let the agents talk over tls://",
            ctx.caller, agent.uri
        )));
    };
    Ok(Some(StreamTls {
        credentials: credentials(agent)?,
        peer: TlsPeer::Source {
            distinguished_names: identity.distinguished_names().to_vec(),
        },
    }))
}

fn credentials(agent: &Agent) -> Result<std::path::PathBuf, ApiError> {
    agent
        .qemu_credentials
        .clone()
        .ok_or_else(|| errors::operation_invalid(format!("no TLS credentials on {}", agent.uri)))
}
