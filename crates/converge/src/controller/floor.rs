//! What one slice of CPU lets a throttled guest dirty: where throttling
//! stops being able to make a pass small enough.

use serde::{Deserialize, Serialize};

use super::Observation;
use types::units::MIB_F64 as MIB;

/// CPU time the throttled vCPUs had in a pass.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct VcpuUse {
    /// Seconds of CPU time, summed over the throttled vCPUs.
    pub cpu_secs: f64,
    /// The least CPU time the mechanism gives a throttled vCPU whenever it
    /// runs at all (a CPU quota's minimum, 1 ms), seconds.
    pub min_slice_secs: f64,
}

/// What the guest dirties in the least CPU time the throttle can give
/// it. No throttle makes a pass dirty less unless the vCPU gets no slice
/// at all in it, so when a slice's dirt exceeds what the downtime lets
/// through at a switchover, throttling converges only by chance (a pass
/// that happens to fall between two slices).
///
/// Measured from a window in which the throttled vCPUs dirtied `dirtied`
/// bytes in some CPU time: a pass, or the pre-flight's short probe. A
/// window that filled the working set undercounts the dirt, so the floor
/// is a lower bound: it may hide a floor, never invent one.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SliceFloor {
    /// What the window dirtied, bytes.
    pub dirtied: f64,
    /// The vCPU time in it, and the slice.
    pub vcpu: VcpuUse,
}

impl SliceFloor {
    /// The floor a window shows, if it measured enough CPU time to say (at
    /// least one slice: a window whose slice fell outside it would give a
    /// wild rate).
    pub fn measured(dirtied: f64, vcpu: VcpuUse) -> Option<SliceFloor> {
        if vcpu.min_slice_secs <= 0.0 || vcpu.cpu_secs < vcpu.min_slice_secs {
            return None;
        }
        Some(SliceFloor {
            dirtied: dirtied.max(0.0),
            vcpu,
        })
    }

    /// Bytes dirtied in one slice, at the window's bytes per CPU second.
    pub fn bytes(&self) -> f64 {
        self.dirtied / self.vcpu.cpu_secs * self.vcpu.min_slice_secs
    }

    /// The floor a throttled pass shows.
    pub fn of(obs: &Observation) -> Option<SliceFloor> {
        if obs.throttle <= 0.0 || obs.bandwidth <= 0.0 {
            return None;
        }
        SliceFloor::measured(obs.remaining, obs.vcpu?)
    }

    /// `window` names where it was seen ("the last pass").
    pub(super) fn describe(&self, window: &str) -> String {
        format!(
            "each {:.0} ms slice of CPU the throttle gives lets the guest dirty about {:.0} MiB \
             ({window}: {:.0} MiB in {:.1} ms of vCPU time)",
            self.vcpu.min_slice_secs * 1000.0,
            self.bytes() / MIB,
            self.dirtied / MIB,
            self.vcpu.cpu_secs * 1000.0,
        )
    }
}
