//! The source's Perform phase: `migrate`, then watch and steer it to the
//! end.
//!
//! Watching polls `query-migrate`; QEMU's `MIGRATION` events and the
//! `MIGRATION_PASS` event of every dirty-bitmap sync wake the loop early,
//! so each pass is seen right after its sync. At every new pass
//! (`steer`):
//!
//! - with `--converge adaptive`, the controller ([`converge::decide`])
//!   reads the pass and may change the vCPU throttle, raise the downtime
//!   limit or ask for post-copy;
//! - otherwise, a stall (no new per-pass low for three passes) escalates
//!   by policy: raise the downtime limit to `--max-downtime`, then switch
//!   to post-copy if `--allow-postcopy`.
//!
//! While a host throttle above 99 % is on, a vCPU may wait most of a second
//! for CPU time, and QEMU stops the vCPUs at switchover with the clock of
//! the downtime running. So the watcher holds QEMU's switchover back (a
//! 1 ms downtime limit) and switches over itself (`switchover`): at the
//! sync that leaves little enough, it asks QEMU to `stop` the guest, gives
//! the vCPU threads CPU time at once so they stop promptly, and restores
//! the downtime limit so QEMU completes. The downtime reported then runs
//! from that `stop`.
//!
//! At `--timeout` the timeout action runs (abort, post-copy, suspend:
//! `ending`). A cancel sends `migrate_cancel` and the loop keeps
//! watching: a late cancel can still end in `completed`, and only QEMU's
//! final state says what happened. Whatever the ending, the vCPU throttle
//! is released the moment QEMU reports it, before anything else. Every
//! action is timestamped in [`Progress::actions`].
//!
//! - `mod`: the options, the outcome and the loop.
//! - `watch`: the loop's state and its bookkeeping.
//! - `preflight`: what the first pass's measurements and probes find.
//! - `steer`: what happens at a dirty-bitmap sync.
//! - `switchover`: holding QEMU's switchover and doing it ourselves.
//! - `disks`: completing the disks' mirrors at switchover.
//! - `ending`: cancel, the timeout action, the end of the job.

mod disks;
mod ending;
mod preflight;
mod steer;
mod switchover;
mod watch;

use std::time::Duration;

use protocol::job::{JobStats, Sample, TimedAction};
use protocol::TimeoutAction;
use qmp::commands::migration::{Migrate, MigrationStatus, QueryMigrate};
use qmp::{Client, EventKind};
use tokio::sync::{mpsc, oneshot, watch as channel};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use types::{Bandwidth, Throttle};

use crate::job::stats_from_qemu;
use crate::storage::source::Mirrors;
use crate::vcpu_throttle::VcpuThrottle;
use watch::Watch;

pub use ending::CancelReason;

/// A new bandwidth or downtime limit for the running job
/// (`migrate-setspeed`, `migrate-setmaxdowntime`). It goes through the
/// watcher rather than straight to QEMU: the controller plans with both,
/// and while the switchover is held QEMU's downtime limit is not the
/// user's.
#[derive(Debug)]
pub struct Retune {
    /// The new bandwidth cap, if it changes.
    pub bandwidth: Option<Bandwidth>,
    /// The new downtime limit, if it changes.
    pub downtime: Option<Duration>,
    /// Told once the change is applied, or why QEMU refused it.
    pub done: oneshot::Sender<Result<(), RetuneError>>,
}

