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
mod tests;
