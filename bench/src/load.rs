//! `livemig-bench load`: API latency on the source agent while several
//! migrations run: clients on their own connections hammer `list`,
//! `dominfo` and `domjobinfo` and the request latencies are reported as
//! percentiles, per request type.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use guest::Workload;
use protocol::MigrateOptions;
use protocol::Reply;
use protocol::{Client, Request};
use serde::Serialize;

use crate::convergence::Hosts;
use crate::procstat::percentile;

const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub request: String,
    pub count: usize,
    pub errors: usize,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    pub domains: usize,
    pub clients: usize,
    pub requests: usize,
    pub seconds: f64,
    pub requests_per_second: f64,
    pub migrations_completed: usize,
    pub latencies: Vec<Latency>,
}

pub async fn run(
    livemigd: &Path,
    domains: usize,
    clients: usize,
    requests: usize,
) -> Result<LoadReport> {
    let hosts = Hosts::start(livemigd).await?;
    let result = load(&hosts, domains, clients, requests).await;
    hosts.stop().await;
    result
}

async fn load(
    hosts: &Hosts,
    domains: usize,
    clients: usize,
    requests: usize,
) -> Result<LoadReport> {
    // Light guests over a modest cap: the migrations take a while and all
    // converge.
    let workload = Workload {
        working_set_mib: 16,
        spin: 250_000,
        report_ms: 500,
    };
    let names: Vec<String> = (0..domains).map(|i| format!("load{i}")).collect();
    for name in &names {
        hosts.start_guest(name, 64, workload).await?;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut jobs = Vec::new();
    for name in &names {
        let flags = MigrateOptions {
            live: true,
            bandwidth: Some(8),
            ..Default::default()
        };
        match hosts
            .a_client
            .request(
                Request::Migrate {
                    domain: name.parse()?,
                    destination: hosts.b_uri().to_string(),
                    flags: Box::new(flags),
                },
                REQUEST_TIMEOUT,
            )
            .await?
        {
            Reply::MigrationStarted { job_id } => jobs.push(job_id),
            other => bail!("unexpected reply {other:?}"),
        }
    }

    let started = Instant::now();
    let per_client = requests / clients.max(1);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let uri = hosts.a_uri();
        let names = names.clone();
        tasks.push(tokio::spawn(async move {
            let client = Client::connect(&uri).await?;
            let mut samples: Vec<(&'static str, f64, bool)> = Vec::with_capacity(per_client);
            for i in 0..per_client {
                let name = names[(c + i) % names.len()].parse()?;
                let (kind, request) = match i % 3 {
                    0 => ("list", Request::List { all: true }),
                    1 => ("dominfo", Request::DomInfo { domain: name }),
                    _ => (
                        "domjobinfo",
                        Request::DomJobInfo {
                            domain: name,
                            completed: false,
                        },
                    ),
                };
                let t = Instant::now();
                let ok = client.request(request, REQUEST_TIMEOUT).await.is_ok();
                samples.push((kind, t.elapsed().as_secs_f64() * 1000.0, ok));
            }
            anyhow::Ok(samples)
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.map_err(|e| anyhow!(e))??);
    }
    let seconds = started.elapsed().as_secs_f64();

    let mut completed = 0;
    for job in &jobs {
        loop {
            match hosts
                .a_client
                .request(Request::Job { id: job.clone() }, REQUEST_TIMEOUT)
                .await?
            {
                Reply::Job {
                    record: Some(r), ..
                } => {
                    if r.status == protocol::job::JobStatus::Completed {
                        completed += 1;
                    }
                    break;
                }
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }
    for name in &names {
        let _ = hosts
            .b_client
            .request(
                Request::Destroy {
                    domain: name.parse()?,
                },
                REQUEST_TIMEOUT,
            )
            .await;
    }

    let latencies = ["list", "dominfo", "domjobinfo"]
        .iter()
        .map(|kind| {
            let mut ms: Vec<f64> = all.iter().filter(|s| s.0 == *kind).map(|s| s.1).collect();
            ms.sort_by(f64::total_cmp);
            Latency {
                request: kind.to_string(),
                count: ms.len(),
                errors: all.iter().filter(|s| s.0 == *kind && !s.2).count(),
                p50_ms: percentile(&ms, 50.0),
                p90_ms: percentile(&ms, 90.0),
                p99_ms: percentile(&ms, 99.0),
                max_ms: ms.last().copied().unwrap_or(0.0),
            }
        })
        .collect();
    Ok(LoadReport {
        domains,
        clients,
        requests: all.len(),
        seconds,
        requests_per_second: all.len() as f64 / seconds,
        migrations_completed: completed,
        latencies,
    })
}
