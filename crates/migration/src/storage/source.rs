//! The source's half of a disk copy: a mirror per disk into the
//! destination's NBD exports, ready before the memory copy starts,
//! completed once the guest is paused at switchover.

use std::time::Duration;

use domain::qemu::argv::{disk_node, TLS_CLIENT_ID};
use qmp::commands::block::{
    BlockJobCancel, BlockJobChangeMirror, BlockJobInfo, BlockdevAddNbd, BlockdevDel,
    BlockdevMirror, CopyMode, InetAddress, JobDismiss, MirrorSync, QueryBlockJobs,
};
use qmp::Client;

use super::{export_name, StorageError};

mod ready;

/// How often the mirrors are looked at.
const POLL: Duration = Duration::from_millis(200);
/// The first look again at mirrors being ended.
const FIRST_END_POLL: Duration = Duration::from_millis(2);
/// How long completing or abandoning a mirror may take.
const END_TIMEOUT: Duration = Duration::from_secs(60);

/// The mirror's buffer for a copy capped at `speed` bytes/s: a quarter
/// second's worth. QEMU's rate limit lets a whole buffer through, then
/// sleeps until the cap is paid back; with its default 16 MiB buffer a
/// 1 MiB/s copy would go 16 s at a time without a look at the guest's new
/// writes or a progress update, and the job could not tell a copy that
/// gains from one that does not.
fn buffer_for(speed: u64) -> u64 {
    (speed / 4).clamp(256 << 10, 16 << 20)
}

/// What the block job mirroring a disk is called before the disk's name.
const MIRROR_PREFIX: &str = "livemig-mirror-";

/// The block job that mirrors the disk the guest calls `target`.
pub fn mirror_job_id(target: &str) -> String {
    format!("{MIRROR_PREFIX}{target}")
}

/// How a copy is made.
#[derive(Debug, Clone)]
pub struct MirrorPlan {
    /// The destination's NBD server.
    pub host: String,
    /// Its port.
    pub port: u16,
    /// The whole chain, or the top image only.
    pub sync: MirrorSync,
    /// When guest writes are copied.
    pub copy_mode: CopyMode,
    /// With `--tls`: the name the destination's certificate must carry.
    pub tls_hostname: Option<String>,
    /// Copy rate cap per disk, bytes/s (the job's `--bandwidth`, as
    /// libvirt applies it to the disks too).
    pub speed: Option<u64>,
}

/// One disk being copied.
#[derive(Debug, Clone)]
struct Mirror {
    target: String,
    job: String,
    node: String,
}

impl Mirror {
    fn of(target: &str) -> Mirror {
        Mirror {
            target: target.to_string(),
            job: mirror_job_id(target),
            node: format!("livemig-nbd-{target}"),
        }
    }
}

/// The running mirrors of a migration.
#[derive(Debug, Default)]
pub struct Mirrors {
    mirrors: Vec<Mirror>,
    /// Completed at switchover: a second completion has nothing to do.
    completed: std::sync::atomic::AtomicBool,
}

/// What waiting for the mirrors saw.
#[derive(Debug, Clone, PartialEq)]
pub enum MirrorEvent {
    /// A reading of the copy.
    Progress {
        /// Its bytes.
        progress: CopyProgress,
        /// Bytes/s the guest's writes add to it, once measured.
        dirty_rate: Option<f64>,
    },
    /// The vCPU throttle was changed for the disks' sake.
    Throttle {
        /// The new throttle, 0..1.
        throttle: f64,
        /// Why.
        why: String,
        /// Whether the mechanism took it, and why not.
        applied: Result<(), String>,
    },
}

/// Bytes of the copy, summed over the disks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyProgress {
    /// To copy in all (grows as the guest writes).
    pub total: u64,
    /// Copied.
    pub processed: u64,
}

