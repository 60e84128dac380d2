//! Units where they cross a boundary.
//!
//! The wire speaks MiB/s and percent because people read it; QEMU and the
//! controller work in bytes/s and fractions. The conversions live here,
//! once, and the ones from untrusted numbers are checked.

use std::fmt;

use serde::{Deserialize, Serialize};

/// One mebibyte.
pub const MIB: u64 = 1 << 20;
/// One mebibyte, for arithmetic on measured (floating-point) sizes.
pub const MIB_F64: f64 = MIB as f64;

/// Bytes as MiB, for display and for figures in MiB.
pub fn mib(bytes: f64) -> f64 {
    bytes / MIB_F64
}

/// A data rate: bytes per second.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Bandwidth(u64);

impl Bandwidth {
    /// What libvirt uses for "unlimited": 8 PiB/s.
    pub const UNLIMITED: Bandwidth = Bandwidth(1 << 53);

    /// A rate given in MiB/s, as users and the wire give it; `None` if it
    /// does not fit in bytes/s (QEMU takes at most 2^63 − 1 bytes/s, and
    /// anything above [`Bandwidth::UNLIMITED`] means the same).
    pub fn from_mib_s(mib_s: u64) -> Option<Bandwidth> {
        mib_s
            .checked_mul(MIB)
            .filter(|b| *b <= Self::UNLIMITED.0)
            .map(Bandwidth)
    }

    /// Bytes per second.
    pub const fn bytes_per_sec(self) -> u64 {
        self.0
    }

    /// Bytes per second, for arithmetic with measured rates.
    pub fn as_f64(self) -> f64 {
        self.0 as f64
    }

    /// Whole MiB/s, rounded, as the wire reports a cap.
    pub fn mib_s(self) -> u64 {
        (self.0 + MIB / 2) / MIB
    }
}

impl fmt::Display for Bandwidth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.1} MiB/s", mib(self.0 as f64))
    }
}

/// A vCPU throttle: the share of CPU time taken from the guest, 0 to 1.
#[derive(Debug, Clone, Copy, Default, PartialEq, PartialOrd, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Throttle(f64);

impl Throttle {
    /// No throttle.
    pub const NONE: Throttle = Throttle(0.0);

    /// A throttle from a fraction, clamped to 0..=1.
    pub fn from_fraction(fraction: f64) -> Throttle {
        Throttle(if fraction.is_nan() {
            0.0
        } else {
            fraction.clamp(0.0, 1.0)
        })
    }

    /// A throttle from a percentage, clamped to 0..=100.
    pub fn from_percent(percent: f64) -> Throttle {
        Self::from_fraction(percent / 100.0)
    }

    /// The share of CPU time taken, 0 to 1.
    pub const fn fraction(self) -> f64 {
        self.0
    }

    /// The same, in percent.
    pub fn percent(self) -> f64 {
        self.0 * 100.0
    }

    /// True when something is taken.
    pub fn is_on(self) -> bool {
        self.0 > 0.0
    }
}

impl fmt::Display for Throttle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.1} %", self.percent())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bandwidth_from_the_wire_is_overflow_checked() {
        assert_eq!(Bandwidth::from_mib_s(64).unwrap().bytes_per_sec(), 64 << 20);
        assert_eq!(Bandwidth::from_mib_s(64).unwrap().mib_s(), 64);
        assert!(Bandwidth::from_mib_s(u64::MAX).is_none());
        assert!(
            Bandwidth::from_mib_s(u64::MAX / MIB).is_none(),
            "above 8 PiB/s"
        );
        assert_eq!(
            Bandwidth::from_mib_s(1 << 33).unwrap(),
            Bandwidth::UNLIMITED
        );
    }

    #[test]
    fn throttle_converts_between_percent_and_fraction_and_clamps() {
        assert_eq!(Throttle::from_percent(25.0).fraction(), 0.25);
        assert_eq!(Throttle::from_fraction(0.999).percent(), 99.9);
        assert_eq!(Throttle::from_percent(150.0).fraction(), 1.0);
        assert_eq!(Throttle::from_fraction(f64::NAN), Throttle::NONE);
        assert!(!Throttle::NONE.is_on());
    }
}
