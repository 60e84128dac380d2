//! The watcher's state, and its bookkeeping: the timeline, the published
//! progress, the limits in force, the throttle's release.

use std::time::Duration;

use converge::controller::{Policy, State};
use converge::estimate::fit;
use converge::stall::stalled;
use converge::DirtyModel;
use protocol::job::{ActionKind, JobStats, TimedAction};
use protocol::ConvergeMode;
use qmp::commands::migration::{MigrateSetParameters, MigrationParameters, QueryMigrate};
use qmp::Client;
use tokio::sync::{mpsc, watch as channel};
use tokio::time::Instant;
use types::units::mib;
use types::{Bandwidth, Throttle};

use super::ending::CancelReason;
use super::{ms_since, Progress, RetuneError, WatchOptions};
use crate::vcpu_throttle::writers::{self, HostProbe, Writers};
use crate::vcpu_throttle::{VcpuSelector, VcpuThrottle};

/// Passes without a new low, at the highest throttle on the writers alone,
/// before every vCPU is throttled.
const WIDEN_AFTER_PASSES: usize = 3;

/// What the pre-flight learns while the first pass runs, as it comes in.
#[derive(Debug)]
pub(super) enum Preflight {
    /// The dirty rate measured, and its description.
    Model(DirtyModel, String),
    /// Looking for the vCPUs that write, probing this many busy ones
    /// (multi-vCPU guests under a host throttle).
    SearchingWriters(usize),
    /// Which vCPUs write; `None` if the search had to stop.
    Writers(Option<Writers>),
}

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
    /// The throttled vCPUs' CPU time at the last sync, where the throttle
    /// can tell.
    pub cpu_at_sync: Option<std::time::Duration>,
    pub postcopy_requested: bool,
    preflight: Option<mpsc::UnboundedReceiver<Preflight>>,
    /// The writers' search is probing this many vCPUs: the controller's first
    /// throttle waits for it (a throttle would stop it).
    pub searching_writers: Option<usize>,
    /// The controller has said once that it waits for the search.
    pub deferred_for_writers: bool,
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
            let client = qmp.clone();
            let ram = options.ram_bytes as f64;
            // The writers are only looked for when a throttle is likely:
            // a probe slows a vCPU for a second.
            let selector = throttle
                .as_ref()
                .and_then(|t| t.selector())
                .filter(|s| s.threads.len() > 1);
            let link = options.bandwidth_cap.map(Bandwidth::as_f64);
            tokio::spawn(preflight(client, ram, selector, link, tx));
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
            cpu_at_sync: None,
            postcopy_requested: false,
            preflight,
            searching_writers: None,
            deferred_for_writers: false,
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
        self.limits
            .bandwidth
            .map(Bandwidth::as_f64)
            .or(measured)
            .unwrap_or(1e9)
    }

    /// Takes what the first-pass measurement found, as it comes in.
    pub async fn take_preflight(&mut self) {
        while let Some(rx) = self.preflight.as_mut() {
            match rx.try_recv() {
                Ok(Preflight::Model(model, detail)) => {
                    self.record(ActionKind::Measure, Some(mib(model.rate)), detail);
                    if let Some((state, _)) = self.controller.as_mut() {
                        if state.model.rate == 0.0 {
                            state.model = model;
                        }
                    }
                    self.predict(model);
                }
                Ok(Preflight::SearchingWriters(busy)) => self.searching_writers = Some(busy),
                Ok(Preflight::Writers(Some(found))) => {
                    self.searching_writers = None;
                    self.throttle_writers(found).await;
                }
                Ok(Preflight::Writers(None)) => {
                    self.searching_writers = None;
                    self.record(
                        ActionKind::Writers,
                        None,
                        "the search for the vCPUs that write stopped (a throttle came first or \
                         a measurement failed): every vCPU is throttled"
                            .into(),
                    );
                }
                Err(mpsc::error::TryRecvError::Empty) => return,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    self.preflight = None;
                    self.searching_writers = None;
                }
            }
        }
    }

    /// Narrows the throttle to the vCPUs found writing.
    async fn throttle_writers(&mut self, found: Writers) {
        let Some(selector) = self.throttle.as_ref().and_then(|t| t.selector()) else {
            return;
        };
        let count = found.writers.len();
        if count == selector.threads.len() {
            self.record(ActionKind::Writers, Some(count as f64), found.describe());
            return;
        }
        match selector.select(found.writers.clone()).await {
            Ok(true) => {
                self.narrowed = true;
                self.record(ActionKind::Writers, Some(count as f64), found.describe());
            }
            Ok(false) => {}
            Err(e) => self.record(
                ActionKind::Writers,
                None,
                format!("every vCPU stays throttled: {}", types::error_chain(&e)),
            ),
        }
    }

    /// Predicts the job's total time from the pre-flight `model`, to be
    /// set against the outcome in the record (on a capped link only: the
    /// link's speed is otherwise unknown this early).
    fn predict(&mut self, model: converge::model::DirtyModel) {
        let (Some((mode, policy)), Some(link)) = (self.options.forecast, self.limits.bandwidth)
        else {
            return;
        };
        let outlook = converge::estimate::predict(
            model,
            crate::estimate::first_pass_bytes(
                self.options.ram_bytes,
                self.options.ram_in_use_bytes,
            ),
            link.as_f64(),
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

/// QEMU's own figure for the migration's throughput, bytes/s.
async fn measured_link(qmp: &Client) -> Option<f64> {
    let info = qmp.execute(&QueryMigrate).await.ok()?;
    crate::job::stats_from_qemu(&info)
        .bandwidth_mib_s
        .filter(|b| *b > 0.0)
        .map(|b| b * types::MIB as f64)
}

/// Measures the dirty rate over 1 s and 2 s windows and fits the model;
/// then, with a `selector` (a host throttle of several vCPUs) and a guest
/// dirtying more than half the link (the cap, else QEMU's throughput),
/// finds which vCPUs write.
async fn preflight(
    qmp: Client,
    ram_bytes: f64,
    selector: Option<VcpuSelector>,
    link: Option<f64>,
    tx: mpsc::UnboundedSender<Preflight>,
) {
    let cpu_before = selector.as_ref().map(writers::cpu_times);
    let started = Instant::now();
    let Ok(samples) = crate::dirty::measure(&qmp, &[1, 2]).await else {
        return;
    };
    let Some(model) = fit(&samples, ram_bytes) else {
        return;
    };
    let _ = tx.send(Preflight::Model(
        model,
        crate::dirty::describe(&samples, &model),
    ));
    // Uncapped, QEMU's throughput so far stands for the link (it reads low
    // while the first pass skims zero pages: the search runs rather more
    // often than needed, never less).
    let link = match link {
        Some(cap) => Some(cap),
        None => measured_link(&qmp).await,
    };
    let (Some(selector), Some(before), Some(link)) = (selector, cpu_before, link) else {
        return;
    };
    if model.rate <= link / 2.0 {
        return;
    }
    let probe = HostProbe {
        selector: &selector,
        qmp: &qmp,
    };
    let found = writers::find(
        &probe,
        &before,
        started.elapsed(),
        samples[0].dirtied,
        |busy| {
            let _ = tx.send(Preflight::SearchingWriters(busy));
        },
    )
    .await;
    let _ = tx.send(Preflight::Writers(found));
}
