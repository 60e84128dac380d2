//! Probe and Prepare: can this host take the guest, and start its QEMU
//! paused, listening for the data.

use std::sync::{Arc, Mutex};

use domain::qemu::STOP_TIMEOUT;
use domain::DomainDefinition;
use migration::job::unix_ms;
use migration::record::JobIdentity;
use migration::settings::{self, ThrottleVia};
use migration::stream_tls::StreamTls;
use migration::uri::DataUri;
use migration::{incoming, support, wire, Flags};
use protocol::domain::Tunables;
use protocol::job::{Phase, Role};
use protocol::migrate::{PrepareRequest, ProbeRequest, StorageCopy};
use protocol::{ApiError, ErrorCode, Reply};
use tokio::time::Instant;
use tracing::Instrument;

use super::admission::{self, Listen};
use super::storage;
use crate::caller::ConnContext;
use crate::errors;
use crate::jobs::IncomingJob;
use crate::migrate::stream_tls;
use crate::state::Agent;
use crate::vm;

/// Probe: this host's QEMU has what the migration needs here, and the
/// machine type the guest runs with. Answered with the host's
/// capabilities.
pub(crate) async fn probe(agent: &Arc<Agent>, probe: ProbeRequest) -> Result<Reply, ApiError> {
    let flags = Flags::new(probe.flags).map_err(|e| errors::invalid(e.to_string()))?;
    crate::membership::takes_guests(agent).await?;
    let binary = agent.binary().await?;
    let binary = binary.as_ref();
    support::check(&flags, Role::Destination, &agent.uri, binary)
        .map_err(|e| ApiError::new(ErrorCode::Unsupported, e.to_string()))?;
    stream_tls::check(agent, &flags)?;
    if let Some(machine) = &probe.machine {
        if binary.resolve_machine(machine).as_deref() != Some(machine) {
            return Err(ApiError::new(
                ErrorCode::Unsupported,
                format!(
                    "machine type '{machine}' is not supported by the QEMU binary on {}",
                    agent.uri
                ),
            ));
        }
    }
    Ok(Reply::Capabilities(Box::new(
        agent.host_capabilities(binary),
    )))
}

/// What a Prepare request says, checked.
struct Incoming {
    job_id: String,
    definition: DomainDefinition,
    spec: domain::qemu::LaunchSpec,
    flags: Flags,
    source: String,
    storage: Vec<StorageCopy>,
}

impl TryFrom<PrepareRequest> for Incoming {
    type Error = ApiError;

    fn try_from(req: PrepareRequest) -> Result<Self, ApiError> {
        let definition = DomainDefinition::from_document(req.definition.0)
            .map_err(|e| ApiError::new(ErrorCode::InvalidDefinition, e.to_string()))?;
        let flags = Flags::new(req.flags).map_err(|e| errors::invalid(e.to_string()))?;
        // Ids go into logs, file names and other hosts' requests: only the
        // UUIDs sources make.
        if uuid::Uuid::parse_str(&req.job_id).is_err() {
            return Err(errors::invalid(format!(
                "job id {:?} is not a UUID",
                req.job_id
            )));
        }
        // The source's address is dialled after a restart to settle the
        // job: it must be an agent URI.
        if req.source.parse::<protocol::AgentUri>().is_err() {
            return Err(errors::invalid(format!(
                "source {:?} is not an agent URI",
                req.source
            )));
        }
        Ok(Incoming {
            job_id: req.job_id,
            definition,
            spec: wire::launch_spec_from(&req.spec),
            flags,
            source: req.source,
            storage: req.storage,
        })
    }
}

pub(crate) async fn prepare(
    agent: &Arc<Agent>,
    req: PrepareRequest,
    ctx: &ConnContext,
) -> Result<Reply, ApiError> {
    let req = Incoming::try_from(req)?;
    crate::membership::takes_guests(agent).await?;
    // The definition names files on this host: the same rules as `define`,
    // and none of another domain's; the one kept for the next start too.
    agent.check_paths(&req.definition).await?;
    let others: Vec<_> = agent
        .table
        .all()
        .into_iter()
        .map(|d| d.definition)
        .collect();
    admission::own_files(&req.definition, &others).await?;
    if let Some(next) = crate::migrate::persistent_definition(&req.flags, &req.definition)? {
        agent.check_paths(&next).await?;
        admission::own_files(&next, &others).await?;
    }
    let span = tracing::info_span!("job", id = %req.job_id, domain = %req.definition.name, role = "destination");
    async {
        if req.flags.offline() {
            return prepare_offline(agent, &req, ctx).await;
        }
        prepare_live(agent, req, ctx).await
    }
    .instrument(span)
    .await
}

