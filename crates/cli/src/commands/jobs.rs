//! Migration jobs: the running one, its limits, estimates, finished jobs
//! and their reports; and raw QMP.

use std::path::Path;

use anyhow::{bail, Context, Result};
use protocol::call::{self, JobState};
use protocol::estimate::EstimateParams;
use protocol::Client;

use super::json;
use crate::agent::{call, domain};
use crate::output;

/// `domjobinfo [--completed]`.
pub async fn domjobinfo(
    client: &Client,
    name: &str,
    completed: bool,
    as_json: bool,
) -> Result<String> {
    let domain = domain(name)?;
    let job = call(client, call::DomJobInfo { domain, completed }).await?;
    match job {
        _ if as_json => json(&job),
        Some(job) => Ok(output::job_info(&job)),
        None => Ok("Job type:  None\n".into()),
    }
}

/// `domjobabort`.
pub async fn domjobabort(client: &Client, name: &str) -> Result<String> {
    call(
        client,
        call::DomJobAbort {
            domain: domain(name)?,
        },
    )
    .await?;
    Ok(format!("Abort requested for the job of '{name}'\n"))
}

/// `migrate-setspeed`.
pub async fn setspeed(client: &Client, name: &str, bandwidth_mib_s: u64) -> Result<String> {
    let domain = domain(name)?;
    call(
        client,
        call::MigrateSetSpeed {
            domain,
            bandwidth_mib_s,
        },
    )
    .await?;
    Ok(String::new())
}

/// `migrate-setmaxdowntime`.
pub async fn setmaxdowntime(client: &Client, name: &str, downtime_ms: u64) -> Result<String> {
    let domain = domain(name)?;
    call(
        client,
        call::MigrateSetMaxDowntime {
            domain,
            downtime_ms,
        },
    )
    .await?;
    Ok(String::new())
}

/// `migrate-postcopy`.
pub async fn postcopy(client: &Client, name: &str) -> Result<String> {
    call(
        client,
        call::MigratePostcopy {
            domain: domain(name)?,
        },
    )
    .await?;
    Ok(String::new())
}

/// `estimate`.
pub async fn estimate(
    client: &Client,
    name: &str,
    params: EstimateParams,
    as_json: bool,
) -> Result<String> {
    let domain = domain(name)?;
    let report = call(client, call::Estimate { domain, params }).await?;
    if as_json {
        json(&report)
    } else {
        Ok(output::estimate(&report))
    }
}

/// `jobs [--domain NAME] [--limit N]`.
pub async fn list(
    client: &Client,
    name: Option<&str>,
    limit: u32,
    as_json: bool,
) -> Result<String> {
    let domain = name.map(domain).transpose()?;
    let jobs = call(client, call::Jobs { domain, limit }).await?;
    if as_json {
        json(&jobs)
    } else {
        Ok(output::job_list(&jobs))
    }
}

/// `job ID`: live while it runs, its record once it ended.
pub async fn job(client: &Client, id: &str, as_json: bool) -> Result<String> {
    match call(client, call::Job { id: id.to_string() }).await? {
        JobState::Ended(record) if as_json => json(&record),
        JobState::Active(job) if as_json => json(&job),
        JobState::Ended(record) => Ok(output::record_summary(&record)),
        JobState::Active(job) => Ok(output::job_info(&job)),
    }
}

/// `report ID -o FILE`.
pub async fn report(client: &Client, id: &str, path: &Path) -> Result<String> {
    let record = match call(client, call::Job { id: id.to_string() }).await? {
        JobState::Ended(record) => record,
        JobState::Active(_) => {
            bail!("job {id} is still running: report it once it has finished")
        }
    };
    report::write(&record, path)
        .with_context(|| format!("cannot write the report to {}", path.display()))?;
    Ok(format!(
        "Report of job {id} written to {}\n",
        path.display()
    ))
}

/// `qemu-monitor-command DOMAIN JSON`: QMP's answer, as QEMU gave it.
pub async fn monitor_command(client: &Client, name: &str, command: &str) -> Result<String> {
    let command: serde_json::Value = serde_json::from_str(command)
        .context("the command must be JSON, e.g. '{\"execute\":\"query-status\"}'")?;
    let domain = domain(name)?;
    let result = call(client, call::QemuMonitorCommand { domain, command }).await?;
    json(&serde_json::json!({ "return": result }))
}
