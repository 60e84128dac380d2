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
