//! `livemig-bench`: benchmarks run side by side against a baseline in one
//! process.
//!
//! `livemig-bench convergence --json [--reps N] [--workloads light,heavy,hot]
//! [--policies none,qemu,adaptive]` prints one JSON object per trial, then a
//! summary line per workload with medians and the adaptive/qemu ratios.
//!
//! `livemig-bench tls --json [--reps N]` migrates one guest back and forth
//! with and without `--tls`, then times API requests and connections over
//! the unix socket and over mutual TLS.
//!
//! `livemig-bench start --json [--reps N]` times the command to the first
//! byte (and to the guest running on the destination) for an idle guest,
//! livemig against QEMU driven over raw QMP with the destination QEMU
//! started per migration and started beforehand, and against `virsh
//! migrate --live` between two session libvirtd (needs root).
//!
//! `livemig-bench storage [--sizes 1,4,8] [--bandwidth 256]` copies a disk
//! on one host's storage with the Linux guest (`--copy-storage-all`), idle
//! and under a write load, against the least time the link allows and
//! against libvirt's `virsh migrate --copy-storage-all` on the same guest
//! (`--engines livemig,virsh`; needs root: each agent gets its own storage
//! through a mount namespace, and the two libvirtd run as `nobody`).
//!
//! `livemig-bench drain [--json] [--reps N] [--link MIB_S]
//! [--policies sequential,fixed-2,all,livemig]` drains a host of six small
//! real guests (quiet, light, heavy, hot) to two others over capped links
//! in network namespaces, by each policy in turn, against the lower bound
//! (needs root).
//!
//! `livemig-bench fleet [--json] [--hosts 1000] [--vms 20000] [--batch 50]
//! [--agents 250,500,1000]` plans a rolling upgrade with each policy over
//! the convergence model (no QEMU) against the lower bound, timing the
//! controller's decisions; then puts a real etcd under that many simulated
//! agents and a controller.
//!
//! `livemig-bench compression --json [--reps N] [--methods none,zstd,zlib]
//! [--link MIB_S]` migrates a Linux guest whose memory holds text and one
//! whose memory holds random bytes with plain multifd and with each
//! compression on multifd's channels between two hosts in network
//! namespaces on a capped link (needs root): time, bytes on the wire,
//! source CPU.
//!
//! `livemig-bench sweep --json [--links 64] [--rates 0.5,2,8,max]
//! [--working-sets 64,all] [--rams 256] [--policies adaptive,qemu]`
//! migrates guests over a grid of links, dirty rates (multiples of the
//! link), working sets and RAM, with each policy, against the physical
//! limit and `estimate`'s prediction.
//!
//! `livemig-bench vcpus [--reps N] [--engines qemu,adaptive]` migrates a
//! 4-vCPU Linux guest with one writing vCPU and three compute-only ones,
//! with QEMU's auto-converge and with the controller, and reports how fast
//! each vCPU ran during the migration against before it.

mod compression;
mod convergence;
mod drain;
mod fleet;
mod libvirt;
mod load;
mod procstat;
mod sampler;
mod start;
mod storage;
mod sweep;
mod tls;
mod vcpus;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};
use protocol::ConvergeMode;

