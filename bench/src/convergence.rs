//! `livemig-bench convergence`: the same guest under three workloads,
//! migrated with three convergence policies, side by side and interleaved,
//! with repetitions, in one run.
//!
//! Each trial boots a fresh guest on host A (512 MiB, 256 MiB working set),
//! measures its full-speed work rate, migrates it to host B over a
//! 64 MiB/s cap with a 300 ms downtime limit and a 90 s timeout, and
//! measures how much work the guest got done during the migration from its
//! own progress counter (which lives in guest memory and so continues on
//! the destination).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use domain::DomainDefinition;
use guest::{SerialLog, Workload};
use launcher::{AgentProcess, LaunchOptions};
use protocol::domain::DefinitionDoc;
use protocol::job::JobStatus;
use protocol::Reply;
use protocol::{Client, Request};
use protocol::{ConvergeMode, MigrateOptions};
use serde::Serialize;
use types::units::MIB_F64;

use crate::median;
use crate::sampler::Sampler;

const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
const MEMORY_MIB: u32 = 512;
const WORKING_SET_MIB: u32 = 256;
const BANDWIDTH_MIB_S: u64 = 64;
const DOWNTIME_MS: u64 = 300;
const WARMUP: Duration = Duration::from_secs(5);
const MAX_WARMUP: Duration = Duration::from_secs(60);
const RATE_WINDOW: Duration = Duration::from_secs(4);
const SETTLE: Duration = Duration::from_secs(3);

/// The light workload dirties this share of the link: well below it, so
/// that it converges on its own with room to spare. Near the link (where
/// spin 40000 had drifted: 41–48 MiB/s against 64 on 2026-11-28, 22 when
/// first calibrated) a few MiB/s between two measurements move a
/// prediction by seconds.
const LIGHT_SHARE: f64 = 1.0 / 3.0;

/// The three workloads, as first calibrated on the 2-core machine in
/// `docs/BENCHMARKS.md` (spin 40000 ≈ 22 MiB/s, 2000 ≈ 280 MiB/s, 0 =
/// as fast as TCG runs). TCG's speed drifts from day to day, so each run
/// calibrates `light` again ([`calibrate_light`]); `heavy` and `hot` stay
/// far above the link either way.
pub fn workload(name: &str) -> Option<Workload> {
    let spin = match name {
        "light" => 40_000,
        "heavy" => 2_000,
        "hot" => 0,
        _ => return None,
    };
    Some(Workload {
        working_set_mib: WORKING_SET_MIB,
        spin,
        report_ms: REPORT_MS,
    })
}

pub fn policy(name: &str) -> Option<ConvergeMode> {
    ConvergeMode::from_name(name)
}

/// How `livemig-bench convergence` runs.
#[derive(Debug, Clone, Copy)]
pub struct RunOptions {
    pub json: bool,
    pub reps: u32,
    /// Give up on a migration after this many seconds.
    pub timeout: u64,
    /// Estimate before each migration.
    pub estimate: bool,
    /// The guest's progress-line interval, ms. Each line is serial-port
    /// output, which QEMU emulates under its big lock; a long interval
    /// leaves the guest's work during the migration unmeasured.
    pub report_ms: u32,
    /// `--max-downtime` for every job, ms.
    pub max_downtime_ms: Option<u64>,
    /// `--allow-postcopy` for every job.
    pub allow_postcopy: bool,
    /// The guest's RAM, MiB.
    pub memory_mib: u32,
    /// The link (the jobs' bandwidth cap), MiB/s.
    pub bandwidth_mib_s: u64,
}

impl RunOptions {
    /// The benchmark's own guest and link: 512 MiB over 64 MiB/s.
    pub fn benchmark(json: bool, reps: u32, timeout: u64) -> RunOptions {
        RunOptions {
            json,
            reps,
            timeout,
            estimate: false,
            report_ms: REPORT_MS,
            max_downtime_ms: None,
            allow_postcopy: false,
            memory_mib: MEMORY_MIB,
            bandwidth_mib_s: BANDWIDTH_MIB_S,
        }
    }
}

