//! Taking over what an earlier agent process left running.
//!
//! At start-up, every run record whose QEMU still answers on its QMP socket
//! is adopted: the domain is running again, under this agent. A migration
//! that was in flight is brought to a consistent end:
//!
//! - **source**: a copy still running is cancelled and the guest resumed
//!   here; a copy that completed while the agent was away is settled with
//!   the destination, which knows whether it resumed the guest (then the
//!   source QEMU stops) or not (then the guest resumes here); if the
//!   destination cannot be asked, the guest stays paused here, which is the
//!   one state that cannot end with two running copies. The job record says
//!   which.
//! - **destination**: the incoming QEMU is kept (paused) for the source to
//!   finish or abort; if the source says nothing for [`ORPHAN_TIMEOUT`], it
//!   is torn down.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use domain::qemu::{QemuProcess, STOP_TIMEOUT};
use domain::DomainName;
use migration::cleanup::resume_source;
use migration::job::unix_ms;
use migration::record::JobIdentity;
use migration::settings::{self, ThrottleVia};
use migration::Flags;
use protocol::domain::Tunables;
use protocol::job::{JobStatus, Phase, Role};
use protocol::{AgentUri, Client, Reply, Request};
use qmp::commands::migration::{MigrateCancel, MigrationStatus, QueryMigrate};
use tokio::time::Instant;

use crate::migrate::destination;
use crate::runfile::{RunJob, RunRecord};
use crate::state::{ActiveJob, Agent, Domain, IncomingJob};
use crate::vm::{self, RunningVm};

/// How long a reattached incoming QEMU waits for its source.
pub(crate) const ORPHAN_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a copy still running gets to settle after `migrate_cancel`.
const CANCEL_WAIT: Duration = Duration::from_secs(30);

/// Adopts every QEMU an earlier agent left running; resolves their jobs.
pub(crate) async fn reattach_all(agent: &Arc<Agent>) {
    for record in agent.store.load_runs().await {
        let name = record.name.clone();
        let process = match QemuProcess::adopt(
            record.pid,
            &record.qmp_socket,
            &record.qemu_log,
            agent.config.qemu_timeout,
        )
        .await
        {
            Ok(process) => process,
            Err(e) => {
                tracing::info!(domain = %name, error = %e, "QEMU of an earlier run is gone");
                agent.store.remove_run_if(&name, record.run_id).await;
                let _ = tokio::fs::remove_file(&record.qmp_socket).await;
                continue;
            }
        };
        agent.reserve_run_id(record.run_id);
        let vm = Arc::new(RunningVm {
            run_id: record.run_id,
            process,
            spec: record.spec.clone(),
            qmp_socket: record.qmp_socket.clone(),
            serial_log: record.serial_log.clone(),
            qemu_log: record.qemu_log.clone(),
            qemu_version: record.qemu_version,
        });
        {
            let mut domains = agent.domains.lock().expect("domains lock");
            let d = domains
                .entry(name.clone())
                .or_insert_with(|| Domain::new(record.definition.clone(), false));
            d.vm = Some(vm.clone());
        }
        vm::watch_exit(agent.clone(), name.clone(), vm.clone());
        tracing::info!(domain = %name, pid = record.pid, "reattached to a running QEMU");

        if let Some(job) = &record.outgoing {
            resolve_outgoing(agent, &name, &vm, job).await;
        }
        if let Some(job) = &record.incoming {
            keep_incoming(agent, &name, &vm, job, &record);
        }
        agent.persist_run(&name).await;
    }
}

