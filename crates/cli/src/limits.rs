//! `migrate-getspeed` and `migrate-getmaxdowntime`: the limit a running
//! job uses, else the one the next migration of the domain gets.

use anyhow::Result;
use protocol::call;
use protocol::domain::DomainInfo;
use protocol::job::{JobInfo, Role};
use protocol::migrate::DEFAULT_DOWNTIME_MS;
use protocol::Client;
use serde_json::json;

use crate::agent::{call, domain};
use crate::commands::json;

/// Where a limit comes from.
fn origin(job: bool, domain: bool) -> &'static str {
    match (job, domain) {
        (true, _) => "running job",
        (false, true) => "domain setting",
        (false, false) => "default",
    }
}

async fn lookup(client: &Client, name: &str) -> Result<(DomainInfo, Option<JobInfo>)> {
    let info = crate::commands::domains::info(client, name).await?;
    let job = call(
        client,
        call::DomJobInfo {
            domain: domain(name)?,
            completed: false,
        },
    )
    .await?
    .map(|j| *j)
    .filter(|j| j.role == Role::Source);
    Ok((info, job))
}

/// `migrate-getspeed`.
pub async fn speed(client: &Client, name: &str, as_json: bool) -> Result<String> {
    let (info, job) = lookup(client, name).await?;
    let from_job = job.and_then(|j| j.bandwidth_limit_mib_s);
    let bandwidth = from_job.or(info.tunables.bandwidth_mib_s);
    let origin = origin(from_job.is_some(), info.tunables.bandwidth_mib_s.is_some());
    if as_json {
        json(&json!({"domain": name, "bandwidth_mib_s": bandwidth, "from": origin}))
    } else {
        Ok(match bandwidth {
            Some(b) => format!("{b}\n"),
            None => "unlimited\n".into(),
        })
    }
}

/// `migrate-getmaxdowntime`.
pub async fn max_downtime(client: &Client, name: &str, as_json: bool) -> Result<String> {
    let (info, job) = lookup(client, name).await?;
    let from_job = job.and_then(|j| j.downtime_limit_ms);
    let downtime = from_job
        .or(info.tunables.downtime_ms)
        .unwrap_or(DEFAULT_DOWNTIME_MS);
    let origin = origin(from_job.is_some(), info.tunables.downtime_ms.is_some());
    if as_json {
        json(&json!({"domain": name, "downtime_ms": downtime, "from": origin}))
    } else {
        Ok(format!("{downtime}\n"))
    }
}
