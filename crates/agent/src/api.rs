//! One handler per request.

use std::sync::Arc;
use std::time::Duration;

use domain::qemu::layout::FIXED_IN;
use domain::qemu::{QemuBinary, STOP_TIMEOUT};
use domain::{DomainDefinition, DomainName};
use migration::perform::Retune;
use protocol::domain::{DefinitionDoc, DomainInfo, DomainSummary, Tunables};
use protocol::host::{AgentInfo, HostCapabilities};
use protocol::job::Phase;
use protocol::{ApiError, ErrorCode, Reply, Request, Role, PROTOCOL_VERSION};
use qmp::commands::block::BlockJobSetSpeed;
use qmp::commands::migration::MigrateStartPostcopy;
use qmp::commands::vm::{Cont, Stop};
use serde_json::Value;
use tokio::sync::oneshot;
use types::Bandwidth;

use crate::caller::{Caller, ConnContext};
use crate::errors;
use crate::jobs::ActiveJob;
use crate::migrate;
use crate::state::Agent;
use crate::vm;

/// How long a running job may take to apply a new limit.
const RETUNE_TIMEOUT: Duration = Duration::from_secs(10);

impl Agent {
    pub(crate) async fn handle(
        self: &Arc<Self>,
        request: Request,
        ctx: &ConnContext,
    ) -> Result<Reply, ApiError> {
        let role = ctx.caller.role();
        if !role.allows(&request) {
            return Err(ApiError::new(
                ErrorCode::PermissionDenied,
                format!("{} may not send `{}`", ctx.caller, request.op()),
            ));
        }
        match request {
            Request::Hello => Ok(Reply::Hello(self.hello(role))),
            Request::Define { definition } => self.define(definition).await,
            Request::Undefine { domain } => self.undefine(&domain).await,
            Request::Start { domain, paused } => self.start(&domain, paused).await,
            Request::Destroy { domain } => self.destroy(&domain).await,
            Request::Suspend { domain } => self.pause(&domain, true).await,
            Request::Resume { domain } => self.pause(&domain, false).await,
            Request::List { all } => self.list(all).await,
            Request::DomInfo { domain } => self.dominfo(&domain, role).await,
            Request::DomCapabilities => self.domcapabilities().await,
            Request::DumpDef { domain } => Ok(Reply::Definition {
                definition: DefinitionDoc(self.table.get(&domain)?.definition.to_document()),
            }),
            Request::Migrate {
                domain,
                destination,
                flags,
            } => migrate::source::begin(self, &domain, &destination, *flags).await,
            Request::DomJobInfo { domain, completed } => self.domjobinfo(&domain, completed),
            Request::DomJobAbort { domain } => self.domjobabort(&domain),
            Request::MigrateSetSpeed {
                domain,
                bandwidth_mib_s,
            } => {
                self.retune(
                    &domain,
                    Tunables {
                        bandwidth_mib_s: Some(bandwidth_mib_s),
                        downtime_ms: None,
                    },
                )
                .await
            }
            Request::MigrateSetMaxDowntime {
                domain,
                downtime_ms,
            } => {
                self.retune(
                    &domain,
                    Tunables {
                        bandwidth_mib_s: None,
                        downtime_ms: Some(downtime_ms),
                    },
                )
                .await
            }
            Request::MigratePostcopy { domain } => self.start_postcopy(&domain).await,
            Request::Job { id } => self.job(&id, &ctx.caller).await,
            // Served by the connection itself (see `watch`).
            Request::Watch { .. } => Err(errors::invalid(
                "watch streams on its own connection and takes it over",
            )),
            Request::Jobs { domain, limit } => self
                .history
                .list(domain.map(|d| d.to_string()), limit)
                .await
                .map(|jobs| Reply::Jobs { jobs })
                .map_err(ApiError::from),
            Request::Estimate { domain, params } => {
                crate::estimate::estimate(self, &domain, params).await
            }
            Request::QemuMonitorCommand { domain, command } => {
                self.monitor_command(&domain, command).await
            }
            Request::DomDirtyRateCalc {
                domain,
                seconds,
                mode,
            } => crate::measure::calc(self, &domain, seconds, mode.as_deref()).await,
            Request::DomDirtyRate { domain } => crate::measure::last(self, &domain).await,
            Request::MigrateCompcache { domain, bytes } => {
                crate::measure::compcache(self, &domain, bytes).await
            }
            Request::PeerProbe(probe) => migrate::destination::probe(self, *probe).await,
            Request::PeerPrepare(prepare) => {
                migrate::destination::prepare(self, *prepare, ctx).await
            }
            Request::PeerFinish { job_id } => {
                migrate::destination::finish(self, &job_id, ctx).await
            }
            Request::PeerRecover { job_id } => {
                migrate::destination::recover(self, &job_id, ctx).await
            }
            Request::PeerAbort { job_id, reason } => {
                migrate::destination::abort(self, &job_id, &reason, ctx).await
            }
        }
    }

