//! Measuring a running guest's dirty rate with QEMU's `calc-dirty-rate`.
//!
//! Page sampling is the only mode that works for every accelerator (QEMU
//! 7.2 has no sub-second windows, and its dirty-bitmap mode crashes under
//! TCG), so each window is at least a second.

use std::time::Duration;

use converge::estimate::Sample;
use qmp::commands::dirty_rate::{CalcDirtyRate, DirtyRateMode, DirtyRateStatus, QueryDirtyRate};
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

/// Measures one window after another.
///
/// # Errors
/// QEMU's refusal, or a measurement that never finished.
pub async fn measure(qmp: &Client, windows_secs: &[i64]) -> Result<Vec<Sample>, MeasureError> {
    let mut samples = Vec::new();
    for &window in windows_secs {
        qmp.execute(&CalcDirtyRate {
            calc_time: window,
            sample_pages: Some(SAMPLE_PAGES),
            mode: Some(DirtyRateMode::PageSampling),
        })
        .await
        .map_err(MeasureError::Start)?;
        let deadline = Instant::now() + Duration::from_secs(window as u64 + 10);
        let rate = loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let info = qmp
                .execute(&QueryDirtyRate)
                .await
                .map_err(MeasureError::Query)?;
            if info.status == DirtyRateStatus::Measured {
                break info.dirty_rate.ok_or(MeasureError::NoRate)?;
            }
            if Instant::now() > deadline {
                return Err(MeasureError::Unfinished(window));
            }
        };
        samples.push(Sample {
            window_secs: window as f64,
            dirtied: rate as f64 * MIB as f64 * window as f64,
        });
    }
    Ok(samples)
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
