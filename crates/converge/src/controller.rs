//! The adaptive convergence controller: a pure function from what the last
//! pass showed to what to change.
//!
//! At every dirty-bitmap sync it updates its estimate of the guest's dirty
//! behaviour ([`DirtyModel`]) from the pass that just ended, then picks the
//! throttle (and, if needed, the downtime limit) that the model says
//! completes within the time budget at the least cost to the guest: seconds
//! of full-speed guest time lost to throttling and downtime. A guest that
//! converges on its own costs nothing unthrottled, so it is never
//! throttled; one that does not is throttled once, to the level that
//! finishes in the fewest, shortest passes (among the throttles that
//! finish within a quarter of the fastest: where every throttle costs the
//! same work, the cost alone would pick the slowest). When every pass saturates at
//! the working set the true rate is unknown (only a lower bound), so the
//! throttle escalates until a pass comes back smaller than the working set
//! and gives a real measurement; from then on the throttle can also go down.

use serde::{Deserialize, Serialize};

use crate::estimate::WORST_CASE_REFILL_SECS;
use crate::model::{
    simulate_from, DirtyModel, Fixed, Prediction, Scenario, Steer, Steering, SyncView,
};
use crate::stall::stalled;
use types::units::MIB_F64 as MIB;

mod floor;
mod postcopy;

pub use floor::{SliceFloor, VcpuUse};
pub use postcopy::dearer_than_postcopy;
use postcopy::Course;

/// A pass that dirtied at least this share of the working set saturated:
/// it only bounds the rate from below.
pub const SATURATION: f64 = 0.85;
/// After a saturated pass under throttle `p`, the next throttle leaves at
/// most `(1 − p) / SATURATED_STEP` of the CPU: the true rate is unknown,
/// and every pass spent below the level needed is a pass wasted.
const SATURATED_STEP: f64 = 8.0;
/// Horizon when the user gave no time budget.
pub const DEFAULT_HORIZON_SECS: f64 = 600.0;
/// A throttle whose predicted cost is within this share (plus the slack)
/// of the cheapest is preferred when it is lighter.
const COST_TOLERANCE: f64 = 0.10;
const COST_SLACK_SECS: f64 = 0.05;
/// A throttle is considered only if it completes within this factor (plus
/// the slack) of the fastest one: where a lighter throttle costs the guest
/// no less in all (a guest dirtying about as fast as the link sends, whose
/// every pass under throttle `p` loses `p` of the pass and shrinks the
/// next by `p`), the cost alone would choose the lightest and the longest.
const TIME_FACTOR: f64 = 1.25;
const TIME_SLACK_SECS: f64 = 0.25;
/// Smallest throttle change worth making ...
const HYSTERESIS: f64 = 0.005;
/// ... or change of the CPU share left to the guest (near 100 %, a tenth
/// of a point can halve what the guest gets).
const SHARE_HYSTERESIS: f64 = 1.25;
/// Share of the link a guest known only by a lower bound may dirty under
/// the throttle chosen: below 1, so that passes shrink.
const LINK_SHARE: f64 = 0.9;
/// Passes under one throttle without a new low (see [`stalled`]) after
/// which the model is not trusted and the throttle escalates.
const STALL_WINDOW: usize = 2;
/// Share of the downtime limit a pass may leave when a switchover is
/// due: the rest is for what the guest dirties before it stops, and the
/// device state (the watcher switches over itself at this share above 99 %).
pub const SWITCHOVER_SHARE: f64 = 0.5;

/// What the user allows.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    /// Highest throttle, as a fraction (0.99 = 99 %).
    pub max_throttle: f64,
    /// Downtime limit to start with, seconds.
    pub downtime: f64,
    /// Highest downtime limit the controller may raise it to, seconds.
    pub max_downtime: f64,
    /// Seconds from the start of the migration to complete in.
    pub budget: Option<f64>,
    /// May switch to post-copy when nothing else completes in time, or
    /// when it costs the guest about as much as the throttle pre-copy
    /// needs or less ([`dearer_than_postcopy`]).
    pub allow_postcopy: bool,
    /// The bandwidth post-copy is capped at, bytes/s, when it has a cap of
    /// its own (`--postcopy-bandwidth`); else it has the pre-copy's.
    #[serde(default)]
    pub postcopy_bandwidth: Option<f64>,
}

