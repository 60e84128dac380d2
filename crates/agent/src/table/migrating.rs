//! The table's transitions for migrations: a domain sent away (Begin,
//! Confirm, the job's end) or arriving (Prepare, landing or not), and
//! finding the jobs.

use std::sync::Arc;

use domain::{DomainDefinition, DomainName};
use protocol::domain::Tunables;
use protocol::job::{JobInfo, JobRecord};
use protocol::ApiError;

use super::{Domain, DomainTable, Occupancy};
use crate::errors;
use crate::jobs::{IncomingJob, OutgoingJob};
use crate::running::RunningVm;

/// What an arriving guest is admitted by, under the table's lock: the
/// domain it would replace, and the migrations already arriving.
#[derive(Debug)]
pub(crate) struct Arrival<'a> {
    /// The domain of that name here, if any: the peer it is bound to.
    pub existing: Option<Option<&'a str>>,
    /// The incoming jobs under way.
    pub incoming: Vec<&'a IncomingJob>,
}

/// An outgoing job, with the VM it sends (gone once Confirm stopped it).
pub(crate) type Sending = (Arc<OutgoingJob>, Option<Arc<RunningVm>>);
/// An outgoing job whose VM still runs here: what a new limit reaches.
pub(crate) type Retunable = (Arc<OutgoingJob>, Arc<RunningVm>);

impl DomainTable {
    /// The active job with this id, wherever it runs, and the other host's
    /// certificate name.
    pub fn find_job(&self, id: &str) -> Option<(JobInfo, Option<String>)> {
        self.lock().values().find_map(|d| {
            d.job()
                .filter(|j| j.id() == id)
                .map(|j| (j.info(), j.ident().peer.clone()))
        })
    }

    /// The incoming job with this id, and its domain.
    pub fn find_incoming(&self, job_id: &str) -> Option<(DomainName, Arc<IncomingJob>)> {
        self.lock().iter().find_map(|(name, d)| match &d.occupancy {
            Occupancy::Incoming(job) if job.ident.id == job_id => Some((name.clone(), job.clone())),
            _ => None,
        })
    }

    /// The incoming jobs that `keep` selects, with their domains.
    pub fn incoming(
        &self,
        keep: impl Fn(&IncomingJob) -> bool,
    ) -> Vec<(DomainName, Arc<IncomingJob>)> {
        self.lock()
            .iter()
            .filter_map(|(name, d)| match &d.occupancy {
                Occupancy::Incoming(job) if keep(job) => Some((name.clone(), job.clone())),
                _ => None,
            })
            .collect()
    }

    /// Every outgoing job.
    pub fn outgoing(&self) -> Vec<Arc<OutgoingJob>> {
        self.lock()
            .values()
            .filter_map(|d| match &d.occupancy {
                Occupancy::Outgoing { job, .. } => Some(job.clone()),
                _ => None,
            })
            .collect()
    }

    /// The outgoing job of a domain, with its VM.
    pub fn outgoing_of(&self, name: &DomainName) -> Result<Option<Sending>, ApiError> {
        self.with(name, |d| {
            Ok(match &d.occupancy {
                Occupancy::Outgoing { job, vm } => Some((job.clone(), vm.clone())),
                _ => None,
            })
        })
    }

    /// Begin, first step: what a migration of the domain starts from; it
    /// must have no job, and a VM unless only its definition moves.
    pub fn migratable(
        &self,
        name: &DomainName,
        offline: bool,
    ) -> Result<(DomainDefinition, Option<Arc<RunningVm>>, Tunables), ApiError> {
        self.with(name, |d| {
            if let Some(job) = d.job() {
                return Err(errors::operation_invalid(format!(
                    "domain '{name}' already has an active migration job ({})",
                    job.id()
                )));
            }
            if offline {
                if !d.persistent {
                    return Err(errors::operation_invalid(format!(
                        "offline migration needs a persistent domain; '{name}' is transient"
                    )));
                }
            } else if d.vm().is_none() {
                return Err(errors::operation_invalid(format!(
                    "domain '{name}' is not running (use --offline to move only its definition)"
                )));
            }
            Ok((d.definition.clone(), d.vm().cloned(), d.tunables))
        })
    }

