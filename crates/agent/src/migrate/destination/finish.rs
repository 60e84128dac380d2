//! Finish (the data landed: resume the guest here), Recover (listen again
//! for a broken post-copy) and Abort (the source gave up).

use std::sync::Arc;
use std::time::Duration;

use domain::DomainName;
use migration::incoming;
use migration::settings::{self, ThrottleVia};
use protocol::domain::Tunables;
use protocol::job::{JobStatus, Phase, Role};
use protocol::{ApiError, ErrorCode, Reply};
use qmp::commands::vm::{AnnounceSelf, Cont};
use tracing::Instrument;

use super::{find, teardown};
use crate::caller::ConnContext;
use crate::errors;
use crate::jobs::IncomingJob;
use crate::state::Agent;

pub(crate) async fn finish(
    agent: &Arc<Agent>,
    job_id: &str,
    ctx: &ConnContext,
) -> Result<Reply, ApiError> {
    let (name, job) = find(agent, job_id, &ctx.caller)?;
    finish_job(agent, &name, &job).await
}

/// Finish for a job found: resume the guest once the data has landed, and
/// make that durable (definition, job record, run record); or tear the
/// destination down if it cannot land.
pub(crate) async fn finish_job(
    agent: &Arc<Agent>,
    name: &DomainName,
    job: &Arc<IncomingJob>,
) -> Result<Reply, ApiError> {
    let span = tracing::info_span!("job", id = %job.ident.id, domain = %name, role = "destination");
    async {
        *job.phase.lock().expect("phase lock") = Phase::Finish;
        let landed = match job.vm.clone() {
            Some(vm) => land(vm.process.qmp(), agent.config.finish_timeout, job).await,
            None => Err(LandError::NotPrepared),
        };
        if let Err(e) = landed {
            let error = errors::chain(&e);
            tracing::error!(%error, "finish failed; tearing down the destination");
            teardown(agent, name, job, &error).await;
            return Err(ApiError::new(ErrorCode::MigrationFailed, error));
        }
        let postcopy_work_lost = postcopy_cost(job).await;
        landed_here(agent, name, job).await;
        tracing::info!(
            paused = job.ident.flags.landing().suspend,
            postcopy_work_lost_ms = postcopy_work_lost.map(|d| d.as_millis() as u64),
            "guest resumed on the destination"
        );
        Ok(Reply::Finished {
            postcopy_work_lost_ms: postcopy_work_lost.map(|d| d.as_millis() as u64),
        })
    }
    .instrument(span)
    .await
}

/// The guest runs here now (or stays paused, if asked): keeps its
/// definition, records the job completed, ends it and rewrites the run
/// record without it, so that an agent restarted later adopts a domain
/// that runs here rather than a migration to wait for.
pub(crate) async fn landed_here(agent: &Agent, name: &DomainName, job: &IncomingJob) {
    let mut note = None;
    if job.ident.flags.landing().persistent {
        // `--persistent-xml` was checked at Prepare: it is kept for the
        // next start, as `define` on a running domain.
        let kept = crate::migrate::persistent_definition(&job.ident.flags, &job.definition)
            .ok()
            .flatten()
            .unwrap_or_else(|| job.definition.clone());
        match agent.store.save_definition(&kept).await {
            Ok(()) => {
                let _ = agent.table.defined(kept);
            }
            Err(e) => {
                let text = format!("could not persist the definition: {}", errors::chain(&e));
                tracing::error!("{text}");
                note = Some(text);
            }
        }
    }
    let mut record = job
        .ident
        .record(JobStatus::Completed, Phase::Done, job.started.elapsed());
    record.error = note;
    // Durable before we answer: if the answer is lost, a later
    // peer-abort must learn that the guest runs here.
    agent.metrics.job_finished(&record);
    if let Err(e) = agent.history.save(&record).await {
        tracing::error!(error = %errors::chain(&e), "could not save the job record");
    }
    agent.table.end_job(name, &job.ident.id, record);
    // The guest is here now: no peer may replace it.
    agent.bind(name, None).await;
    agent.persist_run(name).await;
}

