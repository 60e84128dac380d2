//! `livemig-bench drain`: one host of small real guests (quiet, light,
//! heavy and hot writers) drained to two others through capped links, by
//! each policy in turn on the same cluster: one at a time per host
//! (Nova's default), two per host (KubeVirt's), everything at once, and
//! livemig's controller. Every run starts from fresh guests on host-a.
//! The fixed policies place the guests as livemig does and, by default,
//! converge with livemig's adaptive controller too, so that only the
//! schedule differs (`--baseline-converge qemu`: QEMU's auto-converge,
//! the most those tools offer today).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use cluster::{Cordon, DrainRecord, DrainStart};
use domain::DomainDefinition;
use fleet::plan;
use guest::{SerialLog, Workload};
use launcher::local_fleet::{FleetOptions, LocalFleet};
use protocol::call::{self, JobState};
use protocol::domain::DefinitionDoc;
use protocol::job::{JobRecord, JobStatus};
use protocol::{Client, ConvergeMode, MigrateOptions, Request};
use serde::Serialize;

const HOSTS: [&str; 3] = ["host-a", "host-b", "host-c"];
const TIMEOUT: Duration = Duration::from_secs(600);

/// The guests: name, RAM MiB, working set MiB, spin (lower dirties
/// faster).
pub const GUESTS: [(&str, u32, u32, u32); 6] = [
    ("quiet1", 128, 1, 500_000),
    ("quiet2", 128, 1, 500_000),
    ("light1", 128, 8, 20_000),
    ("light2", 192, 16, 20_000),
    ("heavy", 192, 48, 2_000),
    ("hot", 256, 64, 200),
];

/// One policy's run.
#[derive(Debug, Serialize)]
pub struct Run {
    /// `sequential`, `fixed-2`, `all` or `livemig`.
    pub policy: String,
    /// Repetition, from 1.
    pub rep: u32,
    /// From the first command to the last guest running on its new host.
    pub makespan_s: f64,
    /// The shortest the drain could take: the longer of the network's
    /// bound (`fleet::plan::lower_bound`: every link carrying each guest's
    /// memory once) and the longest guest migrated alone over the whole
    /// link (measured in the same repetition's sequential run, which
    /// migrates each guest alone).
    pub lower_bound_s: f64,
    /// The network's bound alone.
    pub network_bound_s: f64,
    /// livemig's drain only: the makespan its controller predicted when it
    /// planned the drain (the schedule over the convergence model), to
    /// hold the prediction `livemig drain` shows to what happened.
    pub predicted_makespan_s: Option<f64>,
    /// The longest guest alone, measured, if the repetition ran
    /// `sequential` with the adaptive controller (`--baseline-converge
    /// adaptive`, the default).
    pub longest_alone_s: Option<f64>,
    /// Guest time lost to throttling and downtime, all guests.
    pub guest_work_lost_s: f64,
    /// The longest switchover.
    pub worst_downtime_ms: u64,
    /// Bytes sent, all guests.
    pub sent_mib: f64,
    /// Guests drained.
    pub vms: usize,
    /// Migrations that completed.
    pub converged: usize,
    /// Guests whose memory checks passed.
    pub intact: usize,
    /// Migrations that switched to post-copy.
    pub postcopy: usize,
    /// Who made the jobs converge.
    pub converge: String,
    /// Why each migration that did not complete failed.
    pub failures: Vec<String>,
    /// Each migration: when it started and ended, from the drain's start.
    pub jobs: Vec<JobSpan>,
}

