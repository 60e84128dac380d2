//! The destination half: Prepare (start QEMU paused, listen: [`prepare`]),
//! Finish (wait for the data, resume the guest: [`finish`]), Recover
//! (listen again for a broken post-copy), Abort and tear-down.
//!
//! A prepared job is tied to the peer connection that prepared it: if that
//! connection closes before Finish, the job is aborted, so a dead source
//! agent never leaves a paused QEMU behind here.

mod admission;
mod finish;
mod prepare;
mod storage;

use std::sync::Arc;

use domain::qemu::STOP_TIMEOUT;
use domain::DomainName;
use protocol::job::Phase;
use protocol::{ApiError, ErrorCode, Role};
use qmp::commands::migration::{MigrationStatus, QueryMigrate};

use crate::caller::Caller;
use crate::jobs::IncomingJob;
use crate::state::Agent;

pub(crate) use finish::{abort, finish, finish_job, landed_here, recover};
pub(crate) use prepare::{prepare, probe};

/// The incoming job with this id, and its domain, if `caller` may act on
/// it: an agent only on the jobs it prepared itself (a job whose owner is
/// not known, only an administrator).
fn find(
    agent: &Agent,
    job_id: &str,
    caller: &Caller,
) -> Result<(DomainName, Arc<IncomingJob>), ApiError> {
    let found = find_any(agent, job_id)?;
    let owner = found.1.prepared_by.as_deref();
    if caller.role() == Role::Agent && (owner.is_none() || owner != caller.name()) {
        return Err(ApiError::new(
            ErrorCode::PermissionDenied,
            format!(
                "{caller} may not act on job '{job_id}': {} prepared it",
                owner.unwrap_or("an agent this one does not know")
            ),
        ));
    }
    Ok(found)
}

fn find_any(agent: &Agent, job_id: &str) -> Result<(DomainName, Arc<IncomingJob>), ApiError> {
    agent.table.find_incoming(job_id).ok_or_else(|| {
        ApiError::new(
            ErrorCode::NoJob,
            format!("no incoming job {job_id:?} on {}", agent.uri),
        )
    })
}

/// True if this QEMU is in post-copy: it runs the guest, and killing it
/// would lose the guest.
async fn in_postcopy(vm: &crate::running::RunningVm) -> bool {
    matches!(
        vm.process.qmp().execute(&QueryMigrate).await,
        Ok(info) if info.status.is_some_and(MigrationStatus::is_postcopy)
    )
}

/// Kills the destination QEMU and forgets the job (and the domain, if it
/// only existed for the migration) — unless the migration reached
/// post-copy, where this QEMU runs the guest and is kept for recovery
/// (`migrate --postcopy-resume`). Says whether it tore down.
pub(crate) async fn teardown(
    agent: &Agent,
    name: &DomainName,
    job: &IncomingJob,
    reason: &str,
) -> bool {
    if let Some(vm) = &job.vm {
        if in_postcopy(vm).await {
            tracing::error!(job = %job.ident.id, domain = %name, ?reason, "not tearing down: the guest runs here in post-copy; recover with migrate --postcopy-resume");
            return false;
        }
    }
    *job.phase.lock().expect("phase lock") = Phase::Cleanup;
    if let Some(vm) = &job.vm {
        vm.process.kill_and_wait(STOP_TIMEOUT).await;
    }
    storage::remove_images(&job.created_images).await;
    agent.table.forget_incoming(name, &job.ident.id);
    tracing::warn!(job = %job.ident.id, domain = %name, ?reason, "incoming migration aborted; destination cleaned up");
    true
}

/// Aborts the jobs a closed peer connection had prepared.
pub(crate) async fn abort_for_connection(agent: &Arc<Agent>, connection: u64) {
    let orphans = agent.table.incoming(|job| job.connection == connection);
    for (name, job) in orphans {
        teardown(
            agent,
            &name,
            &job,
            "the source agent's connection closed before Finish",
        )
        .await;
    }
}
