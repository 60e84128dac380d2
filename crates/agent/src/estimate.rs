//! `estimate` and `migrate --dry-run`: measure the guest, predict the move
//! (the work is `migration::estimate`'s).

use std::sync::Arc;
use std::time::Duration;

use domain::DomainName;
use migration::estimate::disks::DiskFacts;
use migration::estimate::{PastJob, Subject};
use migration::vcpu_throttle;
use protocol::estimate::EstimateParams;
use protocol::job::JobStatus;
use protocol::{ApiError, ConvergeMode, Reply};

use crate::errors;
use crate::state::Agent;

/// Recent jobs of the domain looked through for predictions to learn from.
const HISTORY_LOOKBACK: u32 = 50;

pub(crate) async fn estimate(
    agent: &Arc<Agent>,
    name: &DomainName,
    params: EstimateParams,
) -> Result<Reply, ApiError> {
    let d = agent.table.get(name)?;
    let (tunables, definition) = (d.tunables, d.definition);
    let vm = d.vm.ok_or_else(|| {
        errors::operation_invalid(format!(
            "domain '{name}' is not running: nothing to measure"
        ))
    })?;
    let disks: Vec<DiskFacts> = definition
        .disks
        .iter()
        .enumerate()
        .map(|(i, disk)| DiskFacts {
            target: disk.target_name(i),
            shared: disk.shared,
        })
        .collect();
    let mechanism = vcpu_throttle::available(&agent.throttle_place());
    let ram_in_use_bytes = ram_in_use(agent, &vm).await;
    let subject = Subject {
        domain: name.as_str(),
        ram_bytes: vm.spec.ram.bytes,
        ram_in_use_bytes,
        tunables,
        mechanism: &mechanism,
        disks: &disks,
        path: agent.config.path_bandwidth(),
    };
    let measurement = vm
        .measurements
        .fresh_or_measure(&vm, params.max_age_s.map(Duration::from_secs))
        .await
        .map_err(|e| errors::qemu_failed(&e))?;
    let mut report = migration::estimate::report(&measurement, subject, params)
        .map_err(|e| errors::qemu_failed(&e))?;
    migration::estimate::calibrate(&mut report, &past_jobs(agent, name).await);
    Ok(Reply::Estimate(Box::new(report)))
}

/// The part of the guest's RAM that holds anything; unreadable, the
/// prediction counts all of it, which is no reason to fail.
pub(crate) async fn ram_in_use(agent: &Agent, vm: &crate::running::RunningVm) -> Option<u64> {
    agent
        .hypervisor
        .ram_in_use(&vm.process, vm.spec.ram.bytes)
        .await
        .inspect_err(|e| tracing::warn!(error = %types::error_chain(e), "guest RAM in use unknown: the whole RAM is counted"))
        .ok()
}

/// The domain's completed migrations from this host that made a
/// prediction, with their convergence mode, newest first. Without a
/// readable history there is nothing to calibrate on, which is no reason
/// to fail the estimate.
async fn past_jobs(agent: &Agent, name: &DomainName) -> Vec<(ConvergeMode, PastJob)> {
    let jobs = match agent
        .history
        .list(Some(name.as_str().to_string()), HISTORY_LOOKBACK)
        .await
    {
        Ok(jobs) => jobs,
        Err(e) => {
            tracing::warn!(error = %e, "job history unreadable: estimate not calibrated");
            return Vec::new();
        }
    };
    jobs.iter()
        .filter(|j| j.role == "source" && j.status == JobStatus::Completed.to_string())
        .filter_map(|j| {
            // Records from before the mode was kept have none: plain.
            let name = if j.converge.is_empty() {
                "none"
            } else {
                &j.converge
            };
            let mode = ConvergeMode::from_name(name)?;
            Some((
                mode,
                PastJob {
                    predicted_secs: j.predicted_total_ms? as f64 / 1000.0,
                    real_secs: j.total_time_ms as f64 / 1000.0,
                },
            ))
        })
        .collect()
}