/// One migration of a run.
#[derive(Debug, Serialize)]
pub struct JobSpan {
    pub domain: String,
    pub start_s: f64,
    pub end_s: f64,
    pub max_cpu_throttle_pct: f64,
    pub guest_work_lost_s: f64,
    /// The part of it post-copy cost (the guest waiting for pages on the
    /// destination), when the job went to post-copy.
    pub postcopy_work_lost_s: Option<f64>,
    /// The guest's pause at switchover, ms, to tell which job a run's
    /// worst downtime was.
    pub downtime_ms: Option<u64>,
    /// When each of the job's phases began, ms after the source agent got
    /// the command: where the time after QEMU's switchover goes.
    pub phases: Vec<protocol::job::PhaseTime>,
    /// The controller's decisions, each with its time and reason.
    pub actions: Vec<protocol::job::TimedAction>,
    /// Where each pass over memory began, as the job's samples first show
    /// it: what the controller decided at (syncs) and when.
    pub passes: Vec<PassSeen>,
}

/// A pass over memory as the job's samples first show it.
#[derive(Debug, Serialize)]
pub struct PassSeen {
    /// On the job's timeline (that of its actions), ms.
    pub t_ms: u64,
    /// QEMU's pass count.
    pub pass: u64,
    /// QEMU's status then (`active`, `postcopy-active`).
    pub status: String,
    /// What was left to send then, MiB.
    pub remaining_mib: f64,
}

