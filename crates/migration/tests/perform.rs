//! The Perform phase's state machine, driven by a scripted QEMU monitor:
//! each test plays one course of a migration in virtual time and checks
//! what the watcher asked of QEMU, what it published and how it ended.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use migration::perform::{
    self, CancelReason, Outcome, PerformError, Progress, Retune, WatchOptions,
};
use migration::storage::source::{MirrorPlan, Mirrors};
use migration::vcpu_throttle::{BoxFuture, CpuUse, ThrottleError, VcpuThrottle};
use protocol::job::ActionKind;
use protocol::TimeoutAction;
use qmp::commands::migration::MigrationStatus;
use qmp::scripted::ScriptedQemu;
use serde_json::json;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use types::Bandwidth;

const MIB: u64 = 1 << 20;

/// A running Perform phase and the handles a test drives it with.
struct Job {
    qemu: ScriptedQemu,
    cancel: CancellationToken,
    progress: watch::Receiver<Progress>,
    retune: mpsc::Sender<Retune>,
    task: JoinHandle<Outcome>,
}

impl Job {
    async fn start(options: WatchOptions, throttle: Option<Box<dyn VcpuThrottle>>) -> Job {
        let (client, qemu) = ScriptedQemu::start().await;
        Job::run(client, qemu, options, throttle, None).await
    }

    /// Perform on `client` (`qemu`'s monitor), copying `mirrors` if any.
    async fn run(
        client: qmp::Client,
        qemu: ScriptedQemu,
        options: WatchOptions,
        throttle: Option<Box<dyn VcpuThrottle>>,
        mirrors: Option<Mirrors>,
    ) -> Job {
        let cancel = CancellationToken::new();
        let (progress_tx, progress) = watch::channel(Progress::default());
        let (retune, retunes) = mpsc::channel(4);
        let token = cancel.clone();
        let task = tokio::spawn(async move {
            perform::run(
                &client,
                "tcp:127.0.0.1:49999",
                &options,
                &token,
                &progress_tx,
                perform::Levers {
                    throttle,
                    mirrors: mirrors.as_ref(),
                },
                retunes,
            )
            .await
        });
        let job = Job {
            qemu,
            cancel,
            progress,
            retune,
            task,
        };
        job.settle().await;
        job
    }

    /// Lets the watcher see what changed (a poll interval and a little).
    async fn settle(&self) {
        tokio::time::sleep(Duration::from_millis(60)).await;
    }

    /// One pass of `secs` that leaves `remaining`.
    async fn pass(&self, secs: f64, remaining: u64) {
        tokio::time::sleep(Duration::from_secs_f64(secs)).await;
        self.qemu.pass(remaining);
        self.settle().await;
    }

    async fn outcome(self) -> (Outcome, Progress, ScriptedQemu) {
        let outcome = tokio::time::timeout(Duration::from_secs(120), self.task)
            .await
            .expect("perform ends")
            .expect("perform does not panic");
        let progress = self.progress.borrow().clone();
        (outcome, progress, self.qemu)
    }

    fn actions(&self, kind: ActionKind) -> Vec<String> {
        self.progress
            .borrow()
            .actions
            .iter()
            .filter(|a| a.action == kind)
            .map(|a| a.detail.clone())
            .collect()
    }
}

fn options() -> WatchOptions {
    WatchOptions {
        poll_interval: Duration::from_millis(50),
        ..WatchOptions::default()
    }
}

/// The adaptive controller at its defaults, over a 64 MiB/s link.
fn adaptive() -> WatchOptions {
    adaptive_with(false)
}

/// As [`adaptive`], with post-copy allowed or not.
fn adaptive_with(allow_postcopy: bool) -> WatchOptions {
    adaptive_up_to(0.999, allow_postcopy)
}

/// As [`adaptive_with`], throttling at most `max_throttle`.
fn adaptive_up_to(max_throttle: f64, allow_postcopy: bool) -> WatchOptions {
    WatchOptions {
        controller: Some(migration::plan::controller_policy(
            None,
            max_throttle,
            Duration::from_millis(300),
            None,
            None,
            allow_postcopy,
        )),
        allow_postcopy,
        bandwidth_cap: Bandwidth::from_mib_s(64),
        ram_bytes: 512 * MIB,
        ..options()
    }
}

/// A throttle that records what it was asked.
#[derive(Clone, Default)]
struct FakeThrottle {
    log: Arc<Mutex<Vec<String>>>,
    slow_above: Option<f64>,
    /// The throttled vCPUs' CPU time so far, when the test tells it.
    cpu: Option<Arc<Mutex<Duration>>>,
}

impl FakeThrottle {
    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

impl VcpuThrottle for FakeThrottle {
    fn kind(&self) -> &'static str {
        "fake"
    }

    fn max(&self) -> f64 {
        0.999
    }

    fn set(&mut self, throttle: f64) -> BoxFuture<'_, Result<(), ThrottleError>> {
        self.log.lock().unwrap().push(format!("set {throttle:.3}"));
        Box::pin(async { Ok(()) })
    }

    fn release(&mut self) -> BoxFuture<'_, ()> {
        self.log.lock().unwrap().push("release".into());
        Box::pin(async {})
    }

    fn slow_to_stop(&self, throttle: f64) -> bool {
        self.slow_above.is_some_and(|above| throttle > above)
    }

    fn cpu_use(&self) -> Option<CpuUse> {
        Some(CpuUse {
            cpu: *self.cpu.as_ref()?.lock().unwrap(),
            min_slice: Duration::from_millis(1),
        })
    }
}

