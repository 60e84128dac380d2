//! The two ways the adaptive controller can slow a guest's vCPUs.
//!
//! - [`HostVcpuThrottle`]: a CPU quota on the vCPU threads from the host
//!   ([`cgroup`]); immediate, up to 99.9 %, and it can come back down.
//! - [`QemuVcpuThrottle`]: QEMU's own auto-converge throttle, steered
//!   through its parameters; up to 99 %, and it only moves at QEMU's next
//!   trigger (a sync at least a second after the last check).

pub mod cgroup;
pub mod lease;
pub mod slice_probe;
pub mod writers;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use qmp::commands::migration::MigrateSetParameters;
use qmp::commands::vm::QueryCpusFast;
use qmp::Client;

use crate::settings::{qemu_throttle_parameters, ThrottleVia};
use cgroup::{Hierarchy, HostThrottle, LONG_PERIOD_ABOVE, MAX_HOST_THROTTLE, MIN_SLICE};
use lease::Lease;

/// The highest throttle QEMU's own mechanism applies.
pub const MAX_QEMU_THROTTLE: f64 = 0.99;

/// A boxed future, so [`VcpuThrottle`] stays object safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a throttle could not be attached or changed.
#[derive(Debug, thiserror::Error)]
pub enum ThrottleError {
    /// The host's cgroup refused.
    #[error("the host cannot throttle the vCPU threads")]
    Host(#[from] cgroup::ThrottleError),
    /// QEMU refused its throttle parameters.
    #[error("QEMU refused the throttle parameters")]
    Qemu(#[from] qmp::Error),
    /// The job already ended and lifted it.
    #[error("the host throttle was already released")]
    Released,
    /// The blocking cgroup write did not come back.
    #[error("the throttle's cgroup task failed")]
    Task(#[from] tokio::task::JoinError),
    /// No guard could hold the throttle's lease, so it is not applied.
    #[error("cannot start the throttle's lease guard {program}")]
    Lease {
        /// The guard program.
        program: PathBuf,
        /// Why it did not start.
        #[source]
        source: std::io::Error,
    },
    /// No guard program is configured.
    #[error("no program to guard the throttle's lease")]
    NoGuard,
}

/// A way to throttle a guest's vCPUs.
pub trait VcpuThrottle: Send + Sync {
    /// For job timelines: "host" or "qemu".
    fn kind(&self) -> &'static str;
    /// The highest throttle this mechanism can apply.
    fn max(&self) -> f64;
    /// Applies a throttle (0 = none).
    fn set(&mut self, throttle: f64) -> BoxFuture<'_, Result<(), ThrottleError>>;
    /// Lifts the throttle for good; called the moment the job ends.
    fn release(&mut self) -> BoxFuture<'_, ()>;
    /// It slows the guest before QEMU's migration has started (while the
    /// disks are copied); QEMU's own throttle acts only within one.
    fn acts_before_migration(&self) -> bool {
        false
    }
    /// Under `throttle`, a vCPU may take long to stop when QEMU asks (at
    /// switchover); setting any throttle lets it run at once.
    fn slow_to_stop(&self, throttle: f64) -> bool {
        let _ = throttle;
        false
    }
    /// A handle to throttle single vCPUs, when the mechanism can: to find
    /// which vCPUs write and throttle only those ([`writers`]).
    fn selector(&self) -> Option<VcpuSelector> {
        None
    }
    /// CPU time the throttled vCPUs have used so far, and the least CPU
    /// time per period the mechanism gives them whenever they run at all,
    /// where the mechanism can tell: to see how much the guest dirties in
    /// the smallest slice ([`converge::controller::SliceFloor`]).
    fn cpu_use(&self) -> Option<CpuUse> {
        None
    }
}

/// See [`VcpuThrottle::cpu_use`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CpuUse {
    /// CPU time of the throttled vCPU threads so far.
    pub cpu: std::time::Duration,
    /// Their least CPU time in a period (one quota each).
    pub min_slice: std::time::Duration,
}

/// Single vCPUs of a host throttle: probing one, selecting the writers.
/// Shares the throttle with its [`HostVcpuThrottle`]; once the throttle is
/// released every call fails with [`ThrottleError::Released`].
#[derive(Debug, Clone)]
pub struct VcpuSelector {
    inner: Arc<Mutex<Option<HostThrottle>>>,
    /// The QEMU process.
    pub pid: u32,
    /// Its vCPU threads, by vCPU index.
    pub threads: Vec<u32>,
}

impl VcpuSelector {
    async fn with<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut HostThrottle) -> Result<T, cgroup::ThrottleError> + Send + 'static,
    ) -> Result<T, ThrottleError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(
            move || match inner.lock().expect("throttle lock").as_mut() {
                Some(t) => Ok(f(t)?),
                None => Err(ThrottleError::Released),
            },
        )
        .await?
    }

    /// Throttles vCPU `index` alone (see [`HostThrottle::probe`]).
    ///
    /// # Errors
    /// The cgroup's refusal, or a released throttle.
    pub async fn probe(&self, index: usize, throttle: f64) -> Result<bool, ThrottleError> {
        self.with(move |t| t.probe(index, throttle)).await
    }

    /// Lifts the probe (see [`HostThrottle::end_probe`]).
    ///
    /// # Errors
    /// The cgroup's refusal, or a released throttle.
    pub async fn end_probe(&self, index: usize) -> Result<bool, ThrottleError> {
        self.with(move |t| t.end_probe(index)).await
    }

    /// Throttles only these vCPUs from now on (see [`HostThrottle::select`]).
    ///
    /// # Errors
    /// The cgroup's refusal, or a released throttle.
    pub async fn select(&self, indices: Vec<usize>) -> Result<bool, ThrottleError> {
        self.with(move |t| t.select(&indices)).await
    }
}

