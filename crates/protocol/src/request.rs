//! Everything an agent can be asked, and who may ask it.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use types::DomainName;

use crate::access::{Access, Role};
use crate::domain::DefinitionDoc;
use crate::estimate::EstimateParams;
use crate::migrate::{MigrateOptions, PrepareRequest, ProbeRequest};

/// Everything an agent can be asked. `peer-*` requests come from the other
/// agent of a migration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// Who are you? Answered with [`crate::host::AgentInfo`].
    Hello,
    /// Define (or update) a persistent domain.
    Define {
        /// The definition, validated by the agent.
        definition: DefinitionDoc,
    },
    /// Remove a domain's persistent definition.
    Undefine {
        /// The domain.
        domain: DomainName,
    },
    /// Start a defined domain.
    Start {
        /// The domain.
        domain: DomainName,
        /// Start with the vCPUs paused.
        #[serde(default)]
        paused: bool,
    },
    /// Kill a domain's QEMU.
    Destroy {
        /// The domain.
        domain: DomainName,
    },
    /// Pause a running domain.
    Suspend {
        /// The domain.
        domain: DomainName,
    },
    /// Resume a paused domain.
    Resume {
        /// The domain.
        domain: DomainName,
    },
    /// The domains, running ones only unless `all`.
    List {
        /// Include domains that are not running.
        #[serde(default)]
        all: bool,
    },
    /// One domain's details.
    DomInfo {
        /// The domain.
        domain: DomainName,
    },
    /// A domain's definition, as the agent holds it (virsh's `dumpxml`).
    DumpDef {
        /// The domain.
        domain: DomainName,
    },
    /// What this host's QEMU binary supports.
    DomCapabilities,
    /// Migrate a domain to the agent at `destination`.
    Migrate {
        /// The domain.
        domain: DomainName,
        /// The destination agent's URI.
        destination: String,
        /// How.
        flags: Box<MigrateOptions>,
    },
    /// A domain's active job (or, with `completed`, its last one).
    DomJobInfo {
        /// The domain.
        domain: DomainName,
        /// The last finished job instead of the active one.
        #[serde(default)]
        completed: bool,
    },
    /// Cancel a domain's outgoing migration; the guest stays here.
    DomJobAbort {
        /// The domain.
        domain: DomainName,
    },
    /// Set the migration bandwidth cap (of the running job too).
    MigrateSetSpeed {
        /// The domain.
        domain: DomainName,
        /// MiB/s.
        bandwidth_mib_s: u64,
    },
    /// Set the downtime limit (of the running job too).
    MigrateSetMaxDowntime {
        /// The domain.
        domain: DomainName,
        /// Milliseconds.
        downtime_ms: u64,
    },
    /// Switch a running migration started with post-copy enabled to
    /// post-copy.
    MigratePostcopy {
        /// The domain.
        domain: DomainName,
    },
    /// Every job on this agent as it goes (or only `domain`'s): a stream
    /// of [`crate::Reply::Watch`] answers under the request's id, until the
    /// client sends anything else or hangs up.
    Watch {
        /// Only this domain's jobs.
        #[serde(default)]
        domain: Option<DomainName>,
    },
    /// Finished jobs, newest first.
    Jobs {
        /// Only this domain's.
        #[serde(default)]
        domain: Option<DomainName>,
        /// At most this many.
        #[serde(default = "default_job_limit")]
        limit: u32,
    },
    /// Measure a running domain's dirty rate and predict its migration.
    Estimate {
        /// The domain.
        domain: DomainName,
        /// What to predict for.
        #[serde(default)]
        params: EstimateParams,
    },
    /// A job run by this agent: live info while it runs, then its record.
    Job {
        /// The job id.
        id: String,
    },
    /// Start measuring a running domain's dirty rate for `seconds`
    /// (`domdirtyrate-calc`).
    DomDirtyRateCalc {
        /// The domain.
        domain: DomainName,
        /// The window, 1 to 60 seconds.
        seconds: u32,
        /// `page-sampling` (the default), `dirty-bitmap` or `dirty-ring`.
        #[serde(default)]
        mode: Option<String>,
    },
    /// The last dirty-rate measurement (`domstats --dirtyrate`).
    DomDirtyRate {
        /// The domain.
        domain: DomainName,
    },
    /// The XBZRLE cache size of a running domain's QEMU, after setting it
    /// to `bytes` if given (`migrate-compcache`).
    MigrateCompcache {
        /// The domain.
        domain: DomainName,
        /// The new size, bytes.
        #[serde(default)]
        bytes: Option<u64>,
    },
    /// A raw QMP command for a domain's QEMU.
    QemuMonitorCommand {
        /// The domain.
        domain: DomainName,
        /// `{"execute": ..., "arguments": ...}`.
        command: Value,
    },
    /// Peer: can this host's QEMU take this migration?
    PeerProbe(Box<ProbeRequest>),
    /// Peer: start the destination QEMU and listen for the data.
    PeerPrepare(Box<PrepareRequest>),
    /// Peer: the source finished sending; resume the guest here.
    PeerFinish {
        /// The job.
        job_id: String,
    },
    /// Peer: make the destination QEMU listen again for a paused post-copy
    /// migration; answered with `prepared` and the new data URI.
    PeerRecover {
        /// The job.
        job_id: String,
    },
    /// Peer: the migration failed; tear down the destination side.
    PeerAbort {
        /// The job.
        job_id: String,
        /// Why, for the destination's log.
        reason: String,
    },
}

