//! Convergence beyond auto-converge, end to end: the adaptive controller,
//! the escalation policy and the timeout actions, on real QEMU.

use guest::Workload;
use protocol::job::{ActionKind, JobRecord, JobStatus};
use protocol::{ConvergeMode, MigrateOptions};
use testkit::{assert_runs_only_on, TestBed};

/// ~50 MiB/s over a 16 MiB working set: against 16 MiB/s plain pre-copy
/// never converges.
const BUSY: Workload = Workload {
    working_set_mib: 16,
    spin: 20_000,
    report_ms: 500,
};
/// ~1 GiB/s over 48 MiB: fills its working set well within a second even
/// on a loaded machine, and a working set that large is read well above the
/// noise of QEMU's page sampling (256 pages of a 64 MiB guest: about
/// ±1.7 MiB).
const FAST: Workload = Workload {
    working_set_mib: 48,
    spin: 1_000,
    report_ms: 500,
};
/// ~4 MiB/s: converges on its own against 16 MiB/s.
const LIGHT: Workload = Workload {
    working_set_mib: 16,
    spin: 250_000,
    report_ms: 500,
};

fn flags(converge: ConvergeMode) -> MigrateOptions {
    MigrateOptions {
        live: true,
        converge: Some(converge),
        bandwidth: Some(16),
        timeout: Some(120),
        ..Default::default()
    }
}

/// The controller's options on a link slow enough that the busy guest's
/// migration outlasts the pre-flight measurement (1 s and 3 s of
/// sampling), so that its job carries the measurement and a prediction:
/// at 16 MiB/s the controller, planning for the worst from the first
/// saturated pass, is done in about two seconds.
fn measured_flags() -> MigrateOptions {
    MigrateOptions {
        bandwidth: Some(6),
        ..flags(ConvergeMode::Adaptive)
    }
}

fn actions(record: &JobRecord, kind: &str) -> Vec<f64> {
    record
        .actions
        .iter()
        .filter(|a| a.action.name() == kind)
        .map(|a| a.value.unwrap_or(0.0))
        .collect()
}

/// The cgroup (v1 cpu controller) a thread is in, e.g. "/" or "/livemig/x".
fn cpu_cgroup(pid: u32, tid: u32) -> String {
    migration::vcpu_throttle::cgroup::cpu_cgroup_of(pid, tid).unwrap_or_default()
}

#[tokio::test]
async fn adaptive_migration_of_a_busy_guest_throttles_then_releases() {
    let bed = TestBed::new().await;
    let (a, b) = bed.two_hosts_running("vm", 64, BUSY).await;

    let record = a.migrate("vm", &b, measured_flags()).await;

    assert_eq!(record.status, JobStatus::Completed, "{record:#?}");
    assert_eq!(record.converge, ConvergeMode::Adaptive);
    assert!(!record.auto_converge, "QEMU's auto-converge stays off");
    let throttles = actions(&record, "throttle");
    assert!(!throttles.is_empty(), "{:#?}", record.actions);
    assert!(record.max_cpu_throttle_pct > 0.0);
    assert!(record.max_cpu_throttle_pct <= 99.9);
    assert_eq!(actions(&record, "release"), [0.0], "{:#?}", record.actions);
    assert!(
        !actions(&record, "measure").is_empty(),
        "pre-flight measurement"
    );
    assert!(record.downtime_ms.unwrap() <= 300);
    // The mechanism follows the host: its cgroup when there is one, else
    // QEMU's own throttle.
    let detail = &record
        .actions
        .iter()
        .find(|a| a.action == ActionKind::Throttle)
        .unwrap()
        .detail;
    let mechanism = if testkit::host_throttle_available() {
        "host:"
    } else {
        "qemu:"
    };
    assert!(detail.starts_with(mechanism), "{detail}");
    // The controller's prediction, made once it had measured the guest,
    // is kept beside the outcome, and `jobs` shows how far off it was.
    let predicted = record.predicted_total_ms.expect("a prediction");
    assert!(predicted > 0, "{record:#?}");
    let jobs = testkit::output::stdout(&a.cli(&["jobs"]));
    let row = jobs
        .lines()
        .find(|l| l.starts_with(&record.id))
        .unwrap_or_else(|| panic!("{jobs}"));
    assert!(
        row.contains(&format!("{:.1} s (", predicted as f64 / 1000.0)),
        "{jobs}"
    );
    assert_runs_only_on("vm", &b, &a, 2).await;
}

