//! Text output in virsh's style; `estimate` draws an estimate.

pub mod drain;
mod estimate;

pub use estimate::estimate;

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

pub(crate) fn rows(pairs: &[(&str, Option<String>)]) -> String {
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
pub(crate) fn throttle_mechanism(m: &protocol::host::ThrottleMechanism) -> String {
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

/// One progress line, as `migrate --verbose` prints it; `done` is the
/// whole job's share (see `progress::Completion`).
pub fn progress_line(job: &JobInfo, done: f64) -> String {
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
        (Some(total), Some(_)) if total > 0 => format!("{:3.0} %", 100.0 * done),
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

#[cfg(test)]
mod tests;
