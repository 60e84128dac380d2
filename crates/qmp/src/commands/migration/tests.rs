use super::*;

#[test]
fn status_names_are_the_wire_names() {
    for status in [
        MigrationStatus::PostcopyActive,
        MigrationStatus::PreSwitchover,
        MigrationStatus::WaitUnplug,
        MigrationStatus::Completed,
    ] {
        assert_eq!(
            serde_json::to_value(status).unwrap(),
            serde_json::json!(status.as_str())
        );
    }
}

#[test]
fn capability_names_round_trip_including_unknown_ones() {
    let caps: Vec<CapabilityStatus> = serde_json::from_str(
        r#"[{"capability":"auto-converge","state":true},{"capability":"mapped-ram","state":false}]"#,
    )
    .unwrap();
    assert_eq!(caps[0].capability, MigrationCapability::AutoConverge);
    assert_eq!(
        caps[1].capability,
        MigrationCapability::Other("mapped-ram".into())
    );
    let back = serde_json::to_string(&caps).unwrap();
    assert!(back.contains(r#""capability":"mapped-ram""#));
}

#[test]
fn set_parameters_sends_only_what_is_set() {
    let params = MigrationParameters {
        max_bandwidth: Some(1 << 20),
        ..Default::default()
    };
    let json = serde_json::to_value(MigrateSetParameters(params)).unwrap();
    assert_eq!(json, serde_json::json!({"max-bandwidth": 1048576}));
}

#[test]
fn parameters_reply_keeps_unmodelled_names() {
    let p: MigrationParameters =
        serde_json::from_str(r#"{"max-bandwidth":134217728,"announce-max":550,"tls-creds":""}"#)
            .unwrap();
    assert_eq!(p.max_bandwidth, Some(134_217_728));
    assert_eq!(
        p.names(),
        vec!["announce-max", "max-bandwidth", "tls-creds"]
    );
}

#[test]
fn migration_info_tolerates_new_fields_and_states() {
    let info: MigrationInfo = serde_json::from_str(
        r#"{"status":"brand-new","ram":{"total":1,"new-counter":5},"vfio":{}}"#,
    )
    .unwrap();
    assert_eq!(info.status, Some(MigrationStatus::Unknown));
    assert_eq!(info.ram.unwrap().total, Some(1));
}
