//! The destination half: Prepare (start QEMU paused, listen), Finish (wait
//! for the data, resume the guest), Abort (tear everything down).
//!
//! A prepared job is tied to the peer connection that prepared it: if that
//! connection closes before Finish, the job is aborted, so a dead source
//! agent never leaves a paused QEMU behind here.

use std::sync::{Arc, Mutex};

use domain::DomainName;
use migration::job::{unix_ms, JobRecord, JobStats, JobStatus, Phase, Role};
use migration::settings::{self, Tunables};
use migration::uri::{parse_data_uri, DataUri};
use migration::{incoming, support, MigrateFlags};
use protocol::message::Reply;
use protocol::types::PrepareRequest;
use protocol::{ApiError, ErrorCode};
use qmp::commands::migration::{MigrateRecover, MigrationStatus, QueryMigrate};
use qmp::commands::vm::Cont;
use qmp::EventKind;
use tokio::time::Instant;
use tracing::Instrument;

use crate::errors;
use crate::server::ConnContext;
use crate::state::{ActiveJob, Agent, Domain, IncomingJob};
use crate::vm;

const QEMU_STOP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

pub(crate) async fn prepare(
    agent: &Arc<Agent>,
    req: PrepareRequest,
    ctx: &ConnContext,
) -> Result<Reply, ApiError> {
    let span = tracing::info_span!("job", id = %req.job_id, domain = %req.definition.name, role = "destination");
    async {
        if req.flags.offline {
            return prepare_offline(agent, &req).await;
        }
        prepare_live(agent, req, ctx).await
    }
    .instrument(span)
    .await
}

async fn prepare_offline(agent: &Arc<Agent>, req: &PrepareRequest) -> Result<Reply, ApiError> {
    let name = req.definition.name.clone();
    {
        let mut domains = agent.domains.lock().expect("domains lock");
        if let Some(d) = domains.get(&name) {
            if d.vm.is_some() || d.job.is_some() {
                return Err(errors::operation_invalid(format!(
                    "domain '{name}' is running on {}",
                    agent.uri
                )));
            }
        }
        domains
            .entry(name.clone())
            .or_insert_with(|| Domain::new(req.definition.clone(), false));
    }
    if let Err(e) = agent.store.save_definition(&req.definition).await {
        agent.drop_if_transient_and_idle(&name);
        return Err(errors::storage(&e));
    }
    agent.with_domain(&name, |d| {
        d.definition = req.definition.clone();
        d.persistent = true;
        Ok(())
    })?;
    tracing::info!("definition received (offline migration)");
    Ok(Reply::Prepared { uri: String::new() })
}

