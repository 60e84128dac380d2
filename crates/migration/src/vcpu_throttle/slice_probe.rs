//! How much the writing vCPU dirties in one slice of CPU, measured in the
//! first pass rather than learnt from the throttled passes.
//!
//! The controller's slice-floor rule ([`converge::controller::SliceFloor`])
//! needs the guest's dirt per CPU second. A throttled pass gives it only
//! from below: the benchmark's hot guest fills its 256 MiB working set in
//! every pass up to 99.75 %, and only that pass (13 ms of CPU in 4 s)
//! shows more than a slice's worth, 12 s into the migration, after 8 s of
//! the guest at 97–99.9 % for nothing. A one-second window with the writer
//! alone at [`SLICE_PROBE_THROTTLE`] gives it a few slices, too few to fill
//! the working set, so the same figure comes out at once.
//!
//! Only run when it can change the course of the job: with
//! `--allow-postcopy`, on a guest whose pre-flight filled its working set
//! faster than the link sends, and with one vCPU writing (the others'
//! probes already told which).

use super::writers::Probe;

/// How hard the probe throttles the writer: a 1 ms quota every 200 ms,
/// five slices in the second. At 99.9 % (one slice a second) the slice may
/// fall outside the window; at 99 % ten slices of the hot guest (23–30 MiB
/// each) fill its working set, which hides the figure.
pub const SLICE_PROBE_THROTTLE: f64 = 0.995;

/// What the probe saw.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SliceProbe {
    /// The vCPU probed.
    pub index: usize,
    /// Its throttle during the probe.
    pub throttle: f64,
    /// What the guest dirtied in the one-second window, bytes.
    pub dirtied: f64,
    /// The vCPU's CPU time from the throttle's start to the window's end,
    /// seconds: at least the window's, so the dirt per CPU second can only
    /// come out low.
    pub cpu_secs: f64,
}

impl SliceProbe {
    /// For the job's timeline.
    pub fn describe(&self) -> String {
        format!(
            "probe: vCPU {} at {:.1} % for 1 s, {:.0} MiB dirtied in {:.1} ms of its CPU time",
            self.index,
            self.throttle * 100.0,
            types::units::mib(self.dirtied),
            self.cpu_secs * 1000.0
        )
    }
}

/// Probes vCPU `index`; `None` if a throttle came first (the controller's
/// comes before any probe) or a reading failed.
pub async fn probe<P: Probe>(probe: &P, index: usize) -> Option<SliceProbe> {
    if !probe.throttle_one(index, SLICE_PROBE_THROTTLE).await.ok()? {
        return None;
    }
    // From the quota's start: the vCPU's CPU time before it is not the
    // probe's.
    let before = probe.cpu_times().get(index).copied().flatten();
    let dirtied = probe.dirtied_in_a_second().await;
    let after = probe.cpu_times().get(index).copied().flatten();
    if !probe.lift_one(index).await.ok()? {
        return None;
    }
    Some(SliceProbe {
        index,
        throttle: SLICE_PROBE_THROTTLE,
        dirtied: dirtied?,
        cpu_secs: after?.checked_sub(before?)? as f64 / 1e9,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vcpu_throttle::ThrottleError;
    use std::sync::Mutex;

    const MIB: f64 = 1048576.0;

    /// One vCPU that runs 6 ms under the probe and dirties 25 MiB a
    /// millisecond (the hot guest); CPU time read at each call.
    struct Hot {
        log: Mutex<Vec<String>>,
        cpu_ns: Mutex<u64>,
        throttle_in_force: bool,
        lifted_by_controller: bool,
    }

    impl Probe for Hot {
        fn cpu_times(&self) -> Vec<Option<u64>> {
            vec![Some(*self.cpu_ns.lock().unwrap())]
        }
        async fn throttle_one(&self, index: usize, throttle: f64) -> Result<bool, ThrottleError> {
            self.log
                .lock()
                .unwrap()
                .push(format!("probe {index} at {throttle}"));
            // Unthrottled until now: a second of CPU the probe must not
            // count.
            *self.cpu_ns.lock().unwrap() += 1_000_000_000;
            Ok(!self.throttle_in_force)
        }
        async fn lift_one(&self, index: usize) -> Result<bool, ThrottleError> {
            self.log.lock().unwrap().push(format!("lift {index}"));
            Ok(!self.lifted_by_controller)
        }
        async fn dirtied_in_a_second(&self) -> Option<f64> {
            *self.cpu_ns.lock().unwrap() += 6_000_000;
            Some(150.0 * MIB)
        }
    }

    fn hot() -> Hot {
        Hot {
            log: Mutex::new(Vec::new()),
            cpu_ns: Mutex::new(0),
            throttle_in_force: false,
            lifted_by_controller: false,
        }
    }

    #[tokio::test]
    async fn the_probe_counts_the_cpu_time_under_its_throttle_only() {
        let p = hot();
        let seen = probe(&p, 0).await.unwrap();
        assert_eq!(seen.dirtied, 150.0 * MIB);
        assert!((seen.cpu_secs - 0.006).abs() < 1e-9, "{seen:?}");
        assert_eq!(*p.log.lock().unwrap(), ["probe 0 at 0.995", "lift 0"]);
        let floor = converge::controller::SliceFloor::measured(
            seen.dirtied,
            converge::controller::VcpuUse {
                cpu_secs: seen.cpu_secs,
                min_slice_secs: 0.001,
            },
        )
        .unwrap();
        assert!((floor.bytes() / MIB - 25.0).abs() < 1e-6, "{floor:?}");
        assert!(
            seen.describe()
                .contains("vCPU 0 at 99.5 % for 1 s, 150 MiB dirtied in 6.0 ms"),
            "{}",
            seen.describe()
        );
    }

    #[tokio::test]
    async fn a_throttle_in_force_or_one_that_overruled_the_probe_gives_nothing() {
        let p = Hot {
            throttle_in_force: true,
            ..hot()
        };
        assert_eq!(probe(&p, 0).await, None);
        let p = Hot {
            lifted_by_controller: true,
            ..hot()
        };
        assert_eq!(probe(&p, 0).await, None);
    }
}
