//! The agent's in-memory state: domains, their running QEMU, active jobs.
//!
//! The table is behind a std mutex that is never held across an `.await`;
//! operations that must not interleave on one domain (start, destroy,
//! migrate, ...) take the domain's async `op_lock` instead.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use domain::qemu::fingerprint::Fingerprint;
use domain::qemu::QemuBinary;
use domain::{DomainDefinition, DomainName};
use migration::perform::{Progress, Retune};
use migration::record::JobIdentity;
use migration::settings::Previous;
use protocol::domain::{DomainState, Tunables};
use protocol::job::{JobInfo, JobRecord, Phase};
use protocol::{ApiError, ErrorCode};
use qmp::commands::vm::{QueryStatus, RunState};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::errors;
use crate::history::History;
use crate::metrics::Metrics;
use crate::runfile::{RunJob, RunRecord};
use crate::store::Store;
use crate::vm::RunningVm;

/// A migration this agent is sending.
#[derive(Debug)]
pub(crate) struct OutgoingJob {
    pub ident: JobIdentity,
    pub started: Instant,
    /// The phase it is in, and when each began from the command's arrival.
    pub clock: migration::record::PhaseClock,
    pub cancel: CancellationToken,
    pub progress: watch::Receiver<Progress>,
    /// Mid-job limits for the watcher (`migrate-setspeed`, ...).
    pub retune: mpsc::Sender<Retune>,
    /// The watcher's end, taken when Perform starts.
    pub retunes: Mutex<Option<mpsc::Receiver<Retune>>>,
    /// The disks it copies (`vda`, ...): their mirrors follow
    /// `migrate-setspeed` too.
    pub storage: Vec<String>,
}

/// A migration this agent is receiving.
#[derive(Debug)]
pub(crate) struct IncomingJob {
    pub ident: JobIdentity,
    pub started: Instant,
    /// The peer connection that prepared it: if that connection drops
    /// before Finish, the destination side is torn down.
    pub connection: u64,
    /// The certificate name of the agent that prepared it: only it (or an
    /// administrator) may finish, recover or abort it.
    pub prepared_by: Option<String>,
    /// The domain did not exist here before the migration.
    pub created_domain: bool,
    pub previous: Previous,
    pub vm: Option<Arc<RunningVm>>,
    pub phase: Mutex<Phase>,
    /// The definition the guest arrives with (persisted on Finish with
    /// `--persistent`).
    pub definition: DomainDefinition,
    /// The definition the domain had here before, put back if the
    /// migration fails (`None` when the domain is new here).
    pub replaced_definition: Option<DomainDefinition>,
    /// Adopted after an agent restart: the settings to restore are not
    /// known, so Finish resets them to defaults.
    pub reattached: bool,
    /// Images created for copied disks: removed if the guest does not land.
    pub created_images: Vec<std::path::PathBuf>,
}

#[derive(Debug, Clone)]
pub(crate) enum ActiveJob {
    Outgoing(Arc<OutgoingJob>),
    Incoming(Arc<IncomingJob>),
}

impl ActiveJob {
    pub fn ident(&self) -> &JobIdentity {
        match self {
            ActiveJob::Outgoing(j) => &j.ident,
            ActiveJob::Incoming(j) => &j.ident,
        }
    }

    pub fn id(&self) -> &str {
        &self.ident().id
    }

    pub fn info(&self) -> JobInfo {
        match self {
            ActiveJob::Outgoing(j) => {
                let mut info = j.ident.info(
                    j.clock.current(),
                    j.started.elapsed(),
                    Some(&j.progress.borrow()),
                );
                info.phases = j.clock.times();
                info
            }
            ActiveJob::Incoming(j) => j.ident.info(
                *j.phase.lock().expect("phase lock"),
                j.started.elapsed(),
                None,
            ),
        }
    }
}

#[derive(Debug)]
pub(crate) struct Domain {
    pub definition: DomainDefinition,
    /// Has a definition on disk; transient domains vanish when they stop.
    pub persistent: bool,
    pub vm: Option<Arc<RunningVm>>,
    pub job: Option<ActiveJob>,
    pub last_job: Option<JobRecord>,
    pub tunables: Tunables,
    pub op_lock: Arc<tokio::sync::Mutex<()>>,
}

impl Domain {
    pub fn new(definition: DomainDefinition, persistent: bool) -> Self {
        Domain {
            definition,
            persistent,
            vm: None,
            job: None,
            last_job: None,
            tunables: Tunables::default(),
            op_lock: Arc::new(tokio::sync::Mutex::new(())),
        }
    }
}

