//! The disks' dirty rate, and the vCPU throttle that lets a copy the
//! guest's writes outrun converge (adaptive jobs).
//!
//! A mirror re-sends every block the guest writes after the mirror sent
//! it: its length grows by those bytes (QEMU adds them to what is left),
//! so the growth of the length over a window is the disks' dirty rate, the
//! counterpart of the memory's. The bytes left shrink at the copy rate
//! minus that rate. When the writes come within [`OUTRUN`] of the copy
//! (the same bound `estimate` judges a copy by), the copy barely gains or
//! loses; the guest's vCPUs issue the writes, so a vCPU throttle slows
//! them. As with memory, the rate is taken to scale with the vCPU time
//! left: the throttle aims for writes at [`TARGET`] of the copy rate,
//! and each window re-measures under the throttle in force, so a guest
//! that slows less than that model says is throttled further at the next
//! decision. Once the mirrors are in sync, the throttle is lifted: from
//! then on the memory's controller owns it.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

/// How far back the rates look. The dirty rate a mirror shows swings with
/// where the guest writes against where the copy is (a block written
/// before the copy reached it adds nothing): seconds of it are needed to
/// judge, and a throttle is eased only after two quiet windows in a row.
pub const WINDOW: Duration = Duration::from_secs(5);

/// Writes at this share of the copy rate or more: the copy is outrun.
pub const OUTRUN: f64 = 0.9;

/// The share of the copy rate a throttle aims the writes at: the bytes
/// left then shrink at half the copy rate or better.
pub const TARGET: f64 = 0.5;

/// A throttle that moves by less than this stays where it is.
const STEP: f64 = 0.02;

/// The copy's rates over the last window, bytes/s.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DiskRates {
    /// Bytes the guest's writes added to the copy.
    pub dirty: f64,
    /// Bytes the copy sent.
    pub copy: f64,
    /// Bytes the guest wrote to the copied disks (QEMU's block counters),
    /// when known.
    pub written: Option<f64>,
}

/// A change of the vCPU throttle for the disks' sake.
#[derive(Debug, Clone, PartialEq)]
pub struct PaceDecision {
    /// The new throttle, 0..=max.
    pub throttle: f64,
    /// Why, in words, for the job's timeline.
    pub why: String,
}

#[derive(Debug, Clone, Copy)]
struct Point {
    at: Instant,
    total: u64,
    processed: u64,
    written: Option<u64>,
}

/// Follows the copy's totals, and says which throttle the copy needs.
#[derive(Debug)]
pub struct DiskPace {
    window: Duration,
    points: VecDeque<Point>,
    throttle: f64,
    max: f64,
    /// Windows in a row whose writes were well under the copy.
    quiet: u32,
}

impl DiskPace {
    /// A pace for a throttle mechanism that goes up to `max` (0 when the
    /// job cannot throttle: the rates are still measured).
    pub fn new(max: f64) -> Self {
        DiskPace {
            window: WINDOW,
            points: VecDeque::new(),
            throttle: 0.0,
            max,
            quiet: 0,
        }
    }

    /// The throttle this pace has in force.
    pub fn throttle(&self) -> f64 {
        self.throttle
    }

    /// Feeds the copy's totals at `at` (and the bytes the guest wrote to
    /// the copied disks, if known); the rates over the last window once the
    /// readings cover one.
    pub fn observe(
        &mut self,
        at: Instant,
        total: u64,
        processed: u64,
        written: Option<u64>,
    ) -> Option<DiskRates> {
        self.points.push_back(Point {
            at,
            total,
            processed,
            written,
        });
        while self
            .points
            .get(1)
            .is_some_and(|p| at.duration_since(p.at) >= self.window)
        {
            self.points.pop_front();
        }
        let first = self.points.front()?;
        let secs = at.duration_since(first.at).as_secs_f64();
        if secs < self.window.as_secs_f64() * 0.9 {
            return None;
        }
        Some(DiskRates {
            dirty: total.saturating_sub(first.total) as f64 / secs,
            copy: processed.saturating_sub(first.processed) as f64 / secs,
            written: written
                .zip(first.written)
                .map(|(now, then)| now.saturating_sub(then) as f64 / secs),
        })
    }