fn default_job_limit() -> u32 {
    20
}

impl Request {
    /// The operation's wire name, for logs and errors.
    pub fn op(&self) -> &'static str {
        match self {
            Request::Hello => "hello",
            Request::Define { .. } => "define",
            Request::Undefine { .. } => "undefine",
            Request::Start { .. } => "start",
            Request::Destroy { .. } => "destroy",
            Request::Suspend { .. } => "suspend",
            Request::Resume { .. } => "resume",
            Request::List { .. } => "list",
            Request::DomInfo { .. } => "dom-info",
            Request::DomCapabilities => "dom-capabilities",
            Request::DumpDef { .. } => "dump-def",
            Request::Migrate { .. } => "migrate",
            Request::DomJobInfo { .. } => "dom-job-info",
            Request::DomJobAbort { .. } => "dom-job-abort",
            Request::MigrateSetSpeed { .. } => "migrate-set-speed",
            Request::MigrateSetMaxDowntime { .. } => "migrate-set-max-downtime",
            Request::MigratePostcopy { .. } => "migrate-postcopy",
            Request::Jobs { .. } => "jobs",
            Request::Watch { .. } => "watch",
            Request::Estimate { .. } => "estimate",
            Request::Job { .. } => "job",
            Request::QemuMonitorCommand { .. } => "qemu-monitor-command",
            Request::DomDirtyRateCalc { .. } => "dom-dirty-rate-calc",
            Request::DomDirtyRate { .. } => "dom-dirty-rate",
            Request::MigrateCompcache { .. } => "migrate-compcache",
            Request::PeerProbe(_) => "peer-probe",
            Request::PeerPrepare(_) => "peer-prepare",
            Request::PeerFinish { .. } => "peer-finish",
            Request::PeerRecover { .. } => "peer-recover",
            Request::PeerAbort { .. } => "peer-abort",
        }
    }

    /// What the request does. `estimate` counts as control: it makes QEMU
    /// measure the guest, which costs the guest time.
    pub fn access(&self) -> Access {
        match self {
            Request::Hello
            | Request::List { .. }
            | Request::DomInfo { .. }
            | Request::DomCapabilities
            | Request::DomJobInfo { .. }
            | Request::Jobs { .. }
            | Request::Watch { .. }
            | Request::DomDirtyRate { .. }
            | Request::MigrateCompcache { bytes: None, .. }
            | Request::Job { .. } => Access::Read,
            Request::Define { .. }
            | Request::Undefine { .. }
            | Request::Start { .. }
            | Request::Destroy { .. }
            | Request::Suspend { .. }
            | Request::Resume { .. }
            | Request::Migrate { .. }
            | Request::DomJobAbort { .. }
            | Request::MigrateSetSpeed { .. }
            | Request::MigrateSetMaxDowntime { .. }
            | Request::MigratePostcopy { .. }
            | Request::Estimate { .. }
            | Request::DomDirtyRateCalc { .. }
            | Request::MigrateCompcache { bytes: Some(_), .. }
            | Request::QemuMonitorCommand { .. } => Access::Control,
            // It changes nothing, but names every host file the domain
            // uses: administrators only, as `dom-info`'s paths are.
            Request::DumpDef { .. } => Access::Control,
            Request::PeerProbe(_)
            | Request::PeerPrepare(_)
            | Request::PeerFinish { .. }
            | Request::PeerRecover { .. }
            | Request::PeerAbort { .. } => Access::Peer,
        }
    }
}