/// Why a mid-job limit was not applied.
#[derive(Debug, thiserror::Error)]
pub enum RetuneError {
    /// QEMU refused the bandwidth cap.
    #[error("QEMU refused the bandwidth")]
    Bandwidth(#[source] qmp::Error),
    /// QEMU refused the downtime limit.
    #[error("QEMU refused the downtime limit")]
    Downtime,
}

/// How to watch a migration.
#[derive(Debug, Clone)]
pub struct WatchOptions {
    /// How often to read `query-migrate` when no event wakes the loop.
    pub poll_interval: Duration,
    /// Run the timeout action if not completed after this long.
    pub timeout: Option<Duration>,
    /// What runs at the timeout.
    pub timeout_action: TimeoutAction,
    /// Switch to post-copy once the first pass over memory is done.
    pub postcopy_after_precopy: bool,
    /// How long to wait for QEMU to settle after `migrate_cancel`.
    pub cancel_grace: Duration,
    /// The adaptive controller's policy; `None` for plain or QEMU's
    /// convergence.
    pub controller: Option<converge::Policy>,
    /// Downtime limit in force at the start.
    pub downtime: Duration,
    /// Ceiling of the downtime ramp.
    pub max_downtime: Option<Duration>,
    /// Post-copy is enabled and the policy may switch to it.
    pub allow_postcopy: bool,
    /// The bandwidth cap, if any.
    pub bandwidth_cap: Option<Bandwidth>,
    /// Post-copy is enabled with no cap of its own, so the bandwidth cap
    /// holds in post-copy too, and a new cap must be set for it as well:
    /// QEMU applies `max-bandwidth` only before post-copy, and
    /// `max-postcopy-bandwidth` only in it.
    pub postcopy_follows_cap: bool,
    /// The path's own speed, when the host says it (`livemigd --link`):
    /// what the final stop-and-copy gets, uncapped.
    pub path_bandwidth: Option<Bandwidth>,
    /// Measure the dirty rate (`calc-dirty-rate`) while the first pass runs.
    pub preflight: bool,
    /// Predict the job's time once the pre-flight is in, for this
    /// convergence mode with this policy (on a capped link), to be set
    /// against the outcome.
    pub forecast: Option<(protocol::ConvergeMode, converge::Policy)>,
    /// Guest RAM: the most a working set can be.
    pub ram_bytes: u64,
    /// The part of it that holds anything, when known: what the first
    /// pass sends.
    pub ram_in_use_bytes: Option<u64>,
    /// The guest runs with a KVM dirty ring, so QEMU can give each vCPU's
    /// dirty rate.
    pub dirty_ring: bool,
    /// The stream is compressed (XBZRLE, zlib, zstd): memory leaves faster
    /// than the link carries bytes.
    pub compressed: bool,
    /// A measurement of the guest taken shortly before the job (an
    /// `estimate`, a drain's survey, the agent's own in the background):
    /// the controller starts from it rather than waiting seconds for the
    /// pre-flight's own.
    pub known: Option<Known>,
}

/// A recent dirty-rate measurement of the guest.
#[derive(Debug, Clone)]
pub struct Known {
    /// Its windows.
    pub samples: Vec<converge::estimate::Sample>,
    /// How old it was when the job began.
    pub age: Duration,
}

impl Default for WatchOptions {
    fn default() -> Self {
        WatchOptions {
            poll_interval: Duration::from_millis(250),
            timeout: None,
            timeout_action: TimeoutAction::Abort,
            postcopy_after_precopy: false,
            postcopy_follows_cap: false,
            cancel_grace: Duration::from_secs(30),
            controller: None,
            downtime: Duration::from_millis(crate::settings::DEFAULT_DOWNTIME_MS),
            max_downtime: None,
            allow_postcopy: false,
            bandwidth_cap: None,
            path_bandwidth: None,
            preflight: false,
            forecast: None,
            ram_bytes: 0,
            ram_in_use_bytes: None,
            dirty_ring: false,
            compressed: false,
            known: None,
        }
    }
}

/// Why the migration failed, as far as the source QEMU is concerned.
#[derive(Debug, thiserror::Error)]
pub enum PerformError {
    /// `migrate` itself was refused.
    #[error("QEMU refused to start the migration")]
    Refused(#[source] qmp::Error),
    /// The monitor stopped answering.
    #[error("lost contact with the source QEMU")]
    LostQemu(#[source] qmp::Error),
    /// QEMU reported the migration failed, saying why if it did.
    #[error("{0}")]
    Qemu(String),
    /// A cancel that QEMU did not finish.
    #[error("QEMU did not finish cancelling within {0:?}")]
    CancelStuck(Duration),
    /// The memory arrived but a disk's copy did not complete.
    #[error("the disks' copy did not complete")]
    Storage(#[source] crate::storage::StorageError),
}

/// How the Perform phase ended.
#[derive(Debug)]
pub enum Outcome {
    /// QEMU switched over; the source is paused (`postmigrate`).
    Completed {
        /// QEMU's final figures.
        stats: JobStats,
    },
    /// QEMU gave up; the source guest still has its memory.
    Failed {
        /// Why.
        error: PerformError,
        /// QEMU's last figures.
        stats: JobStats,
    },
    /// Cancelled at our request.
    Cancelled {
        /// Who asked.
        reason: CancelReason,
        /// QEMU's last figures.
        stats: JobStats,
    },
}

/// Live figures published while watching.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Progress {
    /// QEMU's latest figures.
    pub stats: JobStats,
    /// Highest throttle so far (QEMU's or ours).
    pub max_throttle: Throttle,
    /// Throttle in force now.
    pub throttle: Throttle,
    /// The job switched to post-copy.
    pub postcopy_started: bool,
    /// The guest was paused by the timeout action.
    pub suspended: bool,
    /// The timeline so far.
    pub actions: Vec<TimedAction>,
    /// One sample per poll.
    pub samples: Vec<Sample>,
    /// The job's bandwidth cap in force (`None`: uncapped).
    pub bandwidth_limit: Option<Bandwidth>,
    /// The job's downtime limit in force (the user's, not the 1 ms of a
    /// held switchover).
    pub downtime_limit: Option<Duration>,
    /// When QEMU accepted `migrate` and began sending the memory.
    pub migrating_since: Option<tokio::time::Instant>,
    /// Where the job's timeline (samples, actions) starts: the disks'
    /// copy, when there is one; else QEMU's `migrate`.
    pub timeline_origin: Option<tokio::time::Instant>,
    /// What the controller predicted once it had measured the guest.
    pub prediction: Option<Prediction>,
}

impl Progress {
    /// Adds a sample of the figures and throttle in force, at `t_ms` on
    /// the job's timeline.
    pub fn sample_at(&mut self, t_ms: u64) {
        let sample = Sample::from_stats(t_ms, &self.stats, self.throttle.percent());
        self.samples.push(sample);
    }

    /// A throttle now in force: the current one, and the highest so far.
    pub fn throttle_applied(&mut self, to: Throttle) {
        self.throttle = to;
        if to > self.max_throttle {
            self.max_throttle = to;
        }
    }
}

/// A job's total time as predicted from the pre-flight measurement.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Prediction {
    /// For the model as measured, seconds.
    pub total_secs: f64,
    /// For the fastest writer the measurement allows (a lower-bound rate),
    /// seconds; `None` when the rate was measured, or that writer would not
    /// converge.
    pub worst_secs: Option<f64>,
}

/// What the watcher acts on besides QEMU's migration.
#[derive(Default)]
pub struct Levers<'a> {
    /// The mechanism the controller throttles with (adaptive jobs).
    pub throttle: Option<Box<dyn VcpuThrottle>>,
    /// The disks' mirrors, completed at switchover.
    pub mirrors: Option<&'a Mirrors>,
}

impl std::fmt::Debug for Levers<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Levers")
            .field("throttle", &self.throttle.as_ref().map(|t| t.kind()))
            .field("mirrors", &self.mirrors)
            .finish()
    }
}

