//! `livemig-bench fleet`: the drain scheduler at fleet scale, without QEMU.
//!
//! - Plan: a rolling upgrade of `hosts` hosts running `vms` guests (a
//!   seeded mix of quiet, light, heavy and hot writers of 1 to 16 GiB),
//!   drained `batch` hosts at a time onto the others, each batch placed
//!   (`fleet::plan::place`) and scheduled by each policy over the
//!   convergence model (`fleet::schedule::simulate`): the makespan against
//!   the lower bound, the guest work lost, and the controller's decision
//!   time and memory.
//! - Store: a real etcd (TLS, loopback) under `agents` simulated agents,
//!   each registered under a lease renewed a third of it at a time and its
//!   record rewritten every 3 s as livemigd does (with a read of its
//!   cordon), and a controller reading the hosts and drains twice a
//!   second: the latency of the agents' and the controller's reads under
//!   that load, and etcd's CPU and memory.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use cluster::{Cluster, Endpoints, HostRecord, TlsFiles};
use converge::model::DirtyModel;
use fleet::plan::{self, Guest, Host};

use crate::procstat::{cpu_ticks, percentile, rss_mib};
use fleet::schedule::{self, Caps, Move, Policy};
use serde::Serialize;

/// A small deterministic generator (xorshift), so every run plans the same
/// fleet.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const MIB: f64 = 1048576.0;

fn guest(rng: &mut Rng, i: usize) -> Guest {
    let memory_gib = [1u64, 2, 4, 8, 16][rng.below(5) as usize];
    let memory = memory_gib << 30;
    let (rate_mib, ws_mib) = match rng.below(20) {
        0..=9 => (1.0, 16.0),                                         // quiet
        10..=15 => (20.0, 256.0),                                     // light
        16..=18 => (200.0, 1024.0),                                   // heavy
        _ => (900.0, (memory_gib as f64 * 1024.0 / 4.0).min(4096.0)), // hot
    };
    Guest {
        name: format!("vm{i}"),
        memory_bytes: memory,
        // Half the RAM in use, on average.
        first_pass_bytes: memory as f64 * (0.3 + rng.below(50) as f64 / 100.0),
        model: DirtyModel {
            rate: rate_mib * MIB,
            working_set: ws_mib * MIB,
            rate_is_lower_bound: false,
        },
        copied_disk_bytes: 0,
    }
}

/// One policy over the whole rolling upgrade.
#[derive(Debug, Serialize)]
pub struct PlanResult {
    /// The policy.
    pub policy: String,
    /// Hosts, guests, hosts drained at once.
    pub hosts: usize,
    /// Guests.
    pub vms: usize,
    /// Hosts drained at once.
    pub batch: usize,
    /// The upgrade's length: the batches' makespans added up, seconds.
    pub makespan_s: f64,
    /// The batches' lower bounds added up, seconds.
    pub lower_bound_s: f64,
    /// Guest time lost, seconds.
    pub guest_work_lost_s: f64,
    /// Migrations in all (a guest moved onto a host drained later moves
    /// again).
    pub moves: usize,
    /// Migrations predicted to converge.
    pub converged: usize,
    /// Wall time placing and scheduling, seconds.
    pub decision_s: f64,
    /// The most decision time one batch took, seconds.
    pub worst_batch_decision_s: f64,
}