    /// The throttle the copy needs at `rates` (a window's, from
    /// [`DiskPace::observe`]), if it differs from the one in force. The
    /// caller applies it and calls [`DiskPace::applied`].
    pub fn decide(&mut self, rates: DiskRates) -> Option<PaceDecision> {
        if self.max <= 0.0 || rates.copy <= 0.0 {
            return None;
        }
        // Blocks written again after the copy sent them can come no faster
        // than the copy sends: once the writes lap the copy that figure
        // saturates, like a memory pass's dirty count. It says whether the
        // copy is outrun; the guest's own write rate (never less) says by
        // how much.
        let rate = rates.dirty.max(rates.written.unwrap_or(0.0));
        // What the guest would write unthrottled, by the model.
        let unthrottled = rate / (1.0 - self.throttle).max(1.0 - self.max);
        let wanted = (1.0 - TARGET * rates.copy / unthrottled).clamp(0.0, self.max);
        let (dirty, copy) = (mib(rates.dirty), mib(rates.copy));
        if rates.dirty >= OUTRUN * rates.copy && wanted > self.throttle + STEP {
            let written = rates
                .written
                .map(|w| format!("the guest writes {:.1} MiB/s, ", mib(w)))
                .unwrap_or_default();
            return Some(PaceDecision {
                throttle: wanted,
                why: format!(
                    "disk writes outrun the copy: {written}{dirty:.1} MiB/s of it to blocks \
                     already sent, against {copy:.1} MiB/s sent (under a {:.1} % throttle); \
                     aiming the writes at {:.0} % of the copy",
                    self.throttle * 100.0,
                    TARGET * 100.0
                ),
            });
        }
        let quiet = rate < TARGET / 2.0 * rates.copy;
        if !quiet {
            self.quiet = 0;
            return None;
        }
        self.quiet += 1;
        if self.quiet < 2 {
            // The next window must be quiet on its own.
            self.restart();
        }
        if self.throttle > 0.0 && self.quiet >= 2 && wanted < self.throttle - STEP {
            return Some(PaceDecision {
                throttle: wanted,
                why: format!(
                    "disk writes well under the copy: {:.1} MiB/s against {copy:.1} MiB/s sent; \
                     easing the throttle",
                    mib(rate)
                ),
            });
        }
        None
    }

    /// The throttle `throttle` is in force from `at`: later rates are
    /// measured under it alone.
    pub fn applied(&mut self, throttle: f64) {
        self.throttle = throttle;
        self.quiet = 0;
        self.restart();
    }

    /// The next rates come from a new window.
    fn restart(&mut self) {
        if let Some(last) = self.points.back().copied() {
            self.points.clear();
            self.points.push_back(last);
        }
    }
}