/// The vCPU threads of one QEMU in a cgroup with a CPU quota, held on a
/// lease ([`lease`]).
///
/// Above 99 % the quota period grows (up to 1 s, so the quota stays at
/// least 1 ms), and a vCPU thread may then wait most of a period before it
/// runs again: if QEMU switched over then, stopping the vCPUs would stretch
/// the downtime by up to a second. [`VcpuThrottle::slow_to_stop`] says so,
/// and the watcher switches over itself (see [`crate::perform`]).
#[derive(Debug)]
pub struct HostVcpuThrottle {
    inner: Arc<Mutex<Option<HostThrottle>>>,
    lease: Option<Lease>,
    pid: u32,
    threads: Vec<u32>,
}

fn apply(inner: &Mutex<Option<HostThrottle>>, throttle: f64) -> Result<(), ThrottleError> {
    match inner.lock().expect("throttle lock").as_mut() {
        Some(t) => Ok(t.set(throttle)?),
        None => Err(ThrottleError::Released),
    }
}

/// Where and under whose name an agent throttles from the host.
#[derive(Debug, Clone)]
pub struct HostPlace {
    /// The cgroup hierarchy's root (v2) or the v1 `cpu` controller.
    pub root: PathBuf,
    /// The agent's scope under `ROOT/livemig/`.
    pub scope: String,
    /// The program that holds the lease (`livemigd`), if any: without one
    /// the host throttle is not used.
    pub guard: Option<PathBuf>,
    /// How long a throttle outlives the agent's last renewal.
    pub lease: std::time::Duration,
}

impl HostVcpuThrottle {
    /// Prepares a cgroup named `name` in the agent's scope for the vCPU
    /// threads (they enter it with the first quota), and starts the guard
    /// that holds its lease.
    ///
    /// # Errors
    /// Why the host cannot throttle threads.
    pub async fn attach(
        place: &HostPlace,
        name: String,
        pid: u32,
        threads: Vec<u32>,
    ) -> Result<Self, ThrottleError> {
        let guard = place.guard.clone().ok_or(ThrottleError::NoGuard)?;
        let root = place.root.clone();
        let scope = place.scope.clone();
        let (inner, hierarchy) = {
            let name = name.clone();
            let threads = threads.clone();
            tokio::task::spawn_blocking(move || {
                let hierarchy = Hierarchy::probe(&root)?;
                HostThrottle::attach(&hierarchy, &scope, &name, pid, &threads)
                    .map(|t| (t, hierarchy))
            })
            .await??
        };
        // Nothing is throttled yet: without a lease, nothing will be.
        let lease = match Lease::take(&guard, hierarchy.root(), &place.scope, &name, place.lease) {
            Ok(lease) => lease,
            Err(source) => {
                let _ = tokio::task::spawn_blocking(move || inner.release()).await;
                return Err(ThrottleError::Lease {
                    program: guard,
                    source,
                });
            }
        };
        Ok(HostVcpuThrottle {
            inner: Arc::new(Mutex::new(Some(inner))),
            lease: Some(lease),
            pid,
            threads,
        })
    }
}

