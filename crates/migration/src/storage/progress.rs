//! Whether a disk copy gains on the guest's writes.
//!
//! A mirror re-copies every block written while it runs: a guest that
//! writes its disks as fast as the link copies them keeps the bytes left
//! where they are, and the copy would run forever. Like the memory copy's
//! stall check, progress is judged by new lows of what is left: none for a
//! whole window, and the copy is reported as not converging, with the rates
//! that show why.

use std::time::Duration;

use tokio::time::Instant;

/// A new low must beat the last one by this share to count as progress.
const NEW_LOW: f64 = 0.95;

/// Bytes of the copy, summed over the disks, at one moment.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Point {
    at: Instant,
    total: u64,
    processed: u64,
}

impl Point {
    fn left(&self) -> u64 {
        self.total.saturating_sub(self.processed)
    }
}

/// What a copy that stopped gaining looked like over its window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NoProgress {
    /// Bytes left now.
    pub left: u64,
    /// Seconds since the last new low.
    pub secs: f64,
    /// What the guest wrote meanwhile, bytes/s.
    pub write_rate: f64,
    /// What the copy sent meanwhile, bytes/s.
    pub copy_rate: f64,
    /// What the guest wrote to the copied disks, bytes/s (QEMU's block
    /// counters over the last window), when known: more than `write_rate`
    /// once the writes lap the copy.
    pub guest_write_rate: Option<f64>,
}

impl NoProgress {
    /// "the guest wrote its disks at X MiB/s, adding Y MiB/s to the copy"
    /// or, without the block counters, "the guest's writes added Y MiB/s
    /// to the copy".
    pub fn writes(&self) -> String {
        let added = self.write_rate / 1_048_576.0;
        match self.guest_write_rate {
            Some(w) => format!(
                "the guest wrote its disks at {:.1} MiB/s, adding {added:.1} MiB/s to the copy",
                w / 1_048_576.0
            ),
            None => format!("the guest's writes added {added:.1} MiB/s to the copy"),
        }
    }
}

/// Follows a copy's bytes left.
#[derive(Debug)]
pub struct CopyWatch {
    window: Duration,
    low: Option<Point>,
}

impl CopyWatch {
    /// A copy that may go `window` without a new low.
    pub fn new(window: Duration) -> Self {
        CopyWatch { window, low: None }
    }

    /// Feeds the copy's totals at `at`; says so once the copy has gone a
    /// whole window without a new low.
    pub fn observe(&mut self, at: Instant, total: u64, processed: u64) -> Option<NoProgress> {
        let now = Point {
            at,
            total,
            processed,
        };
        let low = match self.low {
            // Nothing left is caught up, however long it stays so.
            Some(low) if now.left() > 0 && (now.left() as f64) >= low.left() as f64 * NEW_LOW => {
                low
            }
            _ => {
                self.low = Some(now);
                return None;
            }
        };
        let since = at.duration_since(low.at);
        if since < self.window {
            return None;
        }
        let secs = since.as_secs_f64();
        Some(NoProgress {
            left: now.left(),
            secs,
            write_rate: total.saturating_sub(low.total) as f64 / secs,
            copy_rate: processed.saturating_sub(low.processed) as f64 / secs,
            guest_write_rate: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn a_copy_that_gains_is_never_stopped() {
        let start = Instant::now();
        let mut watch = CopyWatch::new(Duration::from_secs(30));
        // 64 MiB at 1 MiB/s while the guest writes 0.5 MiB/s: slow, but
        // every few seconds a new low.
        for s in 0..120u64 {
            let total = 64 * MIB + s * MIB / 2;
            let processed = (s * MIB).min(total);
            let at = start + Duration::from_secs(s);
            assert_eq!(watch.observe(at, total, processed), None, "at {s} s");
        }
    }

    #[test]
    fn a_copy_outrun_by_the_writes_is_reported_with_the_rates() {
        let start = Instant::now();
        let mut watch = CopyWatch::new(Duration::from_secs(30));
        let mut seen = None;
        // The guest writes 2 MiB/s, the copy sends 1 MiB/s.
        for s in 0..=40u64 {
            let at = start + Duration::from_secs(s);
            if let Some(stop) = watch.observe(at, 64 * MIB + 2 * s * MIB, s * MIB) {
                seen = Some((s, stop));
                break;
            }
        }
        let (s, stop) = seen.expect("reported");
        assert_eq!(s, 30);
        assert_eq!(stop.left, 94 * MIB);
        assert!((stop.write_rate - 2.0 * MIB as f64).abs() < 1.0);
        assert!((stop.copy_rate - MIB as f64).abs() < 1.0);
    }
}
