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

use std::time::Duration;

use super::writers::Probe;

/// How hard the probe throttles the writer: a 5 ms quota every second
/// (the host throttle's long period), one or two slices in the window. At
/// 99.9 % (a 1 ms quota) a slice dirties too little for QEMU's page
/// sampling to see on a small working set (a 48 MiB one read 0 MiB); at
/// 99 % ten slices of the hot guest (23–30 MiB each) fill its working set,
/// which hides the figure.
pub const SLICE_PROBE_THROTTLE: f64 = 0.995;

/// How long the probe waits for the vCPU to spend the quota it is given
/// as the throttle is set, before the window opens.
const FIRST_QUOTA_WAIT: Duration = Duration::from_millis(200);
const FIRST_QUOTA_POLL: Duration = Duration::from_millis(2);

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
    let unthrottled = cpu_time(probe, index);
    if !probe.throttle_one(index, SLICE_PROBE_THROTTLE).await.ok()? {
        return None;
    }
    let before = after_the_first_quota(probe, index, unthrottled).await;
    let dirtied = probe.dirtied_in_a_second().await;
    let after = cpu_time(probe, index);
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

fn cpu_time<P: Probe>(probe: &P, index: usize) -> Option<u64> {
    probe.cpu_times().get(index).copied().flatten()
}

/// The vCPU's CPU time once it has spent the quota the kernel hands it as
/// the throttle is set (the quota is refilled then, whatever the period's
/// phase). Counted, that slice fell outside QEMU's window, opened after
/// it: a CI run read three slices' CPU time (14.8 ms) against the one
/// whose dirt the window saw, and the figure came out at a third. From
/// here the CPU time spans only the slices the window may hold, and
/// perhaps one after it. `unthrottled` is the CPU time read before the
/// throttle.
async fn after_the_first_quota<P: Probe>(
    probe: &P,
    index: usize,
    unthrottled: Option<u64>,
) -> Option<u64> {
    let quota_ns = super::cgroup::quota_for(SLICE_PROBE_THROTTLE, 1)
        .1
        .map_or(0, |us| us * 1000);
    let deadline = tokio::time::Instant::now() + FIRST_QUOTA_WAIT;
    loop {
        let now = cpu_time(probe, index);
        let spent = match (now, unthrottled) {
            (Some(now), Some(then)) => now.saturating_sub(then) >= quota_ns,
            _ => true,
        };
        // A vCPU waiting for a CPU on a busy host may take longer: the
        // window then opens anyway, and the figure may come out low,
        // never high.
        if spent || tokio::time::Instant::now() >= deadline {
            return now;
        }
        tokio::time::sleep(FIRST_QUOTA_POLL).await;
    }
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

    /// A vCPU that spends the quota it gets as the throttle is set over
    /// the probe's first reads (a millisecond a read), then one 5 ms slice
    /// in the window, which filled its 45 MiB working set.
    struct FirstQuota {
        cpu_ns: Mutex<u64>,
        throttled: Mutex<bool>,
        first_quota_left_ns: Mutex<u64>,
    }

    impl Probe for FirstQuota {
        fn cpu_times(&self) -> Vec<Option<u64>> {
            let mut cpu = self.cpu_ns.lock().unwrap();
            let mut left = self.first_quota_left_ns.lock().unwrap();
            if *self.throttled.lock().unwrap() && *left > 0 {
                *cpu += 1_000_000;
                *left -= 1_000_000;
            }
            vec![Some(*cpu)]
        }
        async fn throttle_one(&self, _: usize, _: f64) -> Result<bool, ThrottleError> {
            *self.throttled.lock().unwrap() = true;
            Ok(true)
        }
        async fn lift_one(&self, _: usize) -> Result<bool, ThrottleError> {
            Ok(true)
        }
        async fn dirtied_in_a_second(&self) -> Option<f64> {
            *self.cpu_ns.lock().unwrap() += 5_000_000;
            Some(45.0 * MIB)
        }
    }

    #[tokio::test]
    async fn the_quota_given_as_the_throttle_is_set_is_spent_before_the_window() {
        let p = FirstQuota {
            cpu_ns: Mutex::new(0),
            throttled: Mutex::new(false),
            first_quota_left_ns: Mutex::new(5_000_000),
        };
        let seen = probe(&p, 0).await.unwrap();
        // The window's slice alone: counting what was left of the first
        // quota too would read the figure low.
        assert!((seen.cpu_secs - 0.005).abs() < 1e-9, "{seen:?}");
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
