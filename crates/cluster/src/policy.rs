//! Migration policies, kept in the cluster (`/livemig/policies/NAME`): a
//! selector on domains' labels and the migration settings they get. The
//! most specific matching policy (the most labels in its selector) applies,
//! ties going to the name that sorts first; a `migrate` option the user
//! gave wins over the policy.

use std::collections::BTreeMap;

use protocol::{ConvergeMode, MigrateOptions};
use serde::{Deserialize, Serialize};

use crate::connect::{decode, Cluster, ClusterError};

/// Where policies live.
const POLICIES: &str = "/livemig/policies/";

/// A policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    /// Its name.
    pub name: String,
    /// The labels a domain must carry, all of them.
    pub selector: BTreeMap<String, String>,
    /// How to converge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub converge: Option<ConvergeMode>,
    /// The downtime the controller may grow to, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_downtime_ms: Option<u64>,
    /// The highest vCPU throttle, percent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_throttle_pct: Option<f64>,
    /// The bandwidth, MiB/s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_mib_s: Option<u64>,
    /// The time limit, s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u64>,
    /// The controller may switch to post-copy.
    #[serde(default)]
    pub allow_postcopy: bool,
}

/// A policy that cannot be stored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// A name or selector that is not `KEY=VALUE` of plain names.
    #[error("{0}")]
    Malformed(String),
    /// Settings that contradict each other or the selector.
    #[error("{0}")]
    Contradictory(String),
}

fn plain(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 64
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Parses `KEY=VALUE[,KEY=VALUE...]`.
///
/// # Errors
/// [`PolicyError::Malformed`] naming what does not read.
pub fn parse_selector(text: &str) -> Result<BTreeMap<String, String>, PolicyError> {
    let mut selector = BTreeMap::new();
    for pair in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').ok_or_else(|| {
            PolicyError::Malformed(format!("selector {pair:?}: expected KEY=VALUE"))
        })?;
        if !plain(key) || !plain(value) {
            return Err(PolicyError::Malformed(format!(
                "selector {pair:?}: keys and values are letters, digits, '.', '_' or '-'"
            )));
        }
        if selector
            .insert(key.to_string(), value.to_string())
            .is_some()
        {
            return Err(PolicyError::Contradictory(format!(
                "selector names {key:?} twice"
            )));
        }
    }
    if selector.is_empty() {
        return Err(PolicyError::Malformed(
            "a selector names at least one label, KEY=VALUE".into(),
        ));
    }
    Ok(selector)
}

impl Policy {
    /// Checks the policy's name and settings.
    ///
    /// # Errors
    /// [`PolicyError`] saying what is wrong.
    pub fn check(&self) -> Result<(), PolicyError> {
        if !plain(&self.name) {
            return Err(PolicyError::Malformed(format!(
                "policy name {:?}: letters, digits, '.', '_' or '-'",
                self.name
            )));
        }
        let adaptive = self.converge == Some(ConvergeMode::Adaptive);
        if (self.max_downtime_ms.is_some()
            || self.max_throttle_pct.is_some()
            || self.allow_postcopy)
            && !adaptive
        {
            return Err(PolicyError::Contradictory(
                "--max-downtime, --max-throttle and --allow-postcopy steer the adaptive \
                 controller: give --converge adaptive too"
                    .into(),
            ));
        }
        if let Some(pct) = self.max_throttle_pct {
            if !(1.0..=99.0).contains(&pct) {
                return Err(PolicyError::Contradictory(format!(
                    "--max-throttle {pct}: between 1 and 99 percent"
                )));
            }
        }
        if self.bandwidth_mib_s == Some(0) || self.timeout_s == Some(0) {
            return Err(PolicyError::Contradictory(
                "a bandwidth or a time limit of 0 would never move anything".into(),
            ));
        }
        Ok(())
    }

    /// True when `labels` carry every label of the selector.
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.selector
            .iter()
            .all(|(k, v)| labels.get(k).is_some_and(|l| l == v))
    }

    /// `options` with this policy's settings where the user gave none.
    pub fn apply(&self, mut options: MigrateOptions) -> MigrateOptions {
        if options.converge.is_none() && !options.auto_converge {
            options.converge = self.converge;
        }
        options.max_downtime = options.max_downtime.or(self.max_downtime_ms);
        options.max_throttle = options.max_throttle.or(self.max_throttle_pct);
        options.bandwidth = options.bandwidth.or(self.bandwidth_mib_s);
        options.timeout = options.timeout.or(self.timeout_s);
        options.allow_postcopy |= self.allow_postcopy;
        options
    }
}

/// The policy that applies to a domain with `labels`: the most specific
/// match, ties to the first name.
pub fn choose<'a>(policies: &'a [Policy], labels: &BTreeMap<String, String>) -> Option<&'a Policy> {
    policies
        .iter()
        .filter(|p| p.selects(labels))
        .max_by(|a, b| {
            a.selector
                .len()
                .cmp(&b.selector.len())
                .then_with(|| b.name.cmp(&a.name))
        })
}

