//! Reports: the chart has the series and markers a reader looks for.

use protocol::job::{ActionKind, JobRecord, JobStats, JobStatus, Phase, Role, Sample, TimedAction};

fn record() -> JobRecord {
    let samples = (0..40)
        .map(|i| Sample {
            t_ms: i * 250,
            status: "active".into(),
            pass: i / 8,
            remaining_bytes: (256 - (i % 8) * 32) << 20,
            transferred_bytes: i << 24,
            bandwidth_mib_s: 64.0,
            dirty_rate_mib_s: 60.0 - i as f64,
            throttle_pct: if i > 16 { 97.0 } else { 0.0 },
            expected_downtime_ms: Some(300),
            ..Default::default()
        })
        .collect();
    JobRecord {
        id: "job-1".into(),
        domain: "web<1>".into(),
        source: "tcp://a:7000".into(),
        destination: "tcp://b:7000".into(),
        status: JobStatus::Completed,
        error: None,
        flags: vec!["live".into(), "converge=adaptive".into()],
        auto_converge: false,
        total_time_ms: 10_000,
        setup_time_ms: Some(3),
        downtime_ms: Some(120),
        transferred_bytes: 600 << 20,
        iterations: 5,
        max_cpu_throttle_pct: 97.0,
        converge: protocol::ConvergeMode::Adaptive,
        actions: vec![
            TimedAction {
                t_ms: 4200,
                action: ActionKind::Throttle,
                value: Some(97.0),
                detail: "guest dirties at least 253 MiB/s".into(),
            },
            TimedAction {
                t_ms: 9900,
                action: ActionKind::Release,
                value: Some(0.0),
                detail: "host throttle lifted".into(),
            },
        ],
        phase: Phase::Done,
        started_at_ms: 0,
        finished_at_ms: 10_000,
        data_uri: None,
        recovery: None,
        role: Role::Source,
        stats: JobStats::default(),
        phases: Vec::new(),
        first_byte_ms: None,
        predicted_total_ms: None,
        predicted_worst_total_ms: None,
        samples,
        peer: None,
    }
}

#[test]
fn the_svg_has_every_series_the_markers_and_the_downtime_band() {
    let svg = report::svg(&record()).unwrap();
    assert!(svg.starts_with("<svg") || svg.contains("<svg"));
    for series in report::SERIES {
        assert!(svg.contains(series), "missing series {series}");
    }
    assert!(svg.contains("switchover downtime"));
    // One polyline per series per panel at least.
    assert!(svg.matches("<polyline").count() >= 4, "{}", svg.len());
}

#[test]
fn a_job_that_copied_disks_charts_their_bytes_and_dirty_rate_too() {
    let plain = report::svg(&record()).unwrap();
    for series in report::DISK_SERIES {
        assert!(!plain.contains(series), "{series} without disks");
    }
    let mut r = record();
    for (i, s) in r.samples.iter_mut().enumerate() {
        s.disk_remaining_bytes = Some((64 - i as u64) << 20);
        s.disk_dirty_rate_mib_s = Some(0.5);
    }
    let svg = report::svg(&r).unwrap();
    for series in report::SERIES.iter().chain(&report::DISK_SERIES) {
        assert!(svg.contains(series), "missing series {series}");
    }
    assert!(svg.matches("<polyline").count() >= 6, "{}", svg.len());
}

#[test]
fn the_html_page_is_self_contained_with_summary_chart_and_actions() {
    let html = report::html(&record()).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>"));
    assert!(html.contains("<svg"), "chart inlined");
    assert!(
        !html.contains("<script"),
        "no scripts, no external resources"
    );
    assert!(!html.contains("src=\"http"));
    assert!(html.contains("web&lt;1&gt;"), "names are escaped");
    assert!(html.contains("guest dirties at least 253 MiB/s"));
    assert!(html.contains("120 ms"));
}

#[test]
fn write_picks_the_format_by_extension() {
    let dir = tempfile::tempdir().unwrap();
    let svg = dir.path().join("r.svg");
    let html = dir.path().join("r.html");
    report::write(&record(), &svg).unwrap();
    report::write(&record(), &html).unwrap();
    assert!(std::fs::read_to_string(svg).unwrap().contains("<svg"));
    assert!(std::fs::read_to_string(html)
        .unwrap()
        .contains("<!DOCTYPE html>"));
    let err = report::write(&record(), &dir.path().join("r.png")).unwrap_err();
    assert!(err.to_string().contains(".svg or .html"), "{err}");
}

#[test]
fn a_job_without_samples_is_refused_clearly() {
    let mut r = record();
    r.samples.clear();
    assert!(matches!(
        report::svg(&r),
        Err(report::ReportError::NoSamples)
    ));
}
