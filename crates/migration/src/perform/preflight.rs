//! The pre-flight: what the watcher learns about the guest while the first
//! pass runs, in a task of its own, and how the watcher takes it in.
//!
//! 1. The dirty rate over 1 s and 2 s windows (`calc-dirty-rate`), fitted
//!    to a model: the controller's start and the job's prediction.
//! 2. With a host throttle of several vCPUs and a guest dirtying more than
//!    half the link: which vCPUs write ([`writers`]), so that only those
//!    are throttled: from QEMU's per-vCPU dirty rates where the guest has
//!    a KVM dirty ring, else by probing each busy vCPU.
//! 3. With `--allow-postcopy`, a guest whose rate is known only from
//!    below (its working set filled the shortest window), whose working
//!    set the downtime cannot carry and that may outrun the link, with one
//!    vCPU writing: what that vCPU dirties in one slice of CPU
//!    ([`slice_probe`]), so that a guest no throttle can finish goes to
//!    post-copy at once.
//!
//! With a measurement from shortly before the job and one vCPU, the probes
//! go by that measurement at once and the job's own comes after them: a
//! working set the link sends in a second is a first pass over before the
//! job's own measurement (3 s) would be.
//!
//! The probes throttle one vCPU at a time, which only works while no
//! throttle is in force: the controller's first throttle waits for them.

use converge::controller::{self, SliceFloor, VcpuUse};
use converge::estimate::fit;
use converge::DirtyModel;
use protocol::job::ActionKind;
use qmp::commands::migration::QueryMigrate;
use qmp::Client;
use tokio::sync::mpsc;
use tokio::time::Instant;
use types::units::mib;

use super::watch::Watch;
use crate::vcpu_throttle::cgroup::MIN_SLICE;
use crate::vcpu_throttle::slice_probe::{self, SliceProbe};
use crate::vcpu_throttle::writers::{self, HostProbe, Writers};
use crate::vcpu_throttle::VcpuSelector;

/// What the pre-flight learns, as it comes in.
#[derive(Debug)]
pub(super) enum Preflight {
    /// The dirty rate measured, and its description.
    Model(DirtyModel, String),
    /// A probe begins.
    Probing(Probing),
    /// Which vCPUs write; `None` if the search had to stop.
    Writers(Option<Writers>),
    /// The slice probe's reading; `None` if it had to stop.
    Slice(Option<SliceProbe>),
    /// Something for the timeline.
    Note(ActionKind, String),
}

/// A probe the controller's first throttle waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Probing {
    /// The search for the writers, probing this many busy vCPUs.
    Writers(usize),
    /// The writers read off QEMU's per-vCPU dirty rates.
    DirtyRing,
    /// The slice probe of the one writer.
    Slice,
}

impl Probing {
    /// The timeline's entry while the controller waits.
    pub fn waiting(self) -> (ActionKind, String) {
        match self {
            Probing::Writers(busy) => (
                ActionKind::Writers,
                format!(
                    "the controller waits for the search for the vCPUs that write ({busy} busy \
                     vCPUs probed a second each) before it throttles"
                ),
            ),
            Probing::DirtyRing => (
                ActionKind::Writers,
                "the controller waits for QEMU's per-vCPU dirty rates (1 s) before it throttles"
                    .into(),
            ),
            Probing::Slice => (
                ActionKind::Measure,
                "the controller waits for the probe of what the writing vCPU dirties in a \
                 slice of CPU (1 s) before it throttles"
                    .into(),
            ),
        }
    }
}

/// What the pre-flight works with.
#[derive(Debug)]
pub(super) struct PreflightPlan {
    /// The guest's RAM, bytes.
    pub ram_bytes: f64,
    /// The host throttle's single vCPUs, if the job has one.
    pub selector: Option<VcpuSelector>,
    /// The bandwidth cap, bytes/s.
    pub link: Option<f64>,
    /// Probe the slice floor when the guest calls for it.
    pub probe_slice: bool,
    /// The guest has a KVM dirty ring: QEMU can give each vCPU's rate.
    pub dirty_ring: bool,
    /// The measurement from shortly before the job, fitted: the probes
    /// go by it at once, and this job's own measurement comes after them.
    pub known: Option<DirtyModel>,
    /// The highest downtime the job may use, seconds.
    pub downtime: f64,
}

/// Runs the pre-flight, sending what it learns to the watcher.
pub(super) async fn preflight(
    qmp: Client,
    plan: PreflightPlan,
    tx: mpsc::UnboundedSender<Preflight>,
) {
    let cpu_before = plan.selector.as_ref().map(writers::cpu_times);
    let started = Instant::now();
    let one_vcpu = plan.selector.as_ref().is_some_and(|s| s.threads.len() == 1);
    match plan.known {
        // Seconds earlier than a measurement of its own: a guest no
        // throttle can finish goes to post-copy early in the first pass.
        // (The search for the writers among several vCPUs needs the CPU
        // they use over this job's measurement.)
        Some(known) if one_vcpu => {
            probe(&qmp, &plan, known, 0.0, cpu_before, started, &tx).await;
            let _ = measure(&qmp, &plan, &tx).await;
        }
        _ => {
            if let Some((model, baseline)) = measure(&qmp, &plan, &tx).await {
                probe(&qmp, &plan, model, baseline, cpu_before, started, &tx).await;
            }
        }
    }
}

