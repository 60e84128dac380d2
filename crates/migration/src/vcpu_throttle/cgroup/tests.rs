use super::*;

#[test]
fn quota_matches_the_throttle() {
    assert_eq!(quota_for(0.0, 1), (100_000, None));
    assert_eq!(quota_for(0.5, 1), (100_000, Some(50_000)));
    assert_eq!(quota_for(0.5, 2), (100_000, Some(100_000)));
    assert_eq!(quota_for(0.99, 1), (100_000, Some(1_000)));
    assert_eq!(quota_for(0.995, 1), (1_000_000, Some(5_000)));
    assert_eq!(quota_for(0.999, 1), (1_000_000, Some(1_000)));
    // Beyond what the quota can express, the mechanism's maximum.
    assert_eq!(quota_for(1.0, 1), (1_000_000, Some(1_000)));
}

#[test]
fn names_that_could_escape_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tasks"), "").unwrap();
    let hierarchy = Hierarchy::probe(dir.path()).unwrap();
    for name in ["", "../x", "a/b", ".."] {
        assert!(matches!(
            HostThrottle::attach(&hierarchy, "agent", name, 1, &[]),
            Err(ThrottleError::BadName(_))
        ));
        assert!(matches!(
            HostThrottle::attach(&hierarchy, name, "x", 1, &[]),
            Err(ThrottleError::BadName(_))
        ));
        assert!(release_scope(&hierarchy, name).is_err());
    }
}

#[test]
fn a_missing_controller_is_reported_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let err = Hierarchy::probe(dir.path()).unwrap_err().to_string();
    assert!(err.contains("neither a cgroup v2 root"), "{err}");
    // A unified hierarchy whose cpu controller is bound to v1 (this
    // kind of hybrid host).
    std::fs::write(dir.path().join("cgroup.controllers"), "memory pids\n").unwrap();
    let err = Hierarchy::probe(dir.path()).unwrap_err().to_string();
    assert!(err.contains("does not offer the cpu controller"), "{err}");
    std::fs::write(dir.path().join("cgroup.controllers"), "cpuset cpu io\n").unwrap();
    assert_eq!(
        Hierarchy::probe(dir.path()).unwrap(),
        Hierarchy::V2(dir.path().to_path_buf())
    );
}