/// Whether the policy for a domain with `labels` lets its migration
/// switch to post-copy (no policy: no).
pub fn allows_postcopy(policies: &[Policy], labels: &BTreeMap<String, String>) -> bool {
    choose(policies, labels).is_some_and(|p| p.allow_postcopy)
}

impl Cluster {
    /// Stores `policy` (replacing one of its name).
    ///
    /// # Errors
    /// [`ClusterError::Etcd`]; check the policy first ([`Policy::check`]).
    pub async fn set_policy(&self, policy: &Policy) -> Result<(), ClusterError> {
        let value = serde_json::to_vec(policy).expect("a policy always serializes");
        crate::connect::bounded(self.client.clone().put(
            format!("{POLICIES}{}", policy.name),
            value,
            None,
        ))
        .await
        .map_err(self.etcd_error())?;
        Ok(())
    }

    /// Removes the policy `name`; returns whether there was one.
    ///
    /// # Errors
    /// [`ClusterError::Etcd`].
    pub async fn remove_policy(&self, name: &str) -> Result<bool, ClusterError> {
        let deleted = crate::connect::bounded(
            self.client
                .clone()
                .delete(format!("{POLICIES}{name}"), None),
        )
        .await
        .map_err(self.etcd_error())?;
        Ok(deleted.deleted() > 0)
    }

    /// Every policy, by name.
    ///
    /// # Errors
    /// [`ClusterError`].
    pub async fn policies(&self) -> Result<Vec<Policy>, ClusterError> {
        let got = self.get_prefix(POLICIES).await?;
        got.kvs()
            .iter()
            .map(|kv| decode(kv.key(), kv.value()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(name: &str, selector: &str) -> Policy {
        Policy {
            name: name.into(),
            selector: parse_selector(selector).unwrap(),
            converge: Some(ConvergeMode::Adaptive),
            max_downtime_ms: None,
            max_throttle_pct: None,
            bandwidth_mib_s: None,
            timeout_s: None,
            allow_postcopy: false,
        }
    }

    fn labels(text: &str) -> BTreeMap<String, String> {
        parse_selector(text).unwrap()
    }

    #[test]
    fn the_most_specific_selector_wins_and_ties_go_to_the_first_name() {
        let all = [
            policy("db", "tier=db"),
            policy("db-eu", "tier=db,zone=eu"),
            policy("zone", "zone=eu"),
            policy("a-zone", "zone=eu"),
        ];
        let pick = |l: &str| choose(&all, &labels(l)).map(|p| p.name.as_str());
        assert_eq!(pick("tier=db,zone=eu,x=y"), Some("db-eu"));
        assert_eq!(pick("tier=db"), Some("db"));
        assert_eq!(pick("zone=eu"), Some("a-zone"));
        assert_eq!(pick("tier=web"), None);
    }

    #[test]
    fn what_the_user_gave_wins_over_the_policy() {
        let p = Policy {
            max_downtime_ms: Some(500),
            allow_postcopy: true,
            bandwidth_mib_s: Some(64),
            ..policy("db", "tier=db")
        };
        let given = MigrateOptions {
            live: true,
            bandwidth: Some(16),
            converge: Some(ConvergeMode::Qemu),
            ..Default::default()
        };
        let applied = p.apply(given);
        assert_eq!(applied.bandwidth, Some(16));
        assert_eq!(applied.converge, Some(ConvergeMode::Qemu));
        assert_eq!(applied.max_downtime, Some(500));
        let plain = p.apply(MigrateOptions {
            live: true,
            ..Default::default()
        });
        assert_eq!(plain.converge, Some(ConvergeMode::Adaptive));
        assert_eq!(plain.bandwidth, Some(64));
        // --auto-converge is a choice of converger too.
        let qemu = p.apply(MigrateOptions {
            live: true,
            auto_converge: true,
            ..Default::default()
        });
        assert_eq!(qemu.converge, None);
    }

    #[test]
    fn malformed_or_contradictory_policies_are_refused() {
        for bad in ["", "tier", "tier=", "=db", "tier=d b", "tier=db,tier=web"] {
            assert!(parse_selector(bad).is_err(), "{bad:?}");
        }
        let mut p = policy("db", "tier=db");
        p.converge = Some(ConvergeMode::Qemu);
        p.max_downtime_ms = Some(500);
        assert!(matches!(p.check(), Err(PolicyError::Contradictory(_))));
        let mut p = policy("db", "tier=db");
        p.max_throttle_pct = Some(150.0);
        assert!(p.check().is_err());
        assert!(policy("bad name", "tier=db").check().is_err());
        policy("db", "tier=db").check().unwrap();
    }
}
