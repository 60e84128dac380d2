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

const MIB: f64 = 1024.0 * 1024.0;
/// Pages sampled per GiB (QEMU's default is 512): finer than 1 MiB on a
/// small guest.
const SAMPLE_PAGES: i64 = 4096;

/// Measures one window after another.
///
/// # Errors
/// QEMU's refusal, or a measurement that never finished.
pub async fn measure(qmp: &Client, windows_secs: &[i64]) -> Result<Vec<Sample>, String> {
    let mut samples = Vec::new();
    for &window in windows_secs {
        qmp.execute(&CalcDirtyRate {
            calc_time: window,
            sample_pages: Some(SAMPLE_PAGES),
            mode: Some(DirtyRateMode::PageSampling),
        })
        .await
        .map_err(|e| format!("calc-dirty-rate failed: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(window as u64 + 10);
        let rate = loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let info = qmp
                .execute(&QueryDirtyRate)
                .await
                .map_err(|e| format!("query-dirty-rate failed: {e}"))?;
            if info.status == DirtyRateStatus::Measured {
                break info.dirty_rate.ok_or("query-dirty-rate gave no rate")?;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the {window} s dirty-rate measurement never finished"
                ));
            }
        };
        samples.push(Sample {
            window_secs: window as f64,
            dirtied: rate as f64 * MIB * window as f64,
        });
    }
    Ok(samples)
}

/// One line describing samples and the model fitted to them.
pub fn describe(samples: &[Sample], model: &converge::DirtyModel) -> String {
    let windows: Vec<String> = samples
        .iter()
        .map(|s| format!("{:.0} MiB in {:.0} s", s.dirtied / MIB, s.window_secs))
        .collect();
    format!(
        "dirtied {}: rate {}{:.0} MiB/s, working set {:.0} MiB",
        windows.join(", "),
        if model.rate_is_lower_bound {
            "at least "
        } else {
            ""
        },
        model.rate / MIB,
        model.working_set / MIB
    )
}