async fn prepare_live(
    agent: &Arc<Agent>,
    req: PrepareRequest,
    ctx: &ConnContext,
) -> Result<Reply, ApiError> {
    let name = req.definition.name.clone();
    req.definition
        .validate()
        .map_err(|e| ApiError::new(ErrorCode::InvalidDefinition, e.to_string()))?;
    let binary = agent.binary().await?;
    support::check(&req.flags, Role::Destination, &agent.uri, binary)
        .map_err(|e| ApiError::new(ErrorCode::Unsupported, e.to_string()))?;
    vm::check_spec(&req.spec, binary, &agent.uri, agent.config.tcg_workaround)?;
    let listen = match &req.flags.migrateuri {
        Some(uri) => parse_data_uri(uri).map_err(|e| errors::invalid(e.to_string()))?,
        None => {
            let ip = ctx
                .local_ip
                .unwrap_or(std::net::IpAddr::from([127, 0, 0, 1]));
            DataUri::Tcp {
                host: ip.to_string(),
                port: data_port(ip, agent.config.migration_ports)?,
            }
        }
    };

    // Reserve the name: from here on the domain is "migrating in".
    let created = {
        let mut domains = agent.domains.lock().expect("domains lock");
        let created = !domains.contains_key(&name);
        let d = domains
            .entry(name.clone())
            .or_insert_with(|| Domain::new(req.definition.clone(), false));
        if d.vm.is_some() || d.job.is_some() {
            return Err(errors::operation_invalid(format!(
                "domain '{name}' is already running on {}",
                agent.uri
            )));
        }
        d.job = Some(ActiveJob::Incoming(Arc::new(incoming_job(
            &req,
            ctx,
            created,
            None,
            Default::default(),
        ))));
        created
    };

    let started = async {
        let vm = vm::launch(agent, &req.definition, &req.spec, true, false).await?;
        let qmp = vm.process.qmp().clone();
        let setup = async {
            let previous = settings::apply(
                &qmp,
                &req.flags,
                Tunables::default(),
                Role::Destination,
                settings::ThrottleVia::NotQemu,
            )
            .await
            .map_err(|e| {
                errors::qemu(format!(
                    "destination QEMU refused the migration settings: {e}"
                ))
            })?;
            let uri = incoming::listen(&qmp, &listen)
                .await
                .map_err(|e| errors::qemu(errors::chain(&e)))?;
            Ok::<_, ApiError>((previous, uri))
        }
        .await;
        match setup {
            Ok((previous, uri)) => Ok((vm, previous, uri)),
            Err(e) => {
                vm.process.kill_and_wait(QEMU_STOP_TIMEOUT).await;
                Err(e)
            }
        }
    }
    .await;

    match started {
        Ok((vm, previous, uri)) => {
            if req.flags.postcopy && !req.flags.suspend {
                resume_on_postcopy(vm.process.qmp().clone());
            }
            let job = Arc::new(incoming_job(&req, ctx, created, Some(vm.clone()), previous));
            agent.with_domain(&name, |d| {
                d.vm = Some(vm);
                d.job = Some(ActiveJob::Incoming(job));
                // The running configuration is the one that arrives.
                d.definition = req.definition.clone();
                Ok(())
            })?;
            agent.persist_run(&name).await;
            tracing::info!(%uri, source = %req.source, "prepared");
            Ok(Reply::Prepared {
                uri: uri.to_string(),
            })
        }
        Err(e) => {
            release(agent, &name, created);
            tracing::error!(error = %e, "prepare failed");
            Err(e)
        }
    }
}

/// In post-copy the destination must run the guest as soon as the source
/// switches over (the pages it lacks are then fetched on demand); Finish
/// comes only when the last page has arrived.
fn resume_on_postcopy(qmp: qmp::Client) {
    let mut events = qmp.events();
    tokio::spawn(async move {
        loop {
            match events.recv().await {
                Ok(event) => match event.kind() {
                    EventKind::Migration {
                        status: MigrationStatus::PostcopyActive,
                    } => {
                        match qmp.execute(&Cont).await {
                            Ok(_) => tracing::info!(
                                "post-copy started; guest resumed on the destination"
                            ),
                            Err(e) => {
                                tracing::error!(error = %e, "cannot resume the guest for post-copy")
                            }
                        }
                        return;
                    }
                    EventKind::Migration { status } if status.is_finished() => return,
                    _ => {}
                },
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            }
        }
    });
}

/// A port for the incoming data: the first free one in the configured
/// range, or 0 (QEMU picks any) without one.
fn data_port(ip: std::net::IpAddr, range: Option<(u16, u16)>) -> Result<u16, ApiError> {
    let Some((first, last)) = range else {
        return Ok(0);
    };
    (first..=last)
        .find(|port| std::net::TcpListener::bind((ip, *port)).is_ok())
        .ok_or_else(|| {
            errors::operation_invalid(format!(
                "no free migration port in {first}-{last} on {ip}: widen migration_ports"
            ))
        })
}

fn incoming_job(
    req: &PrepareRequest,
    ctx: &ConnContext,
    created: bool,
    vm: Option<Arc<vm::RunningVm>>,
    previous: settings::Previous,
) -> IncomingJob {
    IncomingJob {
        id: req.job_id.clone(),
        source: req.source.clone(),
        flags: req.flags.clone(),
        started_at_ms: unix_ms(),
        started: Instant::now(),
        connection: ctx.id,
        created_domain: created,
        previous,
        vm,
        phase: Mutex::new(Phase::Prepare),
        definition: req.definition.clone(),
        reattached: false,
    }
}

/// Clears a failed incoming job from the table.
fn release(agent: &Agent, name: &DomainName, created: bool) {
    let mut domains = agent.domains.lock().expect("domains lock");
    if created {
        domains.remove(name);
    } else if let Some(d) = domains.get_mut(name) {
        d.job = None;
        d.vm = None;
    }
}

fn find(agent: &Agent, job_id: &str) -> Option<(DomainName, Arc<IncomingJob>)> {
    let domains = agent.domains.lock().expect("domains lock");
    domains.iter().find_map(|(name, d)| match &d.job {
        Some(ActiveJob::Incoming(job)) if job.id == job_id => Some((name.clone(), job.clone())),
        _ => None,
    })
}