/// Starts the migration to `uri` and watches it until QEMU finishes it.
pub async fn run(
    qmp: &Client,
    uri: &str,
    options: &WatchOptions,
    cancel: &CancellationToken,
    progress: &channel::Sender<Progress>,
    levers: Levers<'_>,
    mut retunes: mpsc::Receiver<Retune>,
) -> Outcome {
    let no_mirrors = Mirrors::default();
    let mirrors = levers.mirrors.unwrap_or(&no_mirrors);
    let throttle = levers.throttle;
    let mut events = qmp.events();
    if let Err(e) = qmp
        .execute(&Migrate {
            uri: uri.to_string(),
            resume: None,
        })
        .await
    {
        return Outcome::Failed {
            error: PerformError::Refused(e),
            stats: JobStats::default(),
        };
    }
    progress.send_modify(|p| p.migrating_since = Some(tokio::time::Instant::now()));
    // What the job measured before (the disks' mirrors) carries over.
    let mut last = progress.borrow().stats.clone();
    let mut w = Watch::new(qmp, options, progress, throttle);
    w.take_known().await;

    loop {
        w.take_preflight().await;
        let (stats, status) = match qmp.execute(&QueryMigrate).await {
            Ok(info) => {
                let stats = stats_from_qemu(&info).merged_over(&last);
                if let Some(status) = info.status.filter(|s| s.is_finished()) {
                    return w.end(status, info.error_desc, stats).await;
                }
                (stats, info.status)
            }
            Err(e) => {
                w.release().await;
                return Outcome::Failed {
                    error: PerformError::LostQemu(e),
                    stats: last,
                };
            }
        };
        let stats = w.with_disks(stats, mirrors).await;
        w.publish(&stats);
        if status == Some(MigrationStatus::PreSwitchover) {
            w.before_switchover(mirrors).await;
        }
        if status.is_some_and(MigrationStatus::is_postcopy) {
            progress.send_modify(|p| p.postcopy_started = true);
        }
        last = stats.clone();

        w.at_poll(&stats).await;
        if w.cancelling() {
            if w.cancel_overdue() {
                w.release().await;
                return Outcome::Failed {
                    error: PerformError::CancelStuck(options.cancel_grace),
                    stats: last,
                };
            }
        } else if cancel.is_cancelled() && !w.cancel_refused {
            w.cancel(CancelReason::User, "cancelled by domjobabort".into())
                .await;
        } else {
            w.check_timeout().await;
        }

        wait(&mut w, cancel, &mut retunes, &mut events).await;
    }
}

