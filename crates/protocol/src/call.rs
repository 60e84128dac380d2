//! Typed calls: each request paired with the reply it gets, as
//! `qmp::Command` pairs a QMP command with its return type, so that
//! [`crate::Client::call`] returns what was asked for and a reply of the
//! wrong kind is an error in one place rather than an arm at every caller.
//!
//! A call is built from its fields (`DomInfo { domain }`) and turned into
//! the wire's [`Request`]; its [`Call::Output`] is taken out of the
//! [`Reply`].

use serde_json::Value;
use types::DomainName;

use crate::domain::{DefinitionDoc, DomainInfo, DomainSummary};
use crate::estimate::{EstimateParams, EstimateReport};
use crate::host::{AgentInfo, HostCapabilities};
use crate::job::{JobInfo, JobRecord, JobSummary};
use crate::migrate::{MigrateOptions, PrepareRequest, ProbeRequest};
use crate::{Reply, Request};

/// A request that knows its reply.
pub trait Call {
    /// What a successful answer holds.
    type Output;
    /// The request on the wire.
    fn request(self) -> Request;
    /// The answer's content, or the reply back if it is not this
    /// request's kind.
    ///
    /// # Errors
    /// The reply, when it is another request's.
    fn output(reply: Reply) -> Result<Self::Output, Reply>;
}

/// Where a job stands: live while it runs, its record once it ended.
#[derive(Debug, Clone, PartialEq)]
pub enum JobState {
    /// It runs.
    Active(Box<JobInfo>),
    /// It ended.
    Ended(Box<JobRecord>),
}

/// Declares a call struct and its `Call` impl: the fields, the request they
/// make, and the reply pattern with what it yields.
macro_rules! call {
    (
        $(#[$doc:meta])*
        $name:ident { $($field:ident : $ty:ty),* $(,)? } => $request:expr ;
        $output:ty , $pattern:pat => $yield:expr
    ) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq)]
        pub struct $name {
            $(
                #[allow(missing_docs)]
                pub $field: $ty,
            )*
        }

        impl Call for $name {
            type Output = $output;

            fn request(self) -> Request {
                let $name { $($field),* } = self;
                $request
            }

            fn output(reply: Reply) -> Result<$output, Reply> {
                match reply {
                    $pattern => Ok($yield),
                    other => Err(other),
                }
            }
        }
    };
}

call!(
    /// `hello`: who the agent is.
    Hello {} => Request::Hello;
    AgentInfo, Reply::Hello(info) => info
);
call!(
    /// `define`.
    Define { definition: DefinitionDoc } => Request::Define { definition };
    (), Reply::Done => ()
);
call!(
    /// `undefine`.
    Undefine { domain: DomainName } => Request::Undefine { domain };
    (), Reply::Done => ()
);
call!(
    /// `start`, paused if asked.
    Start { domain: DomainName, paused: bool } => Request::Start { domain, paused };
    (), Reply::Done => ()
);
call!(
    /// `destroy`.
    Destroy { domain: DomainName } => Request::Destroy { domain };
    (), Reply::Done => ()
);
call!(
    /// `suspend`.
    Suspend { domain: DomainName } => Request::Suspend { domain };
    (), Reply::Done => ()
);
call!(
    /// `resume`.
    Resume { domain: DomainName } => Request::Resume { domain };
    (), Reply::Done => ()
);
call!(
    /// `list` (`all`: shut-off domains too).
    List { all: bool } => Request::List { all };
    Vec<DomainSummary>, Reply::Domains { domains } => domains
);
call!(
    /// `dominfo`.
    DomInfo { domain: DomainName } => Request::DomInfo { domain };
    DomainInfo, Reply::DomainInfo(info) => *info
);
call!(
    /// `dumpdef`.
    DumpDef { domain: DomainName } => Request::DumpDef { domain };
    DefinitionDoc, Reply::Definition { definition } => definition
);
call!(
    /// `domcapabilities`.
    DomCapabilities {} => Request::DomCapabilities;
    HostCapabilities, Reply::Capabilities(caps) => *caps
);
/// What `migrate` did.
#[derive(Debug, Clone, PartialEq)]
pub enum Migration {
    /// The job runs, with this id.
    Started(String),
    /// `--dry-run`: every check passed, nothing started; the estimate.
    DryRun(Box<EstimateReport>),
}

/// `migrate`.
#[derive(Debug, Clone, PartialEq)]
pub struct Migrate {
    /// The domain.
    pub domain: DomainName,
    /// The destination agent's URI.
    pub destination: String,
    /// The options.
    pub flags: MigrateOptions,
}

impl Call for Migrate {
    type Output = Migration;

    fn request(self) -> Request {
        Request::Migrate {
            domain: self.domain,
            destination: self.destination,
            flags: Box::new(self.flags),
        }
    }