/// The progress-line interval the work-lost figures are made with.
pub const REPORT_MS: u32 = 200;

/// One trial's figures (one JSON line).
#[derive(Debug, Clone, Serialize)]
pub struct Trial {
    pub workload: String,
    pub policy: String,
    pub rep: u32,
    pub converged: bool,
    pub total_time_ms: u64,
    pub downtime_ms: Option<u64>,
    pub max_cpu_throttle_pct: f64,
    /// From the guest's own progress lines: what it did not write against
    /// its rate before the migration.
    pub guest_work_lost_s: f64,
    pub guest_work_lost_fraction: f64,
    /// The agent's estimate of the same (its job record: the throttle, and
    /// post-copy as the destination measured it from its vCPU threads).
    pub agent_work_lost_s: f64,
    pub transferred_bytes: u64,
    /// Guest writes per second at full speed, before the migration.
    pub guest_rate_writes_s: f64,
    pub memory_check: &'static str,
    pub error: Option<String>,
    /// What the controller predicted once it had measured the guest (and
    /// for the fastest writer the measurement allows), ms: set against
    /// `total_time_ms` to see how far `estimate`'s model is off.
    pub predicted_total_ms: Option<u64>,
    pub predicted_worst_total_ms: Option<u64>,
    /// With `--estimate`: what `estimate` said just before the migration
    /// for this trial's policy (its total time when it predicted
    /// convergence, ms), and whether it predicted convergence.
    pub estimated_total_ms: Option<u64>,
    pub estimated_converges: Option<bool>,
    /// Its time calibrated on the earlier repetitions, and on how many.
    pub calibrated_total_ms: Option<u64>,
    pub calibration_jobs: Option<u32>,
    #[serde(flatten)]
    pub estimated: EstimatedModel,
    /// The job's timeline (controller decisions, escalations).
    pub actions: Vec<protocol::job::TimedAction>,
    /// Where each pass over memory began: ms into the job, and MiB sent
    /// by then (from the job's samples).
    pub passes: Vec<PassStart>,
}

/// The first sample of a pass.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct PassStart {
    pub pass: u64,
    pub t_ms: u64,
    pub sent_mib: f64,
}

fn pass_starts(samples: &[protocol::job::Sample]) -> Vec<PassStart> {
    let mut starts: Vec<PassStart> = Vec::new();
    for s in samples {
        if starts.last().is_none_or(|last| s.pass > last.pass) {
            starts.push(PassStart {
                pass: s.pass,
                t_ms: s.t_ms,
                sent_mib: s.transferred_bytes as f64 / MIB_F64,
            });
        }
    }
    starts
}

/// With `--estimate`: what it measured and assumed (the first pass's
/// bytes, the fitted rate and working set, MiB and MiB/s), to tell a
/// model that is wrong from a measurement that is.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct EstimatedModel {
    pub estimated_first_pass_mib: Option<f64>,
    pub estimated_rate_mib_s: Option<f64>,
    pub estimated_working_set_mib: Option<f64>,
    pub estimated_rate_is_lower_bound: Option<bool>,
}

/// What `estimate` predicted for one policy.
struct Estimated {
    total_ms: Option<u64>,
    converges: bool,
    calibrated_ms: Option<u64>,
    calibration_jobs: Option<u32>,
    model: EstimatedModel,
}