async fn prepare_offline(
    agent: &Arc<Agent>,
    req: &Incoming,
    ctx: &ConnContext,
) -> Result<Reply, ApiError> {
    let name = req.definition.name.clone();
    // The same lock as `define`: the definition on disk changes.
    let lock = agent.table.enter(&req.definition);
    let _guard = lock.lock().await;
    // Under the lock, a domain that is not persistent is the placeholder
    // `enter` made: new here.
    let created = !agent.table.persistent(&name).unwrap_or(false);
    let claim = admission::Claim {
        name: name.as_str(),
        memory_mib: 0,
        disk_bytes: 0,
    };
    let admitted = agent
        .table
        .receivable_offline(&name, &agent.uri, created, |arrival| {
            admission::admit(&arrival, &ctx.caller, &agent.config.peers, claim)
        });
    if let Err(e) = admitted {
        agent.table.drop_if_transient_and_idle(&name);
        return Err(e);
    }
    let kept = crate::migrate::persistent_definition(&req.flags, &req.definition)?
        .unwrap_or_else(|| req.definition.clone());
    if let Err(e) = agent.store.save_definition(&kept).await {
        agent.table.drop_if_transient_and_idle(&name);
        return Err(ApiError::from(e));
    }
    agent.table.defined(kept)?;
    agent.bind(&name, None).await;
    tracing::info!("definition received (offline migration)");
    Ok(Reply::Prepared {
        uri: String::new(),
        nbd_port: None,
        nbd_host: None,
    })
}

async fn prepare_live(
    agent: &Arc<Agent>,
    req: Incoming,
    ctx: &ConnContext,
) -> Result<Reply, ApiError> {
    let name = req.definition.name.clone();
    let binary = agent.binary().await?;
    let binary = binary.as_ref();
    support::check(&req.flags, Role::Destination, &agent.uri, binary)
        .map_err(|e| ApiError::new(ErrorCode::Unsupported, e.to_string()))?;
    vm::check_spec(&req.spec, binary, &agent.uri, agent.config.tcg_workaround)?;
    let tls = stream_tls::destination(agent, &req.flags, ctx)?;
    // The peer proposes; this host decides where its QEMU listens and
    // which files it creates images on.
    let ports = agent.config.migration_ports;
    let listen = admission::listen(
        req.flags.stream().asked_uri().as_deref(),
        ctx.local_ip,
        ports,
    )
    .await?;
    // `--disks-uri`: the NBD server on another of this host's addresses.
    let nbd_listen = match &req.flags.options().disks_uri {
        Some(uri) => Some(admission::listen(Some(uri), ctx.local_ip, ports).await?),
        None => None,
    };
    admission::nbd_port(req.flags.storage().copy().and_then(|c| c.port), ports)?;
    admission::storage(&req.definition, &req.storage, &agent.confinement()).await?;

    // Reserve the name: from here on the domain is "migrating in".
    let claim = admission::Claim {
        name: name.as_str(),
        memory_mib: u64::from(req.definition.memory_mib),
        disk_bytes: disk_bytes(&req.storage),
    };
    let (created, replaced) = agent.table.reserve_incoming(
        &req.definition,
        |created, replaced| {
            incoming_job(
                agent,
                &req,
                ctx,
                (created, replaced),
                None,
                Default::default(),
            )
        },
        &agent.uri,
        |arrival| admission::admit(&arrival, &ctx.caller, &agent.config.peers, claim),
    )?;

    let images = match storage::create_images(&req.definition, &req.storage).await {
        Ok(images) => images,
        Err(e) => {
            agent.table.forget_incoming(&name, &req.job_id);
            return Err(e);
        }
    };
    match start(agent, &req, &listen, nbd_listen.as_ref(), tls.as_ref()).await {
        Ok((vm, previous, uri, nbd_port)) => {
            let resume = (req.flags.postcopy().enabled() && !req.flags.landing().suspend)
                .then(|| migration::postcopy::resume_on_postcopy(vm.process.qmp().clone()));
            let mut job = incoming_job(
                agent,
                &req,
                ctx,
                (created, replaced),
                Some(vm.clone()),
                previous,
            );
            job.created_images = images;
            job.postcopy_resume = std::sync::Mutex::new(resume);
            agent.table.prepared_incoming(Arc::new(job))?;
            agent.persist_run(&name).await;
            tracing::info!(%uri, ?nbd_port, source = ?req.source, "prepared");
            Ok(Reply::Prepared {
                uri: uri.to_string(),
                nbd_port,
                nbd_host: nbd_listen.map(|l| l.host().to_string()),
            })
        }
        Err(e) => {
            storage::remove_images(&images).await;
            agent.table.forget_incoming(&name, &req.job_id);
            tracing::error!(error = %e, "prepare failed");
            Err(e)
        }
    }
}

