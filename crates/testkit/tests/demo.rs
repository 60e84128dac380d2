//! `livemig demo`, as the README runs it (smaller, so the test is quick).

use std::process::Command;

#[test]
fn demo_migrates_a_busy_guest_with_auto_converge_and_prints_the_record() {
    let out = Command::new(testkit::bin("livemig"))
        .args([
            "demo",
            "--json",
            "--memory",
            "128",
            "--working-set",
            "16",
            "--spin",
            "20000",
            "--bandwidth",
            "16",
            "--timeout",
            "180",
        ])
        .env_remove("LIVEMIG_URI")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stderr}\n{stdout}");

    let last = stdout.lines().last().expect("a record line");
    let record: serde_json::Value = serde_json::from_str(last).unwrap();
    assert_eq!(record["status"], "completed");
    assert_eq!(record["memory_check"], "ok");
    assert_eq!(record["auto_converge"], true);
    assert!(
        record["max_cpu_throttle_pct"].as_f64().unwrap() > 0.0,
        "{record}"
    );
    for field in [
        "id",
        "domain",
        "source",
        "destination",
        "error",
        "flags",
        "total_time_ms",
        "setup_time_ms",
        "downtime_ms",
        "transferred_bytes",
        "iterations",
    ] {
        assert!(
            record.get(field).is_some(),
            "record lacks {field}: {record}"
        );
    }
    // Progress streamed as NDJSON events before the record; the narration
    // went to stderr.
    let events = stdout.lines().count() - 1;
    assert!(events >= 2, "{stdout}");
    assert!(stdout.contains("\"event\":\"progress\""), "{stdout}");
    assert!(stderr.contains("Cleaning up"));
}