/// What post-copy cost the guest, if it ran here in post-copy: measured
/// from its vCPUs once it has landed (`postcopy::cost`).
async fn postcopy_cost(job: &IncomingJob) -> Option<Duration> {
    let resume = job
        .postcopy_resume
        .lock()
        .expect("post-copy resume lock")
        .take()?;
    // The migration has completed: the task has ended, or ends at once.
    let resumed = tokio::time::timeout(Duration::from_secs(1), resume)
        .await
        .ok()?
        .ok()??;
    migration::postcopy::cost::measure(&resumed).await
}

/// Why the guest could not be resumed here.
#[derive(Debug, thiserror::Error)]
enum LandError {
    #[error("the incoming job was never prepared")]
    NotPrepared,
    #[error(transparent)]
    Incoming(#[from] incoming::IncomingError),
    #[error("cannot resume the guest")]
    Resume(#[source] qmp::Error),
}

/// Waits up to `timeout` for the data to land in the QEMU behind `qmp`,
/// puts the migration settings back and resumes the guest (unless
/// `--suspend`).
async fn land(qmp: &qmp::Client, timeout: Duration, job: &IncomingJob) -> Result<(), LandError> {
    incoming::wait_complete(qmp, timeout).await?;
    let reset = if job.reattached {
        // What the job changed is not known after a restart: defaults.
        settings::apply(
            qmp,
            &migration::Flags::default(),
            Tunables::default(),
            Role::Destination,
            ThrottleVia::NotQemu,
            None,
        )
        .await
        .map(|_| ())
    } else {
        settings::restore(qmp, &job.previous).await
    };
    if let Err(e) = reset {
        tracing::warn!(error = %e, "could not reset the migration settings");
    }
    // The source has completed its mirrors: the copies are whole.
    if !job.created_images.is_empty() {
        migration::storage::destination::stop(qmp).await;
    }
    if !job.ident.flags.landing().suspend {
        qmp.execute(&Cont).await.map_err(LandError::Resume)?;
    }
    // QEMU announced the NICs when the data landed; again now that the
    // guest runs, so that the switches' tables point here while clients
    // retransmit.
    if let Err(e) = qmp.execute(&AnnounceSelf::default()).await {
        tracing::warn!(error = %e, "could not announce the guest's NICs");
    }
    Ok(())
}

/// Post-copy recovery, destination side: listen again (`migrate-recover`)
/// and hand the source the new address.
pub(crate) async fn recover(
    agent: &Arc<Agent>,
    job_id: &str,
    ctx: &ConnContext,
) -> Result<Reply, ApiError> {
    let (name, job) = find(agent, job_id, &ctx.caller)?;
    let vm = job
        .vm
        .clone()
        .ok_or_else(|| errors::operation_invalid("the incoming job was never prepared"))?;
    let qmp = vm.process.qmp();
    crate::migrate::pause_postcopy(qmp, |status| {
        format!("the migration of '{name}' is not in post-copy here (status {status:?})")
    })
    .await?;
    let host = ctx
        .local_ip
        .map(|ip| ip.to_string())
        .unwrap_or_else(|| "127.0.0.1".into());
    let uri = incoming::listen_for_recovery(qmp, &host)
        .await
        .map_err(|e| errors::qemu_failed(&e))?;
    tracing::info!(job = %job_id, domain = %name, %uri, "listening to recover post-copy");
    Ok(Reply::Prepared {
        uri: uri.to_string(),
        nbd_port: None,
        nbd_host: None,
    })
}

/// The source gave up: tear down, and say whether the guest runs here
/// anyway (the job had finished, or reached post-copy).
pub(crate) async fn abort(
    agent: &Arc<Agent>,
    job_id: &str,
    reason: &str,
    ctx: &ConnContext,
) -> Result<Reply, ApiError> {
    match find(agent, job_id, &ctx.caller) {
        Err(e) if e.code == ErrorCode::PermissionDenied => return Err(e),
        Ok((name, job)) => {
            let torn_down = teardown(agent, &name, &job, reason).await;
            return Ok(Reply::Aborted {
                guest_running_here: !torn_down,
            });
        }
        Err(_) => {}
    }
    // If the history cannot be read, say so: "not here" must be certain.
    let finished_here = agent
        .history
        .load(job_id)
        .await
        .map_err(ApiError::from)?
        .is_some_and(|r| r.role == Role::Destination && r.status == JobStatus::Completed);
    Ok(Reply::Aborted {
        guest_running_here: finished_here,
    })
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use domain::DomainDefinition;
    use migration::job::unix_ms;
    use migration::record::JobIdentity;
    use migration::Flags;
    use protocol::MigrateOptions;
    use qmp::commands::migration::MigrationStatus;
    use qmp::scripted::ScriptedQemu;
    use tokio::time::Instant;

    use super::*;

    fn job(suspend: bool) -> IncomingJob {
        let definition = DomainDefinition::from_toml(
            "name = \"vm\"\nmemory_mib = 64\n[kernel]\npath = \"/k\"\n",
        )
        .unwrap();
        IncomingJob {
            ident: JobIdentity {
                id: "job-1".into(),
                domain: "vm".into(),
                role: Role::Destination,
                source: "tcp://a:1".into(),
                destination: "tcp://b:1".into(),
                flags: Flags::new(MigrateOptions {
                    live: true,
                    suspend,
                    ..Default::default()
                })
                .unwrap(),
                started_at_ms: unix_ms(),
                peer: None,
            },
            started: Instant::now(),
            connection: 1,
            prepared_by: None,
            created_domain: true,
            disk_bytes: 0,
            previous: Default::default(),
            vm: None,
            phase: Mutex::new(Phase::Finish),
            definition,
            replaced_definition: None,
            created_images: Vec::new(),
            postcopy_resume: Default::default(),
            reattached: false,
        }
    }

    /// A destination QEMU whose incoming migration has arrived.
    async fn landed() -> (qmp::Client, ScriptedQemu) {
        let (qmp, qemu) = ScriptedQemu::start().await;
        qemu.with(|s| {
            s.status = Some(MigrationStatus::Completed);
            s.run_state = "paused".into();
        });
        (qmp, qemu)
    }

    #[tokio::test]
    async fn the_guest_resumes_once_the_data_has_landed() {
        let (qmp, qemu) = landed().await;

        land(&qmp, Duration::from_secs(1), &job(false))
            .await
            .unwrap();

        assert_eq!(qemu.calls("cont").len(), 1);
        assert_eq!(
            qemu.calls("announce-self").len(),
            1,
            "announced once running"
        );
    }

    #[tokio::test]
    async fn with_suspend_the_guest_stays_paused() {
        let (qmp, qemu) = landed().await;

        land(&qmp, Duration::from_secs(1), &job(true))
            .await
            .unwrap();

        assert!(qemu.calls("cont").is_empty());
    }

    #[tokio::test]
    async fn a_failed_incoming_migration_never_resumes_the_guest() {
        let (qmp, qemu) = ScriptedQemu::start().await;
        qemu.with(|s| {
            s.status = Some(MigrationStatus::Failed);
            s.error_desc = Some("load of migration failed".into());
            s.run_state = "inmigrate".into();
        });

        let err = land(&qmp, Duration::from_secs(1), &job(false))
            .await
            .unwrap_err();

        assert!(
            err.to_string().contains("load of migration failed"),
            "{err}"
        );
        assert!(qemu.calls("cont").is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn data_that_never_lands_times_out_without_resuming() {
        let (qmp, qemu) = ScriptedQemu::start().await;
        qemu.with(|s| {
            s.status = Some(MigrationStatus::Active);
            s.run_state = "inmigrate".into();
        });

        let err = land(&qmp, Duration::from_secs(5), &job(false))
            .await
            .unwrap_err();

        assert!(matches!(err, LandError::Incoming(_)), "{err}");
        assert!(qemu.calls("cont").is_empty());
    }
}