    /// About this agent; where it keeps its state only for administrators.
    fn hello(&self, role: Role) -> AgentInfo {
        AgentInfo {
            version: env!("CARGO_PKG_VERSION").to_string(),
            protocol: PROTOCOL_VERSION,
            uri: self.config.listen.map(|_| self.uri.clone()),
            state_dir: (role == Role::Admin).then(|| self.store.root().display().to_string()),
            instance: self.instance.clone(),
        }
    }

    async fn define(self: &Arc<Self>, document: DefinitionDoc) -> Result<Reply, ApiError> {
        let definition = DomainDefinition::from_document(document.0)
            .map_err(|e| ApiError::new(ErrorCode::InvalidDefinition, e.to_string()))?;
        self.check_paths(&definition).await?;
        let name = definition.name.clone();
        let lock = self.table.enter(&definition);
        let _guard = lock.lock().await;
        if let Err(e) = self.store.save_definition(&definition).await {
            self.table.drop_if_transient_and_idle(&name);
            return Err(ApiError::from(e));
        }
        self.table.defined(definition)?;
        // An administrator's definition: no peer may replace it.
        self.bind(&name, None).await;
        tracing::info!(domain = %name, "defined");
        Ok(Reply::Done)
    }

    async fn undefine(self: &Arc<Self>, name: &DomainName) -> Result<Reply, ApiError> {
        let lock = self.table.op_lock(name)?;
        let _guard = lock.lock().await;
        if !self.table.persistent(name)? {
            return Err(errors::operation_invalid(format!(
                "domain '{name}' is transient: it has no definition to remove"
            )));
        }
        self.store
            .remove_definition(name)
            .await
            .map_err(ApiError::from)?;
        self.table.undefined(name)?;
        self.table.drop_if_transient_and_idle(name);
        tracing::info!(domain = %name, "undefined");
        Ok(Reply::Done)
    }

    async fn start(self: &Arc<Self>, name: &DomainName, paused: bool) -> Result<Reply, ApiError> {
        let lock = self.table.op_lock(name)?;
        let _guard = lock.lock().await;
        let def = self.table.startable(name)?;
        let binary = self.binary().await?;
        let binary = binary.as_ref();
        let spec = vm::spec_for(&def, binary, &self.uri, self.config.tcg_workaround)?;
        // In a cluster, only where the cluster says it may run.
        crate::membership::claim(self, name.as_str()).await?;
        let vm = match vm::launch(self, &def, &spec, false, paused).await {
            Ok(vm) => vm,
            Err(e) => {
                let _ = crate::membership::release(self, name.as_str()).await;
                return Err(e);
            }
        };
        if let Err(e) = self.table.attach_vm(name, vm.clone()) {
            vm.process.kill_and_wait(STOP_TIMEOUT).await;
            return Err(e);
        }
        // The guest runs here again: no peer may replace it.
        self.bind(name, None).await;
        self.persist_run(name).await;
        Ok(Reply::Done)
    }

    async fn destroy(self: &Arc<Self>, name: &DomainName) -> Result<Reply, ApiError> {
        let lock = self.table.op_lock(name)?;
        let _guard = lock.lock().await;
        let vm = self.table.take_vm(name)?;
        vm.process.kill_and_wait(STOP_TIMEOUT).await;
        let told = crate::membership::release(self, name.as_str()).await;
        tracing::info!(domain = %name, "destroyed");
        if told {
            self.table.drop_if_transient_and_idle(name);
        }
        Ok(Reply::Done)
    }

    async fn pause(self: &Arc<Self>, name: &DomainName, stop: bool) -> Result<Reply, ApiError> {
        let vm = self.table.idle_vm(name)?;
        let result = if stop {
            vm.process.qmp().execute(&Stop).await
        } else {
            vm.process.qmp().execute(&Cont).await
        };
        result.map_err(|e| errors::qemu_failed(&e))?;
        // A paused guest dirties nothing, a resumed one as before: either
        // way the kept measurement is not what a drain or a migration
        // would meet now.
        vm.measurements.forget().await;
        Ok(Reply::Done)
    }

    async fn list(self: &Arc<Self>, all: bool) -> Result<Reply, ApiError> {
        let rows: Vec<(DomainName, Option<u64>, bool)> = self
            .table
            .all()
            .into_iter()
            .map(|d| (d.name, d.vm.as_ref().map(|vm| vm.run_id), d.persistent))
            .collect();
        let mut domains = Vec::new();
        for (name, id, persistent) in rows {
            let Ok(state) = self.state_of(&name).await else {
                continue;
            };
            if all || id.is_some() {
                domains.push(DomainSummary {
                    id,
                    name: name.to_string(),
                    state,
                    persistent,
                });
            }
        }
        Ok(Reply::Domains { domains })
    }

