//! The source's connection to the destination agent: requests, a ping, and
//! finding the agent again after it went away or restarted.

use std::sync::Arc;
use std::time::Duration;

use protocol::call::{self, Call};
use protocol::{AgentUri, ApiError, Client, ClientError, ErrorCode};
use tokio::time::Instant;

use crate::errors;

/// How long a ping may take.
const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// Between attempts to reconnect.
const RECONNECT_INTERVAL: Duration = Duration::from_millis(500);
/// How long an abort looks for a destination agent that went away.
const ABORT_RETRY: Duration = Duration::from_secs(5);

/// The destination agent of one job.
#[derive(Debug)]
pub(crate) struct Peer {
    uri: AgentUri,
    tls: Option<Arc<rustls::ClientConfig>>,
    /// How long it may be unheard before it counts as gone.
    silence: Duration,
    /// Its certificate's name (over TLS): the host the guest is handed
    /// to, and the only one a reconnection may reach.
    name: Option<String>,
    client: tokio::sync::Mutex<Client>,
}

/// The name on the certificate `client`'s agent presented.
fn certificate_name(client: &Client) -> Option<String> {
    let der = client.peer_certificate()?;
    tls::Identity::from_certificate(der).ok().map(|i| i.name)
}

impl Peer {
    /// Connects to the destination agent (with `tls` for a `tls://` URI),
    /// watching the connection on the scale of `silence`.
    pub async fn connect(
        uri: &AgentUri,
        tls: Option<Arc<rustls::ClientConfig>>,
        silence: Duration,
    ) -> Result<Peer, ApiError> {
        let client = Client::connect_watching(uri, tls.as_ref(), silence)
            .await
            .map_err(|e| {
                ApiError::new(
                    ErrorCode::PeerUnreachable,
                    format!(
                        "destination agent is down or unreachable: {}",
                        errors::chain(&e)
                    ),
                )
            })?;
        Ok(Peer {
            uri: uri.clone(),
            tls,
            silence,
            name: certificate_name(&client),
            client: tokio::sync::Mutex::new(client),
        })
    }

    pub fn uri(&self) -> &AgentUri {
        &self.uri
    }

    /// The destination's certificate name, over TLS.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// Sends a typed call on the current connection.
    pub async fn call<C: Call>(
        &self,
        call: C,
        timeout: Duration,
    ) -> Result<C::Output, ClientError> {
        self.client.lock().await.call(call, timeout).await
    }

    /// True if the connection still answers.
    pub async fn ping(&self) -> bool {
        self.call(call::Hello {}, PING_TIMEOUT).await.is_ok()
    }

    /// After `delay`: does the agent answer, on this connection or a new
    /// one?
    pub async fn answers_after(&self, delay: Duration) -> bool {
        tokio::time::sleep(delay).await;
        self.ping().await || self.reconnect(Duration::ZERO).await && self.ping().await
    }

    /// Connects to the agent again, retrying until `within`.
    pub async fn reconnect(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            if let Ok(client) =
                Client::connect_watching(&self.uri, self.tls.as_ref(), self.silence).await
            {
                let name = certificate_name(&client);
                if name != self.name {
                    tracing::error!(expected = ?self.name, found = ?name, "another host answers at the destination's address");
                    return false;
                }
                *self.client.lock().await = client;
                tracing::info!("reconnected to the destination agent");
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(RECONNECT_INTERVAL).await;
        }
    }

    /// Tells the destination to tear its side down. A restarted agent
    /// keeps the incoming QEMU for us rather than tying it to the old
    /// connection, so it is looked for again if the connection is gone.
    /// An agent that is there answers at once; one already found `unheard`
    /// for the peer silence gets a single short try (it tears its side
    /// down by itself when our connection is gone).
    pub async fn abort(&self, job_id: &str, reason: &str, unheard: bool) {
        let abort = || call::PeerAbort {
            job_id: job_id.to_string(),
            reason: reason.to_string(),
        };
        let (timeout, retry) = if unheard {
            (PING_TIMEOUT, Duration::ZERO)
        } else {
            (self.silence, ABORT_RETRY.min(self.silence))
        };
        let mut result = self.call(abort(), timeout).await;
        if matches!(result, Err(ref e) if !matches!(e, ClientError::Api(_)))
            && !retry.is_zero()
            && self.reconnect(retry).await
        {
            result = self.call(abort(), timeout).await;
        }
        if let Err(e) = result {
            tracing::warn!(error = %e, "could not reach the destination to abort; it tears down when our connection closes");
        }
    }
}
