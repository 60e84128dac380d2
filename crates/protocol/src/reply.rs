//! Successful answers.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::domain::{DomainInfo, DomainSummary};
use crate::estimate::EstimateReport;
use crate::host::{AgentInfo, HostCapabilities};
use crate::job::{JobInfo, JobRecord, JobSummary};

/// Successful answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Reply {
    /// Done; nothing to say.
    Done,
    /// Answer to `hello`.
    Hello(AgentInfo),
    /// Answer to `list`.
    Domains {
        /// One per domain.
        domains: Vec<DomainSummary>,
    },
    /// Answer to `dump-def`.
    Definition {
        /// The definition.
        definition: crate::domain::DefinitionDoc,
    },
    /// Answer to `dom-info`.
    DomainInfo(Box<DomainInfo>),
    /// Answer to `dom-capabilities` and `peer-probe`.
    Capabilities(Box<HostCapabilities>),
    /// Answer to `migrate`: the job runs.
    MigrationStarted {
        /// Its id, for `job`.
        job_id: String,
    },
    /// Answer to `dom-job-info`.
    JobInfo {
        /// The job, if there is one.
        job: Option<Box<JobInfo>>,
    },
    /// Answer to `job`: live info while it runs, else its record.
    Job {
        /// The job while it runs.
        active: Option<Box<JobInfo>>,
        /// The job's record once it has ended.
        record: Option<Box<JobRecord>>,
    },
    /// Answer to `qemu-monitor-command`: QEMU's `return`.
    Monitor {
        /// What QEMU returned.
        result: Value,
    },
    /// Answer to `estimate` and `migrate --dry-run`.
    Estimate(Box<EstimateReport>),
    /// Answer to `dom-dirty-rate`.
    DirtyRate(crate::domain::DirtyRate),
    /// Answer to `migrate-compcache`: the XBZRLE cache, bytes.
    Compcache {
        /// Its size.
        bytes: u64,
    },
    /// Answer to `jobs`.
    Jobs {
        /// Newest first.
        jobs: Vec<JobSummary>,
    },
    /// Answer to `peer-prepare` and `peer-recover`.
    Prepared {
        /// Where the destination QEMU listens (empty for an offline
        /// migration).
        uri: String,
        /// The port of the destination QEMU's NBD server, on the data
        /// URI's host, when disks are copied.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        nbd_port: Option<u16>,
        /// The NBD server's address when it is not the data URI's host
        /// (`--disks-uri`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        nbd_host: Option<String>,
    },
    /// One of the answers to `watch`.
    Watch(Box<WatchEvent>),
    /// Answer to `peer-finish`: the guest runs here.
    Finished {
        /// Full-speed guest time, ms, the guest lost here waiting for
        /// post-copy's pages, when it ran in post-copy and its vCPUs could
        /// be read.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        postcopy_work_lost_ms: Option<u64>,
    },
    /// Answer to `peer-abort`: whether the guest already runs here (the
    /// job had finished), in which case the source must not resume it.
    Aborted {
        /// The guest runs on the destination.
        guest_running_here: bool,
    },
}

/// What `watch` reports of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum WatchEvent {
    /// A job as it runs: its phase, progress and actions (sent every half
    /// second while it runs).
    Progress {
        /// The job.
        job: Box<JobInfo>,
    },
    /// A job has ended: its record.
    Ended {
        /// The record.
        record: Box<JobRecord>,
    },
}