/// This job's own measurement of the dirty rate, sent to the watcher;
/// with what its shortest window saw dirtied, bytes.
async fn measure(
    qmp: &Client,
    plan: &PreflightPlan,
    tx: &mpsc::UnboundedSender<Preflight>,
) -> Option<(DirtyModel, f64)> {
    let samples = crate::dirty::measure(qmp, &[1, 2], plan.ram_bytes)
        .await
        .ok()?;
    let model = fit(&samples, plan.ram_bytes)?;
    let _ = tx.send(Preflight::Model(
        model,
        crate::dirty::describe(&samples, &model),
    ));
    Some((model, samples[0].dirtied))
}

/// The probes `model` calls for: which vCPUs write (from the CPU each
/// used since `started` and `baseline`, the bytes dirtied in a second
/// with none probed), and what the one writer dirties in a slice of CPU.
async fn probe(
    qmp: &Client,
    plan: &PreflightPlan,
    model: DirtyModel,
    baseline: f64,
    cpu_before: Option<Vec<Option<u64>>>,
    started: Instant,
    tx: &mpsc::UnboundedSender<Preflight>,
) {
    // Uncapped, QEMU's throughput so far stands for the link (it reads low
    // while the first pass skims zero pages: the probes run rather more
    // often than needed, never less).
    let link = match plan.link {
        Some(cap) => Some(cap),
        None => measured_link(qmp).await,
    };
    let (Some(selector), Some(before), Some(link)) = (plan.selector.as_ref(), cpu_before, link)
    else {
        return;
    };
    // The slice floor matters where the working set cannot go in the
    // downtime and the guest may outrun the link: a rate known only from
    // below (the window filled) may be any multiple of what was seen.
    let worst = model
        .rate
        .max(model.working_set / converge::estimate::WORST_CASE_REFILL_SECS);
    let floor_in_question = plan.probe_slice
        && model.rate_is_lower_bound
        && model.working_set > link * plan.downtime
        && worst > link;
    // A probe slows a vCPU for a second: only where a throttle is likely.
    if model.rate <= link / 2.0 && !floor_in_question {
        return;
    }
    let probe = HostProbe { selector, qmp };
    let writer = if selector.threads.len() > 1 {
        let from_ring = if plan.dirty_ring {
            let _ = tx.send(Preflight::Probing(Probing::DirtyRing));
            writers_from_ring(&probe, &before, started, link, tx).await
        } else {
            None
        };
        let found = match from_ring {
            Some(found) => Some(found),
            None => {
                writers::find(&probe, &before, started.elapsed(), baseline, |busy| {
                    let _ = tx.send(Preflight::Probing(Probing::Writers(busy)));
                })
                .await
            }
        };
        let one = found
            .as_ref()
            .filter(|w| w.writers.len() == 1)
            .map(|w| w.writers[0]);
        // Before the writers: the controller must not see a gap between
        // the two probes and throttle in it.
        if floor_in_question && one.is_some() {
            let _ = tx.send(Preflight::Probing(Probing::Slice));
        }
        let _ = tx.send(Preflight::Writers(found));
        one
    } else {
        if floor_in_question {
            let _ = tx.send(Preflight::Probing(Probing::Slice));
        }
        Some(0)
    };
    if let (true, Some(index)) = (floor_in_question, writer) {
        let seen = slice_probe::probe(&probe, index).await;
        let _ = tx.send(Preflight::Slice(seen));
    }
}

/// The writers read off QEMU's per-vCPU dirty rates (a KVM dirty ring);
/// `None` sends the search to its probes: QEMU refused (said in the
/// timeline) or no vCPU dirtied anything in the second. CPU shares are
/// over the time `since` the pre-flight began.
async fn writers_from_ring(
    probe: &HostProbe<'_>,
    cpu_before: &[Option<u64>],
    since: Instant,
    link: f64,
    tx: &mpsc::UnboundedSender<Preflight>,
) -> Option<Writers> {
    match crate::dirty::per_vcpu(probe.qmp).await {
        Ok(rates) => {
            let cpu_after = writers::cpu_times(probe.selector);
            let shares = writers::cpu_shares(&cpu_after, cpu_before, since.elapsed());
            writers::from_dirty_rates(&rates, &shares, link)
        }
        Err(e) => {
            let _ = tx.send(Preflight::Note(
                ActionKind::Writers,
                format!(
                    "QEMU gave no per-vCPU dirty rates ({}): probing the busy vCPUs instead",
                    types::error_chain(&e)
                ),
            ));
            None
        }
    }
}

