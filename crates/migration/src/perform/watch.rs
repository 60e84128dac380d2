//! The watcher's state, and its bookkeeping: the timeline, the published
//! progress, the limits in force, the throttle's release.

use std::time::Duration;

use converge::controller::{Policy, State};
use converge::stall::stalled;
use protocol::job::{ActionKind, JobStats, TimedAction};
use protocol::ConvergeMode;
use qmp::commands::migration::{MigrateSetParameters, MigrationParameters};
use qmp::Client;
use tokio::sync::{mpsc, watch as channel};
use tokio::time::Instant;
use types::{Bandwidth, Throttle};

use super::ending::CancelReason;
use super::preflight::{preflight, Preflight, PreflightPlan, Probing};
use super::{ms_since, Progress, RetuneError, WatchOptions};
use crate::vcpu_throttle::VcpuThrottle;

/// Passes without a new low, at the highest throttle on the writers alone,
/// before every vCPU is throttled.
const WIDEN_AFTER_PASSES: usize = 3;

/// The limits the job runs under.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    /// The user's downtime limit (QEMU has 1 ms while the switchover is
    /// held).
    pub downtime: Duration,
    /// The bandwidth cap (`--bandwidth`, then `migrate-setspeed`).
    pub bandwidth: Option<Bandwidth>,
    /// QEMU's switchover is held back (see the module docs).
    pub held: bool,
}

/// The loop's state.
pub(super) struct Watch<'a> {
    pub qmp: &'a Client,
    pub options: &'a WatchOptions,
    progress: &'a channel::Sender<Progress>,
    pub started: Instant,
    /// Where the timeline's times count from (`Progress::timeline_origin`).
    pub origin: Instant,
    pub limits: Limits,
    /// The mechanism the controller throttles with, until released.
    pub throttle: Option<Box<dyn VcpuThrottle>>,
    /// Some throttle was applied during the job.
    pub throttled: bool,
    /// The controller's state and policy (with the limits in force).
    pub controller: Option<(State, Policy)>,
    /// Bytes left after each sync, for the stall check.
    pub history: Vec<f64>,
    pub last_iteration: u64,
    pub last_sync: Instant,
    /// What the last poll saw left to send, and at what rate.
    pub left_at_poll: Option<(f64, f64)>,
    /// Passes near the end that were all too short to count, so far.
    pub hover: Option<super::steer::Hover>,
    /// Bytes sent and left at the last sync.
    pub at_last_sync: (f64, f64),
    /// The pass in which a held switchover was last tried between syncs
    /// (once a pass: a refused `stop` is not retried at every poll).
    pub mid_pass_tried: u64,
    /// The throttled vCPUs' CPU time at the last sync, where the throttle
    /// can tell.
    pub cpu_at_sync: Option<std::time::Duration>,
    pub postcopy_requested: bool,
    pub preflight: Option<mpsc::UnboundedReceiver<Preflight>>,
    /// The pre-flight is probing vCPUs: the controller's first throttle
    /// waits for it (a throttle would stop the probes).
    pub probing: Option<Probing>,
    /// The last probe the controller said it waits for (said once each).
    pub said_waiting: Option<Probing>,
    /// A sync the controller waited on a probe to decide: decided when
    /// the probe ends rather than at the next sync, a whole pass later.
    pub deferred_sync: Option<super::steer::SyncSeen>,
    /// The throttle applies to the vCPUs found writing, not to all.
    pub narrowed: bool,
    pub timeout_done: bool,
    /// Why and when we asked QEMU to cancel.
    pub cancelling: Option<(CancelReason, Instant)>,
    /// A domjobabort arrived during post-copy and was turned down.
    pub cancel_refused: bool,
    /// When the watcher paused the guest to switch over.
    pub paused_at: Option<Instant>,
    /// QEMU was let go on from `pre-switchover`.
    pub switchover_continued: bool,
    /// The disks' mirrors failed to complete at switchover.
    pub storage_failed: Option<crate::storage::StorageError>,
    /// The mirrors' rates while the memory moves (measured only).
    pub disk_rates: crate::storage::pace::DiskPace,
}