/// What the controller knows between syncs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// Throttle in force.
    pub throttle: f64,
    /// Downtime limit in force, seconds.
    pub downtime: f64,
    /// The guest as the controller sees it (rate 0 = not measured yet).
    pub model: DirtyModel,
    /// Bytes left after each sync, oldest first.
    pub history: Vec<f64>,
    /// Post-copy has been requested.
    pub postcopy: bool,
    /// Length of `history` when the throttle last changed.
    #[serde(default)]
    pub throttle_since: usize,
    /// The slice floor has been reported (see [`SliceFloor`]).
    #[serde(default)]
    pub floor_reported: bool,
}

impl State {
    /// The state before the first sync; `preflight` is a measurement taken
    /// before or at the start of the migration, if any.
    pub fn new(policy: &Policy, preflight: Option<DirtyModel>) -> State {
        State {
            throttle: 0.0,
            downtime: policy.downtime,
            model: preflight.unwrap_or(DirtyModel {
                rate: 0.0,
                working_set: 0.0,
                rate_is_lower_bound: true,
            }),
            history: Vec::new(),
            postcopy: false,
            throttle_since: 0,
            floor_reported: false,
        }
    }
}

/// What a sync showed.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Observation {
    /// Seconds since the migration started.
    pub elapsed: f64,
    /// Bytes left right after the sync: what the last pass dirtied.
    pub remaining: f64,
    /// Duration of the pass that just ended, seconds.
    pub pass_secs: f64,
    /// Throttle that was in force during that pass.
    pub throttle: f64,
    /// Bytes per second the link carries.
    pub bandwidth: f64,
    /// CPU time the throttled vCPUs used during the pass, where the
    /// throttle mechanism can tell.
    #[serde(default)]
    pub vcpu: Option<VcpuUse>,
    /// The pass is several short ones near the end read together (see the
    /// watcher's hover rule): QEMU kept what is left just over its
    /// switchover threshold for their whole length, so the guest is not
    /// finishing on its own, whatever rate the passes read (rewrites
    /// between two sends count once: they read low).
    #[serde(default)]
    pub hovering: bool,
    /// The pass is the first: it sent the memory in use, and counted only
    /// what the guest dirtied behind the scan.
    #[serde(default)]
    pub first_pass: bool,
}

/// A change the controller asks for, with its reason.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum Action {
    /// Change the vCPU throttle.
    Throttle {
        /// The new throttle, 0 to 1.
        to: f64,
        /// Why, for the timeline.
        why: String,
    },
    /// Change the downtime limit.
    Downtime {
        /// The new limit, seconds.
        to: f64,
        /// Why, for the timeline.
        why: String,
    },
    /// Switch to post-copy.
    Postcopy {
        /// Why, for the timeline.
        why: String,
    },
    /// Nothing to change, but the timeline should say why throttling
    /// alone may not finish (see [`SliceFloor`]).
    Floor {
        /// MiB the guest dirties in one slice.
        mib: f64,
        /// Why, for the timeline.
        why: String,
    },
}

/// The controller's answer: its next state and what to change.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// The state to decide from next time.
    pub state: State,
    /// What to change now.
    pub actions: Vec<Action>,
}

/// Throttle levels considered; finer near 100 %, where a point halves the
/// guest's remaining speed.
fn throttle_grid(max: f64) -> Vec<f64> {
    let mut grid: Vec<f64> = (0..=19).map(|i| f64::from(i) * 0.05).collect();
    grid.extend((96..=99).map(|i| f64::from(i) / 100.0));
    grid.extend([0.9925, 0.995, 0.9975, 0.999]);
    grid.retain(|p| *p <= max + 1e-9);
    if !grid.iter().any(|p| (p - max).abs() < 1e-9) {
        grid.push(max);
    }
    grid
}

fn downtime_steps(current: f64, max: f64) -> Vec<f64> {
    if max <= current {
        return vec![current];
    }
    vec![current, (current + max) / 2.0, max]
}

