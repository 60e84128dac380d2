//! What happens at a dirty-bitmap sync: the controller or the escalation
//! policy acts on the pass that just ended.

use std::time::Duration;

use converge::controller::{self, Action, Observation, VcpuUse, SWITCHOVER_SHARE};
use converge::stall::stalled;
use protocol::job::{ActionKind, JobStats};
use qmp::commands::migration::MigrateStartPostcopy;
use tokio::time::Instant;
use types::units::mib;
use types::Throttle;

use super::watch::Watch;

/// Passes without a new low before a non-adaptive job escalates.
const STALL_WINDOW: usize = 3;
/// A pass shorter than this says little about the dirty rate; the
/// controller skips it, unless passes have stopped shrinking. A working
/// set crossing a 100 MiB/s link takes less than half a second: a floor
/// of 0.5 s skipped three such passes in a row before anything was
/// decided.
const MIN_PASS_SECS: f64 = 0.25;
/// Near the end (what is left within twice what fits in the downtime)
/// QEMU syncs as soon as what is left falls under what fits, so a pass
/// carries the last one's leftover and reads the rate high: there a pass
/// must last this long to count (one of 0.25 s throttled a guest that was
/// converging on its own).
const NEAR_END_MIN_PASS_SECS: f64 = 0.5;
const NEAR_END: f64 = 2.0;
/// Near the end, a guest that dirties about what the link sends makes
/// QEMU sync every few hundred milliseconds, each pass too short to count
/// and what is left never under the threshold for long (the sweep's
/// guests at the link's rate hovered so for 2–3 s). After this long (two
/// such passes), the passes are read together: what the guest dirtied
/// over them is what was sent plus what more is left.
const HOVER_SECS: f64 = 0.6;

/// What a sync showed the controller.
#[derive(Debug, Clone, Copy)]
pub struct SyncSeen {
    /// The link's bandwidth then, bytes/s.
    bandwidth: f64,
    /// Bytes left right after the sync.
    remaining: f64,
    /// The pass's length, seconds.
    pass_secs: f64,
    /// The throttled vCPUs' CPU time in the pass.
    vcpu: Option<VcpuUse>,
    /// Short passes read together.
    hovering: bool,
    /// The first pass.
    first_pass: bool,
}

/// Passes near the end too short to count, added up.
#[derive(Debug, Clone, Copy)]
pub struct Hover {
    secs: f64,
    passes: u32,
    /// Bytes sent by their start, and left then.
    sent: f64,
    left: f64,
}

/// How long the first pass has run by QEMU's clock: its time since
/// `migrate` less its setup, once the setup is over (QEMU reports a setup
/// time of 0 until then).
fn first_pass_run(stats: &JobStats) -> Duration {
    match (stats.total_time_ms, stats.setup_time_ms) {
        (Some(total), Some(setup)) if setup > 0 => {
            Duration::from_millis(total.saturating_sub(setup))
        }
        _ => Duration::ZERO,
    }
}

