//! When post-copy beats the throttle, with the user allowing both: at a
//! sync that would raise the throttle ([`super::decide`]), and before the
//! first sync, from what the pre-flight measured ([`foreseen`]).

use super::{
    at_its_worst, bound_floor, bound_near_link, cheapest, Policy, State, COST_SLACK_SECS,
    COST_TOLERANCE, DEFAULT_HORIZON_SECS,
};
use crate::model::{simulate_from, DirtyModel, Fixed, Scenario, HELD_ABOVE};
use types::units::MIB_F64 as MIB;

/// The pre-flight's shortest measurement window (QEMU measures whole
/// seconds): a guest whose working set filled within it has dirtied all of
/// it again by the time a pass has run this long.
const PREFLIGHT_WINDOW_SECS: f64 = 1.0;

/// Where the passes stand when the throttle would go up.
#[derive(Debug, Clone, Copy)]
pub(super) struct Course {
    /// The guest as the controller sees it.
    pub model: DirtyModel,
    /// What is left to send, bytes.
    pub left: f64,
    /// The link, bytes/s.
    pub bandwidth: f64,
    /// The downtime limit the throttle was chosen for, seconds.
    pub downtime: f64,
    /// Seconds left to finish in.
    pub horizon: f64,
}

/// Why the guest should go to post-copy rather than take `throttle`, if
/// it should. Above [`HELD_ABOVE`] the host throttle's periods are a
/// second long: a vCPU out of its quota waits up to that second, its
/// QEMU's passes stalled behind it for seconds (the drain benchmark's hot
/// guest: 4 to 39 s, converging by chance), where post-copy takes what
/// the link carries. Below it, a throttle whose course costs the guest
/// about as much as post-copy would or more ([`dearer_than_postcopy`]):
/// the user allowed both, and the guest should lose the least.
pub(super) fn instead_of_throttle(
    course: &Course,
    throttle: f64,
    policy: &Policy,
) -> Option<String> {
    let model = course.model;
    let rate = format!(
        "it dirties {} MiB/s{} over a {:.0} MiB working set against {:.0} MiB/s",
        (model.rate / MIB).round(),
        if model.rate_is_lower_bound {
            " or more"
        } else {
            ""
        },
        model.working_set / MIB,
        course.bandwidth / MIB,
    );
    if throttle > HELD_ABOVE + 1e-9 {
        return Some(format!(
            "the guest would need a {:.2}% throttle ({rate}), where a throttled vCPU waits \
             a second at a time and passes stall",
            throttle * 100.0,
        ));
    }
    let scenario = Scenario {
        first_pass_whole: false,
        switchover_bandwidth: None,
        first_pass_bytes: course.left,
        model,
        bandwidth: course.bandwidth,
        downtime: course.downtime,
        horizon: course.horizon,
    };
    let postcopy_bandwidth = policy.postcopy_bandwidth.unwrap_or(course.bandwidth);
    let (throttled, postcopy) = dearer_than_postcopy(&scenario, throttle, postcopy_bandwidth)?;
    let throttled = if throttled.is_finite() {
        format!("cost the guest {throttled:.2} s of work")
    } else {
        format!("not finish within {:.0} s", course.horizon)
    };
    Some(format!(
        "a {:.1}% throttle would {throttled} ({rate}), post-copy at most {postcopy:.2} s: \
         {:.0} MiB left",
        throttle * 100.0,
        course.left / MIB,
    ))
}

/// Before the first sync, with post-copy allowed: what [`super::decide`]
/// will do at it, for a guest whose pre-flight measurement filled its
/// working set within its one-second window (the rate a lower bound) once
/// the first pass has run longer than that. That sync then finds the
/// working set dirtied again, whatever the pass sent of it; if the
/// controller would send the guest to post-copy there rather than
/// throttle it, why, so that it goes now. The drain benchmark's hot and
/// heavy guests, on a third or half of the link, ran first passes of 1.2
/// to 3 s (mostly memory they never touch) before a sync that sent them
/// to post-copy, the link's share spent meanwhile on pages they dirtied
/// again. A guest the measurement says converges on its own (a rate
/// bound well below the link that fits the passes) is left to the sync.
pub(super) fn foreseen(
    state: &State,
    bandwidth: f64,
    elapsed: f64,
    policy: &Policy,
) -> Option<String> {
    let model = state.model;
    let waited_long_enough = elapsed >= PREFLIGHT_WINDOW_SECS;
    if !policy.allow_postcopy
        || state.postcopy
        || state.throttle > 0.0
        || !state.history.is_empty()
        || !model.rate_is_lower_bound
        || model.rate <= 0.0
        || bandwidth <= 0.0
        || !waited_long_enough
    {
        return None;
    }
    let left = model.working_set;
    if left <= bandwidth * state.downtime {
        return None;
    }
    let horizon = policy
        .budget
        .map_or(DEFAULT_HORIZON_SECS, |b| (b - elapsed).max(0.0));
    // As `decide` plans at a saturated sync.
    let plan = if bound_near_link(&model, bandwidth) {
        at_its_worst(model)
    } else {
        model
    };
    let Some((throttle, downtime)) = cheapest(plan, left, bandwidth, horizon, state, policy, false)
    else {
        return Some(format!(
            "foreseen for the first sync: no throttle up to {:.1}% completes within {:.0} s \
             (the guest dirtied its {:.0} MiB working set within the pre-flight's second, \
             against {:.0} MiB/s)",
            policy.max_throttle * 100.0,
            horizon,
            model.working_set / MIB,
            bandwidth / MIB
        ));
    };
    let throttle = throttle
        .max(bound_floor(&model, bandwidth, state.downtime))
        .min(policy.max_throttle);
    if throttle <= 0.0 {
        return None;
    }
    let course = Course {
        model,
        left,
        bandwidth,
        downtime,
        horizon,
    };
    instead_of_throttle(&course, throttle, policy)
        .map(|why| format!("foreseen for the first sync: {why}"))
}

/// The guest work a throttle's course from `scenario` costs and the most
/// post-copy from there would, in seconds, if the throttle costs about as
/// much or more. Post-copy sends what is left once, at `postcopy_bandwidth`, the
/// guest running on the destination and waiting only for pages not there
/// yet: counted as losing all of that time (the fastest writer lost 93 %
/// of it, docs/CONVERGENCE.md). A throttle loses its share of every pass
/// still to come and the downtime; and under TCG a vCPU throttled to its
/// last milliseconds stalls the passes themselves, which the model leaves
/// out (the drain benchmark's heavy guest sat at 95–99 % for 1–4 s where
/// the model gave it half a second).
pub fn dearer_than_postcopy(
    scenario: &Scenario,
    throttle: f64,
    postcopy_bandwidth: f64,
) -> Option<(f64, f64)> {
    let postcopy = scenario.first_pass_bytes / postcopy_bandwidth.max(1.0);
    let course = simulate_from(
        scenario,
        scenario.first_pass_bytes,
        throttle,
        0.0,
        &mut Fixed,
    );
    let throttled = if course.converges {
        course.work_lost_secs
    } else {
        f64::INFINITY
    };
    // Within the tolerance `cheapest` allows between throttles, post-copy
    // wins: the throttle's figure is its least (the rate's lower bound,
    // no stall), post-copy's its most. Near 100 % the two meet (the
    // guest all but stopped while what is left crosses the link), and a
    // bare comparison decided the drain benchmark's heavy guest by
    // rounding (0.96 s against 0.96 s, once each way).
    (throttled * (1.0 + COST_TOLERANCE) + COST_SLACK_SECS >= postcopy)
        .then_some((throttled, postcopy))
}
