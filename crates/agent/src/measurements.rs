//! The last dirty-rate measurement of each running guest. An `estimate`
//! that accepts one of some age (a drain's survey) answers at once rather
//! than measuring for seconds, and a loop measures the idle guests every
//! `--measure-every` so that one is at hand when a drain begins.
//!
//! QEMU runs one dirty-rate measurement at a time: the lock around the
//! kept measurement is held while measuring, so a second request waits for
//! the first and takes its result, a migration waits for one in progress
//! before its own pre-flight measures (`recent`), and so does a user's
//! `domdirtyrate-calc` (`settle`).

use std::sync::Arc;
use std::time::Duration;

use migration::estimate::{EstimateError, Measurement};
use qmp::commands::vm::{QueryStatus, RunState};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::running::RunningVm;
use crate::state::Agent;

/// How old a measurement may be to start a migration's controller from:
/// the job measures again within seconds and the controller corrects
/// from each pass, so a guess from half a minute ago beats none for the
/// first decisions of a short first pass.
pub(crate) const KNOWN_FOR_A_JOB: Duration = Duration::from_secs(30);

/// One guest's last measurement.
#[derive(Debug, Default)]
pub(crate) struct Kept {
    last: Mutex<Option<Arc<Measurement>>>,
}

impl Kept {
    /// The last measurement when it is at most `max_age` old; otherwise a
    /// new one.
    ///
    /// # Errors
    /// [`EstimateError`] when QEMU cannot measure.
    pub async fn fresh_or_measure(
        &self,
        vm: &RunningVm,
        max_age: Option<Duration>,
    ) -> Result<Arc<Measurement>, EstimateError> {
        let mut last = self.last.lock().await;
        if let (Some(max_age), Some(kept)) = (max_age, last.as_ref()) {
            if kept.age() <= max_age {
                return Ok(kept.clone());
            }
        }
        let measured =
            Arc::new(migration::estimate::measure(vm.process.qmp(), vm.spec.ram.bytes).await?);
        *last = Some(measured.clone());
        Ok(measured)
    }

    /// Measures again if the last measurement is older than `every`,
    /// `still_idle` says no migration took the guest meanwhile (checked
    /// under the lock: a migration that begins after it waits in
    /// [`Kept::recent`]) and the guest runs (a paused one would read as
    /// idle).
    async fn refresh(&self, vm: &RunningVm, every: Duration, still_idle: impl FnOnce() -> bool) {
        let mut last = self.last.lock().await;
        if last.as_ref().is_some_and(|m| m.age() < every) || !still_idle() {
            return;
        }
        let running = matches!(
            vm.process.qmp().execute(&QueryStatus).await,
            Ok(s) if s.status == RunState::Running
        );
        if !running {
            return;
        }
        match migration::estimate::measure(vm.process.qmp(), vm.spec.ram.bytes).await {
            Ok(measured) => *last = Some(Arc::new(measured)),
            // A user's own `domdirtyrate-calc` holds QEMU's measurement:
            // the next round tries again.
            Err(e) => {
                tracing::debug!(error = %types::error_chain(&e), "background dirty-rate measurement skipped")
            }
        }
    }

    /// Drops the last measurement (after one in progress has ended): a
    /// guest just paused or resumed no longer dirties as it was measured.
    pub async fn forget(&self) {
        self.last.lock().await.take();
    }

    /// Waits for a measurement in progress to end.
    pub async fn settle(&self) {
        drop(self.last.lock().await);
    }

    /// The last measurement if it is at most `max_age` old, once any in
    /// progress has ended (a migration's pre-flight measures next, and
    /// QEMU runs one measurement at a time).
    pub async fn recent(&self, max_age: Duration) -> Option<migration::perform::Known> {
        let last = self.last.lock().await;
        last.as_ref()
            .filter(|m| m.age() <= max_age)
            .map(|m| migration::perform::Known {
                samples: m.samples().to_vec(),
                age: m.age(),
            })
    }
}

/// Guests measured at once by the loop: each measurement is QEMU's
/// sampling of a few hundred pages, cheap, but not free on a busy host.
const AT_ONCE: usize = 4;

/// Measures every idle guest whose last measurement is older than
/// `every`, every `every`, until `stop`.
pub(crate) fn keep_fresh(
    agent: Arc<Agent>,
    every: Duration,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let permits = Arc::new(tokio::sync::Semaphore::new(AT_ONCE));
        let mut round = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(every) => {}
            }
            for view in agent.table.all() {
                let Ok(vm) = agent.table.idle_vm(&view.name) else {
                    continue;
                };
                let (agent, name, permits) = (agent.clone(), view.name.clone(), permits.clone());
                round.spawn(async move {
                    let Ok(_permit) = permits.acquire_owned().await else {
                        return;
                    };
                    let run_id = vm.run_id;
                    vm.measurements
                        .refresh(&vm, every, || {
                            agent
                                .table
                                .idle_vm(&name)
                                .is_ok_and(|now| now.run_id == run_id)
                        })
                        .await;
                });
            }
            // A round ends before the next begins: a slow QEMU does not
            // pile measurements up.
            tokio::select! {
                () = stop.cancelled() => break,
                () = async { while round.join_next().await.is_some() {} } => {}
            }
        }
        round.abort_all();
    })
}
