//! The agent: its configuration, stores, the domain table, its QEMU
//! binary, and how it reaches its peers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use domain::qemu::fingerprint::Fingerprint;
use domain::qemu::QemuBinary;
use domain::{DomainDefinition, DomainName};
use migration::record::JobIdentity;
use protocol::domain::DomainState;
use protocol::{ApiError, ErrorCode};
use qmp::commands::vm::{QueryStatus, RunState};

use crate::config::Config;
use crate::errors;
use crate::history::History;
use crate::jobs::ActiveJob;
use crate::metrics::Metrics;
use crate::runfile::{RunJob, RunRecord};
use crate::store::Store;
use crate::table::DomainTable;

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
    /// Its TLS credentials: how it serves and dials its peers (`tls://`
    /// URIs).
    pub credentials: Arc<crate::credentials::Credentials>,
    /// The agent's certificate as its QEMUs read it, for `--tls` (with a
    /// TLS directory only).
    pub qemu_credentials: Option<std::path::PathBuf>,
    /// What runs the guests.
    pub hypervisor: Box<dyn domain::hypervisor::Hypervisor>,
    /// This host in its cluster, once joined (`--cluster`).
    pub cluster: std::sync::OnceLock<crate::membership::Member>,
    /// The probed QEMU binary, with the fingerprint it was probed at.
    binary: tokio::sync::Mutex<Option<(Fingerprint, Arc<QemuBinary>)>>,
    /// Every domain, and what it is doing.
    pub table: DomainTable,
    next_run_id: AtomicU64,
    next_connection: AtomicU64,
}

impl Agent {
    pub fn new(
        config: Config,
        store: Store,
        history: History,
        uri: String,
        credentials: Arc<crate::credentials::Credentials>,
        qemu_credentials: Option<std::path::PathBuf>,
    ) -> Self {
        Agent {
            hypervisor: config.hypervisor.with_program(config.qemu.clone()),
            credentials,
            cluster: std::sync::OnceLock::new(),
            qemu_credentials,
            config,
            store,
            history,
            metrics: Metrics::default(),
            uri,
            instance: uuid::Uuid::new_v4().to_string(),
            binary: tokio::sync::Mutex::new(None),
            table: DomainTable::default(),
            next_run_id: AtomicU64::new(1),
            next_connection: AtomicU64::new(1),
        }
    }

    /// Checks that `def` names only files this host lets QEMU open.
    pub async fn check_paths(&self, def: &DomainDefinition) -> Result<(), ApiError> {
        self.confinement()
            .check(def)
            .await
            .map_err(|e| ApiError::new(ErrorCode::InvalidDefinition, errors::chain(&e)))
    }

    /// Binds `name` to the peer its guest was handed to (`None`: its guest
    /// is here, or nowhere), in the table and on disk for a persistent
    /// domain.
    pub async fn bind(&self, name: &DomainName, peer: Option<&str>) {
        self.table.bind(name, peer.map(str::to_string));
        if !self.table.persistent(name).unwrap_or(false) {
            return;
        }
        if let Err(e) = self.store.save_binding(name, peer).await {
            tracing::error!(domain = %name, error = %errors::chain(&e), "could not record which host the guest went to");
        }
    }

    /// The files this host lets a definition (or a peer) name.
    pub fn confinement(&self) -> domain::confine::Confinement {
        domain::confine::Confinement {
            image_dirs: self.config.image_dirs.clone(),
            allow_device_nodes: self.config.allow_device_nodes,
            logs_dir: self.store.logs_dir(),
        }
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
        let Ok(d) = self.table.get(name) else {
            return;
        };
        let Some(vm) = d.vm.as_ref() else {
            return;
        };
        let job = |ident: &JobIdentity, peer: &str, created: bool| RunJob {
            id: ident.id.clone(),
            peer: peer.to_string(),
            flags: ident.flags.options().clone(),
            started_at_ms: ident.started_at_ms,
            created_domain: created,
            created_images: Vec::new(),
            peer_name: ident.peer.clone(),
        };
        let record = RunRecord {
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
                Some(ActiveJob::Outgoing(j)) => Some(job(&j.ident, &j.ident.destination, false)),
                _ => None,
            },
            incoming: match &d.job {
                Some(ActiveJob::Incoming(j)) => Some(RunJob {
                    created_images: j.created_images.clone(),
                    ..job(&j.ident, &j.ident.source, j.created_domain)
                }),
                _ => None,
            },
        };
        if let Err(e) = self.store.save_run(&record).await {
            tracing::error!(domain = %name, error = %errors::chain(&e), "cannot record the running QEMU");
        }
    }

    pub fn next_connection_id(&self) -> u64 {
        self.next_connection.fetch_add(1, Ordering::Relaxed)
    }

    /// How this agent dials its peers, with the revocation list as it is
    /// now.
    pub fn peer_tls(&self) -> Option<Arc<rustls::ClientConfig>> {
        self.credentials.client()
    }

    /// Connects to another agent, over TLS with this agent's certificate
    /// when the URI says `tls://`.
    pub async fn dial(
        &self,
        uri: &protocol::AgentUri,
    ) -> Result<protocol::Client, protocol::ClientError> {
        protocol::Client::connect_watching(
            uri,
            self.peer_tls().as_ref(),
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
                    .probe(state_dir, self.config.qemu_timeout)
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

    /// A domain's state; asks QEMU whether it is paused.
    pub async fn state_of(&self, name: &DomainName) -> Result<DomainState, ApiError> {
        let d = self.table.get(name)?;
        Ok(match (d.job, d.vm) {
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
}
