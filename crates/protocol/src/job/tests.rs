use super::*;

#[test]
fn merge_keeps_the_last_known_ram_figures() {
    let older = JobStats {
        memory_total_bytes: Some(10),
        iteration: Some(3),
        ..Default::default()
    };
    let newer = JobStats {
        qemu_status: Some("completed".into()),
        iteration: Some(5),
        ..Default::default()
    }
    .merged_over(&older);
    assert_eq!(newer.memory_total_bytes, Some(10));
    assert_eq!(newer.iteration, Some(5));
}

#[test]
fn action_kinds_keep_their_wire_names_and_unknown_ones_decode() {
    let a: TimedAction =
        serde_json::from_str(r#"{"t_ms":1,"action":"switchover","value":null,"detail":"d"}"#)
            .unwrap();
    assert_eq!(a.action, ActionKind::Switchover);
    assert_eq!(
        serde_json::to_value(ActionKind::Hold).unwrap(),
        serde_json::json!("hold")
    );
    let newer: ActionKind = serde_json::from_str(r#""teleport""#).unwrap();
    assert_eq!(newer, ActionKind::Unknown);
}

#[test]
fn work_lost_integrates_the_throttle() {
    let at = |t_ms, throttle_pct| Sample {
        t_ms,
        throttle_pct,
        ..Default::default()
    };
    let lost = work_lost_s(&[at(0, 50.0), at(2000, 100.0), at(3000, 0.0)]);
    assert!((lost - 2.0).abs() < 1e-9, "{lost}");
}