#[tokio::test]
async fn adaptive_never_throttles_a_guest_that_converges_on_its_own() {
    let bed = TestBed::new().await;
    let (a, b) = bed.two_hosts_running("vm", 64, LIGHT).await;

    let record = a.migrate("vm", &b, flags(ConvergeMode::Adaptive)).await;

    assert_eq!(record.status, JobStatus::Completed, "{record:#?}");
    assert!(
        actions(&record, "throttle").iter().all(|t| *t == 0.0),
        "{:#?}",
        record.actions
    );
    assert_eq!(record.max_cpu_throttle_pct, 0.0);
    assert_runs_only_on("vm", &b, &a, 2).await;
}

/// `estimate --json` on `host`, parsed.
fn estimate_json(host: &testkit::Host) -> serde_json::Value {
    let out = host.cli(&["estimate", "vm", "--bandwidth", "16", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test]
async fn estimate_is_calibrated_on_the_domains_past_migrations_from_this_host() {
    let bed = TestBed::new().await;
    // A guest the controller has to help: its jobs predict their time.
    let (a, b) = bed.two_hosts_running("vm", 64, BUSY).await;
    let first = a.migrate("vm", &b, measured_flags()).await;
    assert_eq!(first.status, JobStatus::Completed, "{first:#?}");
    let predicted = first.predicted_total_ms.expect("a prediction") as f64;

    // b only received the guest: nothing to calibrate on there.
    let report = estimate_json(&b);
    assert!(report.get("calibrations").is_none(), "{report:#}");

    let back = b.migrate("vm", &a, flags(ConvergeMode::Adaptive)).await;
    assert_eq!(back.status, JobStatus::Completed, "{back:#?}");
    // a sent the guest once with the controller: its adaptive estimate is
    // corrected by how that job's prediction fared, and only that one.
    let report = estimate_json(&a);
    let calibrations = report["calibrations"].as_array().unwrap();
    assert_eq!(calibrations.len(), 1, "{report:#}");
    let c = &calibrations[0];
    assert_eq!(c["policy"], "adaptive", "{report:#}");
    assert_eq!(c["jobs"], 1, "{report:#}");
    let factor = first.total_time_ms as f64 / predicted;
    assert!(
        (c["factor"].as_f64().unwrap() - factor).abs() < 1e-6,
        "{factor} {report:#}"
    );
    let adaptive = report["predictions"]["adaptive"]["total_secs"]
        .as_f64()
        .unwrap();
    assert!(
        (c["total_secs"].as_f64().unwrap() - adaptive * factor).abs() < 1e-6,
        "{report:#}"
    );
    let text = testkit::output::stdout(&a.cli(&["estimate", "vm", "--bandwidth", "16"]));
    assert!(
        text.contains("adaptive: calibrated on 1 past migration of this domain"),
        "{text}"
    );
    assert_runs_only_on("vm", &a, &b, 2).await;
}

#[tokio::test]
async fn an_aborted_adaptive_migration_gives_the_guest_its_cpu_back() {
    let bed = TestBed::new().await;
    let (a, b) = bed.two_hosts_running("vm", 64, BUSY).await;
    let pid = a.dominfo("vm").await.unwrap().qemu_pid.unwrap();
    let cpus = a.qmp("vm", "query-cpus-fast").await.unwrap();
    let tid = cpus[0]["thread-id"].as_u64().unwrap() as u32;
    let before = cpu_cgroup(pid, tid);

    // 2 MiB/s: the controller throttles hard, and it still cannot finish.
    let options = MigrateOptions {
        bandwidth: Some(2),
        timeout: None,
        ..flags(ConvergeMode::Adaptive)
    };
    let job = a
        .migration_until("vm", &b, options, "the controller to throttle", |j| {
            j.throttle_pct > 0.0
        })
        .await;
    if testkit::host_throttle_available() {
        assert!(
            cpu_cgroup(pid, tid).contains("livemig"),
            "vCPU thread in our cgroup"
        );
    } else {
        eprintln!(
            "skipped the cgroup checks: this host has no cgroup v1 cpu controller (the \
             controller throttled with QEMU's own throttle; the guest's speed is still checked)"
        );
    }
    a.cli_ok(&["domjobabort", "vm"]);
    let record = a.wait_job(&job).await;

    assert_eq!(record.status, JobStatus::Cancelled);
    assert_eq!(actions(&record, "release"), [0.0]);
    assert_eq!(
        cpu_cgroup(pid, tid),
        before,
        "vCPU thread back where it was"
    );
    // Full speed again: as many writes per second as an unthrottled guest.
    let log = a.wait_guest_progress("vm", 4).await;
    let (p1, p2) = (
        log.progress[log.progress.len() - 2],
        log.progress[log.progress.len() - 1],
    );
    let rate = (p2.writes - p1.writes) as f64 / ((p2.t_ms - p1.t_ms) as f64 / 1000.0);
    assert!(rate > 5_000.0, "guest still slowed: {rate:.0} writes/s");
    assert!(log.memory_intact());
}

/// Through the CLI, with virsh's spelling of the suspend action.
#[tokio::test]
async fn timeout_suspend_lets_the_copy_finish_and_resumes_on_the_destination() {
    let bed = TestBed::new().await;
    let (a, b) = bed.two_hosts_running("vm", 64, BUSY).await;

    let out = a.cli_migrate(
        "vm",
        &b,
        &[
            "--live",
            "--converge",
            "none",
            "--bandwidth",
            "16",
            "--timeout",
            "8",
            "--timeout-suspend",
            "--json",
        ],
    );
    let record = testkit::output::json_record(&out);

    assert_eq!(record.status, JobStatus::Completed, "{record:#?}");
    assert!(
        record.flags.iter().any(|f| f == "timeout-action=suspend"),
        "{:?}",
        record.flags
    );
    assert_eq!(
        actions(&record, "suspend").len(),
        1,
        "{:#?}",
        record.actions
    );
    assert_runs_only_on("vm", &b, &a, 2).await;
}

#[tokio::test]
async fn a_stalled_migration_raises_the_downtime_limit_up_to_the_ceiling() {
    let bed = TestBed::new().await;
    let (a, b) = bed.two_hosts_running("vm", 64, BUSY).await;

    // 16 MiB rewritten every pass; 2 s at 16 MiB/s covers it.
    let record = a
        .migrate_completes(
            "vm",
            &b,
            MigrateOptions {
                max_downtime: Some(2_000),
                ..flags(ConvergeMode::None)
            },
        )
        .await;
    assert_eq!(
        actions(&record, "downtime"),
        [2_000.0],
        "{:#?}",
        record.actions
    );
    assert!(record.downtime_ms.unwrap() <= 2_500, "{record:#?}");
}

#[tokio::test]
async fn a_stalled_migration_switches_to_postcopy_when_allowed() {
    let bed = TestBed::new().await;
    let (a, b) = bed.two_hosts_running("vm", 64, BUSY).await;

    let record = a
        .migrate_completes(
            "vm",
            &b,
            MigrateOptions {
                allow_postcopy: true,
                ..flags(ConvergeMode::None)
            },
        )
        .await;
    assert_eq!(
        actions(&record, "postcopy").len(),
        1,
        "{:#?}",
        record.actions
    );
}

#[tokio::test]
async fn with_postcopy_allowed_a_guest_that_needs_a_throttle_goes_to_postcopy_instead() {
    // The busy guest fills its 16 MiB within the first second: a throttle
    // near 95 % on 16 MiB/s, which would cost it more than the second
    // post-copy takes to send what is left.
    let bed = TestBed::new().await;
    let (a, b) = bed.two_hosts_running("vm", 64, BUSY).await;

    let record = a
        .migrate(
            "vm",
            &b,
            MigrateOptions {
                allow_postcopy: true,
                ..flags(ConvergeMode::Adaptive)
            },
        )
        .await;

    assert_eq!(record.status, JobStatus::Completed, "{record:#?}");
    let postcopy: Vec<&str> = record
        .actions
        .iter()
        .filter(|a| a.action == ActionKind::Postcopy)
        .map(|a| a.detail.as_str())
        .collect();
    assert_eq!(postcopy.len(), 1, "{:#?}", record.actions);
    assert!(
        postcopy[0].contains("throttle would") && postcopy[0].contains("post-copy at most"),
        "{postcopy:?}"
    );
    assert_eq!(record.max_cpu_throttle_pct, 0.0, "{:#?}", record.actions);
    assert!(record.stats.postcopy_work_lost_ms.is_some(), "{record:#?}");
    assert_runs_only_on("vm", &b, &a, 2).await;
    let log = b.wait_guest_passes("vm", 2).await;
    assert!(log.memory_intact(), "{:?}", log.corruptions);
}

#[tokio::test]
async fn estimate_and_dry_run_predict_without_touching_the_guest() {
    let bed = TestBed::new().await;
    // 128 MiB of RAM of which the guest writes 48: the first pass sends
    // what it touched, QEMU sends the rest as zero pages.
    let (a, b) = bed.two_hosts_running("vm", 128, FAST).await;
    let pid = a.dominfo("vm").await.unwrap().qemu_pid.unwrap();

    let out = a.cli(&["estimate", "vm", "--bandwidth", "16", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["samples"].as_array().unwrap().len(), 2);
    let in_use = report["guest_ram_in_use_bytes"]
        .as_u64()
        .expect("RAM in use read");
    assert!(
        (48 << 20..=96 << 20).contains(&in_use),
        "{} MiB in use of 128",
        in_use >> 20
    );
    // A fast writer over 48 MiB against 16 MiB/s fills its working set
    // within a second: the rate is a lower bound, plain pre-copy may not
    // make it, the controller does either way.
    let p = &report["predictions"];
    assert_eq!(report["model"]["rate_is_lower_bound"], true, "{report:#}");
    assert_eq!(p["worst_case"]["none"]["converges"], false, "{report:#}");
    assert_eq!(p["adaptive"]["converges"], true, "{report:#}");
    assert_eq!(p["worst_case"]["adaptive"]["converges"], true, "{report:#}");
    let text = a.cli(&["estimate", "vm", "--bandwidth", "16"]).stdout;
    let text = String::from_utf8_lossy(&text);
    assert!(text.contains("in use: the first pass sends that"), "{text}");
    // This estimate measured again: its text calls the rate a lower bound
    // when its own first window filled the working set (beside the other
    // tests' guests, this one sometimes writes a little slower).
    let mib_after = |label: &str| -> f64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(label))
            .unwrap_or_else(|| panic!("{text}"));
        line[label.len()..]
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    // (The text rounds to whole MiB: near the 85 % line either is right.)
    let filled = mib_after("Dirtied:") / mib_after("Working set:");
    if !(0.8..0.9).contains(&filled) {
        assert_eq!(text.contains("only a lower"), filled >= 0.9, "{text}");
    }

    let dry = a.cli_migrate(
        "vm",
        &b,
        &[
            "--live",
            "--converge",
            "adaptive",
            "--bandwidth",
            "16",
            "--dry-run",
        ],
    );
    let text = String::from_utf8_lossy(&dry.stdout);
    assert!(
        text.contains("Dry run") && text.contains("adaptive"),
        "{text}"
    );

    // Nothing moved, nothing was started.
    let info = a.dominfo("vm").await.unwrap();
    assert_eq!(info.qemu_pid, Some(pid));
    assert_eq!(info.active_job, None);
    assert!(b.qemu_pids().is_empty());
    assert!(b.dominfo("vm").await.is_err());
    // A dry run still fails Begin's checks.
    let bad = a.cli(&[
        "migrate",
        "--live",
        "--dirty-limit",
        "--dry-run",
        "vm",
        &b.uri(),
    ]);
    assert_eq!(bad.status.code(), Some(1));
}

#[tokio::test]
async fn without_a_host_throttle_the_controller_steers_qemus_own() {
    let bed = TestBed::new().await;
    // No cgroup cpu controller where this agent looks: QEMU's throttle it is.
    let config = bed.path().join("a.toml");
    std::fs::write(&config, "cgroup_cpu = \"/nonexistent\"\n").unwrap();
    let a = bed
        .host_args("a", &["--config", config.to_str().unwrap()])
        .await;
    let b = bed.host("b").await;
    a.define_and_start(bed.definition("vm", 64, BUSY)).await;
    // Both say which throttle and why.
    let caps = testkit::output::stdout(&a.cli(&["domcapabilities"]));
    assert!(
        caps.contains("vCPU throttle")
            && caps.contains("qemu, up to 99.0 %")
            && caps.contains("/nonexistent"),
        "{caps}"
    );
    let b_caps = testkit::output::stdout(&b.cli(&["domcapabilities"]));
    assert!(b_caps.contains("vCPU throttle"), "{b_caps}");
    if testkit::host_throttle_available() {
        assert!(b_caps.contains("host, up to 99.9 %"), "{b_caps}");
        assert!(b_caps.contains("only the ones found writing"), "{b_caps}");
    }

    let record = a.migrate("vm", &b, flags(ConvergeMode::Adaptive)).await;

    assert_eq!(record.status, JobStatus::Completed, "{record:#?}");
    let throttle = record
        .actions
        .iter()
        .find(|a| a.action == ActionKind::Throttle && a.value.unwrap_or(0.0) > 0.0)
        .unwrap_or_else(|| panic!("no throttle: {:#?}", record.actions));
    assert!(throttle.detail.starts_with("qemu:"), "{}", throttle.detail);
    assert!(record.max_cpu_throttle_pct <= 99.0);
    assert!(!record.auto_converge, "auto-converge only as the mechanism");
    assert_runs_only_on("vm", &b, &a, 2).await;
}

/// CPU time a process used so far, seconds (utime + stime).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command's closing parenthesis; utime and stime are
    // the 14th and 15th of the line.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

/// CPU seconds `pid` gets during one second of wall time.
async fn cpu_share(pid: u32) -> f64 {
    let before = cpu_seconds(pid);
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    (cpu_seconds(pid) - before) / 2.0
}

/// A process of the test's, killed (by pid) when dropped.
struct Spinner(std::process::Child);

impl Drop for Spinner {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What the systemd unit's stop hook (`livemigd release-throttles`) is
/// for: a throttle left with neither its agent nor its lease's guard (both
/// killed) is lifted, and only that agent's.
#[tokio::test]
async fn the_stop_hook_lifts_a_throttle_left_without_agent_or_guard() {
    use migration::vcpu_throttle::cgroup::{Hierarchy, HostThrottle};
    if !testkit::host_throttle_available() {
        eprintln!("skipped: this host has no cgroup cpu controller to throttle with");
        return;
    }
    let bed = TestBed::new().await;
    let state_dir = bed.path().join("crashed-agent");
    // A busy process stands in for a vCPU thread, throttled in that
    // agent's scope as a crashed agent would leave it.
    let spinner = Spinner(
        std::process::Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .spawn()
            .unwrap(),
    );
    let pid = spinner.0.id();
    let hierarchy = Hierarchy::probe(&Hierarchy::default_root()).unwrap();
    let scope = agent::config::throttle_scope(&state_dir);
    let mut throttle = HostThrottle::attach(&hierarchy, &scope, "vm-left", pid, &[pid]).unwrap();
    throttle.set(0.999).unwrap();
    std::mem::forget(throttle);
    let throttled = cpu_share(pid).await;
    assert!(throttled < 0.05, "throttled: {throttled:.2} CPU");
    // Another agent's throttle, which the hook must leave alone.
    let other_dir = bed.path().join("other-agent");
    let other = HostThrottle::attach(
        &hierarchy,
        &agent::config::throttle_scope(&other_dir),
        "vm-other",
        pid,
        &[],
    )
    .unwrap();

    let out = std::process::Command::new(testkit::bin("livemigd"))
        .arg("--state-dir")
        .arg(&state_dir)
        .arg("release-throttles")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        testkit::output::stdout(&out).contains("released 1 vCPU throttle"),
        "{out:?}"
    );

    assert!(testkit::throttles_held(&state_dir).is_empty());
    assert!(
        !cpu_cgroup(pid, pid).contains("livemig"),
        "{}",
        cpu_cgroup(pid, pid)
    );
    let free = cpu_share(pid).await;
    assert!(free > 0.1, "still throttled: {free:.2} CPU");
    assert_eq!(testkit::throttles_held(&other_dir), ["vm-other"]);
    drop(other);
    assert!(testkit::throttles_held(&other_dir).is_empty());
}
