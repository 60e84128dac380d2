//! Which vCPUs write memory, so that only those are throttled.
//!
//! A guest with several vCPUs rarely has them all writing: throttling
//! every vCPU (as QEMU's auto-converge does) slows the ones that compute or
//! idle for nothing. QEMU reports a dirty rate per vCPU only with KVM's
//! dirty ring (`calc-dirty-rate` in `dirty-ring` mode, a guest defined with
//! `dirty_ring`): then the writers are read off it ([`from_dirty_rates`]),
//! no vCPU slowed to find them. Under TCG, or KVM without a ring, livemig
//! finds the writers itself, during the first pass, right after the
//! pre-flight measurement:
//!
//! 1. **CPU time.** A vCPU thread that ran under a tenth of a CPU while the
//!    pre-flight measured cannot be what outruns the link: it is idle.
//! 2. **Probes.** Each busy vCPU in turn is throttled alone to 99 % (1 ms
//!    in every 100 ms) for a one-second `calc-dirty-rate` window. Sorted by
//!    what the guest dirtied meanwhile, the probes split at the widest gap
//!    between neighbours: the vCPUs below it write if that gap is wide
//!    enough ([`WRITER_GAP`]) and they are under [`WRITER_BELOW`] of what
//!    the guest dirties with them running (the most of the pre-flight's
//!    unthrottled second and the other probes). Not harder than 99 %: at
//!    99.9 % (1 ms in a 1 s period) a probed vCPU may sit out the whole
//!    second while holding something the others wait for (a guest lock, an
//!    IPI, QEMU's exclusive work), and probing a Linux guest's
//!    compute-only vCPU that way stopped the writer on another vCPU for the
//!    whole window (0 MiB dirtied): the spinner passed for a writer. A hot
//!    writer still dirties a good part of its working set in ten 1 ms
//!    slices, so its probe reads lower but not near zero.
//!
//! If no busy vCPU stands out (say, two writers each of which alone fills
//! the working set within a second), every busy vCPU is taken as a writer.
//! The controller's first throttle waits for the probes
//! ([`crate::perform`]); a throttle in force (the disks' pacing) stops the
//! search, and every vCPU stays throttled.

use std::future::Future;
use std::time::Duration;

use qmp::Client;
use types::units::mib;

use super::{ThrottleError, VcpuSelector};

/// Share of a CPU under which a vCPU thread counts as idle.
pub const IDLE_BELOW: f64 = 0.1;
/// A probed vCPU writes when the guest dirties under this share of the
/// unthrottled window without it...
pub const WRITER_BELOW: f64 = 0.75;
/// ... and at least this many times less than without the probes of the
/// vCPUs that do not write. Page sampling is noisy: with a compute-only
/// vCPU probed, a 4-vCPU Linux guest read 24, 31 and 37 MiB in a second,
/// and 13 MiB with its writer probed.
pub const WRITER_GAP: f64 = 1.3;
/// How hard a probe throttles its vCPU: the most a 100 ms period allows.
pub const PROBE_THROTTLE: f64 = super::cgroup::LONG_PERIOD_ABOVE;

/// One vCPU as the search saw it.
#[derive(Debug, Clone, PartialEq)]
pub struct VcpuSeen {
    /// Its index (`query-cpus-fast`'s order, the cgroup's `vcpuN`).
    pub index: usize,
    /// Share of a CPU its thread ran while the pre-flight measured.
    pub busy: f64,
    /// What the guest dirtied in a second with this vCPU probed, bytes;
    /// `None` when it was not probed (idle, or QEMU gave its rate).
    pub dirtied_without: Option<f64>,
    /// Its own dirty rate as QEMU measured it (KVM's dirty ring),
    /// bytes/s.
    pub dirty_rate: Option<f64>,
}