/// A job whose vCPUs are slow to stop at any throttle, after three 2 s
/// passes that each leave 256 MiB: throttled, and QEMU's switchover held.
async fn held_job() -> Job {
    let throttle = FakeThrottle {
        slow_above: Some(0.0),
        ..Default::default()
    };
    let job = Job::start(adaptive(), Some(Box::new(throttle))).await;
    for _ in 0..3 {
        job.pass(2.0, 256 * MIB).await;
    }
    assert!(!job.actions(ActionKind::Hold).is_empty(), "held");
    job
}

fn assert_not_throttled(job: &Job) {
    assert!(
        job.actions(ActionKind::Throttle).is_empty(),
        "{:?}",
        job.progress.borrow().actions
    );
}

/// The timeline says the hover was read as `passes` ("2 passes in 0.6 s").
fn assert_hover_read(job: &Job, passes: &str) {
    let measures = job.actions(ActionKind::Measure);
    assert!(measures.iter().any(|m| m.contains(passes)), "{measures:?}");
}

fn assert_throttled_once(job: &Job) {
    assert_eq!(
        job.actions(ActionKind::Throttle).len(),
        1,
        "{:?}",
        job.progress.borrow().actions
    );
}

#[tokio::test(start_paused = true)]
async fn a_migration_that_completes_reports_qemus_figures() {
    let job = Job::start(options(), None).await;
    job.pass(1.0, 64 * MIB).await;
    job.qemu.complete(1500, 25);

    let (outcome, progress, qemu) = job.outcome().await;

    let Outcome::Completed { stats } = outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(stats.total_time_ms, Some(1500));
    assert_eq!(stats.downtime_ms, Some(25));
    assert_eq!(qemu.calls("migrate")[0]["uri"], "tcp:127.0.0.1:49999");
    assert!(progress.samples.len() >= 2, "a sample per poll");
    assert!(qemu.calls("migrate_cancel").is_empty());
}

#[tokio::test(start_paused = true)]
async fn the_timeout_cancels_mid_pass_and_says_so() {
    let job = Job::start(
        WatchOptions {
            timeout: Some(Duration::from_secs(2)),
            ..options()
        },
        None,
    )
    .await;
    job.pass(1.0, 300 * MIB).await;

    let (outcome, progress, qemu) = job.outcome().await;

    assert!(
        matches!(outcome, Outcome::Cancelled { reason: CancelReason::Timeout(t), .. } if t == Duration::from_secs(2)),
        "{outcome:?}"
    );
    assert_eq!(qemu.calls("migrate_cancel").len(), 1);
    let cancel = progress
        .actions
        .iter()
        .find(|a| a.action == ActionKind::Cancel)
        .expect("the cancel is in the timeline");
    assert!(cancel.detail.contains("2s timeout"), "{}", cancel.detail);
    assert!(cancel.t_ms >= 2000);
}