#[derive(Debug, Parser)]
#[command(name = "livemig-bench", version, about = "livemig benchmarks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Convergence policies (none, QEMU's auto-converge, adaptive) on the
    /// same guest under light, heavy and hot workloads.
    Convergence {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        #[arg(long, default_value_t = 3)]
        reps: u32,
        #[arg(long, value_delimiter = ',', default_value = "light,heavy,hot")]
        workloads: Vec<String>,
        #[arg(long, value_delimiter = ',', default_value = "none,qemu,adaptive")]
        policies: Vec<String>,
        /// Give up on a migration after this many seconds.
        #[arg(long, default_value_t = 90)]
        timeout: u64,
        /// Run `estimate` before each migration and print its prediction
        /// beside the outcome (the domain keeps its name across
        /// repetitions, so adaptive estimates are calibrated on the
        /// earlier ones).
        #[arg(long)]
        estimate: bool,
        /// The guest's progress-line interval, ms: its serial output, which
        /// QEMU emulates under its big lock. Above 2000 the guest's work
        /// during the migration is not measured.
        #[arg(long, default_value_t = convergence::REPORT_MS)]
        report_ms: u32,
        /// The highest downtime limit the jobs may raise the limit to, ms
        /// (`migrate --max-downtime`) [default: the 300 ms limit itself].
        #[arg(long)]
        max_downtime: Option<u64>,
        /// Let the jobs switch to post-copy (`migrate --allow-postcopy`).
        #[arg(long)]
        allow_postcopy: bool,
        /// livemigd binary [default: next to this binary].
        #[arg(long)]
        livemigd: Option<PathBuf>,
    },
    /// What TLS costs: migrations with and without --tls side by side, and
    /// API requests over the unix socket and over mutual TLS.
    Tls {
        #[arg(long)]
        json: bool,
        /// Pairs of migrations (one plain, one --tls).
        #[arg(long, default_value_t = 3)]
        reps: u32,
        /// Sequential requests per transport.
        #[arg(long, default_value_t = 2000)]
        requests: usize,
        /// New connections per transport.
        #[arg(long, default_value_t = 200)]
        connections: usize,
        #[arg(long)]
        livemigd: Option<PathBuf>,
    },
    /// Disks copied with the guest (--copy-storage-all), idle and under a
    /// write load, against the link's minimum.
    Storage {
        #[arg(long)]
        json: bool,
        /// Disk sizes, GiB.
        #[arg(long, value_delimiter = ',', default_value = "1,4")]
        sizes: Vec<u64>,
        /// The link cap (--bandwidth), MiB/s.
        #[arg(long, default_value_t = 256)]
        bandwidth: u64,
        /// Who drives the copy: livemig, and virsh (libvirt's
        /// `virsh migrate --copy-storage-all` between two session libvirtd
        /// on this machine).
        #[arg(long, value_delimiter = ',', default_value = "livemig,virsh")]
        engines: Vec<String>,
        #[arg(long)]
        livemigd: Option<PathBuf>,
    },
    /// From the command to the first byte: livemig against raw QMP (the
    /// destination QEMU started per migration, and started beforehand).
    Start {
        #[arg(long)]
        json: bool,
        /// Migrations per engine.
        #[arg(long, default_value_t = 10)]
        reps: u32,
        #[arg(long)]
        livemigd: Option<PathBuf>,
    },
    /// A 4-vCPU guest, one vCPU writing: QEMU's auto-converge (every vCPU
    /// throttled) against the controller (the writer alone).
    Vcpus {
        #[arg(long)]
        json: bool,
        #[arg(long, default_value_t = 3)]
        reps: u32,
        #[arg(long, value_delimiter = ',', default_value = "qemu,adaptive")]
        engines: Vec<String>,
        /// The link cap, MiB/s.
        #[arg(long, default_value_t = 32)]
        bandwidth: u64,
        /// The writer's working set, MiB.
        #[arg(long, default_value_t = 128)]
        working_set: u32,
        /// The writer's busy loop per page (0: as fast as it goes).
        #[arg(long, default_value_t = 2000)]
        spin: u32,
        /// Give up on a migration after this many seconds.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
        #[arg(long)]
        livemigd: Option<PathBuf>,
    },
    /// The controller and QEMU's auto-converge over a grid of guests:
    /// links, dirty rates as a multiple of the link, working sets, RAM.
    Sweep {
        #[arg(long)]
        json: bool,
        /// Links, MiB/s.
        #[arg(long, value_delimiter = ',', default_value = "64")]
        links: Vec<u64>,
        /// Dirty rates, as multiples of the link, or max (as fast as the
        /// guest runs).
        #[arg(long, value_delimiter = ',', default_value = "0.5,2,8,max")]
        rates: Vec<String>,
        /// Working sets, MiB, or all (the whole RAM).
        #[arg(long, value_delimiter = ',', default_value = "64,all")]
        working_sets: Vec<String>,
        /// Guest RAM, MiB.
        #[arg(long, value_delimiter = ',', default_value = "256")]
        rams: Vec<u32>,
        #[arg(long, value_delimiter = ',', default_value = "adaptive,qemu")]
        policies: Vec<String>,
        /// Give up on a migration after this many seconds.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
        #[arg(long)]
        livemigd: Option<PathBuf>,
    },
    /// Plain multifd against zstd and zlib on its channels, on a guest
    /// whose memory compresses and one whose memory does not.
    Compression {
        #[arg(long)]
        json: bool,
        #[arg(long, default_value_t = 2)]
        reps: u32,
        #[arg(long, value_delimiter = ',', default_value = "none,zstd,zlib")]
        methods: Vec<String>,
        /// The link between the two hosts, MiB/s each way (`tc`).
        #[arg(long, default_value_t = 64)]
        link: u64,
        #[arg(long)]
        livemigd: Option<PathBuf>,
    },
    /// API latency on a source agent while several migrations run.
    /// A host of six small real guests drained to two others over capped
    /// links by sequential, fixed-2, all-at-once and livemig's scheduler,
    /// against the lower bound (needs root).
    Drain {
        #[arg(long)]
        json: bool,
        #[arg(long, default_value_t = 1)]
        reps: u32,
        /// Each host's link, MiB/s each way.
        #[arg(long, default_value_t = 100)]
        link: u64,
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "sequential,fixed-2,all,livemig"
        )]
        policies: Vec<String>,
        /// How the fixed policies' migrations converge: adaptive (livemig's
        /// controller: only the schedule differs) or qemu (auto-converge).
        #[arg(long, default_value = "adaptive")]
        baseline_converge: String,
        /// Let every guest go to post-copy when no throttle converges it
        /// (livemig's drain through a cluster policy, the fixed policies
        /// on the adaptive controller through the migrate flag).
        #[arg(long)]
        allow_postcopy: bool,
        #[arg(long)]
        livemigd: Option<PathBuf>,
    },
    /// The scheduler at fleet scale over the convergence model, and etcd
    /// under many simulated agents.
    Fleet {
        #[arg(long)]
        json: bool,
        #[arg(long, default_value_t = 1000)]
        hosts: usize,
        #[arg(long, default_value_t = 20000)]
        vms: usize,
        /// Hosts drained at once.
        #[arg(long, default_value_t = 50)]
        batch: usize,
        /// Each host's link, MiB/s.
        #[arg(long, default_value_t = 1000.0)]
        link: f64,
        /// Simulated agents on etcd, one run each (none: skip).
        #[arg(long, value_delimiter = ',', default_value = "250,500,1000")]
        agents: Vec<usize>,
        /// Seconds each etcd run is measured.
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        #[arg(long)]
        livemigd: Option<PathBuf>,
    },
    Load {
        #[arg(long)]
        json: bool,
        /// Domains migrating at once.
        #[arg(long, default_value_t = 3)]
        domains: usize,
        /// Client connections sending requests.
        #[arg(long, default_value_t = 8)]
        clients: usize,
        /// Requests in all (list, dominfo, domjobinfo in turn).
        #[arg(long, default_value_t = 6000)]
        requests: usize,
        #[arg(long)]
        livemigd: Option<PathBuf>,
    },
}

