//! QEMU's auto-converge (7.2), as a [`Steering`] for the simulator.
//!
//! At a sync, if at least a second has passed since the last check, QEMU
//! compares the bytes dirtied in the period with the bytes sent in it; a
//! period is "high" when dirtied > threshold × sent. Every second high
//! period (the counter is not reset by low ones) it starts throttling at
//! `initial`, then adds `increment`, up to `max`. It never lowers it.

use crate::model::{Steer, Steering, SyncView};

/// QEMU's auto-converge parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AutoConvergeParams {
    /// `cpu-throttle-initial`, as a fraction.
    pub initial: f64,
    /// `cpu-throttle-increment`, as a fraction.
    pub increment: f64,
    /// `max-cpu-throttle`, as a fraction.
    pub max: f64,
    /// `throttle-trigger-threshold` as a fraction.
    pub threshold: f64,
}

impl Default for AutoConvergeParams {
    /// QEMU 7.2's defaults.
    fn default() -> Self {
        AutoConvergeParams {
            initial: 0.20,
            increment: 0.10,
            max: 0.99,
            threshold: 0.50,
        }
    }
}

/// The simulated auto-converge state machine.
#[derive(Debug, Clone)]
pub struct QemuAutoConverge {
    params: AutoConvergeParams,
    throttle: f64,
    high_periods: u32,
    last_check: f64,
    dirtied: f64,
    sent: f64,
}

impl QemuAutoConverge {
    /// QEMU's auto-converge with `params`, before its first step.
    pub fn new(params: AutoConvergeParams) -> Self {
        QemuAutoConverge {
            params,
            throttle: 0.0,
            high_periods: 0,
            last_check: 0.0,
            dirtied: 0.0,
            sent: 0.0,
        }
    }
}

impl Steering for QemuAutoConverge {
    fn at_sync(&mut self, view: &SyncView) -> Steer {
        self.dirtied += view.remaining;
        self.sent += view.pass_bytes;
        if view.elapsed - self.last_check < 1.0 {
            return Steer::default();
        }
        let high = self.dirtied > self.params.threshold * self.sent;
        self.last_check = view.elapsed;
        self.dirtied = 0.0;
        self.sent = 0.0;
        if high {
            self.high_periods += 1;
            if self.high_periods >= 2 {
                self.high_periods = 0;
                self.throttle = if self.throttle == 0.0 {
                    self.params.initial
                } else {
                    (self.throttle + self.params.increment).min(self.params.max)
                };
                return Steer {
                    throttle: Some(self.throttle),
                    ..Steer::default()
                };
            }
        }
        Steer::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use types::units::MIB_F64 as MIB;

    #[test]
    fn steps_up_every_second_high_period_to_the_cap() {
        let mut ac = QemuAutoConverge::new(AutoConvergeParams::default());
        let mut throttles = Vec::new();
        for pass in 1..=40 {
            let steer = ac.at_sync(&SyncView {
                elapsed: f64::from(pass) * 4.0,
                passes: pass,
                remaining: 256.0 * MIB,
                pass_secs: 4.0,
                pass_bytes: 256.0 * MIB,
                throttle: 0.0,
                downtime: 0.3,
                bandwidth: 64.0 * MIB,
            });
            if let Some(t) = steer.throttle {
                throttles.push((t * 100.0).round() as u32);
            }
        }
        assert_eq!(throttles[..9], [20, 30, 40, 50, 60, 70, 80, 90, 99]);
        assert!(throttles[9..].iter().all(|&t| t == 99));
    }
}