impl<'a> Watch<'a> {
    pub fn new(
        qmp: &'a Client,
        options: &'a WatchOptions,
        progress: &'a channel::Sender<Progress>,
        throttle: Option<Box<dyn VcpuThrottle>>,
    ) -> Self {
        let started = Instant::now();
        let mut origin = started;
        progress.send_modify(|p| {
            origin = *p.timeline_origin.get_or_insert(started);
            p.bandwidth_limit = options.bandwidth_cap;
            p.downtime_limit = Some(options.downtime);
        });
        let preflight = options.preflight.then(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            let plan = PreflightPlan {
                ram_bytes: options.ram_bytes as f64,
                selector: throttle.as_ref().and_then(|t| t.selector()),
                link: options.bandwidth_cap.map(Bandwidth::as_f64),
                // The slice floor matters only where it can change the
                // course: post-copy is the way past it.
                probe_slice: options.controller.is_some_and(|p| p.allow_postcopy),
                dirty_ring: options.dirty_ring,
                known: options
                    .known
                    .as_ref()
                    .and_then(|k| converge::estimate::fit(&k.samples, options.ram_bytes as f64)),
                downtime: options
                    .controller
                    .map_or(options.downtime.as_secs_f64(), |p| {
                        p.max_downtime.max(options.downtime.as_secs_f64())
                    }),
            };
            tokio::spawn(preflight(qmp.clone(), plan, tx));
            rx
        });
        Watch {
            qmp,
            options,
            progress,
            started,
            origin,
            limits: Limits {
                downtime: options.downtime,
                bandwidth: options.bandwidth_cap,
                held: false,
            },
            throttle,
            throttled: false,
            controller: options
                .controller
                .map(|policy| (State::new(&policy, None), policy)),
            history: Vec::new(),
            last_iteration: 0,
            last_sync: started,
            left_at_poll: None,
            hover: None,
            at_last_sync: (0.0, 0.0),
            mid_pass_tried: 0,
            cpu_at_sync: None,
            postcopy_requested: false,
            preflight,
            probing: None,
            said_waiting: None,
            deferred_sync: None,
            narrowed: false,
            timeout_done: false,
            cancelling: None,
            cancel_refused: false,
            paused_at: None,
            switchover_continued: false,
            storage_failed: None,
            disk_rates: crate::storage::pace::DiskPace::new(0.0),
        }
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Adds an action to the timeline (and the log).
    pub fn record(&self, action: ActionKind, value: Option<f64>, detail: String) {
        let t_ms = ms_since(self.origin);
        tracing::info!(t_ms, %action, ?value, %detail, "job action");
        self.progress.send_modify(|p| {
            p.actions.push(TimedAction {
                t_ms,
                action,
                value,
                detail,
            })
        });
    }

    /// Changes the published progress.
    pub fn update(&self, change: impl FnOnce(&mut Progress)) {
        self.progress.send_modify(change);
    }

    /// The job has switched to post-copy, as far as we know.
    pub fn progress_postcopy_started(&self) -> bool {
        self.progress.borrow().postcopy_started
    }

    /// The throttle in force, as published.
    pub fn throttle_now(&self) -> Throttle {
        self.progress.borrow().throttle
    }

    /// QEMU's figures as last published.
    pub fn last_stats(&self) -> JobStats {
        self.progress.borrow().stats.clone()
    }

    /// Publishes a reading of QEMU's figures and adds it to the timeline.
    pub fn publish(&self, stats: &JobStats) {
        let t_ms = ms_since(self.origin);
        self.progress.send_modify(|p| {
            let qemu = Throttle::from_percent(stats.cpu_throttle_pct.unwrap_or(0) as f64);
            if qemu > p.max_throttle {
                p.max_throttle = qemu;
            }
            p.stats = stats.clone();
            p.sample_at(t_ms);
        });
    }

    /// Sets QEMU's downtime limit (and nothing else).
    pub async fn set_qemu_downtime(&self, limit: Duration) -> Result<(), qmp::Error> {
        set_parameters(self.qmp, downtime(limit)).await
    }

