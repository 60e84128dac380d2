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
use std::sync::{Arc, Mutex};

use converge::throttle::{HostThrottle, LONG_PERIOD_ABOVE, MAX_HOST_THROTTLE};
use qmp::commands::migration::MigrateSetParameters;
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

fn apply(inner: &Mutex<Option<HostThrottle>>, throttle: f64) -> Result<(), String> {
    match inner.lock().expect("throttle lock").as_mut() {
        Some(t) => t.set(throttle).map_err(|e| protocol_chain(&e)),
        None => Err("the host throttle was already released".into()),
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
    ) -> Result<Self, String> {
        let inner = tokio::task::spawn_blocking(move || {
            HostThrottle::attach(&controller, &name, pid, &threads)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| protocol_chain(&e))?;
        Ok(HostVcpuThrottle {
            inner: Arc::new(Mutex::new(Some(inner))),
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
            let inner = self.inner.clone();
            tokio::task::spawn_blocking(move || apply(&inner, throttle))
                .await
                .map_err(|e| e.to_string())?
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
