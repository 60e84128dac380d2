//! `livemig-bench tls`: what mutual TLS costs, side by side in one run.
//!
//! - Migration: the same guest migrated back and forth between two agents
//!   on loopback with no bandwidth cap, alternately with and without
//!   `--tls` (the order rotates each repetition); total time, downtime,
//!   throughput, and the guest's memory check after each landing.
//! - API: sequential requests to one agent over its unix socket and over
//!   mutual TLS (one connection each), and new connections (connect, TLS
//!   handshake, `hello`) over each.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use guest::{SerialLog, Workload};
use protocol::job::JobStatus;
use protocol::{AgentUri, Client, MigrateOptions, Reply, Request};
use serde::Serialize;

use crate::convergence::Hosts;
use crate::median;
use crate::procstat::percentile;

const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
const MEMORY_MIB: u32 = 512;

/// One migration.
#[derive(Debug, Clone, Serialize)]
pub struct MigrationTrial {
    pub tls: bool,
    pub rep: u32,
    pub completed: bool,
    pub total_time_ms: u64,
    pub downtime_ms: Option<u64>,
    pub transferred_bytes: u64,
    pub throughput_mib_s: f64,
    pub memory_check: &'static str,
}

/// Latencies of one kind of call, milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub call: String,
    pub count: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// The run's medians and ratios.
#[derive(Debug, Clone, Serialize)]
pub struct TlsSummary {
    pub summary: &'static str,
    pub plain_median_total_time_ms: Option<f64>,
    pub tls_median_total_time_ms: Option<f64>,
    pub tls_over_plain_total_time: Option<f64>,
    pub plain_median_throughput_mib_s: Option<f64>,
    pub tls_median_throughput_mib_s: Option<f64>,
    pub latencies: Vec<Latency>,
}

async fn request(client: &Client, request: Request) -> Result<Reply> {
    Ok(client.request(request, REQUEST_TIMEOUT).await?)
}

/// Migrates `name` from `from` to `to_uri` and waits for the record.
async fn migrate(
    from: &Client,
    name: &str,
    to_uri: &str,
    tls: bool,
) -> Result<protocol::job::JobRecord> {
    let flags = MigrateOptions {
        live: true,
        tls,
        ..Default::default()
    };
    migrate_with(from, name, to_uri, flags).await
}

/// Migrates `name` with `flags` and waits for the record.
pub async fn migrate_with(
    from: &Client,
    name: &str,
    to_uri: &str,
    flags: MigrateOptions,
) -> Result<protocol::job::JobRecord> {
    migrate_watching(from, name, to_uri, flags, || {}).await
}

/// As [`migrate_with`], calling `tick` every 100 ms while the job runs.
pub async fn migrate_watching(
    from: &Client,
    name: &str,
    to_uri: &str,
    flags: MigrateOptions,
    mut tick: impl FnMut(),
) -> Result<protocol::job::JobRecord> {
    let job_id = match request(
        from,
        Request::Migrate {
            domain: name.parse()?,
            destination: to_uri.to_string(),
            flags: Box::new(flags),
        },
    )
    .await?
    {
        Reply::MigrationStarted { job_id } => job_id,
        other => bail!("unexpected reply {other:?}"),
    };
    loop {
        tick();
        match request(from, Request::Job { id: job_id.clone() }).await? {
            Reply::Job {
                record: Some(r), ..
            } => return Ok(*r),
            Reply::Job { .. } => tokio::time::sleep(Duration::from_millis(100)).await,
            other => bail!("unexpected reply {other:?}"),
        }
    }
}

pub async fn memory_intact(client: &Client, name: &str) -> bool {
    // A pass after the landing, checked by the guest itself.
    tokio::time::sleep(Duration::from_secs(3)).await;
    match request(
        client,
        Request::DomInfo {
            domain: match name.parse() {
                Ok(n) => n,
                Err(_) => return false,
            },
        },
    )
    .await
    {
        Ok(Reply::DomainInfo(info)) => info
            .serial_log
            .and_then(|p| SerialLog::read(std::path::Path::new(&p)).ok())
            .is_some_and(|l| l.memory_intact()),
        _ => false,
    }
}