    /// A domain's details; its QEMU's pid and paths only for administrators.
    async fn dominfo(self: &Arc<Self>, name: &DomainName, role: Role) -> Result<Reply, ApiError> {
        let state = self.state_of(name).await?;
        let d = self.table.get(name)?;
        let (def, persistent, vm, tunables) = (d.definition, d.persistent, d.vm, d.tunables);
        let job = d.job.as_ref().map(|j| j.id().to_string());
        let workaround = vm.as_ref().and_then(|vm| {
            vm.spec.ram.avoids_tcg_dirty_bitmap_bug().then(|| {
                format!(
                    "active: QEMU {} with TCG loses guest writes during migration (fixed in \
                     {FIXED_IN}); guest RAM is {} bytes, off the 64-page grid, so QEMU uses its \
                     correct per-page dirty sync",
                    vm.qemu_version, vm.spec.ram.bytes
                )
            })
        });
        let admin = role == Role::Admin;
        let path = |p: &std::path::Path| admin.then(|| p.display().to_string());
        Ok(Reply::DomainInfo(Box::new(DomainInfo {
            id: vm.as_ref().map(|vm| vm.run_id),
            name: name.to_string(),
            state,
            persistent,
            memory_mib: def.memory_mib,
            vcpus: def.vcpus,
            accel: def.accel,
            guest_ram_bytes: vm.as_ref().map(|vm| vm.spec.ram.bytes),
            machine: vm.as_ref().map(|vm| vm.spec.machine.clone()),
            qemu_pid: vm.as_ref().filter(|_| admin).map(|vm| vm.process.pid()),
            qemu_version: vm.as_ref().map(|vm| vm.qemu_version.to_string()),
            qmp_socket: vm.as_ref().and_then(|vm| path(&vm.qmp_socket)),
            serial_log: vm.as_ref().and_then(|vm| path(&vm.serial_log)),
            qemu_log: vm.as_ref().and_then(|vm| path(&vm.qemu_log)),
            tcg_dirty_bitmap_workaround: workaround,
            tunables,
            active_job: job,
            labels: def.labels.clone(),
        })))
    }

    pub(crate) fn host_capabilities(&self, binary: &QemuBinary) -> HostCapabilities {
        HostCapabilities {
            host: self.uri.clone(),
            tcg_dirty_bitmap_bug: binary.has_tcg_dirty_bitmap_bug(domain::Accel::Tcg),
            qemu: migration::wire::qemu_info(binary),
            default_accel: self.config.default_accel,
            vcpu_throttle: Some(migration::vcpu_throttle::available(&self.throttle_place())),
        }
    }

    async fn domcapabilities(self: &Arc<Self>) -> Result<Reply, ApiError> {
        let binary = self.binary().await?;
        let binary = binary.as_ref();
        Ok(Reply::Capabilities(Box::new(
            self.host_capabilities(binary),
        )))
    }

    fn domjobinfo(&self, name: &DomainName, completed: bool) -> Result<Reply, ApiError> {
        let d = self.table.get(name)?;
        let job = if completed {
            d.last_job.as_ref().map(|r| Box::new(r.as_info()))
        } else {
            d.job.as_ref().map(|j| Box::new(j.info()))
        };
        Ok(Reply::JobInfo { job })
    }

    fn domjobabort(&self, name: &DomainName) -> Result<Reply, ApiError> {
        match &self.table.get(name)?.job {
            Some(ActiveJob::Outgoing(job)) => {
                job.cancel.cancel();
                tracing::info!(domain = %name, job = %job.ident.id, "abort requested");
                Ok(Reply::Done)
            }
            Some(ActiveJob::Incoming(job)) => Err(errors::operation_invalid(format!(
                "domain '{name}' is arriving from {}; abort the job on the source host",
                job.ident.source
            ))),
            None => Err(errors::operation_invalid(format!(
                "domain '{name}' has no active job"
            ))),
        }
    }