async fn estimate(
    hosts: &Hosts,
    domain: &domain::DomainName,
    mode: ConvergeMode,
    bandwidth_mib_s: u64,
) -> Result<Estimated> {
    let reply = hosts
        .a_client
        .request(
            Request::Estimate {
                domain: domain.clone(),
                params: protocol::estimate::EstimateParams {
                    bandwidth_mib_s: Some(bandwidth_mib_s),
                    downtime_ms: Some(DOWNTIME_MS),
                    ..Default::default()
                },
            },
            REQUEST_TIMEOUT,
        )
        .await?;
    let Reply::Estimate(report) = reply else {
        bail!("unexpected reply {reply:?}");
    };
    let outlook = &report.predictions.measured;
    let prediction = outlook.of(mode);
    let calibration = report.calibrations.iter().find(|c| c.policy == mode);
    Ok(Estimated {
        total_ms: prediction
            .converges
            .then_some((prediction.total_secs * 1000.0) as u64),
        converges: prediction.converges,
        calibrated_ms: calibration.map(|c| (c.total_secs * 1000.0) as u64),
        calibration_jobs: calibration.map(|c| c.jobs),
        model: EstimatedModel {
            estimated_first_pass_mib: Some(
                converge::estimate::first_pass_bytes(
                    report.guest_ram_bytes,
                    report.guest_ram_in_use_bytes,
                ) / MIB_F64,
            ),
            estimated_rate_mib_s: Some(report.model.rate / MIB_F64),
            estimated_working_set_mib: Some(report.model.working_set / MIB_F64),
            estimated_rate_is_lower_bound: Some(report.model.rate_is_lower_bound),
        },
    })
}

/// Medians per policy for one workload, and the adaptive/qemu ratios.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub summary: &'static str,
    pub workload: String,
    pub policies: Vec<PolicySummary>,
    pub adaptive_over_qemu_total_time: Option<f64>,
    pub adaptive_over_qemu_work_lost: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PolicySummary {
    pub policy: String,
    pub trials: usize,
    pub converged: usize,
    pub median_total_time_ms: f64,
    pub median_downtime_ms: Option<f64>,
    pub median_max_cpu_throttle_pct: f64,
    pub median_guest_work_lost_s: f64,
    pub median_transferred_bytes: f64,
}

pub fn summarize(workload: &str, trials: &[Trial], policies: &[String]) -> Summary {
    let per_policy: Vec<PolicySummary> = policies
        .iter()
        .map(|p| {
            let ts: Vec<&Trial> = trials
                .iter()
                .filter(|t| t.workload == workload && &t.policy == p)
                .collect();
            PolicySummary {
                policy: p.clone(),
                trials: ts.len(),
                converged: ts.iter().filter(|t| t.converged).count(),
                median_total_time_ms: median(ts.iter().map(|t| t.total_time_ms as f64).collect())
                    .unwrap_or(0.0),
                median_downtime_ms: median(
                    ts.iter()
                        .filter_map(|t| t.downtime_ms.map(|d| d as f64))
                        .collect(),
                ),
                median_max_cpu_throttle_pct: median(
                    ts.iter().map(|t| t.max_cpu_throttle_pct).collect(),
                )
                .unwrap_or(0.0),
                median_guest_work_lost_s: median(ts.iter().map(|t| t.guest_work_lost_s).collect())
                    .unwrap_or(0.0),
                median_transferred_bytes: median(
                    ts.iter().map(|t| t.transferred_bytes as f64).collect(),
                )
                .unwrap_or(0.0),
            }
        })
        .collect();
    let find = |name: &str| per_policy.iter().find(|p| p.policy == name);
    let ratio = |f: fn(&PolicySummary) -> f64| match (find("adaptive"), find("qemu")) {
        (Some(a), Some(q)) if f(q) > 0.0 => Some(f(a) / f(q)),
        _ => None,
    };
    Summary {
        summary: "workload",
        workload: workload.to_string(),
        adaptive_over_qemu_total_time: ratio(|p| p.median_total_time_ms),
        adaptive_over_qemu_work_lost: ratio(|p| p.median_guest_work_lost_s),
        policies: per_policy,
    }
}

