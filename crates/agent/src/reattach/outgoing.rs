//! A migration this host was sending when its agent went away: cancel a
//! copy still running, settle a completed one with the destination, and
//! make sure exactly one copy of the guest runs.

use std::sync::Arc;
use std::time::Duration;

use domain::qemu::STOP_TIMEOUT;
use domain::DomainName;
use migration::cleanup::resume_source;
use migration::job::unix_ms;
use migration::settings::{self, ThrottleVia};
use migration::Flags;
use protocol::domain::Tunables;
use protocol::job::{JobStatus, Phase, Role};
use protocol::{AgentUri, Client};
use qmp::commands::migration::{MigrateCancel, MigrationStatus, QueryMigrate};
use tokio::time::Instant;

use super::identity;
use crate::runfile::RunJob;
use crate::running::RunningVm;
use crate::state::Agent;

/// How long a copy still running gets to settle after `migrate_cancel`.
const CANCEL_WAIT: Duration = Duration::from_secs(30);

/// Why the destination could not be asked.
#[derive(Debug, thiserror::Error)]
enum AskError {
    #[error(transparent)]
    Uri(#[from] protocol::BadAgentUri),
    #[error(transparent)]
    Client(#[from] protocol::ClientError),
}

/// Asks the destination whether the guest runs there, tearing its side
/// down if not. `Err` when it cannot be asked.
async fn ask_destination(
    job: &RunJob,
    reason: &str,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<bool, AskError> {
    let uri: AgentUri = job.peer.parse()?;
    let client = Client::connect_with(&uri, tls).await?;
    let abort = protocol::call::PeerAbort {
        job_id: job.id.clone(),
        reason: reason.to_string(),
    };
    Ok(client.call(abort, protocol::REQUEST_TIMEOUT).await?)
}

/// What became of a job the agent was not there to finish.
#[derive(Debug, PartialEq, Eq)]
struct Resolution {
    status: JobStatus,
    error: Option<String>,
    /// What was done about the guest.
    recovery: String,
    /// The guest runs on the destination: the source QEMU must go.
    stop_source: bool,
}

/// Brings the job to an end as far as QEMU and the destination go: a copy
/// still running is cancelled; a completed one is settled with the
/// destination; the guest resumes here unless it may run there.
async fn resolve(
    qmp: &qmp::Client,
    job: &RunJob,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Resolution {
    let status = |info: qmp::commands::migration::MigrationInfo| info.status;
    let mut state = qmp.execute(&QueryMigrate).await.ok().and_then(status);
    let running_copy = matches!(
        state,
        Some(
            MigrationStatus::Setup
                | MigrationStatus::Active
                | MigrationStatus::PreSwitchover
                | MigrationStatus::Device
                | MigrationStatus::WaitUnplug
                | MigrationStatus::Cancelling
        )
    );
    if running_copy {
        let _ = qmp.execute(&MigrateCancel).await;
        let deadline = Instant::now() + CANCEL_WAIT;
        while Instant::now() < deadline {
            state = qmp.execute(&QueryMigrate).await.ok().and_then(status);
            if state.is_some_and(MigrationStatus::is_finished) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // Disk mirrors of the dead job point at a destination that is being
    // torn down; they would also stand in the way of the next copy.
    migration::storage::source::Mirrors::sweep(qmp).await;

    let why = "the source agent restarted during the migration";
    let resolution = |status, error, recovery: String| Resolution {
        status,
        error,
        recovery,
        stop_source: false,
    };
    match state {
        Some(MigrationStatus::Completed) => match ask_destination(job, why, tls).await {
            Ok(true) => Resolution {
                status: JobStatus::Completed,
                error: None,
                recovery: "the copy completed and the destination had resumed the guest; the \
                           source QEMU was stopped"
                    .into(),
                stop_source: true,
            },
            Ok(false) => resolution(
                JobStatus::Failed,
                Some(format!(
                    "{why}, after the copy but before the destination resumed the guest"
                )),
                resume_source(qmp, true).await,
            ),
            Err(e) => resolution(
                JobStatus::Failed,
                Some(format!(
                    "{why}, after the copy; the destination cannot be asked: {e}"
                )),
                "guest left paused on the source because it may be running on the destination; \
                 check the destination, then resume or destroy this copy"
                    .into(),
            ),
        },
        Some(
            MigrationStatus::PostcopyActive
            | MigrationStatus::PostcopyPaused
            | MigrationStatus::PostcopyRecover,
        ) => resolution(
            JobStatus::Failed,
            Some(format!("{why}, during post-copy")),
            "left to QEMU: the guest runs on the destination; recover with `livemig migrate \
             --postcopy-resume` if it paused"
                .into(),
        ),
        _ => {
            let _ = ask_destination(job, why, tls).await;
            resolution(
                JobStatus::Cancelled,
                Some(format!("{why}; the migration was cancelled")),
                resume_source(qmp, true).await,
            )
        }
    }
}

/// Settles an outgoing job found in a run record and writes its record.
pub(super) async fn resolve_outgoing(
    agent: &Arc<Agent>,
    name: &DomainName,
    vm: &Arc<RunningVm>,
    job: &RunJob,
) {
    let qmp = vm.process.qmp();
    let Resolution {
        status,
        error,
        recovery,
        stop_source,
    } = resolve(qmp, job, agent.peer_tls().as_ref()).await;
    if stop_source {
        vm.process.shutdown(STOP_TIMEOUT).await;
    }
    if vm.process.exit_info().is_none() {
        // The job's own settings cannot be read back; put ours to default.
        let _ = settings::apply(
            qmp,
            &Flags::default(),
            Tunables::default(),
            Role::Source,
            ThrottleVia::NotQemu,
            None,
        )
        .await;
    }
    let phase = if status == JobStatus::Completed {
        Phase::Done
    } else {
        Phase::Cleanup
    };
    let elapsed = Duration::from_millis(unix_ms().saturating_sub(job.started_at_ms));
    let mut record = identity(agent, name, job, Role::Source).record(status, phase, elapsed);
    record.error = error;
    record.recovery = Some(recovery);
    tracing::warn!(domain = %name, job = %job.id, status = %record.status, recovery = ?record.recovery, "in-flight migration resolved after restart");
    agent.metrics.job_finished(&record);
    if let Err(e) = agent.history.save(&record).await {
        tracing::error!(error = %crate::errors::chain(&e), "could not save the job record");
    }
    agent.table.set_last_job(name, record);
}

#[cfg(test)]
mod tests {
    use protocol::scripted::{Answer, ScriptedAgent};
    use protocol::{MigrateOptions, Reply, Request};
    use qmp::scripted::ScriptedQemu;

    use super::*;

    fn job(peer: &ScriptedAgent) -> RunJob {
        RunJob {
            id: "job-1".into(),
            peer: peer.uri().to_string(),
            flags: MigrateOptions {
                live: true,
                ..Default::default()
            },
            started_at_ms: 0,
            created_domain: false,
            created_images: Vec::new(),
            peer_name: None,
        }
    }

    fn destination(dir: &std::path::Path, guest_running_here: Option<bool>) -> ScriptedAgent {
        ScriptedAgent::start(dir, move |request| match (request, guest_running_here) {
            (Request::PeerAbort { .. }, Some(running)) => Answer::Reply(Reply::Aborted {
                guest_running_here: running,
            }),
            (Request::PeerAbort { .. }, None) => Answer::Die,
            (other, _) => panic!("unexpected request {other:?}"),
        })
    }

    #[tokio::test]
    async fn a_copy_still_running_is_cancelled_and_the_guest_stays_here() {
        let dir = tempfile::tempdir().unwrap();
        let peer = destination(dir.path(), Some(false));
        let (qmp, qemu) = ScriptedQemu::start().await;
        qemu.with(|s| s.status = Some(MigrationStatus::Active));

        let r = resolve(&qmp, &job(&peer), None).await;

        assert_eq!(r.status, JobStatus::Cancelled);
        assert!(!r.stop_source);
        assert_eq!(r.recovery, "source kept running");
        assert_eq!(qemu.calls("migrate_cancel").len(), 1);
        assert_eq!(peer.ops(), ["peer-abort"], "the destination tears down");
    }

    #[tokio::test]
    async fn a_completed_copy_the_destination_runs_stops_the_source() {
        let dir = tempfile::tempdir().unwrap();
        let peer = destination(dir.path(), Some(true));
        let (qmp, qemu) = ScriptedQemu::start().await;
        qemu.complete(1000, 10);

        let r = resolve(&qmp, &job(&peer), None).await;

        assert_eq!(r.status, JobStatus::Completed);
        assert!(r.stop_source);
        assert!(qemu.calls("cont").is_empty(), "never two running copies");
    }

    #[tokio::test]
    async fn a_completed_copy_the_destination_did_not_resume_resumes_here() {
        let dir = tempfile::tempdir().unwrap();
        let peer = destination(dir.path(), Some(false));
        let (qmp, qemu) = ScriptedQemu::start().await;
        qemu.complete(1000, 10);

        let r = resolve(&qmp, &job(&peer), None).await;

        assert_eq!(r.status, JobStatus::Failed);
        assert!(!r.stop_source);
        assert_eq!(r.recovery, "source resumed");
        assert_eq!(qemu.calls("cont").len(), 1);
    }

    #[tokio::test]
    async fn a_completed_copy_with_no_destination_to_ask_stays_paused() {
        let dir = tempfile::tempdir().unwrap();
        let peer = destination(dir.path(), None);
        let (qmp, qemu) = ScriptedQemu::start().await;
        qemu.complete(1000, 10);

        let r = resolve(&qmp, &job(&peer), None).await;

        assert_eq!(r.status, JobStatus::Failed);
        assert!(!r.stop_source);
        assert!(r.recovery.contains("left paused"), "{}", r.recovery);
        assert!(
            qemu.calls("cont").is_empty(),
            "it may run on the destination"
        );
    }

    #[tokio::test]
    async fn a_migration_in_postcopy_is_left_to_qemu() {
        let dir = tempfile::tempdir().unwrap();
        let peer = destination(dir.path(), Some(false));
        let (qmp, qemu) = ScriptedQemu::start().await;
        qemu.with(|s| s.status = Some(MigrationStatus::PostcopyActive));

        let r = resolve(&qmp, &job(&peer), None).await;

        assert_eq!(r.status, JobStatus::Failed);
        assert!(r.recovery.contains("postcopy-resume"), "{}", r.recovery);
        assert!(qemu.calls("migrate_cancel").is_empty());
        assert!(qemu.calls("cont").is_empty());
        assert!(peer.ops().is_empty(), "the destination runs the guest");
    }
}
