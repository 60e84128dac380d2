//! The source's Perform phase: `migrate`, then watch and steer it to the
//! end.
//!
//! Watching polls `query-migrate`; QEMU's `MIGRATION` events and the
//! `MIGRATION_PASS` event of every dirty-bitmap sync wake the loop early,
//! so each pass is seen right after its sync. At every new pass:
//!
//! - with `--converge adaptive`, the controller ([`converge::decide`])
//!   reads the pass and may change the vCPU throttle, raise the downtime
//!   limit or ask for post-copy;
//! - otherwise, a stall (no new per-pass low for three passes) escalates
//!   by policy: raise the downtime limit to `--max-downtime`, then switch
//!   to post-copy if `--allow-postcopy`.
//!
//! While a host throttle above 99 % is on, a vCPU may wait most of a second
//! for CPU time, and QEMU stops the vCPUs at switchover with the clock of
//! the downtime running. So the watcher holds QEMU's switchover back (a
//! 1 ms downtime limit) and switches over itself: at the sync that leaves
//! little enough, it asks QEMU to `stop` the guest, gives the vCPU threads
//! CPU time at once so they stop promptly, and restores the downtime limit
//! so QEMU completes. The downtime reported then runs from that `stop`.
//!
//! At `--timeout` the timeout action runs (abort, post-copy, suspend). A
//! cancel sends `migrate_cancel` and the loop keeps watching: a late cancel
//! can still end in `completed`, and only QEMU's final state says what
//! happened. Whatever the ending, the vCPU throttle is released the moment
//! QEMU reports it, before anything else. Every action is timestamped in
//! [`Progress::actions`].

use std::time::Duration;

use converge::controller::{self, Action, Observation, Policy, State};
use converge::estimate::fit;
use converge::stall::stalled;
use converge::DirtyModel;
use qmp::commands::migration::{
    Migrate, MigrateCancel, MigrateSetParameters, MigrateStartPostcopy, MigrationParameters,
    MigrationStatus, QueryMigrate,
};
use qmp::commands::vm::Stop;
use qmp::{Client, EventKind};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::flags::TimeoutAction;
use crate::job::{JobStats, Sample, TimedAction};
use crate::settings::Tunables;
use crate::vcpu_throttle::VcpuThrottle;

const MIB: f64 = 1024.0 * 1024.0;
/// Passes without a new low before a non-adaptive job escalates.
const STALL_WINDOW: usize = 3;
/// A pass shorter than this says little about the dirty rate (QEMU syncs
/// again quickly near the end); the controller skips it.
const MIN_PASS_SECS: f64 = 0.5;
/// QEMU's downtime limit while the watcher holds the switchover: QEMU only
/// switches over by itself if a pass dirtied next to nothing.
const HELD_DOWNTIME_MS: u64 = 1;
/// Share of the downtime limit the watcher fills when it switches over:
/// the rest is for what the guest dirties before it stops, and the device
/// state.
const HELD_SWITCHOVER_SHARE: f64 = 0.5;
/// Time for QEMU to take the `stop` request before the vCPUs get CPU time.
const STOP_LEAD: Duration = Duration::from_millis(5);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A new bandwidth or downtime limit for the running job
/// (`migrate-setspeed`, `migrate-setmaxdowntime`). It goes through the
/// watcher rather than straight to QEMU: the controller plans with both,
/// and while the switchover is held QEMU's downtime limit is not the
/// user's.
#[derive(Debug)]
pub struct Retune {
    pub tunables: Tunables,
    /// Told once the change is applied, or why QEMU refused it.
    pub done: oneshot::Sender<Result<(), String>>,
}

/// How to watch a migration.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    pub poll_interval: Duration,
    /// Run the timeout action if not completed after this long.
    pub timeout: Option<Duration>,
    pub timeout_action: TimeoutAction,
    /// Switch to post-copy once the first pass over memory is done.
    pub postcopy_after_precopy: bool,
    /// How long to wait for QEMU to settle after `migrate_cancel`.
    pub cancel_grace: Duration,
    /// The adaptive controller's policy; `None` for plain or QEMU's
    /// convergence.
    pub controller: Option<Policy>,
    /// Downtime limit in force at the start, ms.
    pub downtime_ms: u64,
    /// Ceiling of the downtime ramp, ms.
    pub max_downtime_ms: Option<u64>,
    /// Post-copy is enabled and the policy may switch to it.
    pub allow_postcopy: bool,
    /// The bandwidth cap, bytes/s, if any.
    pub bandwidth_cap: Option<f64>,
    /// Measure the dirty rate (`calc-dirty-rate`) while the first pass runs.
    pub preflight: bool,
    /// Guest RAM: the most a working set can be.
    pub ram_bytes: u64,
}

