//! The domain table: every domain this agent knows, what state it is in,
//! and the only place that locks it.
//!
//! A domain is defined or transient, and at any time in one
//! [`Occupancy`]: shut off, running, sending its guest away, or receiving
//! one. The rest of the agent moves it between them through named
//! transitions (define, attach a VM, begin an outgoing job, reserve an
//! incoming one, land it, end a job, ...), each one a check and a change
//! under one lock that is never held across an `.await`, and reads it
//! through snapshots ([`DomainView`]). Operations that must not interleave
//! on one domain (start, destroy, define, undefine, Begin, an offline
//! Prepare) also take the domain's async operation lock
//! ([`DomainTable::op_lock`]).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use domain::{DomainDefinition, DomainName};
use protocol::domain::Tunables;
use protocol::job::JobRecord;
use protocol::ApiError;

use crate::errors;
use crate::jobs::{ActiveJob, IncomingJob, OutgoingJob};
use crate::running::RunningVm;

/// The async lock that serialises operations on one domain.
pub(crate) type OpLock = Arc<tokio::sync::Mutex<()>>;

/// Where a domain is, on this host.
#[derive(Debug, Clone)]
pub(crate) enum Occupancy {
    /// Defined here, not running.
    ShutOff,
    /// Its VM runs here.
    Running(Arc<RunningVm>),
    /// Its guest is being sent away; the VM is gone once the destination
    /// took over (Confirm) or for an offline migration.
    Outgoing {
        vm: Option<Arc<RunningVm>>,
        job: Arc<OutgoingJob>,
    },
    /// A guest is arriving (its VM, once Prepare started one, is the job's).
    Incoming(Arc<IncomingJob>),
}

/// One domain.
#[derive(Debug)]
pub(crate) struct Domain {
    definition: DomainDefinition,
    /// Has a definition on disk; transient domains vanish when they stop.
    persistent: bool,
    occupancy: Occupancy,
    last_job: Option<JobRecord>,
    tunables: Tunables,
    op_lock: OpLock,
    /// The peer (certificate name) its guest was last handed to, which
    /// may hand it back; none once it runs here again.
    bound_to: Option<String>,
}

impl Domain {
    fn new(definition: DomainDefinition, persistent: bool) -> Self {
        Domain {
            definition,
            persistent,
            occupancy: Occupancy::ShutOff,
            bound_to: None,
            last_job: None,
            tunables: Tunables::default(),
            op_lock: OpLock::default(),
        }
    }

    fn vm(&self) -> Option<&Arc<RunningVm>> {
        match &self.occupancy {
            Occupancy::ShutOff => None,
            Occupancy::Running(vm) => Some(vm),
            Occupancy::Outgoing { vm, .. } => vm.as_ref(),
            Occupancy::Incoming(job) => job.vm.as_ref(),
        }
    }

    fn job(&self) -> Option<ActiveJob> {
        match &self.occupancy {
            Occupancy::Outgoing { job, .. } => Some(ActiveJob::Outgoing(job.clone())),
            Occupancy::Incoming(job) => Some(ActiveJob::Incoming(job.clone())),
            _ => None,
        }
    }

    fn idle(&self) -> bool {
        matches!(self.occupancy, Occupancy::ShutOff)
    }

    fn view(&self, name: &DomainName) -> DomainView {
        DomainView {
            name: name.clone(),
            definition: self.definition.clone(),
            persistent: self.persistent,
            vm: self.vm().cloned(),
            job: self.job(),
            last_job: self.last_job.clone(),
            tunables: self.tunables,
        }
    }
}

/// A copy of what the table says of a domain at one moment.
#[derive(Debug, Clone)]
pub(crate) struct DomainView {
    pub name: DomainName,
    pub definition: DomainDefinition,
    pub persistent: bool,
    pub vm: Option<Arc<RunningVm>>,
    pub job: Option<ActiveJob>,
    pub last_job: Option<JobRecord>,
    pub tunables: Tunables,
}

/// The table.
#[derive(Debug)]
pub(crate) struct DomainTable {
    domains: Mutex<BTreeMap<DomainName, Domain>>,
    /// Each job that leaves the table or switches to post-copy, so that
    /// a `watch` tells it at once, even of a job that began and ended
    /// between two of its looks (a drain's controller admits the next
    /// migration on an end, and re-splits the links on a switch).
    job_news: tokio::sync::broadcast::Sender<JobNews>,
}

