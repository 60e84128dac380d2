//! Finish, made safe against a destination agent that went away or
//! restarted.
//!
//! After the copy completed, the guest may only resume here once the
//! destination says it does not run there, or when Finish provably never
//! reached it (its QEMU, started with `-S`, cannot have run the guest
//! then). If neither can be known, the guest stays paused here: the one
//! state that cannot end with two running copies.

use std::time::Duration;

use protocol::{ClientError, Reply, Request};

use super::peer::{unexpected, Peer};
use crate::errors;

/// How long to look for a destination agent that went away mid-job (one
/// that restarts comes back well within it).
pub(crate) const PEER_RETRY: Duration = Duration::from_secs(30);

/// What the destination says after the copy completed.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Settled {
    /// It resumed the guest.
    Finished,
    /// It runs the guest, though Finish's answer was lost.
    RunsThere(String),
    /// It does not run the guest (and tore its side down).
    NotThere(String),
    /// It cannot be asked.
    Unknown(String),
}

/// Sends Finish for `job_id` and settles what the destination did with
/// it; `finish_timeout` is how long the destination may take to receive
/// the last of the data. `retry` is how long to look for the agent again.
pub(crate) async fn settle(
    peer: &Peer,
    job_id: &str,
    finish_timeout: Duration,
    retry: Duration,
) -> Settled {
    if !peer.ping().await && !peer.reconnect(retry).await {
        return Settled::NotThere(format!(
            "the destination agent {} went away before Finish and did not come back within {}s; \
             its paused QEMU is removed when that agent restarts",
            peer.uri(),
            retry.as_secs()
        ));
    }
    let finish = peer
        .request(
            Request::PeerFinish {
                job_id: job_id.to_string(),
            },
            finish_timeout + protocol::REQUEST_TIMEOUT,
        )
        .await;
    let error = match finish {
        Ok(Reply::Finished) => return Settled::Finished,
        Ok(reply) => unexpected(&reply).message,
        // It answered: Finish failed there (and it tore its side down),
        // or it does not know the job. Its record says which.
        Err(ClientError::Api(e)) => e.message,
        // The request may have arrived: find the agent again to ask.
        Err(e) => {
            let error = errors::chain(&e);
            if !peer.reconnect(retry).await {
                return Settled::Unknown(format!(
                    "Finish may have reached the destination ({error}), which cannot be asked since"
                ));
            }
            error
        }
    };
    tracing::error!(%error, "destination did not finish");
    let asked = peer
        .request(
            Request::PeerAbort {
                job_id: job_id.to_string(),
                reason: error.clone(),
            },
            protocol::REQUEST_TIMEOUT,
        )
        .await;
    match asked {
        Ok(Reply::Aborted {
            guest_running_here: true,
        }) => Settled::RunsThere(format!(
            "the destination's Finish reply was lost ({error}) but the guest runs there"
        )),
        Ok(Reply::Aborted {
            guest_running_here: false,
        }) => Settled::NotThere(format!("destination could not resume the guest: {error}")),
        other => Settled::Unknown(format!(
            "destination did not confirm Finish: {error}; and its state cannot be checked: {}",
            match other {
                Ok(reply) => unexpected(&reply).message,
                Err(e) => errors::chain(&e),
            }
        )),
    }
}