impl Default for WatchOptions {
    fn default() -> Self {
        WatchOptions {
            poll_interval: Duration::from_millis(250),
            timeout: None,
            timeout_action: TimeoutAction::Abort,
            postcopy_after_precopy: false,
            cancel_grace: Duration::from_secs(30),
            controller: None,
            downtime_ms: crate::settings::DEFAULT_DOWNTIME_MS,
            max_downtime_ms: None,
            allow_postcopy: false,
            bandwidth_cap: None,
            preflight: false,
            ram_bytes: 0,
        }
    }
}

/// Why we asked QEMU to cancel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelReason {
    User,
    Timeout(Duration),
}

/// How the Perform phase ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// QEMU switched over; the source is paused (`postmigrate`).
    Completed { stats: JobStats },
    /// QEMU gave up; the source guest still has its memory.
    Failed { error: String, stats: JobStats },
    /// Cancelled at our request.
    Cancelled {
        reason: CancelReason,
        stats: JobStats,
    },
}

/// Live figures published while watching.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Progress {
    pub stats: JobStats,
    /// Highest throttle so far (QEMU's or ours), percent.
    pub max_cpu_throttle_pct: f64,
    /// Throttle in force now, percent.
    pub throttle_pct: f64,
    pub postcopy_started: bool,
    /// The guest was paused by the timeout action.
    pub suspended: bool,
    pub actions: Vec<TimedAction>,
    /// One sample per poll.
    pub samples: Vec<Sample>,
    /// The job's bandwidth cap in force, MiB/s (`None`: uncapped).
    pub bandwidth_limit_mib_s: Option<u64>,
    /// The job's downtime limit in force, ms (the user's, not the 1 ms of
    /// a held switchover).
    pub downtime_limit_ms: Option<u64>,
}

/// The loop's state.
struct Watch<'a> {
    qmp: &'a Client,
    options: &'a WatchOptions,
    progress: &'a watch::Sender<Progress>,
    throttle: Option<Box<dyn VcpuThrottle>>,
    started: Instant,
    controller: Option<State>,
    history: Vec<f64>,
    downtime_ms: u64,
    throttled: bool,
    last_iteration: u64,
    last_sync: Instant,
    timeout_done: bool,
    cancel_reason: Option<CancelReason>,
    cancel_sent_at: Option<Instant>,
    postcopy_requested: bool,
    preflight: Option<oneshot::Receiver<Option<(DirtyModel, String)>>>,
    /// QEMU's switchover is held back (see the module docs).
    held: bool,
    /// The bandwidth cap in force, bytes/s (`--bandwidth`, then
    /// `migrate-setspeed`).
    bandwidth_cap: Option<f64>,
    /// The controller's policy, with the downtime limits in force.
    policy: Option<Policy>,
    /// When the watcher paused the guest to switch over.
    paused_at: Option<Instant>,
}

