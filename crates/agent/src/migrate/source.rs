//! The source half: Begin (in the request), then a job task that drives
//! Prepare (on the peer), Perform, Finish (on the peer) and Confirm — or
//! Cleanup, which leaves the guest running here.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use converge::Policy;
use domain::DomainName;
use migration::job::{unix_ms, JobRecord, JobStats, JobStatus, Phase, Role};
use migration::perform::{self, CancelReason, Outcome, Progress, WatchOptions};
use migration::settings::{self, ThrottleVia, Tunables};
use migration::vcpu_throttle::{HostVcpuThrottle, QemuVcpuThrottle, VcpuThrottle};
use migration::{support, ConvergeMode, MigrateFlags};
use protocol::message::Reply;
use protocol::types::{EstimateParams, PrepareRequest};
use protocol::{AgentUri, ApiError, Client, ClientError, ErrorCode, Request, PEER_SILENCE_LIMIT};
use qmp::commands::migration::Migrate;
use qmp::commands::vm::{Cont, QueryCpusFast, QueryStatus, RunState, Stop};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::errors;
use crate::state::{ActiveJob, Agent, OutgoingJob};
use crate::vm::RunningVm;

const PEER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to look for a destination agent that went away mid-job (one
/// that restarts comes back well within it).
const PEER_RETRY: Duration = Duration::from_secs(30);
const PEER_CHECK_INTERVAL: Duration = Duration::from_secs(5);
const PREPARE_TIMEOUT: Duration = Duration::from_secs(90);
const QEMU_STOP_TIMEOUT: Duration = Duration::from_secs(10);
const MIB: f64 = 1024.0 * 1024.0;

/// Begin: validates everything that can be checked before anything changes,
/// then starts the job. Errors here leave both hosts untouched.
pub(crate) async fn begin(
    agent: &Arc<Agent>,
    name: &DomainName,
    destination: &str,
    flags: MigrateFlags,
) -> Result<Reply, ApiError> {
    flags.validate().map_err(|e| errors::invalid(e.0))?;
    let dest_uri: AgentUri = destination
        .parse()
        .map_err(|e: protocol::BadAgentUri| errors::invalid(e.to_string()))?;
    if flags.postcopy_resume {
        return postcopy_resume(agent, name, &dest_uri).await;
    }
    let lock = agent.op_lock(name)?;
    let _guard = lock.lock().await;

    let (def, vm, tunables) = agent.with_domain(name, |d| {
        if let Some(job) = &d.job {
            return Err(errors::operation_invalid(format!(
                "domain '{name}' already has an active migration job ({})",
                job.id()
            )));
        }
        if flags.offline {
            if !d.persistent {
                return Err(errors::operation_invalid(format!(
                    "offline migration needs a persistent domain; '{name}' is transient"
                )));
            }
        } else if d.vm.is_none() {
            return Err(errors::operation_invalid(format!(
                "domain '{name}' is not running (use --offline to move only its definition)"
            )));
        }
        Ok((d.definition.clone(), d.vm.clone(), d.tunables))
    })?;

    let binary = agent.binary().await?;
    support::check(&flags, Role::Source, &agent.uri, binary)
        .map_err(|e| ApiError::new(ErrorCode::Unsupported, e.to_string()))?;

    let peer = connect_peer(&dest_uri).await?;
    let hello = match peer.request(Request::Hello, PEER_TIMEOUT).await {
        Ok(Reply::Hello(info)) => info,
        Ok(other) => return Err(unexpected(&other)),
        Err(e) => return Err(e.to_api()),
    };
    if hello.instance == agent.instance {
        return Err(errors::invalid(format!(
            "{destination} is this agent: migrate to another host's agent"
        )));
    }
    let peer_caps = match peer
        .request(
            Request::PeerProbe {
                flags: Box::new(flags.clone()),
            },
            PEER_TIMEOUT,
        )
        .await
    {
        Ok(Reply::Capabilities(caps)) => caps,
        Ok(other) => return Err(unexpected(&other)),
        Err(e) => return Err(e.to_api()),
    };
    support::check(&flags, Role::Destination, destination, &peer_caps.qemu)
        .map_err(|e| ApiError::new(ErrorCode::Unsupported, e.to_string()))?;
    if let Some(vm) = &vm {
        if peer_caps.qemu.resolve_machine(&vm.spec.machine).as_deref() != Some(&vm.spec.machine) {
            return Err(ApiError::new(
                ErrorCode::Unsupported,
                format!(
                    "machine type '{}' is not supported by the QEMU binary on {destination}",
                    vm.spec.machine
                ),
            ));
        }
    }

    if flags.dry_run {
        drop(peer);
        return crate::estimate::estimate(
            agent,
            name,
            EstimateParams {
                bandwidth_mib_s: flags.bandwidth,
                downtime_ms: flags.downtime,
                timeout_s: flags.timeout,
                max_throttle_pct: flags.max_throttle,
            },
        )
        .await;
    }

    let (progress_tx, progress_rx) = watch::channel(Progress::default());
    let (retune_tx, retune_rx) = tokio::sync::mpsc::channel(4);
    let job = Arc::new(OutgoingJob {
        id: uuid::Uuid::new_v4().to_string(),
        flags: flags.clone(),
        destination: destination.to_string(),
        started_at_ms: unix_ms(),
        started: Instant::now(),
        cancel: CancellationToken::new(),
        progress: progress_rx,
        phase: Mutex::new(Phase::Begin),
        retune: retune_tx,
        retunes: Mutex::new(Some(retune_rx)),
    });
    agent.with_domain(name, |d| {
        d.job = Some(ActiveJob::Outgoing(job.clone()));
        Ok(())
    })?;
    agent.persist_run(name).await;
    let span = tracing::info_span!("job", id = %job.id, domain = %name, role = "source");
    tracing::info!(parent: &span, %destination, flags = ?flags.names(), "migration started");
    let run = Run {
        agent: agent.clone(),
        name: name.clone(),
        job: job.clone(),
        peer: tokio::sync::Mutex::new(peer),
        lost_peer: Default::default(),
        def,
        vm,
        tunables,
        progress: progress_tx,
    };
    tokio::spawn(run.run().instrument(span));
    Ok(Reply::MigrationStarted {
        job_id: job.id.clone(),
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
    let (job, vm) = agent.with_domain(name, |d| match (&d.job, &d.vm) {
        (Some(ActiveJob::Outgoing(job)), Some(vm)) => Ok((job.clone(), vm.clone())),
        _ => Err(errors::operation_invalid(format!(
            "domain '{name}' has no migration from this host to resume"
        ))),
    })?;
    if job.destination != destination.to_string() {
        return Err(errors::invalid(format!(
            "the migration of '{name}' goes to {}, not {destination}",
            job.destination
        )));
    }
    let qmp = vm.process.qmp();
    super::postcopy::pause(qmp, |status| {
        format!(
            "the migration of '{name}' is not in post-copy (status {status:?}); nothing to resume"
        )
    })
    .await?;
    let peer = connect_peer(destination).await?;
    let uri = match peer
        .request(
            Request::PeerRecover {
                job_id: job.id.clone(),
            },
            PEER_TIMEOUT,
        )
        .await
    {
        Ok(Reply::Prepared { uri }) => uri,
        Ok(other) => return Err(unexpected(&other)),
        Err(e) => return Err(e.to_api()),
    };
    qmp.execute(&Migrate {
        uri: uri.clone(),
        resume: Some(true),
    })
    .await
    .map_err(|e| errors::qemu(format!("QEMU refused to resume the migration: {e}")))?;
    tracing::info!(job = %job.id, domain = %name, %uri, "post-copy resumed");
    Ok(Reply::MigrationStarted {
        job_id: job.id.clone(),
    })
}

fn unexpected(reply: &Reply) -> ApiError {
    ApiError::new(
        ErrorCode::PeerFailed,
        format!("destination agent sent an unexpected reply: {reply:?}"),
    )
}

/// What the destination says after the copy completed.
enum Settled {
    /// It resumed the guest.
    Finished,
    /// It runs the guest, though Finish's answer was lost.
    RunsThere(String),
    /// It does not run the guest (and tore its side down).
    NotThere(String),
    /// It cannot be asked.
    Unknown(String),
}

/// How a job ended, before it becomes a record.
struct Ending {
    status: JobStatus,
    error: Option<String>,
    recovery: Option<String>,
    stats: JobStats,
    data_uri: Option<String>,
}

impl Ending {
    fn failed(error: String, stats: JobStats) -> Self {
        Ending {
            status: JobStatus::Failed,
            error: Some(error),
            recovery: None,
            stats,
            data_uri: None,
        }
    }
}

struct Run {
    agent: Arc<Agent>,
    name: DomainName,
    job: Arc<OutgoingJob>,
    peer: tokio::sync::Mutex<Client>,
    /// The watchdog gave up on the destination agent.
    lost_peer: std::sync::atomic::AtomicBool,
    def: domain::DomainDefinition,
    vm: Option<Arc<RunningVm>>,
    tunables: Tunables,
    progress: watch::Sender<Progress>,
}

impl Run {
    fn set_phase(&self, phase: Phase) {
        *self.job.phase.lock().expect("phase lock") = phase;
        tracing::debug!(%phase, "phase");
    }

    async fn run(self) {
        let ending = match self.vm.clone() {
            Some(vm) => self.live(&vm).await,
            None => self.offline().await,
        };
        self.conclude(ending).await;
    }

    async fn prepare(&self) -> Result<String, String> {
        self.set_phase(Phase::Prepare);
        let request = Request::PeerPrepare(Box::new(PrepareRequest {
            job_id: self.job.id.clone(),
            definition: self.def.clone(),
            spec: self
                .vm
                .as_ref()
                .map(|vm| vm.spec.clone())
                .unwrap_or_else(|| domain::qemu::LaunchSpec {
                    machine: self.def.machine.clone(),
                    accel: self.def.accel,
                    ram: domain::qemu::RamLayout::plain(self.def.memory_mib),
                }),
            flags: self.job.flags.clone(),
            source: self.agent.uri.clone(),
        }));
        match self.peer_request(request, PREPARE_TIMEOUT).await {
            Ok(Reply::Prepared { uri }) => Ok(uri),
            Ok(other) => Err(unexpected(&other).message),
            Err(e) => Err(format!(
                "destination could not prepare: {}",
                errors::chain(&e)
            )),
        }
    }

    async fn offline(&self) -> Ending {
        if let Err(e) = self.prepare().await {
            return Ending::failed(e, JobStats::default());
        }
        self.set_phase(Phase::Confirm);
        if self.job.flags.undefine_source {
            self.undefine_source().await;
        }
        Ending {
            status: JobStatus::Completed,
            error: None,
            recovery: None,
            stats: JobStats::default(),
            data_uri: None,
        }
    }

    async fn live(&self, vm: &Arc<RunningVm>) -> Ending {
        let qmp = vm.process.qmp();
        let flags = &self.job.flags;
        let data_uri = match self.prepare().await {
            Ok(uri) => uri,
            Err(e) => {
                // The destination tears down on its own when Prepare fails
                // or our connection closes; ask anyway.
                self.abort_destination(&e).await;
                return Ending::failed(e, JobStats::default());
            }
        };
        tracing::info!(%data_uri, "destination ready");

        self.set_phase(Phase::Perform);
        let tunables = self
            .agent
            .with_domain(&self.name, |d| Ok(d.tunables))
            .unwrap_or(self.tunables);
        let (throttle, via) = self.vcpu_throttle(vm).await;
        let previous = match settings::apply(qmp, flags, tunables, Role::Source, via).await {
            Ok(p) => p,
            Err(e) => {
                if let Some(mut throttle) = throttle {
                    throttle.release().await;
                }
                let error = format!(
                    "source QEMU refused the migration settings: {}",
                    errors::chain(&e)
                );
                self.abort_destination(&error).await;
                return Ending::failed(error, JobStats::default());
            }
        };
        let was_running = matches!(
            qmp.execute(&QueryStatus).await,
            Ok(s) if s.status == RunState::Running
        );
        if !flags.live && was_running {
            if let Err(e) = qmp.execute(&Stop).await {
                tracing::warn!(error = %e, "could not pause the guest for a non-live migration");
            }
        }

        let downtime_ms = flags
            .downtime
            .or(tunables.downtime_ms)
            .unwrap_or(settings::DEFAULT_DOWNTIME_MS)
            .min(flags.max_downtime.unwrap_or(u64::MAX));
        let bandwidth_cap = flags
            .bandwidth
            .or(tunables.bandwidth_mib_s)
            .map(|b| b as f64 * MIB);
        let controller = (flags.converge_mode() == ConvergeMode::Adaptive).then(|| {
            let mechanism_max = throttle.as_ref().map_or(0.0, |t| t.max());
            let downtime = downtime_ms as f64 / 1000.0;
            Policy {
                max_throttle: (flags.max_throttle.unwrap_or(99.9) / 100.0).min(mechanism_max),
                downtime,
                max_downtime: flags
                    .max_downtime
                    .map_or(downtime, |ms| ms as f64 / 1000.0)
                    .max(downtime),
                budget: flags.timeout.map(|s| s as f64),
                allow_postcopy: flags.postcopy_enabled(),
            }
        });
        let options = WatchOptions {
            timeout: flags.timeout.map(Duration::from_secs),
            timeout_action: flags.timeout_action.unwrap_or_default(),
            postcopy_after_precopy: flags.postcopy_after_precopy,
            preflight: controller.is_some(),
            ram_bytes: vm.spec.ram.bytes,
            controller,
            downtime_ms,
            max_downtime_ms: flags.max_downtime,
            allow_postcopy: flags.allow_postcopy,
            bandwidth_cap,
            ..WatchOptions::default()
        };
        let retunes = self
            .job
            .retunes
            .lock()
            .expect("retune lock")
            .take()
            .unwrap_or_else(|| tokio::sync::mpsc::channel(1).1);
        let perform = perform::run(
            qmp,
            &data_uri,
            &options,
            &self.job.cancel,
            &self.progress,
            throttle,
            retunes,
        );
        tokio::pin!(perform);
        // While QEMU copies, keep checking that the destination agent is
        // there: a copy nobody can finish is cancelled.
        let mut last_contact = Instant::now();
        let mut check = Box::pin(self.check_peer_after(PEER_CHECK_INTERVAL));
        let outcome = loop {
            tokio::select! {
                outcome = &mut perform => break outcome,
                reachable = &mut check => {
                    if reachable {
                        last_contact = Instant::now();
                    } else if last_contact.elapsed() >= PEER_SILENCE_LIMIT
                        && !self.job.cancel.is_cancelled()
                    {
                        tracing::error!("lost the destination agent; cancelling");
                        self.lost_peer.store(true, std::sync::atomic::Ordering::Relaxed);
                        self.job.cancel.cancel();
                    }
                    check = Box::pin(self.check_peer_after(PEER_CHECK_INTERVAL));
                }
            }
        };

        let mut ending = match outcome {
            Outcome::Completed { stats } => self.finish_and_confirm(vm, stats, was_running).await,
            Outcome::Failed { error, stats } => {
                let mut ending = Ending::failed(format!("migration failed: {error}"), stats);
                ending.recovery = self.recover_source(vm, was_running, &error).await;
                ending
            }
            Outcome::Cancelled { reason, stats } => {
                let (status, error) = match reason {
                    CancelReason::User if self.lost_peer.load(std::sync::atomic::Ordering::Relaxed) => (
                        JobStatus::Failed,
                        format!(
                            "lost contact with the destination agent {} for {}s; migration cancelled",
                            self.job.destination,
                            PEER_SILENCE_LIMIT.as_secs()
                        ),
                    ),
                    CancelReason::User => {
                        (JobStatus::Cancelled, "cancelled by domjobabort".to_string())
                    }
                    CancelReason::Timeout(t) => (
                        JobStatus::Failed,
                        format!(
                            "migration did not complete within the {}s timeout and was aborted",
                            t.as_secs()
                        ),
                    ),
                };
                let recovery = self.recover_source(vm, was_running, &error).await;
                Ending {
                    status,
                    error: Some(error),
                    recovery,
                    stats,
                    data_uri: None,
                }
            }
        };
        if ending.status != JobStatus::Completed && vm.process.exit_info().is_none() {
            if let Err(e) = settings::restore(qmp, &previous).await {
                tracing::warn!(error = %e, "could not restore the source's migration settings");
            }
        }
        ending.data_uri = Some(data_uri.clone());
        ending
    }

    /// After QEMU completed: the destination resumes the guest (Finish),
    /// then the source QEMU goes away (Confirm).
    /// The throttle mechanism for an adaptive job: the host's cgroup CPU
    /// quota when this host allows it, else QEMU's own throttle.
    async fn vcpu_throttle(&self, vm: &RunningVm) -> (Option<Box<dyn VcpuThrottle>>, ThrottleVia) {
        if self.job.flags.converge_mode() != ConvergeMode::Adaptive {
            return (None, ThrottleVia::NotQemu);
        }
        let qmp = vm.process.qmp();
        let threads: Vec<u32> = match qmp.execute(&QueryCpusFast).await {
            Ok(cpus) => cpus.iter().map(|c| c.thread_id as u32).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot list vCPU threads; using QEMU's throttle");
                Vec::new()
            }
        };
        if !threads.is_empty() {
            let name = format!("{}-{}", self.name, &self.job.id[..8]);
            match HostVcpuThrottle::attach(
                self.agent.config.cgroup_cpu.clone(),
                name,
                vm.process.pid(),
                threads,
            )
            .await
            {
                Ok(host) => return (Some(Box::new(host)), ThrottleVia::NotQemu),
                Err(e) => tracing::warn!(error = %e, "no host throttle; using QEMU's"),
            }
        }
        (
            Some(Box::new(QemuVcpuThrottle::new(qmp.clone()))),
            ThrottleVia::Qemu,
        )
    }

    async fn finish_and_confirm(
        &self,
        vm: &Arc<RunningVm>,
        stats: JobStats,
        was_running: bool,
    ) -> Ending {
        self.set_phase(Phase::Finish);
        let note = match self.settle_finish().await {
            Settled::Finished => None,
            Settled::RunsThere(note) => Some(note),
            Settled::NotThere(error) => {
                let recovery = self.resume_source(vm, was_running).await;
                let mut ending = Ending::failed(error, stats);
                ending.recovery = Some(recovery);
                return ending;
            }
            Settled::Unknown(error) => {
                let mut ending = Ending::failed(error, stats);
                ending.recovery = Some(
                    "guest left paused on the source because it may be running on the \
                     destination; check the destination, then resume or destroy the source copy"
                        .into(),
                );
                return ending;
            }
        };

        self.set_phase(Phase::Confirm);
        let vm = self
            .agent
            .with_domain(&self.name, |d| Ok(d.vm.take()))
            .ok()
            .flatten()
            .unwrap_or_else(|| vm.clone());
        vm.process.shutdown(QEMU_STOP_TIMEOUT).await;
        if self.job.flags.undefine_source {
            self.undefine_source().await;
        }
        Ending {
            status: JobStatus::Completed,
            error: None,
            recovery: note,
            stats,
            data_uri: None,
        }
    }

    /// Finish, made safe against a destination agent that went away or
    /// restarted. The guest may only resume here once the destination says
    /// it does not run there, or when Finish provably never reached it (its
    /// QEMU, started with `-S`, cannot have run the guest then).
    async fn settle_finish(&self) -> Settled {
        if !self.ping().await && !self.reconnect(PEER_RETRY).await {
            return Settled::NotThere(format!(
                "the destination agent {} went away before Finish and did not come back within {}s; \
                 its paused QEMU is removed when that agent restarts",
                self.job.destination,
                PEER_RETRY.as_secs()
            ));
        }
        let finish = self
            .peer_request(
                Request::PeerFinish {
                    job_id: self.job.id.clone(),
                },
                self.agent.config.finish_timeout + PEER_TIMEOUT,
            )
            .await;
        let error = match finish {
            Ok(Reply::Finished) => return Settled::Finished,
            Ok(reply) => unexpected(&reply).message,
            // It answered: Finish failed there (and it tore its side down),
            // or it does not know the job. Its record says which.
            Err(ClientError::Api(e)) => e.message,
            // The request may have arrived: find the agent again to ask.
            Err(e) => {
                let error = errors::chain(&e);
                if !self.reconnect(PEER_RETRY).await {
                    return Settled::Unknown(format!(
                        "Finish may have reached the destination ({error}), which cannot be asked since"
                    ));
                }
                error
            }
        };
        tracing::error!(%error, "destination did not finish");
        match self
            .peer_request(
                Request::PeerAbort {
                    job_id: self.job.id.clone(),
                    reason: error.clone(),
                },
                PEER_TIMEOUT,
            )
            .await
        {
            Ok(Reply::Aborted {
                guest_running_here: true,
            }) => Settled::RunsThere(format!(
                "the destination's Finish reply was lost ({error}) but the guest runs there"
            )),
            Ok(Reply::Aborted {
                guest_running_here: false,
            }) => Settled::NotThere(format!("destination could not resume the guest: {error}")),
            other => Settled::Unknown(format!(
                "destination did not confirm Finish: {error}; and its state cannot be checked: {}",
                match other {
                    Ok(reply) => unexpected(&reply).message,
                    Err(e) => errors::chain(&e),
                }
            )),
        }
    }

    async fn peer_request(
        &self,
        request: Request,
        timeout: Duration,
    ) -> Result<Reply, ClientError> {
        self.peer.lock().await.request(request, timeout).await
    }

    /// After `delay`: does the destination agent answer (on this
    /// connection or a new one)?
    async fn check_peer_after(&self, delay: Duration) -> bool {
        tokio::time::sleep(delay).await;
        self.ping().await || self.reconnect(Duration::ZERO).await && self.ping().await
    }

    /// True if the peer connection still answers.
    async fn ping(&self) -> bool {
        matches!(
            self.peer_request(Request::Hello, Duration::from_secs(5))
                .await,
            Ok(Reply::Hello(_))
        )
    }

    /// Connects to the destination agent again, retrying until `within`.
    async fn reconnect(&self, within: Duration) -> bool {
        let Ok(uri) = self.job.destination.parse::<AgentUri>() else {
            return false;
        };
        let deadline = Instant::now() + within;
        loop {
            if let Ok(client) = Client::connect(&uri).await {
                *self.peer.lock().await = client;
                tracing::info!("reconnected to the destination agent");
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    async fn undefine_source(&self) {
        match self.agent.store.remove_definition(&self.name).await {
            Ok(()) => {
                let _ = self.agent.with_domain(&self.name, |d| {
                    d.persistent = false;
                    Ok(())
                });
            }
            Err(e) => {
                tracing::error!(error = %errors::chain(&e), "could not undefine the source domain")
            }
        }
    }

    /// Cleanup after a failed or cancelled Perform: tear down the
    /// destination and make sure the guest runs here.
    async fn recover_source(
        &self,
        vm: &Arc<RunningVm>,
        was_running: bool,
        error: &str,
    ) -> Option<String> {
        self.set_phase(Phase::Cleanup);
        self.abort_destination(error).await;
        if let Some(exit) = vm.process.exit_info() {
            return Some(format!("none possible: the source QEMU exited ({exit})"));
        }
        Some(self.resume_source(vm, was_running).await)
    }

    async fn resume_source(&self, vm: &Arc<RunningVm>, was_running: bool) -> String {
        let qmp = vm.process.qmp();
        // A late migrate_cancel can leave the vCPUs stopped; read the state
        // back rather than assume.
        match qmp.execute(&QueryStatus).await {
            Ok(s) if s.status == RunState::Running => "source kept running".into(),
            Ok(s) if !was_running => {
                format!("source left {:?} as it was before the migration", s.status)
            }
            Ok(_) => match qmp.execute(&Cont).await {
                Ok(_) => "source resumed".into(),
                Err(e) => format!("could not resume the source: {}", errors::chain(&e)),
            },
            Err(e) => format!("cannot query the source QEMU: {}", errors::chain(&e)),
        }
    }

    async fn abort_destination(&self, reason: &str) {
        let abort = || Request::PeerAbort {
            job_id: self.job.id.clone(),
            reason: reason.to_string(),
        };
        let mut result = self.peer_request(abort(), PEER_TIMEOUT).await;
        // A restarted destination agent keeps the incoming QEMU for us
        // rather than tying it to the old connection: tell it.
        if matches!(result, Err(ref e) if !matches!(e, ClientError::Api(_)))
            && self.reconnect(Duration::from_secs(5)).await
        {
            result = self.peer_request(abort(), PEER_TIMEOUT).await;
        }
        if let Err(e) = result {
            tracing::warn!(error = %e, "could not reach the destination to abort; it tears down when our connection closes");
        }
    }

    /// Writes the record and releases the domain.
    async fn conclude(self, ending: Ending) {
        let progress = self.progress.borrow().clone();
        let stats = ending.stats.clone().merged_over(&progress.stats);
        if ending.status == JobStatus::Completed {
            self.set_phase(Phase::Done);
        }
        let phase = *self.job.phase.lock().expect("phase lock");
        let record = JobRecord {
            id: self.job.id.clone(),
            domain: self.name.to_string(),
            source: self.agent.uri.clone(),
            destination: self.job.destination.clone(),
            status: ending.status,
            error: ending.error.clone(),
            flags: self.job.flags.names(),
            auto_converge: self.job.flags.qemu_auto_converge(),
            total_time_ms: match ending.status {
                JobStatus::Completed => stats
                    .total_time_ms
                    .unwrap_or_else(|| self.job.started.elapsed().as_millis() as u64),
                _ => self.job.started.elapsed().as_millis() as u64,
            },
            setup_time_ms: stats.setup_time_ms,
            downtime_ms: stats.downtime_ms,
            transferred_bytes: stats.memory_processed_bytes.unwrap_or(0),
            iterations: stats.iteration.unwrap_or(0),
            max_cpu_throttle_pct: progress
                .max_cpu_throttle_pct
                .max(stats.cpu_throttle_pct.unwrap_or(0) as f64),
            converge: self.job.flags.converge_mode().name().to_string(),
            actions: progress.actions.clone(),
            phase,
            started_at_ms: self.job.started_at_ms,
            finished_at_ms: unix_ms(),
            data_uri: ending.data_uri.clone(),
            recovery: ending.recovery.clone(),
            role: Role::Source,
            stats,
            samples: progress.samples.clone(),
        };
        match record.status {
            JobStatus::Completed => tracing::info!(
                total_ms = record.total_time_ms,
                downtime_ms = ?record.downtime_ms,
                max_throttle = record.max_cpu_throttle_pct,
                "migration completed"
            ),
            _ => {
                tracing::error!(status = %record.status, error = ?record.error, recovery = ?record.recovery, "migration did not complete")
            }
        }
        self.agent.metrics.job_finished(&record);
        if let Err(e) = self.agent.history.save(&record).await {
            tracing::error!(error = %errors::chain(&e), "could not save the job record");
        }
        let _ = self.agent.with_domain(&self.name, |d| {
            d.job = None;
            d.last_job = Some(record);
            Ok(())
        });
        self.agent.persist_run(&self.name).await;
        self.agent.drop_if_transient_and_idle(&self.name);
    }
}

async fn connect_peer(destination: &AgentUri) -> Result<Client, ApiError> {
    Client::connect(destination).await.map_err(|e| {
        ApiError::new(
            ErrorCode::PeerUnreachable,
            format!(
                "destination agent is down or unreachable: {}",
                errors::chain(&e)
            ),
        )
    })
}
