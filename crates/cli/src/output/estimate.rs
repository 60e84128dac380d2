//! `estimate`: what each way of converging would do, and the disks.

use super::{mib, rows, throttle_mechanism};
use types::units::MIB_F64 as MIB;

/// "vda writes 1.0 MiB/s, local 64 MiB: copy converges, at most 5 s".
fn disk_estimate(d: &protocol::estimate::DiskEstimate) -> String {
    let writes = format!("{} writes {:.1} MiB/s", d.target, d.write_bytes_s / MIB);
    match &d.copy {
        None => format!("{writes}, shared (not copied)"),
        Some(c) if c.converges => format!(
            "{writes}, local {}: copy converges, at most {:.0} s",
            mib(d.size_bytes),
            c.copy_secs.unwrap_or(0.0)
        ),
        Some(c) => {
            let adaptive = c
                .adaptive
                .map(|a| {
                    format!(
                        "; adaptive with a host throttle: converges under a {:.0} % vCPU \
                         throttle, at most {:.0} s",
                        a.throttle_pct, a.copy_secs
                    )
                })
                .unwrap_or_default();
            format!(
                "{writes}, local {}: copy does not converge (writes near or above the link){adaptive}",
                mib(d.size_bytes)
            )
        }
    }
}

/// `estimate` and `migrate --dry-run`.
pub fn estimate(r: &protocol::estimate::EstimateReport) -> String {
    let m = &r.model;
    let windows: Vec<String> = r
        .samples
        .iter()
        .map(|s| format!("{:.0} MiB in {:.0} s", s.dirtied / MIB, s.window_secs))
        .collect();
    let disks: Vec<String> = r.disks.iter().map(disk_estimate).collect();
    let mut out = rows(&[
        (
            "Domain",
            Some(match r.guest_ram_in_use_bytes {
                Some(used) => format!(
                    "{} ({}, {} in use: the first pass sends that)",
                    r.domain,
                    mib(r.guest_ram_bytes),
                    mib(used)
                ),
                None => format!("{} ({})", r.domain, mib(r.guest_ram_bytes)),
            }),
        ),
        (
            "Dirtied",
            Some(match r.measurement_age_ms {
                // A kept measurement (`--max-age`) says how old it is.
                Some(age) if age >= 1000 => format!(
                    "{} (measured {:.0} s ago)",
                    windows.join(", "),
                    age as f64 / 1000.0
                ),
                _ => windows.join(", "),
            }),
        ),
        ("Disks", (!disks.is_empty()).then(|| disks.join("; "))),
        (
            "Dirty rate",
            Some(if m.rate_is_lower_bound {
                format!(
                    "at least {:.0} MiB/s (the working set filled within the shortest window)",
                    m.rate / MIB
                )
            } else {
                format!("{:.0} MiB/s", m.rate / MIB)
            }),
        ),
        (
            "Working set",
            Some(format!("{:.0} MiB", m.working_set / MIB)),
        ),
        (
            "Bandwidth",
            Some(format!(
                "{:.0} MiB/s{}",
                r.bandwidth_bytes_s / MIB,
                if r.bandwidth_assumed {
                    " (assumed: pass --bandwidth for your link)"
                } else {
                    ""
                }
            )),
        ),
        ("Downtime limit", Some(format!("{} ms", r.downtime_ms))),
        (
            "vCPU throttle",
            r.vcpu_throttle.as_ref().map(throttle_mechanism),
        ),
        (
            "Time budget",
            Some(format!("{:.0} s", r.budget_s.unwrap_or(600.0))),
        ),
    ]);
    out.push_str(&format!(
        "\n{:<10} {:>9} {:>11} {:>9} {:>13} {:>16}\n",
        "Policy", "Converges", "Total time", "Downtime", "Max throttle", "Guest work lost"
    ));
    let p = &r.predictions;
    let worst = p.worst_case.as_ref();
    let rows = [
        ("none", &p.measured.none, worst.map(|w| &w.none)),
        ("qemu", &p.measured.qemu, worst.map(|w| &w.qemu)),
        ("adaptive", &p.measured.adaptive, worst.map(|w| &w.adaptive)),
    ];
    for (name, pred, worst) in rows {
        let converges = match (pred.converges, worst.map(|w| w.converges)) {
            (true, Some(false)) => "maybe",
            (true, _) => "yes",
            (false, _) => "no",
        };
        let time = |p: &protocol::estimate::Prediction| {
            if p.converges {
                format!("{:.1} s", p.total_secs)
            } else {
                format!("> {:.0} s", p.total_secs)
            }
        };
        let total = match worst {
            Some(w)
                if w.converges != pred.converges
                    || (w.total_secs - pred.total_secs).abs() > 0.5 =>
            {
                format!("{}..{}", time(pred), time(w))
            }
            _ => time(pred),
        };
        out.push_str(&format!(
            "{:<10} {:>9} {:>11} {:>9} {:>12.1}% {:>15.1}s\n",
            name,
            converges,
            total,
            if pred.converges {
                format!("{:.0} ms", pred.downtime_secs * 1000.0)
            } else {
                "-".into()
            },
            worst.map_or(pred.max_throttle, |w| w.max_throttle.max(pred.max_throttle)) * 100.0,
            worst.map_or(pred.work_lost_secs, |w| w
                .work_lost_secs
                .max(pred.work_lost_secs)),
        ));
    }
    for c in &r.calibrations {
        out.push_str(&format!(
            "\n{}: calibrated on {} past migration{} of this domain from this host\n\
             (real / predicted {:.2}, from {:.2} to {:.2}): {:.1} s ({:.1}..{:.1} s)\n",
            c.policy,
            c.jobs,
            if c.jobs == 1 { "" } else { "s" },
            c.factor,
            c.factor_low,
            c.factor_high,
            c.total_secs,
            c.total_low_secs,
            c.total_high_secs,
        ));
    }
    if m.rate_is_lower_bound {
        out.push_str(
            "\nThe working set filled within the shortest window, so the rate is only a lower\n\
             bound: ranges run from that rate to a writer refilling it every 50 ms. The\n\
             adaptive controller measures the real rate during the migration.\n",
        );
    }
    out
}
