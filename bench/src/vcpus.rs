//! `livemig-bench vcpus`: a 4-vCPU Linux guest where one vCPU writes memory
//! and three only compute (the workload's pinned spinners), migrated with
//! QEMU's auto-converge (which throttles every vCPU) and with livemig's
//! controller (which finds the writer and throttles it alone), side by side.
//! Each trial reports the time, and how fast the writer and each spinner
//! ran during the migration against the seconds before it.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use domain::DomainDefinition;
use guest::linux::{self, LinuxWorkload};
use guest::{SerialLog, Workload};
use protocol::job::{ActionKind, JobStatus};
use protocol::{ConvergeMode, MigrateOptions, Request};
use serde::Serialize;

use crate::convergence::Hosts;
use crate::storage::{define_and_start, request, serial_path};
use crate::tls::migrate_with;

const MEMORY_MIB: u32 = 512;
const VCPUS: u32 = 4;
/// The guest's speed before the migration is taken over this long.
const BEFORE: Duration = Duration::from_secs(4);

/// What each run varies.
#[derive(Debug, Clone, Copy)]
pub struct Setup {
    /// The link cap, MiB/s.
    pub bandwidth: u64,
    /// The writer's working set, MiB.
    pub working_set_mib: u32,
    /// The writer's busy loop per page (lower: faster).
    pub spin: u32,
    /// Give up after this long, s.
    pub timeout: u64,
}

/// One migration.
#[derive(Debug, Serialize)]
pub struct VcpuTrial {
    pub engine: String,
    pub rep: u32,
    pub converged: bool,
    pub total_time_ms: u64,
    pub downtime_ms: Option<u64>,
    pub max_cpu_throttle_pct: f64,
    /// The writer's pages per second during the migration / before it.
    pub writer_speed: Option<f64>,
    /// Each spinner's loops per second during the migration / before it
    /// (vCPUs 1, 2, 3).
    pub spinner_speeds: Vec<Option<f64>>,
    /// What the controller found (its `writers` action), if anything.
    pub writers: Option<String>,
    pub memory_check: &'static str,
    pub error: Option<String>,
}

/// The writer's pages per second over the `BEFORE` seconds up to the
/// log's last progress line, and during: from that line to the last line
/// of `after`; their ratio.
fn writer_ratio(before: &SerialLog, after: &SerialLog) -> Option<f64> {
    let rate = |a: &guest::Progress, b: &guest::Progress| {
        (b.t_ms > a.t_ms)
            .then(|| (b.writes - a.writes) as f64 / ((b.t_ms - a.t_ms) as f64 / 1000.0))
    };
    let start = before.last_progress()?;
    let from = start.t_ms.saturating_sub(BEFORE.as_millis() as u64);
    let earlier = before
        .progress
        .iter()
        .rfind(|p| p.t_ms <= from)
        .or(before.progress.first())?;
    let speed_before = rate(earlier, &start).filter(|r| *r > 0.0)?;
    Some(rate(&start, &after.last_progress()?)? / speed_before)
}

/// Speed over the `BEFORE` seconds up to the log's last line, and during:
/// from that line to the last line of `after`.
fn spinner_ratio(before: &SerialLog, after: &SerialLog, cpu: u32) -> Option<f64> {
    let (speed_before, speed_during) =
        before.spinner_speeds(after, cpu, BEFORE.as_millis() as u64)?;
    Some(speed_during / speed_before)
}

/// `--converge` and `--auto-converge` for an engine.
fn engine_flags(engine: &str) -> Result<(Option<ConvergeMode>, bool)> {
    Ok(match engine {
        "qemu" => (None, true),
        "adaptive" => (Some(ConvergeMode::Adaptive), false),
        other => bail!("unknown engine {other:?} (qemu, adaptive)"),
    })
}

async fn wait_for_lines(log: &Path) -> Result<SerialLog> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let l = SerialLog::read(log)?;
        if !l.errors.is_empty() {
            bail!("guest error: {:?}", l.errors);
        }
        let enough = l.spinner_cpus().len() == (VCPUS - 1) as usize
            && l.spinners.len() >= 3 * 12
            && l.progress.len() >= 12;
        if enough {
            return Ok(l);
        }
        if Instant::now() > deadline {
            if l.spinners.is_empty() && !l.progress.is_empty() {
                bail!(
                    "the guest's workload runs no spinners: it predates them (rebuild it with \
                     scripts/build-linux-guest.sh)"
                );
            }
            bail!("the guest's workload did not report within 120 s");
        }
    }
}