    /// Begin, done: the domain is being sent away.
    pub fn begin_outgoing(&self, name: &DomainName, job: Arc<OutgoingJob>) -> Result<(), ApiError> {
        self.with(name, |d| {
            if let Some(other) = d.job() {
                return Err(errors::operation_invalid(format!(
                    "domain '{name}' already has an active migration job ({})",
                    other.id()
                )));
            }
            let vm = d.vm().cloned();
            d.occupancy = Occupancy::Outgoing { vm, job };
            Ok(())
        })
    }

    /// Confirm: the destination runs the guest; the source's VM leaves the
    /// table (the job goes on until its record). Returns it, to stop.
    pub fn confirm_outgoing(&self, name: &DomainName) -> Option<Arc<RunningVm>> {
        self.with(name, |d| {
            Ok(match &mut d.occupancy {
                Occupancy::Outgoing { vm, .. } => vm.take(),
                _ => None,
            })
        })
        .ok()
        .flatten()
    }

    /// An offline migration's Prepare: the domain, created if new, must be
    /// shut off here to take the definition that arrives.
    pub fn receivable_offline(
        &self,
        name: &DomainName,
        host: &str,
        created: bool,
        admit: impl FnOnce(Arrival<'_>) -> Result<(), ApiError>,
    ) -> Result<(), ApiError> {
        let domains = self.lock();
        let d = domains.get(name).ok_or_else(|| errors::no_domain(name))?;
        if !d.idle() {
            return Err(errors::operation_invalid(format!(
                "domain '{name}' is running on {host}"
            )));
        }
        admit(Arrival {
            existing: (!created).then_some(d.bound_to.as_deref()),
            incoming: incoming_jobs(&domains),
        })
    }

    /// Binds the domain to the peer its guest was handed to (or to none).
    pub fn bind(&self, name: &DomainName, peer: Option<String>) {
        let _ = self.with(name, |d| {
            d.bound_to = peer;
            Ok(())
        });
    }

    /// Prepare: the domain is arriving. A domain the table knows must be
    /// shut off; one it does not know is created for the migration. The
    /// job is made from whether it was created and the definition it
    /// replaces. Returns both.
    pub fn reserve_incoming(
        &self,
        definition: &DomainDefinition,
        job: impl FnOnce(bool, Option<DomainDefinition>) -> IncomingJob,
        host: &str,
        admit: impl FnOnce(Arrival<'_>) -> Result<(), ApiError>,
    ) -> Result<(bool, Option<DomainDefinition>), ApiError> {
        let name = &definition.name;
        let mut domains = self.lock();
        let created = !domains.contains_key(name);
        if let Some(d) = domains.get(name) {
            if !d.idle() {
                return Err(errors::operation_invalid(format!(
                    "domain '{name}' is already running on {host}"
                )));
            }
        }
        admit(Arrival {
            existing: domains.get(name).map(|d| d.bound_to.as_deref()),
            incoming: incoming_jobs(&domains),
        })?;
        let d = domains
            .entry(name.clone())
            .or_insert_with(|| Domain::new(definition.clone(), false));
        if !d.idle() {
            return Err(errors::operation_invalid(format!(
                "domain '{name}' is already running on {host}"
            )));
        }
        let replaced = (!created).then(|| d.definition.clone());
        d.occupancy = Occupancy::Incoming(Arc::new(job(created, replaced.clone())));
        Ok((created, replaced))
    }

    /// Prepare, done: the incoming job with its VM; the running
    /// configuration is the one that arrives.
    pub fn prepared_incoming(&self, job: Arc<IncomingJob>) -> Result<(), ApiError> {
        let name = DomainName::clone(&job.definition.name);
        self.with(&name, |d| {
            d.definition = job.definition.clone();
            d.occupancy = Occupancy::Incoming(job);
            Ok(())
        })
    }

    /// After an agent restart: an adopted VM is part of the incoming job
    /// a run record names.
    pub fn keep_incoming(&self, name: &DomainName, job: Arc<IncomingJob>) {
        let _ = self.with(name, |d| {
            d.occupancy = Occupancy::Incoming(job);
            Ok(())
        });
    }

    /// True while `job` is the domain's incoming job.
    pub fn is_incoming(&self, name: &DomainName, job: &Arc<IncomingJob>) -> bool {
        self.with(name, |d| {
            Ok(matches!(&d.occupancy, Occupancy::Incoming(j) if Arc::ptr_eq(j, job)))
        })
        .unwrap_or(false)
    }

    /// An incoming job that did not land: the domain is forgotten if it
    /// only existed for the migration, else shut off again with the
    /// definition it had (the peer's only held while its guest arrived).
    /// Nothing happens if the domain's job is another.
    pub fn forget_incoming(&self, name: &DomainName, job_id: &str) {
        let forgot = {
            let mut domains = self.lock();
            match domains.get_mut(name) {
                Some(d) => match &d.occupancy {
                    Occupancy::Incoming(job) if job.ident.id == job_id => {
                        let job = job.clone();
                        if job.created_domain {
                            domains.remove(name);
                        } else {
                            d.occupancy = Occupancy::ShutOff;
                            if let Some(definition) = &job.replaced_definition {
                                d.definition = definition.clone();
                            }
                        }
                        true
                    }
                    _ => false,
                },
                None => false,
            }
        };
        if forgot {
            self.job_left(name, job_id);
        }
    }

    /// A job ended with `record`: its VM (if any) runs on here, and the
    /// record is the domain's last.
    pub fn end_job(&self, name: &DomainName, job_id: &str, record: JobRecord) {
        let ended = self.with(name, |d| {
            let vm = match &d.occupancy {
                Occupancy::Outgoing { job, vm } if job.ident.id == job_id => Some(vm.clone()),
                Occupancy::Incoming(job) if job.ident.id == job_id => Some(job.vm.clone()),
                _ => None,
            };
            if let Some(vm) = vm {
                d.occupancy = match vm {
                    Some(vm) => Occupancy::Running(vm),
                    None => Occupancy::ShutOff,
                };
            }
            d.last_job = Some(record);
            Ok(())
        });
        if ended.is_ok() {
            self.job_left(name, job_id);
        }
    }

    /// The record of a job that ended while no agent watched it.
    pub fn set_last_job(&self, name: &DomainName, record: JobRecord) {
        let _ = self.with(name, |d| {
            d.last_job = Some(record);
            Ok(())
        });
    }

    /// New limits for the domain's migrations; returns its outgoing job
    /// and VM, which take them at once.
    pub fn retune(
        &self,
        name: &DomainName,
        change: Tunables,
    ) -> Result<Option<Retunable>, ApiError> {
        self.with(name, |d| {
            if change.downtime_ms == Some(0) {
                return Err(errors::invalid("downtime must be at least 1 ms"));
            }
            if let Some(b) = change.bandwidth_mib_s {
                d.tunables.bandwidth_mib_s = Some(b);
            }
            if let Some(ms) = change.downtime_ms {
                d.tunables.downtime_ms = Some(ms);
            }
            Ok(match &d.occupancy {
                Occupancy::Outgoing { job, vm: Some(vm) } => Some((job.clone(), vm.clone())),
                _ => None,
            })
        })
    }
}

fn incoming_jobs(domains: &std::collections::BTreeMap<DomainName, Domain>) -> Vec<&IncomingJob> {
    domains
        .values()
        .filter_map(|d| match &d.occupancy {
            Occupancy::Incoming(job) => Some(job.as_ref()),
            _ => None,
        })
        .collect()
}
