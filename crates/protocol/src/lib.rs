//! The livemig agent protocol (see `docs/PROTOCOL.md`).
//!
//! Newline-delimited JSON over a unix socket (the local CLI) or TCP (remote
//! CLIs and peer agents). Every message is an envelope carrying the protocol
//! version and a request id; requests are answered in order.
//!
//! - [`uri`]: agent addresses (`unix:///path`, `tcp://host:port`).
//! - [`message`]: envelopes, requests, replies, errors.
//! - [`types`]: the data in replies (domain summaries, info, capabilities).
//! - [`client`]: a client for one connection.
//! - [`codec`]: reading and writing one line-delimited message.

#![forbid(unsafe_code)]

pub mod client;
pub mod codec;
pub mod message;
pub mod types;
pub mod uri;

pub use client::{Client, ClientError};
pub use message::{ApiError, ErrorCode, Reply, Request, PROTOCOL_VERSION};
pub use uri::{AgentUri, BadAgentUri};

/// An error and its sources on one line, skipping a source whose text its
/// parent already includes.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let next = e.to_string();
        if !text.contains(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = e.source();
    }
    text
}

/// How long an agent connection may go unheard before it counts as lost:
/// TCP keepalive probes after 10 s idle, every 2 s, five times.
pub const PEER_SILENCE_LIMIT: std::time::Duration = std::time::Duration::from_secs(20);

/// Turns on TCP keepalive so a peer behind a dead link is noticed within
/// [`PEER_SILENCE_LIMIT`] instead of the kernel's two hours.
pub fn keepalive(stream: &tokio::net::TcpStream) {
    let params = socket2::TcpKeepalive::new()
        .with_time(std::time::Duration::from_secs(10))
        .with_interval(std::time::Duration::from_secs(2))
        .with_retries(5);
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&params) {
        tracing::warn!(error = %e, "cannot enable TCP keepalive");
    }
}
