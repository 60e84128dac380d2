//! Waiting for the mirrors to be ready: the copy's progress, the guest's
//! writes, and the pace the adaptive controller keeps on them.

use std::time::Duration;

use domain::qemu::argv::drive_id;
use qmp::commands::block::{BlockJobInfo, QueryBlockstats};
use qmp::Client;
use tokio_util::sync::CancellationToken;

use super::super::pace::DiskPace;
use super::super::progress::CopyWatch;
use super::super::StorageError;
use super::{CopyProgress, MirrorEvent, Mirrors, POLL};
use crate::vcpu_throttle::VcpuThrottle;

impl Mirrors {
    /// Waits until every disk's bulk copy is done and its writes are being
    /// mirrored; reports progress, the disks' dirty rate and any throttle
    /// change through `on_event`. With a `throttle` that acts before the
    /// migration (adaptive jobs on a host that throttles from outside), a
    /// copy the guest's writes outrun slows the vCPUs ([`crate::storage::pace`]);
    /// the throttle is lifted again once the mirrors are in sync.
    ///
    /// # Errors
    /// [`StorageError::MirrorFailed`] or `MirrorGone` if a mirror ends,
    /// [`StorageError::Cancelled`], [`StorageError::Timeout`], and
    /// [`StorageError::NotConverging`] once the bytes left have had no new
    /// low for `no_progress` (the guest writes as fast as the copy sends,
    /// even under the highest throttle). The throttle is left as it was:
    /// the caller releases it.
    pub async fn wait_ready(
        &self,
        qmp: &Client,
        cancel: &CancellationToken,
        timeout: Option<Duration>,
        no_progress: Duration,
        throttle: Option<&mut Box<dyn VcpuThrottle>>,
        mut on_event: impl FnMut(MirrorEvent),
    ) -> Result<(), StorageError> {
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let mut watch = CopyWatch::new(no_progress);
        let mut throttle = throttle.filter(|t| t.acts_before_migration());
        let mut pace = DiskPace::new(throttle.as_ref().map_or(0.0, |t| t.max()));
        let mut dirty_rate = None;
        let mut guest_writes = None;
        let mut first_written = None;
        loop {
            let jobs = self.jobs(qmp).await?;
            self.check_running(&jobs)?;
            let progress = CopyProgress {
                total: jobs.iter().map(|j| j.len).sum(),
                processed: jobs.iter().map(|j| j.offset).sum(),
            };
            let written = self.written(qmp).await;
            let now = tokio::time::Instant::now();
            let rates = pace.observe(now, progress.total, progress.processed, written);
            if let Some(rates) = rates {
                dirty_rate = Some(rates.dirty);
                guest_writes = rates.written.or(guest_writes);
            }
            on_event(MirrorEvent::Progress {
                progress,
                dirty_rate,
            });
            if jobs.len() == self.mirrors.len() && jobs.iter().all(|j| j.ready) {
                if pace.throttle() > 0.0 {
                    if let Some(throttle) = throttle.as_deref_mut() {
                        let applied = throttle.set(0.0).await.map_err(|e| types::error_chain(&e));
                        on_event(MirrorEvent::Throttle {
                            throttle: 0.0,
                            why: "the disks are in sync".into(),
                            applied,
                        });
                    }
                }
                return Ok(());
            }
            if let (Some(rates), Some(throttle)) = (rates, throttle.as_deref_mut()) {
                if let Some(decision) = pace.decide(rates) {
                    let applied = throttle
                        .set(decision.throttle)
                        .await
                        .map_err(|e| types::error_chain(&e));
                    if applied.is_ok() {
                        pace.applied(decision.throttle);
                    }
                    on_event(MirrorEvent::Throttle {
                        throttle: decision.throttle,
                        why: decision.why,
                        applied,
                    });
                }
            }
            let (since, first) = *first_written.get_or_insert((now, written));
            if let Some(mut stop) = watch.observe(now, progress.total, progress.processed) {
                // The last window's rate, or the average so far.
                let secs = now.duration_since(since).as_secs_f64();
                stop.guest_write_rate = guest_writes.or_else(|| {
                    let bytes = written?.checked_sub(first?)?;
                    (secs > 0.0).then(|| bytes as f64 / secs)
                });
                return Err(StorageError::NotConverging(stop));
            }
            if let (Some(deadline), Some(timeout)) = (deadline, timeout) {
                if tokio::time::Instant::now() >= deadline {
                    return Err(StorageError::Timeout(timeout));
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return Err(StorageError::Cancelled),
                _ = tokio::time::sleep(POLL) => {}
            }
        }
    }

    /// Bytes the guest wrote to the copied disks since QEMU started, by
    /// QEMU's block counters; `None` if QEMU does not say.
    async fn written(&self, qmp: &Client) -> Option<u64> {
        let stats = qmp.execute(&QueryBlockstats).await.ok()?;
        self.mirrors
            .iter()
            .map(|m| {
                let drive = drive_id(&m.target);
                stats
                    .iter()
                    .find(|s| s.device == drive)
                    .map(|s| s.stats.wr_bytes)
            })
            .sum()
    }

    /// Every mirror still runs.
    pub(super) fn check_running(&self, jobs: &[BlockJobInfo]) -> Result<(), StorageError> {
        for mirror in &self.mirrors {
            match jobs.iter().find(|j| j.device == mirror.job) {
                None => return Err(StorageError::MirrorGone(mirror.target.clone())),
                Some(job) => {
                    if let Some(message) = &job.error {
                        return Err(StorageError::MirrorFailed {
                            target: mirror.target.clone(),
                            message: message.clone(),
                        });
                    }
                    if job.status.as_deref() == Some("concluded") {
                        return Err(StorageError::MirrorGone(mirror.target.clone()));
                    }
                }
            }
        }
        Ok(())
    }
}