    async fn retune(
        self: &Arc<Self>,
        name: &DomainName,
        change: Tunables,
    ) -> Result<Reply, ApiError> {
        let bandwidth = match change.bandwidth_mib_s {
            Some(0) => return Err(errors::invalid("bandwidth must be at least 1 MiB/s")),
            Some(mib) => Some(Bandwidth::from_mib_s(mib).ok_or_else(|| {
                errors::invalid(format!("bandwidth {mib} MiB/s is beyond any link"))
            })?),
            None => None,
        };
        let job = self.table.retune(name, change)?.map(|(job, vm)| {
            (
                job.retune.clone(),
                job.storage.clone(),
                job.clock.current(),
                vm.process.qmp().clone(),
            )
        });
        let Some((job, disks, phase, qmp)) = job else {
            // Kept for the next migration.
            return Ok(Reply::Done);
        };
        // The disks' mirrors take the cap as it is given, as --bandwidth.
        if let (Some(bandwidth), false) = (bandwidth, disks.is_empty()) {
            for target in &disks {
                let set = BlockJobSetSpeed {
                    device: migration::storage::source::mirror_job_id(target),
                    speed: bandwidth.bytes_per_sec(),
                };
                if let Err(e) = qmp.execute(&set).await {
                    tracing::debug!(disk = %target, error = %e, "mirror speed not set");
                }
            }
        }
        // Before Perform (the disks still being copied), the memory copy
        // takes the change when it starts.
        if matches!(phase, Phase::Begin | Phase::Prepare) {
            return match job.try_send(Retune {
                bandwidth,
                downtime: change.downtime_ms.map(Duration::from_millis),
                done: oneshot::channel().0,
            }) {
                Ok(()) | Err(_) => Ok(Reply::Done),
            };
        }
        let (done, applied) = oneshot::channel();
        if job
            .send(Retune {
                bandwidth,
                downtime: change.downtime_ms.map(Duration::from_millis),
                done,
            })
            .await
            .is_err()
        {
            // The job's copy is over; the setting waits for the next one.
            return Ok(Reply::Done);
        }
        match tokio::time::timeout(RETUNE_TIMEOUT, applied).await {
            Ok(Ok(Ok(()))) | Ok(Err(_)) => Ok(Reply::Done),
            Ok(Ok(Err(why))) => Err(errors::qemu_failed(&why)),
            Err(_) => Err(errors::qemu(format!(
                "the running job did not take the change within {RETUNE_TIMEOUT:?}; it applies to the next migration"
            ))),
        }
    }

    async fn start_postcopy(self: &Arc<Self>, name: &DomainName) -> Result<Reply, ApiError> {
        let qmp = match self.table.outgoing_of(name)? {
            Some((job, Some(vm))) if job.ident.flags.postcopy().on_command() => {
                vm.process.qmp().clone()
            }
            Some(_) => {
                return Err(errors::operation_invalid(format!(
                    "the migration of '{name}' was not started with --postcopy"
                )))
            }
            None => {
                return Err(errors::operation_invalid(format!(
                    "domain '{name}' is not being migrated from this host"
                )))
            }
        };
        qmp.execute(&MigrateStartPostcopy)
            .await
            .map_err(|e| errors::qemu_failed(&e))?;
        Ok(Reply::Done)
    }

    async fn job(&self, id: &str, caller: &Caller) -> Result<Reply, ApiError> {
        // An agent sees only the jobs it is the other host of; to it, any
        // other job does not exist.
        let visible = |peer: Option<&str>| match caller.role() {
            protocol::Role::Agent => caller.name().is_some() && peer == caller.name(),
            _ => true,
        };
        let no_job = || ApiError::new(ErrorCode::NoJob, format!("no job with id '{id}'"));
        // Check the live table first: a record is written before the job
        // leaves it, so one of the two always answers.
        if let Some((info, peer)) = self.table.find_job(id) {
            if !visible(peer.as_deref()) {
                return Err(no_job());
            }
            return Ok(Reply::Job {
                active: Some(Box::new(info)),
                record: None,
            });
        }
        let loaded = self.history.load(id).await.map_err(ApiError::from)?;
        match loaded {
            Some(record) if visible(record.peer.as_deref()) => Ok(Reply::Job {
                active: None,
                record: Some(Box::new(record)),
            }),
            _ => Err(no_job()),
        }
    }

    async fn monitor_command(
        self: &Arc<Self>,
        name: &DomainName,
        command: Value,
    ) -> Result<Reply, ApiError> {
        if !self.config.qemu_monitor_command {
            return Err(ApiError::new(
                ErrorCode::PermissionDenied,
                "qemu-monitor-command is off on this agent: raw QMP can make QEMU do anything \
                 (set qemu_monitor_command = true in its config, or pass \
                 --allow-qemu-monitor-command)",
            ));
        }
        let execute = command
            .get("execute")
            .and_then(Value::as_str)
            .ok_or_else(|| errors::invalid("the command must be a QMP object with \"execute\""))?
            .to_string();
        let arguments = command.get("arguments").cloned();
        let vm = self.table.vm(name)?;
        let result = vm
            .process
            .qmp()
            .execute_raw(&execute, arguments, self.config.qemu_timeout)
            .await
            .map_err(|e| errors::qemu_failed(&e))?;
        Ok(Reply::Monitor { result })
    }
}
