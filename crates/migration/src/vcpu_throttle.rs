//! The two ways the adaptive controller can slow a guest's vCPUs.
//!
//! - [`HostVcpuThrottle`]: a CPU quota on the vCPU threads from the host
//!   (cgroup); immediate, up to 99.9 %, and it can come back down.
//! - [`QemuVcpuThrottle`]: QEMU's own auto-converge throttle, steered
//!   through its parameters; up to 99 %, and it only moves at QEMU's next
//!   trigger (a sync at least a second after the last check).

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use converge::throttle::{HostThrottle, LONG_PERIOD_ABOVE, MAX_HOST_THROTTLE};
use qmp::commands::migration::{MigrateSetParameters, MigrationStatus, QueryMigrate};
use qmp::commands::vm::QueryStatus;
use qmp::Client;

use crate::settings::qemu_throttle_parameters;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A way to throttle a guest's vCPUs.
pub trait VcpuThrottle: Send {
    /// For job timelines: "host" or "qemu".
    fn kind(&self) -> &'static str;
    /// The highest throttle this mechanism can apply.
    fn max(&self) -> f64;
    /// Applies a throttle (0 = none).
    fn set(&mut self, throttle: f64) -> BoxFuture<'_, Result<(), String>>;
    /// Lifts the throttle for good; called the moment the job ends.
    fn release(&mut self) -> BoxFuture<'_, ()>;
}

/// The vCPU threads of one QEMU in a cgroup with a CPU quota.
///
/// Above 99 % the quota period grows (up to 1 s, so the quota stays at
/// least 1 ms), and a vCPU thread may then wait most of a period before it
/// runs again. When QEMU switches over it stops the vCPUs and waits for each
/// to answer — with the big QEMU lock held, so QMP goes quiet. A guard task
/// watches for that: if QMP does not answer within [`STALL`] while such a
/// throttle is on, the throttle drops to [`LONG_PERIOD_ABOVE`] at once (so
/// the stop, and the downtime, are not stretched), and goes back up if the
/// migration turns out to be still copying.
///
/// Not to zero: QMP also goes quiet for tens of milliseconds at every
/// dirty-bitmap sync, and a hot writer let loose that long dirties more
/// than a switchover may leave behind, pass after pass. Writing the new
/// quota refills the period's runtime, so a waiting vCPU thread runs at
/// once either way; the short period then bounds any further wait.
#[derive(Debug)]
pub struct HostVcpuThrottle {
    inner: Arc<Mutex<Option<HostThrottle>>>,
    /// The throttle asked for, as f64 bits.
    target: Arc<AtomicU64>,
    guard: Option<tokio::task::JoinHandle<()>>,
}

/// How long QMP may be silent before a long-period throttle is lifted.
const STALL: Duration = Duration::from_millis(60);
const PROBE_INTERVAL: Duration = Duration::from_millis(20);

fn apply(inner: &Mutex<Option<HostThrottle>>, throttle: f64) -> Result<(), String> {
    match inner.lock().expect("throttle lock").as_mut() {
        Some(t) => t.set(throttle).map_err(|e| protocol_chain(&e)),
        None => Err("the host throttle was already released".into()),
    }
}

async fn guard(qmp: Client, inner: Arc<Mutex<Option<HostThrottle>>>, target: Arc<AtomicU64>) {
    loop {
        tokio::time::sleep(PROBE_INTERVAL).await;
        let wanted = f64::from_bits(target.load(Ordering::Relaxed));
        if wanted <= LONG_PERIOD_ABOVE {
            continue;
        }
        if tokio::time::timeout(STALL, qmp.execute(&QueryStatus))
            .await
            .is_ok()
        {
            continue;
        }
        // QMP is stuck: QEMU is syncing the dirty bitmap or stopping the
        // vCPUs.
        let lift = inner.clone();
        let _ = tokio::task::spawn_blocking(move || apply(&lift, LONG_PERIOD_ABOVE)).await;
        tracing::debug!(
            "QMP stalled under a long-period vCPU throttle: short period while QEMU holds its lock"
        );
        // Once QMP answers again, put it back if the copy goes on.
        let status = loop {
            match tokio::time::timeout(Duration::from_secs(5), qmp.execute(&QueryMigrate)).await {
                Ok(Ok(info)) => break info.status,
                Ok(Err(_)) => return,
                Err(_) => continue,
            }
        };
        if status == Some(MigrationStatus::Active) {
            let wanted = f64::from_bits(target.load(Ordering::Relaxed));
            let back = inner.clone();
            let _ = tokio::task::spawn_blocking(move || apply(&back, wanted)).await;
            tracing::debug!(
                throttle = wanted,
                "migration still copying: throttle restored"
            );
        } else {
            return;
        }
    }
}

impl HostVcpuThrottle {
    /// Moves the vCPU threads into a cgroup named `name` under `controller`;
    /// `qmp` is the QEMU's monitor, for the stall guard.
    ///
    /// # Errors
    /// Why the host cannot throttle threads.
    pub async fn attach(
        controller: PathBuf,
        name: String,
        pid: u32,
        threads: Vec<u32>,
        qmp: Client,
    ) -> Result<Self, String> {
        let inner = tokio::task::spawn_blocking(move || {
            HostThrottle::attach(&controller, &name, pid, &threads)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| protocol_chain(&e))?;
        let inner = Arc::new(Mutex::new(Some(inner)));
        let target = Arc::new(AtomicU64::new(0f64.to_bits()));
        let guard = tokio::spawn(guard(qmp, inner.clone(), target.clone()));
        Ok(HostVcpuThrottle {
            inner,
            target,
            guard: Some(guard),
        })
    }
}

fn protocol_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

impl VcpuThrottle for HostVcpuThrottle {
    fn kind(&self) -> &'static str {
        "host"
    }

    fn max(&self) -> f64 {
        MAX_HOST_THROTTLE
    }

    fn set(&mut self, throttle: f64) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            self.target.store(throttle.to_bits(), Ordering::Relaxed);
            let inner = self.inner.clone();
            tokio::task::spawn_blocking(move || apply(&inner, throttle))
                .await
                .map_err(|e| e.to_string())?
        })
    }

    fn release(&mut self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Some(guard) = self.guard.take() {
                guard.abort();
            }
            let inner = self.inner.clone();
            let _ = tokio::task::spawn_blocking(move || {
                if let Some(t) = inner.lock().expect("throttle lock").take() {
                    t.release();
                }
            })
            .await;
        })
    }
}

impl Drop for HostVcpuThrottle {
    fn drop(&mut self) {
        if let Some(guard) = self.guard.take() {
            guard.abort();
        }
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
    pub fn new(qmp: Client) -> Self {
        QemuVcpuThrottle { qmp }
    }
}

impl VcpuThrottle for QemuVcpuThrottle {
    fn kind(&self) -> &'static str {
        "qemu"
    }

    fn max(&self) -> f64 {
        0.99
    }

    fn set(&mut self, throttle: f64) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async move {
            self.qmp
                .execute(&MigrateSetParameters(qemu_throttle_parameters(throttle)))
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    }

    fn release(&mut self) -> BoxFuture<'_, ()> {
        // QEMU stops its throttle itself when the migration ends; the
        // parameters are restored with the job's other settings.
        Box::pin(async {})
    }
}
