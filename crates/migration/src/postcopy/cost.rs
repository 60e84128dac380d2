//! What post-copy costs the guest, measured on the destination.
//!
//! In post-copy a vCPU that touches a page not yet there sleeps until the
//! source sends it. QEMU's own figure (`postcopy-blocktime`) counts whole
//! milliseconds per fault and read 0 ms under TCG for a guest whose vCPU
//! ran 4 ms in 4 s of post-copy, so the guest's loss is read from its vCPU
//! threads' scheduler figures instead (`/proc/TID/schedstat`): the time
//! each spent running or waiting for a CPU (busy) while post-copy lasted,
//! against the part of that time it is busy once every page is there. A
//! guest that idles (a halted vCPU sleeps too) then loses nothing it would
//! have used.

use std::time::Duration;

use qmp::commands::vm::QueryCpusFast;
use qmp::Client;
use tokio::time::Instant;

/// How long the guest is watched once it has landed, for how busy its
/// vCPUs are without post-copy.
pub const BASELINE_WINDOW: Duration = Duration::from_millis(200);

/// The vCPU threads' busy time at an instant.
#[derive(Debug, Clone, PartialEq)]
pub struct VcpuClock {
    /// When it was read.
    pub at: Instant,
    /// The vCPU threads (host thread ids).
    pub threads: Vec<u32>,
    /// Each thread's time running or waiting for a CPU so far, ns.
    pub busy_ns: Vec<u64>,
}

impl VcpuClock {
    /// Reads the vCPU threads of the QEMU behind `qmp`; `None` when QEMU
    /// does not say them or the host does not keep scheduler figures (a
    /// simulated VM's threads are not vCPUs).
    pub async fn read(qmp: &Client) -> Option<VcpuClock> {
        let cpus = qmp.execute(&QueryCpusFast).await.ok()?;
        let threads: Vec<u32> = cpus
            .iter()
            .filter_map(|c| u32::try_from(c.thread_id).ok())
            .collect();
        VcpuClock::of(threads)
    }

    /// Reads `threads` now.
    pub fn of(threads: Vec<u32>) -> Option<VcpuClock> {
        if threads.is_empty() {
            return None;
        }
        let busy_ns = threads
            .iter()
            .map(|&tid| busy_ns(tid))
            .collect::<Option<Vec<u64>>>()?;
        Some(VcpuClock {
            at: Instant::now(),
            threads,
            busy_ns,
        })
    }

    /// The same threads read again.
    pub fn again(&self) -> Option<VcpuClock> {
        VcpuClock::of(self.threads.clone())
    }
}

/// Time thread `tid` spent running or waiting to run, ns: the first two
/// fields of its `schedstat`.
fn busy_ns(tid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{tid}/schedstat")).ok()?;
    let mut fields = text.split_whitespace().map(|f| f.parse::<u64>().ok());
    Some(fields.next()??.saturating_add(fields.next()??))
}

/// The guest work post-copy cost: the mean over vCPUs of what each would
/// have been busy from `resumed` to `landed` at the rate it is busy from
/// `landed` to `after`, less what it was.
pub fn work_lost(resumed: &VcpuClock, landed: &VcpuClock, after: &VcpuClock) -> Option<Duration> {
    let postcopy = landed.at.checked_duration_since(resumed.at)?.as_secs_f64();
    let window = after.at.checked_duration_since(landed.at)?.as_secs_f64();
    if window <= 0.0 || resumed.busy_ns.len() != landed.busy_ns.len() {
        return None;
    }
    let lost: Vec<f64> = (0..resumed.busy_ns.len())
        .map(|i| {
            let seconds = |from: &VcpuClock, to: &VcpuClock| {
                to.busy_ns[i].saturating_sub(from.busy_ns[i]) as f64 / 1e9
            };
            let busy_share = (seconds(landed, after) / window).clamp(0.0, 1.0);
            (busy_share * postcopy - seconds(resumed, landed)).max(0.0)
        })
        .collect();
    Some(Duration::from_secs_f64(
        lost.iter().sum::<f64>() / lost.len() as f64,
    ))
}

/// Measures, once the guest has landed, what post-copy (from `resumed`)
/// cost it: watches its vCPUs for [`BASELINE_WINDOW`].
pub async fn measure(resumed: &VcpuClock) -> Option<Duration> {
    let landed = resumed.again()?;
    tokio::time::sleep(BASELINE_WINDOW).await;
    let after = resumed.again()?;
    work_lost(resumed, &landed, &after)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clock(at: Instant, busy_ms: &[u64]) -> VcpuClock {
        VcpuClock {
            at,
            threads: (1..=busy_ms.len() as u32).collect(),
            busy_ns: busy_ms.iter().map(|ms| ms * 1_000_000).collect(),
        }
    }

    #[test]
    fn a_busy_guest_that_barely_ran_in_post_copy_lost_all_of_it() {
        let t0 = Instant::now();
        let resumed = clock(t0, &[10]);
        // 4 s of post-copy, 4 ms run; then busy all the time.
        let landed = clock(t0 + Duration::from_secs(4), &[14]);
        let after = clock(t0 + Duration::from_millis(4200), &[214]);
        let lost = work_lost(&resumed, &landed, &after).unwrap();
        assert!((lost.as_secs_f64() - 3.996).abs() < 1e-6, "{lost:?}");
    }

    #[test]
    fn an_idle_guest_loses_nothing_for_sleeping_in_post_copy() {
        let t0 = Instant::now();
        let resumed = clock(t0, &[0]);
        let landed = clock(t0 + Duration::from_secs(2), &[20]);
        // Busy 1 % of the time once landed: it would have run 20 ms.
        let after = clock(t0 + Duration::from_millis(2200), &[22]);
        assert_eq!(work_lost(&resumed, &landed, &after), Some(Duration::ZERO));
    }

    #[test]
    fn each_vcpu_counts_for_its_share_of_the_guest() {
        let t0 = Instant::now();
        // Two vCPUs, busy once landed; one ran through post-copy, the
        // other waited 1 s of its 2 s: a quarter of the guest's 2 s.
        let resumed = clock(t0, &[0, 0]);
        let landed = clock(t0 + Duration::from_secs(2), &[2000, 1000]);
        let after = clock(t0 + Duration::from_millis(2100), &[2100, 1100]);
        let lost = work_lost(&resumed, &landed, &after).unwrap();
        assert!((lost.as_secs_f64() - 0.5).abs() < 1e-6, "{lost:?}");
    }

    #[test]
    fn this_thread_reads_its_own_busy_time() {
        // "/proc/thread-self" links to "PID/task/TID".
        let link = std::fs::read_link("/proc/thread-self").unwrap();
        let tid: u32 = link
            .file_name()
            .and_then(|t| t.to_str())
            .and_then(|t| t.parse().ok())
            .unwrap();
        // The kernel adds a thread's running time up at a tick or when it
        // leaves the CPU: a thread just started can read 0 until then.
        let start = std::time::Instant::now();
        while start.elapsed() < std::time::Duration::from_millis(10) {
            std::hint::spin_loop();
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
        let clock = VcpuClock::of(vec![tid]).expect("schedstat of this thread");
        assert_eq!(clock.busy_ns.len(), 1);
        assert!(clock.busy_ns[0] > 0);
    }
}