/// Asks the destination whether the guest runs there, tearing its side
/// down if not. `Err` when it cannot be asked.
async fn ask_destination(job: &RunJob, reason: &str) -> Result<bool, String> {
    let uri: AgentUri = job.peer.parse().map_err(|e| format!("{e}"))?;
    let client = Client::connect(&uri).await.map_err(|e| e.to_string())?;
    match client
        .request(
            Request::PeerAbort {
                job_id: job.id.clone(),
                reason: reason.to_string(),
            },
            protocol::REQUEST_TIMEOUT,
        )
        .await
    {
        Ok(Reply::Aborted { guest_running_here }) => Ok(guest_running_here),
        Ok(other) => Err(format!("unexpected reply {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

async fn resolve_outgoing(
    agent: &Arc<Agent>,
    name: &DomainName,
    vm: &Arc<RunningVm>,
    job: &RunJob,
) {
    let qmp = vm.process.qmp();
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

    let why = "the source agent restarted during the migration";
    let (status, error, recovery) = match state {
        Some(MigrationStatus::Completed) => match ask_destination(job, why).await {
            Ok(true) => {
                vm.process.shutdown(STOP_TIMEOUT).await;
                (
                    JobStatus::Completed,
                    None,
                    "the copy completed and the destination had resumed the guest; the source QEMU was stopped".to_string(),
                )
            }
            Ok(false) => (
                JobStatus::Failed,
                Some(format!("{why}, after the copy but before the destination resumed the guest")),
                resume_source(qmp, true).await,
            ),
            Err(e) => (
                JobStatus::Failed,
                Some(format!("{why}, after the copy; the destination cannot be asked: {e}")),
                "guest left paused on the source because it may be running on the destination; check the destination, then resume or destroy this copy".to_string(),
            ),
        },
        Some(MigrationStatus::PostcopyActive | MigrationStatus::PostcopyPaused | MigrationStatus::PostcopyRecover) => (
            JobStatus::Failed,
            Some(format!("{why}, during post-copy")),
            "left to QEMU: the guest runs on the destination; recover with `livemig migrate --postcopy-resume` if it paused".to_string(),
        ),
        _ => {
            let _ = ask_destination(job, why).await;
            (
                JobStatus::Cancelled,
                Some(format!("{why}; the migration was cancelled")),
                resume_source(qmp, true).await,
            )
        }
    };
    if vm.process.exit_info().is_none() {
        // The job's own settings cannot be read back; put ours to default.
        let _ = settings::apply(
            qmp,
            &Flags::default(),
            Tunables::default(),
            Role::Source,
            ThrottleVia::NotQemu,
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
    let _ = agent.with_domain(name, |d| {
        d.last_job = Some(record);
        Ok(())
    });
}

/// The job a run record names, as this agent ran it.
fn identity(agent: &Agent, name: &DomainName, job: &RunJob, role: Role) -> JobIdentity {
    let flags = Flags::new(job.flags.clone()).unwrap_or_else(|e| {
        tracing::warn!(job = %job.id, error = %e, "the job's recorded options no longer validate");
        Flags::default()
    });
    let (source, destination) = match role {
        Role::Source => (agent.uri.clone(), job.peer.clone()),
        Role::Destination => (job.peer.clone(), agent.uri.clone()),
    };
    JobIdentity {
        id: job.id.clone(),
        domain: name.to_string(),
        role,
        source,
        destination,
        flags,
        started_at_ms: job.started_at_ms,
    }
}

/// Keeps an incoming QEMU for its source to finish or abort, within
/// [`ORPHAN_TIMEOUT`].
fn keep_incoming(
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
        created_domain: job.created_domain,
        previous: Default::default(),
        vm: Some(vm.clone()),
        phase: Mutex::new(Phase::Perform),
        definition: record.definition.clone(),
        reattached: true,
    });
    let _ = agent.with_domain(name, |d| {
        d.job = Some(ActiveJob::Incoming(incoming.clone()));
        Ok(())
    });
    tracing::warn!(domain = %name, job = %job.id, "incoming migration kept for its source after restart");
    let agent = agent.clone();
    let name = name.clone();
    let source = job.peer.clone();
    tokio::spawn(async move {
        let deadline = Instant::now() + ORPHAN_TIMEOUT;
        let waiting = || {
            agent
                .with_domain(&name, |d| {
                    Ok(matches!(&d.job, Some(ActiveJob::Incoming(j)) if Arc::ptr_eq(j, &incoming)))
                })
                .unwrap_or(false)
        };
        // Ask the source how its job stands; one that has ended without us
        // will never finish here.
        while Instant::now() < deadline && waiting() {
            if let Some(status) = source_job_status(&source, &incoming.ident.id).await {
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
async fn source_job_status(source: &str, job_id: &str) -> Option<JobStatus> {
    let uri: AgentUri = source.parse().ok()?;
    let client = Client::connect(&uri).await.ok()?;
    match client
        .request(
            Request::Job {
                id: job_id.to_string(),
            },
            protocol::REQUEST_TIMEOUT,
        )
        .await
    {
        Ok(Reply::Job {
            record: Some(record),
            ..
        }) => Some(record.status),
        _ => None,
    }
}
