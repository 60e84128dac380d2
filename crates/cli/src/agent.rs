//! Reaching an agent: where the local one is, TLS for a remote one, and
//! typed calls with the CLI's timeout.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use domain::DomainName;
use protocol::call::Call;
use protocol::{AgentUri, Client};

/// Requests that only read or change local state answer quickly.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// The local agent's socket as the packaged config and systemd unit set
/// it up (`contrib/`): the agent used with no `-c` and no `LIVEMIG_URI`,
/// as virsh defaults to `qemu:///system`.
pub const DEFAULT_URI: &str = "unix:///run/livemig/livemigd.sock";

/// Connects to the agent at `uri` (the local one by default), with the TLS
/// directory for `tls://`.
///
/// # Errors
/// A bad URI, an unusable TLS directory, or an agent that does not answer.
pub async fn connect(uri: Option<&str>, tls_dir: Option<&Path>) -> Result<Client> {
    let uri: AgentUri = uri.unwrap_or(DEFAULT_URI).parse()?;
    let tls = match (&uri, tls_dir) {
        (AgentUri::Tls { .. }, Some(dir)) => Some(
            tls::TlsDir::load(dir)
                .and_then(|d| d.client_config())
                .with_context(|| format!("cannot use the TLS directory {}", dir.display()))?,
        ),
        _ => None,
    };
    Ok(Client::connect_with(&uri, tls.as_ref()).await?)
}

/// Sends a typed call with the CLI's timeout.
///
/// # Errors
/// The agent's refusal, or the conversation's failure.
pub async fn call<C: Call>(client: &Client, call: C) -> Result<C::Output> {
    Ok(client.call(call, REQUEST_TIMEOUT).await?)
}

/// A domain name as given on the command line.
///
/// # Errors
/// A name the agent would refuse.
pub fn domain(name: &str) -> Result<DomainName> {
    Ok(name.parse()?)
}