impl Role {
    /// Whether this role may send `request`.
    pub fn allows(self, request: &Request) -> bool {
        match self {
            Role::Admin => true,
            Role::Monitor => request.access() == Access::Read,
            Role::Agent => {
                request.access() == Access::Peer
                    || matches!(request, Request::Hello | Request::Job { .. })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_invalid_domain_name_is_refused_when_decoding() {
        let err =
            serde_json::from_str::<Request>(r#"{"op":"dom-info","domain":"../etc"}"#).unwrap_err();
        assert!(err.to_string().contains("invalid domain name"), "{err}");
    }

    #[test]
    fn op_is_the_wire_tag() {
        let requests = [
            Request::Hello,
            Request::DomCapabilities,
            Request::List { all: true },
            Request::MigrateSetMaxDowntime {
                domain: "a".parse().unwrap(),
                downtime_ms: 1,
            },
            Request::PeerAbort {
                job_id: "j".into(),
                reason: "r".into(),
            },
            Request::PeerProbe(Box::default()),
        ];
        for request in requests {
            let wire = serde_json::to_value(&request).unwrap();
            assert_eq!(wire["op"], request.op(), "{wire}");
        }
    }

    #[test]
    fn peer_requests_and_only_they_are_peer_access() {
        assert_eq!(
            Request::PeerFinish { job_id: "j".into() }.access(),
            Access::Peer
        );
        assert_eq!(Request::List { all: false }.access(), Access::Read);
        assert_eq!(
            Request::Destroy {
                domain: "a".parse().unwrap()
            }
            .access(),
            Access::Control
        );
    }

    fn domain() -> types::DomainName {
        "vm".parse().unwrap()
    }

    #[test]
    fn a_monitor_reads_and_changes_nothing() {
        assert!(Role::Monitor.allows(&Request::List { all: true }));
        assert!(Role::Monitor.allows(&Request::DomJobInfo {
            domain: domain(),
            completed: false
        }));
        assert!(!Role::Monitor.allows(&Request::Destroy { domain: domain() }));
        assert!(!Role::Monitor.allows(&Request::PeerFinish { job_id: "j".into() }));
    }

    #[test]
    fn an_agent_does_only_the_peer_half() {
        assert!(Role::Agent.allows(&Request::PeerAbort {
            job_id: "j".into(),
            reason: "r".into()
        }));
        assert!(Role::Agent.allows(&Request::Hello));
        assert!(!Role::Agent.allows(&Request::Define {
            definition: Default::default()
        }));
        assert!(!Role::Agent.allows(&Request::List { all: true }));
    }

    #[test]
    fn an_admin_does_everything() {
        assert!(Role::Admin.allows(&Request::QemuMonitorCommand {
            domain: domain(),
            command: serde_json::json!({})
        }));
    }
}