/// What the search found.
#[derive(Debug, Clone, PartialEq)]
pub struct Writers {
    /// The vCPUs to throttle, by index.
    pub writers: Vec<usize>,
    /// Every vCPU as seen.
    pub seen: Vec<VcpuSeen>,
    /// What the guest dirties in a second with a vCPU running: the most of
    /// the pre-flight's unthrottled second and the probes, bytes.
    pub reference: f64,
    /// No probe singled out a writer: all busy vCPUs are taken.
    pub inconclusive: bool,
}

impl Writers {
    /// For the job's timeline.
    pub fn describe(&self) -> String {
        let list = |v: &[usize]| {
            v.iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let one = self.writers.len() == 1;
        let measured = self
            .seen
            .iter()
            .any(|v| v.dirtied_without.is_some() || v.dirty_rate.is_some());
        let mut parts = vec![format!(
            "vCPU{} {} {}",
            if one { "" } else { "s" },
            list(&self.writers),
            match (self.inconclusive, measured, one) {
                (true, _, _) => "throttled: no probe singled out a writer, so every busy vCPU",
                (false, false, _) => "writes (the only busy vCPU): only it is throttled",
                (false, true, true) => "writes: only it is throttled",
                (false, true, false) => "write: only they are throttled",
            }
        )];
        let rates: Vec<String> = self
            .seen
            .iter()
            .filter_map(|v| {
                v.dirty_rate.map(|r| {
                    format!(
                        "vCPU {} {:.0} MiB/s at {:.0} % of a CPU",
                        v.index,
                        mib(r),
                        v.busy * 100.0
                    )
                })
            })
            .collect();
        if !rates.is_empty() {
            parts.push(format!(
                "QEMU's per-vCPU dirty rates over 1 s (KVM's dirty ring, no probe needed): {}",
                rates.join(", ")
            ));
        }
        let probes: Vec<String> = self
            .seen
            .iter()
            .filter_map(|v| {
                v.dirtied_without.map(|d| {
                    format!(
                        "vCPU {} at {:.0} % of a CPU, {:.0} MiB without it",
                        v.index,
                        v.busy * 100.0,
                        mib(d)
                    )
                })
            })
            .collect();
        if !probes.is_empty() {
            parts.push(format!(
                "{:.0} MiB dirtied in 1 s with a vCPU running; probed at {:.0} % for 1 s \
                 each: {}",
                mib(self.reference),
                PROBE_THROTTLE * 100.0,
                probes.join("; ")
            ));
        }
        let idle: Vec<usize> = self
            .seen
            .iter()
            .filter(|v| v.busy < IDLE_BELOW)
            .map(|v| v.index)
            .collect();
        if !idle.is_empty() {
            parts.push(format!(
                "idle (under {:.0} % of a CPU): {}",
                IDLE_BELOW * 100.0,
                list(&idle)
            ));
        }
        parts.join("; ")
    }
}

/// Share of the link the vCPUs left unthrottled may dirty together, when
/// QEMU gives each vCPU's rate: well under the link, so that passes still
/// shrink with the writers throttled hard.
pub const UNTHROTTLED_SHARE: f64 = 0.25;

/// Decides from QEMU's per-vCPU dirty rates (bytes/s, by index; KVM's
/// dirty ring) and the vCPU threads' CPU `shares`: the fewest vCPUs,
/// fastest first, such that the others together dirty under
/// [`UNTHROTTLED_SHARE`] of the `link`. No probe, so no vCPU is slowed to
/// find them, and a vCPU that computes without writing is told from a
/// writer at once. `None` if no vCPU dirtied anything (nothing to tell
/// apart).
pub fn from_dirty_rates(rates: &[f64], shares: &[f64], link: f64) -> Option<Writers> {
    if !rates.iter().any(|r| *r > 0.0) {
        return None;
    }
    let mut order: Vec<usize> = (0..rates.len()).collect();
    order.sort_by(|a, b| rates[*b].total_cmp(&rates[*a]));
    let mut rest: f64 = rates.iter().sum();
    let mut writers = Vec::new();
    for index in order {
        if rest < UNTHROTTLED_SHARE * link || rates[index] <= 0.0 {
            break;
        }
        rest -= rates[index];
        writers.push(index);
    }
    writers.sort_unstable();
    let seen = (0..rates.len())
        .map(|index| VcpuSeen {
            index,
            busy: shares.get(index).copied().unwrap_or(1.0),
            dirtied_without: None,
            dirty_rate: Some(rates[index]),
        })
        .collect();
    Some(Writers {
        writers,
        seen,
        reference: rates.iter().sum(),
        inconclusive: false,
    })
}

/// Each vCPU thread's share of a CPU since `cpu_before`, `window` ago
/// (unreadable: taken as busy, so it is looked at rather than spared).
pub fn cpu_shares(
    cpu_after: &[Option<u64>],
    cpu_before: &[Option<u64>],
    window: Duration,
) -> Vec<f64> {
    let secs = window.as_secs_f64().max(1e-3);
    cpu_after
        .iter()
        .zip(cpu_before)
        .map(|(after, before)| match (after, before) {
            (Some(a), Some(b)) => a.saturating_sub(*b) as f64 / 1e9 / secs,
            _ => 1.0,
        })
        .collect()
}

/// The vCPUs that are busy enough to be probed.
pub fn busy(shares: &[f64]) -> Vec<usize> {
    (0..shares.len())
        .filter(|&i| shares[i] >= IDLE_BELOW)
        .collect()
}

/// Decides from what was seen. The probes, sorted by what the guest
/// dirtied, split where the gap between neighbours is widest; the vCPUs
/// below it write if the gap is at least [`WRITER_GAP`] and they are under
/// [`WRITER_BELOW`] of the reference. Otherwise every busy vCPU is taken.
/// Without probes (at most one busy vCPU) the busy one is the writer.
/// `baseline`: what the guest dirtied in an unthrottled second.
pub fn classify(seen: Vec<VcpuSeen>, baseline: f64) -> Writers {
    // A probe that left the writers running measured the full rate too,
    // and later than the baseline.
    let reference = seen
        .iter()
        .filter_map(|v| v.dirtied_without)
        .fold(baseline, f64::max);
    let mut probed: Vec<(usize, f64)> = seen
        .iter()
        .filter_map(|v| Some((v.index, v.dirtied_without?)))
        .collect();
    probed.sort_by(|a, b| a.1.total_cmp(&b.1));
    let busy_ones: Vec<usize> = seen
        .iter()
        .filter(|v| v.busy >= IDLE_BELOW)
        .map(|v| v.index)
        .collect();
    // Page sampling reads a megabyte or so either way: no ratio of less.
    let floor = types::MIB as f64;
    let split = (1..probed.len())
        .map(|k| (k, probed[k].1 / probed[k - 1].1.max(floor)))
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .filter(|&(k, gap)| gap >= WRITER_GAP && probed[k - 1].1 < WRITER_BELOW * reference);
    let (writers, inconclusive) = match split {
        _ if probed.is_empty() => (busy_ones, false),
        Some((k, _)) => (probed[..k].iter().map(|p| p.0).collect(), false),
        None => (busy_ones, true),
    };
    let mut writers = writers;
    writers.sort_unstable();
    Writers {
        writers,
        seen,
        reference,
        inconclusive,
    }
}

/// What the search acts on: the real one is [`HostProbe`]; tests script it.
pub trait Probe: Send + Sync {
    /// CPU time of each vCPU thread so far, ns (`None`: unreadable).
    fn cpu_times(&self) -> Vec<Option<u64>>;
    /// Throttles vCPU `index` alone to `throttle`; false if a throttle is
    /// in force.
    fn throttle_one(
        &self,
        index: usize,
        throttle: f64,
    ) -> impl Future<Output = Result<bool, ThrottleError>> + Send;
    /// Lifts it; false if the controller's throttle overruled it.
    fn lift_one(&self, index: usize) -> impl Future<Output = Result<bool, ThrottleError>> + Send;
    /// Bytes the guest dirties in one second.
    fn dirtied_in_a_second(&self) -> impl Future<Output = Option<f64>> + Send;
}

/// Finds the writers: `cpu_before` are the vCPU threads' CPU times when the
/// pre-flight began, `window` how long ago that was, `baseline` what the
/// guest dirtied in the pre-flight's first second; `probing` is told how
/// many vCPUs will be probed before the first probe. `None` when the search
/// had to stop (a throttle came first, a measurement failed): then every
/// vCPU stays throttled.
pub async fn find<P: Probe>(
    probe: &P,
    cpu_before: &[Option<u64>],
    window: Duration,
    baseline: f64,
    probing: impl FnOnce(usize),
) -> Option<Writers> {
    let shares = cpu_shares(&probe.cpu_times(), cpu_before, window);
    let busy_ones = busy(&shares);
    let mut seen: Vec<VcpuSeen> = (0..shares.len())
        .map(|index| VcpuSeen {
            index,
            busy: shares[index],
            dirtied_without: None,
            dirty_rate: None,
        })
        .collect();
    // A single busy vCPU is the writer: nothing to probe.
    if busy_ones.len() > 1 {
        probing(busy_ones.len());
        for &index in &busy_ones {
            if !probe.throttle_one(index, PROBE_THROTTLE).await.ok()? {
                return None;
            }
            let dirtied = probe.dirtied_in_a_second().await;
            let valid = probe.lift_one(index).await.ok()?;
            if !valid {
                return None;
            }
            seen[index].dirtied_without = Some(dirtied?);
        }
    }
    Some(classify(seen, baseline))
}

/// The real probe: a host throttle's single vCPUs, QEMU's `calc-dirty-rate`
/// and the threads' CPU time from `/proc`.
#[derive(Debug)]
pub struct HostProbe<'a> {
    /// The throttle's vCPUs.
    pub selector: &'a VcpuSelector,
    /// The QEMU's monitor.
    pub qmp: &'a Client,
}

