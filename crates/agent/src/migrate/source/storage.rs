//! The source's part in copying disks: what to ask the destination for,
//! and the mirrors that must be in sync before the memory copy starts.

use domain::qemu::argv::drive_id;
use migration::storage::source::{MirrorEvent, MirrorPlan, Mirrors};
use migration::stream_tls::TlsPeer;
use migration::vcpu_throttle::VcpuThrottle;
use protocol::job::{ActionKind, TimedAction};
use protocol::migrate::StorageCopy;
use qmp::commands::block::{CopyMode, MirrorSync, QueryBlock};
use types::Throttle;

use super::run::Run;

/// Why the disks could not be copied.
#[derive(Debug, thiserror::Error)]
pub(super) enum DiskCopyError {
    /// QEMU would not list its disks.
    #[error("cannot query the guest's disks")]
    Query(#[source] qmp::Error),
    /// A disk to copy is not among QEMU's.
    #[error("QEMU has no disk {0}")]
    NoDisk(String),
    /// The destination did not answer Prepare with an NBD port.
    #[error("the destination offered no NBD server for the disks")]
    NoNbdServer,
    /// The memory stream is not TCP, so there is no host for NBD.
    #[error("disks are copied only over tcp:, not {0}")]
    NotTcp(String),
    /// A mirror failed, or the copy did not converge.
    #[error(transparent)]
    Mirrors(#[from] migration::storage::StorageError),
}

impl Run {
    /// The disks this job copies, as the destination must create them:
    /// their size (and, with `--copy-storage-inc`, the backing file) as
    /// this QEMU has them open.
    pub(super) async fn storage_copies(
        &self,
        qmp: &qmp::Client,
    ) -> Result<Vec<StorageCopy>, DiskCopyError> {
        if self.storage.is_empty() {
            return Ok(Vec::new());
        }
        let blocks = qmp
            .execute(&QueryBlock)
            .await
            .map_err(DiskCopyError::Query)?;
        let incremental = self
            .job
            .ident
            .flags
            .storage()
            .copy()
            .is_some_and(|c| c.incremental);
        self.storage
            .iter()
            .map(|target| {
                let image = blocks
                    .iter()
                    .find(|b| b.device == drive_id(target))
                    .and_then(|b| b.inserted.as_ref())
                    .map(|i| &i.image)
                    .ok_or_else(|| DiskCopyError::NoDisk(target.clone()))?;
                // Only the top image moves; one without a backing file is
                // all top, and is copied whole.
                let backing = if incremental {
                    image
                        .full_backing_filename
                        .clone()
                        .or_else(|| image.backing_filename.clone())
                        .map(|file| {
                            let format = image
                                .backing_filename_format
                                .clone()
                                .unwrap_or_else(|| "raw".into());
                            (file, format)
                        })
                } else {
                    None
                };
                Ok(StorageCopy {
                    target: target.clone(),
                    virtual_size: image.virtual_size,
                    backing,
                })
            })
            .collect()
    }

    /// Mirrors the copied disks into the destination's NBD server (on
    /// `nbd_host`, else the data URI's host) and waits until each is in
    /// sync.
    pub(super) async fn mirror_disks(
        &self,
        qmp: &qmp::Client,
        data_uri: &str,
        nbd_port: Option<u16>,
        nbd_host: Option<&str>,
        throttle: Option<&mut Box<dyn VcpuThrottle>>,
    ) -> Result<Mirrors, DiskCopyError> {
        if self.storage.is_empty() {
            return Ok(Mirrors::default());
        }
        let port = nbd_port.ok_or(DiskCopyError::NoNbdServer)?;
        let host = match nbd_host {
            Some(host) => host.to_string(),
            None => migration::uri::parse_data_uri(data_uri)
                .ok()
                .and_then(|uri| match uri {
                    migration::uri::DataUri::Tcp { host, .. } => Some(host),
                    _ => None,
                })
                .ok_or_else(|| DiskCopyError::NotTcp(data_uri.to_string()))?,
        };
        let flags = &self.job.ident.flags;
        let plan = MirrorPlan {
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port,
            sync: if flags.storage().copy().is_some_and(|c| c.incremental) {
                MirrorSync::Top
            } else {
                MirrorSync::Full
            },
            copy_mode: if flags.storage().copy().is_some_and(|c| c.synchronous_writes) {
                CopyMode::WriteBlocking
            } else {
                CopyMode::Background
            },
            speed: flags.bandwidth().map(|b| b.bytes_per_sec()),
            tls_hostname: self.tls.as_ref().and_then(|t| match &t.peer {
                TlsPeer::Destination { hostname } => Some(hostname.clone()),
                TlsPeer::Source { .. } => None,
            }),
        };
        let mirrors = Mirrors::start(qmp, &plan, &self.storage).await?;
        tracing::info!(disks = ?self.storage, port, "mirroring the disks");
        let timeout = flags.timeout();
        // The job's timeline starts with the disks' copy.
        let origin = tokio::time::Instant::now();
        self.progress
            .send_modify(|progress| progress.timeline_origin = Some(origin));
        let ready = self
            .watched(mirrors.wait_ready(
                qmp,
                &self.job.cancel,
                timeout,
                self.agent.config.timeouts.disk_progress,
                throttle,
                |event| self.on_mirror_event(origin, event),
            ))
            .await;
        match ready {
            Ok(()) => {
                tracing::info!("the disks are in sync; copying memory");
                if plan.copy_mode == CopyMode::Background {
                    self.block_writes_if_possible(qmp, &mirrors).await;
                }
                Ok(mirrors)
            }
            Err(e) => {
                mirrors.abandon(qmp).await;
                Err(e.into())
            }
        }
    }

    /// Publishes what waiting for the mirrors saw: the disks' figures as
    /// job statistics and samples, a throttle change as a timeline action.
    fn on_mirror_event(&self, origin: tokio::time::Instant, event: MirrorEvent) {
        let t_ms = origin.elapsed().as_millis() as u64;
        match event {
            MirrorEvent::Progress {
                progress,
                dirty_rate,
            } => self.progress.send_modify(|p| {
                p.stats.disk_total_bytes = Some(progress.total);
                p.stats.disk_processed_bytes = Some(progress.processed);
                p.stats.disk_dirty_rate_bytes_s = dirty_rate.map(|r| r as u64);
                p.sample_at(t_ms);
            }),
            MirrorEvent::Throttle {
                throttle,
                why,
                applied,
            } => {
                let to = Throttle::from_fraction(throttle);
                let (action, detail) = match (&applied, to.is_on()) {
                    (Ok(()), true) => (ActionKind::Throttle, why),
                    (Ok(()), false) => (ActionKind::Release, why),
                    (Err(e), _) => (
                        ActionKind::Throttle,
                        format!("host throttle failed: {e}: {why}"),
                    ),
                };
                tracing::info!(t_ms, %action, throttle = to.percent(), %detail, "job action");
                self.progress.send_modify(|p| {
                    if applied.is_ok() {
                        p.throttle_applied(to);
                    }
                    p.actions.push(TimedAction {
                        t_ms,
                        action,
                        value: Some(to.percent()),
                        detail,
                    });
                });
            }
        }
    }

    /// Mirrors in sync copy every write from now on where QEMU can switch
    /// them (8.2+); older QEMUs keep copying in the background, and the
    /// rest is sent at switchover.
    async fn block_writes_if_possible(&self, qmp: &qmp::Client, mirrors: &Mirrors) {
        let can = match self.agent.binary().await {
            Ok(binary) => binary.commands.contains("block-job-change"),
            Err(_) => false,
        };
        if !can {
            tracing::debug!("QEMU cannot change a mirror's copy mode; mirroring in the background");
            return;
        }
        match mirrors.block_writes(qmp).await {
            Ok(()) => tracing::info!("the mirrors copy every write from now on"),
            Err(e) => tracing::warn!(
                error = %types::error_chain(&e),
                "the mirrors stay in the background"
            ),
        }
    }
}
