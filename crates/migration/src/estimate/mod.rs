//! `estimate` and `migrate --dry-run`: measure the guest, predict the move.
//!
//! - [`disks`]: the guest's disk writes, and whether copying its disks
//!   would converge.

pub mod disks;

use converge::calibration;
pub use converge::calibration::PastJob;
use converge::estimate::{fit, predict};
use protocol::domain::Tunables;
use protocol::estimate::{Calibration, EstimateParams, EstimateReport};
use protocol::ConvergeMode;
use qmp::Client;
use types::{Bandwidth, Throttle};

use crate::dirty::MeasureError;
use crate::plan::{controller_policy, downtime_limit};
use crate::wire;

/// Measurement windows, seconds: two, to tell a rate from a working set.
const WINDOWS: [i64; 2] = [1, 3];

/// Why nothing could be predicted.
#[derive(Debug, thiserror::Error)]
pub enum EstimateError {
    /// The measurement failed.
    #[error("cannot measure the dirty rate")]
    Measure(#[from] MeasureError),
    /// QEMU would not give its block counters.
    #[error("cannot read the disks' counters")]
    Disks(#[source] qmp::Error),
    /// It gave nothing to fit.
    #[error("no dirty-rate samples")]
    NoSamples,
}

/// What to predict a migration of one guest for.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    /// The domain's name, for the report.
    pub domain: &'a str,
    /// Guest RAM as QEMU has it.
    pub ram_bytes: u64,
    /// The part of it that holds anything, when known
    /// (`domain::qemu::resident`): what the first pass sends.
    pub ram_in_use_bytes: Option<u64>,
    /// The domain's migration limits.
    pub tunables: Tunables,
    /// How this host can throttle the guest's vCPUs.
    pub mechanism: &'a protocol::host::ThrottleMechanism,
    /// The guest's disks.
    pub disks: &'a [disks::DiskFacts],
    /// The path's own speed, when the host says it (`livemigd --link`).
    pub path: Option<Bandwidth>,
}

/// One measurement of a guest: how it dirtied memory over the windows,
/// and its disks' counters on either side. Kept by an agent, it stands
/// for the guest until it is too old for the one asking.
#[derive(Debug, Clone)]
pub struct Measurement {
    samples: Vec<converge::estimate::Sample>,
    disks_before: disks::Counters,
    disks_after: disks::Counters,
    /// When it ended.
    pub taken: tokio::time::Instant,
}

impl Measurement {
    /// How long ago it ended.
    pub fn age(&self) -> std::time::Duration {
        self.taken.elapsed()
    }

    /// Its windows.
    pub fn samples(&self) -> &[converge::estimate::Sample] {
        &self.samples
    }
}

/// Measures the guest behind `qmp` (a few seconds: a 1 s and a 3 s window); QEMU
/// runs one measurement at a time, so the caller keeps others off it.
///
/// # Errors
/// [`EstimateError`] when QEMU refuses or gives nothing.
pub async fn measure(qmp: &Client, ram_bytes: u64) -> Result<Measurement, EstimateError> {
    let disks_before = disks::counters(qmp).await.map_err(EstimateError::Disks)?;
    let samples = crate::dirty::measure(qmp, &WINDOWS, ram_bytes as f64).await?;
    let disks_after = disks::counters(qmp).await.map_err(EstimateError::Disks)?;
    if samples.is_empty() {
        return Err(EstimateError::NoSamples);
    }
    Ok(Measurement {
        samples,
        disks_before,
        disks_after,
        taken: tokio::time::Instant::now(),
    })
}

/// Predicts the guest's migration under each convergence policy from
/// `measurement`.
///
/// # Errors
/// [`EstimateError::NoSamples`] when nothing in it can be fitted.
pub fn report(
    measurement: &Measurement,
    subject: Subject<'_>,
    params: EstimateParams,
) -> Result<EstimateReport, EstimateError> {
    let ram = subject.ram_bytes as f64;
    let samples = &measurement.samples;
    let model = fit(samples, ram).ok_or(EstimateError::NoSamples)?;

    let given = params
        .bandwidth_mib_s
        .or(subject.tunables.bandwidth_mib_s)
        .and_then(Bandwidth::from_mib_s);
    // A bandwidth given is QEMU's cap, lifted for the stop-and-copy.
    let link = match given {
        Some(cap) => crate::settings::capped_link(cap, subject.path),
        None => converge::estimate::Link::uncapped(
            subject
                .path
                .or(Bandwidth::from_mib_s(crate::settings::ASSUMED_PATH_MIB_S))
                .map_or(0.0, Bandwidth::as_f64),
        ),
    };
    let bandwidth = link.bandwidth;
    let downtime = downtime_limit(
        params.downtime_ms.map(std::time::Duration::from_millis),
        subject.tunables.downtime_ms,
        None,
    );
    let policy = controller_policy(
        params.max_throttle_pct.map(Throttle::from_percent),
        subject.mechanism.max_throttle_pct / 100.0,
        downtime,
        None,
        params.timeout_s.map(std::time::Duration::from_secs),
        false,
    );
    Ok(EstimateReport {
        domain: subject.domain.to_string(),
        guest_ram_bytes: subject.ram_bytes,
        bandwidth_bytes_s: bandwidth,
        bandwidth_assumed: given.is_none(),
        downtime_ms: downtime.as_millis() as u64,
        budget_s: policy.budget,
        max_throttle_pct: Throttle::from_fraction(policy.max_throttle).percent(),
        vcpu_throttle: Some(subject.mechanism.clone()),
        disks: disks::outlook(
            subject.disks,
            &measurement.disks_before,
            &measurement.disks_after,
            bandwidth,
        ),
        samples: samples.iter().map(wire::dirty_sample).collect(),
        model: wire::dirty_model(&model),
        guest_ram_in_use_bytes: subject.ram_in_use_bytes,
        predictions: wire::predictions(&predict(
            model,
            converge::estimate::first_pass_bytes(subject.ram_bytes, subject.ram_in_use_bytes),
            link,
            &policy,
        )),
        calibrations: Vec::new(),
        measurement_age_ms: Some(measurement.age().as_millis() as u64),
    })
}

/// Corrects each mode's prediction by how past jobs with that mode fared
/// (`past` newest first): only a prediction that converges has a time to
/// correct.
pub fn calibrate(report: &mut EstimateReport, past: &[(ConvergeMode, PastJob)]) {
    let outlook = &report.predictions.measured;
    report.calibrations = ConvergeMode::ALL
        .into_iter()
        .map(|mode| (mode, outlook.of(mode)))
        .filter(|(_, predicted)| predicted.converges)
        .filter_map(|(mode, predicted)| {
            let jobs: Vec<PastJob> = past
                .iter()
                .filter(|(m, _)| *m == mode)
                .map(|(_, j)| *j)
                .collect();
            let c = calibration::calibrate(&jobs)?;
            Some(Calibration {
                policy: mode,
                jobs: c.jobs as u32,
                factor: c.factor,
                factor_low: c.low,
                factor_high: c.high,
                total_secs: c.apply(predicted.total_secs),
                total_low_secs: predicted.total_secs * c.low,
                total_high_secs: predicted.total_secs * c.high,
            })
        })
        .collect();
}
