//! Prometheus metrics (OpenMetrics text, `prometheus-client`), served at
//! `GET /metrics` on the agent's TLS port and on `--metrics-listen`.
//!
//! Counters and histograms cover the jobs this agent process finished;
//! gauges are read from the live domain table at scrape time.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use protocol::job::{JobRecord, JobStatus, Role};

use crate::jobs::ActiveJob;
use crate::table::DomainTable;

/// The media type of what [`Metrics::render`] returns.
pub(crate) const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

const DURATION_BUCKETS: [f64; 10] = [1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0];
const DOWNTIME_BUCKETS: [f64; 9] = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0];
const ROLES: [&str; 2] = ["source", "destination"];
const RESULTS: [&str; 3] = ["completed", "failed", "cancelled"];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabels {
    role: String,
    status: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RoleLabel {
    role: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DomainLabel {
    domain: String,
}

/// What the agent has done since it started.
#[derive(Debug)]
pub(crate) struct Metrics {
    migrations: Family<JobLabels, Counter>,
    duration: Histogram,
    downtime: Histogram,
    transferred: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let migrations = Family::<JobLabels, Counter>::default();
        // Every series exists from the start, at zero.
        for role in ROLES {
            for status in RESULTS {
                let _ = migrations.get_or_create(&JobLabels {
                    role: role.into(),
                    status: status.into(),
                });
            }
        }
        Metrics {
            migrations,
            duration: Histogram::new(DURATION_BUCKETS),
            downtime: Histogram::new(DOWNTIME_BUCKETS),
            transferred: Counter::default(),
        }
    }
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
        self.migrations
            .get_or_create(&JobLabels {
                role: role_name(record.role).into(),
                status: record.status.to_string(),
            })
            .inc();
        if record.role == Role::Source {
            self.transferred.inc_by(record.transferred_bytes);
            if record.status == JobStatus::Completed {
                self.duration.observe(record.total_time_ms as f64 / 1000.0);
                if let Some(d) = record.downtime_ms {
                    self.downtime.observe(d as f64 / 1000.0);
                }
            }
        }
    }

    /// The OpenMetrics text exposition: the counters, and gauges read from
    /// the domain table now.
    pub fn render(&self, table: &DomainTable) -> String {
        let mut registry = Registry::default();
        let up = Gauge::<i64>::default();
        up.set(1);
        registry.register("livemig_up", "The agent answers", up);
        registry.register(
            "livemig_migrations",
            "Migration jobs finished by this agent, by role and result",
            self.migrations.clone(),
        );
        registry.register(
            "livemig_migration_duration_seconds",
            "Total time of completed outgoing migrations",
            self.duration.clone(),
        );
        registry.register(
            "livemig_migration_downtime_seconds",
            "Switchover downtime of completed outgoing migrations",
            self.downtime.clone(),
        );
        registry.register(
            "livemig_migration_transferred_bytes",
            "Bytes sent by outgoing migrations",
            self.transferred.clone(),
        );

        let active = Family::<RoleLabel, Gauge>::default();
        for role in ROLES {
            let _ = active.get_or_create(&RoleLabel { role: role.into() });
        }
        let running = Gauge::<i64>::default();
        let throttle = Family::<DomainLabel, Gauge<f64, AtomicU64>>::default();
        {
            for d in table.all() {
                let name = &d.name;
                if d.vm.is_some() {
                    running.inc();
                }
                match &d.job {
                    Some(ActiveJob::Outgoing(job)) => {
                        active
                            .get_or_create(&RoleLabel {
                                role: "source".into(),
                            })
                            .inc();
                        let p = job.progress.borrow();
                        let qemu = p.stats.cpu_throttle_pct.unwrap_or(0) as f64;
                        throttle
                            .get_or_create(&DomainLabel {
                                domain: name.to_string(),
                            })
                            .set(p.throttle.percent().max(qemu));
                    }
                    Some(ActiveJob::Incoming(_)) => {
                        active
                            .get_or_create(&RoleLabel {
                                role: "destination".into(),
                            })
                            .inc();
                    }
                    None => {}
                }
            }
        }
        registry.register("livemig_active_jobs", "Migration jobs running now", active);
        registry.register(
            "livemig_domains_running",
            "Domains whose QEMU runs on this host",
            running,
        );
        registry.register(
            "livemig_vcpu_throttle_percent",
            "vCPU throttle of a domain being migrated away",
            throttle,
        );
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry)
            .expect("writing to a String cannot fail");
        out
    }
}