/// Plans a rolling upgrade with each policy.
pub fn plan_fleet(hosts: usize, vms: usize, batch: usize, link_mib_s: f64) -> Vec<PlanResult> {
    let mut rng = Rng(0x5eed_1234_abcd_0001);
    let per_host = vms.div_ceil(hosts);
    let mut placed: Vec<Vec<Guest>> = vec![Vec::new(); hosts];
    for i in 0..vms {
        placed[i / per_host].push(guest(&mut rng, i));
    }
    let host_ram: u64 = 512 << 30;
    let mut results = Vec::new();
    for policy in [
        Policy::Sequential,
        Policy::Fixed(2),
        Policy::All,
        Policy::Livemig,
    ] {
        let caps = match policy {
            Policy::Livemig => Caps {
                outbound: Some(8),
                inbound: Some(4),
                cluster: None,
            },
            _ => Caps::default(),
        };
        let mut result = PlanResult {
            policy: policy.name(),
            hosts,
            vms,
            batch,
            makespan_s: 0.0,
            lower_bound_s: 0.0,
            guest_work_lost_s: 0.0,
            moves: 0,
            converged: 0,
            decision_s: 0.0,
            worst_batch_decision_s: 0.0,
        };
        let mut running = placed.clone();
        for first in (0..hosts).step_by(batch) {
            let batch_hosts: Vec<usize> = (first..(first + batch).min(hosts)).collect();
            let started = Instant::now();
            let view: Vec<Host> = (0..hosts)
                .map(|h| {
                    let used: u64 = running[h].iter().map(|g| g.memory_bytes).sum();
                    Host {
                        name: format!("h{h}"),
                        link: link_mib_s * MIB,
                        ram_free_bytes: host_ram.saturating_sub(used),
                        disk_free_bytes: None,
                        qemu_version: "7.2.0".into(),
                        cpu_model: "cpu".into(),
                        cordoned: batch_hosts.contains(&h).then(|| "upgrade".to_string()),
                    }
                })
                .collect();
            let mut view = view;
            let mut moves = Vec::new();
            let mut load = plan::Load::new();
            for &h in &batch_hosts {
                let source = view[h].clone();
                let placement = plan::place_with(&running[h], &source, &view, &[], &mut load);
                for g in &running[h] {
                    if let Some(to) = placement.destination.get(&g.name) {
                        let t: usize = to[1..].parse().expect("h<index>");
                        view[t].ram_free_bytes =
                            view[t].ram_free_bytes.saturating_sub(g.memory_bytes);
                        moves.push(Move {
                            guest: g.clone(),
                            from: h,
                            to: t,
                            postcopy: false,
                        });
                    }
                }
            }
            let links = vec![link_mib_s * MIB; hosts];
            let outcome = schedule::simulate(policy, caps, &links, &moves);
            let took = started.elapsed().as_secs_f64();
            result.decision_s += took;
            result.worst_batch_decision_s = result.worst_batch_decision_s.max(took);
            result.makespan_s += outcome.makespan;
            result.lower_bound_s += batch_bound(&moves, &links);
            result.guest_work_lost_s += outcome.work_lost_secs;
            result.converged += outcome.moves.iter().filter(|m| m.converged).count();
            result.moves += outcome.moves.len();
            // The guests now run where they went; the batch comes back
            // upgraded and empty.
            for m in moves {
                running[m.to].push(m.guest);
            }
            for &h in &batch_hosts {
                running[h].clear();
            }
        }
        results.push(result);
    }
    results
}

/// A batch's lower bound: setup, then the busiest link carrying its
/// guests' memory once, or the longest guest alone.
fn batch_bound(moves: &[Move], links: &[f64]) -> f64 {
    let mut out = vec![0.0; links.len()];
    let mut inb = vec![0.0; links.len()];
    let mut longest: f64 = 0.0;
    for m in moves {
        out[m.from] += m.guest.first_pass_bytes;
        inb[m.to] += m.guest.first_pass_bytes;
        longest = longest.max(m.guest.first_pass_bytes / links[m.from].min(links[m.to]));
    }
    let busiest = (0..links.len())
        .map(|h| (out[h] / links[h]).max(inb[h] / links[h]))
        .fold(longest, f64::max);
    if moves.is_empty() {
        0.0
    } else {
        plan::SETUP_SECS + busiest
    }
}

/// The store under many agents.
#[derive(Debug, Serialize)]
pub struct StoreResult {
    /// Simulated agents.
    pub agents: usize,
    /// Seconds measured.
    pub seconds: f64,
    /// Agent refreshes measured (each rewrites the agent's record and
    /// reads its cordon).
    pub refreshes: usize,
    /// An agent's read of its cordon under the load, median, ms.
    pub agent_read_p50_ms: f64,
    /// 99th percentile.
    pub agent_read_p99_ms: f64,
    /// The controller's read of every host and drain, median, ms.
    pub read_p50_ms: f64,
    /// 99th percentile.
    pub read_p99_ms: f64,
    /// etcd's CPU over the run, share of one core.
    pub etcd_cpu: f64,
    /// etcd's resident memory at the end, MiB.
    pub etcd_rss_mib: f64,
    /// Registrations that failed.
    pub failures: usize,
}