/// The lightest (throttle, downtime) that completes within `horizon` at
/// about the least cost according to `model`, trying higher downtime limits
/// only if needed.
fn cheapest(
    model: DirtyModel,
    remaining: f64,
    bandwidth: f64,
    horizon: f64,
    state: &State,
    policy: &Policy,
    hovering: bool,
) -> Option<(f64, f64)> {
    for downtime in downtime_steps(state.downtime, policy.max_downtime) {
        let scenario = Scenario {
            first_pass_whole: false,
            switchover_bandwidth: None,
            first_pass_bytes: remaining,
            model,
            bandwidth,
            downtime,
            horizon,
        };
        let feasible: Vec<(f64, f64, f64)> = throttle_grid(policy.max_throttle)
            .into_iter()
            .filter_map(|p| {
                let prediction = simulate_from(&scenario, remaining, p, 0.0, &mut Fixed);
                prediction.converges.then_some((
                    p,
                    prediction.work_lost_secs,
                    prediction.total_secs,
                ))
            })
            .collect();
        let Some(fastest) = feasible.iter().map(|(_, _, secs)| *secs).reduce(f64::min) else {
            continue;
        };
        // A guest that converges on its own is never throttled, however
        // long it takes; one that would only if it dirtied no faster than
        // a lower bound within a tenth of the link (at 97 % of it, in 60
        // passes) is not known to converge on its own, nor is one seen
        // hovering over the threshold. Once throttled, a guest is not let
        // go to crawl through dozens of passes: lifting the throttle
        // competes on time like any other choice.
        let on_its_own = state.throttle <= 0.0
            && !hovering
            && (!model.rate_is_lower_bound || model.rate <= LINK_SHARE * bandwidth);
        let in_time = |(p, _, secs): &&(f64, f64, f64)| {
            (*p == 0.0 && on_its_own) || *secs <= fastest * TIME_FACTOR + TIME_SLACK_SECS
        };
        let Some(least) = feasible
            .iter()
            .filter(in_time)
            .map(|(_, cost, _)| *cost)
            .reduce(f64::min)
        else {
            continue;
        };
        // The lightest throttle that costs about as little as the cheapest:
        // a marginal saving is not worth slowing the guest further.
        let good_enough = least * (1.0 + COST_TOLERANCE) + COST_SLACK_SECS;
        if let Some((p, _, _)) = feasible
            .iter()
            .filter(in_time)
            .find(|(_, cost, _)| *cost <= good_enough)
        {
            return Some((*p, downtime));
        }
    }
    None
}

/// `model` known only from below, by a bound within a tenth of
/// `bandwidth`: a guest dirtying at the link's rate reads about so, and the
/// bound says nothing of how much faster it is.
fn bound_near_link(model: &DirtyModel, bandwidth: f64) -> bool {
    model.rate_is_lower_bound && model.rate >= LINK_SHARE * bandwidth
}

/// `model` at the fastest writer its working set allows (refilled in
/// [`WORST_CASE_REFILL_SECS`]), to plan for the worst a bound allows.
fn at_its_worst(model: DirtyModel) -> DirtyModel {
    DirtyModel {
        rate: model.rate.max(model.working_set / WORST_CASE_REFILL_SECS),
        ..model
    }
}

/// The least throttle worth setting for `model`: never one under which
/// even its lower bound dirties faster than the link sends (unless the
/// working set fits in the `downtime`), since that pass would be wasted
/// and the next decision a pass later.
fn bound_floor(model: &DirtyModel, bandwidth: f64, downtime: f64) -> f64 {
    if model.rate_is_lower_bound
        && model.working_set > bandwidth * downtime
        && model.rate > bandwidth
    {
        1.0 - LINK_SHARE * bandwidth / model.rate
    } else {
        0.0
    }
}

