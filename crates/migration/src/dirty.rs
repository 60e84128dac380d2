//! Measuring a running guest's dirty rate with QEMU's `calc-dirty-rate`.
//!
//! Page sampling is the only mode that works for every accelerator (QEMU
//! 7.2 has no sub-second windows, and its dirty-bitmap mode crashes under
//! TCG), so each window is at least a second. A KVM guest started with a
//! dirty ring also gets each vCPU's rate ([`per_vcpu`]).

use std::time::Duration;

use converge::estimate::Sample;
use qmp::commands::dirty_rate::{
    CalcDirtyRate, DirtyRateInfo, DirtyRateMode, DirtyRateStatus, QueryDirtyRate,
};
use qmp::Client;
use tokio::time::Instant;
use types::units::mib;
use types::MIB;

/// Why a measurement failed.
#[derive(Debug, thiserror::Error)]
pub enum MeasureError {
    /// QEMU refused to start measuring.
    #[error("calc-dirty-rate failed")]
    Start(#[source] qmp::Error),
    /// QEMU would not say how the measurement went.
    #[error("query-dirty-rate failed")]
    Query(#[source] qmp::Error),
    /// QEMU said it was done but gave no rate.
    #[error("query-dirty-rate gave no rate")]
    NoRate,
    /// The window never closed.
    #[error("the {0} s dirty-rate measurement never finished")]
    Unfinished(i64),
}
/// Pages sampled per GiB (QEMU's default is 512): finer than 1 MiB on a
/// small guest.
const SAMPLE_PAGES: i64 = 4096;

/// Measures one window after another, on a guest of `ram_bytes` (for
/// each sample's noise; 0 when unknown).
///
/// # Errors
/// QEMU's refusal, or a measurement that never finished.
pub async fn measure(
    qmp: &Client,
    windows_secs: &[i64],
    ram_bytes: f64,
) -> Result<Vec<Sample>, MeasureError> {
    // QEMU samples per GiB of each RAM block: a small guest gets few.
    let sampled_pages = SAMPLE_PAGES as f64 * ram_bytes / GIB;
    let mut samples = Vec::new();
    for &window in windows_secs {
        let info = window_of(qmp, window, DirtyRateMode::PageSampling).await?;
        let rate = info.dirty_rate.ok_or(MeasureError::NoRate)?;
        samples.push(Sample::sampled(
            window as f64,
            rate as f64 * MIB as f64 * window as f64,
            ram_bytes,
            sampled_pages,
        ));
    }
    Ok(samples)
}

const GIB: f64 = (1u64 << 30) as f64;

/// Each vCPU's dirty rate over one second, bytes/s by vCPU index, from
/// KVM's dirty ring (which logs dirty pages per vCPU); QEMU refuses when
/// a KVM guest runs without one. Only for guests defined with a ring:
/// asked of a TCG guest, QEMU 7.2 aborts (seen on this project's test
/// machine), taking the guest with it.
///
/// # Errors
/// QEMU's refusal, or a measurement that never finished or gave no
/// per-vCPU rates.
pub async fn per_vcpu(qmp: &Client) -> Result<Vec<f64>, MeasureError> {
    let info = window_of(qmp, 1, DirtyRateMode::DirtyRing).await?;
    let vcpus = info.vcpu_dirty_rate.ok_or(MeasureError::NoRate)?;
    let count = vcpus
        .iter()
        .map(|v| v.id.max(0) as usize + 1)
        .max()
        .unwrap_or(0);
    let mut rates = vec![0.0; count];
    for v in vcpus {
        rates[v.id.max(0) as usize] = v.dirty_rate.max(0) as f64 * MIB as f64;
    }
    Ok(rates)
}

/// Runs one `calc-dirty-rate` window and waits for its result.
async fn window_of(
    qmp: &Client,
    window: i64,
    mode: DirtyRateMode,
) -> Result<DirtyRateInfo, MeasureError> {
    qmp.execute(&CalcDirtyRate {
        calc_time: window,
        // Sampling only: the other modes count every page.
        sample_pages: (mode == DirtyRateMode::PageSampling).then_some(SAMPLE_PAGES),
        mode: Some(mode),
    })
    .await
    .map_err(MeasureError::Start)?;
    let window_ends = Instant::now() + Duration::from_secs(window.max(0) as u64);
    let deadline = window_ends + Duration::from_secs(10);
    loop {
        // Often once the window has run: the slice probe counts the vCPU's
        // CPU time until the result is in, so each poll's wait is CPU time
        // the window never saw.
        let poll = if Instant::now() < window_ends {
            Duration::from_millis(200)
        } else {
            Duration::from_millis(20)
        };
        tokio::time::sleep(poll).await;
        let info = qmp
            .execute(&QueryDirtyRate)
            .await
            .map_err(MeasureError::Query)?;
        if info.status == DirtyRateStatus::Measured {
            return Ok(info);
        }
        if Instant::now() > deadline {
            return Err(MeasureError::Unfinished(window));
        }
    }
}

/// One line describing samples and the model fitted to them.
pub fn describe(samples: &[Sample], model: &converge::DirtyModel) -> String {
    let windows: Vec<String> = samples
        .iter()
        .map(|s| format!("{:.0} MiB in {:.0} s", mib(s.dirtied), s.window_secs))
        .collect();
    format!(
        "dirtied {}: rate {}{:.0} MiB/s, working set {:.0} MiB",
        windows.join(", "),
        if model.rate_is_lower_bound {
            "at least "
        } else {
            ""
        },
        mib(model.rate),
        mib(model.working_set)
    )
}