/// Runs etcd under `agents` simulated agents for `seconds`.
///
/// # Errors
/// etcd does not start or answer.
pub async fn store(dir: &Path, agents: usize, seconds: u64) -> Result<StoreResult> {
    let pki = dir.join("pki");
    tls::pki::init_if_missing(&pki)?;
    let issued = |name: &str, role, hosts: &[String]| {
        let dir = pki.join(name);
        if dir.exists() {
            Ok(dir)
        } else {
            tls::pki::issue(&pki, name, role, hosts)
        }
    };
    let etcd_tls = issued("etcd", protocol::Role::Agent, &["127.0.0.1".to_string()])?;
    let admin = issued("bench", protocol::Role::Admin, &[])?;
    let etcd = launcher::etcd::EtcdProcess::spawn(&launcher::etcd::EtcdOptions {
        data_dir: dir.join(format!("etcd-{agents}")),
        tls_dir: etcd_tls,
        host: "127.0.0.1".into(),
        log: dir.join(format!("etcd-{agents}.log")),
    })
    .context("etcd (Debian's etcd-server)")?;
    let endpoints = Endpoints::parse(&etcd.endpoint, false)?;
    let files = TlsFiles { dir: admin };
    let deadline = Instant::now() + Duration::from_secs(30);
    let first = loop {
        match Cluster::connect(&endpoints, Some(&files)).await {
            Ok(c) => break c,
            Err(e) if Instant::now() > deadline => return Err(e.into()),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    // Agents share a few connections, as many agents behind one etcd
    // proxy would; each keeps its own lease and record.
    let mut connections = vec![first];
    for _ in 1..16 {
        connections.push(Cluster::connect(&endpoints, Some(&files)).await?);
    }
    let writes = Arc::new(std::sync::Mutex::new(Vec::<f64>::new()));
    let failures = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let ticks_before = cpu_ticks(etcd.pid()).unwrap_or(0);
    let started = Instant::now();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..agents {
        let cluster = connections[i % connections.len()].clone();
        let writes = writes.clone();
        let failures = failures.clone();
        let mut stopped = stopped.clone();
        tasks.spawn(async move {
            let mut record = HostRecord {
                name: format!("sim-{i}"),
                agent_uri: format!(
                    "tls://10.{}.{}.{}:7000",
                    i / 65536,
                    (i / 256) % 256,
                    i % 256
                ),
                qemu_version: "7.2.0".into(),
                cpu_model: "cpu".into(),
                ram_free_mib: 65536,
                disk_free_mib: None,
                domains: (0..20).map(|d| format!("vm{i}-{d}")).collect(),
                link_mib_s: Some(1000),
                labels: Default::default(),
                updated_at_ms: 0,
            };
            // Spread the agents' clocks over the refresh period.
            tokio::time::sleep(Duration::from_millis((i as u64 * 3000) / agents as u64)).await;
            let Ok(registration) = cluster.register(&record, Duration::from_secs(10)).await else {
                failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return;
            };
            let mut tick = tokio::time::interval(Duration::from_secs(3));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stopped.changed() => break,
                }
                // The agent's refresh: its record rewritten (by the
                // registration's task, under its lease) and its cordon
                // read, which is what the agent waits for.
                record.updated_at_ms += 1;
                registration.update(&record);
                let at = Instant::now();
                let _ = cluster.cordon_of(&record.name).await;
                writes
                    .lock()
                    .expect("not poisoned")
                    .push(at.elapsed().as_secs_f64() * 1000.0);
            }
            let _ = registration.leave().await;
        });
    }
    // The controller: every host and every drain, twice a second.
    let mut reads = Vec::new();
    let controller = connections[0].clone();
    while started.elapsed() < Duration::from_secs(seconds) {
        let at = Instant::now();
        let _ = controller.hosts().await;
        let _ = controller.drains().await;
        reads.push(at.elapsed().as_secs_f64() * 1000.0);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let ticks = cpu_ticks(etcd.pid())
        .unwrap_or(0)
        .saturating_sub(ticks_before);
    let rss = rss_mib(etcd.pid());
    let _ = stop.send(true);
    while tasks.join_next().await.is_some() {}
    let mut writes = writes.lock().expect("not poisoned").clone();
    writes.sort_by(f64::total_cmp);
    reads.sort_by(f64::total_cmp);
    let clock = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    Ok(StoreResult {
        agents,
        seconds: elapsed,
        refreshes: writes.len(),
        agent_read_p50_ms: percentile(&writes, 50.0),
        agent_read_p99_ms: percentile(&writes, 99.0),
        read_p50_ms: percentile(&reads, 50.0),
        read_p99_ms: percentile(&reads, 99.0),
        etcd_cpu: ticks as f64 / clock / elapsed,
        etcd_rss_mib: rss,
        failures: failures.load(std::sync::atomic::Ordering::Relaxed),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rolling_upgrade_in_the_model_is_near_its_bound_and_ahead_of_the_fixed_policies() {
        let results = plan_fleet(40, 800, 10, 1000.0);
        let of = |name: &str| {
            results
                .iter()
                .find(|r| r.policy == name)
                .expect("every policy runs")
        };
        let ours = of("livemig");
        assert_eq!(ours.converged, ours.moves, "{ours:?}");
        assert!(
            ours.makespan_s <= 1.1 * ours.lower_bound_s,
            "{:.0} s against a bound of {:.0} s",
            ours.makespan_s,
            ours.lower_bound_s
        );
        for name in ["sequential", "fixed-2", "all"] {
            let theirs = of(name);
            assert!(
                ours.makespan_s <= theirs.makespan_s * 1.01,
                "{name}: {:.0} s, livemig {:.0} s",
                theirs.makespan_s,
                ours.makespan_s
            );
        }
    }
}
