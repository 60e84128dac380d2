//! Envelopes, requests, replies and errors.

use domain::{DomainDefinition, DomainName};
use migration::{JobInfo, JobRecord, MigrateFlags};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::types::{
    AgentInfo, DomainInfo, DomainSummary, EstimateParams, EstimateReport, HostCapabilities,
    JobSummary, PrepareRequest,
};

/// The protocol version in every envelope. A newer minor revision only adds
/// `#[serde(default)]` fields; a different version is refused.
pub const PROTOCOL_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestEnvelope {
    pub version: u32,
    pub id: u64,
    pub request: Request,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResponseEnvelope {
    pub version: u32,
    pub id: u64,
    #[serde(flatten)]
    pub result: ResponseResult,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResponseResult {
    Ok(Reply),
    Error(ApiError),
}

/// Everything an agent can be asked. `peer-*` requests come from the other
/// agent of a migration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    Hello,
    Define {
        definition: DomainDefinition,
    },
    Undefine {
        domain: DomainName,
    },
    Start {
        domain: DomainName,
        #[serde(default)]
        paused: bool,
    },
    Destroy {
        domain: DomainName,
    },
    Suspend {
        domain: DomainName,
    },
    Resume {
        domain: DomainName,
    },
    List {
        #[serde(default)]
        all: bool,
    },
    DomInfo {
        domain: DomainName,
    },
    DomCapabilities,
    Migrate {
        domain: DomainName,
        destination: String,
        flags: Box<MigrateFlags>,
    },
    DomJobInfo {
        domain: DomainName,
        #[serde(default)]
        completed: bool,
    },
    DomJobAbort {
        domain: DomainName,
    },
    MigrateSetSpeed {
        domain: DomainName,
        bandwidth_mib_s: u64,
    },
    MigrateSetMaxDowntime {
        domain: DomainName,
        downtime_ms: u64,
    },
    MigratePostcopy {
        domain: DomainName,
    },
    /// Finished jobs, newest first.
    Jobs {
        #[serde(default)]
        domain: Option<DomainName>,
        #[serde(default = "default_job_limit")]
        limit: u32,
    },
    /// Measure a running domain's dirty rate and predict its migration.
    Estimate {
        domain: DomainName,
        #[serde(default)]
        params: EstimateParams,
    },
    /// A job run by this agent: live info while it runs, then its record.
    Job {
        id: String,
    },
    QemuMonitorCommand {
        domain: DomainName,
        command: Value,
    },
    /// Peer: check these flags against this host's QEMU binary.
    PeerProbe {
        flags: Box<MigrateFlags>,
    },
    /// Peer: start the destination QEMU and listen for the data.
    PeerPrepare(Box<PrepareRequest>),
    /// Peer: the source finished sending; resume the guest here.
    PeerFinish {
        job_id: String,
    },
    /// Peer: make the destination QEMU listen again for a paused post-copy
    /// migration; answered with `prepared` and the new data URI.
    PeerRecover {
        job_id: String,
    },
    /// Peer: the migration failed; tear down the destination side.
    PeerAbort {
        job_id: String,
        reason: String,
    },
}

fn default_job_limit() -> u32 {
    20
}

impl Request {
    /// The operation name, for logs.
    pub fn op(&self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.get("op").and_then(Value::as_str).map(str::to_string))
            .unwrap_or_default()
    }
}

/// Successful answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Reply {
    Done,
    Hello(AgentInfo),
    Domains {
        domains: Vec<DomainSummary>,
    },
    DomainInfo(Box<DomainInfo>),
    Capabilities(Box<HostCapabilities>),
    MigrationStarted {
        job_id: String,
    },
    JobInfo {
        job: Option<Box<JobInfo>>,
    },
    Job {
        active: Option<Box<JobInfo>>,
        record: Option<Box<JobRecord>>,
    },
    Monitor {
        result: Value,
    },
    Estimate(Box<EstimateReport>),
    Jobs {
        jobs: Vec<JobSummary>,
    },
    Prepared {
        uri: String,
    },
    Finished,
    /// Answer to `peer-abort`: whether the guest already runs here (the
    /// job had finished), in which case the source must not resume it.
    Aborted {
        guest_running_here: bool,
    },
}

/// Error categories, stable for scripts (and CLI exit codes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    /// The request is malformed or names a bad value.
    InvalidArgument,
    /// The definition does not validate.
    InvalidDefinition,
    NoDomain,
    NoJob,
    /// The domain is not in a state that allows it (e.g. already running).
    OperationInvalid,
    /// The QEMU binary lacks a feature.
    Unsupported,
    /// The peer agent cannot be reached.
    PeerUnreachable,
    /// The peer agent refused or failed.
    PeerFailed,
    /// QEMU refused or failed.
    Qemu,
    /// The migration job failed or was cancelled.
    MigrationFailed,
    /// Persisting state failed.
    Storage,
    /// The other side speaks another protocol version.
    Protocol,
    Internal,
    #[serde(other)]
    Unknown,
}

/// An error that crosses between processes keeping its meaning.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_have_a_stable_wire_form() {
        let env = RequestEnvelope {
            version: PROTOCOL_VERSION,
            id: 7,
            request: Request::DomJobAbort {
                domain: "web1".parse().unwrap(),
            },
        };
        let json = serde_json::to_value(&env).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"version": 1, "id": 7, "request": {"op": "dom-job-abort", "domain": "web1"}})
        );
        let back: RequestEnvelope = serde_json::from_value(json).unwrap();
        assert_eq!(back, env);
    }

    #[test]
    fn errors_round_trip_and_unknown_codes_decode() {
        let env = ResponseEnvelope {
            version: 1,
            id: 1,
            result: ResponseResult::Error(ApiError::new(ErrorCode::NoDomain, "no domain 'x'")),
        };
        let text = serde_json::to_string(&env).unwrap();
        assert_eq!(
            serde_json::from_str::<ResponseEnvelope>(&text).unwrap(),
            env
        );
        let newer: ApiError =
            serde_json::from_str(r#"{"code":"from-the-future","message":"m"}"#).unwrap();
        assert_eq!(newer.code, ErrorCode::Unknown);
    }

    #[test]
    fn an_invalid_domain_name_is_refused_when_decoding() {
        let err =
            serde_json::from_str::<Request>(r#"{"op":"dom-info","domain":"../etc"}"#).unwrap_err();
        assert!(err.to_string().contains("invalid domain name"), "{err}");
    }
}