/// Two agents on loopback, for all trials.
pub struct Hosts {
    _dir: tempfile::TempDir,
    a: AgentProcess,
    b: AgentProcess,
    pub a_client: Client,
    pub b_client: Client,
    a_tcp_uri: String,
    b_uri: String,
    kernel: PathBuf,
    pki: PathBuf,
    /// With [`Hosts::start_linked`], the namespaces the agents run in:
    /// dropped after them.
    fabric: Option<launcher::fabric::Fabric>,
}

impl Hosts {
    pub async fn start(livemigd: &Path) -> Result<Hosts> {
        Self::start_with(livemigd, false).await
    }

    /// With `local_storage`, each agent sees a directory of its own at
    /// [`Hosts::local`] (a bind mount in its mount namespace: needs root).
    pub async fn start_with(livemigd: &Path, local_storage: bool) -> Result<Hosts> {
        Self::start_on(livemigd, local_storage, None).await
    }

    /// The two agents in network namespaces of their own, joined by a link
    /// capped at `link_mib_s` each way by the kernel (`tc`), not by QEMU:
    /// what crosses it is the bytes really sent (needs root).
    pub async fn start_linked(livemigd: &Path, link_mib_s: u64) -> Result<Hosts> {
        Self::start_on(livemigd, false, Some(link_mib_s)).await
    }

    async fn start_on(livemigd: &Path, local_storage: bool, link: Option<u64>) -> Result<Hosts> {
        let fabric = match link {
            Some(mib_s) => {
                let fabric = launcher::fabric::Fabric::create("bench", 2)
                    .context("network namespaces for the two hosts (needs root)")?;
                fabric.cap(mib_s)?;
                Some(fabric)
            }
            None => None,
        };
        let address = |name: &str| -> (String, Option<String>) {
            match &fabric {
                Some(f) => {
                    let host = &f.hosts[usize::from(name == "b")];
                    (host.ip.clone(), Some(host.netns.clone()))
                }
                None => ("127.0.0.1".into(), None),
            }
        };
        let dir = tempfile::Builder::new()
            .prefix("livemig-bench-")
            .tempdir()?;
        if local_storage {
            for sub in ["local", "local-a", "local-b"] {
                std::fs::create_dir_all(dir.path().join(sub))?;
            }
        }
        let kernel = guest::install_kernel(dir.path())?;
        let pki = dir.path().join("pki");
        tls::pki::init_if_missing(&pki)?;
        let launch = |name: &str| -> Result<LaunchOptions> {
            Ok(LaunchOptions {
                binary: livemigd.to_path_buf(),
                state_dir: dir.path().join(name),
                listen: Some(format!("tls://{}:0", address(name).0)),
                tls_dir: Some(tls::pki::issue(
                    &pki,
                    name,
                    protocol::Role::Agent,
                    &[address(name).0],
                )?),
                netns: address(name).1,
                image_dirs: vec![dir.path().to_path_buf()],
                extra_args: Vec::new(),
                private_dirs: if local_storage {
                    vec![(
                        dir.path().join(format!("local-{name}")),
                        dir.path().join("local"),
                    )]
                } else {
                    Vec::new()
                },
            })
        };
        let a = AgentProcess::spawn(&launch("a")?)
            .await
            .with_context(|| format!("cannot start {}", livemigd.display()))?;
        let b = AgentProcess::spawn(&launch("b")?).await?;
        let a_client = Client::connect(&a.local_uri()).await?;
        let b_client = Client::connect(&b.local_uri()).await?;
        let b_uri = b
            .tcp_uri()
            .ok_or_else(|| anyhow!("host b has no TCP address"))?;
        let a_tcp_uri = a
            .tcp_uri()
            .ok_or_else(|| anyhow!("host a has no TCP address"))?;
        Ok(Hosts {
            _dir: dir,
            a,
            b,
            a_client,
            b_client,
            a_tcp_uri,
            b_uri,
            kernel,
            pki,
            fabric,
        })
    }

