//! `estimate` and `migrate --dry-run`: measure the guest, predict the move
//! (the work is `migration::estimate`'s).

use std::sync::Arc;

use domain::DomainName;
use migration::estimate::disks::DiskFacts;
use migration::estimate::Subject;
use migration::vcpu_throttle;
use protocol::estimate::EstimateParams;
use protocol::{ApiError, Reply};

use crate::errors;
use crate::state::Agent;

pub(crate) async fn estimate(
    agent: &Arc<Agent>,
    name: &DomainName,
    params: EstimateParams,
) -> Result<Reply, ApiError> {
    let (vm, tunables, definition) = agent.with_domain(name, |d| {
        let vm = d.vm.clone().ok_or_else(|| {
            errors::operation_invalid(format!(
                "domain '{name}' is not running: nothing to measure"
            ))
        })?;
        Ok((vm, d.tunables, d.definition.clone()))
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
    let mechanism = vcpu_throttle::available(&agent.config.throttle_place());
    let subject = Subject {
        domain: name.as_str(),
        ram_bytes: vm.spec.ram.bytes,
        tunables,
        mechanism: &mechanism,
        disks: &disks,
    };
    let report = migration::estimate::estimate(vm.process.qmp(), subject, params)
        .await
        .map_err(|e| errors::qemu(errors::chain(&e)))?;
    Ok(Reply::Estimate(Box::new(report)))
}