async fn trial(
    hosts: &Hosts,
    image: &linux::LinuxImage,
    engine: &str,
    rep: u32,
    setup: Setup,
) -> Result<VcpuTrial> {
    let name = format!("vc-{engine}-{rep}");
    let workload = LinuxWorkload {
        spinners: VCPUS - 1,
        ..LinuxWorkload::memory(Workload {
            working_set_mib: setup.working_set_mib,
            spin: setup.spin,
            report_ms: 250,
        })
    };
    let mut definition = DomainDefinition::from_toml(&format!(
        "name = \"{name}\"\nmemory_mib = {MEMORY_MIB}\n[kernel]\npath = {:?}\ninitrd = {:?}\ncmdline = {:?}\n",
        image.kernel.display().to_string(),
        image.initrd.display().to_string(),
        workload.cmdline(),
    ))?;
    definition.vcpus = VCPUS;
    let source_log = define_and_start(&hosts.a_client, &definition).await?;
    let before = wait_for_lines(&source_log).await?;
    let (converge, auto_converge) = engine_flags(engine)?;
    let started = Instant::now();
    let record = migrate_with(
        &hosts.a_client,
        &name,
        hosts.b_uri(),
        MigrateOptions {
            live: true,
            bandwidth: Some(setup.bandwidth),
            timeout: Some(setup.timeout),
            converge,
            auto_converge,
            ..Default::default()
        },
    )
    .await?;
    let elapsed = started.elapsed();
    let converged = record.status == JobStatus::Completed;
    // The source's log ends at the switchover (or runs on if it failed).
    let after = SerialLog::read(&source_log)?;
    let (owner, other) = if converged {
        (&hosts.b_client, &hosts.a_client)
    } else {
        (&hosts.a_client, &hosts.b_client)
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    let owner_log = SerialLog::read(&serial_path(owner, &name).await?)?;
    let memory_check = if owner_log.memory_intact() && owner_log.last_progress().is_some() {
        "ok"
    } else {
        "corrupt"
    };
    let writers = record
        .actions
        .iter()
        .rfind(|a| a.action == ActionKind::Writers && a.value.is_some())
        .map(|a| a.detail.clone());
    for client in [owner, other] {
        for request_ in [
            Request::Destroy {
                domain: name.parse()?,
            },
            Request::Undefine {
                domain: name.parse()?,
            },
        ] {
            let _ = request(client, request_).await;
        }
    }
    let writer_speed = writer_ratio(&before, &after);
    Ok(VcpuTrial {
        engine: engine.to_string(),
        rep,
        converged,
        total_time_ms: if converged {
            record.total_time_ms
        } else {
            elapsed.as_millis() as u64
        },
        downtime_ms: record.downtime_ms.filter(|_| converged),
        max_cpu_throttle_pct: record.max_cpu_throttle_pct,
        writer_speed,
        spinner_speeds: (1..VCPUS)
            .map(|cpu| spinner_ratio(&before, &after, cpu))
            .collect(),
        writers,
        memory_check,
        error: record.error,
    })
}

fn pct(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{:.0}%", v * 100.0))
}

fn describe(t: &VcpuTrial) -> String {
    format!(
        "{:<8} rep {} converged={:<5} total {:>6.1} s downtime {:>6} max throttle {:>5.1}% writer speed {:>5} spinners {} memory {}",
        t.engine,
        t.rep,
        t.converged,
        t.total_time_ms as f64 / 1000.0,
        t.downtime_ms.map_or("-".into(), |d| format!("{d}ms")),
        t.max_cpu_throttle_pct,
        pct(t.writer_speed),
        t.spinner_speeds
            .iter()
            .map(|s| pct(*s))
            .collect::<Vec<_>>()
            .join("/"),
        t.memory_check,
    )
}

/// Medians per engine.
#[derive(Debug, Serialize)]
pub struct EngineSummary {
    pub engine: String,
    pub trials: usize,
    pub converged: usize,
    pub median_total_time_ms: Option<f64>,
    /// The median over trials of the slowest spinner's speed ratio.
    pub median_slowest_spinner: Option<f64>,
    pub median_writer_speed: Option<f64>,
}

fn summarize(engine: &str, trials: &[VcpuTrial]) -> EngineSummary {
    let mine: Vec<&VcpuTrial> = trials.iter().filter(|t| t.engine == engine).collect();
    let converged: Vec<&&VcpuTrial> = mine.iter().filter(|t| t.converged).collect();
    EngineSummary {
        engine: engine.to_string(),
        trials: mine.len(),
        converged: converged.len(),
        median_total_time_ms: crate::median(
            converged.iter().map(|t| t.total_time_ms as f64).collect(),
        ),
        median_slowest_spinner: crate::median(
            mine.iter()
                .filter_map(|t| {
                    t.spinner_speeds
                        .iter()
                        .copied()
                        .collect::<Option<Vec<f64>>>()
                        .and_then(|s| s.into_iter().reduce(f64::min))
                })
                .collect(),
        ),
        median_writer_speed: crate::median(mine.iter().filter_map(|t| t.writer_speed).collect()),
    }
}

/// Runs `reps` rounds of every engine, the order rotated each round.
pub async fn run(
    livemigd: &Path,
    engines: &[String],
    reps: u32,
    setup: Setup,
    json: bool,
) -> Result<()> {
    // Bad input changes nothing: no agent, no guest.
    for engine in engines {
        engine_flags(engine)?;
    }
    let hosts = Hosts::start(livemigd).await?;
    let result = async {
        let parts = linux::Parts::installed(&linux::workload_beside_this_build())
            .context("the Linux guest (scripts/setup.sh, scripts/build-linux-guest.sh)")?;
        let image = linux::build(&parts, hosts.images())?;
        let mut trials = Vec::new();
        for rep in 1..=reps {
            let mut order = engines.to_vec();
            order.rotate_left((rep as usize - 1) % engines.len().max(1));
            for engine in &order {
                let t = trial(&hosts, &image, engine, rep, setup).await?;
                crate::emit(json, &t, describe(&t));
                trials.push(t);
            }
        }
        for engine in engines {
            let s = summarize(engine, &trials);
            let text = format!(
                "{:<8} converged {}/{}  median total {}  slowest spinner {}  writer {}",
                s.engine,
                s.converged,
                s.trials,
                s.median_total_time_ms
                    .map_or("-".into(), |v| format!("{:.1} s", v / 1000.0)),
                pct(s.median_slowest_spinner),
                pct(s.median_writer_speed),
            );
            crate::emit(json, &s, text);
        }
        anyhow::Ok(())
    }
    .await;
    hosts.stop().await;
    result.map_err(|e| anyhow!(e))
}