pub(crate) async fn finish(agent: &Arc<Agent>, job_id: &str) -> Result<Reply, ApiError> {
    let (name, job) = find(agent, job_id).ok_or_else(|| {
        ApiError::new(
            ErrorCode::NoJob,
            format!("no incoming job '{job_id}' on {}", agent.uri),
        )
    })?;
    let span = tracing::info_span!("job", id = %job_id, domain = %name, role = "destination");
    async {
        *job.phase.lock().expect("phase lock") = Phase::Finish;
        let vm = job
            .vm
            .clone()
            .ok_or_else(|| errors::operation_invalid("the incoming job was never prepared"))?;
        let qmp = vm.process.qmp().clone();
        let landed = async {
            incoming::wait_complete(&qmp, agent.config.finish_timeout)
                .await
                .map_err(|e| errors::chain(&e))?;
            let reset = if job.reattached {
                settings::apply(
                    &qmp,
                    &MigrateFlags::default(),
                    Tunables::default(),
                    Role::Destination,
                    settings::ThrottleVia::NotQemu,
                )
                .await
                .map(|_| ())
            } else {
                settings::restore(&qmp, &job.previous).await
            };
            if let Err(e) = reset {
                tracing::warn!(error = %e, "could not reset the migration settings");
            }
            if !job.flags.suspend {
                qmp.execute(&Cont)
                    .await
                    .map_err(|e| format!("cannot resume the guest: {e}"))?;
            }
            Ok::<(), String>(())
        }
        .await;
        if let Err(error) = landed {
            tracing::error!(%error, "finish failed; tearing down the destination");
            teardown(agent, &name, &job, &error).await;
            return Err(ApiError::new(ErrorCode::MigrationFailed, error));
        }

        let mut note = None;
        if job.flags.persistent {
            match agent.store.save_definition(&job.definition).await {
                Ok(()) => {
                    let _ = agent.with_domain(&name, |d| {
                        d.persistent = true;
                        Ok(())
                    });
                }
                Err(e) => {
                    let text = format!("could not persist the definition: {}", errors::chain(&e));
                    tracing::error!("{text}");
                    note = Some(text);
                }
            }
        }
        let record = JobRecord {
            id: job.id.clone(),
            domain: name.to_string(),
            source: job.source.clone(),
            destination: agent.uri.clone(),
            status: JobStatus::Completed,
            error: note,
            flags: job.flags.names(),
            auto_converge: job.flags.qemu_auto_converge(),
            total_time_ms: job.started.elapsed().as_millis() as u64,
            setup_time_ms: None,
            downtime_ms: None,
            transferred_bytes: 0,
            iterations: 0,
            max_cpu_throttle_pct: 0.0,
            converge: job.flags.converge_mode().name().to_string(),
            actions: Vec::new(),
            phase: Phase::Done,
            started_at_ms: job.started_at_ms,
            finished_at_ms: unix_ms(),
            data_uri: None,
            recovery: None,
            role: Role::Destination,
            stats: JobStats::default(),
            samples: Vec::new(),
        };
        // Durable before we answer: if the answer is lost, a later
        // peer-abort must learn that the guest runs here.
        agent.metrics.job_finished(&record);
        if let Err(e) = agent.history.save(&record).await {
            tracing::error!(error = %errors::chain(&e), "could not save the job record");
        }
        agent.with_domain(&name, |d| {
            d.job = None;
            d.last_job = Some(record);
            Ok(())
        })?;
        tracing::info!(
            paused = job.flags.suspend,
            "guest resumed on the destination"
        );
        Ok(Reply::Finished)
    }
    .instrument(span)
    .await
}