impl Mirrors {
    /// Starts a mirror of each of `targets` into the destination's
    /// exports.
    ///
    /// # Errors
    /// [`StorageError::Qemu`]; mirrors already started are abandoned.
    pub async fn start(
        qmp: &Client,
        plan: &MirrorPlan,
        targets: &[String],
    ) -> Result<Mirrors, StorageError> {
        // A copy whose agent died midway leaves its jobs and nodes, under
        // the names this one needs.
        Mirrors::sweep(qmp).await;
        let mut started = Mirrors::default();
        for target in targets {
            let mirror = Mirror::of(target);
            let add = BlockdevAddNbd {
                driver: "nbd",
                node_name: mirror.node.clone(),
                server: InetAddress::new(&plan.host, plan.port),
                export: export_name(target),
                tls_creds: plan
                    .tls_hostname
                    .as_ref()
                    .map(|_| TLS_CLIENT_ID.to_string()),
                tls_hostname: plan.tls_hostname.clone(),
            };
            if let Err(e) = qmp.execute(&add).await {
                started.abandon(qmp).await;
                return Err(StorageError::Qemu {
                    step: format!(
                        "cannot reach the destination's NBD export of {target} at {}:{}",
                        plan.host, plan.port
                    ),
                    source: e,
                });
            }
            let run = BlockdevMirror {
                job_id: mirror.job.clone(),
                device: disk_node(target),
                target: mirror.node.clone(),
                sync: plan.sync,
                copy_mode: plan.copy_mode,
                auto_dismiss: false,
                speed: plan.speed,
                buf_size: plan.speed.map(buffer_for),
            };
            if let Err(e) = qmp.execute(&run).await {
                let _ = qmp
                    .execute(&BlockdevDel {
                        node_name: mirror.node.clone(),
                    })
                    .await;
                started.abandon(qmp).await;
                return Err(StorageError::Qemu {
                    step: format!("cannot start the mirror of {target}"),
                    source: e,
                });
            }
            started.mirrors.push(mirror);
        }
        Ok(started)
    }

    /// Abandons every mirror of ours QEMU still has, and its NBD node:
    /// what an agent that died during a copy left behind (the guest runs
    /// on its own disks; the destination's copy is gone). Returns how many.
    pub async fn sweep(qmp: &Client) -> usize {
        let Ok(jobs) = qmp.execute(&QueryBlockJobs).await else {
            return 0;
        };
        let left = Mirrors {
            mirrors: jobs
                .iter()
                .filter_map(|j| j.device.strip_prefix(MIRROR_PREFIX))
                .map(Mirror::of)
                .collect(),
            ..Default::default()
        };
        if !left.is_empty() {
            tracing::warn!(
                mirrors = left.mirrors.len(),
                "abandoning disk mirrors left by an earlier job"
            );
            left.abandon(qmp).await;
        }
        left.mirrors.len()
    }

