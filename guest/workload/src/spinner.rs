//! Spinners: threads that compute without touching memory, one pinned to
//! each of vCPUs 1..=N (the memory sweep is pinned to vCPU 0), so a guest
//! has vCPUs that are busy but dirty nothing. Each counts its loops; a
//! reporter on vCPU 0 prints them (`spinner cpu=I t_ms=T loops=L`): how
//! fast each vCPU runs while the host throttles some of them.
//!
//! The spinners never print themselves: a thread that holds the console
//! (the output lock, the kernel's tty lock) while its vCPU is throttled
//! makes every other thread that prints wait for it. With each spinner
//! printing its own lines, throttling a spinner's vCPU stalled the memory
//! sweep behind it, and the spinner passed for a writer.

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sched::{sched_setaffinity, CpuSet};
use nix::unistd::Pid;

use crate::report;

/// Loops between updates of the shared count.
const BATCH: u64 = 100_000;

/// Pins the calling thread to `cpu`; false if the kernel refused (fewer
/// CPUs).
pub fn pin_to(cpu: usize) -> bool {
    let mut set = CpuSet::new();
    set.set(cpu).is_ok() && sched_setaffinity(Pid::from_raw(0), &set).is_ok()
}

/// Starts `count` spinners on vCPUs 1..=count and their reporter on vCPU 0.
pub fn start(count: u32, report_every: Duration, started: Instant) {
    let counts: Arc<Vec<AtomicU64>> = Arc::new((0..count).map(|_| AtomicU64::new(0)).collect());
    for cpu in 1..=count as usize {
        let counts = counts.clone();
        std::thread::spawn(move || {
            if !pin_to(cpu) {
                report::line(&format!("error spinner cpu={cpu}: cannot pin"));
                return;
            }
            spin(&counts[cpu - 1])
        });
    }
    std::thread::spawn(move || {
        if !pin_to(0) {
            report::line("error spinner reporter: cannot pin to cpu 0");
        }
        loop {
            std::thread::sleep(report_every);
            let t_ms = started.elapsed().as_millis();
            for (i, loops) in counts.iter().enumerate() {
                let loops = loops.load(Ordering::Relaxed);
                report::line(&format!("spinner cpu={} t_ms={t_ms} loops={loops}", i + 1));
            }
        }
    });
}

fn spin(count: &AtomicU64) -> ! {
    let mut x: u64 = 1;
    loop {
        for _ in 0..BATCH {
            x = black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        count.fetch_add(BATCH, Ordering::Relaxed);
    }
}