impl Watch<'_> {
    /// After each poll: a new pass lets the policy act, and
    /// `--postcopy-after-precopy` switches once the first pass is done.
    pub async fn at_poll(&mut self, stats: &JobStats) {
        let iteration = stats.iteration.unwrap_or(0);
        if iteration > self.last_iteration {
            // The first sync happens at setup; later ones end passes.
            if self.last_iteration > 0 && self.cancelling.is_none() {
                self.on_sync(stats).await;
            } else if self.last_iteration == 0 {
                // The first pass begins here, not when the job did: its
                // setup (0.5 s on a 1 GiB guest) counted into the pass
                // read a guest dirtying at the link's rate as 57 MiB/s
                // against 100 and left it unthrottled. A poll can see it
                // late (the sweep's whole-RAM guest on 256 MiB/s was first
                // seen 56 MiB into its pass, which then read 1.6 times the
                // guest's rate): QEMU's clock says how long it has run.
                let now = Instant::now();
                let run = first_pass_run(stats).min(self.elapsed());
                self.last_sync = now.checked_sub(run).unwrap_or(now);
            }
            self.last_iteration = iteration;
        } else if self.cancelling.is_none() {
            self.switch_over_mid_pass(stats).await;
            self.foresee_first_sync(stats).await;
        }
        self.left_at_poll = stats
            .memory_remaining_bytes
            .map(|left| (left as f64, self.bandwidth(stats)));
        if self.options.postcopy_after_precopy
            && !self.postcopy_requested
            && self.cancelling.is_none()
            && iteration >= 2
        {
            self.start_postcopy("--postcopy-after-precopy: the first pass is done".into())
                .await;
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
        let vcpu = self.pass_cpu_use();
        let remaining = stats.memory_remaining_bytes.unwrap_or(0) as f64;
        let sent = stats.memory_processed_bytes.unwrap_or(0) as f64;
        let last_sync = std::mem::replace(&mut self.at_last_sync, (sent, remaining));
        self.history.push(remaining);
        tracing::debug!(
            pass = stats.iteration,
            remaining_mib = mib(remaining),
            pass_secs,
            "pass"
        );
        if self.paused_at.is_some() || self.progress_postcopy_started() {
            // Paused for the switchover, or switched to post-copy (whose
            // own sync lands here, and the guest runs on the destination
            // from then on): nothing to steer.
            return;
        }
        if self.limits.held
            && remaining
                <= self.bandwidth(stats) * self.limits.downtime.as_secs_f64() * SWITCHOVER_SHARE
        {
            self.switch_over(remaining).await;
            return;
        }
        // Short passes are skipped unless they stopped shrinking: a guest
        // whose working set crosses a fast link in under MIN_PASS_SECS
        // would otherwise loop forever with nobody deciding anything.
        let near_end =
            remaining <= NEAR_END * self.bandwidth(stats) * self.limits.downtime.as_secs_f64();
        let floor = if near_end {
            NEAR_END_MIN_PASS_SECS
        } else {
            MIN_PASS_SECS
        };
        let (mut remaining, mut pass_secs) = (remaining, pass_secs);
        let mut hovering = false;
        let stopped_shrinking = stalled(&self.history, STALL_WINDOW);
        if pass_secs < floor && !stopped_shrinking {
            let Some(read) = self.hovering(near_end, pass_secs, last_sync, (sent, remaining))
            else {
                return;
            };
            (remaining, pass_secs) = read;
            hovering = true;
        }
        // Near the end, unthrottled passes long enough to count that stop
        // setting new lows hover too: they read the guest low the same way,
        // and the rate they show, under the link, would have the guest left
        // to finish on its own (the drain's heavy guest, alone on the link,
        // spent six such passes at 35-48 MiB left).
        if !hovering
            && near_end
            && stopped_shrinking
            && self.controller.is_some()
            && self.throttle_now().fraction() <= 0.0
        {
            hovering = true;
            self.record(
                ActionKind::Measure,
                None,
                format!(
                    "{STALL_WINDOW} passes near the end without a new low, unthrottled: \
                     read as hovering ({:.0} MiB left)",
                    mib(remaining)
                ),
            );
        }
        self.hover = None;
        if self.controller.is_some() {
            self.widen_if_stalled().await;
            let seen = SyncSeen {
                bandwidth: self.bandwidth(stats),
                remaining,
                pass_secs,
                vcpu,
                hovering,
                // QEMU syncs once at setup, again as the first pass ends.
                first_pass: stats.iteration == Some(2),
            };
            self.consult_controller(seen).await;
        } else if stalled(&self.history, STALL_WINDOW) {
            self.escalate().await;
        }
    }

    /// A pass too short to count: near the end, once such passes add up to
    /// [`HOVER_SECS`], they are read as one (what the controller is to
    /// see as left after it, and its length). `last_sync` and `now` are
    /// the bytes sent and left at the last sync and at this one.
    fn hovering(
        &mut self,
        near_end: bool,
        pass_secs: f64,
        last_sync: (f64, f64),
        now: (f64, f64),
    ) -> Option<(f64, f64)> {
        // The first pass sends the memory in use: what it sent is not the
        // guest's doing, so no hover begins with it.
        if !near_end || self.controller.is_none() || self.history.len() < 2 {
            self.hover = None;
            return None;
        }
        let hover = self.hover.get_or_insert(Hover {
            secs: 0.0,
            passes: 0,
            sent: last_sync.0,
            left: last_sync.1,
        });
        hover.secs += pass_secs;
        hover.passes += 1;
        if hover.secs < HOVER_SECS {
            return None;
        }
        let hover = self.hover.take()?;
        // What the guest dirtied over them is what they sent plus what
        // more is left. Pages rewritten after being sent count again, so
        // it may exceed the working set: then the passes saturated it, and
        // the rate they show is a lower bound.
        let dirtied = ((now.0 - hover.sent) + (now.1 - hover.left)).max(0.0);
        self.record(
            ActionKind::Measure,
            Some(mib(dirtied / hover.secs)),
            format!(
                "{} passes in {:.1} s near the end, none short enough to switch over: the \
                 guest dirtied {:.0} MiB meanwhile",
                hover.passes,
                hover.secs,
                mib(dirtied)
            ),
        );
        let working_set = self
            .controller
            .as_ref()
            .map_or(0.0, |(state, _)| state.model.working_set);
        if working_set > 0.0 && dirtied > working_set {
            Some((working_set, hover.secs * working_set / dirtied))
        } else {
            Some((dirtied, hover.secs))
        }
    }

    /// With the switchover held (above 99 %), QEMU syncs only once next to
    /// nothing is left, which a guest crawling at its throttle can put off
    /// for a second: what is left of the pass now, plus the most the guest
    /// can have dirtied since the sync at its throttle, says when it can
    /// be paused without waiting for that sync.
    async fn switch_over_mid_pass(&mut self, stats: &JobStats) {
        if !self.limits.held
            || self.paused_at.is_some()
            || self.progress_postcopy_started()
            || self.mid_pass_tried == self.last_iteration
        {
            return;
        }
        let (Some((state, _)), Some(left)) = (&self.controller, stats.memory_remaining_bytes)
        else {
            return;
        };
        let model = state.model;
        let rate = if model.rate_is_lower_bound {
            model
                .rate
                .max(model.working_set / converge::estimate::WORST_CASE_REFILL_SECS)
        } else {
            model.rate
        };
        let since_sync = self.last_sync.elapsed().as_secs_f64();
        let dirtied =
            (rate * (1.0 - self.throttle_now().fraction()) * since_sync).min(model.working_set);
        let left = left as f64 + dirtied;
        if left <= self.bandwidth(stats) * self.limits.downtime.as_secs_f64() * SWITCHOVER_SHARE {
            self.mid_pass_tried = self.last_iteration;
            self.switch_over(left).await;
        }
    }

    /// In the first pass, once the pre-flight's probes are done: sends to
    /// post-copy now a guest the first sync would send there
    /// (`converge::controller::before_first_sync`), rather than after a
    /// first pass that, on a drain's share of the link, lasts seconds.
    async fn foresee_first_sync(&mut self, stats: &JobStats) {
        if self.last_iteration != 1
            || !self.history.is_empty()
            || self.probing.is_some()
            || self.deferred_sync.is_some()
            || self.postcopy_requested
            || self.paused_at.is_some()
            || self.progress_postcopy_started()
        {
            return;
        }
        let Some((state, policy)) = self.controller.clone() else {
            return;
        };
        if !policy.allow_postcopy || state.postcopy {
            return;
        }
        let first_pass_secs = self.last_sync.elapsed().as_secs_f64();
        let decision =
            controller::before_first_sync(&state, self.bandwidth(stats), first_pass_secs, &policy);
        if let Some((state, _)) = self.controller.as_mut() {
            *state = decision.state;
        }
        self.apply(decision.actions).await;
    }

    /// The throttled vCPUs' CPU time in the pass that just ended.
    fn pass_cpu_use(&mut self) -> Option<VcpuUse> {
        let now = self.throttle.as_ref().and_then(|t| t.cpu_use());
        let before = std::mem::replace(&mut self.cpu_at_sync, now.map(|u| u.cpu));
        let now = now?;
        Some(VcpuUse {
            cpu_secs: now.cpu.checked_sub(before?)?.as_secs_f64(),
            min_slice_secs: now.min_slice.as_secs_f64(),
        })
    }

    async fn consult_controller(&mut self, seen: SyncSeen) {
        let Some((mut state, policy)) = self.controller.clone() else {
            return;
        };
        let throttle_now = self.throttle_now().fraction();
        // A throttle would stop the probes; the first one waits for them
        // (a few seconds: one per busy vCPU, and the slice probe) rather
        // than slow every vCPU or miss the floor.
        if let (Some(probing), 0.0) = (self.probing, throttle_now) {
            if self.said_waiting != Some(probing) {
                self.said_waiting = Some(probing);
                let (kind, why) = probing.waiting();
                self.record(kind, None, why);
            }
            self.deferred_sync = Some(seen);
            return;
        }
        self.deferred_sync = None;
        // What is applied, whatever the controller last asked for.
        state.throttle = throttle_now;
        let decision = controller::decide(
            &state,
            &Observation {
                elapsed: self.elapsed().as_secs_f64(),
                remaining: seen.remaining,
                pass_secs: seen.pass_secs,
                throttle: throttle_now,
                bandwidth: seen.bandwidth,
                vcpu: seen.vcpu,
                hovering: seen.hovering,
                first_pass: seen.first_pass,
            },
            &policy,
        );
        if let Some((state, _)) = self.controller.as_mut() {
            *state = decision.state;
        }
        self.apply(decision.actions).await;
    }

    /// The probes are over: decide on the sync that waited for them, if
    /// one did and nothing has ended the passes since (its figures are
    /// those of that sync, seconds old, which beats a pass later: 3.8 s
    /// for the convergence benchmark's heavy guest on 64 MiB/s).
    pub async fn decide_deferred_sync(&mut self) {
        if self.probing.is_some() {
            return;
        }
        let Some(seen) = self.deferred_sync.take() else {
            return;
        };
        let postcopy = self
            .controller
            .as_ref()
            .is_some_and(|(state, _)| state.postcopy);
        if postcopy
            || self.postcopy_requested
            || self.paused_at.is_some()
            || self.cancelling.is_some()
            || self.progress_postcopy_started()
        {
            return;
        }
        self.consult_controller(seen).await;
    }

    /// A measurement came in before the first pass ended: let the
    /// controller throttle now rather than at the first sync, when that
    /// saves resending the working set (see `controller::at_start`).
    pub async fn throttle_from_the_start(&mut self) {
        // Several vCPUs: the pre-flight searches for the ones that write,
        // and a throttle on all of them now would stop the search.
        let searching = self.options.preflight
            && self
                .throttle
                .as_ref()
                .and_then(|t| t.selector())
                .is_some_and(|s| s.threads.len() > 1);
        // (With post-copy allowed, `at_start` leaves the first pass to the
        // pre-flight's slice probe.)
        if self.last_iteration > 1
            || searching
            || self.probing.is_some()
            || self.throttle_now().is_on()
        {
            return;
        }
        let Some((state, policy)) = self.controller.clone() else {
            return;
        };
        // Before the first poll: the whole first pass, at the cap.
        let (remaining, bandwidth) = match self.left_at_poll {
            Some(seen) => seen,
            None => match self.limits.bandwidth {
                Some(cap) => (
                    converge::estimate::first_pass_bytes(
                        self.options.ram_bytes,
                        self.options.ram_in_use_bytes,
                    ),
                    cap.as_f64(),
                ),
                None => return,
            },
        };
        let decision = controller::at_start(
            &state,
            remaining,
            bandwidth,
            self.elapsed().as_secs_f64(),
            &policy,
        );
        if let Some((state, _)) = self.controller.as_mut() {
            *state = decision.state;
        }
        self.apply(decision.actions).await;
    }

    /// Carries out the controller's actions.
    pub async fn apply(&mut self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Throttle { to, why } => {
                    self.set_throttle(Throttle::from_fraction(to), why).await
                }
                Action::Downtime { to, why } => {
                    // A refusal is in the timeline.
                    self.set_downtime(Duration::from_secs_f64(to), why).await;
                }
                Action::Postcopy { why } => {
                    self.start_postcopy(why).await;
                }
                Action::Floor { mib, why } => self.record(ActionKind::Floor, Some(mib), why),
            }
        }
    }

    /// No progress for a while without the controller: raise the downtime
    /// limit to its ceiling, then switch to post-copy if allowed.
    async fn escalate(&mut self) {
        let max = self.options.max_downtime.unwrap_or_default();
        if max > self.limits.downtime {
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

    pub async fn set_throttle(&mut self, to: Throttle, why: String) {
        let Some(throttle) = self.throttle.as_mut() else {
            self.record(
                ActionKind::Throttle,
                Some(to.percent()),
                format!("wanted, but no throttle mechanism: {why}"),
            );
            return;
        };
        let kind = throttle.kind();
        let slow_to_stop = throttle.slow_to_stop(to.fraction());
        match throttle.set(to.fraction()).await {
            Ok(()) => {
                self.throttled |= to.is_on();
                self.update(|p| p.throttle_applied(to));
                self.record(
                    ActionKind::Throttle,
                    Some(to.percent()),
                    format!("{kind}: {why}"),
                );
                if slow_to_stop != self.limits.held {
                    self.hold_switchover(slow_to_stop).await;
                }
            }
            Err(e) => self.record(
                ActionKind::Throttle,
                Some(to.percent()),
                format!("{kind} throttle failed: {}", types::error_chain(&e)),
            ),
        }
    }

    /// QEMU stops the vCPUs to switch to post-copy, with the downtime
    /// clock running: a vCPU out of its quota would see that stop only at
    /// its next period, up to a second away (two of three hot-guest runs
    /// had a 1 s downtime that way). No quota, then, as at a held
    /// switchover; the guest runs on the destination from here. True if a
    /// throttle was lifted.
    async fn lift_slow_throttle(&mut self) -> bool {
        let now = self.throttle_now().fraction();
        let slow = self.throttle.as_ref().is_some_and(|t| t.slow_to_stop(now));
        slow && self.lift_throttle_for_stop("post-copy").await
    }

    /// Asks QEMU to switch to post-copy (once); false if it refused.
    pub async fn start_postcopy(&mut self, why: String) -> bool {
        if self.postcopy_requested {
            return true;
        }
        self.postcopy_requested = true;
        match self.qmp.execute(&MigrateStartPostcopy).await {
            Ok(_) => {
                self.update(|p| p.postcopy_started = true);
                let why = if self.lift_slow_throttle().await {
                    format!("{why}; the throttle is lifted so that the vCPUs stop at once")
                } else {
                    why
                };
                self.record(ActionKind::Postcopy, None, why);
                true
            }
            Err(e) => {
                self.record(
                    ActionKind::Postcopy,
                    None,
                    format!("QEMU refused to switch: {e}"),
                );
                false
            }
        }
    }
}
