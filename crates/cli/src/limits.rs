//! `migrate-getspeed` and `migrate-getmaxdowntime`: the limit a running
//! job uses, else the one the next migration of the domain gets.

use anyhow::Result;
use protocol::domain::DomainInfo;
use protocol::job::{JobInfo, Role};
use protocol::migrate::DEFAULT_DOWNTIME_MS;
use protocol::{Client, Reply, Request};
use serde_json::json;

use crate::{domain, dominfo, print_json, request, unexpected};

/// Where a limit comes from.
fn origin(job: bool, domain: bool) -> &'static str {
    match (job, domain) {
        (true, _) => "running job",
        (false, true) => "domain setting",
        (false, false) => "default",
    }
}

async fn lookup(client: &Client, name: &str) -> Result<(DomainInfo, Option<JobInfo>)> {
    let info = dominfo(client, name).await?;
    let job = match request(
        client,
        Request::DomJobInfo {
            domain: domain(name)?,
            completed: false,
        },
    )
    .await?
    {
        Reply::JobInfo { job } => job.map(|j| *j).filter(|j| j.role == Role::Source),
        other => return Err(unexpected(other)),
    };
    Ok((info, job))
}

pub async fn speed(client: &Client, name: &str, json: bool) -> Result<()> {
    let (info, job) = lookup(client, name).await?;
    let from_job = job.and_then(|j| j.bandwidth_limit_mib_s);
    let bandwidth = from_job.or(info.tunables.bandwidth_mib_s);
    let origin = origin(from_job.is_some(), info.tunables.bandwidth_mib_s.is_some());
    if json {
        print_json(&json!({"domain": name, "bandwidth_mib_s": bandwidth, "from": origin}))?;
    } else {
        match bandwidth {
            Some(b) => println!("{b}"),
            None => println!("unlimited"),
        }
    }
    Ok(())
}

pub async fn max_downtime(client: &Client, name: &str, json: bool) -> Result<()> {
    let (info, job) = lookup(client, name).await?;
    let from_job = job.and_then(|j| j.downtime_limit_ms);
    let downtime = from_job
        .or(info.tunables.downtime_ms)
        .unwrap_or(DEFAULT_DOWNTIME_MS);
    let origin = origin(from_job.is_some(), info.tunables.downtime_ms.is_some());
    if json {
        print_json(&json!({"domain": name, "downtime_ms": downtime, "from": origin}))?;
    } else {
        println!("{downtime}");
    }
    Ok(())
}
