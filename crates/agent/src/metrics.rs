//! Prometheus metrics, served at `GET /metrics` on the agent's TCP port.
//!
//! Counters and histograms cover the jobs this agent process finished;
//! gauges are read from the live domain table at scrape time.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

use protocol::job::{JobRecord, JobStatus, Role};

use crate::state::{ActiveJob, Agent};

const DURATION_BUCKETS: [f64; 10] = [1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0];
const DOWNTIME_BUCKETS: [f64; 9] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0];

#[derive(Debug, Default)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn observe(&mut self, buckets: &[f64], value: f64) {
        if self.counts.len() != buckets.len() {
            self.counts = vec![0; buckets.len()];
        }
        for (i, le) in buckets.iter().enumerate() {
            if value <= *le {
                self.counts[i] += 1;
            }
        }
        self.sum += value;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, buckets: &[f64]) {
        for (i, le) in buckets.iter().enumerate() {
            let n = self.counts.get(i).copied().unwrap_or(0);
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {n}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

#[derive(Debug, Default)]
struct Counters {
    /// (role, status) → jobs.
    jobs: BTreeMap<(String, String), u64>,
    duration: Histogram,
    downtime: Histogram,
    transferred_bytes: u64,
}

/// What the agent has done since it started.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    counters: Mutex<Counters>,
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Source => "source",
        Role::Destination => "destination",
    }
}

impl Metrics {
    /// Counts a finished job.
    pub fn job_finished(&self, record: &JobRecord) {
        let mut c = self.counters.lock().expect("metrics lock");
        *c.jobs
            .entry((role_name(record.role).into(), record.status.to_string()))
            .or_default() += 1;
        if record.role == Role::Source {
            c.transferred_bytes += record.transferred_bytes;
            if record.status == JobStatus::Completed {
                c.duration
                    .observe(&DURATION_BUCKETS, record.total_time_ms as f64 / 1000.0);
                if let Some(d) = record.downtime_ms {
                    c.downtime.observe(&DOWNTIME_BUCKETS, d as f64 / 1000.0);
                }
            }
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self, agent: &Agent) -> String {
        let mut out = String::new();
        let c = self.counters.lock().expect("metrics lock");
        out.push_str(
            "# HELP livemig_up The agent answers.\n# TYPE livemig_up gauge\nlivemig_up 1\n",
        );
        out.push_str(
            "# HELP livemig_migrations_total Migration jobs finished by this agent, by role and result.\n\
             # TYPE livemig_migrations_total counter\n",
        );
        for role in ["source", "destination"] {
            for status in ["completed", "failed", "cancelled"] {
                let n = c
                    .jobs
                    .get(&(role.to_string(), status.to_string()))
                    .copied()
                    .unwrap_or(0);
                let _ = writeln!(
                    out,
                    "livemig_migrations_total{{role=\"{role}\",status=\"{status}\"}} {n}"
                );
            }
        }
        out.push_str(
            "# HELP livemig_migration_duration_seconds Total time of completed outgoing migrations.\n\
             # TYPE livemig_migration_duration_seconds histogram\n",
        );
        c.duration.render(
            &mut out,
            "livemig_migration_duration_seconds",
            &DURATION_BUCKETS,
        );
        out.push_str(
            "# HELP livemig_migration_downtime_seconds Switchover downtime of completed outgoing migrations.\n\
             # TYPE livemig_migration_downtime_seconds histogram\n",
        );
        c.downtime.render(
            &mut out,
            "livemig_migration_downtime_seconds",
            &DOWNTIME_BUCKETS,
        );
        let _ = write!(
            out,
            "# HELP livemig_migration_transferred_bytes_total Bytes sent by outgoing migrations.\n\
             # TYPE livemig_migration_transferred_bytes_total counter\n\
             livemig_migration_transferred_bytes_total {}\n",
            c.transferred_bytes
        );
        drop(c);

        let (mut active_source, mut active_destination, mut running) = (0, 0, 0);
        let mut throttles = Vec::new();
        {
            let domains = agent.domains.lock().expect("domains lock");
            for (name, d) in domains.iter() {
                if d.vm.is_some() {
                    running += 1;
                }
                match &d.job {
                    Some(ActiveJob::Outgoing(job)) => {
                        active_source += 1;
                        let p = job.progress.borrow();
                        let qemu = p.stats.cpu_throttle_pct.unwrap_or(0) as f64;
                        throttles.push((name.to_string(), p.throttle.percent().max(qemu)));
                    }
                    Some(ActiveJob::Incoming(_)) => active_destination += 1,
                    None => {}
                }
            }
        }
        let _ = write!(
            out,
            "# HELP livemig_active_jobs Migration jobs running now.\n\
             # TYPE livemig_active_jobs gauge\n\
             livemig_active_jobs{{role=\"source\"}} {active_source}\n\
             livemig_active_jobs{{role=\"destination\"}} {active_destination}\n\
             # HELP livemig_domains_running Domains whose QEMU runs on this host.\n\
             # TYPE livemig_domains_running gauge\n\
             livemig_domains_running {running}\n\
             # HELP livemig_vcpu_throttle_percent vCPU throttle of a domain being migrated away.\n\
             # TYPE livemig_vcpu_throttle_percent gauge\n"
        );
        for (domain, pct) in throttles {
            let _ = writeln!(
                out,
                "livemig_vcpu_throttle_percent{{domain=\"{domain}\"}} {pct}"
            );
        }
        out
    }
}