/// Post-copy recovery, destination side: listen again (`migrate-recover`)
/// and hand the source the new address.
pub(crate) async fn recover(
    agent: &Arc<Agent>,
    job_id: &str,
    ctx: &ConnContext,
) -> Result<Reply, ApiError> {
    let (name, job) = find(agent, job_id).ok_or_else(|| {
        ApiError::new(
            ErrorCode::NoJob,
            format!("no incoming job '{job_id}' on {}", agent.uri),
        )
    })?;
    let vm = job
        .vm
        .clone()
        .ok_or_else(|| errors::operation_invalid("the incoming job was never prepared"))?;
    let qmp = vm.process.qmp();
    super::postcopy::pause(qmp, |status| {
        format!("the migration of '{name}' is not in post-copy here (status {status:?})")
    })
    .await?;
    let host = ctx
        .local_ip
        .map(|ip| ip.to_string())
        .unwrap_or_else(|| "127.0.0.1".into());
    let listen = DataUri::Tcp {
        host: host.clone(),
        port: 0,
    };
    qmp.execute(&MigrateRecover {
        uri: listen.to_string(),
    })
    .await
    .map_err(|e| errors::qemu(format!("migrate-recover failed: {e}")))?;
    let port = qmp
        .execute(&QueryMigrate)
        .await
        .map_err(|e| errors::qemu(e.to_string()))?
        .socket_address
        .unwrap_or_default()
        .into_iter()
        .find_map(|a| a.port)
        .ok_or_else(|| errors::qemu("QEMU did not report where it listens for the recovery"))?;
    tracing::info!(job = %job_id, domain = %name, %port, "listening to recover post-copy");
    Ok(Reply::Prepared {
        uri: DataUri::Tcp {
            host,
            port: port
                .parse()
                .map_err(|_| errors::qemu("bad port from QEMU"))?,
        }
        .to_string(),
    })
}

pub(crate) async fn abort(
    agent: &Arc<Agent>,
    job_id: &str,
    reason: &str,
) -> Result<Reply, ApiError> {
    if let Some((name, job)) = find(agent, job_id) {
        let torn_down = teardown(agent, &name, &job, reason).await;
        return Ok(Reply::Aborted {
            guest_running_here: !torn_down,
        });
    }
    // If the history cannot be read, say so: "not here" must be certain.
    let finished_here = agent
        .history
        .load(job_id)
        .await
        .map_err(|e| ApiError::new(ErrorCode::Storage, errors::chain(&e)))?
        .is_some_and(|r| r.role == Role::Destination && r.status == JobStatus::Completed);
    Ok(Reply::Aborted {
        guest_running_here: finished_here,
    })
}

/// True if this QEMU is in post-copy: it runs the guest, and killing it
/// would lose the guest.
async fn in_postcopy(vm: &vm::RunningVm) -> bool {
    matches!(
        vm.process.qmp().execute(&QueryMigrate).await,
        Ok(info) if info.status.is_some_and(MigrationStatus::is_postcopy)
    )
}

/// Kills the destination QEMU and forgets the job (and the domain, if it
/// only existed for the migration) — unless the migration reached
/// post-copy, where this QEMU runs the guest and is kept for recovery
/// (`migrate --postcopy-resume`).
pub(crate) async fn teardown(
    agent: &Agent,
    name: &DomainName,
    job: &IncomingJob,
    reason: &str,
) -> bool {
    if let Some(vm) = &job.vm {
        if in_postcopy(vm).await {
            tracing::error!(job = %job.id, domain = %name, %reason, "not tearing down: the guest runs here in post-copy; recover with migrate --postcopy-resume");
            return false;
        }
    }
    *job.phase.lock().expect("phase lock") = Phase::Cleanup;
    if let Some(vm) = &job.vm {
        vm.process.kill_and_wait(QEMU_STOP_TIMEOUT).await;
    }
    let mut domains = agent.domains.lock().expect("domains lock");
    let ours = matches!(domains.get(name).and_then(|d| d.job.as_ref()), Some(ActiveJob::Incoming(j)) if j.id == job.id);
    if ours {
        if job.created_domain {
            domains.remove(name);
        } else if let Some(d) = domains.get_mut(name) {
            d.job = None;
            d.vm = None;
        }
    }
    drop(domains);
    tracing::warn!(job = %job.id, domain = %name, %reason, "incoming migration aborted; destination cleaned up");
    true
}

/// Aborts the jobs a closed peer connection had prepared.
pub(crate) async fn abort_for_connection(agent: &Arc<Agent>, connection: u64) {
    let orphans: Vec<(DomainName, Arc<IncomingJob>)> = {
        let domains = agent.domains.lock().expect("domains lock");
        domains
            .iter()
            .filter_map(|(name, d)| match &d.job {
                Some(ActiveJob::Incoming(job)) if job.connection == connection => {
                    Some((name.clone(), job.clone()))
                }
                _ => None,
            })
            .collect()
    };
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
