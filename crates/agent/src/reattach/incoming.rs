//! A migration this host was receiving when its agent went away. If it
//! had finished here (its record says so, or the guest runs with the data
//! landed), the domain simply runs here; otherwise the incoming QEMU is
//! kept, paused, for the source to finish or abort.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use domain::DomainName;
use protocol::job::{JobStatus, Phase, Role};
use protocol::AgentUri;
use qmp::commands::migration::{MigrationStatus, QueryMigrate};
use qmp::commands::vm::{QueryStatus, RunState};
use tokio::time::Instant;

use super::identity;
use crate::jobs::IncomingJob;
use crate::migrate::destination;
use crate::runfile::{RunJob, RunRecord};
use crate::running::RunningVm;
use crate::state::Agent;

/// Settles an incoming migration found at start-up: one that finished
/// here ends as a domain running here; any other is kept for its source
/// to finish or abort, within the agent's orphan timeout.
pub(super) async fn resolve_incoming(
    agent: &Arc<Agent>,
    name: &DomainName,
    vm: &Arc<RunningVm>,
    job: &RunJob,
    record: &RunRecord,
) {
    let incoming = Arc::new(IncomingJob {
        ident: identity(agent, name, job, Role::Destination),
        started: Instant::now(),
        // No connection prepared it in this process: it is not torn down
        // when one closes, only by the source or the deadline.
        connection: 0,
        // Still only the agent that prepared it (or an administrator) may
        // finish or abort it.
        prepared_by: job.peer_name.clone(),
        disk_bytes: 0,
        created_domain: job.created_domain,
        previous: Default::default(),
        vm: Some(vm.clone()),
        phase: Mutex::new(Phase::Perform),
        definition: record.definition.clone(),
        replaced_definition: None,
        reattached: true,
        created_images: job.created_images.clone(),
        postcopy_resume: Default::default(),
    });
    agent.table.keep_incoming(name, incoming.clone());
    // Finish makes the job record durable before it answers; an agent
    // that died after that (but before the run record lost the job) left a
    // guest that runs here and a source that has let it go.
    match agent.history.load(&job.id).await {
        Ok(Some(done)) if done.role == Role::Destination && done.status == JobStatus::Completed => {
            agent.table.end_job(name, &job.id, done);
            agent.bind(name, None).await;
            tracing::info!(domain = %name, job = %job.id, "the migration had finished here before the restart");
            return;
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(domain = %name, error = %crate::errors::chain(&e), "cannot read the job's record");
        }
    }
    // Died between resuming the guest and recording it: the guest runs.
    if landed_and_running(vm).await {
        destination::landed_here(agent, name, &incoming).await;
        tracing::info!(domain = %name, job = %job.id, "the guest had resumed here before the restart");
        return;
    }
    tracing::warn!(domain = %name, job = %job.id, "incoming migration kept for its source after restart");
    let agent = agent.clone();
    let name = name.clone();
    let source = job.peer.clone();
    tokio::spawn(async move {
        let deadline = Instant::now() + agent.config.timeouts.orphan;
        let waiting = || agent.table.is_incoming(&name, &incoming);
        // Ask the source how its job stands; one that has ended without us
        // will never finish here.
        while Instant::now() < deadline && waiting() {
            if let Some(status) = source_job_status(&agent, &source, &incoming.ident.id).await {
                if !waiting() {
                    return;
                }
                if status == JobStatus::Completed {
                    // The source let the guest go: its only copy is here.
                    let _ = destination::finish_job(&agent, &name, &incoming).await;
                } else {
                    destination::teardown(
                        &agent,
                        &name,
                        &incoming,
                        &format!(
                            "the source reports the migration {status} while this agent was down"
                        ),
                    )
                    .await;
                }
                return;
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        if waiting() {
            destination::teardown(
                &agent,
                &name,
                &incoming,
                "no word from the source within the orphan timeout after an agent restart",
            )
            .await;
        }
    });
}

/// True if the incoming data has landed and the guest runs (Finish
/// resumed it); a guest in post-copy runs too, but its pages still come
/// from the source, which settles it.
async fn landed_and_running(vm: &RunningVm) -> bool {
    let qmp = vm.process.qmp();
    let landed = matches!(
        qmp.execute(&QueryMigrate).await,
        Ok(info) if info.status == Some(MigrationStatus::Completed)
    );
    landed && matches!(qmp.execute(&QueryStatus).await, Ok(s) if s.status == RunState::Running)
}

/// How the source agent says a job ended; `None` while it runs or when the
/// source cannot be asked.
async fn source_job_status(agent: &Agent, source: &str, job_id: &str) -> Option<JobStatus> {
    let uri: AgentUri = source.parse().ok()?;
    let client = agent.dial(&uri).await.ok()?;
    let asked = protocol::call::Job {
        id: job_id.to_string(),
    };
    match client.call(asked, protocol::REQUEST_TIMEOUT).await {
        Ok(protocol::call::JobState::Ended(record)) => Some(record.status),
        _ => None,
    }
}
