//! `livemig-bench compression`: what compressing the stream buys, side by
//! side in one run.
//!
//! A Linux guest whose working set holds text (compresses about as prose
//! does) and one whose working set holds random bytes (does not) are each
//! migrated back and forth between two agents in network namespaces joined
//! by a link the kernel caps (`tc`; QEMU's own cap is off: QEMU 7.2 counts
//! a multifd page at its uncompressed size against it, so a cap there
//! would hide what compression saves), with plain multifd and with each
//! compression method on multifd's channels (the order rotates each
//! repetition). Per trial: total time, bytes on the wire (what the source
//! host sent onto its link, from the kernel's interface counters), QEMU's
//! own count of bytes transferred (uncompressed sizes on 7.2), the source
//! QEMU's CPU time, downtime and the guest's own memory check after the
//! landing.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use domain::DomainDefinition;
use guest::linux::{self, LinuxWorkload};
use guest::Workload;
use protocol::job::JobStatus;
use protocol::{Client, CompMethod, MigrateOptions, Reply, Request};
use serde::Serialize;

use crate::convergence::Hosts;
use crate::median;
use crate::procstat::cpu_seconds;
use crate::storage::define_and_start;

const MEMORY_MIB: u32 = 384;
const WORKING_SET_MIB: u32 = 256;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
const JOB_TIMEOUT: Duration = Duration::from_secs(300);

/// One migration.
#[derive(Debug, Clone, Serialize)]
pub struct CompressionTrial {
    pub workload: &'static str,
    pub method: String,
    pub rep: u32,
    pub completed: bool,
    pub total_time_ms: u64,
    pub transferred_bytes: u64,
    pub wire_bytes: Option<u64>,
    pub downtime_ms: Option<u64>,
    pub source_cpu_s: Option<f64>,
    pub memory_check: &'static str,
}

/// A method's medians on one workload, against plain multifd.
#[derive(Debug, Clone, Serialize)]
pub struct CompressionSummary {
    pub summary: &'static str,
    pub workload: &'static str,
    pub method: String,
    pub trials: usize,
    pub median_total_time_ms: Option<f64>,
    pub median_transferred_bytes: Option<f64>,
    pub median_wire_bytes: Option<f64>,
    pub median_source_cpu_s: Option<f64>,
    pub time_vs_plain: Option<f64>,
    pub bytes_vs_plain: Option<f64>,
}

/// The options of `method`: `none` is plain multifd. No bandwidth cap:
/// the link is the cap.
fn options(method: &str) -> Result<MigrateOptions> {
    let base = MigrateOptions {
        live: true,
        parallel: true,
        ..Default::default()
    };
    let comp = match method {
        "none" => return Ok(base),
        "zstd" => CompMethod::Zstd,
        "zlib" => CompMethod::Zlib,
        other => bail!("unknown method {other:?}: none, zstd or zlib"),
    };
    Ok(MigrateOptions {
        compressed: true,
        comp_methods: vec![comp],
        ..base
    })
}

async fn request(client: &Client, request: Request) -> Result<Reply> {
    Ok(client.request(request, REQUEST_TIMEOUT).await?)
}

async fn qemu_pid(client: &Client, name: &str) -> Result<Option<u32>> {
    match request(
        client,
        Request::DomInfo {
            domain: name.parse()?,
        },
    )
    .await?
    {
        Reply::DomainInfo(info) => Ok(info.qemu_pid),
        other => bail!("unexpected reply {other:?}"),
    }
}

/// Migrates `name` and follows the source QEMU's CPU time until the job
/// ends (the QEMU exits at the end of a migration that completed: its
/// last reading stands, up to 100 ms short); the record and the CPU
/// seconds.
async fn migrate(
    from: &Client,
    name: &str,
    to_uri: &str,
    flags: MigrateOptions,
) -> Result<(protocol::job::JobRecord, Option<f64>)> {
    let pid = qemu_pid(from, name).await?;
    let before = pid.and_then(cpu_seconds);
    let mut last = before;
    let watched = crate::tls::migrate_watching(from, name, to_uri, flags, || {
        if let Some(now) = pid.and_then(cpu_seconds) {
            last = Some(now);
        }
    });
    let record = tokio::time::timeout(JOB_TIMEOUT, watched)
        .await
        .map_err(|_| {
            anyhow::anyhow!("the migration of {name} did not end within {JOB_TIMEOUT:?}")
        })??;
    Ok((record, before.zip(last).map(|(b, l)| l - b)))
}

/// Waits until the guest's workload has filled its pages and swept them
/// a few times.
async fn wait_filled(log: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let l = guest::SerialLog::read(log).unwrap_or_default();
        if !l.errors.is_empty() {
            bail!("guest error: {:?}", l.errors);
        }
        if l.progress.len() >= 4 {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the guest's workload did not report within 180 s");
        }
    }
}

fn describe(t: &CompressionTrial) -> String {
    format!(
        "{:<6} {:<5} rep {} completed={} total {:>6.2} s on the wire {} (QEMU counts {:.0} MiB) source CPU {} downtime {} memory {}",
        t.workload,
        t.method,
        t.rep,
        t.completed,
        t.total_time_ms as f64 / 1000.0,
        t.wire_bytes
            .map_or("-".into(), |b| format!("{:.0} MiB", b as f64 / 1_048_576.0)),
        t.transferred_bytes as f64 / 1_048_576.0,
        t.source_cpu_s.map_or("-".into(), |c| format!("{c:.2} s")),
        t.downtime_ms.map_or("-".into(), |d| format!("{d} ms")),
        t.memory_check
    )
}