/// One step of the controller. Pure: same inputs, same answer.
pub fn decide(state: &State, obs: &Observation, policy: &Policy) -> Decision {
    let mut next = state.clone();
    let mut actions = Vec::new();
    let dirtied = obs.remaining.max(0.0);
    let pass_secs = obs.pass_secs.max(1e-3);
    next.history.push(dirtied);

    // What this pass says about the guest.
    let known_ws = state.model.working_set > 0.0;
    let working_set = state.model.working_set.max(dirtied);
    let saturated = !known_ws || dirtied >= SATURATION * working_set;
    let implied = dirtied / pass_secs / (1.0 - obs.throttle).max(1e-4);
    // An unthrottled pass counts only pages dirtied after it had sent them
    // (the first pass sends all of RAM once, whatever the guest dirtied
    // before reaching a page): it undercounts, so it cannot lower a bound
    // measured independently (the pre-flight's sampling), and the first
    // pass, which counts none of what the guest wrote ahead of the scan,
    // is itself only a bound.
    let undercounts = obs.throttle <= 0.0
        && (obs.first_pass || (state.model.rate_is_lower_bound && implied < state.model.rate));
    next.model = if saturated || undercounts {
        DirtyModel {
            rate: implied.max(state.model.rate),
            working_set,
            rate_is_lower_bound: true,
        }
    } else {
        DirtyModel {
            rate: implied,
            working_set,
            rate_is_lower_bound: false,
        }
    };

    let horizon = policy
        .budget
        .map_or(DEFAULT_HORIZON_SECS, |b| (b - obs.elapsed).max(0.0));
    // What is left fits in the downtime: QEMU switches over now (or,
    // above 99 %, the watcher does); there is nothing to decide.
    let switching_over = dirtied <= obs.bandwidth * state.downtime;
    if horizon <= 0.0 || switching_over {
        return Decision {
            state: next,
            actions,
        };
    }

    // A pass that saturated at the working set while the guest ran at
    // full speed, and so fast that even the bound it gives comes within a
    // tenth of the link (a pass that sent the working set while the guest
    // refilled it reads exactly the link; a first pass that also sent the
    // rest of the memory in use reads less): no throttle that tames the
    // bound is known to tame the guest, and the pass wasted on finding
    // out lasts as long as the working set takes to send. Plan for the
    // worst the measurement allows; the next pass, short of the working
    // set, measures the rate and the throttle comes down if it shows room.
    // So too for passes that hovered over QEMU's threshold unthrottled:
    // they read the guest low (a page rewritten between two sends counts
    // once), and QEMU finishes only once what the guest dirties in one of
    // those short passes fits in what is left under the threshold, which
    // a light throttle does not bring about (the sweep's guest at the
    // link's rate, throttled 40 % at such a reading, hovered 0.6 s more).
    let plan = if obs.throttle <= 0.0
        && (obs.hovering || (saturated && bound_near_link(&next.model, obs.bandwidth)))
    {
        at_its_worst(next.model)
    } else {
        next.model
    };
    let (mut throttle, downtime) = match cheapest(
        plan,
        dirtied,
        obs.bandwidth,
        horizon,
        &next,
        policy,
        obs.hovering,
    ) {
        Some(choice) => choice,
        None => {
            if policy.allow_postcopy && !next.postcopy {
                next.postcopy = true;
                actions.push(Action::Postcopy {
                    why: format!(
                        "no throttle up to {:.1}% and no downtime up to {:.0} ms completes \
                         within {:.0} s",
                        policy.max_throttle * 100.0,
                        policy.max_downtime * 1000.0,
                        horizon
                    ),
                });
            }
            (policy.max_throttle, policy.max_downtime)
        }
    };
    throttle = throttle.max(bound_floor(&next.model, obs.bandwidth, state.downtime));
    // Saturated (or hovering) while already throttled: the real rate is
    // higher than any estimate so far, or the throttle does not get what
    // is left under the threshold; the next pass is throttled clearly more.
    if known_ws && (saturated || obs.hovering) && obs.throttle > 0.0 {
        throttle = throttle.max(1.0 - (1.0 - obs.throttle) / SATURATED_STEP);
    }
    // Passes that stopped shrinking under a throttle the model said was
    // enough: near 100 % the guest's speed is not proportional to its CPU
    // share (a burst after each quota refill, first writes to clean pages
    // that cost more), so believe the passes, not the model.
    let since_change = &next.history[state.throttle_since.min(next.history.len())..];
    if obs.throttle > 0.0 && stalled(since_change, STALL_WINDOW) {
        throttle = throttle.max(1.0 - (1.0 - obs.throttle) / SATURATED_STEP);
    }
    throttle = throttle.min(policy.max_throttle);
    // Stalled at the highest throttle: there is nothing left to escalate
    // to, and waiting is a lottery (a burst of dirt in each slice the
    // vCPU gets, or a host too busy to send); post-copy ends it if the
    // user allows it.
    let at_most = obs.throttle >= policy.max_throttle - 1e-9 && obs.throttle > 0.0;
    if at_most && stalled(since_change, STALL_WINDOW) && policy.allow_postcopy && !next.postcopy {
        next.postcopy = true;
        actions.push(Action::Postcopy {
            why: format!(
                "passes stopped shrinking at the highest throttle, {:.1}%: {:.0} MiB left",
                policy.max_throttle * 100.0,
                dirtied / MIB
            ),
        });
    }

    // The floor first: when a slice is too much, no throttle finishes,
    // and that is the reason to give; post-copy ends the passes, so the
    // throttle is not raised for them.
    if let Some(floor) = SliceFloor::of(obs) {
        judge_floor(
            &mut next,
            &floor,
            "the last pass",
            obs.bandwidth,
            policy,
            &mut actions,
        );
        if next.postcopy && !state.postcopy {
            throttle = state.throttle;
        }
    }
    // With post-copy allowed, a guest that needs a throttle above 99 %,
    // or one that would cost it about as much as post-copy or more, goes
    // to post-copy instead (`postcopy::instead_of_throttle` says why).
    if policy.allow_postcopy && !next.postcopy && throttle > state.throttle {
        let why = postcopy::instead_of_throttle(
            &Course {
                model: next.model,
                left: dirtied,
                bandwidth: obs.bandwidth,
                downtime,
                horizon,
            },
            throttle,
            policy,
        );
        if let Some(why) = why {
            next.postcopy = true;
            actions.push(Action::Postcopy { why });
            throttle = state.throttle;
        }
    }
    if worth_changing(state.throttle, throttle) {
        let measured = if next.model.rate_is_lower_bound {
            format!("at least {:.0} MiB/s", next.model.rate / MIB)
        } else {
            format!("{:.0} MiB/s", next.model.rate / MIB)
        };
        actions.push(Action::Throttle {
            to: throttle,
            why: format!(
                "guest dirties {measured} over a {:.0} MiB working set against {:.0} MiB/s; \
                 {:.0} MiB left",
                next.model.working_set / MIB,
                obs.bandwidth / MIB,
                dirtied / MIB
            ),
        });
        next.throttle = throttle;
        next.throttle_since = next.history.len();
    }
    if (downtime - state.downtime).abs() > 1e-6 {
        actions.push(Action::Downtime {
            to: downtime,
            why: format!(
                "no throttle up to {:.1}% completes within the {:.0} ms limit",
                policy.max_throttle * 100.0,
                state.downtime * 1000.0
            ),
        });
        next.downtime = downtime;
    }
    Decision {
        state: next,
        actions,
    }
}

