//! The job task: Prepare on the peer, Perform here under a watchdog on the
//! peer, then Finish and Confirm, or Cleanup.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use domain::qemu::{LaunchSpec, RamLayout, STOP_TIMEOUT};
use domain::{DomainDefinition, DomainName};
use migration::perform::{self, CancelReason, Outcome, Progress};
use migration::settings;
use migration::{cleanup, plan, vcpu_throttle, wire};
use protocol::call;
use protocol::domain::{DefinitionDoc, Tunables};
use protocol::job::{JobStats, JobStatus, Phase, Role};
use protocol::migrate::PrepareRequest;
use qmp::commands::vm::{QueryStatus, RunState, Stop};
use tokio::sync::watch;
use tokio::time::Instant;

use super::finish::{self, Settled};
use super::peer::Peer;
use super::record::Ending;
use super::storage::DiskCopyError;
use crate::errors;
use crate::jobs::OutgoingJob;
use crate::running::RunningVm;
use crate::state::Agent;

/// Why the destination did not prepare.
#[derive(Debug, thiserror::Error)]
enum PrepareError {
    #[error("destination could not prepare")]
    Refused(#[source] protocol::ClientError),
    #[error("cannot copy the disks")]
    Storage(#[from] DiskCopyError),
}

pub(super) struct Run {
    pub agent: Arc<Agent>,
    pub name: DomainName,
    pub job: Arc<OutgoingJob>,
    pub peer: Peer,
    /// The watchdog gave up on the destination agent.
    pub lost_peer: AtomicBool,
    pub def: DomainDefinition,
    pub vm: Option<Arc<RunningVm>>,
    pub tunables: Tunables,
    pub progress: watch::Sender<Progress>,
    /// The stream's TLS, with `--tls`.
    pub tls: Option<migration::stream_tls::StreamTls>,
    /// The disks copied to the destination (`vda`, ...).
    pub storage: Vec<String>,
    /// With `--zerocopy`, the source QEMU's locked-memory limit before the
    /// job raised it.
    pub memlock: Option<domain::qemu::memlock::MemlockLimit>,
    /// The definition the destination gets: the source's, or `--xml`'s,
    /// under `--dname`'s name, with the NICs' MACs pinned.
    pub outgoing: DomainDefinition,
}

impl Run {
    pub fn set_phase(&self, phase: Phase) {
        self.job.clock.enter(phase);
        tracing::debug!(%phase, "phase");
    }

    pub async fn run(self) {
        let ending = match self.vm.clone() {
            Some(vm) => self.live(&vm).await,
            None => self.offline().await,
        };
        if let (Some(limit), Some(vm)) = (self.memlock, &self.vm) {
            if vm.process.exit_info().is_none() {
                if let Err(e) = domain::qemu::memlock::set(vm.process.pid(), limit) {
                    tracing::warn!(error = %errors::chain(&e), "could not put the QEMU's locked-memory limit back");
                }
            }
        }
        self.conclude(ending).await;
    }

    /// The domain's name on the destination.
    fn arriving_name(&self) -> &DomainName {
        self.job
            .ident
            .flags
            .landing()
            .dname
            .as_ref()
            .unwrap_or(&self.name)
    }

    async fn prepare(&self) -> Result<call::Prepared, PrepareError> {
        self.set_phase(Phase::Prepare);
        let storage = match &self.vm {
            Some(vm) => self
                .storage_copies(vm.process.qmp())
                .await
                .map_err(PrepareError::Storage)?,
            None => Vec::new(),
        };
        let spec = match &self.vm {
            Some(vm) => vm.spec.clone(),
            None => LaunchSpec {
                machine: self.def.machine.clone(),
                accel: self.def.accel,
                ram: RamLayout::plain(self.def.memory_mib),
            },
        };
        let request = call::PeerPrepare {
            prepare: PrepareRequest {
                job_id: self.job.ident.id.clone(),
                definition: DefinitionDoc(self.outgoing.to_document()),
                spec: wire::launch_spec(&spec),
                flags: self.job.ident.flags.options().clone(),
                source: self.agent.uri.clone(),
                storage,
            },
        };
        self.peer
            .call(request, self.agent.config.timeouts.prepare)
            .await
            .map_err(PrepareError::Refused)
    }

    async fn offline(&self) -> Ending {
        if let Err(e) = self.prepare().await {
            return Ending::failed(errors::chain(&e), JobStats::default());
        }
        self.set_phase(Phase::Confirm);
        if self.job.ident.flags.landing().undefine_source {
            self.undefine_source().await;
        }
        Ending::completed(JobStats::default(), None)
    }

    async fn live(&self, vm: &Arc<RunningVm>) -> Ending {
        let qmp = vm.process.qmp();
        let flags = &self.job.ident.flags;
        let call::Prepared {
            uri: data_uri,
            nbd_port,
            nbd_host,
        } = match self.prepare().await {
            Ok(prepared) => prepared,
            Err(e) => {
                let e = errors::chain(&e);
                // The destination tears down on its own when Prepare fails
                // or our connection closes; ask anyway.
                self.abort_peer(&e).await;
                return Ending::failed(e, JobStats::default());
            }
        };
        let asked = flags.stream().asked_uri();
        let data_uri = match self.trusted(&data_uri, asked.as_deref()).await {
            Ok(uri) => uri,
            Err(e) => {
                let e = errors::chain(&e);
                self.abort_peer(&e).await;
                return Ending::failed(e, JobStats::default());
            }
        };
        // `--disks-uri`: the NBD server's own address, held to the same
        // rule as the stream's.
        let nbd_host = match (nbd_host, nbd_port) {
            (Some(host), Some(port)) => {
                let answered = if host.contains(':') {
                    format!("tcp:[{host}]:{port}")
                } else {
                    format!("tcp:{host}:{port}")
                };
                match self
                    .trusted(&answered, flags.options().disks_uri.as_deref())
                    .await
                {
                    Ok(_) => Some(host),
                    Err(e) => {
                        let e = format!("the destination's disks server: {}", errors::chain(&e));
                        self.abort_peer(&e).await;
                        return Ending::failed(e, JobStats::default());
                    }
                }
            }
            _ => None,
        };
        tracing::info!(%data_uri, "destination ready");
        // The adaptive controller's throttle, taken before the disks are
        // copied: a copy the guest's writes outrun slows the vCPUs too.
        let (mut throttle, via) = if flags.converge_mode() == protocol::ConvergeMode::Adaptive {
            let name = format!("{}-{}", self.name, &self.job.ident.id[..8]);
            let (throttle, via) =
                vcpu_throttle::attach(qmp, &self.agent.throttle_place(), name, vm.process.pid())
                    .await;
            (Some(throttle), via)
        } else {
            (None, settings::ThrottleVia::NotQemu)
        };
        let mirrors = match self
            .mirror_disks(
                qmp,
                &data_uri,
                nbd_port,
                nbd_host.as_deref(),
                throttle.as_mut(),
            )
            .await
        {
            Ok(mirrors) => mirrors,
            Err(e) => {
                if let Some(mut throttle) = throttle {
                    throttle.release().await;
                }
                let error = format!("copying the disks failed: {}", errors::chain(&e));
                self.abort_peer(&error).await;
                let (status, error) = if self.job.cancel.is_cancelled() {
                    let (status, why) = self.cancelled_because(CancelReason::User);
                    (status, format!("{why} while copying the disks"))
                } else {
                    (JobStatus::Failed, error)
                };
                return Ending {
                    status,
                    error: Some(error),
                    recovery: None,
                    stats: self.progress.borrow().stats.clone(),
                    data_uri: Some(data_uri),
                };
            }
        };

        self.set_phase(Phase::Perform);
        let tunables = self
            .agent
            .table
            .tunables(&self.name)
            .unwrap_or(self.tunables);
        let previous =
            match settings::apply(qmp, flags, tunables, Role::Source, via, self.tls.as_ref()).await
            {
                Ok(p) => p,
                Err(e) => {
                    if let Some(mut throttle) = throttle {
                        throttle.release().await;
                    }
                    let error = format!(
                        "source QEMU refused the migration settings: {}",
                        errors::chain(&e)
                    );
                    self.abort_peer(&error).await;
                    return Ending::failed(error, JobStats::default());
                }
            };
        let was_running = matches!(
            qmp.execute(&QueryStatus).await,
            Ok(s) if s.status == RunState::Running
        );
        if !flags.live() && was_running {
            if let Err(e) = qmp.execute(&Stop).await {
                tracing::warn!(error = %e, "could not pause the guest for a non-live migration");
            }
        }

        let mechanism_max = throttle.as_ref().map_or(0.0, |t| t.max());
        let mut options = plan::watch_options(flags, tunables, mechanism_max, vm.spec.ram.bytes);
        options.ram_in_use_bytes = crate::estimate::ram_in_use(&self.agent, vm).await;
        options.path_bandwidth = self.agent.config.path_bandwidth();
        options.dirty_ring = self.def.dirty_ring.is_some() && vm.spec.accel == types::Accel::Kvm;
        // Also waits for a measurement in progress, which would make the
        // pre-flight's own fail (QEMU measures one dirty rate at a time).
        options.known = vm
            .measurements
            .recent(crate::measurements::KNOWN_FOR_A_JOB)
            .await;
        let outcome = self
            .perform(vm, &data_uri, &options, throttle, &mirrors)
            .await;

        let outcome = match outcome {
            // The guest is paused: the mirrors catch up and end (at
            // pre-switchover already, unless QEMU went past it), and only
            // then may the destination run it.
            Outcome::Completed { stats } if !mirrors.is_empty() => {
                match mirrors.complete(qmp).await {
                    Ok(()) => Outcome::Completed { stats },
                    Err(e) => {
                        self.abort_peer("the disks' copy failed").await;
                        Outcome::Failed {
                            error: perform::PerformError::Storage(e),
                            stats,
                        }
                    }
                }
            }
            Outcome::Completed { stats } => Outcome::Completed { stats },
            other => {
                mirrors.abandon(qmp).await;
                other
            }
        };
        let mut ending = match outcome {
            Outcome::Completed { stats } => self.finish_and_confirm(vm, stats, was_running).await,
            Outcome::Failed { error, stats } => {
                let error = errors::chain(&error);
                let mut ending = Ending::failed(format!("migration failed: {error}"), stats);
                ending.recovery = self.recover_source(vm, was_running, &error).await;
                ending
            }
            Outcome::Cancelled { reason, stats } => {
                let (status, error) = self.cancelled_because(reason);
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
        ending.data_uri = Some(data_uri);
        ending
    }

    /// The data URI the destination answered, if it points at the
    /// destination itself or where the user asked.
    async fn trusted(
        &self,
        answered: &str,
        asked: Option<&str>,
    ) -> Result<String, migration::uri::UntrustedDataUri> {
        // A peer on this host's unix socket may only name loopback.
        let (host, port) = self.peer.uri().host_port().unwrap_or(("localhost", 0));
        let addrs: Vec<std::net::IpAddr> = tokio::net::lookup_host((host, port))
            .await
            .map(|addrs| addrs.map(|a| a.ip()).collect())
            .unwrap_or_default();
        migration::uri::check_peer_data_uri(answered, asked, host, &addrs).map(|u| u.to_string())
    }

    /// Perform, while checking that the destination agent is there: a copy
    /// nobody can finish is cancelled.
    async fn perform(
        &self,
        vm: &RunningVm,
        data_uri: &str,
        options: &perform::WatchOptions,
        throttle: Option<Box<dyn vcpu_throttle::VcpuThrottle>>,
        mirrors: &migration::storage::source::Mirrors,
    ) -> Outcome {
        let retunes = self
            .job
            .retunes
            .lock()
            .expect("retune lock")
            .take()
            .unwrap_or_else(|| tokio::sync::mpsc::channel(1).1);
        let perform = perform::run(
            vm.process.qmp(),
            data_uri,
            options,
            &self.job.cancel,
            &self.progress,
            perform::Levers {
                throttle,
                mirrors: Some(mirrors),
            },
            retunes,
        );
        self.watched(perform).await
    }

    /// Runs `work` while checking that the destination agent is there:
    /// when it has been silent too long, the job is cancelled (which
    /// `work` must heed) and marked as having lost its peer.
    pub(super) async fn watched<T>(&self, work: impl std::future::Future<Output = T>) -> T {
        tokio::pin!(work);
        let mut last_contact = Instant::now();
        let timeouts = self.agent.config.timeouts;
        let mut check = Box::pin(self.peer.answers_after(timeouts.peer_check_interval()));
        loop {
            tokio::select! {
                done = &mut work => return done,
                reachable = &mut check => {
                    if reachable {
                        last_contact = Instant::now();
                    } else if last_contact.elapsed() >= timeouts.peer_silence
                        && !self.job.cancel.is_cancelled()
                    {
                        tracing::error!("lost the destination agent; cancelling");
                        self.lost_peer.store(true, Ordering::Relaxed);
                        self.job.cancel.cancel();
                    }
                    check = Box::pin(self.peer.answers_after(timeouts.peer_check_interval()));
                }
            }
        }
    }

    /// Tells the destination to tear its side down (briefly, if the
    /// watchdog already found it unheard).
    pub(super) async fn abort_peer(&self, reason: &str) {
        let unheard = self.lost_peer.load(Ordering::Relaxed);
        self.peer.abort(&self.job.ident.id, reason, unheard).await;
    }

    /// The status and error of a job QEMU cancelled.
    pub(super) fn cancelled_because(&self, reason: CancelReason) -> (JobStatus, String) {
        match reason {
            CancelReason::User if self.lost_peer.load(Ordering::Relaxed) => (
                JobStatus::Failed,
                format!(
                    "lost contact with the destination agent {} for {:?}; migration cancelled",
                    self.job.ident.destination, self.agent.config.timeouts.peer_silence
                ),
            ),
            CancelReason::User => (JobStatus::Cancelled, "cancelled by domjobabort".to_string()),
            CancelReason::Timeout(t) => (
                JobStatus::Failed,
                format!(
                    "migration did not complete within the {}s timeout and was aborted",
                    t.as_secs()
                ),
            ),
        }
    }

    /// After QEMU completed: the destination resumes the guest (Finish),
    /// then the source QEMU goes away (Confirm).
    async fn finish_and_confirm(
        &self,
        vm: &Arc<RunningVm>,
        mut stats: JobStats,
        was_running: bool,
    ) -> Ending {
        self.set_phase(Phase::Finish);
        let settled = finish::settle(
            &self.peer,
            &self.job.ident.id,
            self.agent.config.finish_timeout,
            self.agent.config.timeouts.peer_retry,
        )
        .await;
        let note = match settled {
            Settled::Finished {
                postcopy_work_lost_ms,
            } => {
                stats.postcopy_work_lost_ms = postcopy_work_lost_ms;
                None
            }
            Settled::RunsThere(note) => Some(note),
            Settled::NotThere(error) => {
                let recovery = cleanup::resume_source(vm.process.qmp(), was_running).await;
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
        // The guest runs on the destination: the cluster says so before
        // the source's copy stops.
        crate::membership::hand_over(
            &self.agent,
            self.name.as_str(),
            self.arriving_name().as_str(),
            self.peer.name(),
        )
        .await;
        let vm = self
            .agent
            .table
            .confirm_outgoing(&self.name)
            .unwrap_or_else(|| vm.clone());
        vm.process.shutdown(STOP_TIMEOUT).await;
        if self.job.ident.flags.landing().undefine_source {
            self.undefine_source().await;
        }
        Ending::completed(stats, note)
    }

    async fn undefine_source(&self) {
        match self.agent.store.remove_definition(&self.name).await {
            Ok(()) => {
                let _ = self.agent.table.undefined(&self.name);
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
        self.abort_peer(error).await;
        if let Some(exit) = vm.process.exit_info() {
            return Some(format!("none possible: the source QEMU exited ({exit})"));
        }
        Some(cleanup::resume_source(vm.process.qmp(), was_running).await)
    }
}