    /// Bytes host a (0) or b (1) has sent onto its link, with
    /// [`Hosts::start_linked`].
    pub fn sent_bytes(&self, host: usize) -> Option<u64> {
        self.fabric.as_ref()?.hosts.get(host)?.sent_bytes()
    }

    /// Stops the guest `domain` wherever it runs and undefines it on a.
    pub async fn remove_guest(&self, domain: &domain::DomainName) {
        for client in [&self.a_client, &self.b_client] {
            let _ = client
                .request(
                    Request::Destroy {
                        domain: domain.clone(),
                    },
                    REQUEST_TIMEOUT,
                )
                .await;
        }
        let _ = self
            .a_client
            .request(
                Request::Undefine {
                    domain: domain.clone(),
                },
                REQUEST_TIMEOUT,
            )
            .await;
    }

    /// Defines the test guest `name` on host a and starts it.
    pub async fn start_guest(&self, name: &str, memory_mib: u32, workload: Workload) -> Result<()> {
        let definition = DomainDefinition::from_toml(&guest::definition_toml(
            name,
            memory_mib,
            &self.kernel,
            workload,
        ))?;
        self.a_client
            .request(
                Request::Define {
                    definition: DefinitionDoc(definition.to_document()),
                },
                REQUEST_TIMEOUT,
            )
            .await?;
        self.a_client
            .request(
                Request::Start {
                    domain: definition.name,
                    paused: false,
                },
                REQUEST_TIMEOUT,
            )
            .await?;
        Ok(())
    }

    /// New connections to both agents: they close a connection idle for
    /// two minutes, as a long baseline run leaves these.
    pub async fn reconnect(&mut self) -> Result<()> {
        self.a_client = Client::connect(&self.a.local_uri()).await?;
        self.b_client = Client::connect(&self.b.local_uri()).await?;
        Ok(())
    }

    /// Where each host sees its own storage (with `local_storage`).
    pub fn local(&self) -> PathBuf {
        self._dir.path().join("local")
    }

    /// What host `name` sees at [`Hosts::local`].
    pub fn local_of(&self, name: &str) -> PathBuf {
        self._dir.path().join(format!("local-{name}"))
    }

    /// The directory both hosts take images from.
    pub fn images(&self) -> &Path {
        self._dir.path()
    }

    pub fn b_uri(&self) -> &str {
        &self.b_uri
    }

    /// Host A's mutual-TLS address.
    pub fn a_tcp_uri(&self) -> &str {
        &self.a_tcp_uri
    }

    /// A client certificate with `role` from the hosts' CA (a TLS
    /// directory).
    pub fn certificate(&self, name: &str, role: protocol::Role) -> Result<PathBuf> {
        Ok(tls::pki::issue(&self.pki, name, role, &[])?)
    }

    /// Host A's local socket, for more client connections.
    pub fn a_uri(&self) -> protocol::AgentUri {
        self.a.local_uri()
    }

    pub async fn stop(self) {
        self.a.stop(Duration::from_secs(20)).await;
        self.b.stop(Duration::from_secs(20)).await;
    }
}

async fn serial_log(client: &Client, name: &str) -> Option<PathBuf> {
    match client
        .request(
            Request::DomInfo {
                domain: name.parse().ok()?,
            },
            REQUEST_TIMEOUT,
        )
        .await
    {
        Ok(Reply::DomainInfo(info)) => info.serial_log.map(PathBuf::from),
        _ => None,
    }
}

/// How the light workload's spin was found for this run.
#[derive(Debug, Clone, Serialize)]
pub struct Calibration {
    pub calibration: String,
    /// The spin measured with, and what the guest dirtied under it.
    pub spin_measured: u32,
    pub measured_mib_s: f64,
    /// What it should dirty, and the spin that does.
    pub target_mib_s: f64,
    pub spin: u32,
}