/// Before the first sync, once a measurement is at hand: whether to
/// throttle for the rest of the first pass. A guest that outruns the link
/// rewrites its working set while the first pass runs, and the pass after
/// it sends all of it again; throttled from now it does not, at the cost
/// of the first pass's remaining time throttled. Both courses are
/// simulated (waiting for the first sync, then the controller; or the
/// cheapest fixed throttle from now) and weighed as `cheapest` weighs
/// throttles: waiting loses if it is much slower, or if it is slower and
/// saves no guest work. Throttling a first pass much longer than the
/// working set takes to send loses on guest work. With post-copy allowed
/// the first pass is left to the pre-flight's slice probe (a throttle
/// would stop it, and post-copy decided from it needs no throttle at
/// all). `remaining` is what the first pass still has to send.
pub fn at_start(
    state: &State,
    remaining: f64,
    bandwidth: f64,
    elapsed: f64,
    policy: &Policy,
) -> Decision {
    let unchanged = Decision {
        state: state.clone(),
        actions: Vec::new(),
    };
    let model = state.model;
    if policy.allow_postcopy
        || state.throttle > 0.0
        || model.rate <= 0.0
        || remaining <= 0.0
        || bandwidth <= 0.0
        || model.working_set <= bandwidth * state.downtime
    {
        return unchanged;
    }
    // As at a saturated first sync: a lower bound within a tenth of the
    // link says nothing of how much faster the guest is.
    let plan = if bound_near_link(&model, bandwidth) {
        at_its_worst(model)
    } else {
        model
    };
    let horizon = policy
        .budget
        .map_or(DEFAULT_HORIZON_SECS, |b| (b - elapsed).max(0.0));
    let scenario = Scenario {
        // The rest of a first pass.
        first_pass_whole: true,
        switchover_bandwidth: None,
        first_pass_bytes: remaining,
        model: plan,
        bandwidth,
        downtime: state.downtime,
        horizon,
    };
    let waiting = simulate_from(
        &scenario,
        remaining,
        0.0,
        0.0,
        &mut AdaptiveSim::new(*policy, Some(plan)),
    );
    let Some((throttle, downtime)) =
        cheapest(plan, remaining, bandwidth, horizon, state, policy, false)
    else {
        return unchanged;
    };
    if throttle <= 0.0 || (downtime - state.downtime).abs() > 1e-9 {
        return unchanged;
    }
    let now = simulate_from(&scenario, remaining, throttle, 0.0, &mut Fixed);
    // As `cheapest` weighs its choices: a course much slower than the
    // fastest is out, and of the rest the one losing least guest work wins.
    let better = now.converges
        && (!waiting.converges
            || waiting.total_secs > now.total_secs * TIME_FACTOR + TIME_SLACK_SECS
            || (now.total_secs < waiting.total_secs
                && now.work_lost_secs
                    <= waiting.work_lost_secs * (1.0 + COST_TOLERANCE) + COST_SLACK_SECS));
    if !better {
        return unchanged;
    }
    let measured = if model.rate_is_lower_bound {
        format!("at least {:.0} MiB/s", model.rate / MIB)
    } else {
        format!("{:.0} MiB/s", model.rate / MIB)
    };
    let mut next = state.clone();
    next.throttle = throttle;
    next.throttle_since = next.history.len();
    Decision {
        state: next,
        actions: vec![Action::Throttle {
            to: throttle,
            why: format!(
                "before the first sync: guest dirties {measured} over a {:.0} MiB working set \
                 against {:.0} MiB/s and would rewrite it while the first pass sends its last \
                 {:.0} MiB; predicted {:.1} s throttled now, {} from the first sync",
                model.working_set / MIB,
                bandwidth / MIB,
                remaining / MIB,
                now.total_secs,
                if waiting.converges {
                    format!("{:.1} s", waiting.total_secs)
                } else {
                    "no end".into()
                }
            ),
        }],
    }
}

