//! The source half: Begin (in the request), then a job task ([`run`]) that
//! drives Prepare (on the peer), Perform, Finish (on the peer, [`finish`])
//! and Confirm, or Cleanup, which leaves the guest running here; the task
//! ends by writing the job's record ([`record`]).
//!
//! - `mod`: Begin, and the post-copy recovery request.
//! - [`peer`]: the connection to the destination agent.
//! - [`run`]: the job task.
//! - [`finish`]: the Finish-safety protocol.
//! - [`record`]: how a job ends, as a record.

pub(crate) mod finish;
pub(crate) mod peer;
mod record;
mod run;
mod storage;

use std::sync::{Arc, Mutex};

use domain::{DomainDefinition, DomainName};
use migration::job::unix_ms;
use migration::perform::Progress;
use migration::record::JobIdentity;
use migration::{support, Flags};
use protocol::call;
use protocol::estimate::EstimateParams;
use protocol::job::{Phase, Role};
use protocol::migrate::ProbeRequest;
use protocol::{AgentUri, ApiError, ErrorCode, MigrateOptions, Reply};
use qmp::commands::migration::Migrate;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::errors;
use crate::jobs::OutgoingJob;
use crate::state::Agent;
use peer::Peer;
use run::Run;

/// Begin: validates everything that can be checked before anything changes,
/// then starts the job. Errors here leave both hosts untouched.
pub(crate) async fn begin(
    agent: &Arc<Agent>,
    name: &DomainName,
    destination: &str,
    options: MigrateOptions,
) -> Result<Reply, ApiError> {
    let begun = Instant::now();
    // In a cluster, the domain's policy fills in what the user left unset.
    let options = crate::membership::with_policy(agent, name, options).await?;
    let flags = Flags::new(options).map_err(|e| errors::invalid(e.to_string()))?;
    let dest_uri: AgentUri = destination
        .parse()
        .map_err(|e: protocol::BadAgentUri| errors::invalid(e.to_string()))?;
    if flags.postcopy_resume() {
        return postcopy_resume(agent, name, &dest_uri).await;
    }
    let lock = agent.table.op_lock(name)?;
    let _guard = lock.lock().await;

    let (def, vm, tunables) = agent.table.migratable(name, flags.offline())?;

    let outgoing = outgoing_definition(&def, &flags)?;
    // Refused here already, before the destination refuses it too.
    crate::migrate::persistent_definition(&flags, &outgoing)?;
    let storage: Vec<String> = migration::storage::disks_to_copy(&def, flags.options())
        .map_err(|e| errors::invalid(e.to_string()))?
        .into_iter()
        .map(|(target, _)| target)
        .collect();
    migration::safety::check(&def, flags.offline(), flags.unsafe_migration(), &storage)
        .map_err(|e| errors::operation_invalid(e.to_string()))?;
    let binary = agent.binary().await?;
    let binary = binary.as_ref();
    support::check(&flags, Role::Source, &agent.uri, binary)
        .map_err(|e| ApiError::new(ErrorCode::Unsupported, e.to_string()))?;
    let tls = crate::migrate::stream_tls::source(agent, &flags, &dest_uri)?;

    let peer = Peer::connect(
        &dest_uri,
        agent.peer_tls(),
        agent.config.timeouts.peer_silence,
    )
    .await?;
    let hello = peer
        .call(call::Hello {}, protocol::REQUEST_TIMEOUT)
        .await
        .map_err(|e| e.to_api())?;
    if hello.instance == agent.instance {
        return Err(errors::invalid(format!(
            "{destination} is this agent: migrate to another host's agent"
        )));
    }
    // The destination checks its own QEMU: the capabilities the flags
    // need there, and the machine type the guest runs with here.
    let probe = call::PeerProbe {
        probe: ProbeRequest {
            flags: flags.options().clone(),
            machine: vm.as_ref().map(|vm| vm.spec.machine.clone()),
        },
    };
    peer.call(probe, protocol::REQUEST_TIMEOUT)
        .await
        .map_err(|e| e.to_api())?;

    if flags.dry_run() {
        drop(peer);
        return crate::estimate::estimate(
            agent,
            name,
            EstimateParams {
                bandwidth_mib_s: flags.bandwidth().map(|b| b.mib_s()),
                downtime_ms: flags.downtime().map(|d| d.as_millis() as u64),
                timeout_s: flags.timeout().map(|t| t.as_secs()),
                max_throttle_pct: flags.max_throttle().map(|t| t.percent()),
                max_age_s: None,
            },
        )
        .await;
    }

    // Zero-copy sends lock the pages they send: the source QEMU needs a
    // locked-memory limit of the guest's RAM (unless it holds
    // CAP_IPC_LOCK). Raised before the job starts, so a host that cannot
    // is a clear refusal; put back when the job ends.
    let memlock = match (&vm, flags.stream().zerocopy) {
        (Some(vm), true) if !domain::qemu::memlock::exempt(vm.process.pid()) => {
            Some(raise_memlock(agent, name, vm)?)
        }
        _ => None,
    };

    let (progress_tx, progress_rx) = watch::channel(Progress::default());
    let (retune_tx, retune_rx) = tokio::sync::mpsc::channel(4);
    let job = Arc::new(OutgoingJob {
        ident: JobIdentity {
            id: uuid::Uuid::new_v4().to_string(),
            domain: name.to_string(),
            role: Role::Source,
            source: agent.uri.clone(),
            destination: destination.to_string(),
            flags,
            started_at_ms: unix_ms(),
            peer: peer.name().map(str::to_string),
        },
        started: Instant::now(),
        clock: migration::record::PhaseClock::new(begun, Phase::Begin),
        cancel: CancellationToken::new(),
        progress: progress_rx,
        retune: retune_tx,
        retunes: Mutex::new(Some(retune_rx)),
        storage: storage.clone(),
    });
    agent.table.begin_outgoing(name, job.clone())?;
    agent.persist_run(name).await;
    let span = tracing::info_span!("job", id = %job.ident.id, domain = %name, role = "source");
    tracing::info!(parent: &span, %destination, flags = ?job.ident.flags.names(), "migration started");
    let run = Run {
        agent: agent.clone(),
        name: name.clone(),
        job: job.clone(),
        peer,
        lost_peer: Default::default(),
        def,
        vm,
        tunables,
        progress: progress_tx,
        tls,
        storage,
        memlock,
        outgoing,
    };
    tokio::spawn(run.run().instrument(span));
    tokio::spawn(tell_postcopy_switch(
        agent.clone(),
        name.clone(),
        job.ident.id.clone(),
        job.progress.clone(),
    ));
    Ok(Reply::MigrationStarted {
        job_id: job.ident.id.clone(),
    })
}

