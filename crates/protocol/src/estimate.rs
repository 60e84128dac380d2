//! `estimate` and `migrate --dry-run`: what the guest does to its memory and
//! what each convergence policy is predicted to make of it.

use serde::{Deserialize, Serialize};

/// What to estimate for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct EstimateParams {
    /// Link bandwidth, MiB/s.
    pub bandwidth_mib_s: Option<u64>,
    /// Downtime limit, ms.
    pub downtime_ms: Option<u64>,
    /// Time budget, s.
    pub timeout_s: Option<u64>,
    /// Highest throttle the controller may use, percent.
    pub max_throttle_pct: Option<f64>,
    /// Take the agent's last measurement of the guest when it is at most
    /// this many seconds old, rather than measuring for a few seconds
    /// (none: measure now).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age_s: Option<u64>,
}

/// One dirty-rate measurement.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DirtySample {
    /// The window, seconds.
    pub window_secs: f64,
    /// Distinct bytes dirtied in the window.
    pub dirtied: f64,
}

/// The guest as a dirty rate and a working set.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DirtyModel {
    /// Unthrottled dirty rate, bytes per second.
    pub rate: f64,
    /// Distinct bytes the guest keeps rewriting.
    pub working_set: f64,
    /// `rate` is only a lower bound: every window saturated.
    pub rate_is_lower_bound: bool,
}

/// A predicted migration.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// It finishes within the budget.
    pub converges: bool,
    /// Seconds until switchover completes (or the budget).
    pub total_secs: f64,
    /// Seconds the guest is paused at switchover.
    pub downtime_secs: f64,
    /// Passes over memory.
    pub passes: u32,
    /// Highest throttle, 0 to 1.
    pub max_throttle: f64,
    /// Seconds of full-speed guest time lost to throttling and downtime.
    pub work_lost_secs: f64,
    /// Bytes sent in all.
    pub transferred: f64,
}

/// What each convergence policy is predicted to do.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Outlook {
    /// Plain pre-copy.
    pub none: Prediction,
    /// QEMU's auto-converge with its defaults.
    pub qemu: Prediction,
    /// livemig's adaptive controller.
    pub adaptive: Prediction,
}

impl Outlook {
    /// The prediction for `mode`.
    pub fn of(&self, mode: crate::ConvergeMode) -> &Prediction {
        match mode {
            crate::ConvergeMode::None => &self.none,
            crate::ConvergeMode::Qemu => &self.qemu,
            crate::ConvergeMode::Adaptive => &self.adaptive,
        }
    }
}

/// Predictions for the measured model; when the rate is only a lower
/// bound, also for the worst case the measurement allows.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Predictions {
    /// For the model as measured.
    #[serde(flatten)]
    pub measured: Outlook,
    /// For the fastest writer the measurement allows.
    pub worst_case: Option<Outlook>,
}

/// `estimate`'s answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EstimateReport {
    /// The domain.
    pub domain: String,
    /// Guest RAM, bytes.
    pub guest_ram_bytes: u64,
    /// The part of it that holds anything (resident in the QEMU process),
    /// which is what the first pass sends; absent when it could not be
    /// read, and then the whole RAM is counted.
    #[serde(default)]
    pub guest_ram_in_use_bytes: Option<u64>,
    /// Bytes per second the prediction assumes.
    pub bandwidth_bytes_s: f64,
    /// No bandwidth was given: the figure is an assumption.
    pub bandwidth_assumed: bool,
    /// The downtime limit, ms.
    pub downtime_ms: u64,
    /// The time budget, s.
    pub budget_s: Option<f64>,
    /// Highest throttle the adaptive controller may use here, percent.
    pub max_throttle_pct: f64,
    /// The throttle mechanism behind it, and why.
    #[serde(default)]
    pub vcpu_throttle: Option<crate::host::ThrottleMechanism>,
    /// The guest's disks: how fast it writes them, and for those a
    /// migration would copy (not shared), whether the copy converges.
    #[serde(default)]
    pub disks: Vec<DiskEstimate>,
    /// The measurements.
    pub samples: Vec<DirtySample>,
    /// The model fitted to them.
    pub model: DirtyModel,
    /// The predictions.
    pub predictions: Predictions,
    /// The predictions corrected by how this host's past migrations of the
    /// domain with each convergence mode fared; one per mode that has any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub calibrations: Vec<Calibration>,
    /// How old the measurement was when the prediction was made, ms (an
    /// agent keeps its last one: see `max_age_s`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub measurement_age_ms: Option<u64>,
}

/// How past jobs with one convergence mode correct its prediction.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// The mode (`none`, `qemu`, `adaptive`).
    pub policy: crate::ConvergeMode,
    /// Past jobs it rests on (the most recent, at most five).
    pub jobs: u32,
    /// The median of their real / predicted total time.
    pub factor: f64,
    /// The lowest real / predicted among them.
    pub factor_low: f64,
    /// The highest.
    pub factor_high: f64,
    /// The mode's total time corrected, s.
    pub total_secs: f64,
    /// The same with the lowest factor, s.
    pub total_low_secs: f64,
    /// The same with the highest factor, s.
    pub total_high_secs: f64,
}

/// One disk in an estimate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskEstimate {
    /// The guest's name for it (`vda`).
    pub target: String,
    /// On storage both hosts see: not copied.
    pub shared: bool,
    /// Its virtual size, bytes.
    pub size_bytes: u64,
    /// Bytes per second the guest wrote to it during the measurement.
    pub write_bytes_s: f64,
    /// Copying it (`--copy-storage-all`), for a disk that is not shared.
    pub copy: Option<DiskCopyOutlook>,
}

/// Whether a disk's copy converges at the link.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct DiskCopyOutlook {
    /// The copy gains on the guest's writes.
    pub converges: bool,
    /// Seconds the bulk copy takes at most (the whole virtual size), if it
    /// converges.
    pub copy_secs: Option<f64>,
    /// For a copy that does not converge: the vCPU throttle under which an
    /// adaptive job (`--converge adaptive`, with a host throttle) slows the
    /// writes to half the link, percent, and the bulk copy's longest time
    /// then, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adaptive: Option<AdaptiveDiskCopy>,
}

/// A disk copy made to converge by throttling the vCPUs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdaptiveDiskCopy {
    /// The vCPU throttle, percent.
    pub throttle_pct: f64,
    /// Seconds the bulk copy takes at most under it.
    pub copy_secs: f64,
}