/// Sleeps until the next poll, a QEMU event that ends a pass or the job, a
/// cancel, or a mid-job limit (applied on the spot).
async fn wait(
    w: &mut Watch<'_>,
    cancel: &CancellationToken,
    retunes: &mut mpsc::Receiver<Retune>,
    events: &mut tokio::sync::broadcast::Receiver<qmp::Event>,
) {
    let sleep = tokio::time::sleep(w.options.poll_interval);
    tokio::pin!(sleep);
    // Once a cancel is under way (or was turned down), the token says
    // nothing new.
    let cancel_pending = !w.cancelling() && !w.cancel_refused;
    loop {
        tokio::select! {
            _ = &mut sleep => return,
            _ = cancel.cancelled(), if cancel_pending => return,
            Some(retune) = retunes.recv() => {
                let result = w.retune(retune.bandwidth, retune.downtime).await;
                let _ = retune.done.send(result);
            }
            event = events.recv() => match event {
                Ok(e) => match e.kind() {
                    EventKind::Migration { status } if status.is_finished() => return,
                    EventKind::Migration {
                        status: MigrationStatus::PreSwitchover,
                    } => return,
                    EventKind::MigrationPass { .. } => return,
                    _ => {}
                },
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
        }
    }
}

/// QEMU announces `completed` a moment before it fills in total time and
/// downtime (both read 0 until then); re-read until they are set.
async fn settled_stats(qmp: &Client, mut stats: JobStats) -> JobStats {
    for _ in 0..40 {
        if stats.total_time_ms.unwrap_or(0) > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
        match qmp.execute(&QueryMigrate).await {
            Ok(info) => stats = stats_from_qemu(&info).merged_over(&stats),
            Err(_) => break,
        }
    }
    stats
}

/// Milliseconds since `started`, for the timeline.
fn ms_since(started: Instant) -> u64 {
    started.elapsed().as_millis() as u64
}
