//! What an operator sees: live progress, job statistics, history across
//! restarts, timeline reports, metrics, completions, the config file.

use guest::Workload;
use protocol::job::JobStatus;
use protocol::MigrateOptions;
use testkit::{capped, TestBed};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// ~50 MiB/s over 16 MiB: never converges without help.
const BUSY: Workload = Workload {
    working_set_mib: 16,
    spin: 20_000,
    report_ms: 500,
};
/// ~4 MiB/s over 16 MiB: against 8 MiB/s, a migration of a few seconds
/// that converges on its own.
const MOVING: Workload = Workload {
    working_set_mib: 16,
    spin: 250_000,
    report_ms: 500,
};

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A live migration steered by livemig's controller at `mib_s`.
fn adaptive_at(mib_s: u64) -> MigrateOptions {
    MigrateOptions {
        live: true,
        converge: Some(protocol::ConvergeMode::Adaptive),
        bandwidth: Some(mib_s),
        ..Default::default()
    }
}

/// A live migration with QEMU's auto-converge at `mib_s`.
fn auto_converge_at(mib_s: u64) -> MigrateOptions {
    MigrateOptions {
        live: true,
        auto_converge: true,
        bandwidth: Some(mib_s),
        ..Default::default()
    }
}

#[tokio::test]
async fn migrate_json_streams_progress_events_then_the_record() {
    let bed = TestBed::simulated().await;
    let (a, b) = bed.two_hosts_running("vm", 64, MOVING).await;

    let out = a.cli_migrate(
        "vm",
        &b,
        &["--live", "--auto-converge", "--bandwidth", "8", "--json"],
    );

    let text = stdout(&out);
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect();
    let (record, events) = lines.split_last().unwrap();
    let progress: Vec<_> = events.iter().filter(|e| e["event"] == "progress").collect();
    assert!(progress.len() >= 2, "{text}");
    for field in [
        "memory_remaining_bytes",
        "bandwidth_mib_s",
        "pass",
        "throttle_pct",
        "phase",
    ] {
        assert!(
            progress.iter().any(|e| !e[field].is_null()),
            "no {field} in {text}"
        );
    }
    assert!(events
        .iter()
        .all(|e| e["event"] == "progress" || e["event"] == "action"));
    assert_eq!(record["status"], "completed");
    assert!(record["samples"].as_array().unwrap().len() >= 2);
}

#[tokio::test]
async fn migrate_without_a_terminal_prints_a_line_a_second() {
    let bed = TestBed::simulated().await;
    let (a, b) = bed.two_hosts_running("vm", 64, MOVING).await;

    let out = a.cli_migrate("vm", &b, &["--live", "--auto-converge", "--bandwidth", "8"]);

    let text = stdout(&out);
    let lines = text
        .lines()
        .filter(|l| l.starts_with("Migration: ["))
        .count();
    assert!(lines >= 2, "{text}");
    assert!(text.contains("completed in"), "{text}");
}

#[tokio::test]
async fn domjobinfo_shows_the_fields_virsh_users_know() {
    let bed = TestBed::simulated().await;
    let (a, b) = bed.two_hosts_running("vm", 64, BUSY).await;
    let job = a
        .migration_until("vm", &b, capped(8), "a pass to finish", |j| {
            j.stats.iteration.unwrap_or(0) >= 2
        })
        .await;

    let text = stdout(&a.cli(&["domjobinfo", "vm"]));
    for field in [
        "Job type:",
        "Time elapsed:",
        "Data processed:",
        "Data remaining:",
        "Data total:",
        "Memory processed:",
        "Memory remaining:",
        "Memory total:",
        "Memory bandwidth:",
        "Dirty rate:",
        "Iteration:",
        "Page size:",
        "Constant pages:",
        "Normal pages:",
        "Expected downtime:",
        "Setup time:",
        "Throttle:",
    ] {
        assert!(text.contains(field), "no {field:?} in\n{text}");
    }
    let json: serde_json::Value =
        serde_json::from_str(&stdout(&a.cli(&["domjobinfo", "vm", "--json"]))).unwrap();
    assert_eq!(json["id"], job.as_str());
    assert!(json["stats"]["memory_total_bytes"].as_u64().unwrap() > 0);

    a.cli_ok(&["domjobabort", "vm"]);
    a.wait_job(&job).await;
    let done = stdout(&a.cli(&["domjobinfo", "--completed", "vm"]));
    assert!(
        done.contains("Cancelled") && done.contains("cancel"),
        "{done}"
    );
    // virsh's --keep-completed: the record is there to read again.
    let kept = stdout(&a.cli(&["domjobinfo", "--completed", "--keep-completed", "vm"]));
    assert_eq!(kept, done);
}

