//! Text output in virsh's style.

use protocol::domain::{DomainInfo, DomainSummary};
use protocol::host::HostCapabilities;
use protocol::job::{JobInfo, JobRecord, JobStatus, JobSummary, Role, TimedAction};

use types::units::MIB_F64 as MIB;

pub fn mib(bytes: u64) -> String {
    format!("{:.3} MiB", bytes as f64 / MIB)
}

fn opt<T: std::fmt::Display>(value: Option<T>, unit: &str) -> Option<String> {
    value.map(|v| format!("{v}{unit}"))
}

fn rows(pairs: &[(&str, Option<String>)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 2;
    pairs
        .iter()
        .filter_map(|(k, v)| {
            v.as_ref()
                .map(|v| format!("{:<width$}{v}\n", format!("{k}:")))
        })
        .collect()
}

pub fn domain_list(domains: &[DomainSummary]) -> String {
    let name_width = domains
        .iter()
        .map(|d| d.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let mut out = format!(" {:<4} {:<name_width$}   State\n", "Id", "Name");
    out.push_str(&"-".repeat(name_width + 20));
    out.push('\n');
    for d in domains {
        let id = d.id.map_or("-".to_string(), |i| i.to_string());
        out.push_str(&format!(" {id:<4} {:<name_width$}   {}\n", d.name, d.state));
    }
    out
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.to_string()
}

pub fn domain_info(info: &DomainInfo) -> String {
    rows(&[
        ("Id", Some(info.id.map_or("-".into(), |i| i.to_string()))),
        ("Name", Some(info.name.clone())),
        ("State", Some(info.state.to_string())),
        ("Persistent", Some(yes_no(info.persistent))),
        ("CPU(s)", Some(info.vcpus.to_string())),
        (
            "Max memory",
            Some(format!("{} KiB", u64::from(info.memory_mib) * 1024)),
        ),
        (
            "Guest RAM",
            opt(info.guest_ram_bytes.map(|b| b / 1024), " KiB"),
        ),
        ("Accelerator", Some(info.accel.to_string())),
        ("Machine", info.machine.clone()),
        (
            "QEMU",
            info.qemu_version
                .as_ref()
                .map(|v| format!("{v} (pid {})", info.qemu_pid.unwrap_or(0))),
        ),
        ("QMP socket", info.qmp_socket.clone()),
        ("Serial log", info.serial_log.clone()),
        ("QEMU log", info.qemu_log.clone()),
        (
            "TCG workaround",
            info.qemu_pid.map(|_| {
                info.tcg_dirty_bitmap_workaround
                    .clone()
                    .unwrap_or_else(|| "not needed".into())
            }),
        ),
        (
            "Migration bandwidth",
            opt(info.tunables.bandwidth_mib_s, " MiB/s"),
        ),
        ("Migration downtime", opt(info.tunables.downtime_ms, " ms")),
        ("Active job", info.active_job.clone()),
    ])
}

pub fn capabilities(caps: &HostCapabilities) -> String {
    let q = &caps.qemu;
    let list = |set: &std::collections::BTreeSet<String>| {
        set.iter().cloned().collect::<Vec<_>>().join(" ")
    };
    rows(&[
        ("Host", Some(caps.host.clone())),
        ("QEMU binary", Some(q.path.clone())),
        (
            "QEMU version",
            Some(format!("{} ({})", q.version, q.package)),
        ),
        (
            "KVM",
            Some(if q.kvm_present { "present" } else { "absent" }.into()),
        ),
        ("Default accelerator", Some(caps.default_accel.to_string())),
        (
            "TCG migration bug",
            Some(if caps.tcg_dirty_bitmap_bug {
                "present (worked around with an off-grid RAM size)".into()
            } else {
                "absent".into()
            }),
        ),
        (
            "Migration capabilities",
            Some(list(&q.migration_capabilities)),
        ),
        ("Migration parameters", Some(list(&q.migration_parameters))),
        (
            "vCPU throttle",
            caps.vcpu_throttle.as_ref().map(throttle_mechanism),
        ),
    ])
}

/// "host, up to 99.9 %: ..." for `domcapabilities` and `estimate`.
fn throttle_mechanism(m: &protocol::host::ThrottleMechanism) -> String {
    format!(
        "{}, up to {:.1} %: {}",
        m.kind, m.max_throttle_pct, m.detail
    )
}

pub fn job_info(job: &JobInfo) -> String {
    let s = &job.stats;
    let kind = match job.status {
        JobStatus::Active => "Unbounded",
        JobStatus::Completed => "Completed",
        JobStatus::Failed => "Failed",
        JobStatus::Cancelled => "Cancelled",
    };
    let operation = match job.role {
        Role::Source => "Outgoing migration",
        Role::Destination => "Incoming migration",
    };
    let processed = s.memory_processed_bytes;
    let remaining = s.memory_remaining_bytes;
    rows(&[
        ("Job type", Some(kind.into())),
        ("Operation", Some(operation.into())),
        ("Job id", Some(job.id.clone())),
        ("Phase", Some(job.phase.to_string())),
        ("Time elapsed", Some(format!("{} ms", job.elapsed_ms))),
        ("Data processed", processed.map(mib)),
        ("Data remaining", remaining.map(mib)),
        ("Data total", s.memory_total_bytes.map(mib)),
        ("Memory processed", processed.map(mib)),
        ("Memory remaining", remaining.map(mib)),
        ("Memory total", s.memory_total_bytes.map(mib)),
        // virsh's names for a copy-storage job's disks.
        ("File processed", s.disk_processed_bytes.map(mib)),
        ("File remaining", s.disk_remaining_bytes().map(mib)),
        ("File total", s.disk_total_bytes.map(mib)),
        (
            "File dirty rate",
            s.disk_dirty_rate_bytes_s
                .map(|b| format!("{:.3} MiB/s", b as f64 / MIB)),
        ),
        (
            "Memory bandwidth",
            s.bandwidth_mib_s.map(|b| format!("{b:.3} MiB/s")),
        ),
        ("Dirty rate", opt(s.dirty_rate_pages_s, " pages/s")),
        ("Page size", opt(s.page_size, " bytes")),
        ("Iteration", opt(s.iteration, "")),
        ("Constant pages", opt(s.constant_pages, "")),
        ("Normal pages", opt(s.normal_pages, "")),
        ("Normal data", s.normal_bytes.map(mib)),
        ("Expected downtime", opt(s.expected_downtime_ms, " ms")),
        ("Downtime limit", opt(job.downtime_limit_ms, " ms")),
        ("Bandwidth limit", opt(job.bandwidth_limit_mib_s, " MiB/s")),
        ("Total downtime", opt(s.downtime_ms, " ms")),
        ("Setup time", opt(s.setup_time_ms, " ms")),
        ("Auto converge throttle", opt(s.cpu_throttle_pct, "%")),
        ("Convergence", Some(job.converge.to_string())),
        ("Throttle", Some(format!("{:.1}%", job.throttle_pct))),
        (
            "Max throttle",
            Some(format!("{:.1}%", job.max_cpu_throttle_pct)),
        ),
        (
            "Guest work lost",
            Some(format!(
                "~{:.1} s (vCPU throttle so far, in full-speed seconds)",
                job.guest_work_lost_s
            )),
        ),
        ("Flags", Some(job.flags.join(" "))),
        (
            "Phases",
            (!job.phases.is_empty()).then(|| phases(&job.phases)),
        ),
        ("Error", job.error.clone()),
    ]) + &actions(&job.actions)
}

/// "begin at 0 ms, prepare at 41 ms, perform at 612 ms, ...": when each
/// phase began after the command reached the source agent.
fn phases(phases: &[protocol::job::PhaseTime]) -> String {
    phases
        .iter()
        .map(|p| format!("{} at {} ms", p.phase, p.at_ms))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The job's timeline, one action a line.
pub fn actions(actions: &[TimedAction]) -> String {
    let mut out = String::new();
    if !actions.is_empty() {
        out.push_str("Actions:\n");
    }
    for a in actions {
        let value = a.value.map(|v| format!(" {v:.1}")).unwrap_or_default();
        out.push_str(&format!(
            "  {:>8.3} s  {}{value}: {}\n",
            a.t_ms as f64 / 1000.0,
            a.action,
            a.detail
        ));
    }
    out
}

pub fn record_summary(r: &JobRecord) -> String {
    let mut out = match r.status {
        JobStatus::Completed => format!(
            "Migration of '{}' to {} completed in {:.1} s: downtime {}, {} transferred over {} \
             iterations, max CPU throttle {:.1}% ({})\n",
            r.domain,
            r.destination,
            r.total_time_ms as f64 / 1000.0,
            r.downtime_ms.map_or("n/a".into(), |d| format!("{d} ms")),
            mib(r.transferred_bytes),
            r.iterations,
            r.max_cpu_throttle_pct,
            r.converge
        ),
        status => format!(
            "Migration of '{}' to {} {status} after {:.1} s: {}\n",
            r.domain,
            r.destination,
            r.total_time_ms as f64 / 1000.0,
            r.error.as_deref().unwrap_or("no error recorded")
        ),
    };
    if let Some(recovery) = &r.recovery {
        out.push_str(&format!("Recovery: {recovery}\n"));
    }
    if !r.phases.is_empty() {
        out.push_str(&format!(
            "Phases: {}{}\n",
            phases(&r.phases),
            r.first_byte_ms
                .map(|ms| format!("; first byte after {ms} ms"))
                .unwrap_or_default()
        ));
    }
    out.push_str(&actions(&r.actions));
    out.push_str(&format!("Job id: {}\n", r.id));
    out
}

/// One progress line, as `migrate --verbose` prints it.
pub fn progress_line(job: &JobInfo) -> String {
    let s = &job.stats;
    // Disks copied first: until memory moves, their copy is the progress.
    if let (None, Some(total), Some(done)) = (
        s.memory_total_bytes,
        s.disk_total_bytes,
        s.disk_processed_bytes,
    ) {
        let pct = if total > 0 {
            100.0 * done as f64 / total as f64
        } else {
            100.0
        };
        let dirty = s
            .disk_dirty_rate_bytes_s
            .map(|b| format!(", written again at {:.1} MiB/s", b as f64 / MIB))
            .unwrap_or_default();
        let throttle = if job.throttle_pct > 0.0 {
            format!(", vCPU throttle {:.1} %", job.throttle_pct)
        } else {
            String::new()
        };
        return format!(
            "Migration: [{pct:3.0} %] phase {}, copying disks: {} of {}{dirty}{throttle}",
            job.phase,
            mib(done),
            mib(total)
        );
    }
    let pct = match (s.memory_total_bytes, s.memory_remaining_bytes) {
        (Some(total), Some(remaining)) if total > 0 => {
            format!(
                "{:3.0} %",
                100.0 * (total.saturating_sub(remaining)) as f64 / total as f64
            )
        }
        _ => "  - %".into(),
    };
    format!(
        "Migration: [{pct}] phase {}, pass {}, remaining {}, {}, dirty {}, throttle {:.1}%, expected downtime {}",
        job.phase,
        s.iteration.unwrap_or(0),
        s.memory_remaining_bytes.map_or("-".into(), mib),
        s.bandwidth_mib_s.map_or("-".into(), |b| format!("{b:.1} MiB/s")),
        s.dirty_rate_pages_s
            .zip(s.page_size)
            .map_or("-".into(), |(p, size)| format!("{:.1} MiB/s", (p * size) as f64 / MIB)),
        job.throttle_pct.max(s.cpu_throttle_pct.unwrap_or(0) as f64),
        s.expected_downtime_ms.map_or("-".into(), |d| format!("{d} ms")),
    )
}

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
        ("Dirtied", Some(windows.join(", "))),
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

/// `jobs`.
pub fn job_list(jobs: &[JobSummary]) -> String {
    let mut out = format!(
        "{:<36}  {:<16} {:<11} {:<9} {:>9} {:>9} {:>9}  {:<11} {}\n",
        "Job",
        "Domain",
        "Role",
        "Status",
        "Time",
        "Downtime",
        "Throttle",
        "Convergence",
        "Predicted"
    );
    for j in jobs {
        out.push_str(&format!(
            "{:<36}  {:<16} {:<11} {:<9} {:>7.1} s {:>9} {:>8.1}%  {:<11} {}\n",
            j.id,
            j.domain,
            j.role,
            j.status,
            j.total_time_ms as f64 / 1000.0,
            j.downtime_ms.map_or("-".into(), |d| format!("{d} ms")),
            j.max_throttle_pct,
            if j.converge.is_empty() {
                "none"
            } else {
                &j.converge
            },
            predicted(j),
        ));
    }
    out
}

/// "12.6 s (-30 %)": the predicted total time, and by how much it missed
/// the real one.
fn predicted(j: &JobSummary) -> String {
    match j.predicted_total_ms {
        Some(p) if j.total_time_ms > 0 && j.status == "completed" => format!(
            "{:.1} s ({:+.0} %)",
            p as f64 / 1000.0,
            (p as f64 - j.total_time_ms as f64) / j.total_time_ms as f64 * 100.0
        ),
        Some(p) => format!("{:.1} s", p as f64 / 1000.0),
        None => "-".into(),
    }
}