impl Watch<'_> {
    fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    fn record(&self, action: &str, value: Option<f64>, detail: String) {
        let t_ms = self.elapsed().as_millis() as u64;
        tracing::info!(t_ms, action, ?value, %detail, "job action");
        self.progress.send_modify(|p| {
            p.actions.push(TimedAction {
                t_ms,
                action: action.to_string(),
                value,
                detail,
            })
        });
    }

    async fn set_throttle(&mut self, to: f64, why: String) {
        let Some(throttle) = self.throttle.as_mut() else {
            self.record(
                "throttle",
                Some(to * 100.0),
                format!("wanted, but no throttle mechanism: {why}"),
            );
            return;
        };
        let kind = throttle.kind();
        let slow_to_stop = throttle.slow_to_stop(to);
        match throttle.set(to).await {
            Ok(()) => {
                self.throttled |= to > 0.0;
                self.progress.send_modify(|p| {
                    p.throttle_pct = to * 100.0;
                    p.max_cpu_throttle_pct = p.max_cpu_throttle_pct.max(to * 100.0);
                });
                self.record("throttle", Some(to * 100.0), format!("{kind}: {why}"));
                if slow_to_stop != self.held {
                    self.hold_switchover(slow_to_stop).await;
                }
            }
            Err(e) => self.record(
                "throttle",
                Some(to * 100.0),
                format!("{kind} throttle failed: {e}"),
            ),
        }
    }

    /// Holds QEMU's own switchover back, or lets it go again.
    async fn hold_switchover(&mut self, hold: bool) {
        let ms = if hold {
            HELD_DOWNTIME_MS
        } else {
            self.downtime_ms
        };
        let detail = match set_parameters(self.qmp, downtime(ms)).await {
            Ok(()) => {
                self.held = hold;
                if hold {
                    format!(
                        "QEMU's switchover held back: above 99 % a vCPU can wait up to a second \
                         to stop, so livemig pauses the guest itself once what is left fits in \
                         {} ms",
                        self.downtime_ms
                    )
                } else {
                    format!(
                        "QEMU switches over by itself again ({} ms limit)",
                        self.downtime_ms
                    )
                }
            }
            Err(e) => format!("QEMU refused the downtime limit: {e}"),
        };
        self.record("hold", Some(ms as f64), detail);
    }

    /// Switches over while QEMU's own switchover is held: pause the guest,
    /// let the throttled vCPUs run so they stop at once, then let QEMU
    /// complete as in its own stop-and-copy.
    async fn switch_over(&mut self, remaining: f64) {
        let paused_at = Instant::now();
        let stop = self.qmp.execute(&Stop);
        tokio::pin!(stop);
        let early = tokio::select! {
            result = &mut stop => Some(result),
            _ = tokio::time::sleep(STOP_LEAD) => None,
        };
        // A vCPU out of quota only sees the stop at its next period, up to
        // a second away; and a quota written now only takes its new period
        // after the old one ends, so even a fresh millisecond of quota can
        // run out before the vCPU gets to the stop. No quota, then: the
        // vCPU runs until it stops, which it does at once if the stop
        // reached it during the lead.
        if let Some(throttle) = self.throttle.as_mut() {
            if let Err(e) = throttle.set(0.0).await {
                tracing::warn!(error = %e, "could not lift the throttle for the stop");
            }
        }
        self.progress.send_modify(|p| p.throttle_pct = 0.0);
        let result = match early {
            Some(result) => Ok(result),
            None => tokio::time::timeout(STOP_TIMEOUT, stop).await,
        };
        match result {
            Ok(Ok(_)) => {
                self.paused_at = Some(paused_at);
                let stop_ms = paused_at.elapsed().as_millis();
                // What the guest dirtied since the last sync still goes
                // through the live phase's loop; QEMU sends its own
                // stop-and-copy without the bandwidth cap, and so does
                // livemig once the guest is paused.
                let uncapped = set_parameters(
                    self.qmp,
                    MigrationParameters {
                        max_bandwidth: Some(crate::settings::UNLIMITED_BANDWIDTH),
                        ..downtime(self.downtime_ms)
                    },
                )
                .await;
                let detail = match uncapped {
                    Ok(()) => {
                        self.held = false;
                        format!(
                            "{:.1} MiB left: guest paused in {stop_ms} ms; QEMU completes \
                             without the bandwidth cap, as in its own stop-and-copy; downtime \
                             counts from here",
                            remaining / MIB,
                        )
                    }
                    Err(e) => format!(
                        "{:.1} MiB left: guest paused in {stop_ms} ms, but QEMU refused the \
                         switchover's parameters ({e}); downtime counts from here",
                        remaining / MIB,
                    ),
                };
                self.record("switchover", None, detail);
                if self.held {
                    self.hold_switchover(false).await;
                }
            }
            Ok(Err(e)) => self.record("switchover", None, format!("QEMU refused to pause: {e}")),
            Err(_) => self.record(
                "switchover",
                None,
                format!("QEMU did not pause within {STOP_TIMEOUT:?}"),
            ),
        }
    }

    /// Sets the job's downtime limit; false if QEMU refused it.
    async fn set_downtime(&mut self, ms: u64, why: String) -> bool {
        // While held, QEMU keeps the hold's limit; this one applies when
        // the hold ends.
        if !self.held {
            if let Err(e) = set_parameters(self.qmp, downtime(ms)).await {
                self.record("downtime", Some(ms as f64), format!("QEMU refused: {e}"));
                return false;
            }
        }
        self.downtime_ms = ms;
        self.progress
            .send_modify(|p| p.downtime_limit_ms = Some(ms));
        self.record("downtime", Some(ms as f64), why);
        true
    }

    /// Applies a bandwidth or downtime limit the user set mid-job.
    async fn retune(&mut self, tunables: Tunables) -> Result<(), String> {
        if let Some(mib) = tunables.bandwidth_mib_s {
            let bytes = mib * crate::settings::MIB;
            // Paused for livemig's switchover, QEMU sends without the cap;
            // the new one would only slow the stop-and-copy.
            if self.paused_at.is_none() {
                let params = MigrationParameters {
                    max_bandwidth: Some(bytes),
                    ..Default::default()
                };
                set_parameters(self.qmp, params)
                    .await
                    .map_err(|e| format!("QEMU refused the bandwidth: {e}"))?;
            }
            self.bandwidth_cap = Some(bytes as f64);
            self.progress
                .send_modify(|p| p.bandwidth_limit_mib_s = Some(mib));
            self.record(
                "bandwidth",
                Some(mib as f64),
                "migrate-setspeed: bandwidth cap changed".into(),
            );
        }
        if let Some(ms) = tunables.downtime_ms {
            if !self
                .set_downtime(ms, "migrate-setmaxdowntime: downtime limit changed".into())
                .await
            {
                return Err("QEMU refused the downtime limit".into());
            }
            let secs = ms as f64 / 1000.0;
            if let Some(policy) = self.policy.as_mut() {
                policy.downtime = secs;
                policy.max_downtime = policy.max_downtime.max(secs);
            }
            if let Some(state) = self.controller.as_mut() {
                state.downtime = secs;
            }
        }
        Ok(())
    }

    async fn start_postcopy(&mut self, why: String) -> bool {
        if self.postcopy_requested {
            return true;
        }
        self.postcopy_requested = true;
        match self.qmp.execute(&MigrateStartPostcopy).await {
            Ok(_) => {
                self.progress.send_modify(|p| p.postcopy_started = true);
                self.record("postcopy", None, why);
                true
            }
            Err(e) => {
                self.record("postcopy", None, format!("QEMU refused to switch: {e}"));
                false
            }
        }
    }

    async fn cancel(&mut self, reason: CancelReason, why: String) {
        // Ask QEMU rather than trust our flag: post-copy may have been
        // started from outside this loop (`migrate-postcopy`).
        let in_postcopy = matches!(
            self.qmp.execute(&QueryMigrate).await,
            Ok(info) if info.status.is_some_and(MigrationStatus::is_postcopy)
        );
        if in_postcopy {
            self.progress.send_modify(|p| p.postcopy_started = true);
        }
        if self.progress.borrow().postcopy_started {
            // The destination already runs the guest: cancelling now would
            // lose it. Let post-copy finish.
            self.record("cancel", None, format!("ignored during post-copy: {why}"));
            return;
        }
        self.cancel_reason = Some(reason);
        self.cancel_sent_at = Some(Instant::now());
        self.record("cancel", None, why);
        if let Err(e) = self.qmp.execute(&MigrateCancel).await {
            tracing::warn!(error = %e, "migrate_cancel failed");
        }
    }

    /// How long the guest was paused for livemig's switchover, if it was:
    /// from the `stop` to QEMU's end of the job, read off QEMU's total time
    /// (its clock starts a moment before ours, so this errs long) rather
    /// than off when the watcher noticed the end.
    fn paused_for(&self, stats: &JobStats) -> Option<u64> {
        let paused_at = self.paused_at?;
        let offset = paused_at.duration_since(self.started).as_millis() as u64;
        Some(match stats.total_time_ms {
            Some(total) if total > offset => total - offset,
            _ => paused_at.elapsed().as_millis() as u64,
        })
    }

    /// Lifts our throttle; called as soon as QEMU reports the end.
    async fn release(&mut self) {
        if let Some(mut throttle) = self.throttle.take() {
            throttle.release().await;
            if self.throttled {
                self.progress.send_modify(|p| p.throttle_pct = 0.0);
                self.record(
                    "release",
                    Some(0.0),
                    format!("{} throttle lifted", throttle.kind()),
                );
            }
        }
    }

    /// The link's bandwidth for the controller: the cap when there is one
    /// (QEMU's own figure counts bytes on the wire, so it reads low while
    /// the first pass skims over zero pages), else QEMU's measurement.
    fn bandwidth(&self, stats: &JobStats) -> f64 {
        let measured = stats.bandwidth_mib_s.filter(|b| *b > 0.0).map(|b| b * MIB);
        self.bandwidth_cap.or(measured).unwrap_or(1e9)
    }

    fn take_preflight(&mut self) {
        let Some(rx) = self.preflight.as_mut() else {
            return;
        };
        match rx.try_recv() {
            Ok(result) => {
                self.preflight = None;
                if let Some((model, detail)) = result {
                    self.record("measure", Some(model.rate / MIB), detail);
                    if let Some(state) = self.controller.as_mut() {
                        if state.model.rate == 0.0 {
                            state.model = model;
                        }
                    }
                }
            }
            Err(oneshot::error::TryRecvError::Empty) => {}
            Err(oneshot::error::TryRecvError::Closed) => self.preflight = None,
        }
    }

    /// A new pass began: let the controller or the escalation policy act.
    /// What is left right after a sync is what the guest dirtied during the
    /// pass, plus a leftover below QEMU's switchover threshold (QEMU syncs
    /// once what is left falls below it).
    async fn on_sync(&mut self, stats: &JobStats) {
        let now = Instant::now();
        let pass_secs = now.duration_since(self.last_sync).as_secs_f64();
        self.last_sync = now;
        let remaining = stats.memory_remaining_bytes.unwrap_or(0) as f64;
        self.history.push(remaining);
        tracing::debug!(
            pass = stats.iteration,
            remaining_mib = remaining / MIB,
            pass_secs,
            "pass"
        );
        if self.paused_at.is_some() {
            // Paused for the switchover: QEMU completes, nothing to steer.
            return;
        }
        if self.held
            && remaining
                <= self.bandwidth(stats) * self.downtime_ms as f64 / 1000.0 * HELD_SWITCHOVER_SHARE
        {
            self.switch_over(remaining).await;
            return;
        }
        if pass_secs < MIN_PASS_SECS {
            return;
        }

        if let (Some(mut state), Some(policy)) = (self.controller.clone(), self.policy) {
            let throttle_now = self.progress.borrow().throttle_pct / 100.0;
            // What is applied, whatever the controller last asked for.
            state.throttle = throttle_now;
            let decision = controller::decide(
                &state,
                &Observation {
                    elapsed: self.elapsed().as_secs_f64(),
                    remaining,
                    pass_secs,
                    throttle: throttle_now,
                    bandwidth: self.bandwidth(stats),
                },
                &policy,
            );
            self.controller = Some(decision.state);
            for action in decision.actions {
                match action {
                    Action::Throttle { to, why } => self.set_throttle(to, why).await,
                    Action::Downtime { to, why } => {
                        // A refusal is in the timeline, as before.
                        self.set_downtime((to * 1000.0).round() as u64, why).await;
                    }
                    Action::Postcopy { why } => {
                        self.start_postcopy(why).await;
                    }
                }
            }
            return;
        }

        if stalled(&self.history, STALL_WINDOW) {
            let max = self.options.max_downtime_ms.unwrap_or(0);
            if max > self.downtime_ms {
                self.set_downtime(
                    max,
                    format!("no progress in {STALL_WINDOW} passes; raising the downtime limit"),
                )
                .await;
                // Judge the new limit on fresh passes.
                self.history.clear();
            } else if self.options.allow_postcopy && !self.postcopy_requested {
                self.start_postcopy(format!("no progress in {STALL_WINDOW} passes"))
                    .await;
            }
        }
    }
}