fn summarize(
    workload: &'static str,
    method: &str,
    trials: &[CompressionTrial],
) -> CompressionSummary {
    let of = |m: &str| -> Vec<&CompressionTrial> {
        trials
            .iter()
            .filter(|t| t.workload == workload && t.method == m && t.completed)
            .collect()
    };
    let time = |m: &str| median(of(m).iter().map(|t| t.total_time_ms as f64).collect());
    let bytes = |m: &str| {
        median(
            of(m)
                .iter()
                .filter_map(|t| t.wire_bytes.map(|b| b as f64))
                .collect(),
        )
    };
    let ratio = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a / b.max(1.0));
    CompressionSummary {
        summary: "compression",
        workload,
        method: method.to_string(),
        trials: of(method).len(),
        median_total_time_ms: time(method),
        median_transferred_bytes: median(
            of(method)
                .iter()
                .map(|t| t.transferred_bytes as f64)
                .collect(),
        ),
        median_wire_bytes: bytes(method),
        median_source_cpu_s: median(of(method).iter().filter_map(|t| t.source_cpu_s).collect()),
        time_vs_plain: ratio(time(method), time("none")),
        bytes_vs_plain: ratio(bytes(method), bytes("none")),
    }
}

/// Runs the benchmark: `methods` (`none` for plain multifd, `zstd`,
/// `zlib`) on each workload, `reps` times, over a link of `link` MiB/s.
pub async fn run(
    livemigd: &Path,
    methods: &[String],
    reps: u32,
    link: u64,
    json: bool,
) -> Result<()> {
    // Bad input changes nothing: no agent, no guest.
    for method in methods {
        options(method)?;
    }
    let hosts = Hosts::start_linked(livemigd, link).await?;
    let parts = linux::Parts::installed(&linux::workload_beside_this_build())
        .context("the Linux guest (scripts/setup.sh, scripts/build-linux-guest.sh)")?;
    let image = linux::build(&parts, hosts.images())?;
    let mut trials = Vec::new();
    for (workload, fill) in [("text", "text"), ("random", "random")] {
        let name = format!("cmp-{workload}");
        let linux_workload = LinuxWorkload {
            fill: Some(fill),
            ..LinuxWorkload::memory(Workload {
                working_set_mib: WORKING_SET_MIB,
                spin: 200_000,
                report_ms: 500,
            })
        };
        let definition = DomainDefinition::from_toml(&format!(
            "name = \"{name}\"\nmemory_mib = {MEMORY_MIB}\n[kernel]\npath = {:?}\ninitrd = {:?}\ncmdline = {:?}\n",
            image.kernel.display().to_string(),
            image.initrd.display().to_string(),
            linux_workload.cmdline(),
        ))?;
        let log = define_and_start(&hosts.a_client, &definition).await?;
        wait_filled(&log).await?;
        let clients = [&hosts.a_client, &hosts.b_client];
        let uris = [hosts.a_tcp_uri().to_string(), hosts.b_uri().to_string()];
        let mut on = 0;
        for rep in 1..=reps {
            let mut order = methods.to_vec();
            order.rotate_left((rep as usize - 1) % methods.len().max(1));
            for method in &order {
                let to = 1 - on;
                let sent_before = hosts.sent_bytes(on);
                let (record, source_cpu_s) =
                    migrate(clients[on], &name, &uris[to], options(method)?).await?;
                let wire_bytes = sent_before
                    .zip(hosts.sent_bytes(on))
                    .map(|(b, a)| a.saturating_sub(b));
                let completed = record.status == JobStatus::Completed;
                if completed {
                    on = to;
                }
                let trial = CompressionTrial {
                    workload,
                    method: method.clone(),
                    rep,
                    completed,
                    total_time_ms: record.total_time_ms,
                    transferred_bytes: record.transferred_bytes,
                    wire_bytes,
                    downtime_ms: record.downtime_ms,
                    source_cpu_s,
                    memory_check: if crate::tls::memory_intact(clients[on], &name).await {
                        "ok"
                    } else {
                        "corrupt"
                    },
                };
                crate::emit(json, &trial, describe(&trial));
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
    }
    for workload in ["text", "random"] {
        for method in methods {
            let s = summarize(workload, method, &trials);
            let text = format!(
                "{:<6} {:<5} median {} on the wire {} source CPU {} ({} the time, {} the bytes of plain multifd)",
                s.workload,
                s.method,
                s.median_total_time_ms
                    .map_or("-".into(), |v| format!("{:.2} s", v / 1000.0)),
                s.median_wire_bytes
                    .map_or("-".into(), |v| format!("{:.0} MiB", v / 1_048_576.0)),
                s.median_source_cpu_s
                    .map_or("-".into(), |v| format!("{v:.2} s")),
                s.time_vs_plain.map_or("-".into(), |r| format!("{r:.2}x")),
                s.bytes_vs_plain.map_or("-".into(), |r| format!("{r:.2}x")),
            );
            crate::emit(json, &s, text);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_map_onto_multifd_with_or_without_compression() {
        let plain = options("none").unwrap();
        assert!(plain.parallel && !plain.compressed && plain.comp_methods.is_empty());
        let zstd = options("zstd").unwrap();
        assert!(zstd.parallel && zstd.compressed);
        assert_eq!(zstd.comp_methods, [CompMethod::Zstd]);
        assert!(migration::Flags::new(zstd).is_ok());
        assert!(options("lz4").is_err());
    }
}
