//! A migration this host was receiving when its agent went away: the
//! incoming QEMU is kept, paused, for the source to finish or abort.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use domain::DomainName;
use protocol::job::{JobStatus, Phase, Role};
use protocol::AgentUri;
use tokio::time::Instant;

use super::identity;
use crate::jobs::IncomingJob;
use crate::migrate::destination;
use crate::runfile::{RunJob, RunRecord};
use crate::running::RunningVm;
use crate::state::Agent;

/// Keeps an incoming QEMU for its source to finish or abort, within the
/// agent's orphan timeout.
pub(super) fn keep_incoming(
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
    });
    agent.table.keep_incoming(name, incoming.clone());
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
                if status != JobStatus::Completed {
                    destination::teardown(
                        &agent,
                        &name,
                        &incoming,
                        &format!(
                            "the source reports the migration {status} while this agent was down"
                        ),
                    )
                    .await;
                    return;
                }
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