/// The agent.
#[derive(Debug)]
pub(crate) struct Agent {
    pub config: Config,
    pub store: Store,
    pub history: History,
    pub metrics: Metrics,
    /// How this agent names itself in job records (its TCP URI when it
    /// listens on TCP, else its unix socket).
    pub uri: String,
    /// Random per process: tells an agent that a "peer" is itself.
    pub instance: String,
    /// How this agent dials its peers (`tls://` URIs).
    pub peer_tls: Option<Arc<rustls::ClientConfig>>,
    /// The agent's certificate as its QEMUs read it, for `--tls` (with a
    /// TLS directory only).
    pub qemu_credentials: Option<std::path::PathBuf>,
    /// What runs the guests.
    pub hypervisor: Box<dyn domain::hypervisor::Hypervisor>,
    /// The probed QEMU binary, with the fingerprint it was probed at.
    binary: tokio::sync::Mutex<Option<(Fingerprint, Arc<QemuBinary>)>>,
    pub domains: Mutex<BTreeMap<DomainName, Domain>>,
    next_run_id: AtomicU64,
    next_connection: AtomicU64,
}

impl Agent {
    pub fn new(
        config: Config,
        store: Store,
        history: History,
        uri: String,
        peer_tls: Option<Arc<rustls::ClientConfig>>,
        qemu_credentials: Option<std::path::PathBuf>,
    ) -> Self {
        Agent {
            hypervisor: config.hypervisor.with_program(config.qemu.clone()),
            peer_tls,
            qemu_credentials,
            config,
            store,
            history,
            metrics: Metrics::default(),
            uri,
            instance: uuid::Uuid::new_v4().to_string(),
            binary: tokio::sync::Mutex::new(None),
            domains: Mutex::new(BTreeMap::new()),
            next_run_id: AtomicU64::new(1),
            next_connection: AtomicU64::new(1),
        }
    }

    /// Checks that `def` names only files this host lets QEMU open.
    pub async fn check_paths(&self, def: &DomainDefinition) -> Result<(), ApiError> {
        domain::confine::Confinement {
            image_dirs: self.config.image_dirs.clone(),
            allow_device_nodes: self.config.allow_device_nodes,
            logs_dir: self.store.logs_dir(),
        }
        .check(def)
        .await
        .map_err(|e| ApiError::new(ErrorCode::InvalidDefinition, errors::chain(&e)))
    }

    /// Where this agent's host throttles live; none when the hypervisor's
    /// vCPU threads do not run the guest (QEMU's own throttle then serves).
    pub fn throttle_place(&self) -> migration::vcpu_throttle::HostPlace {
        let mut place = self.config.throttle_place();
        if !self.hypervisor.host_throttle() {
            place.guard = None;
        }
        place
    }