/// Tells the agent's watches as soon as QEMU reports the job in
/// post-copy, not at their next look: a drain's controller gives a
/// migration in post-copy its links first, and half a second of post-copy
/// at a pre-copy share costs the guest. Ends with the job (when its
/// progress is no longer published).
async fn tell_postcopy_switch(
    agent: Arc<Agent>,
    name: DomainName,
    job_id: String,
    mut progress: watch::Receiver<Progress>,
) {
    let switched = progress.wait_for(|p| p.stats.in_postcopy()).await.is_ok();
    if switched {
        agent.table.job_switched(&name, &job_id);
    }
}

/// The definition the destination runs the domain with: `--xml`'s if
/// given (named as the domain arrives, what the guest sees unchanged; a
/// NIC it gives no MAC keeps the one the guest has), else the source's;
/// under `--dname`'s name, with every NIC's MAC pinned so a rename does
/// not change it.
///
/// # Errors
/// A malformed `--xml`, one under another name, or one that changes what
/// the guest sees.
fn outgoing_definition(
    def: &DomainDefinition,
    flags: &Flags,
) -> Result<DomainDefinition, ApiError> {
    let mut current = def.clone();
    current.pin_macs();
    let arriving = flags
        .landing()
        .dname
        .clone()
        .unwrap_or_else(|| def.name.clone());
    let Some(doc) = &flags.options().xml else {
        let mut outgoing = current;
        outgoing.name = arriving;
        return Ok(outgoing);
    };
    let mut given = DomainDefinition::from_document(doc.0.clone())
        .map_err(|e| ApiError::new(ErrorCode::InvalidDefinition, format!("--xml: {e}")))?;
    if given.name != arriving {
        return Err(errors::invalid(format!(
            "--xml defines domain '{}', but the domain arrives as '{arriving}' (use --dname to \
             rename it)",
            given.name
        )));
    }
    for (nic, now) in given.nics.iter_mut().zip(&current.nics) {
        if nic.mac.is_none() {
            nic.mac = now.mac.clone();
        }
    }
    given.pin_macs();
    let changes = current.guest_abi_changes(&given);
    if !changes.is_empty() {
        return Err(errors::operation_invalid(format!(
            "--xml changes what the guest of '{}' sees: {}; only host-side settings (image \
             paths, bridges, cache modes, the serial log, the kernel's files) may differ",
            def.name,
            changes.join("; ")
        )));
    }
    Ok(given)
}