/// When one slice of CPU lets the guest dirty more than the highest
/// downtime allowed lets through: switch to post-copy if allowed, else say
/// so once. (Raising the downtime to one slice was tried on the
/// benchmark's hot guest: passes then hold at several slices, each sync
/// stretched by the vCPU's quota, and convergence stayed a matter of
/// chance: 50 and 29 s, docs/CONVERGENCE.md.) `window` says where the
/// floor was seen, for the timeline.
fn judge_floor(
    next: &mut State,
    floor: &SliceFloor,
    window: &str,
    bandwidth: f64,
    policy: &Policy,
    actions: &mut Vec<Action>,
) {
    let downtime = policy.max_downtime.max(next.downtime);
    if bandwidth <= 0.0 || floor.bytes() <= bandwidth * downtime * SWITCHOVER_SHARE {
        return;
    }
    let what = format!(
        "{}, more than a {:.0} ms downtime lets through: a pass is small enough only if \
         the vCPU gets no slice in it",
        floor.describe(window),
        downtime * 1000.0
    );
    if policy.allow_postcopy && !next.postcopy {
        next.postcopy = true;
        next.floor_reported = true;
        actions.push(Action::Postcopy { why: what });
    } else if !next.floor_reported && !next.postcopy {
        next.floor_reported = true;
        actions.push(Action::Floor {
            mib: floor.bytes() / MIB,
            why: format!(
                "{what}, so throttling finishes by chance; --allow-postcopy would switch to \
                 post-copy here"
            ),
        });
    }
}