fn livemigd(given: Option<PathBuf>) -> PathBuf {
    given.unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(|d| d.join("livemigd")))
            .unwrap_or_else(|| PathBuf::from("livemigd"))
    })
}

/// `livemigd` where it is expected. Under cargo (`cargo run -p
/// livemig-bench` builds only the bench) it is built first every time:
/// cargo does nothing when it is current, and a stale agent beside a fresh
/// bench measures old code. Otherwise it must exist; an error says how to
/// get it.
fn ensure_livemigd(path: &std::path::Path, given: bool) -> Result<()> {
    if let (Some(cargo), false) = (std::env::var_os("CARGO"), given) {
        let release = path
            .parent()
            .and_then(|d| d.file_name())
            .is_some_and(|d| d == "release");
        let mut build = std::process::Command::new(cargo);
        build.args(["build", "-q", "-p", "livemig-agent", "--bin", "livemigd"]);
        if release {
            build.arg("--release");
        }
        let status = build.status()?;
        if status.success() && path.exists() {
            return Ok(());
        }
    } else if path.exists() {
        eprintln!(
            "using {}: rebuild it with the bench (cargo build --release --workspace) or run \
             the bench through cargo run, which does",
            path.display()
        );
        return Ok(());
    }
    bail!(
        "livemigd not found at {}: build it (cargo build --release -p livemig-agent) or pass \
         --livemigd PATH",
        path.display()
    )
}

