//! The two ways the adaptive controller can slow a guest's vCPUs.
//!
//! - [`HostVcpuThrottle`]: a CPU quota on the vCPU threads from the host
//!   ([`cgroup`]); immediate, up to 99.9 %, and it can come back down.
//! - [`QemuVcpuThrottle`]: QEMU's own auto-converge throttle, steered
//!   through its parameters; up to 99 %, and it only moves at QEMU's next
//!   trigger (a sync at least a second after the last check).

pub mod cgroup;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use qmp::commands::migration::MigrateSetParameters;
use qmp::commands::vm::QueryCpusFast;
use qmp::Client;

use crate::settings::{qemu_throttle_parameters, ThrottleVia};
use cgroup::{HostThrottle, LONG_PERIOD_ABOVE, MAX_HOST_THROTTLE};

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
    /// Under `throttle`, a vCPU may take long to stop when QEMU asks (at
    /// switchover); setting any throttle lets it run at once.
    fn slow_to_stop(&self, throttle: f64) -> bool {
        let _ = throttle;
        false
    }
}

/// The vCPU threads of one QEMU in a cgroup with a CPU quota.
///
/// Above 99 % the quota period grows (up to 1 s, so the quota stays at
/// least 1 ms), and a vCPU thread may then wait most of a period before it
/// runs again: if QEMU switched over then, stopping the vCPUs would stretch
/// the downtime by up to a second. [`VcpuThrottle::slow_to_stop`] says so,
/// and the watcher switches over itself (see [`crate::perform`]).
#[derive(Debug)]
pub struct HostVcpuThrottle {
    inner: Arc<Mutex<Option<HostThrottle>>>,
}

fn apply(inner: &Mutex<Option<HostThrottle>>, throttle: f64) -> Result<(), ThrottleError> {
    match inner.lock().expect("throttle lock").as_mut() {
        Some(t) => Ok(t.set(throttle)?),
        None => Err(ThrottleError::Released),
    }
}

impl HostVcpuThrottle {
    /// Moves the vCPU threads into a cgroup named `name` under `controller`.
    ///
    /// # Errors
    /// Why the host cannot throttle threads.
    pub async fn attach(
        controller: PathBuf,
        name: String,
        pid: u32,
        threads: Vec<u32>,
    ) -> Result<Self, ThrottleError> {
        let inner = tokio::task::spawn_blocking(move || {
            HostThrottle::attach(&controller, &name, pid, &threads)
        })
        .await??;
        Ok(HostVcpuThrottle {
            inner: Arc::new(Mutex::new(Some(inner))),
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
        })
    }

    fn slow_to_stop(&self, throttle: f64) -> bool {
        throttle > LONG_PERIOD_ABOVE
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
/// `pid`): a cgroup named `name` under `controller` when this host allows
/// it, else QEMU's own throttle (which the job's settings must then turn
/// on: the [`ThrottleVia`] says so).
pub async fn attach(
    qmp: &Client,
    controller: &Path,
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
        match HostVcpuThrottle::attach(controller.to_path_buf(), name, pid, threads).await {
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

/// The highest throttle this host can apply to a guest: the host
/// mechanism's when the cgroup `controller` is there, else QEMU's.
pub fn max_available(controller: &Path) -> f64 {
    if HostThrottle::available(controller) {
        MAX_HOST_THROTTLE
    } else {
        MAX_QEMU_THROTTLE
    }
}