    /// The mirrors were completed (at switchover).
    pub fn is_completed(&self) -> bool {
        self.completed.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// True if there is nothing to copy.
    pub fn is_empty(&self) -> bool {
        self.mirrors.is_empty()
    }

    async fn jobs(&self, qmp: &Client) -> Result<Vec<BlockJobInfo>, StorageError> {
        let all = qmp
            .execute(&QueryBlockJobs)
            .await
            .map_err(StorageError::qemu("cannot query the block jobs"))?;
        Ok(all
            .into_iter()
            .filter(|j| self.mirrors.iter().any(|m| m.job == j.device))
            .collect())
    }

    /// The copy's progress.
    ///
    /// # Errors
    /// [`StorageError::Qemu`].
    pub async fn progress(&self, qmp: &Client) -> Result<CopyProgress, StorageError> {
        let jobs = self.jobs(qmp).await?;
        Ok(CopyProgress {
            total: jobs.iter().map(|j| j.len).sum(),
            processed: jobs.iter().map(|j| j.offset).sum(),
        })
    }

    /// Once in sync, makes every mirror copy each guest write before the
    /// guest sees it complete (`block-job-change`, QEMU 8.2+): the guest's
    /// writes can then never outrun the copy while the memory moves, and
    /// the switchover has no disk backlog to send.
    ///
    /// # Errors
    /// [`StorageError::Qemu`] for the first mirror QEMU refused; the ones
    /// before it stay switched, which is harmless (they only copy sooner).
    pub async fn block_writes(&self, qmp: &Client) -> Result<(), StorageError> {
        for mirror in &self.mirrors {
            qmp.execute(&BlockJobChangeMirror::write_blocking(&mirror.job))
                .await
                .map_err(StorageError::qemu(format!(
                    "cannot make the mirror of {} write-blocking",
                    mirror.target
                )))?;
        }
        Ok(())
    }

    /// With the guest paused: completes every mirror, leaving each
    /// destination image an exact copy, and disconnects from the NBD
    /// server. Once only: a second call has nothing to do.
    ///
    /// # Errors
    /// [`StorageError`] if a mirror fails to complete: the destination's
    /// copy cannot be trusted.
    pub async fn complete(&self, qmp: &Client) -> Result<(), StorageError> {
        if self
            .completed
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            return Ok(());
        }
        let jobs = self.jobs(qmp).await?;
        if let Err(e) = self.check_running(&jobs) {
            self.abandon(qmp).await;
            return Err(e);
        }
        for mirror in &self.mirrors {
            let cancel = BlockJobCancel {
                device: mirror.job.clone(),
                force: false,
            };
            if let Err(e) = qmp.execute(&cancel).await {
                self.abandon(qmp).await;
                return Err(StorageError::Qemu {
                    step: format!("cannot complete the mirror of {}", mirror.target),
                    source: e,
                });
            }
        }
        let ended = self.wait_concluded(qmp).await;
        self.remove(qmp).await;
        for (mirror, job) in self.mirrors.iter().zip(ended?) {
            if let Some(message) = job.and_then(|j| j.error) {
                return Err(StorageError::MirrorFailed {
                    target: mirror.target.clone(),
                    message,
                });
            }
        }
        Ok(())
    }

    /// Abandons every mirror (the migration failed): the source's disks
    /// are untouched, the destination's copies are to be thrown away.
    pub async fn abandon(&self, qmp: &Client) {
        for mirror in &self.mirrors {
            let _ = qmp
                .execute(&BlockJobCancel {
                    device: mirror.job.clone(),
                    force: true,
                })
                .await;
        }
        if let Err(e) = self.wait_concluded(qmp).await {
            tracing::warn!(error = %e, "mirrors did not end");
        }
        self.remove(qmp).await;
    }

    /// Waits until every mirror has concluded; each one's last state.
    async fn wait_concluded(
        &self,
        qmp: &Client,
    ) -> Result<Vec<Option<BlockJobInfo>>, StorageError> {
        let deadline = tokio::time::Instant::now() + END_TIMEOUT;
        // At switchover the guest is paused while this waits, and a ready
        // mirror concludes within milliseconds: look again soon, then back
        // off (a fixed 200 ms poll added up to 200 ms to the downtime).
        let mut pause = FIRST_END_POLL;
        loop {
            let jobs = self.jobs(qmp).await?;
            let states: Vec<Option<BlockJobInfo>> = self
                .mirrors
                .iter()
                .map(|m| jobs.iter().find(|j| j.device == m.job).cloned())
                .collect();
            let done = states.iter().all(|j| {
                j.as_ref()
                    .is_none_or(|j| j.status.as_deref() == Some("concluded"))
            });
            if done {
                return Ok(states);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(StorageError::Timeout(END_TIMEOUT));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(POLL);
        }
    }

    /// Dismisses the concluded jobs and removes the NBD client nodes.
    async fn remove(&self, qmp: &Client) {
        for mirror in &self.mirrors {
            let _ = qmp
                .execute(&JobDismiss {
                    id: mirror.job.clone(),
                })
                .await;
            if let Err(e) = qmp
                .execute(&BlockdevDel {
                    node_name: mirror.node.clone(),
                })
                .await
            {
                tracing::debug!(node = %mirror.node, error = %e, "NBD node not removed");
            }
        }
    }
}