/// QEMU's own figure for the migration's throughput, bytes/s.
async fn measured_link(qmp: &Client) -> Option<f64> {
    let info = qmp.execute(&QueryMigrate).await.ok()?;
    crate::job::stats_from_qemu(&info)
        .bandwidth_mib_s
        .filter(|b| *b > 0.0)
        .map(|b| b * types::MIB as f64)
}

impl Watch<'_> {
    /// Takes the measurement from shortly before the job, if any, at once:
    /// the controller's first decision need not wait for this job's own
    /// measurement (seconds, while a short first pass may be over, and a
    /// fast writer rewrites its working set within a poll). That one still
    /// runs, for the vCPUs that write and a current prediction.
    pub async fn take_known(&mut self) {
        let Some(known) = self.options.known.as_ref() else {
            return;
        };
        let Some(model) = fit(&known.samples, self.options.ram_bytes as f64) else {
            return;
        };
        let detail = format!(
            "{} ({:.1} s before the job)",
            crate::dirty::describe(&known.samples, &model),
            known.age.as_secs_f64()
        );
        self.take_model(model, detail).await;
    }

    async fn take_model(&mut self, model: DirtyModel, detail: String) {
        self.record(ActionKind::Measure, Some(mib(model.rate)), detail);
        if let Some((state, _)) = self.controller.as_mut() {
            if state.model.rate == 0.0 {
                state.model = model;
            }
        }
        self.predict(model);
        self.throttle_from_the_start().await;
    }

    /// Takes what the pre-flight found, as it comes in.
    pub async fn take_preflight(&mut self) {
        while let Some(rx) = self.preflight.as_mut() {
            match rx.try_recv() {
                Ok(Preflight::Model(model, detail)) => self.take_model(model, detail).await,
                Ok(Preflight::Probing(probing)) => self.probing = Some(probing),
                Ok(Preflight::Writers(found)) => {
                    if matches!(self.probing, Some(Probing::Writers(_) | Probing::DirtyRing)) {
                        self.probing = None;
                    }
                    match found {
                        Some(found) => self.throttle_writers(found).await,
                        None => self.record(
                            ActionKind::Writers,
                            None,
                            "the search for the vCPUs that write stopped (a throttle came first \
                             or a measurement failed): every vCPU is throttled"
                                .into(),
                        ),
                    }
                    self.decide_deferred_sync().await;
                }
                Ok(Preflight::Slice(seen)) => {
                    self.probing = None;
                    match seen {
                        Some(seen) => self.at_slice_probe(seen).await,
                        None => tracing::debug!("the slice probe stopped"),
                    }
                    self.decide_deferred_sync().await;
                }
                Ok(Preflight::Note(kind, detail)) => self.record(kind, None, detail),
                Err(mpsc::error::TryRecvError::Empty) => return,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    self.preflight = None;
                    self.probing = None;
                    self.decide_deferred_sync().await;
                }
            }
        }
    }

    /// Narrows the throttle to the vCPUs found writing.
    async fn throttle_writers(&mut self, found: Writers) {
        let Some(selector) = self.throttle.as_ref().and_then(|t| t.selector()) else {
            return;
        };
        let count = found.writers.len();
        if count == selector.threads.len() {
            self.record(ActionKind::Writers, Some(count as f64), found.describe());
            return;
        }
        match selector.select(found.writers.clone()).await {
            Ok(true) => {
                self.narrowed = true;
                self.record(ActionKind::Writers, Some(count as f64), found.describe());
            }
            Ok(false) => {}
            Err(e) => self.record(
                ActionKind::Writers,
                None,
                format!("every vCPU stays throttled: {}", types::error_chain(&e)),
            ),
        }
    }

    /// Puts the slice probe in the timeline and lets the controller act on
    /// it now, between syncs.
    async fn at_slice_probe(&mut self, seen: SliceProbe) {
        let floor = SliceFloor::measured(
            seen.dirtied,
            VcpuUse {
                cpu_secs: seen.cpu_secs,
                min_slice_secs: MIN_SLICE.as_secs_f64(),
            },
        );
        let per_slice = floor.map_or_else(
            || " (less than a slice of CPU: no reading)".to_string(),
            |f| {
                format!(
                    ": about {:.0} MiB a {:.0} ms slice",
                    mib(f.bytes()),
                    f.vcpu.min_slice_secs * 1000.0
                )
            },
        );
        self.record(
            ActionKind::Measure,
            None,
            format!("{}{per_slice}", seen.describe()),
        );
        let (Some(floor), Some((state, policy))) = (floor, self.controller.clone()) else {
            return;
        };
        let stats = self.last_stats();
        let decision =
            controller::at_probe(&state, &floor, "the probe", self.bandwidth(&stats), &policy);
        if let Some((state, _)) = self.controller.as_mut() {
            *state = decision.state;
        }
        self.apply(decision.actions).await;
    }
}