#[tokio::test(start_paused = true)]
async fn a_cancel_that_races_completion_ends_completed() {
    let job = Job::start(options(), None).await;
    // QEMU had already switched over when the cancel arrived.
    job.qemu.on("migrate_cancel", |state, _| {
        state.status = Some(MigrationStatus::Completed);
        state.total_time_ms = Some(900);
        state.downtime_ms = Some(12);
        Some(Ok(json!({})))
    });
    job.cancel.cancel();

    let (outcome, _, qemu) = job.outcome().await;

    assert!(
        matches!(outcome, Outcome::Completed { .. }),
        "a late cancel must not lose a completed copy: {outcome:?}"
    );
    assert_eq!(qemu.calls("migrate_cancel").len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_cancel_during_postcopy_is_refused_once_and_the_copy_finishes() {
    let job = Job::start(options(), None).await;
    job.qemu.set_status(MigrationStatus::PostcopyActive);
    job.settle().await;
    job.cancel.cancel();
    job.settle().await;
    job.settle().await;
    let refused = job.actions(ActionKind::Cancel);
    job.qemu.complete(3000, 40);

    let (outcome, progress, qemu) = job.outcome().await;

    assert!(matches!(outcome, Outcome::Completed { .. }), "{outcome:?}");
    assert!(
        qemu.calls("migrate_cancel").is_empty(),
        "cancelling in post-copy would lose the guest"
    );
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert!(refused[0].contains("ignored during post-copy"));
    assert!(progress.postcopy_started);
}

#[tokio::test(start_paused = true)]
async fn a_failure_in_qemu_is_reported_with_qemus_reason() {
    let job = Job::start(options(), None).await;
    job.qemu.fail("Unable to write to socket: Broken pipe");

    let (outcome, _, _) = job.outcome().await;

    let Outcome::Failed { error, .. } = outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(error.to_string(), "Unable to write to socket: Broken pipe");
}

#[tokio::test(start_paused = true)]
async fn losing_the_monitor_fails_the_job_and_releases_the_throttle() {
    let throttle = FakeThrottle::default();
    let job = Job::start(options(), Some(Box::new(throttle.clone()))).await;
    job.qemu.disconnect();

    let (outcome, _, _) = job.outcome().await;

    assert!(
        matches!(&outcome, Outcome::Failed { error, .. } if error.to_string().contains("lost contact")),
        "{outcome:?}"
    );
    assert_eq!(throttle.log(), ["release"]);
}

#[tokio::test(start_paused = true)]
async fn a_cancel_qemu_never_finishes_gives_up_after_the_grace() {
    let job = Job::start(
        WatchOptions {
            cancel_grace: Duration::from_secs(5),
            ..options()
        },
        None,
    )
    .await;
    job.qemu.on("migrate_cancel", |_, _| Some(Ok(json!({}))));
    job.cancel.cancel();

    let (outcome, _, _) = job.outcome().await;

    assert!(
        matches!(&outcome, Outcome::Failed { error, .. } if error.to_string().contains("did not finish cancelling")),
        "{outcome:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn the_suspend_timeout_pauses_the_guest_and_lets_the_copy_finish() {
    let job = Job::start(
        WatchOptions {
            timeout: Some(Duration::from_secs(1)),
            timeout_action: TimeoutAction::Suspend,
            ..options()
        },
        None,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(job.progress.borrow().suspended);
    job.qemu.complete(1300, 100);

    let (outcome, progress, qemu) = job.outcome().await;

    assert!(matches!(outcome, Outcome::Completed { .. }), "{outcome:?}");
    assert_eq!(qemu.calls("stop").len(), 1);
    assert!(qemu.calls("migrate_cancel").is_empty());
    assert!(progress
        .actions
        .iter()
        .any(|a| a.action == ActionKind::Suspend));
}

#[tokio::test(start_paused = true)]
async fn the_postcopy_timeout_falls_back_to_a_cancel_when_qemu_refuses() {
    // Post-copy was not enabled on this QEMU: migrate-start-postcopy fails.
    let job = Job::start(
        WatchOptions {
            timeout: Some(Duration::from_secs(1)),
            timeout_action: TimeoutAction::Postcopy,
            ..options()
        },
        None,
    )
    .await;

    let (outcome, progress, qemu) = job.outcome().await;

    assert!(
        matches!(
            outcome,
            Outcome::Cancelled {
                reason: CancelReason::Timeout(_),
                ..
            }
        ),
        "{outcome:?}"
    );
    assert_eq!(qemu.calls("migrate-start-postcopy").len(), 1);
    let postcopy = progress
        .actions
        .iter()
        .find(|a| a.action == ActionKind::Postcopy)
        .expect("the refusal is in the timeline");
    assert!(postcopy.detail.contains("refused"), "{}", postcopy.detail);
}

#[tokio::test(start_paused = true)]
async fn a_stall_raises_the_downtime_to_its_ceiling() {
    let job = Job::start(
        WatchOptions {
            max_downtime: Some(Duration::from_millis(2000)),
            ..options()
        },
        None,
    )
    .await;
    // Passes that never leave less than the first: no progress.
    for _ in 0..5 {
        job.pass(1.0, 200 * MIB).await;
    }

    let raised = job.actions(ActionKind::Downtime);
    assert_eq!(raised.len(), 1, "{raised:?}");
    assert_eq!(job.qemu.parameter("downtime-limit"), Some(json!(2000)));
    job.qemu.complete(6000, 1800);
    let (outcome, progress, _) = job.outcome().await;
    assert!(matches!(outcome, Outcome::Completed { .. }));
    assert_eq!(progress.downtime_limit, Some(Duration::from_millis(2000)));
}

#[tokio::test(start_paused = true)]
async fn the_controller_throttles_a_guest_that_outruns_the_link_and_lifts_it_at_the_end() {
    let throttle = FakeThrottle::default();
    let job = Job::start(adaptive(), Some(Box::new(throttle.clone()))).await;
    // Each 2 s pass at 64 MiB/s leaves 256 MiB: the guest dirties twice
    // what the link carries.
    for _ in 0..3 {
        job.pass(2.0, 256 * MIB).await;
    }
    let throttled = job.progress.borrow().throttle;
    job.qemu.complete(8000, 30);

    let (outcome, progress, _) = job.outcome().await;

    assert!(matches!(outcome, Outcome::Completed { .. }), "{outcome:?}");
    assert!(throttled.fraction() >= 0.5, "throttle {throttled}");
    let log = throttle.log();
    assert!(log.iter().any(|l| l.starts_with("set 0.")), "{log:?}");
    assert_eq!(log.last().map(String::as_str), Some("release"));
    assert!(progress.max_throttle >= throttled);
    assert!(progress
        .actions
        .iter()
        .any(|a| a.action == ActionKind::Release));
}

#[tokio::test(start_paused = true)]
async fn passes_too_short_to_measure_that_stop_shrinking_still_get_throttled() {
    let throttle = FakeThrottle::default();
    let job = Job::start(adaptive(), Some(Box::new(throttle.clone()))).await;
    // A small, hot working set over the link: every pass takes 0.3 s and
    // leaves 30 MiB, three times what a switchover may carry.
    for _ in 0..8 {
        job.pass(0.3, 30 * MIB).await;
    }
    let throttled = job.progress.borrow().throttle;
    job.qemu.complete(8000, 30);

    let (outcome, _, _) = job.outcome().await;

    assert!(matches!(outcome, Outcome::Completed { .. }), "{outcome:?}");
    assert!(throttled.fraction() >= 0.3, "throttle {throttled}");
    assert!(throttle.log().iter().any(|l| l.starts_with("set 0.")));
}

#[tokio::test(start_paused = true)]
async fn above_the_slow_stop_line_the_watcher_holds_qemus_switchover_and_pauses_the_guest_itself() {
    let job = held_job().await;
    assert_eq!(job.qemu.parameter("downtime-limit"), Some(json!(1)));
    // A pass that leaves what fits in half the downtime at the link's rate.
    job.pass(1.0, 4 * MIB).await;
    assert_eq!(
        job.qemu.calls("stop").len(),
        1,
        "the watcher paused the guest"
    );
    assert_eq!(
        job.qemu.parameter("downtime-limit"),
        Some(json!(300)),
        "the user's limit is back for QEMU's completion"
    );
    job.qemu.complete(9000, 5);

    let (outcome, progress, _) = job.outcome().await;

    let Outcome::Completed { stats } = outcome else {
        panic!("{outcome:?}")
    };
    assert!(
        stats.downtime_ms.unwrap() >= 5,
        "the downtime runs from the watcher's stop"
    );
    assert!(progress
        .actions
        .iter()
        .any(|a| a.action == ActionKind::Switchover));
}

/// An adaptive job whose QEMU has not shown its setup sync yet: the test
/// says when it comes.
async fn setup_sync_not_yet_seen() -> Job {
    let (client, qemu) = ScriptedQemu::start().await;
    qemu.on("migrate", |s, _| {
        s.status = Some(MigrationStatus::Active);
        s.dirty_sync_count = 0;
        Some(Ok(json!({})))
    });
    let job = Job::run(client, qemu, adaptive(), None, None).await;
    job
}

#[tokio::test(start_paused = true)]
async fn the_first_pass_is_timed_from_the_setup_sync_not_from_migrate() {
    let job = setup_sync_not_yet_seen().await;
    // QEMU's setup (the first sync) takes a second.
    tokio::time::sleep(Duration::from_secs(1)).await;
    job.qemu.pass(512 * MIB);
    job.settle().await;
    // 60 MiB dirtied in a first pass of 0.9 s: 67 MiB/s against 64 MiB/s
    // (over 1.9 s from `migrate`, 32 MiB/s, a guest left alone).
    job.pass(0.9, 60 * MIB).await;
    assert_throttled_once(&job);
    job.qemu.complete(9000, 5);
    let _ = job.outcome().await;
}

#[tokio::test(start_paused = true)]
async fn a_first_pass_seen_late_is_timed_by_qemus_clock() {
    let job = setup_sync_not_yet_seen().await;
    // QEMU answered nothing of its setup sync until its first pass had
    // run 1.3 s (setup 0.1 s, 1.4 s since `migrate`).
    tokio::time::sleep(Duration::from_millis(1300)).await;
    job.qemu.with(|s| {
        s.dirty_sync_count = 1;
        s.remaining = 512 * MIB;
        s.total_time_ms = Some(1400);
        s.setup_time_ms = Some(100);
    });
    job.settle().await;
    // 60 MiB dirtied in a first pass of 1.7 s: 35 MiB/s, a guest left
    // alone (timed from the poll, 0.36 s: 167 MiB/s).
    job.pass(0.3, 60 * MIB).await;
    assert_not_throttled(&job);
    job.qemu.complete(9000, 5);
    let _ = job.outcome().await;
}

#[tokio::test(start_paused = true)]
async fn held_the_watcher_pauses_the_guest_mid_pass_once_what_is_left_fits() {
    let job = held_job().await;
    // A pass under way: most of it still to send, no stop.
    job.pass(1.0, 64 * MIB).await;
    assert!(job.qemu.calls("stop").is_empty());
    // The pass has sent all but 1 MiB and QEMU, held, has not synced
    // again: what the guest can have dirtied at its throttle since the
    // sync, on top, still fits in half the downtime.
    job.qemu.with(|s| s.remaining = MIB);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        job.qemu.calls("stop").len(),
        1,
        "the watcher paused the guest without waiting for a sync"
    );
    job.qemu.complete(9000, 5);
    let (outcome, progress, _) = job.outcome().await;
    assert!(matches!(outcome, Outcome::Completed { .. }), "{outcome:?}");
    assert!(progress
        .actions
        .iter()
        .any(|a| a.action == ActionKind::Switchover));
}

#[tokio::test(start_paused = true)]
async fn held_a_refused_pause_is_tried_again_at_the_next_pass_not_at_every_poll() {
    let job = held_job().await;
    job.qemu.on("stop", |_, _| {
        Some(Err(("GenericError", "not now".to_string())))
    });
    job.pass(1.0, 64 * MIB).await;
    job.qemu.with(|s| s.remaining = MIB);
    // A second of polls with what is left fitting: one try.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(job.qemu.calls("stop").len(), 1);
    // The next pass may try again.
    job.pass(0.3, 64 * MIB).await;
    job.qemu.with(|s| s.remaining = MIB);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(job.qemu.calls("stop").len(), 2);
    job.qemu.complete(9000, 5);
    let _ = job.outcome().await;
}

#[tokio::test(start_paused = true)]
async fn near_the_end_a_short_pass_does_not_throttle_a_guest_that_converges() {
    let job = Job::start(adaptive(), None).await;
    // A first pass that leaves little (the guest dirties well under the
    // link), then a short one whose leftover reads as a fast rate: 24 MiB
    // in 0.3 s is 80 MiB/s, but it is a QEMU resync near the end.
    job.pass(8.0, 30 * MIB).await;
    job.pass(0.3, 24 * MIB).await;
    assert_not_throttled(&job);
    // Away from the end a pass that short counts: 64 MiB in 0.4 s.
    job.pass(0.4, 64 * MIB).await;
    assert_throttled_once(&job);
    job.qemu.complete(9000, 5);
    let _ = job.outcome().await;
}

#[tokio::test(start_paused = true)]
async fn passes_that_hover_just_above_the_switchover_are_read_together_and_throttled() {
    let job = Job::start(adaptive(), None).await;
    // The bulk pass, then QEMU syncing every 0.3 s (0.25 s and the poll)
    // with what is left shrinking by a MiB each time, never under the
    // 19.2 MiB that fit: each pass too short to count, each a new low, so
    // no stall either. The guest dirties about 29 MiB a pass, more than
    // the link sends.
    job.pass(8.0, 30 * MIB).await;
    job.pass(0.25, 29 * MIB).await;
    assert_not_throttled(&job);
    job.pass(0.25, 28 * MIB).await;
    assert_hover_read(&job, "2 passes in 0.6 s");
    assert_throttled_once(&job);
    job.qemu.complete(11000, 5);
    let _ = job.outcome().await;
}

#[tokio::test(start_paused = true)]
async fn a_guest_hovering_over_the_threshold_is_throttled_though_its_passes_read_under_the_link() {
    // Measured at 45 MiB over a 45 MiB working set: a lower bound well
    // under the 64 MiB/s link, a guest left to converge on its own.
    let job = Job::start(measured_before(45, 68), None).await;
    job.pass(1.0, 40 * MIB).await;
    assert_not_throttled(&job);
    // Then QEMU syncs every 0.4 s, what is left just over the 19.2 MiB
    // that fit: 40.5 MiB in 0.8 s reads 49 MiB/s, yet nothing finishes.
    job.pass(0.35, 21 * MIB).await;
    job.pass(0.35, 39 * MIB / 2).await;
    assert_hover_read(&job, "2 passes in 0.8 s");
    assert_throttled_once(&job);
    job.qemu.complete(3000, 5);
    let _ = job.outcome().await;
}

#[tokio::test(start_paused = true)]
async fn passes_near_the_end_that_stop_shrinking_unthrottled_hover_however_long() {
    // Measured at 45 MiB over a 45 MiB working set, under the 64 MiB/s
    // link. Near the end (under 38.4 MiB left) each pass lasts 0.7 s, long
    // enough to count on its own, and reads 51 MiB/s: under the link, a
    // guest that would converge on its own; yet what is left stops
    // setting new lows.
    let job = Job::start(measured_before(45, 68), None).await;
    job.pass(1.0, 36 * MIB).await;
    job.pass(0.7, 36 * MIB).await;
    job.pass(0.7, 71 * MIB / 2).await;
    assert_not_throttled(&job);
    // Three passes without a new low by 5 %.
    job.pass(0.7, 36 * MIB).await;
    assert_hover_read(&job, "3 passes near the end without a new low");
    assert_throttled_once(&job);
    job.qemu.complete(4000, 5);
    let _ = job.outcome().await;
}

#[tokio::test(start_paused = true)]
async fn a_short_first_pass_near_the_end_is_not_read_as_hovering() {
    // A guest with little in use: its 0.2 s first pass sends 13 MiB and
    // leaves 25 MiB; what the first pass sent is not the guest's dirt, so
    // the next short pass alone is no hover.
    let job = Job::start(adaptive(), None).await;
    job.pass(0.2, 25 * MIB).await;
    job.pass(0.4, 24 * MIB).await;
    assert!(
        job.actions(ActionKind::Measure).is_empty() && job.actions(ActionKind::Throttle).is_empty(),
        "{:?}",
        job.progress.borrow().actions
    );
    job.qemu.complete(1000, 5);
    let _ = job.outcome().await;
}

/// A 512 MiB guest with 68 MiB in use, measured shortly before the job
/// at `mib_per_window` MiB in both a 1 s and a 2 s window over 64 MiB/s.
fn measured_before(mib_per_window: u64, in_use_mib: u64) -> WatchOptions {
    let window = |secs: f64| converge::estimate::Sample {
        window_secs: secs,
        dirtied: (mib_per_window * MIB) as f64,
        noise: 0.0,
    };
    WatchOptions {
        known: Some(migration::perform::Known {
            samples: vec![window(1.0), window(2.0)],
            age: Duration::from_secs(1),
        }),
        ram_in_use_bytes: Some(in_use_mib * MIB),
        ..adaptive()
    }
}

#[tokio::test(start_paused = true)]
async fn a_guest_known_to_outrun_the_link_is_throttled_as_its_short_first_pass_begins() {
    // 60 MiB dirtied in 1 s and in 2 s: a 60 MiB working set filled in
    // under a second, at least 60 MiB/s against 64.
    let throttle = FakeThrottle::default();
    let job = Job::start(measured_before(60, 68), Some(Box::new(throttle.clone()))).await;
    let throttles = job.actions(ActionKind::Throttle);
    assert_eq!(throttles.len(), 1, "{throttles:?}");
    assert!(
        throttles[0].contains("before the first sync"),
        "{throttles:?}"
    );
    assert!(throttle.log().iter().any(|l| l.starts_with("set 0.9")));
    job.qemu.complete(2000, 5);
    let _ = job.outcome().await;
}

#[tokio::test(start_paused = true)]
async fn with_postcopy_allowed_the_start_leaves_the_guest_to_the_slice_probe() {
    // The pre-flight may probe the slice floor, which a throttle would
    // stop, and post-copy decided from it needs no throttle at all.
    let allowed = adaptive_with(true);
    let options = WatchOptions {
        preflight: true,
        controller: allowed.controller,
        allow_postcopy: true,
        ..measured_before(60, 68)
    };
    let job = Job::start(options, None).await;
    assert_not_throttled(&job);
    job.qemu.complete(2000, 5);
    let _ = job.outcome().await;
}

#[tokio::test(start_paused = true)]
async fn a_long_first_pass_waits_for_its_first_sync_to_throttle() {
    // The same guest with 480 MiB in use: throttling a 7.5 s first pass
    // costs more than resending 60 MiB.
    let job = Job::start(measured_before(60, 480), None).await;
    assert_not_throttled(&job);
    job.qemu.complete(9000, 5);
    let _ = job.outcome().await;
}

#[tokio::test(start_paused = true)]
async fn a_slice_of_cpu_that_dirties_more_than_the_downtime_allows_goes_to_postcopy_unthrottled() {
    // Then a pass leaves 56 MiB after 2 ms of vCPU time: 28 MiB a slice
    // against the 9.6 MiB that half of 300 ms lets through at 64 MiB/s.
    let cpu = Arc::new(Mutex::new(Duration::ZERO));
    let throttle = FakeThrottle {
        slow_above: Some(0.0),
        cpu: Some(cpu.clone()),
        ..Default::default()
    };
    // At most 99 %: above it post-copy would come at the first sync. And
    // post-copy capped at 8 MiB/s, so that a throttle costs the guest less
    // than sending 256 MiB in post-copy.
    let mut options = adaptive_up_to(0.99, true);
    if let Some(policy) = options.controller.as_mut() {
        policy.postcopy_bandwidth = Some(8.0 * MIB as f64);
    }
    let job = Job::start(options, Some(Box::new(throttle.clone()))).await;
    job.qemu
        .with(|s| s.capabilities.insert("postcopy-ram".into(), true));
    // A throttle the model expects to finish with; the vCPU gets plenty
    // of CPU under it, so no slice is too much yet.
    for left in [256, 100] {
        *cpu.lock().unwrap() += Duration::from_millis(200);
        job.pass(2.0, left * MIB).await;
    }
    assert!(
        job.actions(ActionKind::Postcopy).is_empty(),
        "{:?}",
        job.progress.borrow().actions
    );
    assert!(job.progress.borrow().throttle.is_on());
    *cpu.lock().unwrap() += Duration::from_millis(2);
    job.pass(2.0, 56 * MIB).await;

    let postcopy = job.actions(ActionKind::Postcopy);
    assert_eq!(postcopy.len(), 1, "{postcopy:?}");
    assert!(
        postcopy[0].contains("28 MiB") && postcopy[0].contains("throttle is lifted"),
        "{postcopy:?}"
    );
    assert_eq!(job.qemu.calls("migrate-start-postcopy").len(), 1);
    let log = throttle.log();
    assert_eq!(
        log.last().map(String::as_str),
        Some("set 0.000"),
        "lifted right after the switch was asked for: {log:?}"
    );
    // The sync QEMU makes as it switches ends no pass to steer: the guest
    // runs on the destination from here, and stays unthrottled.
    job.pass(2.0, 200 * MIB).await;
    assert_eq!(throttle.log(), log, "nothing throttled in post-copy");
    assert!(!job.progress.borrow().throttle.is_on());
    job.qemu.complete(9000, 20);
    let (outcome, _, _) = job.outcome().await;
    assert!(matches!(outcome, Outcome::Completed { .. }), "{outcome:?}");
}

#[tokio::test(start_paused = true)]
async fn a_guest_that_needs_more_than_99_percent_goes_to_postcopy_instead_when_allowed() {
    // The first pass filled a 256 MiB working set in 2 s at 64 MiB/s: at
    // least twice the link, and maybe any multiple of it.
    for allowed in [false, true] {
        let throttle = FakeThrottle::default();
        let job = Job::start(adaptive_with(allowed), Some(Box::new(throttle.clone()))).await;
        job.qemu
            .with(|s| s.capabilities.insert("postcopy-ram".into(), true));
        job.pass(2.0, 256 * MIB).await;

        let postcopy = job.actions(ActionKind::Postcopy);
        if allowed {
            assert_eq!(postcopy.len(), 1, "{postcopy:?}");
            assert!(
                postcopy[0].contains("would need a 99.") && postcopy[0].contains("or more"),
                "{postcopy:?}"
            );
            assert_eq!(job.qemu.calls("migrate-start-postcopy").len(), 1);
            assert!(throttle.log().is_empty(), "{:?}", throttle.log());
        } else {
            assert!(postcopy.is_empty(), "{postcopy:?}");
            assert!(
                job.progress.borrow().throttle.fraction() > 0.99,
                "{:?}",
                job.progress.borrow().actions
            );
        }
        job.qemu.complete(9000, 20);
        let _ = job.outcome().await;
    }
}

#[tokio::test(start_paused = true)]
async fn with_postcopy_allowed_a_guest_the_first_sync_would_send_to_postcopy_goes_before_it() {
    // Measured just before the job: 60 MiB dirtied in the 1 s window and
    // in the 2 s one, a 60 MiB working set filled within a second, at
    // least 60 MiB/s against 64: the first sync will find it dirtied again
    // and plan for the worst. 480 MiB in use: a first pass of 7.5 s.
    for allowed in [false, true] {
        let options = WatchOptions {
            controller: adaptive_with(allowed).controller,
            allow_postcopy: allowed,
            ..measured_before(60, 480)
        };
        let throttle = FakeThrottle::default();
        let job = Job::start(options, Some(Box::new(throttle.clone()))).await;
        job.qemu
            .with(|s| s.capabilities.insert("postcopy-ram".into(), true));
        // Under a second into the first pass the working set may not have
        // been dirtied again yet.
        tokio::time::sleep(Duration::from_millis(700)).await;
        job.settle().await;
        assert!(job.actions(ActionKind::Postcopy).is_empty());
        tokio::time::sleep(Duration::from_millis(800)).await;
        job.settle().await;

        let postcopy = job.actions(ActionKind::Postcopy);
        if allowed {
            assert_eq!(postcopy.len(), 1, "{:?}", job.progress.borrow().actions);
            assert!(
                postcopy[0].starts_with("foreseen for the first sync"),
                "{postcopy:?}"
            );
            assert_eq!(job.qemu.calls("migrate-start-postcopy").len(), 1);
        } else {
            assert!(postcopy.is_empty(), "{postcopy:?}");
            assert!(job.qemu.calls("migrate-start-postcopy").is_empty());
        }
        assert!(throttle.log().is_empty(), "{:?}", throttle.log());
        job.qemu.complete(9000, 20);
        let _ = job.outcome().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_new_bandwidth_mid_job_reaches_qemu_and_the_published_limits() {
    let job = Job::start(options(), None).await;
    let (done, applied) = oneshot::channel();
    job.retune
        .send(Retune {
            bandwidth: Bandwidth::from_mib_s(32),
            downtime: Some(Duration::from_millis(150)),
            done,
        })
        .await
        .unwrap();
    applied.await.unwrap().unwrap();

    assert_eq!(
        job.qemu.parameter("max-bandwidth"),
        Some(json!(32 * MIB)),
        "the cap reached QEMU"
    );
    assert_eq!(job.qemu.parameter("downtime-limit"), Some(json!(150)));
    let progress = job.progress.borrow().clone();
    assert_eq!(progress.bandwidth_limit, Bandwidth::from_mib_s(32));
    assert_eq!(progress.downtime_limit, Some(Duration::from_millis(150)));
    job.qemu.complete(100, 10);
    let _ = job.outcome().await;
}

#[tokio::test(start_paused = true)]
async fn a_new_bandwidth_mid_job_holds_in_post_copy_too_unless_it_has_its_own_cap() {
    for follows in [true, false] {
        let job = Job::start(
            WatchOptions {
                postcopy_follows_cap: follows,
                ..options()
            },
            None,
        )
        .await;
        let (done, applied) = oneshot::channel();
        job.retune
            .send(Retune {
                bandwidth: Bandwidth::from_mib_s(80),
                downtime: None,
                done,
            })
            .await
            .unwrap();
        applied.await.unwrap().unwrap();
        // QEMU applies max-bandwidth only before post-copy: without the
        // post-copy cap a re-split would not reach a guest in post-copy.
        assert_eq!(job.qemu.parameter("max-bandwidth"), Some(json!(80 * MIB)));
        assert_eq!(
            job.qemu.parameter("max-postcopy-bandwidth"),
            follows.then(|| json!(80 * MIB)),
            "follows: {follows}"
        );
        job.qemu.complete(100, 10);
        let _ = job.outcome().await;
    }
}

/// A job copying two disks on the scripted QEMU, their mirrors in sync.
async fn start_with_disks() -> (Job, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let (client, qemu) = ScriptedQemu::start().await;
    let plan = MirrorPlan {
        host: "10.0.0.2".into(),
        port: 10809,
        sync: qmp::commands::block::MirrorSync::Full,
        copy_mode: qmp::commands::block::CopyMode::Background,
        tls_hostname: None,
        speed: None,
    };
    let mirrors = Mirrors::start(&client, &plan, &["vda".into(), "vdb".into()])
        .await
        .unwrap();
    mirrors
        .wait_ready(
            &client,
            &CancellationToken::new(),
            None,
            Duration::from_secs(600),
            None,
            |_| {},
        )
        .await
        .unwrap();
    // What the mirrors were when QEMU was told to go on.
    let at_continue = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = at_continue.clone();
    qemu.on("migrate-continue", move |s, _| {
        *seen.lock().unwrap() = s
            .block_jobs
            .iter()
            .map(|j| j["status"].as_str().unwrap_or("").to_string())
            .collect();
        None
    });
    let job = Job::run(client, qemu, options(), None, Some(mirrors)).await;
    (job, at_continue)
}

#[tokio::test(start_paused = true)]
async fn with_disks_the_mirrors_are_completed_while_qemu_waits_before_switching_over() {
    let (job, at_continue) = start_with_disks().await;
    job.pass(1.0, MIB).await;
    // While the memory moves, the disks' figures are the job's too.
    let stats = job.progress.borrow().stats.clone();
    assert!(stats.disk_total_bytes.unwrap_or(0) > 0, "{stats:?}");
    assert_eq!(stats.disk_total_bytes, stats.disk_processed_bytes);
    // The guest is paused, the disks still active: QEMU waits for us.
    job.qemu.set_status(MigrationStatus::PreSwitchover);
    job.settle().await;
    job.settle().await;
    assert_eq!(job.qemu.calls("migrate-continue").len(), 1);
    assert_eq!(
        job.qemu.calls("migrate-continue")[0]["state"],
        "pre-switchover"
    );
    job.qemu.complete(1500, 25);

    let (outcome, progress, qemu) = job.outcome().await;

    assert!(matches!(outcome, Outcome::Completed { .. }), "{outcome:?}");
    // Every mirror was completed (not abandoned) before QEMU went on.
    let cancels = qemu.calls("block-job-cancel");
    assert_eq!(cancels.len(), 2, "{cancels:?}");
    assert!(cancels.iter().all(|c| c["force"] == false));
    let states = at_continue.lock().unwrap().clone();
    assert!(
        states.iter().all(|s| s == "concluded"),
        "mirrors when QEMU went on: {states:?}"
    );
    assert!(progress
        .actions
        .iter()
        .any(|a| a.action == ActionKind::Switchover && a.detail.contains("mirrors completed")));
}

#[tokio::test(start_paused = true)]
async fn a_mirror_that_fails_at_switchover_cancels_the_migration() {
    let (job, _) = start_with_disks().await;
    job.pass(1.0, MIB).await;
    job.qemu.with(|s| {
        s.block_jobs[1]["status"] = json!("concluded");
        s.block_jobs[1]["error"] = json!("Input/output error");
    });
    job.qemu.set_status(MigrationStatus::PreSwitchover);

    let (outcome, _, qemu) = job.outcome().await;

    let Outcome::Failed { error, .. } = outcome else {
        panic!("{outcome:?}")
    };
    assert!(matches!(error, PerformError::Storage(_)), "{error:?}");
    assert!(qemu.calls("migrate-continue").is_empty());
    assert_eq!(qemu.calls("migrate_cancel").len(), 1);
}

/// The quota of `vcpu` in the cgroup v1 tree of a throttle at `dir` ("-1":
/// none).
fn quota_of(dir: &std::path::Path, vcpu: usize) -> String {
    std::fs::read_to_string(dir.join(format!("vcpu{vcpu}/cpu.cfs_quota_us")))
        .map(|q| q.trim().to_string())
        .unwrap_or_else(|_| "-1".into())
}

/// A 3-vCPU guest under a real host throttle on a directory standing in
/// for the cgroup v1 cpu controller, where the pre-flight's probes will
/// find vCPU 1 alone writing (200 MiB/s, 4 MiB/s while vCPU 1 is held
/// back); and that throttle's cgroup directory.
async fn three_vcpus_one_writer(tree: &std::path::Path) -> (Job, std::path::PathBuf) {
    three_vcpus_one_writer_with(tree, adaptive()).await
}

/// [`three_vcpus_one_writer`] with these options.
async fn three_vcpus_one_writer_with(
    tree: &std::path::Path,
    options: WatchOptions,
) -> (Job, std::path::PathBuf) {
    use migration::vcpu_throttle::{HostPlace, HostVcpuThrottle};
    std::fs::write(tree.join("tasks"), "").unwrap();
    let place = HostPlace {
        root: tree.to_path_buf(),
        scope: "agent".into(),
        guard: Some("/bin/true".into()),
        lease: migration::vcpu_throttle::lease::LEASE,
    };
    // Thread ids /proc does not know: their CPU time cannot be read, so
    // each counts as busy and is probed.
    let threads = vec![4_000_001, 4_000_002, 4_000_003];
    let throttle = HostVcpuThrottle::attach(&place, "vm-1".into(), std::process::id(), threads)
        .await
        .unwrap();
    let dir = tree.join("livemig/agent/vm-1");
    let (client, qemu) = ScriptedQemu::start().await;
    let probed = dir.clone();
    qemu.on("query-dirty-rate", move |state, _| {
        // A probe's quota: 1 ms.
        state.dirty_rate_mib_s = if quota_of(&probed, 1) == "1000" {
            4
        } else {
            200
        };
        None
    });
    let options = WatchOptions {
        preflight: true,
        ..options
    };
    let job = Job::run(client, qemu, options, Some(Box::new(throttle)), None).await;
    (job, dir)
}

/// Waits for the `writers` actions to number `count`: the probes' cgroup
/// writes run on blocking threads, outside the paused clock, so they get
/// real time.
async fn wait_writers(job: &Job, count: usize) -> Vec<String> {
    for _ in 0..200 {
        if job.actions(ActionKind::Writers).len() >= count {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
        job.settle().await;
    }
    job.actions(ActionKind::Writers)
}

/// The pre-flight's probes find vCPU 1, the controller's first throttle
/// waits for them, and from then on only vCPU 1 has a quota.
#[tokio::test(start_paused = true)]
async fn only_the_vcpu_found_writing_is_throttled() {
    let tree = tempfile::tempdir().unwrap();
    let (job, dir) = three_vcpus_one_writer(tree.path()).await;

    // The first pass ends while the probes run: no throttle yet.
    job.pass(0.65, 256 * MIB).await;
    assert!(job.actions(ActionKind::Throttle).is_empty());
    let waits = job.actions(ActionKind::Writers);
    assert!(
        waits.iter().any(|w| w.contains("waits for the search")),
        "{waits:?}"
    );
    let writers = wait_writers(&job, 2).await;
    assert!(
        writers.iter().any(|w| w.starts_with("vCPU 1 writes")),
        "{writers:?}"
    );
    // The sync that waited is decided as the search ends, not a pass
    // later (its cgroup writes get real time, as the probes' do).
    for _ in 0..200 {
        if !job.actions(ActionKind::Throttle).is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
        job.settle().await;
    }
    assert_eq!(job.actions(ActionKind::Throttle).len(), 1);
    assert_ne!(quota_of(&dir, 1), "-1");
    assert_eq!(quota_of(&dir, 0), "-1");
    assert_eq!(quota_of(&dir, 2), "-1");
    job.pass(2.0, 256 * MIB).await;
    assert_eq!(quota_of(&dir, 0), "-1");
    assert_eq!(quota_of(&dir, 2), "-1");
    job.qemu.complete(5000, 30);

    let (outcome, _, _) = job.outcome().await;
    assert!(matches!(outcome, Outcome::Completed { .. }), "{outcome:?}");
    for vcpu in 0..3 {
        assert_eq!(quota_of(&dir, vcpu), "-1", "released");
    }
}

/// Passes that stop shrinking with the writer at the highest throttle:
/// some other vCPU writes after all, and every vCPU is throttled.
#[tokio::test(start_paused = true)]
async fn passes_that_stall_at_the_highest_throttle_widen_it_to_every_vcpu() {
    let tree = tempfile::tempdir().unwrap();
    let (job, dir) = three_vcpus_one_writer(tree.path()).await;
    wait_writers(&job, 1).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    wait_writers(&job, 1).await;
    // Saturated passes: the controller escalates to its highest throttle,
    // and the passes still leave as much.
    for _ in 0..12 {
        job.pass(2.0, 256 * MIB).await;
    }

    let writers = job.actions(ActionKind::Writers);
    assert!(
        writers
            .iter()
            .any(|w| w.contains("every vCPU is throttled")),
        "{writers:?} {:?}",
        job.actions(ActionKind::Throttle)
    );
    for vcpu in 0..3 {
        assert_ne!(quota_of(&dir, vcpu), "-1", "vCPU {vcpu}");
    }
    job.qemu.complete(30000, 30);
    let (outcome, _, _) = job.outcome().await;
    assert!(matches!(outcome, Outcome::Completed { .. }), "{outcome:?}");
}

/// Without a bandwidth cap, QEMU's throughput (64 MiB/s here) stands for
/// the link: a guest dirtying 200 MiB/s gets its writer found all the same.
#[tokio::test(start_paused = true)]
async fn uncapped_the_writer_is_found_against_qemus_throughput() {
    let tree = tempfile::tempdir().unwrap();
    let options = WatchOptions {
        bandwidth_cap: None,
        ..adaptive()
    };
    let (job, _dir) = three_vcpus_one_writer_with(tree.path(), options).await;

    let writers = wait_writers(&job, 1).await;
    assert!(
        writers.iter().any(|w| w.starts_with("vCPU 1 writes")),
        "{writers:?}"
    );
    job.qemu.complete(3000, 30);
    let (outcome, _, _) = job.outcome().await;
    assert!(matches!(outcome, Outcome::Completed { .. }), "{outcome:?}");
}