/// The pre-flight's probe of the slice floor (the writing vCPU briefly
/// under a hard throttle, see the migration crate's `slice_probe`): acts
/// on it between syncs as [`decide`] would on a pass, so that a guest no
/// throttle can finish goes to post-copy within seconds instead of after
/// the passes that climb to 99.9 %. `window` describes the probe.
pub fn at_probe(
    state: &State,
    floor: &SliceFloor,
    window: &str,
    bandwidth: f64,
    policy: &Policy,
) -> Decision {
    let mut next = state.clone();
    let mut actions = Vec::new();
    judge_floor(&mut next, floor, window, bandwidth, policy, &mut actions);
    Decision {
        state: next,
        actions,
    }
}

/// With post-copy allowed, `elapsed` seconds into the first pass and no
/// sync yet (none decided, none waiting to be): what the first sync will
/// decide, foreseen from the pre-flight's measurement
/// (`postcopy::foreseen`); a guest that sync would send to post-copy goes
/// now. The watcher asks once the pre-flight's probes are done.
pub fn before_first_sync(state: &State, bandwidth: f64, elapsed: f64, policy: &Policy) -> Decision {
    let mut next = state.clone();
    let mut actions = Vec::new();
    if let Some(why) = postcopy::foreseen(&next, bandwidth, elapsed, policy) {
        next.postcopy = true;
        actions.push(Action::Postcopy { why });
    }
    Decision {
        state: next,
        actions,
    }
}

fn worth_changing(from: f64, to: f64) -> bool {
    let (left_from, left_to) = ((1.0 - from).max(1e-6), (1.0 - to).max(1e-6));
    (to - from).abs() > HYSTERESIS
        || left_from.max(left_to) / left_from.min(left_to) > SHARE_HYSTERESIS
}

/// The controller as a simulator steering (for estimates and tests).
#[derive(Debug, Clone)]
pub struct AdaptiveSim {
    /// The policy.
    pub policy: Policy,
    /// The controller's state.
    pub state: State,
}

impl AdaptiveSim {
    /// A simulator steering with `policy`, from a pre-flight measurement if there is one.
    pub fn new(policy: Policy, preflight: Option<DirtyModel>) -> Self {
        AdaptiveSim {
            state: State::new(&policy, preflight),
            policy,
        }
    }

    /// The controller over a whole migration, as the watcher runs it: with
    /// a measurement at hand from the start, it may throttle before the
    /// first sync ([`at_start`]).
    pub fn run(scenario: &Scenario, policy: Policy, preflight: Option<DirtyModel>) -> Prediction {
        let mut sim = AdaptiveSim::new(policy, preflight);
        let start = at_start(
            &sim.state,
            scenario.first_pass_bytes,
            scenario.bandwidth,
            0.0,
            &policy,
        );
        sim.state = start.state;
        let throttle = sim.state.throttle;
        simulate_from(scenario, scenario.first_pass_bytes, throttle, 0.0, &mut sim)
    }
}

impl Steering for AdaptiveSim {
    fn at_sync(&mut self, view: &SyncView) -> Steer {
        let decision = decide(
            &self.state,
            &Observation {
                elapsed: view.elapsed,
                remaining: view.remaining,
                pass_secs: view.pass_secs,
                throttle: view.throttle,
                bandwidth: view.bandwidth,
                vcpu: None,
                hovering: false,
                first_pass: view.passes == 1,
            },
            &self.policy,
        );
        self.state = decision.state;
        let mut steer = Steer::default();
        for action in decision.actions {
            match action {
                Action::Throttle { to, .. } => steer.throttle = Some(to),
                Action::Downtime { to, .. } => steer.downtime = Some(to),
                Action::Postcopy { .. } => {
                    steer.postcopy = Some(self.policy.postcopy_bandwidth.unwrap_or(view.bandwidth));
                }
                Action::Floor { .. } => {}
            }
        }
        steer
    }
}