/// Finds the spin under which the light workload dirties [`LIGHT_SHARE`]
/// of the link on this machine now: a guest with the nominal spin runs
/// alone on host a for a warm-up, its writes per second (one page each)
/// give its rate, and the spin scales by rate over target (a write's cost
/// is nearly all spin).
pub async fn calibrate_light(hosts: &Hosts) -> Result<(Workload, Calibration)> {
    let mut light = workload("light").expect("light is a workload");
    light.report_ms = REPORT_MS;
    let measured = guest_rate_mib_s(hosts, MEMORY_MIB, light).await?;
    let target = LIGHT_SHARE * BANDWIDTH_MIB_S as f64;
    let spin = (light.spin as f64 * measured / target).round().max(1.0) as u32;
    let calibration = Calibration {
        calibration: "light".into(),
        spin_measured: light.spin,
        measured_mib_s: measured,
        target_mib_s: target,
        spin,
    };
    light.spin = spin;
    Ok((light, calibration))
}

/// What a guest of `memory_mib` running `workload` alone on host a dirties
/// at full speed after a warm-up, MiB/s (each write is one 4 KiB page).
pub async fn guest_rate_mib_s(hosts: &Hosts, memory_mib: u32, workload: Workload) -> Result<f64> {
    let name = "bench-calibration";
    hosts.start_guest(name, memory_mib, workload).await?;
    let sampler = Sampler::start();
    let log = serial_log(&hosts.a_client, name)
        .await
        .ok_or_else(|| anyhow!("no serial log"))?;
    sampler.follow(log);
    let started = Instant::now();
    let writes_s = loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let rate = sampler.samples().recent_rate(RATE_WINDOW);
        match rate {
            Some(r) if started.elapsed() >= WARMUP && r > 0.0 => break r,
            _ if started.elapsed() > MAX_WARMUP => {
                bail!("the calibration guest reported no progress within {MAX_WARMUP:?}")
            }
            _ => {}
        }
    };
    sampler.stop();
    hosts.remove_guest(&name.parse()?).await;
    Ok(writes_s * 4096.0 / types::MIB as f64)
}