/// Runs `reps` pairs of migrations (plain and TLS), alternating the
/// guest's direction.
pub async fn migrations(hosts: &Hosts, reps: u32, json: bool) -> Result<Vec<MigrationTrial>> {
    let name = "bench-tls";
    // A guest that has written 256 MiB and keeps a light write rate: the
    // copy, not convergence, is what is measured.
    let workload = Workload {
        working_set_mib: 256,
        spin: 40_000,
        report_ms: 500,
    };
    hosts.start_guest(name, MEMORY_MIB, workload).await?;
    tokio::time::sleep(Duration::from_secs(8)).await;
    let clients = [&hosts.a_client, &hosts.b_client];
    let uris = [hosts.a_tcp_uri().to_string(), hosts.b_uri().to_string()];
    let mut on = 0;
    let mut trials = Vec::new();
    for rep in 1..=reps {
        let order = if rep % 2 == 1 {
            [false, true]
        } else {
            [true, false]
        };
        for tls in order {
            let to = 1 - on;
            let record = migrate(clients[on], name, &uris[to], tls).await?;
            let completed = record.status == JobStatus::Completed;
            if completed {
                on = to;
            }
            let secs = record.total_time_ms as f64 / 1000.0;
            let trial = MigrationTrial {
                tls,
                rep,
                completed,
                total_time_ms: record.total_time_ms,
                downtime_ms: record.downtime_ms,
                transferred_bytes: record.transferred_bytes,
                throughput_mib_s: if secs > 0.0 {
                    record.transferred_bytes as f64 / 1_048_576.0 / secs
                } else {
                    0.0
                },
                memory_check: if memory_intact(clients[on], name).await {
                    "ok"
                } else {
                    "corrupt"
                },
            };
            crate::emit(
                json,
                &trial,
                format!(
                    "{:<5} rep {} completed={} total {:>6.2} s downtime {:>4} ms sent {:>5.0} MiB at {:>6.1} MiB/s memory {}",
                    if tls { "tls" } else { "plain" },
                    rep,
                    trial.completed,
                    secs,
                    trial.downtime_ms.map_or("-".into(), |d| d.to_string()),
                    trial.transferred_bytes as f64 / 1_048_576.0,
                    trial.throughput_mib_s,
                    trial.memory_check
                ),
            );
            trials.push(trial);
        }
    }
    let _ = request(
        clients[on],
        Request::Destroy {
            domain: name.parse()?,
        },
    )
    .await;
    Ok(trials)
}

fn latency(call: &str, mut ms: Vec<f64>) -> Latency {
    ms.sort_by(f64::total_cmp);
    Latency {
        call: call.to_string(),
        count: ms.len(),
        p50_ms: percentile(&ms, 50.0),
        p99_ms: percentile(&ms, 99.0),
    }
}

/// Request and connection latencies over the unix socket and over mutual
/// TLS, interleaved so both see the same machine.
pub async fn api(hosts: &Hosts, requests: usize, connections: usize) -> Result<Vec<Latency>> {
    let admin = tls::TlsDir::load(&hosts.certificate("bench-admin", protocol::Role::Admin)?)?
        .client_config()?;
    let unix = hosts.a_uri();
    let tcp: AgentUri = hosts.a_tcp_uri().parse().map_err(|e| anyhow!("{e}"))?;
    let over_unix = Client::connect(&unix).await?;
    let over_tls = Client::connect_with(&tcp, Some(&admin)).await?;
    let (mut req_unix, mut req_tls) = (Vec::new(), Vec::new());
    for _ in 0..requests {
        for (client, out) in [(&over_unix, &mut req_unix), (&over_tls, &mut req_tls)] {
            let t = Instant::now();
            request(client, Request::List { all: true }).await?;
            out.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    let (mut conn_unix, mut conn_tls) = (Vec::new(), Vec::new());
    for _ in 0..connections {
        let t = Instant::now();
        let client = Client::connect(&unix).await?;
        request(&client, Request::Hello).await?;
        conn_unix.push(t.elapsed().as_secs_f64() * 1000.0);
        let t = Instant::now();
        let client = Client::connect_with(&tcp, Some(&admin)).await?;
        request(&client, Request::Hello).await?;
        conn_tls.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(vec![
        latency("list, unix socket", req_unix),
        latency("list, mutual TLS", req_tls),
        latency("connect + hello, unix socket", conn_unix),
        latency("connect + handshake + hello, mutual TLS", conn_tls),
    ])
}

/// The medians and the TLS/plain ratio of the migrations.
pub fn summarize(trials: &[MigrationTrial], latencies: Vec<Latency>) -> TlsSummary {
    let of = |tls: bool, f: fn(&MigrationTrial) -> f64| {
        median(
            trials
                .iter()
                .filter(|t| t.tls == tls && t.completed)
                .map(f)
                .collect(),
        )
    };
    let plain = of(false, |t| t.total_time_ms as f64);
    let tls = of(true, |t| t.total_time_ms as f64);
    TlsSummary {
        summary: "tls",
        plain_median_total_time_ms: plain,
        tls_median_total_time_ms: tls,
        tls_over_plain_total_time: plain.zip(tls).map(|(p, t)| t / p),
        plain_median_throughput_mib_s: of(false, |t| t.throughput_mib_s),
        tls_median_throughput_mib_s: of(true, |t| t.throughput_mib_s),
        latencies,
    }
}
