//! The livemig agent protocol (see `docs/PROTOCOL.md`).
//!
//! Newline-delimited JSON over a unix socket (the local CLI) or TCP (remote
//! CLIs and peer agents). Every message is an envelope carrying the protocol
//! version and a request id; requests are answered in order.
//!
//! This crate is the bottom of the stack: it names no other livemig crate
//! but `types`, so the wire form of a request changes only when this crate
//! does. The libraries and the agent convert to and from these types.
//!
//! - [`envelope`]: the version and id around every request and reply.
//! - [`request`]: everything an agent can be asked.
//! - [`access`]: who may ask what: access classes and roles.
//! - [`reply`]: successful answers.
//! - [`error`]: errors that cross between processes.
//! - [`domain`]: domains as `list` and `dominfo` show them; definitions.
//! - [`host`]: the agent and its QEMU binary.
//! - [`migrate`]: the options of a migration and the Prepare request.
//! - [`job`]: job statistics, timelines and records.
//! - [`estimate`]: `estimate`'s measurements and predictions.
//! - [`uri`]: agent addresses (`unix:///path`, `tcp://host:port`).
//! - [`codec`]: reading and writing one line-delimited message.
//! - [`client`]: a client for one connection.
//! - `scripted` (feature `scripted`): a scripted agent for other crates'
//!   tests.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod access;
pub mod call;
pub mod client;
pub mod codec;
pub mod domain;
pub mod envelope;
pub mod error;
pub mod estimate;
pub mod host;
pub mod job;
pub mod migrate;
pub mod reply;
pub mod request;
#[cfg(feature = "scripted")]
pub mod scripted;
pub mod uri;

pub use access::{Access, Role};
pub use client::{Client, ClientError, REQUEST_TIMEOUT};
pub use envelope::PROTOCOL_VERSION;
pub use error::{ApiError, ErrorCode};
pub use migrate::{CompMethod, ConvergeMode, MigrateOptions, TimeoutAction};
pub use reply::{Reply, WatchEvent};
pub use request::Request;
pub use uri::{AgentUri, BadAgentUri};

/// How long an agent connection may go unheard before it counts as lost,
/// unless the agent is configured otherwise.
pub const PEER_SILENCE_LIMIT: std::time::Duration = std::time::Duration::from_secs(20);

/// Turns on TCP keepalive so a peer behind a dead link is noticed within
/// `silence` instead of the kernel's two hours: probes after half of it
/// idle, then five probes over the other half.
pub fn keepalive(stream: &tokio::net::TcpStream, silence: std::time::Duration) {
    let params = socket2::TcpKeepalive::new()
        .with_time((silence / 2).max(std::time::Duration::from_secs(1)))
        .with_interval((silence / 10).max(std::time::Duration::from_secs(1)))
        .with_retries(5);
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&params) {
        tracing::warn!(error = %e, "cannot enable TCP keepalive");
    }
}
