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
//! - **destination**: a migration that had finished here (its job record
//!   says so, or the guest runs with the data landed) leaves a domain that
//!   runs here; otherwise the incoming QEMU is kept (paused) for the source
//!   to finish or abort; a source whose job completed has let the guest go,
//!   so it is resumed here; if the source says nothing for the orphan
//!   timeout, it is torn down.
//!
//! - `mod`: adopting the QEMUs.
//! - [`outgoing`]: settling a migration this host was sending.
//! - [`incoming`]: settling one it was receiving.

mod incoming;
mod outgoing;

use std::sync::Arc;

use domain::DomainName;
use migration::record::JobIdentity;
use migration::Flags;
use protocol::job::Role;

use crate::runfile::RunJob;
use crate::running::RunningVm;
use crate::state::Agent;
use crate::vm;

/// Adopts every QEMU an earlier agent left running; resolves their jobs.
pub(crate) async fn reattach_all(agent: &Arc<Agent>) {
    for record in agent.store.load_runs().await {
        let name = record.name.clone();
        let process = match agent
            .hypervisor
            .adopt(
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
            taps: crate::taps::Taps::of(agent.store.root(), &record.definition),
            measurements: Default::default(),
        });
        agent.table.adopt_vm(&record.definition, vm.clone());
        vm::watch_exit(agent.clone(), name.clone(), vm.clone());
        tracing::info!(domain = %name, pid = record.pid, "reattached to a running QEMU");

        if let Some(job) = &record.outgoing {
            outgoing::resolve_outgoing(agent, &name, &vm, job).await;
        }
        if let Some(job) = &record.incoming {
            incoming::resolve_incoming(agent, &name, &vm, job, &record).await;
        }
        agent.persist_run(&name).await;
    }
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
        peer: job.peer_name.clone(),
    }
}