/// What a `watch` is told of at once rather than at its next look.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct JobNews {
    pub domain: DomainName,
    pub job_id: String,
    pub kind: JobNewsKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum JobNewsKind {
    /// The job left the table: its record is written.
    Ended,
    /// QEMU reports the job in post-copy.
    Postcopy,
}

/// News a watch may fall behind by before it reads the table instead.
const JOB_NEWS_KEPT: usize = 64;

impl Default for DomainTable {
    fn default() -> Self {
        DomainTable {
            domains: Mutex::default(),
            job_news: tokio::sync::broadcast::channel(JOB_NEWS_KEPT).0,
        }
    }
}

impl DomainTable {
    /// Hears from now on of each job that leaves the table or switches
    /// to post-copy.
    pub fn job_news(&self) -> tokio::sync::broadcast::Receiver<JobNews> {
        self.job_news.subscribe()
    }

    /// Tells the watches that a job switched to post-copy.
    pub fn job_switched(&self, name: &DomainName, job_id: &str) {
        self.tell(name, job_id, JobNewsKind::Postcopy);
    }

    fn job_left(&self, name: &DomainName, job_id: &str) {
        self.tell(name, job_id, JobNewsKind::Ended);
    }

    fn tell(&self, name: &DomainName, job_id: &str, kind: JobNewsKind) {
        // No watch listening is no error.
        let _ = self.job_news.send(JobNews {
            domain: name.clone(),
            job_id: job_id.to_string(),
            kind,
        });
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<DomainName, Domain>> {
        self.domains
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn with<T>(
        &self,
        name: &DomainName,
        f: impl FnOnce(&mut Domain) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let mut domains = self.lock();
        let domain = domains
            .get_mut(name)
            .ok_or_else(|| errors::no_domain(name))?;
        f(domain)
    }

    // Reading.

    /// A snapshot of one domain.
    pub fn get(&self, name: &DomainName) -> Result<DomainView, ApiError> {
        self.with(name, |d| Ok(d.view(name)))
    }

    /// Snapshots of every domain, by name.
    pub fn all(&self) -> Vec<DomainView> {
        self.lock().iter().map(|(n, d)| d.view(n)).collect()
    }

    /// How many domains the table holds.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// The domain's operation lock, so callers can serialise on it.
    pub fn op_lock(&self, name: &DomainName) -> Result<OpLock, ApiError> {
        self.with(name, |d| Ok(d.op_lock.clone()))
    }

    /// Its running VM, whatever it is part of.
    pub fn vm(&self, name: &DomainName) -> Result<Arc<RunningVm>, ApiError> {
        self.with(name, |d| {
            d.vm()
                .cloned()
                .ok_or_else(|| errors::operation_invalid(format!("domain '{name}' is not running")))
        })
    }

    /// Its running VM, if no migration holds it (suspend, resume).
    pub fn idle_vm(&self, name: &DomainName) -> Result<Arc<RunningVm>, ApiError> {
        self.with(name, |d| {
            if d.job().is_some() {
                return Err(errors::operation_invalid(format!(
                    "domain '{name}' has an active migration job"
                )));
            }
            d.vm()
                .cloned()
                .ok_or_else(|| errors::operation_invalid(format!("domain '{name}' is not running")))
        })
    }

    /// The limits its next (or running) migration takes.
    pub fn tunables(&self, name: &DomainName) -> Option<Tunables> {
        self.with(name, |d| Ok(d.tunables)).ok()
    }

    /// True while the VM the table holds for `name` is another than
    /// `run_id` (a new start replaced it).
    pub fn runs_another_vm(&self, name: &DomainName, run_id: u64) -> bool {
        self.with(name, |d| Ok(d.vm().is_some_and(|vm| vm.run_id != run_id)))
            .unwrap_or(false)
    }

    // Transitions.

    /// Adds the definitions found on disk at start-up.
    pub fn load(&self, definitions: Vec<DomainDefinition>) {
        let mut domains = self.lock();
        for def in definitions {
            domains.insert(def.name.clone(), Domain::new(def, true));
        }
    }

    /// `define`, first step: the domain exists (transient until its
    /// definition is saved); returns its operation lock.
    pub fn enter(&self, definition: &DomainDefinition) -> OpLock {
        self.lock()
            .entry(definition.name.clone())
            .or_insert_with(|| Domain::new(definition.clone(), false))
            .op_lock
            .clone()
    }

    /// `define`, once saved (or an offline migration's definition, once
    /// saved): it is the domain's persistent definition. A running domain
    /// keeps its VM; the definition applies from its next start, as with
    /// libvirt.
    pub fn defined(&self, definition: DomainDefinition) -> Result<(), ApiError> {
        self.with(&definition.name.clone(), |d| {
            d.definition = definition;
            d.persistent = true;
            Ok(())
        })
    }

    /// The definition is gone from disk: the domain is transient.
    pub fn undefined(&self, name: &DomainName) -> Result<(), ApiError> {
        self.with(name, |d| {
            d.persistent = false;
            Ok(())
        })
    }

    /// Whether it has a definition on disk.
    pub fn persistent(&self, name: &DomainName) -> Result<bool, ApiError> {
        self.with(name, |d| Ok(d.persistent))
    }

    /// `start`, first step: it must be shut off; returns what it runs.
    pub fn startable(&self, name: &DomainName) -> Result<DomainDefinition, ApiError> {
        self.with(name, |d| {
            if d.vm().is_some() || d.job().is_some() {
                return Err(errors::operation_invalid(format!(
                    "domain '{name}' is already running"
                )));
            }
            Ok(d.definition.clone())
        })
    }

    /// A VM started for the domain runs (shut off → running).
    pub fn attach_vm(&self, name: &DomainName, vm: Arc<RunningVm>) -> Result<(), ApiError> {
        self.with(name, |d| {
            if !d.idle() {
                return Err(errors::operation_invalid(format!(
                    "domain '{name}' is already running"
                )));
            }
            d.occupancy = Occupancy::Running(vm);
            Ok(())
        })
    }

    /// A VM an earlier agent left running is this domain's again (the
    /// domain is added, transient, if the table did not know it).
    pub fn adopt_vm(&self, definition: &DomainDefinition, vm: Arc<RunningVm>) {
        self.lock()
            .entry(definition.name.clone())
            .or_insert_with(|| Domain::new(definition.clone(), false))
            .occupancy = Occupancy::Running(vm);
    }

    /// `destroy`: takes the VM away (running → shut off); a domain in a
    /// migration keeps it.
    pub fn take_vm(&self, name: &DomainName) -> Result<Arc<RunningVm>, ApiError> {
        self.with(name, |d| {
            if let Some(job) = d.job() {
                return Err(errors::operation_invalid(format!(
                    "domain '{name}' has an active migration job ({}); abort it first with \
                     domjobabort on the source host",
                    job.id()
                )));
            }
            match std::mem::replace(&mut d.occupancy, Occupancy::ShutOff) {
                Occupancy::Running(vm) => Ok(vm),
                other => {
                    d.occupancy = other;
                    Err(errors::operation_invalid(format!(
                        "domain '{name}' is not running"
                    )))
                }
            }
        })
    }

    /// The VM with `run_id` exited on its own: a running domain is shut
    /// off, an outgoing job goes on without it (and fails). Says whether
    /// the VM was this domain's.
    pub fn vm_exited(&self, name: &DomainName, run_id: u64) -> bool {
        self.with(name, |d| {
            if d.vm().is_none_or(|vm| vm.run_id != run_id) {
                return Ok(false);
            }
            match &mut d.occupancy {
                Occupancy::Running(_) => d.occupancy = Occupancy::ShutOff,
                Occupancy::Outgoing { vm, .. } => *vm = None,
                // The incoming job's tear-down forgets it.
                Occupancy::Incoming(_) | Occupancy::ShutOff => {}
            }
            Ok(true)
        })
        .unwrap_or(false)
    }

    /// Forgets a transient domain that is shut off.
    pub fn drop_if_transient_and_idle(&self, name: &DomainName) {
        let mut domains = self.lock();
        if domains.get(name).is_some_and(|d| !d.persistent && d.idle()) {
            domains.remove(name);
        }
    }
}

mod migrating;
pub(crate) use migrating::Arrival;
#[cfg(test)]
mod tests;
