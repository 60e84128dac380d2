use std::time::Duration;

use migration::record::JobIdentity;
use migration::Flags;
use protocol::domain::{DomainState, Tunables};
use protocol::job::{ActionKind, Phase, PhaseTime};
use types::Accel;

use super::*;

fn summary(id: Option<u64>, name: &str, state: DomainState) -> DomainSummary {
    DomainSummary {
        id,
        name: name.into(),
        state,
        persistent: true,
    }
}

fn record(status: JobStatus) -> JobRecord {
    let ident = JobIdentity {
        id: "0b0e-job".into(),
        domain: "web1".into(),
        role: Role::Source,
        source: "tls://a:7000".into(),
        destination: "tls://b:7000".into(),
        flags: Flags::default(),
        started_at_ms: 0,
        peer: None,
    };
    ident.record(status, Phase::Done, Duration::from_millis(12_345))
}

#[test]
fn list_aligns_names_and_shows_a_dash_for_a_domain_that_does_not_run() {
    let text = domain_list(&[
        summary(Some(3), "web1", DomainState::Running),
        summary(None, "a-much-longer-name", DomainState::ShutOff),
    ]);

    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0].trim_start(), "Id   Name                 State");
    assert!(lines[1].chars().all(|c| c == '-'));
    assert_eq!(lines[2], " 3    web1                 running");
    assert_eq!(lines[3], " -    a-much-longer-name   shut off");
}

#[test]
fn dominfo_shows_virshs_fields_and_only_what_is_known() {
    let info = DomainInfo {
        id: None,
        name: "web1".into(),
        state: DomainState::ShutOff,
        persistent: true,
        memory_mib: 512,
        vcpus: 2,
        accel: Accel::Tcg,
        guest_ram_bytes: None,
        machine: None,
        qemu_pid: None,
        qemu_version: None,
        qmp_socket: None,
        serial_log: None,
        qemu_log: None,
        tcg_dirty_bitmap_workaround: None,
        tunables: Tunables {
            bandwidth_mib_s: Some(64),
            downtime_ms: None,
        },
        active_job: None,
        labels: Default::default(),
    };

    let text = domain_info(&info);

    assert!(text.contains("Max memory:          524288 KiB"), "{text}");
    assert!(text.contains("Persistent:          yes"), "{text}");
    assert!(text.contains("Migration bandwidth: 64 MiB/s"), "{text}");
    for absent in [
        "QEMU:",
        "TCG workaround",
        "Migration downtime",
        "Active job",
    ] {
        assert!(!text.contains(absent), "{absent} in\n{text}");
    }
}

#[test]
fn a_completed_record_reads_as_one_sentence_with_its_figures() {
    let mut r = record(JobStatus::Completed);
    r.downtime_ms = Some(11);
    r.transferred_bytes = 3 << 20;
    r.iterations = 4;
    r.max_cpu_throttle_pct = 40.0;
    r.phases = vec![
        PhaseTime {
            phase: Phase::Begin,
            at_ms: 0,
        },
        PhaseTime {
            phase: Phase::Perform,
            at_ms: 612,
        },
    ];
    r.first_byte_ms = Some(650);

    let text = record_summary(&r);

    assert!(
        text.starts_with(
            "Migration of 'web1' to tls://b:7000 completed in 12.3 s: downtime 11 ms, \
             3.000 MiB transferred over 4 iterations, max CPU throttle 40.0%"
        ),
        "{text}"
    );
    assert!(
        text.contains("Phases: begin at 0 ms, perform at 612 ms; first byte after 650 ms"),
        "{text}"
    );
    assert!(text.ends_with("Job id: 0b0e-job\n"), "{text}");
}

#[test]
fn a_failed_record_says_why_and_what_was_done() {
    let mut r = record(JobStatus::Failed);
    r.error = Some("lost contact with the destination agent".into());
    r.recovery = Some("source kept running".into());

    let text = record_summary(&r);

    assert!(
        text.contains("failed after 12.3 s: lost contact with the destination agent"),
        "{text}"
    );
    assert!(text.contains("Recovery: source kept running"), "{text}");
}

#[test]
fn actions_are_listed_in_seconds_with_their_value() {
    let text = actions(&[TimedAction {
        t_ms: 5_000,
        action: ActionKind::Throttle,
        value: Some(40.0),
        detail: "guest dirties 107 MiB/s".into(),
    }]);

    assert_eq!(
        text,
        "Actions:\n     5.000 s  throttle 40.0: guest dirties 107 MiB/s\n"
    );
    assert_eq!(actions(&[]), "");
}

#[test]
fn jobs_show_how_far_the_prediction_was_off() {
    let job = JobSummary {
        id: "j".into(),
        domain: "web1".into(),
        role: "source".into(),
        status: "completed".into(),
        started_at_ms: 0,
        total_time_ms: 10_000,
        downtime_ms: Some(20),
        max_throttle_pct: 0.0,
        converge: String::new(),
        error: None,
        predicted_total_ms: Some(7_000),
    };

    let text = job_list(&[job]);

    let line = text.lines().nth(1).unwrap();
    assert!(line.contains("10.0 s") && line.contains("20 ms"), "{line}");
    assert!(
        line.contains("none") && line.ends_with("7.0 s (-30 %)"),
        "{line}"
    );
    assert_eq!(mib(1 << 20), "1.000 MiB");
}