impl PassSeen {
    fn of(samples: &[protocol::job::Sample]) -> Vec<PassSeen> {
        let mut passes: Vec<PassSeen> = Vec::new();
        for s in samples {
            if passes.last().is_none_or(|p| p.pass != s.pass) {
                passes.push(PassSeen {
                    t_ms: s.t_ms,
                    pass: s.pass,
                    status: s.status.clone(),
                    remaining_mib: s.remaining_bytes as f64 / 1048576.0,
                });
            }
        }
        passes
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Repetitions.
    pub reps: u32,
    /// Each host's link, MiB/s.
    pub link: u64,
    /// Policies, in order.
    pub policies: Vec<String>,
    /// One JSON object per line.
    pub json: bool,
    /// The agent.
    pub livemigd: PathBuf,
    /// The fixed policies' convergence.
    pub baseline_converge: ConvergeMode,
    /// Every guest may go to post-copy when the adaptive controller finds
    /// that no throttle converges it (a writer held by the slice floor):
    /// through a cluster policy for livemig's drain, through the migrate
    /// flag for the fixed policies on the adaptive controller.
    pub allow_postcopy: bool,
}

/// The label every benchmark guest carries, and the policy that selects it.
const LABEL: (&str, &str) = ("bench", "drain");

fn per_host(policy: &str) -> Result<Option<usize>> {
    Ok(match policy {
        "sequential" => Some(1),
        "fixed-2" => Some(2),
        "all" => None,
        "livemig" => None,
        other => bail!("unknown policy {other:?} (sequential, fixed-2, all, livemig)"),
    })
}

/// Runs the benchmark; one [`Run`] per policy and repetition.
///
/// # Errors
/// Not root, a cluster that does not start, a guest that does not run.
pub async fn run(options: Options) -> Result<Vec<Run>> {
    for p in &options.policies {
        per_host(p)?;
    }
    if !nix::unistd::geteuid().is_root() {
        bail!("the drain benchmark makes network namespaces: run it as root");
    }
    let tmp = tempfile::Builder::new()
        .prefix("livemig-drain-")
        .tempdir()?;
    let dir = tmp.path();
    let kernel = guest::install_kernel(dir)?;
    let controller = options
        .livemigd
        .parent()
        .map(|d| d.join("livemig-controller"))
        .filter(|p| p.exists())
        .ok_or_else(|| anyhow!("livemig-controller is not beside livemigd: build the workspace"))?;
    let fleet = LocalFleet::start(&FleetOptions {
        dir: dir.to_path_buf(),
        hosts: HOSTS.iter().map(|h| h.to_string()).collect(),
        link_mib_s: options.link,
        livemigd: options.livemigd.clone(),
        controller: Some(controller),
        qemu: None,
        image_dirs: vec![dir.to_path_buf()],
    })
    .await?;
    let result = async {
        if options.allow_postcopy {
            fleet
                .cluster
                .set_policy(&cluster::Policy {
                    name: "drain-bench".into(),
                    selector: [(LABEL.0.to_string(), LABEL.1.to_string())].into(),
                    converge: Some(ConvergeMode::Adaptive),
                    max_downtime_ms: None,
                    max_throttle_pct: None,
                    bandwidth_mib_s: None,
                    timeout_s: None,
                    allow_postcopy: true,
                })
                .await?;
        }
        let mut runs = Vec::new();
        for rep in 1..=options.reps {
            let mut order = options.policies.clone();
            let turn = (rep as usize - 1) % order.len().max(1);
            order.rotate_left(turn);
            let mut this_rep = Vec::new();
            let mut longest_alone = None;
            for policy in &order {
                let (run, alone) = one(&fleet, &kernel, policy, rep, &options).await?;
                // One at a time with livemig's own convergence is each
                // guest alone on the whole link: the slowest of them bounds
                // any schedule that converges the same way.
                if policy == "sequential" && options.baseline_converge == ConvergeMode::Adaptive {
                    longest_alone = alone;
                }
                this_rep.push(run);
            }
            for mut run in this_rep {
                run.longest_alone_s = longest_alone;
                run.lower_bound_s = run.network_bound_s.max(longest_alone.unwrap_or(0.0));
                crate::emit(
                    options.json,
                    &run,
                    format!(
                        "{:<10} rep {} makespan {:>6.1} s{} (bound {:>5.1} s, {:.2}x) lost {:>5.1} s worst downtime {:>4} ms sent {:>6.0} MiB converged {}/{} intact {}/{}",
                        run.policy,
                        run.rep,
                        run.makespan_s,
                        run.predicted_makespan_s
                            .map(|p| format!(" (predicted {p:.1} s)"))
                            .unwrap_or_default(),
                        run.lower_bound_s,
                        run.makespan_s / run.lower_bound_s.max(1e-9),
                        run.guest_work_lost_s,
                        run.worst_downtime_ms,
                        run.sent_mib,
                        run.converged,
                        run.vms,
                        run.intact,
                        run.vms
                    ),
                );
                runs.push(run);
            }
        }
        Ok::<_, anyhow::Error>(runs)
    }
    .await;
    fleet.stop().await;
    result
}

/// Fresh guests on host-a; the policy drains them; what it cost, and the
/// longest single migration.
async fn one(
    fleet: &LocalFleet,
    kernel: &Path,
    policy: &str,
    rep: u32,
    options: &Options,
) -> Result<(Run, Option<f64>)> {
    let source_logs = reset(fleet, kernel).await?;
    let agents = fleet::survey::Agents::new(Some(&fleet.operator))?;
    let survey = fleet::survey::survey(&fleet.cluster, &agents, HOSTS[0], true).await?;
    let guests: Vec<plan::Guest> = survey.guests.iter().map(|s| s.guest.clone()).collect();
    let placement = plan::place(&guests, &survey.source, &survey.hosts, &[]);
    if !placement.unplaceable.is_empty() {
        bail!("no room for {:?}", placement.unplaceable);
    }
    let network_bound_s = plan::lower_bound(&guests, &survey.source, &survey.hosts, &placement);
    let t0_ms = cluster::now_ms();
    let (makespan_s, predicted_makespan_s, records, converge) = match per_host(policy)? {
        _ if policy == "livemig" => {
            let (secs, predicted, records) = by_controller(fleet).await?;
            (secs, predicted, records, "adaptive")
        }
        cap => {
            let (secs, records) = fixed(fleet, &placement, cap, options).await?;
            (secs, None, records, options.baseline_converge.name())
        }
    };
    let intact = check_memory(fleet, &records, &source_logs).await?;
    let longest = records
        .iter()
        .map(|r| r.total_time_ms as f64 / 1000.0)
        .reduce(f64::max);
    let run = Run {
        policy: policy.to_string(),
        rep,
        makespan_s,
        lower_bound_s: network_bound_s,
        network_bound_s,
        predicted_makespan_s,
        longest_alone_s: None,
        guest_work_lost_s: records.iter().map(|r| r.as_info().guest_work_lost_s).sum(),
        worst_downtime_ms: records
            .iter()
            .filter_map(|r| r.downtime_ms)
            .max()
            .unwrap_or(0),
        sent_mib: records
            .iter()
            .map(|r| r.transferred_bytes as f64)
            .sum::<f64>()
            / 1048576.0,
        vms: GUESTS.len(),
        converged: records
            .iter()
            .filter(|r| r.status == JobStatus::Completed)
            .count(),
        intact,
        postcopy: records
            .iter()
            .filter(|r| {
                r.actions
                    .iter()
                    .any(|a| a.action == protocol::job::ActionKind::Postcopy)
            })
            .count(),
        converge: converge.to_string(),
        failures: records
            .iter()
            .filter(|r| r.status != JobStatus::Completed)
            .map(|r| format!("{}: {}", r.domain, r.error.clone().unwrap_or_default()))
            .collect(),
        jobs: records
            .iter()
            .map(|r| JobSpan {
                domain: r.domain.clone(),
                start_s: r.started_at_ms.saturating_sub(t0_ms) as f64 / 1000.0,
                end_s: r.finished_at_ms.saturating_sub(t0_ms) as f64 / 1000.0,
                max_cpu_throttle_pct: r.max_cpu_throttle_pct,
                guest_work_lost_s: r.as_info().guest_work_lost_s,
                postcopy_work_lost_s: r.stats.postcopy_work_lost_ms.map(|ms| ms as f64 / 1000.0),
                downtime_ms: r.downtime_ms,
                phases: r.phases.clone(),
                actions: r.actions.clone(),
                passes: PassSeen::of(&r.samples),
            })
            .collect(),
    };
    Ok((run, longest))
}

/// Removes every guest from every host, lifts host-a's cordon, and starts
/// the guests afresh on host-a; their serial logs there.
async fn reset(fleet: &LocalFleet, kernel: &Path) -> Result<Vec<(String, PathBuf)>> {
    for client in &fleet.clients {
        for (name, ..) in GUESTS {
            let domain: types::DomainName = name.parse()?;
            let _ = client
                .request(
                    Request::Destroy {
                        domain: domain.clone(),
                    },
                    Duration::from_secs(30),
                )
                .await;
            let _ = client
                .request(Request::Undefine { domain }, Duration::from_secs(30))
                .await;
        }
    }
    // A stopped guest's ownership is released by its agent a moment
    // later; until then the cluster refuses to start it elsewhere. A guest
    // whose job was still ending refused the first destroy: its owner is
    // asked again (the job aborted first) every two seconds.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut next_try = Instant::now() + Duration::from_secs(2);
    loop {
        let owned: Vec<(String, String)> = fleet
            .cluster
            .owners()
            .await?
            .into_iter()
            .filter(|(d, _)| GUESTS.iter().any(|(name, ..)| name == d))
            .collect();
        if owned.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            let mut said = Vec::new();
            for (domain, host) in &owned {
                let state = match HOSTS.iter().position(|h| h == host) {
                    Some(i) => match fleet.clients[i]
                        .request(
                            Request::DomInfo {
                                domain: domain.parse()?,
                            },
                            Duration::from_secs(10),
                        )
                        .await
                    {
                        Ok(reply) => format!("{reply:?}"),
                        Err(e) => format!("{e}"),
                    },
                    None => "an unknown host".to_string(),
                };
                said.push(format!("{domain} on {host}: {state}"));
            }
            bail!(
                "the stopped guests are still owned in the cluster after 30 s: {}",
                said.join("; ")
            );
        }
        if Instant::now() > next_try {
            next_try = Instant::now() + Duration::from_secs(2);
            for (domain, host) in &owned {
                let Some(i) = HOSTS.iter().position(|h| h == host) else {
                    continue;
                };
                let domain: types::DomainName = domain.parse()?;
                let client = &fleet.clients[i];
                for request in [
                    Request::DomJobAbort {
                        domain: domain.clone(),
                    },
                    Request::Destroy {
                        domain: domain.clone(),
                    },
                    Request::Undefine {
                        domain: domain.clone(),
                    },
                ] {
                    let _ = client.request(request, Duration::from_secs(30)).await;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    fleet.cluster.uncordon(HOSTS[0]).await?;
    let a = &fleet.clients[0];
    for (name, memory, working_set, spin) in GUESTS {
        let mut definition = DomainDefinition::from_toml(&guest::definition_toml(
            name,
            memory,
            kernel,
            Workload::busy(working_set, spin),
        ))?;
        definition
            .labels
            .insert(LABEL.0.to_string(), LABEL.1.to_string());
        let definition = DefinitionDoc(definition.to_document());
        a.call(call::Define { definition }, Duration::from_secs(30))
            .await?;
        a.call(
            call::Start {
                domain: name.parse()?,
                paused: false,
            },
            Duration::from_secs(60),
        )
        .await?;
    }
    let mut logs = Vec::new();
    for (name, ..) in GUESTS {
        let log = serial_of(a, name).await?;
        wait_progress(&log, 2).await?;
        logs.push((name.to_string(), log));
    }
    // The cluster must see them before a drain surveys the host.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let hosts = fleet.cluster.hosts().await?;
        if hosts
            .iter()
            .any(|h| h.name == HOSTS[0] && h.domains.len() == GUESTS.len())
        {
            return Ok(logs);
        }
        if Instant::now() > deadline {
            bail!("host-a's guests did not show in the cluster within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// livemig: a drain recorded for the controller; its length as recorded,
/// the makespan its plan predicted, and its jobs.
async fn by_controller(fleet: &LocalFleet) -> Result<(f64, Option<f64>, Vec<JobRecord>)> {
    let now_ms = cluster::now_ms();
    let record = DrainRecord::pending(HOSTS[0], &[], None, now_ms);
    let cordon = Cordon {
        reason: "benchmark drain".into(),
        at_ms: now_ms,
    };
    if fleet.cluster.start_drain(&record, &cordon).await? != DrainStart::Started {
        bail!("host-a is being drained already");
    }
    let deadline = Instant::now() + TIMEOUT;
    let done = loop {
        let drain = fleet
            .cluster
            .drain(&record.id)
            .await?
            .context("the drain vanished")?
            .record;
        if drain.state.ended() {
            break drain;
        }
        if Instant::now() > deadline {
            bail!("the drain did not end within {TIMEOUT:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let secs = done
        .ended_at_ms
        .unwrap_or(now_ms)
        .saturating_sub(done.created_at_ms) as f64
        / 1000.0;
    let mut records = Vec::new();
    for g in &done.guests {
        if let Some(id) = &g.job_id {
            records.push(job_record(&fleet.clients[0], id).await?);
        }
    }
    Ok((secs, done.predicted_secs, records))
}

/// A fixed policy: guests taken by name, at most `cap` migrations per host
/// each way (`None`: all at once), each at the whole link.
async fn fixed(
    fleet: &LocalFleet,
    placement: &plan::Placement,
    cap: Option<usize>,
    options: &Options,
) -> Result<(f64, Vec<JobRecord>)> {
    fleet
        .cluster
        .cordon(
            HOSTS[0],
            &Cordon {
                reason: "benchmark drain".into(),
                at_ms: 0,
            },
        )
        .await?;
    let a = &fleet.clients[0];
    let uri = |host: &str| -> Result<String> {
        let i = HOSTS
            .iter()
            .position(|h| *h == host)
            .context("a known host")?;
        fleet.agents[i]
            .tcp_uri()
            .ok_or_else(|| anyhow!("{host} has no TCP address"))
    };
    let mut waiting: Vec<(&str, &String)> = GUESTS
        .iter()
        .map(|(name, ..)| (*name, &placement.destination[*name]))
        .collect();
    let mut running: Vec<(String, String)> = Vec::new();
    let mut records = Vec::new();
    let start = Instant::now();
    while !(waiting.is_empty() && running.is_empty()) {
        let mut still = Vec::new();
        for (name, to) in waiting {
            let inbound = running.iter().filter(|(_, d)| d == to).count();
            if cap.is_some_and(|c| running.len() >= c || inbound >= c) {
                still.push((name, to));
                continue;
            }
            let flags = MigrateOptions {
                live: true,
                persistent: true,
                undefine_source: true,
                tls: true,
                auto_converge: options.baseline_converge == ConvergeMode::Qemu,
                converge: (options.baseline_converge == ConvergeMode::Adaptive)
                    .then_some(ConvergeMode::Adaptive),
                bandwidth: Some(options.link),
                timeout: Some(TIMEOUT.as_secs()),
                allow_postcopy: options.allow_postcopy
                    && options.baseline_converge == ConvergeMode::Adaptive,
                ..MigrateOptions::default()
            };
            let started = a
                .call(
                    call::Migrate {
                        domain: name.parse()?,
                        destination: uri(to)?,
                        flags,
                    },
                    Duration::from_secs(60),
                )
                .await?;
            let call::Migration::Started(id) = started else {
                bail!("a dry run");
            };
            running.push((id, to.clone()));
        }
        waiting = still;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut left = Vec::new();
        for (id, to) in running {
            match a
                .call(call::Job { id: id.clone() }, Duration::from_secs(30))
                .await?
            {
                JobState::Ended(record) => records.push(*record),
                JobState::Active(_) => left.push((id, to)),
            }
        }
        running = left;
        if start.elapsed() > TIMEOUT {
            bail!("the {cap:?} drain did not end within {TIMEOUT:?}");
        }
    }
    Ok((start.elapsed().as_secs_f64(), records))
}

async fn job_record(client: &Client, id: &str) -> Result<JobRecord> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let JobState::Ended(record) = client
            .call(call::Job { id: id.to_string() }, Duration::from_secs(30))
            .await?
        {
            return Ok(*record);
        }
        if Instant::now() > deadline {
            bail!("job {id} has no record");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Guests whose memory checks passed where they run now (and, up to the
/// switchover, on host-a).
async fn check_memory(
    fleet: &LocalFleet,
    records: &[JobRecord],
    source_logs: &[(String, PathBuf)],
) -> Result<usize> {
    let mut intact = 0;
    for (name, ..) in GUESTS {
        let moved = records
            .iter()
            .any(|r| r.domain == name && r.status == JobStatus::Completed);
        let mut ok = false;
        for client in &fleet.clients {
            let Ok(log) = serial_of(client, name).await else {
                continue;
            };
            let log = wait_progress(&log, 2).await?;
            ok = log.memory_intact();
            break;
        }
        let source_ok = !moved
            || source_logs
                .iter()
                .filter(|(n, _)| n == name)
                .all(|(_, log)| SerialLog::read(log).is_ok_and(|s| s.memory_intact()));
        if ok && source_ok {
            intact += 1;
        }
    }
    Ok(intact)
}

async fn serial_of(client: &Client, name: &str) -> Result<PathBuf> {
    let info = client
        .call(
            call::DomInfo {
                domain: name.parse()?,
            },
            Duration::from_secs(30),
        )
        .await?;
    if info.id.is_none() {
        bail!("{name} does not run here");
    }
    info.serial_log
        .map(PathBuf::from)
        .ok_or_else(|| anyhow!("{name} has no serial log"))
}

/// Waits for `lines` more progress lines than the log has now.
async fn wait_progress(log: &Path, lines: usize) -> Result<SerialLog> {
    let start = SerialLog::read(log).map(|l| l.progress.len()).unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let read = SerialLog::read(log)?;
        if read.progress.len() >= start + lines {
            return Ok(read);
        }
        if Instant::now() > deadline {
            bail!("no guest progress in {} within 60 s", log.display());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
