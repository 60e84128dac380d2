//! Finish, made safe against a destination agent that went away or
//! restarted.
//!
//! After the copy completed, the guest may only resume here once the
//! destination says it does not run there, or when Finish provably never
//! reached it (its QEMU, started with `-S`, cannot have run the guest
//! then). If neither can be known, the guest stays paused here: the one
//! state that cannot end with two running copies.

use std::time::Duration;

use protocol::call;
use protocol::ClientError;

use super::peer::Peer;
use crate::errors;

/// What the destination says after the copy completed.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Settled {
    /// It resumed the guest; the guest work, ms, it lost there waiting for
    /// post-copy's pages, if it measured it.
    Finished { postcopy_work_lost_ms: Option<u64> },
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
        .call(
            call::PeerFinish {
                job_id: job_id.to_string(),
            },
            finish_timeout + protocol::REQUEST_TIMEOUT,
        )
        .await;
    let error = match finish {
        Ok(postcopy_work_lost_ms) => {
            return Settled::Finished {
                postcopy_work_lost_ms,
            }
        }
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
        .call(
            call::PeerAbort {
                job_id: job_id.to_string(),
                reason: error.clone(),
            },
            protocol::REQUEST_TIMEOUT,
        )
        .await;
    match asked {
        Ok(true) => Settled::RunsThere(format!(
            "the destination's Finish reply was lost ({error}) but the guest runs there"
        )),
        Ok(false) => Settled::NotThere(format!("destination could not resume the guest: {error}")),
        Err(e) => Settled::Unknown(format!(
            "destination did not confirm Finish: {error}; and its state cannot be checked: {}",
            errors::chain(&e)
        )),
    }
}

#[cfg(test)]
mod tests {
    use protocol::host::AgentInfo;
    use protocol::scripted::{Answer, ScriptedAgent};
    use protocol::{ApiError, ErrorCode, Reply, Request};

    use super::*;

    const JOB: &str = "job-1";
    const SHORT: Duration = Duration::from_millis(1200);

    fn hello() -> Answer {
        Answer::Reply(Reply::Hello(AgentInfo {
            version: "test".into(),
            protocol: protocol::PROTOCOL_VERSION,
            uri: None,
            state_dir: None,
            instance: "peer".into(),
        }))
    }

    fn aborted(guest_running_here: bool) -> Answer {
        Answer::Reply(Reply::Aborted { guest_running_here })
    }

    /// A destination that answers `hello`, and the rest by `finish` and
    /// `abort`.
    fn destination(
        dir: &std::path::Path,
        mut finish: impl FnMut() -> Answer + Send + 'static,
        mut abort: impl FnMut() -> Answer + Send + 'static,
    ) -> ScriptedAgent {
        ScriptedAgent::start(dir, move |request| match request {
            Request::Hello => hello(),
            Request::PeerFinish { job_id } if job_id == JOB => finish(),
            Request::PeerAbort { job_id, .. } if job_id == JOB => abort(),
            other => panic!("unexpected request {other:?}"),
        })
    }

    async fn settle_against(agent: &ScriptedAgent) -> Settled {
        let peer = Peer::connect(&agent.uri(), None, protocol::PEER_SILENCE_LIMIT)
            .await
            .expect("connect");
        settle(&peer, JOB, Duration::from_secs(1), SHORT).await
    }

    #[tokio::test]
    async fn a_destination_that_finishes_settles_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let agent = destination(
            dir.path(),
            || {
                Answer::Reply(Reply::Finished {
                    postcopy_work_lost_ms: None,
                })
            },
            || panic!("no abort after a finish"),
        );

        assert_eq!(
            settle_against(&agent).await,
            Settled::Finished {
                postcopy_work_lost_ms: None
            }
        );
        assert_eq!(agent.ops(), ["hello", "peer-finish"]);
    }

    #[tokio::test]
    async fn a_finish_that_failed_there_is_confirmed_before_the_source_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let agent = destination(
            dir.path(),
            || {
                Answer::Error(ApiError::new(
                    ErrorCode::MigrationFailed,
                    "incoming migration failed on the destination: no space",
                ))
            },
            || aborted(false),
        );

        let settled = settle_against(&agent).await;

        let Settled::NotThere(why) = settled else {
            panic!("{settled:?}")
        };
        assert!(why.contains("no space"), "{why}");
        assert_eq!(agent.ops(), ["hello", "peer-finish", "peer-abort"]);
    }

    #[tokio::test]
    async fn a_lost_finish_reply_is_settled_by_asking_again_and_the_guest_stays_there() {
        let dir = tempfile::tempdir().unwrap();
        // Finish went through, but the connection died before the reply.
        let agent = destination(dir.path(), || Answer::HangUp, || aborted(true));

        let settled = settle_against(&agent).await;

        assert!(
            matches!(&settled, Settled::RunsThere(why) if why.contains("reply was lost")),
            "{settled:?}"
        );
        assert_eq!(agent.ops(), ["hello", "peer-finish", "peer-abort"]);
    }

    #[tokio::test]
    async fn a_peer_that_vanishes_after_finish_leaves_the_outcome_unknown() {
        let dir = tempfile::tempdir().unwrap();
        let agent = destination(dir.path(), || Answer::Die, || panic!("it is gone"));

        let settled = settle_against(&agent).await;

        assert!(
            matches!(&settled, Settled::Unknown(why) if why.contains("may have reached")),
            "the guest must stay paused here: {settled:?}"
        );
    }

    #[tokio::test]
    async fn a_peer_gone_before_finish_cannot_run_the_guest() {
        let dir = tempfile::tempdir().unwrap();
        let agent = destination(
            dir.path(),
            || panic!("Finish must not be sent"),
            || panic!("nor an abort"),
        );
        let peer = Peer::connect(&agent.uri(), None, protocol::PEER_SILENCE_LIMIT)
            .await
            .expect("connect");
        agent.stop();

        let settled = settle(&peer, JOB, Duration::from_secs(1), SHORT).await;

        assert!(
            matches!(&settled, Settled::NotThere(why) if why.contains("before Finish")),
            "{settled:?}"
        );
    }

    #[tokio::test]
    async fn a_failed_finish_whose_state_cannot_be_checked_leaves_the_outcome_unknown() {
        let dir = tempfile::tempdir().unwrap();
        let agent = destination(
            dir.path(),
            || Answer::Error(ApiError::new(ErrorCode::MigrationFailed, "failed")),
            || Answer::Die,
        );

        let settled = settle_against(&agent).await;

        assert!(
            matches!(&settled, Settled::Unknown(why) if why.contains("cannot be checked")),
            "{settled:?}"
        );
    }

    #[tokio::test]
    async fn a_destination_that_restarts_before_finish_is_found_again() {
        let dir = tempfile::tempdir().unwrap();
        let agent = destination(
            dir.path(),
            || {
                Answer::Reply(Reply::Finished {
                    postcopy_work_lost_ms: None,
                })
            },
            || panic!("no abort after a finish"),
        );
        let peer = Peer::connect(&agent.uri(), None, protocol::PEER_SILENCE_LIMIT)
            .await
            .expect("connect");
        agent.stop();
        agent.listen();

        let settled = settle(&peer, JOB, Duration::from_secs(1), SHORT).await;

        assert_eq!(
            settled,
            Settled::Finished {
                postcopy_work_lost_ms: None
            }
        );
    }
}
