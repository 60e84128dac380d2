//! `livemig-bench sweep`: the adaptive controller and QEMU's auto-converge
//! on guests nobody tuned them on, side by side, over a grid of links,
//! dirty rates (as a multiple of the link), working sets and RAM sizes;
//! each trial against the physical limit and `estimate`'s prediction made
//! just before it.
//!
//! The in-tree guest writes one page per loop and spins between writes:
//! its rate at a spin is calibrated on this machine first (at spin 0 and
//! at a slow spin: a write costs a fixed part plus the spin), and each
//! point asks for the spin that dirties its multiple of the link (`max`:
//! spin 0, as fast as it runs). The rate each trial's guest really had is
//! measured during its warm-up and reported beside the one asked for.

use std::path::Path;

use anyhow::{bail, Result};
use guest::Workload;
use serde::Serialize;

use crate::convergence::{self, Hosts, RunOptions};

/// The slow spin the calibration measures beside spin 0.
const SLOW_SPIN: u32 = 20_000;

/// One trial (one JSON line).
#[derive(Debug, Clone, Serialize)]
pub struct SweepTrial {
    pub link_mib_s: u64,
    /// As asked (`null`: as fast as the guest runs).
    pub rate_x_link: Option<f64>,
    /// The guest's measured full-speed rate over the link.
    pub measured_x_link: f64,
    pub working_set_mib: u32,
    pub ram_mib: u32,
    pub policy: String,
    pub converged: bool,
    pub total_time_ms: u64,
    /// One pass of the memory in use, then one of what the guest dirtied
    /// meanwhile.
    pub limit_ms: u64,
    /// `estimate`'s prediction for this policy, when it predicted
    /// convergence.
    pub predicted_ms: Option<u64>,
    pub predicted_converges: Option<bool>,
    pub guest_work_lost_s: f64,
    pub max_cpu_throttle_pct: f64,
    pub memory_check: &'static str,
    pub downtime_ms: Option<u64>,
    pub transferred_bytes: u64,
    #[serde(flatten)]
    pub estimated: convergence::EstimatedModel,
    /// The controller's decisions (throttle, downtime, post-copy), each
    /// with its time and reason.
    pub actions: Vec<protocol::job::TimedAction>,
    pub passes: Vec<convergence::PassStart>,
}

/// A write's cost at spin `s` is `base + per_spin × s` (seconds): the
/// calibration's two points.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct SpinCost {
    pub max_mib_s: f64,
    pub slow_mib_s: f64,
}

impl SpinCost {
    /// The spin that dirties `mib_s` (0 when the guest cannot go that
    /// fast).
    fn spin_for(&self, mib_s: f64) -> u32 {
        let per_write = |rate: f64| 4096.0 / (rate * 1048576.0);
        let base = per_write(self.max_mib_s);
        let per_spin = (per_write(self.slow_mib_s) - base) / f64::from(SLOW_SPIN);
        if per_spin <= 0.0 {
            return 0;
        }
        ((per_write(mib_s) - base) / per_spin).max(0.0).round() as u32
    }
}

/// The grid, parsed: rates are multiples of the link or `max`.
#[derive(Debug, Clone)]
pub struct Grid {
    pub links: Vec<u64>,
    pub rates: Vec<Option<f64>>,
    /// `None`: the whole RAM.
    pub working_sets: Vec<Option<u32>>,
    pub rams: Vec<u32>,
    pub policies: Vec<String>,
}

impl Grid {
    /// Parses the command line's lists.
    ///
    /// # Errors
    /// A rate that is neither a positive number nor `max`, a working set
    /// that is neither a size nor `all`, an unknown policy.
    pub fn parse(
        links: Vec<u64>,
        rates: &[String],
        working_sets: &[String],
        rams: Vec<u32>,
        policies: Vec<String>,
    ) -> Result<Grid> {
        let rates = rates
            .iter()
            .map(|r| match r.as_str() {
                "max" => Ok(None),
                n => match n.parse::<f64>() {
                    Ok(x) if x > 0.0 => Ok(Some(x)),
                    _ => bail!("rate {r:?}: a positive multiple of the link, or max"),
                },
            })
            .collect::<Result<Vec<_>>>()?;
        let working_sets = working_sets
            .iter()
            .map(|w| match w.as_str() {
                "all" => Ok(None),
                n => match n.parse::<u32>() {
                    Ok(x) if x > 0 => Ok(Some(x)),
                    _ => bail!("working set {w:?}: MiB, or all"),
                },
            })
            .collect::<Result<Vec<_>>>()?;
        for p in &policies {
            if convergence::policy(p).is_none() {
                bail!("unknown policy {p:?} (none, qemu, adaptive)");
            }
        }
        Ok(Grid {
            links,
            rates,
            working_sets,
            rams,
            policies,
        })
    }
}

/// What the in-tree guest holds besides its working set: its code, stack
/// and hot page (QEMU skips the untouched rest of RAM as zero pages).
const GUEST_RESIDENT_MIB: u32 = 4;

/// One pass over the memory in use, then one of what the guest dirtied
/// meanwhile, at the link's rate: no pre-copy does better.
fn limit_ms(working_set_mib: u32, rate_mib_s: f64, link_mib_s: u64) -> u64 {
    let link = link_mib_s as f64;
    let first = f64::from(working_set_mib + GUEST_RESIDENT_MIB) / link;
    let second = (rate_mib_s * first).min(f64::from(working_set_mib)) / link;
    ((first + second) * 1000.0) as u64
}