    pub fn next_run_id(&self) -> u64 {
        self.next_run_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Keeps new run ids above those of adopted QEMUs.
    pub fn reserve_run_id(&self, taken: u64) {
        self.next_run_id.fetch_max(taken + 1, Ordering::Relaxed);
    }

    /// Writes the run record of a domain's QEMU as the table has it now.
    pub async fn persist_run(&self, name: &DomainName) {
        let record = {
            let domains = self.domains.lock().expect("domains lock");
            domains.get(name).and_then(|d| {
                let vm = d.vm.as_ref()?;
                let job = |ident: &JobIdentity, peer: &str, created: bool| RunJob {
                    id: ident.id.clone(),
                    peer: peer.to_string(),
                    flags: ident.flags.options().clone(),
                    started_at_ms: ident.started_at_ms,
                    created_domain: created,
                    created_images: Vec::new(),
                };
                Some(RunRecord {
                    name: name.clone(),
                    pid: vm.process.pid(),
                    run_id: vm.run_id,
                    qmp_socket: vm.qmp_socket.clone(),
                    serial_log: vm.serial_log.clone(),
                    qemu_log: vm.qemu_log.clone(),
                    spec: vm.spec.clone(),
                    qemu_version: vm.qemu_version,
                    definition: d.definition.clone(),
                    outgoing: match &d.job {
                        Some(ActiveJob::Outgoing(j)) => {
                            Some(job(&j.ident, &j.ident.destination, false))
                        }
                        _ => None,
                    },
                    incoming: match &d.job {
                        Some(ActiveJob::Incoming(j)) => Some(RunJob {
                            created_images: j.created_images.clone(),
                            ..job(&j.ident, &j.ident.source, j.created_domain)
                        }),
                        _ => None,
                    },
                })
            })
        };
        if let Some(record) = record {
            if let Err(e) = self.store.save_run(&record).await {
                tracing::error!(domain = %name, error = %errors::chain(&e), "cannot record the running QEMU");
            }
        }
    }

    pub fn next_connection_id(&self) -> u64 {
        self.next_connection.fetch_add(1, Ordering::Relaxed)
    }

    /// Connects to another agent, over TLS with this agent's certificate
    /// when the URI says `tls://`.
    pub async fn dial(
        &self,
        uri: &protocol::AgentUri,
    ) -> Result<protocol::Client, protocol::ClientError> {
        protocol::Client::connect_watching(
            uri,
            self.peer_tls.as_ref(),
            self.config.timeouts.peer_silence,
        )
        .await
    }

    /// The QEMU binary's capabilities: probed on first use and again only
    /// when the binary changes (its path, size or mtime), kept across
    /// restarts in the state directory.
    pub async fn binary(&self) -> Result<Arc<QemuBinary>, ApiError> {
        let failed = |e: String| errors::qemu(format!("cannot probe QEMU on {}: {e}", self.uri));
        let now = domain::qemu::fingerprint::fingerprint(&self.config.qemu)
            .await
            .map_err(|e| failed(format!("{}: {e}", self.config.qemu.display())))?;
        let mut cached = self.binary.lock().await;
        if let Some((fingerprint, binary)) = cached.as_ref() {
            if *fingerprint == now {
                return Ok(binary.clone());
            }
        }
        let state_dir = self.store.root();
        let binary = match crate::probe_cache::load(state_dir, &now).await {
            Some(binary) => {
                tracing::debug!(binary = %now.path.display(), "QEMU capabilities from the cached probe");
                binary
            }
            None => {
                let binary = self
                    .hypervisor
                    .probe(self.config.qemu_timeout)
                    .await
                    .map_err(|e| failed(errors::chain(&e)))?;
                tracing::info!(binary = %now.path.display(), version = %binary.version, "probed QEMU");
                crate::probe_cache::save(&self.store, now.clone(), &binary).await;
                binary
            }
        };
        let binary = Arc::new(binary);
        *cached = Some((now, binary.clone()));
        Ok(binary)
    }

    /// Runs `f` on a domain under the table lock.
    pub fn with_domain<T>(
        &self,
        name: &DomainName,
        f: impl FnOnce(&mut Domain) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let mut domains = self.domains.lock().expect("domains lock");
        let domain = domains
            .get_mut(name)
            .ok_or_else(|| errors::no_domain(name))?;
        f(domain)
    }

    /// The domain's operation lock, so callers can serialise on it.
    pub fn op_lock(&self, name: &DomainName) -> Result<Arc<tokio::sync::Mutex<()>>, ApiError> {
        self.with_domain(name, |d| Ok(d.op_lock.clone()))
    }

    /// A domain's state; asks QEMU whether it is paused.
    pub async fn state_of(&self, name: &DomainName) -> Result<DomainState, ApiError> {
        let (vm, job) = self.with_domain(name, |d| Ok((d.vm.clone(), d.job.clone())))?;
        Ok(match (job, vm) {
            (Some(ActiveJob::Outgoing(_)), _) => DomainState::MigratingOut,
            (Some(ActiveJob::Incoming(_)), _) => DomainState::MigratingIn,
            (None, None) => DomainState::ShutOff,
            (None, Some(vm)) if vm.process.exit_info().is_some() => DomainState::Crashed,
            (None, Some(vm)) => {
                let status = vm
                    .process
                    .qmp()
                    .execute_with_timeout(&QueryStatus, Duration::from_secs(2))
                    .await;
                match status {
                    Ok(s) if s.status == RunState::Running => DomainState::Running,
                    Ok(_) => DomainState::Paused,
                    Err(_) => DomainState::Crashed,
                }
            }
        })
    }

    /// The active job with this id, wherever it runs.
    pub fn find_job(&self, id: &str) -> Option<JobInfo> {
        let domains = self.domains.lock().expect("domains lock");
        domains
            .values()
            .find_map(|d| d.job.as_ref().filter(|j| j.id() == id).map(ActiveJob::info))
    }

    /// Forgets a transient domain that no longer runs.
    pub fn drop_if_transient_and_idle(&self, name: &DomainName) {
        let mut domains = self.domains.lock().expect("domains lock");
        if let Some(d) = domains.get(name) {
            if !d.persistent && d.vm.is_none() && d.job.is_none() {
                domains.remove(name);
            }
        }
    }
}