async fn set_parameters(qmp: &Client, params: MigrationParameters) -> Result<(), qmp::Error> {
    qmp.execute(&MigrateSetParameters(params)).await.map(|_| ())
}

fn downtime(ms: u64) -> MigrationParameters {
    MigrationParameters {
        downtime_limit: Some(ms),
        ..Default::default()
    }
}

/// Measures the dirty rate over 1 s and 2 s windows and fits the model.
async fn preflight(qmp: Client, ram_bytes: f64) -> Option<(DirtyModel, String)> {
    let samples = crate::dirty::measure(&qmp, &[1, 2]).await.ok()?;
    let model = fit(&samples, ram_bytes)?;
    Some((model, crate::dirty::describe(&samples, &model)))
}

/// Starts the migration to `uri` and watches it until QEMU finishes it.
pub async fn run(
    qmp: &Client,
    uri: &str,
    options: &WatchOptions,
    cancel: &CancellationToken,
    progress: &watch::Sender<Progress>,
    throttle: Option<Box<dyn VcpuThrottle>>,
    mut retunes: mpsc::Receiver<Retune>,
) -> Outcome {
    let mut events = qmp.events();
    if let Err(e) = qmp
        .execute(&Migrate {
            uri: uri.to_string(),
            resume: None,
        })
        .await
    {
        return Outcome::Failed {
            error: format!("QEMU refused to start the migration: {e}"),
            stats: JobStats::default(),
        };
    }
    let started = Instant::now();
    let mut w = Watch {
        qmp,
        options,
        progress,
        throttle,
        started,
        controller: options.controller.map(|policy| State::new(&policy, None)),
        history: Vec::new(),
        downtime_ms: options.downtime_ms,
        throttled: false,
        last_iteration: 0,
        last_sync: started,
        timeout_done: false,
        cancel_reason: None,
        cancel_sent_at: None,
        postcopy_requested: false,
        preflight: None,
        held: false,
        paused_at: None,
        bandwidth_cap: options.bandwidth_cap,
        policy: options.controller,
    };
    progress.send_modify(|p| {
        p.bandwidth_limit_mib_s = options.bandwidth_cap.map(|b| (b / MIB).round() as u64);
        p.downtime_limit_ms = Some(options.downtime_ms);
    });
    if options.preflight {
        let (tx, rx) = oneshot::channel();
        let client = qmp.clone();
        let ram = options.ram_bytes as f64;
        tokio::spawn(async move {
            let _ = tx.send(preflight(client, ram).await);
        });
        w.preflight = Some(rx);
    }
    let mut last = JobStats::default();

    loop {
        w.take_preflight();
        let stats = match qmp.execute(&QueryMigrate).await {
            Ok(info) => {
                let status = info.status;
                let mut stats = JobStats::from_qemu(&info).merged_over(&last);
                if let Some(status) = status.filter(|s| s.is_finished()) {
                    w.release().await;
                    if status == MigrationStatus::Completed {
                        stats = settled_stats(qmp, stats).await;
                        let paused = w.paused_for(&stats);
                        tracing::info!(
                            qemu_downtime_ms = ?stats.downtime_ms,
                            qemu_total_ms = ?stats.total_time_ms,
                            paused_ms = ?paused,
                            "migration completed"
                        );
                        if let Some(paused) = paused {
                            stats.downtime_ms = Some(stats.downtime_ms.unwrap_or(0).max(paused));
                        }
                    }
                    publish(progress, &stats, started);
                    return finish(status, info.error_desc, stats, w.cancel_reason);
                }
                stats
            }
            Err(e) => {
                w.release().await;
                return Outcome::Failed {
                    error: format!("lost contact with the source QEMU: {e}"),
                    stats: last,
                };
            }
        };
        publish(progress, &stats, started);
        if info_in_postcopy(&stats) {
            progress.send_modify(|p| p.postcopy_started = true);
        }
        last = stats.clone();

        let iteration = stats.iteration.unwrap_or(0);
        if iteration > w.last_iteration {
            // The first sync happens at setup; later ones end passes.
            if w.last_iteration > 0 && w.cancel_reason.is_none() {
                w.on_sync(&stats).await;
            }
            w.last_iteration = iteration;
        }

        if options.postcopy_after_precopy
            && !w.postcopy_requested
            && w.cancel_reason.is_none()
            && iteration >= 2
        {
            w.start_postcopy("--postcopy-after-precopy: the first pass is done".into())
                .await;
        }

        if w.cancel_reason.is_none() {
            if cancel.is_cancelled() {
                w.cancel(CancelReason::User, "cancelled by domjobabort".into())
                    .await;
            } else if let Some(timeout) = options
                .timeout
                .filter(|t| !w.timeout_done && w.elapsed() >= *t)
            {
                w.timeout_done = true;
                let why = format!("not completed within the {}s timeout", timeout.as_secs());
                match options.timeout_action {
                    TimeoutAction::Abort => w.cancel(CancelReason::Timeout(timeout), why).await,
                    TimeoutAction::Postcopy => {
                        if !w.start_postcopy(why.clone()).await {
                            w.cancel(CancelReason::Timeout(timeout), why).await;
                        }
                    }
                    TimeoutAction::Suspend => match qmp.execute(&Stop).await {
                        Ok(_) => {
                            progress.send_modify(|p| p.suspended = true);
                            w.record(
                                "suspend",
                                None,
                                format!("{why}; guest paused so the copy finishes"),
                            );
                        }
                        Err(e) => {
                            w.cancel(
                                CancelReason::Timeout(timeout),
                                format!("{why}; could not pause: {e}"),
                            )
                            .await
                        }
                    },
                }
            }
        } else if w
            .cancel_sent_at
            .is_some_and(|t| t.elapsed() > options.cancel_grace)
        {
            w.release().await;
            return Outcome::Failed {
                error: format!(
                    "QEMU did not finish cancelling within {:?}",
                    options.cancel_grace
                ),
                stats: last,
            };
        }

        let sleep = tokio::time::sleep(options.poll_interval);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                _ = &mut sleep => break,
                _ = cancel.cancelled(), if w.cancel_reason.is_none() => break,
                Some(retune) = retunes.recv() => {
                    let result = w.retune(retune.tunables).await;
                    let _ = retune.done.send(result);
                }
                event = events.recv() => match event {
                    Ok(e) => match e.kind() {
                        EventKind::Migration { status } if status.is_finished() => break,
                        EventKind::MigrationPass { .. } => break,
                        _ => {}
                    },
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                },
            }
        }
    }
}

