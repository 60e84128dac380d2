//! `livemig demo`, as the README runs it (smaller, so the test is quick).

use std::process::Command;
use std::sync::Mutex;

/// One demo at a time: two busy TCG guests each already fill two cores.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

#[test]
fn demo_migrates_a_busy_guest_with_auto_converge_and_prints_the_record() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
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

#[test]
fn the_linux_demo_copies_the_disk_and_keeps_the_tcp_session() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let out = Command::new(testkit::bin("livemig"))
        .args([
            "demo",
            "--guest",
            "linux",
            "--copy-storage-all",
            "--json",
            "--memory",
            "192",
            "--working-set",
            "16",
            "--spin",
            "20000",
            "--bandwidth",
            "64",
            "--workload",
        ])
        .arg(testkit::linux_workload())
        .env_remove("LIVEMIG_URI")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stderr}\n{stdout}");
    let last = stdout.lines().last().expect("a record line");
    let record: serde_json::Value = serde_json::from_str(last).unwrap();
    assert_eq!(record["status"], "completed", "{record}");
    for check in ["memory_check", "disk_check", "network_check"] {
        assert_eq!(record[check], "ok", "{check}: {record}");
    }
    assert!(record["flags"]
        .as_array()
        .unwrap()
        .contains(&"copy-storage-all".into()));
    assert!(
        record["stats"]["disk_total_bytes"].as_u64().unwrap_or(0) > 0,
        "{record}"
    );
    assert!(stderr.contains("Cleaning up"));
}

/// `livemig demo --fleet --json`: etcd, three agents in namespaces, a
/// controller; host-a's mixed guests drained, each checked where it
/// landed.
#[test]
fn demo_fleet_drains_a_host_of_mixed_guests_every_one_converged_and_intact() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let out = Command::new(testkit::bin("livemig"))
        .args(["demo", "--fleet", "--json"])
        .env_remove("LIVEMIG_URI")
        .env_remove("LIVEMIG_CLUSTER")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stderr}\n{stdout}");
    let report: serde_json::Value =
        serde_json::from_str(stdout.lines().last().expect("a report line")).unwrap();
    assert_eq!(report["drain"]["state"], "done", "{report}");
    let vms = report["vms"].as_u64().unwrap();
    assert!(vms >= 4, "{report}");
    assert_eq!(report["converged"].as_u64(), Some(vms), "{report}");
    assert_eq!(report["intact"].as_u64(), Some(vms), "{report}");
    for guest in report["guests"].as_array().unwrap() {
        assert_ne!(guest["host"], "host-a", "{guest}");
        assert_eq!(guest["memory_check"], "ok", "{guest}");
    }
    // Each guest's cost is in the drain's report.
    for guest in report["drain"]["guests"].as_array().unwrap() {
        assert!(guest["cost"]["bytes"].as_u64().unwrap() > 0, "{guest}");
    }
}