/// " estimate 9.8 s (+12 %) calibrated on 2: 8.1 s (-7 %)", or nothing.
fn estimate_text(t: &convergence::Trial) -> String {
    let Some(converges) = t.estimated_converges else {
        return String::new();
    };
    let real = t.total_time_ms as f64;
    let against = |ms: u64| {
        if t.converged && real > 0.0 {
            format!(
                "{:.1} s ({:+.0} %)",
                ms as f64 / 1000.0,
                (ms as f64 - real) / real * 100.0
            )
        } else {
            format!("{:.1} s", ms as f64 / 1000.0)
        }
    };
    let mut text = match t.estimated_total_ms {
        Some(ms) if converges => format!(" estimate {}", against(ms)),
        _ => " estimate: does not converge".to_string(),
    };
    if let (Some(ms), Some(jobs)) = (t.calibrated_total_ms, t.calibration_jobs) {
        text.push_str(&format!(" calibrated on {jobs}: {}", against(ms)));
    }
    text
}

/// Medians per policy, and livemig's against the bound and each other.
fn drain_summary(json: bool, runs: &[drain::Run]) {
    let mut policies: Vec<&str> = runs.iter().map(|r| r.policy.as_str()).collect();
    policies.dedup();
    policies.sort_unstable();
    policies.dedup();
    for policy in policies {
        let of = |f: fn(&drain::Run) -> f64| {
            median(runs.iter().filter(|r| r.policy == policy).map(f).collect()).unwrap_or(0.0)
        };
        let makespan = of(|r| r.makespan_s);
        let bound = of(|r| r.lower_bound_s);
        let lost = of(|r| r.guest_work_lost_s);
        let value = serde_json::json!({
            "summary": policy,
            "makespan_s": makespan,
            "lower_bound_s": bound,
            "makespan_over_bound": makespan / bound.max(1e-9),
            "guest_work_lost_s": lost,
        });
        emit(
            json,
            &value,
            format!(
                "{policy:<10} median makespan {makespan:>6.1} s = {:.2}x the bound ({bound:.1} s), work lost {lost:.1} s",
                makespan / bound.max(1e-9)
            ),
        );
    }
}

/// The middle value (the mean of the two middle ones for an even count).
fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    })
}

fn emit<T: serde::Serialize>(json: bool, value: &T, text: String) {
    if json {
        println!("{}", serde_json::to_string(value).expect("serializable"));
    } else {
        println!("{text}");
    }
}