    fn output(reply: Reply) -> Result<Migration, Reply> {
        match reply {
            Reply::MigrationStarted { job_id } => Ok(Migration::Started(job_id)),
            Reply::Estimate(report) => Ok(Migration::DryRun(report)),
            other => Err(other),
        }
    }
}
call!(
    /// `domjobinfo`: the running job (or, `completed`, the last one).
    DomJobInfo { domain: DomainName, completed: bool } => Request::DomJobInfo { domain, completed };
    Option<Box<JobInfo>>, Reply::JobInfo { job } => job
);
call!(
    /// `domjobabort`.
    DomJobAbort { domain: DomainName } => Request::DomJobAbort { domain };
    (), Reply::Done => ()
);
call!(
    /// `migrate-setspeed`.
    MigrateSetSpeed { domain: DomainName, bandwidth_mib_s: u64 } =>
        Request::MigrateSetSpeed { domain, bandwidth_mib_s };
    (), Reply::Done => ()
);
call!(
    /// `migrate-setmaxdowntime`.
    MigrateSetMaxDowntime { domain: DomainName, downtime_ms: u64 } =>
        Request::MigrateSetMaxDowntime { domain, downtime_ms };
    (), Reply::Done => ()
);
call!(
    /// `migrate-postcopy`.
    MigratePostcopy { domain: DomainName } => Request::MigratePostcopy { domain };
    (), Reply::Done => ()
);
call!(
    /// `jobs`.
    Jobs { domain: Option<DomainName>, limit: u32 } => Request::Jobs { domain, limit };
    Vec<JobSummary>, Reply::Jobs { jobs } => jobs
);
call!(
    /// `estimate`.
    Estimate { domain: DomainName, params: EstimateParams } => Request::Estimate { domain, params };
    EstimateReport, Reply::Estimate(report) => *report
);
/// `job`: where it stands.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    /// The job's id.
    pub id: String,
}

impl Call for Job {
    type Output = JobState;

    fn request(self) -> Request {
        Request::Job { id: self.id }
    }

    fn output(reply: Reply) -> Result<JobState, Reply> {
        match reply {
            Reply::Job {
                active: Some(info), ..
            } => Ok(JobState::Active(info)),
            Reply::Job {
                active: None,
                record: Some(record),
            } => Ok(JobState::Ended(record)),
            other => Err(other),
        }
    }
}
call!(
    /// `qemu-monitor-command`: QMP's answer.
    QemuMonitorCommand { domain: DomainName, command: Value } =>
        Request::QemuMonitorCommand { domain, command };
    Value, Reply::Monitor { result } => result
);
call!(
    /// `domdirtyrate-calc`.
    DomDirtyRateCalc { domain: DomainName, seconds: u32, mode: Option<String> } =>
        Request::DomDirtyRateCalc { domain, seconds, mode };
    (), Reply::Done => ()
);
call!(
    /// `domstats --dirtyrate`.
    DomDirtyRate { domain: DomainName } => Request::DomDirtyRate { domain };
    crate::domain::DirtyRate, Reply::DirtyRate(rate) => rate
);
call!(
    /// `migrate-compcache`: the XBZRLE cache's size, after setting it.
    MigrateCompcache { domain: DomainName, bytes: Option<u64> } =>
        Request::MigrateCompcache { domain, bytes };
    u64, Reply::Compcache { bytes } => bytes
);
call!(
    /// `peer-probe`: the destination's capabilities.
    PeerProbe { probe: ProbeRequest } => Request::PeerProbe(Box::new(probe));
    HostCapabilities, Reply::Capabilities(caps) => *caps
);
call!(
    /// `peer-prepare`: where the data goes, and the NBD port for disks.
    PeerPrepare { prepare: PrepareRequest } => Request::PeerPrepare(Box::new(prepare));
    Prepared, Reply::Prepared { uri, nbd_port, nbd_host } => Prepared { uri, nbd_port, nbd_host }
);
call!(
    /// `peer-finish`.
    PeerFinish { job_id: String } => Request::PeerFinish { job_id };
    Option<u64>, Reply::Finished { postcopy_work_lost_ms } => postcopy_work_lost_ms
);
call!(
    /// `peer-recover`: where the data goes again.
    PeerRecover { job_id: String } => Request::PeerRecover { job_id };
    Prepared, Reply::Prepared { uri, nbd_port, nbd_host } => Prepared { uri, nbd_port, nbd_host }
);
call!(
    /// `peer-abort`: whether the guest runs on the destination after all.
    PeerAbort { job_id: String, reason: String } => Request::PeerAbort { job_id, reason };
    bool, Reply::Aborted { guest_running_here } => guest_running_here
);

/// A prepared destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prepared {
    /// Where the migration stream goes.
    pub uri: String,
    /// The NBD server for copied disks.
    pub nbd_port: Option<u16>,
    /// Its address, when not the stream's (`--disks-uri`).
    pub nbd_host: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_makes_its_request_and_takes_only_its_reply() {
        let call = DomInfo {
            domain: "vm".parse().unwrap(),
        };
        assert_eq!(call.clone().request().op(), "dom-info");
        assert_eq!(
            List::output(Reply::Domains { domains: vec![] }),
            Ok(Vec::new())
        );
        assert_eq!(DomInfo::output(Reply::Done), Err(Reply::Done));
        assert_eq!(
            PeerAbort::output(Reply::Aborted {
                guest_running_here: true
            }),
            Ok(true)
        );
    }

    #[test]
    fn a_job_is_active_or_ended_and_never_neither() {
        let empty = Reply::Job {
            active: None,
            record: None,
        };
        assert_eq!(Job::output(empty.clone()), Err(empty));
    }
}