fn mib(bytes: f64) -> f64 {
    bytes / 1_048_576.0
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: f64 = 1_048_576.0;

    /// A guest that writes `write` MiB/s unthrottled (scaled by the vCPU
    /// time the throttle leaves) and a copy of `copy` MiB/s, polled every
    /// 200 ms through a pace.
    struct Sim {
        pace: DiskPace,
        at: Instant,
        total: f64,
        processed: f64,
    }

    impl Sim {
        fn new() -> Self {
            Sim {
                pace: DiskPace::new(0.999),
                at: Instant::now(),
                total: 64.0 * MIB,
                processed: 0.0,
            }
        }

        /// Runs `secs`; the throttle then, and the reasons of its changes.
        fn run(&mut self, write: f64, copy: f64, secs: u64) -> (f64, Vec<String>) {
            let mut why = Vec::new();
            for _ in 0..secs * 5 {
                self.at += Duration::from_millis(200);
                self.total += write * MIB * (1.0 - self.pace.throttle()) / 5.0;
                self.processed += copy * MIB / 5.0;
                let rates =
                    self.pace
                        .observe(self.at, self.total as u64, self.processed as u64, None);
                if let Some(d) = rates.and_then(|r| self.pace.decide(r)) {
                    why.push(d.why);
                    self.pace.applied(d.throttle);
                }
            }
            (self.pace.throttle(), why)
        }
    }

    #[test]
    fn a_copy_that_gains_is_never_throttled() {
        let (throttle, why) = Sim::new().run(0.8, 1.0, 20);
        assert_eq!(throttle, 0.0, "{why:?}");
    }

    #[test]
    fn writes_that_outrun_the_copy_are_throttled_to_half_of_it_at_the_first_window() {
        let mut sim = Sim::new();
        let (throttle, why) = sim.run(8.0, 1.0, 6);
        // 8 MiB/s against 1 MiB/s: aim at 0.5 MiB/s, 1 - 0.5/8.
        assert!((throttle - (1.0 - 0.5 / 8.0)).abs() < 0.01, "{throttle}");
        assert_eq!(why.len(), 1, "{why:?}");
        assert!(why[0].contains("outrun"), "{why:?}");
        // Under it the writes are half the copy: nothing more to do.
        let (again, more) = sim.run(8.0, 1.0, 10);
        assert_eq!(again, throttle);
        assert!(more.is_empty(), "{more:?}");
    }

    #[test]
    fn a_guest_that_slows_less_than_the_model_is_throttled_further() {
        let mut pace = DiskPace::new(0.999);
        let start = Instant::now();
        let mut total = 0.0;
        let mut processed = 0.0;
        // The guest's writes fall only with the square root of its vCPU
        // time: the first throttle is not enough, the next window says so.
        for tick in 0..60u64 {
            let at = start + Duration::from_millis(tick * 200);
            total += 4.0 * MIB * (1.0 - pace.throttle()).sqrt() / 5.0;
            processed += MIB / 5.0;
            if let Some(d) = pace
                .observe(at, total as u64, processed as u64, None)
                .and_then(|r| pace.decide(r))
            {
                pace.applied(d.throttle);
            }
        }
        let writes = 4.0 * (1.0 - pace.throttle()).sqrt();
        assert!(writes < OUTRUN, "{} -> {writes}", pace.throttle());
    }

    #[test]
    fn the_throttle_is_eased_when_the_writes_stop() {
        let mut sim = Sim::new();
        let (throttle, _) = sim.run(8.0, 1.0, 6);
        assert!(throttle > 0.9);
        // One quiet window is not enough: the writes may only be elsewhere.
        let (still, _) = sim.run(0.0, 1.0, 6);
        assert_eq!(still, throttle);
        let (throttle, why) = sim.run(0.0, 1.0, 5);
        assert_eq!(throttle, 0.0, "{why:?}");
        assert!(why.last().unwrap().contains("easing"), "{why:?}");
    }

    #[test]
    fn without_a_mechanism_it_only_measures() {
        let mut pace = DiskPace::new(0.0);
        let start = Instant::now();
        let mut rates = None;
        for tick in 0..=25u64 {
            let at = start + Duration::from_millis(tick * 200);
            rates = pace.observe(
                at,
                (tick as f64 * 0.6 * MIB) as u64,
                (tick as f64 * 0.2 * MIB) as u64,
                Some((tick as f64 * 2.0 * MIB) as u64),
            );
        }
        let rates = rates.expect("a window's rates");
        assert!((rates.dirty - 3.0 * MIB).abs() < 0.01 * MIB, "{rates:?}");
        assert!((rates.copy - MIB).abs() < 0.01 * MIB, "{rates:?}");
        assert!(
            (rates.written.unwrap() - 10.0 * MIB).abs() < 0.01 * MIB,
            "{rates:?}"
        );
        assert_eq!(pace.decide(rates), None);
    }

    #[test]
    fn a_saturated_dirty_rate_is_sized_by_what_the_guest_really_writes() {
        let mut pace = DiskPace::new(0.999);
        let start = Instant::now();
        let mut decision = None;
        // The guest writes 16 MiB/s; written again after the copy: no more
        // than the copy's 1 MiB/s (plus a little).
        for tick in 0..=25u64 {
            let at = start + Duration::from_millis(tick * 200);
            let t = tick as f64 / 5.0;
            let rates = pace.observe(
                at,
                (64.0 * MIB + 1.1 * MIB * t) as u64,
                (MIB * t) as u64,
                Some((16.0 * MIB * t) as u64),
            );
            decision = decision.or(rates.and_then(|r| pace.decide(r)));
        }
        let decision = decision.expect("a throttle");
        // 16 MiB/s aimed at 0.5: 1 - 0.5/16, at once.
        assert!(
            (decision.throttle - (1.0 - 0.5 / 16.0)).abs() < 0.005,
            "{decision:?}"
        );
        assert!(
            decision.why.contains("the guest writes 16.0 MiB/s"),
            "{}",
            decision.why
        );
    }
}