    /// Sets the job's downtime limit; false if QEMU refused it.
    pub async fn set_downtime(&mut self, limit: Duration, why: String) -> bool {
        let ms = limit.as_millis() as f64;
        // While held, QEMU keeps the hold's limit; this one applies when
        // the hold ends.
        if !self.limits.held {
            if let Err(e) = self.set_qemu_downtime(limit).await {
                self.record(ActionKind::Downtime, Some(ms), format!("QEMU refused: {e}"));
                return false;
            }
        }
        self.limits.downtime = limit;
        self.update(|p| p.downtime_limit = Some(limit));
        self.record(ActionKind::Downtime, Some(ms), why);
        true
    }

    /// Applies a bandwidth or downtime limit the user set mid-job.
    pub async fn retune(
        &mut self,
        bandwidth: Option<Bandwidth>,
        downtime: Option<Duration>,
    ) -> Result<(), RetuneError> {
        if let Some(cap) = bandwidth {
            // Paused for livemig's switchover, QEMU sends without the cap;
            // the new one would only slow the stop-and-copy.
            if self.paused_at.is_none() {
                let params = MigrationParameters {
                    max_bandwidth: Some(cap.bytes_per_sec()),
                    max_postcopy_bandwidth: self
                        .options
                        .postcopy_follows_cap
                        .then(|| cap.bytes_per_sec()),
                    ..Default::default()
                };
                set_parameters(self.qmp, params)
                    .await
                    .map_err(RetuneError::Bandwidth)?;
            }
            self.limits.bandwidth = Some(cap);
            self.update(|p| p.bandwidth_limit = Some(cap));
            self.record(
                ActionKind::Bandwidth,
                Some(cap.mib_s() as f64),
                "migrate-setspeed: bandwidth cap changed".into(),
            );
        }
        if let Some(limit) = downtime {
            if !self
                .set_downtime(
                    limit,
                    "migrate-setmaxdowntime: downtime limit changed".into(),
                )
                .await
            {
                return Err(RetuneError::Downtime);
            }
            let secs = limit.as_secs_f64();
            if let Some((state, policy)) = self.controller.as_mut() {
                policy.downtime = secs;
                policy.max_downtime = policy.max_downtime.max(secs);
                state.downtime = secs;
            }
        }
        Ok(())
    }

    /// The link's bandwidth for the controller, bytes/s: the cap when there
    /// is one (QEMU's own figure counts bytes on the wire, so it reads low
    /// while the first pass skims over zero pages), else QEMU's
    /// measurement.
    pub fn bandwidth(&self, stats: &JobStats) -> f64 {
        let measured = stats
            .bandwidth_mib_s
            .filter(|b| *b > 0.0)
            .map(|b| b * types::MIB as f64);
        let link = self
            .limits
            .bandwidth
            .map(Bandwidth::as_f64)
            .or(measured)
            .unwrap_or(1e9);
        memory_rate(link, self.options.compressed, stats)
    }

    /// Predicts the job's total time from the pre-flight `model`, to be
    /// set against the outcome in the record (on a capped link only: the
    /// link's speed is otherwise unknown this early).
    pub fn predict(&mut self, model: converge::model::DirtyModel) {
        let (Some((mode, policy)), Some(link)) = (self.options.forecast, self.limits.bandwidth)
        else {
            return;
        };
        let outlook = converge::estimate::predict(
            model,
            converge::estimate::first_pass_bytes(
                self.options.ram_bytes,
                self.options.ram_in_use_bytes,
            ),
            crate::settings::capped_link(link, self.options.path_bandwidth),
            &policy,
        );
        let of_mode = |o: &converge::estimate::Outlook| match mode {
            ConvergeMode::None => o.none,
            ConvergeMode::Qemu => o.qemu,
            ConvergeMode::Adaptive => o.adaptive,
        };
        let predicted = of_mode(&outlook.measured);
        if !predicted.converges {
            return;
        }
        let worst = outlook
            .worst_case
            .as_ref()
            .map(of_mode)
            .filter(|w| w.converges)
            .map(|w| w.total_secs);
        let prediction = super::Prediction {
            total_secs: predicted.total_secs,
            worst_secs: worst,
        };
        self.update(|p| p.prediction = Some(prediction));
        self.record(
            ActionKind::Measure,
            None,
            match worst {
                Some(worst) => format!(
                    "predicted: completes in {:.1} s ({:.1} s if the guest writes as fast as \
                     the measurement allows)",
                    predicted.total_secs, worst
                ),
                None => format!("predicted: completes in {:.1} s", predicted.total_secs),
            },
        );
    }