/// Runs one trial of `workload` (named `workload_name`).
pub async fn trial(
    hosts: &Hosts,
    (workload_name, mut workload): (&str, Workload),
    policy_name: &str,
    rep: u32,
    options: &RunOptions,
) -> Result<Trial> {
    let (timeout_s, estimate_first) = (options.timeout, options.estimate);
    workload.report_ms = options.report_ms;
    let mode = policy(policy_name).ok_or_else(|| anyhow!("unknown policy"))?;
    // Estimates are calibrated on the domain's past jobs: one name across
    // the repetitions.
    let name = if estimate_first {
        format!("bench-{workload_name}-{policy_name}")
    } else {
        format!("bench-{workload_name}-{policy_name}-{rep}")
    };
    hosts
        .start_guest(&name, options.memory_mib, workload)
        .await?;
    let domain: domain::DomainName = name.parse()?;
    let sampler = Sampler::start();
    let source_log = serial_log(&hosts.a_client, &name)
        .await
        .ok_or_else(|| anyhow!("no serial log"))?;
    sampler.follow(source_log.clone());
    // Warm up until the guest has written its whole working set once, so
    // every workload starts the migration with the same memory in use.
    let warm_start = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let swept = SerialLog::read(&source_log)?
            .last_progress()
            .is_some_and(|p| p.pass >= 2);
        if swept && warm_start.elapsed() >= WARMUP {
            break;
        }
        if warm_start.elapsed() > MAX_WARMUP {
            bail!("the guest did not sweep its working set within {MAX_WARMUP:?}");
        }
    }
    // Two lines within the rate's window at least, or the guest's work is
    // not measured (NaN: `null` in the JSON).
    let measure_work = options.report_ms as u128 * 2 <= RATE_WINDOW.as_millis();
    let guest_rate = if measure_work {
        sampler
            .samples()
            .recent_rate(RATE_WINDOW)
            .filter(|r| *r > 0.0)
            .ok_or_else(|| anyhow!("the guest reported no progress during warm-up"))?
    } else {
        f64::NAN
    };

    let estimated = if estimate_first {
        Some(estimate(hosts, &domain, mode, options.bandwidth_mib_s).await?)
    } else {
        None
    };

    let flags = MigrateOptions {
        live: true,
        bandwidth: Some(options.bandwidth_mib_s),
        downtime: Some(DOWNTIME_MS),
        max_downtime: options.max_downtime_ms,
        allow_postcopy: options.allow_postcopy,
        timeout: Some(timeout_s),
        converge: Some(mode),
        ..Default::default()
    };
    let t_start = Instant::now();
    let job_id = match hosts
        .a_client
        .request(
            Request::Migrate {
                domain: domain.clone(),
                destination: hosts.b_uri.clone(),
                flags: Box::new(flags),
            },
            REQUEST_TIMEOUT,
        )
        .await?
    {
        Reply::MigrationStarted { job_id } => job_id,
        other => bail!("unexpected reply {other:?}"),
    };
    // Follow the destination's log as soon as the incoming QEMU exists.
    let record = loop {
        if let Some(path) = serial_log(&hosts.b_client, &name).await {
            sampler.follow(path);
        }
        match hosts
            .a_client
            .request(Request::Job { id: job_id.clone() }, REQUEST_TIMEOUT)
            .await?
        {
            Reply::Job {
                record: Some(r), ..
            } => break *r,
            Reply::Job { .. } => {}
            other => bail!("unexpected reply {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let converged = record.status == JobStatus::Completed;
    // The migration ended when QEMU says it did (switchover included), or
    // when the job gave up.
    let duration = if converged {
        Duration::from_millis(record.total_time_ms)
    } else {
        t_start.elapsed()
    };
    let t_end = t_start + duration;
    tokio::time::sleep(SETTLE).await;
    sampler.stop();

    let samples = sampler.samples();
    let secs = duration.as_secs_f64();
    let lost = if measure_work {
        let work = match (samples.writes_at(t_start), samples.writes_at(t_end)) {
            (Some(a), Some(b)) => b - a,
            _ => bail!("no guest progress samples around the migration"),
        };
        (secs - work / guest_rate).max(0.0)
    } else {
        f64::NAN
    };
    let log = if converged {
        serial_log(&hosts.b_client, &name).await
    } else {
        Some(source_log)
    };
    let intact = match &log {
        Some(path) => SerialLog::read(path)
            .map(|l| l.memory_intact())
            .unwrap_or(false),
        None => false,
    };
    hosts.remove_guest(&domain).await;

    Ok(Trial {
        workload: workload_name.to_string(),
        policy: policy_name.to_string(),
        rep,
        converged,
        total_time_ms: duration.as_millis() as u64,
        downtime_ms: record.downtime_ms.filter(|_| converged),
        max_cpu_throttle_pct: record.max_cpu_throttle_pct,
        guest_work_lost_s: lost,
        guest_work_lost_fraction: if secs > 0.0 { lost / secs } else { 0.0 },
        agent_work_lost_s: record.as_info().guest_work_lost_s,
        transferred_bytes: record.transferred_bytes,
        guest_rate_writes_s: guest_rate,
        memory_check: if intact { "ok" } else { "corrupt" },
        error: record.error,
        predicted_total_ms: record.predicted_total_ms,
        predicted_worst_total_ms: record.predicted_worst_total_ms,
        estimated_total_ms: estimated.as_ref().and_then(|e| e.total_ms),
        estimated_converges: estimated.as_ref().map(|e| e.converges),
        calibrated_total_ms: estimated.as_ref().and_then(|e| e.calibrated_ms),
        calibration_jobs: estimated.as_ref().and_then(|e| e.calibration_jobs),
        estimated: estimated.as_ref().map(|e| e.model).unwrap_or_default(),
        passes: pass_starts(&record.samples),
        actions: record.actions,
    })
}