async fn run_convergence(
    options: convergence::RunOptions,
    workloads: Vec<String>,
    policies: Vec<String>,
    livemigd_path: PathBuf,
) -> Result<()> {
    let convergence::RunOptions { json, reps, .. } = options;
    for w in &workloads {
        if convergence::workload(w).is_none() {
            bail!("unknown workload {w:?} (light, heavy, hot)");
        }
    }
    for p in &policies {
        if convergence::policy(p).is_none() {
            bail!("unknown policy {p:?} (none, qemu, adaptive)");
        }
    }
    let hosts = convergence::Hosts::start(&livemigd_path).await?;
    let mut trials = Vec::new();
    let result = async {
        let light = if workloads.iter().any(|w| w == "light") {
            let (light, calibration) = convergence::calibrate_light(&hosts).await?;
            emit(
                json,
                &calibration,
                format!(
                    "light: spin {} dirtied {:.1} MiB/s here; spin {} for {:.1} MiB/s",
                    calibration.spin_measured,
                    calibration.measured_mib_s,
                    calibration.spin,
                    calibration.target_mib_s
                ),
            );
            Some(light)
        } else {
            None
        };
        for rep in 1..=reps {
            for w in &workloads {
                let workload = match (w.as_str(), light) {
                    ("light", Some(light)) => light,
                    _ => convergence::workload(w).expect("checked above"),
                };
                // Rotate the order each repetition so no policy always runs
                // first on a freshly warmed machine.
                let mut order = policies.clone();
                order.rotate_left((rep as usize - 1) % policies.len().max(1));
                for p in &order {
                    let trial =
                        convergence::trial(&hosts, (w, workload), p, rep, &options).await?;
                    emit(
                        json,
                        &trial,
                        format!(
                            "{:<6} {:<9} rep {} converged={:<5} total {:>7.1} s downtime {:>5} max throttle {:>5.1}% lost {:>5.1} s ({:>3.0}%, agent's estimate {:.1} s) sent {:>6.0} MiB memory {}{}",
                            trial.workload,
                            trial.policy,
                            trial.rep,
                            trial.converged,
                            trial.total_time_ms as f64 / 1000.0,
                            trial.downtime_ms.map_or("-".into(), |d| format!("{d}ms")),
                            trial.max_cpu_throttle_pct,
                            trial.guest_work_lost_s,
                            trial.guest_work_lost_fraction * 100.0,
                            trial.agent_work_lost_s,
                            trial.transferred_bytes as f64 / 1048576.0,
                            trial.memory_check,
                            estimate_text(&trial),
                        ),
                    );
                    trials.push(trial);
                }
            }
        }
        anyhow::Ok(())
    }
    .await;
    hosts.stop().await;
    result?;
    for w in &workloads {
        let summary = convergence::summarize(w, &trials, &policies);
        let text = summary
            .policies
            .iter()
            .map(|p| {
                format!(
                    "  {:<9} converged {}/{}  median total {:>6.1} s  lost {:>5.1} s  max throttle {:>5.1}%",
                    p.policy,
                    p.converged,
                    p.trials,
                    p.median_total_time_ms / 1000.0,
                    p.median_guest_work_lost_s,
                    p.median_max_cpu_throttle_pct
                )
            })
            .collect::<Vec<_>>()
            .join("\n");
        let ratios = format!(
            "  adaptive/qemu: total time {}, guest work lost {}",
            summary
                .adaptive_over_qemu_total_time
                .map_or("n/a".into(), |r| format!("{r:.2}")),
            summary
                .adaptive_over_qemu_work_lost
                .map_or("n/a".into(), |r| format!("{r:.2}"))
        );
        emit(json, &summary, format!("{w}:\n{text}\n{ratios}"));
    }
    Ok(())
}