impl Probe for HostProbe<'_> {
    fn cpu_times(&self) -> Vec<Option<u64>> {
        cpu_times(self.selector)
    }

    async fn throttle_one(&self, index: usize, throttle: f64) -> Result<bool, ThrottleError> {
        self.selector.probe(index, throttle).await
    }

    async fn lift_one(&self, index: usize) -> Result<bool, ThrottleError> {
        self.selector.end_probe(index).await
    }

    async fn dirtied_in_a_second(&self) -> Option<f64> {
        // Compared with each other only: no noise figure needed (RAM 0).
        let samples = crate::dirty::measure(self.qmp, &[1], 0.0).await.ok()?;
        samples.first().map(|s| s.dirtied)
    }
}

/// CPU time of each vCPU thread so far, ns, from `schedstat` (a few small
/// `/proc` reads: fine on the runtime).
pub fn cpu_times(selector: &VcpuSelector) -> Vec<Option<u64>> {
    thread_cpu_times(selector.pid, &selector.threads)
}

/// CPU time of each of process `pid`'s `threads` so far, ns.
pub fn thread_cpu_times(pid: u32, threads: &[u32]) -> Vec<Option<u64>> {
    threads
        .iter()
        .map(|tid| {
            let path = format!("/proc/{pid}/task/{tid}/schedstat");
            std::fs::read_to_string(path)
                .ok()?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    const MIB: f64 = 1048576.0;

    fn seen(index: usize, busy: f64, without: Option<f64>) -> VcpuSeen {
        VcpuSeen {
            index,
            busy,
            dirtied_without: without.map(|m| m * MIB),
            dirty_rate: None,
        }
    }

    #[test]
    fn the_vcpus_whose_probe_cuts_the_dirtying_are_the_writers() {
        let w = classify(
            vec![
                seen(0, 0.5, Some(12.0)),
                seen(1, 0.5, Some(250.0)),
                seen(2, 0.5, Some(245.0)),
                seen(3, 0.0, None),
            ],
            256.0 * MIB,
        );
        assert_eq!(w.writers, [0]);
        assert!(!w.inconclusive);
        let text = w.describe();
        assert!(text.starts_with("vCPU 0 write"), "{text}");
        assert!(
            text.contains("vCPU 1 at 50 % of a CPU, 250 MiB without it"),
            "{text}"
        );
        assert!(text.contains("idle (under 10 % of a CPU): 3"), "{text}");
    }

    #[test]
    fn the_probes_of_non_writers_are_the_reference_too() {
        // The pre-flight's second read low (the guest was still warming
        // up); the spinners' probes show what it dirties with the writer.
        let w = classify(
            vec![seen(0, 0.5, Some(16.0)), seen(1, 0.5, Some(30.0))],
            20.0 * MIB,
        );
        assert_eq!(w.writers, [0]);
        assert_eq!(w.reference, 30.0 * MIB);
    }

    #[test]
    fn the_widest_gap_between_probes_splits_writers_from_the_rest() {
        let writers = |probes: &[f64]| {
            let seen = probes
                .iter()
                .enumerate()
                .map(|(i, d)| seen(i, 0.4, Some(*d)))
                .collect();
            let w = classify(seen, 30.0 * MIB);
            (!w.inconclusive).then_some(w.writers)
        };
        // As measured on the 4-vCPU Linux guest (writer on vCPU 0).
        assert_eq!(writers(&[13.0, 24.0, 31.0, 37.0]), Some(vec![0]));
        assert_eq!(writers(&[19.0, 26.0, 30.0, 33.0]), Some(vec![0]));
        // Two writers, either order.
        assert_eq!(writers(&[30.0, 10.0, 33.0, 12.0]), Some(vec![1, 3]));
        // Noise alone is no writer.
        assert_eq!(writers(&[27.0, 30.0, 33.0, 31.0]), None);
        // Nothing dirtied whoever is probed: nothing to tell apart.
        assert_eq!(writers(&[0.0, 0.2, 0.1]), None);
    }

    #[test]
    fn a_single_busy_vcpu_is_the_writer_without_probes() {
        let w = classify(vec![seen(0, 0.0, None), seen(1, 0.9, None)], 30.0 * MIB);
        assert_eq!(w.writers, [1]);
        assert!(!w.inconclusive);
        assert!(
            w.describe()
                .starts_with("vCPU 1 writes (the only busy vCPU)"),
            "{}",
            w.describe()
        );
    }

    #[test]
    fn qemus_per_vcpu_rates_name_the_writers_without_probes() {
        // As a 4-vCPU KVM guest with a dirty ring would show it: vCPU 2
        // writes, vCPU 0 a little (the kernel), 1 and 3 compute.
        let link = 64.0 * MIB;
        let rates = [3.0 * MIB, 0.0, 384.0 * MIB, 0.5 * MIB];
        let shares = [0.05, 0.98, 0.97, 0.99];
        let w = from_dirty_rates(&rates, &shares, link).unwrap();
        assert_eq!(w.writers, [2]);
        assert!(!w.inconclusive);
        let text = w.describe();
        assert!(
            text.starts_with("vCPU 2 writes: only it is throttled"),
            "{text}"
        );
        assert!(
            text.contains("KVM's dirty ring") && text.contains("vCPU 2 384 MiB/s at 97 % of a CPU"),
            "{text}"
        );
        assert!(text.contains("idle (under 10 % of a CPU): 0"), "{text}");
        // Two writers that each fill a good part of the link: both, the
        // faster first, until what is left runs under a quarter of it.
        let w = from_dirty_rates(&[40.0 * MIB, 30.0 * MIB, 1.0 * MIB], &[1.0; 3], link).unwrap();
        assert_eq!(w.writers, [0, 1]);
        // Many small writers that only together outrun the link: as many as
        // it takes.
        let w = from_dirty_rates(&[10.0 * MIB; 6], &[1.0; 6], link).unwrap();
        assert_eq!(w.writers.len(), 5, "{:?}", w.writers);
        // Nothing dirtied: nothing to tell apart.
        assert_eq!(from_dirty_rates(&[0.0, 0.0], &[1.0, 1.0], link), None);
    }

    #[test]
    fn no_probe_standing_out_takes_every_busy_vcpu() {
        // Two writers, each filling the working set alone.
        let w = classify(
            vec![
                seen(0, 0.9, Some(250.0)),
                seen(1, 0.9, Some(250.0)),
                seen(2, 0.01, None),
            ],
            256.0 * MIB,
        );
        assert_eq!(w.writers, [0, 1]);
        assert!(w.inconclusive);
        assert!(w.describe().contains("every busy vCPU"), "{}", w.describe());
    }

    /// A guest whose vCPU 1 writes 200 MiB/s, vCPU 2 computes and vCPU 0
    /// idles, as CPU time and probes would show it; the controller's
    /// throttle may come in after some probe.
    struct Scripted {
        probed: Mutex<Option<usize>>,
        log: Mutex<Vec<String>>,
        throttled_after: usize,
    }

    impl Probe for Scripted {
        fn cpu_times(&self) -> Vec<Option<u64>> {
            // 2 s after `before` (all zero): idle, 90 % and 95 % of a CPU.
            vec![Some(0), Some(1_800_000_000), Some(1_900_000_000)]
        }
        async fn throttle_one(&self, index: usize, _: f64) -> Result<bool, ThrottleError> {
            let mut log = self.log.lock().unwrap();
            if log.iter().filter(|l| l.starts_with("probe")).count() >= self.throttled_after {
                return Ok(false);
            }
            log.push(format!("probe {index}"));
            *self.probed.lock().unwrap() = Some(index);
            Ok(true)
        }
        async fn lift_one(&self, index: usize) -> Result<bool, ThrottleError> {
            self.log.lock().unwrap().push(format!("lift {index}"));
            *self.probed.lock().unwrap() = None;
            Ok(true)
        }
        async fn dirtied_in_a_second(&self) -> Option<f64> {
            let probed = *self.probed.lock().unwrap();
            Some(if probed == Some(1) {
                2.0 * MIB
            } else {
                200.0 * MIB
            })
        }
    }

    fn scripted(throttled_after: usize) -> Scripted {
        Scripted {
            probed: Mutex::new(None),
            log: Mutex::new(vec!["start".into()]),
            throttled_after,
        }
    }

    #[tokio::test]
    async fn only_busy_vcpus_are_probed_one_at_a_time() {
        let probe = scripted(usize::MAX);
        let before = [Some(0), Some(0), Some(0)];
        let w = find(&probe, &before, Duration::from_secs(2), 200.0 * MIB, |_| {})
            .await
            .unwrap();
        assert_eq!(w.writers, [1]);
        assert_eq!(
            *probe.log.lock().unwrap(),
            ["start", "probe 1", "lift 1", "probe 2", "lift 2"]
        );
        assert_eq!(w.seen[0].dirtied_without, None, "idle vCPU 0 not probed");
        assert!((w.seen[1].busy - 0.9).abs() < 1e-9);
    }

    #[tokio::test]
    async fn a_throttle_in_force_stops_the_search() {
        let probe = scripted(1);
        let before = [Some(0), Some(0), Some(0)];
        assert_eq!(
            find(&probe, &before, Duration::from_secs(2), 200.0 * MIB, |_| {}).await,
            None
        );
    }
}