/// What a zero-copy migration needs locked beyond the guest's RAM: QEMU's
/// own buffers.
const ZEROCOPY_SLACK: u64 = 64 << 20;

/// Raises the source QEMU's locked-memory limit for `--zerocopy`; the
/// limit it had.
fn raise_memlock(
    agent: &Agent,
    name: &DomainName,
    vm: &crate::running::RunningVm,
) -> Result<domain::qemu::memlock::MemlockLimit, ApiError> {
    let pid = vm.process.pid();
    let need = vm.spec.ram.bytes + ZEROCOPY_SLACK;
    domain::qemu::memlock::raise(pid, need).map_err(|e| {
        let now = domain::qemu::memlock::get(pid)
            .map(|l| format!("{} MiB", l.soft >> 20))
            .unwrap_or_else(|_| "unknown".into());
        ApiError::new(
            ErrorCode::Unsupported,
            format!(
                "--zerocopy needs the locked-memory limit (RLIMIT_MEMLOCK) of domain '{name}''s \
                 QEMU at {} MiB (its RAM and QEMU's buffers), and the agent on {} cannot raise \
                 it from {now}: {} (run the agent with CAP_SYS_RESOURCE, or start it with a \
                 higher LimitMEMLOCK)",
                need >> 20,
                agent.uri,
                e.source
            ),
        )
    })
}

/// Recovers a post-copy migration whose stream broke: both QEMUs are (or
/// are put) in `postcopy-paused`; the destination listens again
/// (`migrate-recover`) and the source resumes sending (`migrate` with
/// `resume`). The job's watcher carries on to the end as before.
async fn postcopy_resume(
    agent: &Arc<Agent>,
    name: &DomainName,
    destination: &AgentUri,
) -> Result<Reply, ApiError> {
    let Some((job, Some(vm))) = agent.table.outgoing_of(name)? else {
        return Err(errors::operation_invalid(format!(
            "domain '{name}' has no migration from this host to resume"
        )));
    };
    if job.ident.destination != destination.to_string() {
        return Err(errors::invalid(format!(
            "the migration of '{name}' goes to {}, not {destination}",
            job.ident.destination
        )));
    }
    let qmp = vm.process.qmp();
    super::pause_postcopy(qmp, |status| {
        format!(
            "the migration of '{name}' is not in post-copy (status {status:?}); nothing to resume"
        )
    })
    .await?;
    let peer = Peer::connect(
        destination,
        agent.peer_tls(),
        agent.config.timeouts.peer_silence,
    )
    .await?;
    let uri = peer
        .call(
            call::PeerRecover {
                job_id: job.ident.id.clone(),
            },
            protocol::REQUEST_TIMEOUT,
        )
        .await
        .map_err(|e| e.to_api())?
        .uri;
    qmp.execute(&Migrate {
        uri: uri.clone(),
        resume: Some(true),
    })
    .await
    .map_err(|e| errors::qemu(format!("QEMU refused to resume the migration: {e}")))?;
    tracing::info!(job = %job.ident.id, domain = %name, %uri, "post-copy resumed");
    Ok(Reply::MigrationStarted {
        job_id: job.ident.id.clone(),
    })
}