#[tokio::test]
async fn domdirtyrate_calc_measures_and_domstats_shows_it_as_virsh_does() {
    let bed = TestBed::simulated().await;
    let a = bed.host("a").await;
    a.define_and_start(bed.definition("vm", 64, BUSY)).await;

    let out = a.cli(&["domdirtyrate-calc", "vm", "--seconds", "0"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("between 1 and 60"), "{out:?}");
    let before = stdout(&a.cli_ok(&["domstats", "--dirtyrate", "vm"]));
    assert!(before.contains("dirtyrate.calc_status=0"), "{before}");

    a.cli_ok(&["domdirtyrate-calc", "vm", "--seconds", "1"]);
    let again = a.cli(&["domdirtyrate-calc", "vm"]);
    assert_eq!(again.status.code(), Some(1));
    assert!(
        stderr(&again).contains("being measured already"),
        "{again:?}"
    );
    let measuring = stdout(&a.cli_ok(&["domstats", "--dirtyrate", "vm"]));
    assert!(measuring.contains("dirtyrate.calc_status=1"), "{measuring}");

    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    let text = stdout(&a.cli_ok(&["domstats", "--dirtyrate", "vm"]));
    assert!(text.starts_with("Domain: 'vm'"), "{text}");
    assert!(text.contains("dirtyrate.calc_status=2"), "{text}");
    assert!(text.contains("dirtyrate.calc_period=1"), "{text}");
    let json: serde_json::Value = serde_json::from_str(&stdout(&a.cli_ok(&[
        "domstats",
        "--dirtyrate",
        "vm",
        "--json",
    ])))
    .unwrap();
    // ~50 MiB/s over a 16 MiB working set.
    let mib_s = json["dirtyrate"]["mib_s"].as_i64().unwrap();
    assert!(mib_s > 0, "{json}");
}

#[tokio::test]
async fn migrate_compcache_reads_and_sets_the_xbzrle_cache() {
    let bed = TestBed::simulated().await;
    let a = bed.host("a").await;
    a.define_and_start(bed.definition("vm", 64, BUSY)).await;

    let size = stdout(&a.cli_ok(&["migrate-compcache", "vm"]));
    assert_eq!(size, "Compression cache: 64.000 MiB\n", "QEMU's default");
    let set = stdout(&a.cli_ok(&["migrate-compcache", "vm", "--size", "134217728"]));
    assert_eq!(set, "Compression cache: 128.000 MiB\n");
    let bad = a.cli(&["migrate-compcache", "vm", "--size", "5000"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(stderr(&bad).contains("power of two"), "{bad:?}");
    assert_eq!(
        stdout(&a.cli_ok(&["migrate-compcache", "vm"])),
        "Compression cache: 128.000 MiB\n",
        "unchanged by the refusal"
    );
}

#[tokio::test]
async fn job_history_with_timelines_survives_an_agent_restart() {
    let bed = TestBed::simulated().await;
    let mut a = bed.host("a").await;
    let b = bed.host("b").await;
    a.define_and_start(bed.definition("vm", 64, MOVING)).await;
    let flags = auto_converge_at(8);
    let first = a.migrate("vm", &b, flags.clone()).await;
    let second = b.migrate("vm", &a, flags).await;
    assert_eq!(first.status, JobStatus::Completed);
    assert_eq!(second.status, JobStatus::Completed);

    a.restart_keeping_guests().await;

    let jobs: serde_json::Value =
        serde_json::from_str(&stdout(&a.cli(&["jobs", "--json"]))).unwrap();
    let ids: Vec<&str> = jobs
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [second.id.as_str(), first.id.as_str()], "newest first");
    assert_eq!(jobs[1]["role"], "source");
    assert_eq!(jobs[0]["role"], "destination");
    let text = stdout(&a.cli(&["jobs", "--domain", "vm", "--limit", "1"]));
    assert!(
        text.contains(&second.id) && !text.contains(&first.id),
        "{text}"
    );
    let saved: protocol::job::JobRecord =
        serde_json::from_str(&stdout(&a.cli(&["job", &first.id, "--json"]))).unwrap();
    assert_eq!(saved.samples, first.samples);
    assert_eq!(saved.actions, first.actions);
    assert!(!saved.samples.is_empty());
}

#[tokio::test]
async fn report_draws_the_timeline_with_the_expected_series() {
    let bed = TestBed::simulated().await;
    let (a, b) = bed.two_hosts_running("vm", 64, MOVING).await;
    let record = a.migrate("vm", &b, adaptive_at(8)).await;
    assert_eq!(record.status, JobStatus::Completed);

    let svg = bed.path().join("job.svg");
    let html = bed.path().join("job.html");
    for path in [&svg, &html] {
        let out = a.cli(&["report", &record.id, "-o", path.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let svg = std::fs::read_to_string(svg).unwrap();
    for series in report::SERIES {
        assert!(svg.contains(series), "no {series} in the chart");
    }
    assert!(svg.contains("switchover downtime"));
    let html = std::fs::read_to_string(html).unwrap();
    assert!(html.contains(&record.id) && html.contains("<svg"));
    for action in &record.actions {
        assert!(
            html.contains(action.action.name()),
            "action {} missing",
            action.action
        );
    }
}

/// `GET /metrics` on the agent's TLS port, with a monitor's certificate.
async fn scrape(uri: &str, monitor: &std::path::Path) -> String {
    let response = testkit::tls_client::get_metrics(uri, monitor)
        .await
        .expect("the agent serves /metrics over TLS");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in\n{text}"))
}

#[tokio::test]
async fn metrics_are_served_in_prometheus_text_format() {
    let bed = TestBed::simulated().await;
    let (a, b) = bed.two_hosts_running("vm", 64, MOVING).await;
    let monitor = bed.certificate("grafana", protocol::Role::Monitor, &[]);
    let before = scrape(&a.uri(), &monitor).await;
    assert_eq!(metric(&before, "livemig_up"), 1.0);
    assert_eq!(metric(&before, "livemig_domains_running"), 1.0);

    let job = a
        .start_migration("vm", &b.uri(), auto_converge_at(8))
        .await
        .unwrap();
    let during = scrape(&a.uri(), &monitor).await;
    assert_eq!(metric(&during, "livemig_active_jobs{role=\"source\"}"), 1.0);
    assert!(during.contains("livemig_vcpu_throttle_percent{domain=\"vm\"}"));
    assert_eq!(a.wait_job(&job).await.status, JobStatus::Completed);

    let after = scrape(&a.uri(), &monitor).await;
    assert_eq!(
        metric(
            &after,
            "livemig_migrations_total{role=\"source\",status=\"completed\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(&after, "livemig_migration_duration_seconds_count"),
        1.0
    );
    assert_eq!(
        metric(&after, "livemig_migration_downtime_seconds_count"),
        1.0
    );
    assert!(metric(&after, "livemig_migration_transferred_bytes_total") > 0.0);
    assert_eq!(metric(&after, "livemig_active_jobs{role=\"source\"}"), 0.0);
    let on_b = scrape(&b.uri(), &monitor).await;
    assert_eq!(
        metric(
            &on_b,
            "livemig_migrations_total{role=\"destination\",status=\"completed\"}"
        ),
        1.0
    );
    // Every sample line is `name{labels} value` or a comment.
    for line in after.split("\r\n\r\n").nth(1).unwrap().lines() {
        assert!(
            line.starts_with('#') || line.rsplit(' ').next().unwrap().parse::<f64>().is_ok(),
            "bad line {line:?}"
        );
    }
}

#[tokio::test]
async fn a_metrics_only_port_serves_prometheus_and_nothing_else() {
    let bed = TestBed::simulated().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics_uri = format!("tls://127.0.0.1:{port}");
    let a = bed
        .host_args("a", &["--metrics-listen", &metrics_uri])
        .await;
    let monitor = bed.certificate("prometheus", protocol::Role::Monitor, &[]);

    let response = scrape(&metrics_uri, &monitor).await;
    assert!(
        response.contains("content-type: application/openmetrics-text"),
        "{response}"
    );
    assert_eq!(metric(&response, "livemig_up"), 1.0);
    assert!(response.trim_end().ends_with("# EOF"), "{response}");

    // Not the agent protocol: a request is an HTTP error.
    let mut stream = testkit::tls_client::connect(&metrics_uri, &monitor)
        .await
        .unwrap();
    stream
        .write_all(b"{\"version\":1,\"id\":1,\"request\":{\"op\":\"list\",\"all\":true}}\n")
        .await
        .unwrap();
    let mut answer = String::new();
    let _ = stream.read_to_string(&mut answer).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    // Other paths and methods.
    for (request, status) in [
        ("GET /other HTTP/1.1\r\nHost: x\r\n\r\n", "404"),
        (
            "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
            "405",
        ),
    ] {
        let mut stream = testkit::tls_client::connect(&metrics_uri, &monitor)
            .await
            .unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer).await;
        assert!(
            answer.starts_with(&format!("HTTP/1.1 {status}")),
            "{answer}"
        );
    }
    // An endless request line is cut off, on either port.
    for uri in [metrics_uri.clone(), a.uri()] {
        let mut stream = testkit::tls_client::connect(&uri, &monitor).await.unwrap();
        let _ = stream.write_all(b"GET /").await;
        let _ = stream.write_all(&vec![b'a'; 256 << 10]).await;
        let mut answer = String::new();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            stream.read_to_string(&mut answer),
        )
        .await
        .expect("the agent closes the connection");
        assert!(!answer.contains("200 OK"), "{answer}");
    }
    // Without a certificate: no answer at all.
    let plain = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let mut plain = plain;
    let _ = plain.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(15),
        plain.read_to_end(&mut answer),
    )
    .await;
    assert!(!String::from_utf8_lossy(&answer).contains("livemig_up"));
    // The agent still answers.
    assert!(a.list_all().await.is_empty());
}

#[tokio::test]
async fn dumpdef_prints_a_definition_that_defines_the_same_domain() {
    let bed = TestBed::simulated().await;
    let a = bed.host("a").await;
    let mut definition = bed.definition("vm", 64, Workload::IDLE);
    definition.cpu = Some("qemu64".into());
    definition.vcpus = 2;
    a.request(testkit::define(&definition)).await.unwrap();

    let out = a.cli_ok(&["dumpdef", "vm"]);
    let text = stdout(&out);
    let dumped = domain::DomainDefinition::from_toml(&text).unwrap();
    assert_eq!(dumped, definition, "{text}");
    // The dump is a file `define` takes back.
    let file = bed.path().join("vm.toml");
    std::fs::write(&file, &text).unwrap();
    a.cli_ok(&["define", file.to_str().unwrap()]);
    a.cli_ok(&["start", "vm"]);
    a.wait_guest_progress("vm", 1).await;

    // It names host files: administrators only.
    let monitor = bed.certificate("grafana", protocol::Role::Monitor, &[]);
    let denied = std::process::Command::new(testkit::bin("livemig"))
        .arg("--tls-dir")
        .arg(&monitor)
        .args(["-c", &a.uri(), "dumpdef", "vm"])
        .output()
        .unwrap();
    assert!(!denied.status.success());
    assert!(
        stderr(&denied).contains("may not send `dump-def`"),
        "{}",
        stderr(&denied)
    );
}

#[test]
fn completions_and_the_man_page_are_generated_from_the_cli() {
    let livemig = testkit::bin("livemig");
    let bash = std::process::Command::new(&livemig)
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(bash.status.success());
    assert!(stdout(&bash).contains("domjobinfo"));
    let man = std::process::Command::new(&livemig)
        .arg("man")
        .output()
        .unwrap();
    assert!(stdout(&man).contains(".TH livemig"));
    let help = std::process::Command::new(&livemig)
        .args(["--help"])
        .output()
        .unwrap();
    assert!(stdout(&help).contains("Examples:"));
}

#[tokio::test]
async fn livemigd_reads_its_config_file_and_picks_data_ports_from_its_range() {
    let bed = TestBed::simulated().await;
    // Someone else holds the range's first port: QEMU binds the next. A
    // fixed range could be held by any socket of the tests running beside
    // this one; a port the kernel gives is not.
    let taken = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
    let first = taken.local_addr().unwrap().port();
    let last = first + 10;
    let config = bed.path().join("b.toml");
    std::fs::write(
        &config,
        format!("migration_ports = \"{first}-{last}\"\nlog_format = \"json\"\n"),
    )
    .unwrap();
    let (a, b) = bed
        .two_hosts_running_args(
            "vm",
            64,
            Workload::IDLE,
            &["--config", config.to_str().unwrap()],
        )
        .await;
    let record = a.migrate_live("vm", &b).await;

    assert_eq!(record.status, JobStatus::Completed);
    let port: u16 = record
        .data_uri
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!((first + 1..=last).contains(&port), "{port}");
    drop(taken);
    let log = std::fs::read_to_string(b.state_dir().join("livemigd.log")).unwrap();
    assert!(
        log.lines().any(|l| l.starts_with('{')),
        "JSON logs from the config file"
    );
}

/// How many times the agent's log says it probed QEMU.
fn probes_logged(host: &testkit::Host) -> usize {
    std::fs::read_to_string(host.state_dir().join("livemigd.log"))
        .unwrap_or_default()
        .matches("probed QEMU")
        .count()
}

/// The QEMU probe (a QEMU started to list its capabilities) is made once
/// per binary: at the agent's start rather than during the first
/// migration, kept across restarts, and made again when the binary changes
/// as an upgrade changes it.
#[tokio::test]
async fn the_qemu_probe_is_kept_across_restarts_and_redone_when_the_binary_changes() {
    let bed = TestBed::simulated().await;
    // A copy of the VM program of its own, which the test can rewrite.
    let qemu = bed.path().join("livemig-simvm");
    std::fs::copy(bed.simulated_program(), &qemu).unwrap();
    let mut a = bed
        .host_args("a", &["--qemu", qemu.to_str().unwrap()])
        .await;
    let cache = a.state_dir().join("qemu-probe.json");
    testkit::wait_until(
        std::time::Duration::from_secs(30),
        "the probe at the agent's start",
        || async { (probes_logged(&a) == 1 && cache.exists()).then_some(()) },
    )
    .await;

    a.restart().await;
    let caps = a.cli(&["domcapabilities"]);
    assert!(caps.status.success(), "{caps:?}");
    assert!(stdout(&caps).contains("QEMU version"));
    assert_eq!(probes_logged(&a), 0, "probed again after a restart");

    // An upgrade rewrites the binary.
    let touched = std::process::Command::new("touch")
        .args(["-d", "2001-02-03 04:05:06"])
        .arg(&qemu)
        .status()
        .unwrap();
    assert!(touched.success());
    a.restart().await;
    let caps = a.cli(&["domcapabilities"]);
    assert!(caps.status.success(), "{caps:?}");
    assert_eq!(probes_logged(&a), 1, "not probed after the binary changed");
    let log = std::fs::read_to_string(a.state_dir().join("livemigd.log")).unwrap();
    assert!(log.contains("changed since its last probe"), "{log}");
}

/// An agent killed while it probes its QEMU (the probe at its start)
/// leaves that QEMU running, orphaned, and its scratch directory behind:
/// the next agent on the state directory asks the QEMU to quit over its
/// socket and removes the directory.
#[tokio::test]
async fn a_probe_orphaned_by_a_killed_agent_is_cleared_by_the_next() {
    let bed = TestBed::simulated().await;
    let started = bed.path().join("probe-started");
    // The VM program, a second late: the agent is killed meanwhile.
    let qemu = bed.path().join("slow-qemu");
    std::fs::write(
        &qemu,
        format!(
            "#!/bin/sh\necho $$ \"$@\" > {0}.tmp\nmv {0}.tmp {0}\nsleep 1\nexec {1} \"$@\"\n",
            started.display(),
            bed.simulated_program().display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&qemu, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let mut a = bed
        .host_args("a", &["--qemu", qemu.to_str().unwrap()])
        .await;
    let line = testkit::wait_until(
        std::time::Duration::from_secs(30),
        "the probe at the agent's start",
        || async { std::fs::read_to_string(&started).ok() },
    )
    .await;
    a.crash();
    let pid: u32 = line.split_whitespace().next().unwrap().parse().unwrap();
    let socket = line
        .split_whitespace()
        .find_map(|arg| arg.strip_prefix("socket,id=qmp,path="))
        .and_then(|option| option.split(',').next())
        .map(std::path::PathBuf::from)
        .expect("the probe's QMP socket on its command line");
    let scratch = socket.parent().unwrap().to_path_buf();
    assert!(scratch.starts_with(a.state_dir()), "{}", scratch.display());
    testkit::wait_until(
        std::time::Duration::from_secs(30),
        "the orphaned probe's QMP socket",
        || async { socket.exists().then_some(()) },
    )
    .await;
    assert!(running(pid));

    a.start_again().await;

    testkit::wait_until(
        std::time::Duration::from_secs(10),
        "the orphaned probe to quit",
        || async { (!running(pid)).then_some(()) },
    )
    .await;
    assert!(!scratch.exists(), "{} is still there", scratch.display());
    let log = std::fs::read_to_string(a.state_dir().join("livemigd.log")).unwrap();
    assert!(
        log.contains("outlived its agent; asked it to quit"),
        "{log}"
    );
}

/// `pid` exists and is not a zombie.
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X")
    })
}

#[tokio::test]
async fn anyone_who_may_read_follows_every_job_to_its_end_with_watch() {
    use std::io::BufRead;
    let bed = TestBed::simulated().await;
    let (a, b) = bed.two_hosts_running("vm", 64, MOVING).await;
    // A monitor's certificate, in a process of its own: not the CLI that
    // started the migration.
    let monitor = bed.certificate_dir("grafana", protocol::Role::Monitor);
    let mut watcher = std::process::Command::new(testkit::bin("livemig"))
        .args(["-c", &a.uri(), "--tls-dir"])
        .arg(&monitor)
        .args(["watch", "--json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = watcher.stdout.take().unwrap();
    let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if lines_tx.send(line).is_err() {
                return;
            }
        }
    });
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;

    // Slow enough to be seen in flight.
    let record = a.migrate("vm", &b, capped(8)).await;
    assert_eq!(record.status, JobStatus::Completed, "{record:?}");

    let mut events: Vec<serde_json::Value> = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !events
        .iter()
        .any(|e| e["event"] == "ended" && e["record"]["id"] == record.id.as_str())
    {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = lines
            .recv_timeout(left)
            .expect("the watch reports the job's end");
        events.push(serde_json::from_str(&line).unwrap());
    }
    let _ = watcher.kill();
    let _ = watcher.wait();

    let phases: Vec<&str> = events
        .iter()
        .filter(|e| e["event"] == "progress" && e["job"]["id"] == record.id.as_str())
        .map(|e| e["job"]["phase"].as_str().unwrap())
        .collect();
    assert!(phases.contains(&"perform"), "{phases:?}");
    let ended = events.last().unwrap();
    assert_eq!(ended["record"]["status"], "completed");

    // A peer's certificate may not watch.
    let rogue = testkit::rogue::client(&bed, &a).await;
    let refused = rogue.watch(None, |_| true).await.unwrap_err().to_api();
    assert_eq!(
        refused.code,
        protocol::ErrorCode::PermissionDenied,
        "{refused:?}"
    );
}

#[tokio::test]
async fn a_watch_is_told_of_a_switch_to_post_copy_at_once() {
    let bed = TestBed::simulated().await;
    // The running jobs' reports ten minutes apart: what this watch hears
    // of the job after its start is news, not a report.
    let a = bed
        .host_args("a", &["--timeout", "watch-interval=10m"])
        .await;
    let b = bed.host("b").await;
    a.define_and_start(bed.definition("vm", 64, MOVING)).await;
    let uri: protocol::AgentUri = a.local_uri().parse().unwrap();
    let watcher = protocol::Client::connect(&uri).await.unwrap();
    let (events_tx, mut events) = tokio::sync::mpsc::unbounded_channel();
    let watching =
        tokio::spawn(async move { watcher.watch(None, |e| events_tx.send(e).is_ok()).await });
    // Its first look, at once, finds no job; the next is ten minutes off.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;

    let job = a
        .migration_in_flight(
            "vm",
            &b,
            MigrateOptions {
                postcopy: true,
                postcopy_bandwidth: Some(32),
                ..capped(4)
            },
        )
        .await;
    a.cli_ok(&["migrate-postcopy", "vm"]);

    let told = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        while let Some(event) = events.recv().await {
            if let protocol::WatchEvent::Progress { job: info } = event {
                if info.id == job && info.stats.qemu_status.as_deref() == Some("postcopy-active") {
                    return true;
                }
            }
        }
        false
    })
    .await;
    assert!(
        matches!(told, Ok(true)),
        "the watch heard nothing of the switch: {told:?}"
    );
    let record = a.wait_job(&job).await;
    assert_eq!(record.status, JobStatus::Completed, "{record:?}");
    watching.abort();
}