async fn run_tls(
    json: bool,
    reps: u32,
    requests: usize,
    connections: usize,
    livemigd_path: PathBuf,
) -> Result<()> {
    let hosts = convergence::Hosts::start(&livemigd_path).await?;
    let result = async {
        let trials = tls::migrations(&hosts, reps, json).await?;
        let latencies = tls::api(&hosts, requests, connections).await?;
        anyhow::Ok(tls::summarize(&trials, latencies))
    }
    .await;
    hosts.stop().await;
    let summary = result?;
    let ms = |v: Option<f64>| v.map_or("n/a".into(), |v| format!("{:.2} s", v / 1000.0));
    let text = format!(
        "migration, median: plain {} ({} MiB/s), --tls {} ({} MiB/s); tls/plain time {}\n{}",
        ms(summary.plain_median_total_time_ms),
        summary
            .plain_median_throughput_mib_s
            .map_or("n/a".into(), |v| format!("{v:.0}")),
        ms(summary.tls_median_total_time_ms),
        summary
            .tls_median_throughput_mib_s
            .map_or("n/a".into(), |v| format!("{v:.0}")),
        summary
            .tls_over_plain_total_time
            .map_or("n/a".into(), |r| format!("{r:.2}")),
        summary
            .latencies
            .iter()
            .map(|l| format!(
                "  {:<42} n={:<5} p50 {:.3} ms  p99 {:.3} ms",
                l.call, l.count, l.p50_ms, l.p99_ms
            ))
            .collect::<Vec<_>>()
            .join("\n")
    );
    emit(json, &summary, text);
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let json = match &cli.command {
        Command::Convergence { json, .. }
        | Command::Tls { json, .. }
        | Command::Storage { json, .. }
        | Command::Start { json, .. }
        | Command::Vcpus { json, .. }
        | Command::Compression { json, .. }
        | Command::Sweep { json, .. }
        | Command::Drain { json, .. }
        | Command::Fleet { json, .. }
        | Command::Load { json, .. } => *json,
    };
    // On Ctrl-C or SIGTERM the run is dropped, and with it the agents and
    // every QEMU they started (their process groups are killed).
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    let result = tokio::select! {
        result = run(cli) => result,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        _ = term.recv() => Err(anyhow::anyhow!("terminated")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            // A JSON reader of stdout sees the failure too, not just no rows.
            if json {
                println!("{}", serde_json::json!({ "error": format!("{e:#}") }));
            }
            ExitCode::from(1)
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    let given = match &cli.command {
        Command::Convergence { livemigd, .. }
        | Command::Tls { livemigd, .. }
        | Command::Storage { livemigd, .. }
        | Command::Start { livemigd, .. }
        | Command::Vcpus { livemigd, .. }
        | Command::Compression { livemigd, .. }
        | Command::Sweep { livemigd, .. }
        | Command::Drain { livemigd, .. }
        | Command::Fleet { livemigd, .. }
        | Command::Load { livemigd, .. } => livemigd.clone(),
    };
    let named = given.is_some();
    ensure_livemigd(&livemigd(given), named)?;
    match cli.command {
        Command::Fleet {
            json,
            hosts,
            vms,
            batch,
            link,
            agents,
            seconds,
            ..
        } => {
            let before = std::time::Instant::now();
            let results = fleet::plan_fleet(hosts, vms, batch.max(1), link);
            let plan_wall = before.elapsed().as_secs_f64();
            for r in &results {
                emit(
                    json,
                    r,
                    format!(
                        "{:<10} {} hosts {} vms batch {}: upgrade {:>8.0} s = {:.2}x the bound ({:.0} s), work lost {:>7.0} s, converged {}/{} migrations, decisions {:.2} s (worst batch {:.3} s)",
                        r.policy,
                        r.hosts,
                        r.vms,
                        r.batch,
                        r.makespan_s,
                        r.makespan_s / r.lower_bound_s.max(1e-9),
                        r.lower_bound_s,
                        r.guest_work_lost_s,
                        r.converged,
                        r.moves,
                        r.decision_s,
                        r.worst_batch_decision_s
                    ),
                );
            }
            let peak = procstat::status_mib(std::process::id(), "VmHWM");
            emit(
                json,
                &serde_json::json!({"planning_wall_s": plan_wall, "peak_rss_mib": peak}),
                format!("planning: {plan_wall:.1} s wall for all four policies, peak memory {peak:.0} MiB"),
            );
            let tmp = tempfile::Builder::new()
                .prefix("livemig-fleet-")
                .tempdir()?;
            for n in agents {
                let r = fleet::store(tmp.path(), n, seconds).await?;
                emit(
                    json,
                    &r,
                    format!(
                        "etcd under {:>5} agents: agent read p50 {:.1} ms p99 {:.1} ms, controller read p50 {:.1} ms p99 {:.1} ms, etcd CPU {:.0} % of a core, RSS {:.0} MiB, {} refreshes, {} failed registrations",
                        r.agents,
                        r.agent_read_p50_ms,
                        r.agent_read_p99_ms,
                        r.read_p50_ms,
                        r.read_p99_ms,
                        r.etcd_cpu * 100.0,
                        r.etcd_rss_mib,
                        r.refreshes,
                        r.failures
                    ),
                );
            }
            Ok(())
        }
        Command::Drain {
            json,
            reps,
            link,
            policies,
            baseline_converge,
            allow_postcopy,
            livemigd: path,
        } => {
            let baseline_converge = ConvergeMode::from_name(&baseline_converge)
                .filter(|m| *m != ConvergeMode::None)
                .ok_or_else(|| anyhow::anyhow!("--baseline-converge: qemu or adaptive"))?;
            let runs = drain::run(drain::Options {
                reps,
                link,
                policies,
                json,
                livemigd: livemigd(path),
                baseline_converge,
                allow_postcopy,
            })
            .await?;
            drain_summary(json, &runs);
            Ok(())
        }
        Command::Convergence {
            json,
            reps,
            workloads,
            policies,
            timeout,
            estimate,
            report_ms,
            max_downtime,
            allow_postcopy,
            livemigd: path,
        } => {
            let options = convergence::RunOptions {
                estimate,
                report_ms,
                max_downtime_ms: max_downtime,
                allow_postcopy,
                ..convergence::RunOptions::benchmark(json, reps, timeout)
            };
            run_convergence(options, workloads, policies, livemigd(path)).await
        }
        Command::Tls {
            json,
            reps,
            requests,
            connections,
            livemigd: path,
        } => run_tls(json, reps, requests, connections, livemigd(path)).await,
        Command::Storage {
            json,
            sizes,
            bandwidth,
            engines,
            livemigd: path,
        } => storage::run(&livemigd(path), &sizes, bandwidth, &engines, json)
            .await
            .map(|_| ()),
        Command::Start {
            json,
            reps,
            livemigd: path,
        } => {
            let summary = start::run(&livemigd(path), reps, json).await?;
            let ms = |v: Option<f64>| v.map_or("n/a".into(), |v| format!("{v:.1} ms"));
            let text = summary
                .medians
                .iter()
                .map(|m| {
                    format!(
                        "{:<19} median first byte {}, done {}",
                        m.engine,
                        ms(m.first_byte_ms),
                        ms(m.done_ms)
                    )
                })
                .chain(std::iter::once(format!(
                    "livemig - raw-qmp: first byte {}, done {}",
                    ms(summary.livemig_minus_raw_first_byte_ms),
                    ms(summary.livemig_minus_raw_done_ms)
                )))
                .chain(std::iter::once(format!(
                    "virsh connecting alone (virsh version): {}",
                    ms(summary.virsh_connect_ms)
                )))
                .collect::<Vec<_>>()
                .join("\n");
            emit(json, &summary, text);
            Ok(())
        }
        Command::Sweep {
            json,
            links,
            rates,
            working_sets,
            rams,
            policies,
            timeout,
            livemigd: path,
        } => {
            let grid = sweep::Grid::parse(links, &rates, &working_sets, rams, policies)?;
            sweep::run(&livemigd(path), grid, timeout, json).await
        }
        Command::Compression {
            json,
            reps,
            methods,
            link,
            livemigd: path,
        } => compression::run(&livemigd(path), &methods, reps, link, json).await,
        Command::Vcpus {
            json,
            reps,
            engines,
            bandwidth,
            working_set,
            spin,
            timeout,
            livemigd: path,
        } => {
            let setup = vcpus::Setup {
                bandwidth,
                working_set_mib: working_set,
                spin,
                timeout,
            };
            vcpus::run(&livemigd(path), &engines, reps, setup, json).await
        }
        Command::Load {
            json,
            domains,
            clients,
            requests,
            livemigd: path,
        } => match load::run(&livemigd(path), domains, clients, requests).await {
            Ok(report) => {
                let text = format!(
                    "{} requests from {} clients in {:.1} s ({:.0}/s) during {} migrations ({} completed)\n{}",
                    report.requests,
                    report.clients,
                    report.seconds,
                    report.requests_per_second,
                    report.domains,
                    report.migrations_completed,
                    report
                        .latencies
                        .iter()
                        .map(|l| format!(
                            "  {:<10} n={:<5} errors={} p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
                            l.request, l.count, l.errors, l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms
                        ))
                        .collect::<Vec<_>>()
                        .join("\n")
                );
                emit(json, &report, text);
                Ok(())
            }
            Err(e) => Err(e),
        },
    }
}