    /// The throttle on the writers alone is as high as it goes and the
    /// passes stopped shrinking: some vCPU taken for idle or computing
    /// writes after all (or a writer moved), so every vCPU is throttled
    /// from now on.
    pub async fn widen_if_stalled(&mut self) {
        let Some(throttle) = self.throttle.as_ref() else {
            return;
        };
        let at_max = self.throttle_now().fraction() >= throttle.max() - 1e-6;
        if !self.narrowed || !at_max || !stalled(&self.history, WIDEN_AFTER_PASSES) {
            return;
        }
        let Some(selector) = throttle.selector() else {
            return;
        };
        self.narrowed = false;
        let all: Vec<usize> = (0..selector.threads.len()).collect();
        let count = all.len() as f64;
        match selector.select(all).await {
            Ok(_) => {
                self.history.clear();
                self.record(
                    ActionKind::Writers,
                    Some(count),
                    format!(
                        "no new low in {WIDEN_AFTER_PASSES} passes with the writers at the \
                         highest throttle: every vCPU is throttled"
                    ),
                );
            }
            Err(e) => self.record(
                ActionKind::Writers,
                None,
                format!("cannot throttle every vCPU: {}", types::error_chain(&e)),
            ),
        }
    }

    /// Lifts our throttle; called as soon as QEMU reports the end.
    pub async fn release(&mut self) {
        if let Some(mut throttle) = self.throttle.take() {
            throttle.release().await;
            if self.throttled {
                self.update(|p| p.throttle = Throttle::NONE);
                self.record(
                    ActionKind::Release,
                    Some(0.0),
                    format!("{} throttle lifted", throttle.kind()),
                );
            }
        }
    }
}

pub(super) async fn set_parameters(
    qmp: &Client,
    params: MigrationParameters,
) -> Result<(), qmp::Error> {
    qmp.execute(&MigrateSetParameters(params)).await.map(|_| ())
}

pub(super) fn downtime(limit: Duration) -> MigrationParameters {
    MigrationParameters {
        downtime_limit: Some(limit.as_millis() as u64),
        ..Default::default()
    }
}

/// How fast memory leaves over a link of `link` bytes/s: with compression,
/// faster than the link carries bytes, by the ratio of the pages sent so
/// far to the bytes they took on the wire. The controller compares it
/// with the memory the guest dirties, so the raw link rate would make it
/// throttle a guest whose pages compress for nothing.
pub(super) fn memory_rate(link: f64, compressed: bool, stats: &JobStats) -> f64 {
    let ratio = match (stats.normal_bytes, stats.memory_processed_bytes) {
        (Some(pages), Some(wire)) if compressed && wire > 0 => pages as f64 / wire as f64,
        _ => 1.0,
    };
    link * ratio.max(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressed_pages_leave_faster_than_the_link_carries_bytes() {
        let stats = JobStats {
            normal_bytes: Some(300 << 20),
            memory_processed_bytes: Some(100 << 20),
            ..Default::default()
        };
        let link = 64.0 * 1048576.0;
        assert_eq!(memory_rate(link, true, &stats), 3.0 * link);
        assert_eq!(memory_rate(link, false, &stats), link);
        // Pages that do not compress never count as slower than the link.
        let incompressible = JobStats {
            normal_bytes: Some(90 << 20),
            memory_processed_bytes: Some(100 << 20),
            ..Default::default()
        };
        assert_eq!(memory_rate(link, true, &incompressible), link);
        assert_eq!(memory_rate(link, true, &JobStats::default()), link);
    }
}