/// Starts the destination QEMU paused with `-incoming defer`, applies the
/// job's settings and listens; kills it again if any of that fails.
async fn start(
    agent: &Arc<Agent>,
    req: &Incoming,
    listen: &Listen,
    nbd_listen: Option<&Listen>,
    tls: Option<&StreamTls>,
) -> Result<
    (
        Arc<crate::running::RunningVm>,
        settings::Previous,
        DataUri,
        Option<u16>,
    ),
    ApiError,
> {
    let vm = vm::launch(agent, &req.definition, &req.spec, true, false).await?;
    let qmp = vm.process.qmp();
    let setup = async {
        let previous = settings::apply(
            qmp,
            &req.flags,
            Tunables::default(),
            Role::Destination,
            ThrottleVia::NotQemu,
            tls,
        )
        .await
        .map_err(|e| {
            errors::qemu(format!(
                "destination QEMU refused the migration settings: {e}"
            ))
        })?;
        let uri = match listen {
            Listen::Uri(uri) => incoming::listen(qmp, uri).await,
            Listen::Ports(host, range) => incoming::listen_in_range(qmp, host, *range).await,
        }
        .map_err(|e| match (e, listen) {
            (incoming::IncomingError::Listen { .. }, Listen::Ports(host, (first, last))) => {
                errors::operation_invalid(format!(
                    "no free migration port in {first}-{last} on {host}: widen migration_ports"
                ))
            }
            (e, _) => errors::qemu(errors::chain(&e)),
        })?;
        // The disks' NBD server listens where the memory stream arrives,
        // or where `--disks-uri` asked.
        let nbd_port = if req.storage.is_empty() {
            None
        } else {
            let (host, ports) = match nbd_listen {
                Some(Listen::Uri(DataUri::Tcp { host, port })) => {
                    (host.as_str(), ((*port != 0).then_some(*port), None))
                }
                Some(Listen::Ports(host, range)) => (host.as_str(), (None, Some(*range))),
                Some(Listen::Uri(other)) => {
                    return Err(errors::invalid(format!(
                        "disks are served only on tcp: addresses, not {other}"
                    )))
                }
                None => match &uri {
                    DataUri::Tcp { host, .. } => (
                        host.as_str(),
                        (
                            req.flags.storage().copy().and_then(|c| c.port),
                            agent.config.migration_ports,
                        ),
                    ),
                    other => {
                        return Err(errors::invalid(format!(
                            "disks are copied only over tcp: migration URIs, not {other}"
                        )))
                    }
                },
            };
            let host = host.trim_start_matches('[').trim_end_matches(']');
            Some(
                storage::serve(
                    qmp,
                    vm.process.pid(),
                    host,
                    ports,
                    &req.storage,
                    tls.is_some(),
                )
                .await?,
            )
        };
        Ok::<_, ApiError>((previous, uri, nbd_port))
    }
    .await;
    match setup {
        Ok((previous, uri, nbd_port)) => Ok((vm, previous, uri, nbd_port)),
        Err(e) => {
            vm.process.kill_and_wait(STOP_TIMEOUT).await;
            Err(e)
        }
    }
}

/// The bytes of the images the copied disks take.
fn disk_bytes(storage: &[StorageCopy]) -> u64 {
    storage
        .iter()
        .map(|c| c.virtual_size)
        .fold(0, u64::saturating_add)
}

/// The job record for an incoming migration; `(created, replaced)`: the
/// domain is new here, or the definition it had.
fn incoming_job(
    agent: &Agent,
    req: &Incoming,
    ctx: &ConnContext,
    (created, replaced): (bool, Option<DomainDefinition>),
    vm: Option<Arc<crate::running::RunningVm>>,
    previous: settings::Previous,
) -> IncomingJob {
    IncomingJob {
        ident: JobIdentity {
            id: req.job_id.clone(),
            domain: req.definition.name.to_string(),
            role: Role::Destination,
            source: req.source.clone(),
            destination: agent.uri.clone(),
            flags: req.flags.clone(),
            started_at_ms: unix_ms(),
            peer: ctx.caller.name().map(str::to_string),
        },
        started: Instant::now(),
        connection: ctx.id,
        prepared_by: ctx.caller.name().map(str::to_string),
        created_domain: created,
        disk_bytes: disk_bytes(&req.storage),
        previous,
        vm,
        phase: Mutex::new(Phase::Prepare),
        definition: req.definition.clone(),
        replaced_definition: replaced,
        reattached: false,
        created_images: Vec::new(),
        postcopy_resume: Default::default(),
    }
}