impl VcpuThrottle for HostVcpuThrottle {
    fn kind(&self) -> &'static str {
        "host"
    }

    fn max(&self) -> f64 {
        MAX_HOST_THROTTLE
    }

    fn set(&mut self, throttle: f64) -> BoxFuture<'_, Result<(), ThrottleError>> {
        Box::pin(async move {
            let inner = self.inner.clone();
            tokio::task::spawn_blocking(move || apply(&inner, throttle)).await?
        })
    }

    fn release(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let inner = self.inner.clone();
            let _ = tokio::task::spawn_blocking(move || {
                if let Some(t) = inner.lock().expect("throttle lock").take() {
                    t.release();
                }
            })
            .await;
            // Lifted by us: the guard may go.
            if let Some(lease) = self.lease.take() {
                lease.end().await;
            }
        })
    }

    fn slow_to_stop(&self, throttle: f64) -> bool {
        throttle > LONG_PERIOD_ABOVE
    }

    fn acts_before_migration(&self) -> bool {
        true
    }

    fn selector(&self) -> Option<VcpuSelector> {
        Some(VcpuSelector {
            inner: self.inner.clone(),
            pid: self.pid,
            threads: self.threads.clone(),
        })
    }

    fn cpu_use(&self) -> Option<CpuUse> {
        let selected = self
            .inner
            .lock()
            .expect("throttle lock")
            .as_ref()?
            .selected();
        let times = writers::thread_cpu_times(self.pid, &self.threads);
        let cpu_ns: u64 = selected
            .iter()
            .map(|&i| times.get(i).copied().flatten())
            .sum::<Option<u64>>()?;
        Some(CpuUse {
            cpu: std::time::Duration::from_nanos(cpu_ns),
            min_slice: MIN_SLICE * selected.len().max(1) as u32,
        })
    }
}

/// QEMU's auto-converge throttle, steered: the capability is on for the
/// job (see [`crate::settings::ThrottleVia::Qemu`]) and the parameters
/// make QEMU jump to (or fall to) the requested level at its next trigger.
#[derive(Debug)]
pub struct QemuVcpuThrottle {
    qmp: Client,
}

impl QemuVcpuThrottle {
    /// Steers the throttle of the QEMU behind `qmp`.
    pub fn new(qmp: Client) -> Self {
        QemuVcpuThrottle { qmp }
    }
}

impl VcpuThrottle for QemuVcpuThrottle {
    fn kind(&self) -> &'static str {
        "qemu"
    }

    fn max(&self) -> f64 {
        MAX_QEMU_THROTTLE
    }

    fn set(&mut self, throttle: f64) -> BoxFuture<'_, Result<(), ThrottleError>> {
        Box::pin(async move {
            self.qmp
                .execute(&MigrateSetParameters(qemu_throttle_parameters(throttle)))
                .await?;
            Ok(())
        })
    }

    fn release(&mut self) -> BoxFuture<'_, ()> {
        // QEMU stops its throttle itself when the migration ends; the
        // parameters are restored with the job's other settings.
        Box::pin(async {})
    }
}

/// The throttle for an adaptive job on the QEMU behind `qmp` (process
/// `pid`): a cgroup named `name` in the agent's `place` when this host
/// allows it, else QEMU's own throttle (which the job's settings must then
/// turn on: the [`ThrottleVia`] says so).
pub async fn attach(
    qmp: &Client,
    place: &HostPlace,
    name: String,
    pid: u32,
) -> (Box<dyn VcpuThrottle>, ThrottleVia) {
    let threads: Vec<u32> = match qmp.execute(&QueryCpusFast).await {
        Ok(cpus) => cpus.iter().map(|c| c.thread_id as u32).collect(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot list vCPU threads; using QEMU's throttle");
            Vec::new()
        }
    };
    if !threads.is_empty() {
        match HostVcpuThrottle::attach(place, name, pid, threads).await {
            Ok(host) => return (Box::new(host), ThrottleVia::NotQemu),
            Err(e) => tracing::warn!(
                error = %types::error_chain(&e),
                "no host throttle; using QEMU's"
            ),
        }
    }
    (
        Box::new(QemuVcpuThrottle::new(qmp.clone())),
        ThrottleVia::Qemu,
    )
}

/// Which mechanism an adaptive job on this host would throttle with, and
/// why: the host's cgroup when it has a `cpu` controller we may write (and
/// a guard for the lease), else QEMU's own throttle.
pub fn available(place: &HostPlace) -> protocol::host::ThrottleMechanism {
    let host = match (Hierarchy::probe(&place.root), &place.guard) {
        (Ok(hierarchy), Some(_)) => Ok(hierarchy),
        (Ok(_), None) => Err("no guard program for the throttle's lease".to_string()),
        (Err(e), _) => Err(e.to_string()),
    };
    match host {
        Ok(hierarchy) => protocol::host::ThrottleMechanism {
            kind: "host".into(),
            max_throttle_pct: MAX_HOST_THROTTLE * 100.0,
            detail: format!(
                "each vCPU thread under a CPU quota of its own ({} at {}), held on a {} s \
                 lease; with several vCPUs, only the ones found writing",
                hierarchy.describe(),
                hierarchy.root().display(),
                place.lease.as_secs_f64()
            ),
        },
        Err(why) => protocol::host::ThrottleMechanism {
            kind: "qemu".into(),
            max_throttle_pct: MAX_QEMU_THROTTLE * 100.0,
            detail: format!("QEMU's own throttle (up to 99 %): {why}"),
        },
    }
}
