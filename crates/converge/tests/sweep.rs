//! The controller over a grid of guests it was never tuned on (the model's
//! view of `livemig-bench sweep`): link rates, dirty rates as a multiple
//! of the link, working sets and RAM sizes, each against the physical
//! limit and QEMU's auto-converge on the same guest.

use converge::controller::{AdaptiveSim, Policy};
use converge::model::{simulate, DirtyModel, Fixed, Scenario};
use converge::qemu::{AutoConvergeParams, QemuAutoConverge};

use types::units::MIB_F64 as MIB;

fn policy() -> Policy {
    Policy {
        max_throttle: 0.999,
        downtime: 0.3,
        max_downtime: 0.3,
        budget: Some(600.0),
        allow_postcopy: false,
        postcopy_bandwidth: None,
    }
}

/// One point of the grid.
#[derive(Debug, Clone, Copy)]
struct Point {
    link_mib_s: f64,
    rate_x_link: f64,
    working_set_mib: f64,
    ram_mib: f64,
}

impl Point {
    fn scenario(&self) -> Scenario {
        Scenario {
            first_pass_whole: true,
            switchover_bandwidth: None,
            first_pass_bytes: self.ram_mib * MIB,
            model: DirtyModel {
                rate: self.rate_x_link * self.link_mib_s * MIB,
                working_set: self.working_set_mib * MIB,
                rate_is_lower_bound: false,
            },
            bandwidth: self.link_mib_s * MIB,
            downtime: 0.3,
            horizon: 600.0,
        }
    }

    /// What the pre-flight measures: distinct bytes dirtied in one and two
    /// seconds; saturated windows only bound the rate from below. Its two
    /// seconds of sampling run beside the first pass, so a first pass
    /// shorter than that ends before the measurement does, and the first
    /// decision has only the pass to go by.
    fn preflight(&self) -> Option<DirtyModel> {
        let s = self.scenario();
        if s.first_pass_bytes / s.bandwidth < 2.0 {
            return None;
        }
        let one = s.model.dirtied(1.0, 0.0);
        Some(DirtyModel {
            rate: one,
            working_set: s.model.dirtied(2.0, 0.0),
            rate_is_lower_bound: one >= 0.85 * s.model.working_set,
        })
    }

    /// One pass of RAM, then one of what the guest dirtied meanwhile: no
    /// pre-copy does better.
    fn limit_secs(&self) -> f64 {
        let s = self.scenario();
        let first = s.first_pass_bytes / s.bandwidth;
        first + s.model.dirtied(first, 0.0) / s.bandwidth
    }
}

fn grid() -> Vec<Point> {
    let mut points = Vec::new();
    for link_mib_s in [32.0, 64.0, 100.0, 256.0] {
        for rate_x_link in [0.5, 1.0, 2.0, 4.0, 8.0] {
            for ram_mib in [256.0, 512.0, 1024.0] {
                for working_set_mib in [32.0, 64.0, 128.0, 256.0, 512.0, 1024.0] {
                    if working_set_mib > ram_mib {
                        continue;
                    }
                    points.push(Point {
                        link_mib_s,
                        rate_x_link,
                        working_set_mib,
                        ram_mib,
                    });
                }
            }
        }
    }
    points
}

/// Where the controller stands on the grid (300 guests, in the unit
/// tests' time), against issue #27's targets: time within 1.2x of the
/// physical limit at the median and 1.5x at worst; at most 0.25x
/// auto-converge's time where auto-converge needs more than two passes
/// and the limit itself is under a quarter of auto-converge's time (on
/// the other points not even the limit is); a guest that converges
/// unthrottled never throttled. Printed with `cargo test -p
/// livemig-converge --test sweep -- --nocapture`, recorded in
/// docs/CONVERGENCE.md.
#[test]
fn across_the_sweep_every_guest_converges_near_the_limit_and_none_is_throttled_for_nothing() {
    let mut ratios = Vec::new();
    let mut vs_qemu = Vec::new();
    let (mut quarter_possible, mut within_quarter) = (0, 0);
    let (mut lost, mut qemu_lost) = (0.0, 0.0);
    for point in grid() {
        let s = point.scenario();
        let adaptive = AdaptiveSim::run(&s, policy(), point.preflight());
        let qemu = simulate(
            &s,
            &mut QemuAutoConverge::new(AutoConvergeParams::default()),
        );
        let plain = simulate(&s, &mut Fixed);
        assert!(adaptive.converges, "{point:?}: {adaptive:?}");
        if plain.converges {
            assert_eq!(
                adaptive.max_throttle, 0.0,
                "{point:?}: a guest that converges unthrottled was throttled"
            );
        }
        lost += adaptive.work_lost_secs;
        qemu_lost += qemu.work_lost_secs;
        ratios.push((adaptive.total_secs / point.limit_secs(), point));
        if qemu.passes > 2 {
            let ratio = adaptive.total_secs / qemu.total_secs;
            vs_qemu.push((ratio, point));
            if point.limit_secs() <= 0.25 * qemu.total_secs {
                quarter_possible += 1;
                assert!(ratio <= 0.3, "{point:?}: {ratio:.2}x auto-converge's time");
                if ratio <= 0.25 {
                    within_quarter += 1;
                }
            }
        }
    }
    ratios.sort_by(|a, b| a.0.total_cmp(&b.0));
    vs_qemu.sort_by(|a, b| a.0.total_cmp(&b.0));
    let median = ratios[ratios.len() / 2].0;
    let (worst, at) = ratios[ratios.len() - 1];
    let qemu_median = vs_qemu[vs_qemu.len() / 2].0;
    let (qemu_worst, qemu_at) = vs_qemu[vs_qemu.len() - 1];
    eprintln!(
        "{} guests: median {median:.2}x the limit, worst {worst:.2}x ({at:?}); against \
         auto-converge where it needs over two passes ({}): median {qemu_median:.2}x, worst \
         {qemu_worst:.2}x ({qemu_at:?}); within 0.25x on {within_quarter} of the \
         {quarter_possible} where the limit allows it; guest work lost {lost:.0} s in all, \
         auto-converge {qemu_lost:.0} s",
        ratios.len(),
        vs_qemu.len()
    );
    assert!(median <= 1.2, "median {median:.2}x the limit");
    assert!(worst <= 1.5, "{worst:.2}x the limit at {at:?}");
    assert!(
        within_quarter * 20 >= quarter_possible * 19,
        "within 0.25x of auto-converge on only {within_quarter} of {quarter_possible}"
    );
    assert!(
        qemu_worst <= 1.0,
        "slower than auto-converge at {qemu_at:?}"
    );
    assert!(
        lost < qemu_lost / 4.0,
        "{lost:.0} s lost against {qemu_lost:.0} s"
    );
}
