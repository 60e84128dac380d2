//! The host vCPU throttles an agent holds, seen from outside a job: what a
//! crashed agent left behind is lifted at start-up and by the systemd
//! unit's stop hook (`livemigd release-throttles`).

use migration::vcpu_throttle::cgroup::{release_scope, Hierarchy};

use crate::Config;

/// Lifts every throttle this agent's scope holds; returns how many. A host
/// without a usable cgroup hierarchy holds none.
pub fn release_stale_throttles(config: &Config) -> usize {
    let place = config.throttle_place();
    let Ok(hierarchy) = Hierarchy::probe(&place.root) else {
        return 0;
    };
    release_scope(&hierarchy, &place.scope).unwrap_or(0)
}
