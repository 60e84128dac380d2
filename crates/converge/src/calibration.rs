//! Calibrating predictions on how past ones fared.
//!
//! The model misses in ways that depend on the guest more than on the
//! link: it sends a whole first pass where QEMU skips zero pages (a guest
//! that uses half its RAM migrates about twice as fast as predicted), and a
//! hot writer's passes stay near its working set longer than its
//! proportional slowdown says (1.4–2.9x slower than predicted). A
//! domain's workload is usually the same from one migration to the next,
//! so the ratio real / predicted of its recent jobs corrects the next
//! prediction; their spread says how sure the correction is.

/// One past job: what was predicted once the guest was measured, and what
/// it took.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PastJob {
    /// The prediction, s.
    pub predicted_secs: f64,
    /// The job's real time, s.
    pub real_secs: f64,
}

/// The correction from past jobs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Calibration {
    /// Jobs it rests on.
    pub jobs: usize,
    /// The median of real / predicted: multiply a prediction by it.
    pub factor: f64,
    /// The lowest real / predicted among them.
    pub low: f64,
    /// The highest.
    pub high: f64,
}

/// Jobs used at most: the recent ones say most about the guest today.
pub const MAX_JOBS: usize = 5;

/// The calibration from `past`, newest first; `None` without a usable job
/// (one with a positive prediction and time).
pub fn calibrate(past: &[PastJob]) -> Option<Calibration> {
    let mut ratios: Vec<f64> = past
        .iter()
        .filter(|j| j.predicted_secs > 0.0 && j.real_secs > 0.0)
        .take(MAX_JOBS)
        .map(|j| j.real_secs / j.predicted_secs)
        .collect();
    if ratios.is_empty() {
        return None;
    }
    ratios.sort_by(f64::total_cmp);
    let mid = ratios.len() / 2;
    let factor = if ratios.len().is_multiple_of(2) {
        (ratios[mid - 1] + ratios[mid]) / 2.0
    } else {
        ratios[mid]
    };
    Some(Calibration {
        jobs: ratios.len(),
        factor,
        low: ratios[0],
        high: ratios[ratios.len() - 1],
    })
}

impl Calibration {
    /// `secs` corrected.
    pub fn apply(&self, secs: f64) -> f64 {
        secs * self.factor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(predicted_secs: f64, real_secs: f64) -> PastJob {
        PastJob {
            predicted_secs,
            real_secs,
        }
    }

    #[test]
    fn no_usable_job_gives_no_calibration() {
        assert_eq!(calibrate(&[]), None);
        assert_eq!(calibrate(&[job(0.0, 5.0), job(5.0, 0.0)]), None);
    }

    #[test]
    fn the_factor_is_the_median_ratio_and_the_spread_its_extremes() {
        // The benchmark's light guest: predicted 13.7 s, took 6.4 s.
        let c = calibrate(&[job(13.7, 6.4), job(13.0, 6.5), job(12.0, 12.0)]).unwrap();
        assert_eq!(c.jobs, 3);
        assert!((c.factor - 6.5 / 13.0).abs() < 1e-9, "{c:?}");
        assert!((c.low - 6.4 / 13.7).abs() < 1e-9);
        assert!((c.high - 1.0).abs() < 1e-9);
        assert!((c.apply(13.0) - 6.5).abs() < 1e-9);
    }

    #[test]
    fn an_even_count_takes_the_mean_of_the_middle_two() {
        let c = calibrate(&[job(10.0, 20.0), job(10.0, 30.0)]).unwrap();
        assert!((c.factor - 2.5).abs() < 1e-9);
    }

    #[test]
    fn only_the_most_recent_jobs_count() {
        let mut past = vec![job(10.0, 10.0); MAX_JOBS];
        past.push(job(10.0, 100.0));
        let c = calibrate(&past).unwrap();
        assert_eq!(c.jobs, MAX_JOBS);
        assert_eq!(c.high, 1.0);
    }
}
