//! `estimate` and `migrate --dry-run`: measure the guest, predict the move.

use std::sync::Arc;

use converge::estimate::{fit, predict};
use converge::throttle::{HostThrottle, MAX_HOST_THROTTLE};
use converge::Policy;
use domain::DomainName;
use migration::settings::DEFAULT_DOWNTIME_MS;
use protocol::message::Reply;
use protocol::types::{EstimateParams, EstimateReport};
use protocol::ApiError;

use crate::errors;
use crate::state::Agent;

const MIB: f64 = 1024.0 * 1024.0;
/// Link speed assumed when none is given (10 GbE, roughly).
const ASSUMED_BANDWIDTH_MIB_S: u64 = 1024;
/// Measurement windows, seconds: two, to tell a rate from a working set.
const WINDOWS: [i64; 2] = [1, 3];

pub(crate) async fn estimate(
    agent: &Arc<Agent>,
    name: &DomainName,
    params: EstimateParams,
) -> Result<Reply, ApiError> {
    let (vm, tunables) = agent.with_domain(name, |d| {
        let vm = d.vm.clone().ok_or_else(|| {
            errors::operation_invalid(format!(
                "domain '{name}' is not running: nothing to measure"
            ))
        })?;
        Ok((vm, d.tunables))
    })?;
    let samples = migration::dirty::measure(vm.process.qmp(), &WINDOWS)
        .await
        .map_err(errors::qemu)?;
    let ram = vm.spec.ram.bytes as f64;
    let model = fit(&samples, ram).ok_or_else(|| errors::qemu("no dirty-rate samples"))?;

    let given = params.bandwidth_mib_s.or(tunables.bandwidth_mib_s);
    let bandwidth = given.unwrap_or(ASSUMED_BANDWIDTH_MIB_S) as f64 * MIB;
    let downtime_ms = params
        .downtime_ms
        .or(tunables.downtime_ms)
        .unwrap_or(DEFAULT_DOWNTIME_MS);
    let mechanism = if HostThrottle::available(&agent.config.cgroup_cpu) {
        MAX_HOST_THROTTLE
    } else {
        0.99
    };
    let max_throttle = (params.max_throttle_pct.unwrap_or(99.9) / 100.0).min(mechanism);
    let downtime = downtime_ms as f64 / 1000.0;
    let policy = Policy {
        max_throttle,
        downtime,
        max_downtime: downtime,
        budget: params.timeout_s.map(|s| s as f64),
        allow_postcopy: false,
    };
    Ok(Reply::Estimate(Box::new(EstimateReport {
        domain: name.to_string(),
        guest_ram_bytes: vm.spec.ram.bytes,
        bandwidth_bytes_s: bandwidth,
        bandwidth_assumed: given.is_none(),
        downtime_ms,
        budget_s: policy.budget,
        max_throttle_pct: max_throttle * 100.0,
        samples,
        model,
        predictions: predict(model, ram, bandwidth, &policy),
    })))
}