/// Runs the grid.
///
/// # Errors
/// Bad input before anything starts; an agent or guest that fails.
pub async fn run(livemigd: &Path, grid: Grid, timeout: u64, json: bool) -> Result<()> {
    let hosts = Hosts::start(livemigd).await?;
    let calibration_workload = |spin| Workload {
        working_set_mib: 64,
        spin,
        report_ms: convergence::REPORT_MS,
    };
    let cost = SpinCost {
        max_mib_s: convergence::guest_rate_mib_s(&hosts, 256, calibration_workload(0)).await?,
        slow_mib_s: convergence::guest_rate_mib_s(&hosts, 256, calibration_workload(SLOW_SPIN))
            .await?,
    };
    crate::emit(
        json,
        &serde_json::json!({"calibration": "spin", "max_mib_s": cost.max_mib_s, "slow_mib_s": cost.slow_mib_s, "slow_spin": SLOW_SPIN}),
        format!(
            "calibration: {:.0} MiB/s at spin 0, {:.1} MiB/s at spin {SLOW_SPIN}",
            cost.max_mib_s, cost.slow_mib_s
        ),
    );
    for &ram_mib in &grid.rams {
        for ws in &grid.working_sets {
            // The guest's kernel and stack need a little of its RAM.
            let working_set_mib = ws.unwrap_or(ram_mib.saturating_sub(16)).min(ram_mib - 16);
            for &link in &grid.links {
                for rate in &grid.rates {
                    let spin = rate.map_or(0, |x| cost.spin_for(x * link as f64));
                    let workload = Workload {
                        working_set_mib,
                        spin,
                        report_ms: convergence::REPORT_MS,
                    };
                    for policy in &grid.policies {
                        let options = RunOptions {
                            estimate: true,
                            memory_mib: ram_mib,
                            bandwidth_mib_s: link,
                            ..RunOptions::benchmark(json, 1, timeout)
                        };
                        let name = format!("sw{ram_mib}-{working_set_mib}-{link}-{spin}");
                        let t = convergence::trial(&hosts, (&name, workload), policy, 1, &options)
                            .await?;
                        let measured = t.guest_rate_writes_s * 4096.0 / 1048576.0;
                        let trial = SweepTrial {
                            link_mib_s: link,
                            rate_x_link: *rate,
                            measured_x_link: measured / link as f64,
                            working_set_mib,
                            ram_mib,
                            policy: policy.clone(),
                            converged: t.converged,
                            total_time_ms: t.total_time_ms,
                            limit_ms: limit_ms(working_set_mib, measured, link),
                            predicted_ms: t.estimated_total_ms,
                            predicted_converges: t.estimated_converges,
                            guest_work_lost_s: t.guest_work_lost_s,
                            max_cpu_throttle_pct: t.max_cpu_throttle_pct,
                            memory_check: t.memory_check,
                            downtime_ms: t.downtime_ms,
                            transferred_bytes: t.transferred_bytes,
                            estimated: t.estimated,
                            actions: t.actions.clone(),
                            passes: t.passes.clone(),
                        };
                        let text = format!(
                            "ram {ram_mib} ws {working_set_mib} link {link} rate {} ({:.1}x measured) {policy:<8} converged={} {:>6.1} s = {:.2}x the limit, predicted {}, lost {:.1} s, throttle {:.1} %, memory {}",
                            rate.map_or("max".to_string(), |x| format!("{x}x")),
                            trial.measured_x_link,
                            trial.converged,
                            trial.total_time_ms as f64 / 1000.0,
                            trial.total_time_ms as f64 / trial.limit_ms.max(1) as f64,
                            trial
                                .predicted_ms
                                .map_or("-".into(), |p| format!("{:.1} s", p as f64 / 1000.0)),
                            trial.guest_work_lost_s,
                            trial.max_cpu_throttle_pct,
                            trial.memory_check,
                        );
                        crate::emit(json, &trial, text);
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_spin_for_a_rate_comes_from_the_two_calibration_points() {
        let cost = SpinCost {
            max_mib_s: 400.0,
            slow_mib_s: 10.0,
        };
        assert_eq!(cost.spin_for(400.0), 0);
        assert_eq!(cost.spin_for(10.0), SLOW_SPIN);
        assert_eq!(cost.spin_for(1000.0), 0, "faster than the guest runs");
        let mid = cost.spin_for(40.0);
        assert!(mid > 0 && mid < SLOW_SPIN, "{mid}");
    }

    #[test]
    fn the_limit_is_a_pass_of_what_is_in_use_and_one_of_what_was_dirtied() {
        // 252 MiB in use at 100 MiB/s, 248 MiB rewritten at 400 MiB/s.
        assert_eq!(limit_ms(248, 400.0, 100), 5000);
        assert_eq!(limit_ms(60, 0.0, 64), 1000);
    }

    #[test]
    fn a_bad_grid_is_refused() {
        let p = |rates: &[&str], ws: &[&str], policies: &[&str]| {
            Grid::parse(
                vec![64],
                &rates.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                &ws.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
                vec![256],
                policies.iter().map(|s| s.to_string()).collect(),
            )
        };
        assert!(p(&["0.5", "max"], &["64", "all"], &["adaptive", "qemu"]).is_ok());
        assert!(p(&["fast"], &["64"], &["qemu"]).is_err());
        assert!(p(&["1"], &["-3"], &["qemu"]).is_err());
        assert!(p(&["1"], &["64"], &["magic"]).is_err());
    }
}
