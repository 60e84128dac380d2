//! Starting a drain's migration on its source agent, and re-splitting its
//! bandwidth.

use std::collections::BTreeMap;

use cluster::Policy;
use protocol::call;
use protocol::{Client, ConvergeMode, MigrateOptions};

use crate::survey::{Agents, FleetError};

/// A drain's migration options: live, the guest defined on its new host
/// and no longer on the drained one, its disks that are not on shared
/// storage copied with it (the shared ones stay where they are), the
/// stream encrypted between TLS agents, the domain's policy where it has
/// one, and livemig's controller making it converge where the policy says
/// nothing.
pub fn options(
    policies: &[Policy],
    labels: &BTreeMap<String, String>,
    bandwidth_mib_s: u64,
    tls: bool,
) -> MigrateOptions {
    let base = MigrateOptions {
        live: true,
        persistent: true,
        undefine_source: true,
        copy_storage_all: true,
        tls,
        ..MigrateOptions::default()
    };
    let mut options = match cluster::policy::choose(policies, labels) {
        Some(policy) => policy.apply(base),
        None => base,
    };
    if options.converge.is_none() && !options.auto_converge {
        options.converge = Some(ConvergeMode::Adaptive);
    }
    // A policy's bandwidth is a ceiling on the share, never a floor.
    options.bandwidth = Some(
        options
            .bandwidth
            .map_or(bandwidth_mib_s, |b| b.min(bandwidth_mib_s)),
    );
    options
}

/// Starts `domain`'s migration to the agent at `destination`; its job id.
///
/// # Errors
/// The source agent's refusal or silence.
pub async fn start(
    agents: &Agents,
    source: &Client,
    source_host: &str,
    domain: types::DomainName,
    destination: &str,
    flags: MigrateOptions,
) -> Result<String, FleetError> {
    let migration = agents
        .call(
            source,
            source_host,
            call::Migrate {
                domain,
                destination: destination.to_string(),
                flags,
            },
        )
        .await?;
    match migration {
        call::Migration::Started(id) => Ok(id),
        call::Migration::DryRun(_) => unreachable!("a drain never asks for a dry run"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drain_migrates_live_for_good_with_the_domains_policy_and_its_share() {
        let plain = options(&[], &BTreeMap::new(), 50, true);
        assert!(plain.live && plain.persistent && plain.undefine_source && plain.tls);
        assert!(plain.copy_storage_all, "a local disk goes with its guest");
        assert_eq!(plain.converge, Some(ConvergeMode::Adaptive));
        assert_eq!(plain.bandwidth, Some(50));

        let db = Policy {
            name: "db".into(),
            selector: [("tier".to_string(), "db".to_string())].into(),
            converge: Some(ConvergeMode::Qemu),
            max_downtime_ms: None,
            max_throttle_pct: None,
            bandwidth_mib_s: Some(30),
            timeout_s: Some(120),
            allow_postcopy: false,
        };
        let labels = [("tier".to_string(), "db".to_string())].into();
        let o = options(std::slice::from_ref(&db), &labels, 50, false);
        assert_eq!(o.converge, Some(ConvergeMode::Qemu));
        assert_eq!(o.bandwidth, Some(30));
        assert_eq!(o.timeout, Some(120));
        let o = options(&[db], &labels, 20, false);
        assert_eq!(o.bandwidth, Some(20));
    }
}