/// QEMU announces `completed` a moment before it fills in total time and
/// downtime (both read 0 until then); re-read until they are set.
async fn settled_stats(qmp: &Client, mut stats: JobStats) -> JobStats {
    for _ in 0..40 {
        if stats.total_time_ms.unwrap_or(0) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
        match qmp.execute(&QueryMigrate).await {
            Ok(info) => stats = JobStats::from_qemu(&info).merged_over(&stats),
            Err(_) => break,
        }
    }
    stats
}

fn info_in_postcopy(stats: &JobStats) -> bool {
    stats
        .qemu_status
        .as_deref()
        .is_some_and(|s| s.starts_with("postcopy"))
}

fn publish(progress: &watch::Sender<Progress>, stats: &JobStats, started: Instant) {
    let t_ms = started.elapsed().as_millis() as u64;
    progress.send_modify(|p| {
        p.max_cpu_throttle_pct = p
            .max_cpu_throttle_pct
            .max(stats.cpu_throttle_pct.unwrap_or(0) as f64);
        p.stats = stats.clone();
        p.samples
            .push(Sample::from_stats(t_ms, stats, p.throttle_pct));
    });
}

fn finish(
    status: MigrationStatus,
    error: Option<String>,
    stats: JobStats,
    cancel_reason: Option<CancelReason>,
) -> Outcome {
    match status {
        MigrationStatus::Completed => Outcome::Completed { stats },
        MigrationStatus::Cancelled => Outcome::Cancelled {
            reason: cancel_reason.unwrap_or(CancelReason::User),
            stats,
        },
        _ => match cancel_reason {
            // Cancelling can surface as `failed` on some versions.
            Some(reason) if error.is_none() => Outcome::Cancelled { reason, stats },
            _ => Outcome::Failed {
                error: error.unwrap_or_else(|| "QEMU reported the migration failed".into()),
                stats,
            },
        },
    }
}