/// The start of the last dirty-rate measurement QEMU made of `name`, and
/// whether it ended.
async fn last_measurement(host: &testkit::Host, name: &str) -> (Option<i64>, String) {
    let rate = host
        .call(protocol::call::DomDirtyRate {
            domain: name.parse().unwrap(),
        })
        .await
        .unwrap();
    (rate.start_time, rate.status)
}

async fn estimate(
    host: &testkit::Host,
    name: &str,
    max_age_s: Option<u64>,
) -> protocol::estimate::EstimateReport {
    host.call(protocol::call::Estimate {
        domain: name.parse().unwrap(),
        params: protocol::estimate::EstimateParams {
            bandwidth_mib_s: Some(8),
            max_age_s,
            ..Default::default()
        },
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn the_agent_keeps_its_guests_measured_and_estimate_and_migrate_start_from_that() {
    let bed = TestBed::simulated().await;
    let a = bed.host_args("a", &["--measure-every", "1s"]).await;
    let b = bed.host("b").await;
    a.define_and_start(bed.definition("vm", 64, BUSY)).await;

    // Nobody asked: the agent measured on its own.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let background = loop {
        let (start, status) = last_measurement(&a, "vm").await;
        if status == "measured" {
            break start;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never measured in the background: {status}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    };

    // A recent one will do: answered from what the agent kept, without
    // QEMU measuring again.
    let kept = estimate(&a, "vm", Some(60)).await;
    let (after, _) = last_measurement(&a, "vm").await;
    assert_eq!(after, background, "the estimate measured again");
    assert!(kept.measurement_age_ms.is_some(), "{kept:?}");
    assert_eq!(kept.samples.len(), 2, "{kept:?}");
    // ~50 MiB/s over 16 MiB: the working set fills in the first window.
    assert!(kept.model.rate_is_lower_bound, "{:?}", kept.model);
    assert!(!kept.predictions.measured.none.converges, "{kept:?}");

    // Without --max-age it measures now.
    let fresh = estimate(&a, "vm", None).await;
    let (now, _) = last_measurement(&a, "vm").await;
    assert_ne!(now, background, "{fresh:?}");
    assert!(
        fresh.measurement_age_ms.is_some_and(|ms| ms < 1000),
        "{fresh:?}"
    );

    // A migration right after starts its controller from that
    // measurement, before its own pre-flight's is in.
    let record = a.migrate("vm", &b, adaptive_at(8)).await;
    assert_eq!(record.status, JobStatus::Completed, "{:?}", record.error);
    let measures: Vec<_> = record
        .actions
        .iter()
        .filter(|a| a.action == protocol::job::ActionKind::Measure && a.value.is_some())
        .collect();
    assert!(
        measures
            .first()
            .is_some_and(|m| m.detail.contains("before the job")),
        "{measures:?}"
    );
    assert!(
        measures
            .iter()
            .any(|m| !m.detail.contains("before the job")),
        "the job did not measure for itself: {measures:?}"
    );
}

#[tokio::test]
async fn suspend_and_resume_drop_the_kept_measurement() {
    let bed = TestBed::simulated().await;
    let a = bed.host_args("a", &["--measure-every", "off"]).await;
    a.define_and_start(bed.definition("vm", 64, BUSY)).await;
    let busy = estimate(&a, "vm", None).await;
    assert!(busy.model.rate > 0.0, "{:?}", busy.model);

    a.call(protocol::call::Suspend {
        domain: "vm".parse().unwrap(),
    })
    .await
    .unwrap();
    // The busy measurement is gone: a paused guest dirties nothing.
    let paused = estimate(&a, "vm", Some(600)).await;
    assert_eq!(paused.model.rate, 0.0, "{:?}", paused.model);
    assert!(paused.predictions.measured.none.converges, "{paused:?}");

    a.call(protocol::call::Resume {
        domain: "vm".parse().unwrap(),
    })
    .await
    .unwrap();
    let resumed = estimate(&a, "vm", Some(600)).await;
    assert!(resumed.model.rate > 0.0, "{:?}", resumed.model);
}

#[tokio::test]
async fn a_standalone_agents_link_sets_the_predicted_stop_and_copy() {
    let bed = TestBed::simulated().await;
    let slow = bed.host_args("slow", &["--link", "16"]).await;
    let assumed = bed.host("assumed").await;
    for host in [&slow, &assumed] {
        host.define_and_start(bed.definition("vm", 64, MOVING))
            .await;
    }
    // Capped at 8 MiB/s, QEMU lifts the cap for the stop-and-copy: at
    // the host's 16 MiB/s, or at the 10 GbE assumed without `--link`.
    let over_slow = estimate(&slow, "vm", None).await;
    let over_assumed = estimate(&assumed, "vm", None).await;
    let pause = |r: &protocol::estimate::EstimateReport| r.predictions.measured.none.downtime_secs;
    assert!(
        over_slow.predictions.measured.none.converges,
        "{over_slow:?}"
    );
    assert!(
        over_assumed.predictions.measured.none.converges,
        "{over_assumed:?}"
    );
    assert!(
        pause(&over_slow) > 10.0 * pause(&over_assumed),
        "{} s against {} s",
        pause(&over_slow),
        pause(&over_assumed)
    );
}

#[test]
fn livemigd_refuses_a_link_of_nothing() {
    let out = std::process::Command::new(testkit::bin("livemigd"))
        .args(["--link", "0", "--state-dir", "/nonexistent/livemig-test"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--link 0"), "{}", stderr(&out));
}

#[test]
fn livemigd_refuses_a_measuring_interval_it_cannot_read() {
    for bad in ["0s", "soon", "5"] {
        let out = std::process::Command::new(testkit::bin("livemigd"))
            .args([
                "--measure-every",
                bad,
                "--state-dir",
                "/nonexistent/livemig-test",
            ])
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(
            stderr(&out).contains("--measure-every"),
            "{bad}: {}",
            stderr(&out)
        );
    }
}
