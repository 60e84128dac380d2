//! No request makes an agent's QEMU open a file it was not configured for:
//! images only from the agent's image directories, device nodes only when
//! allowed, serial logs only in its log directory; checked on the agent for
//! every definition, however it arrives.

use guest::Workload;
use protocol::MigrateOptions;
use testkit::TestBed;

/// The uid QEMU runs as and its seccomp mode, from /proc.
fn uid_and_seccomp(pid: u32) -> (u32, u32) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} in /proc/{pid}/status"))
    };
    (field("Uid:"), field("Seccomp:"))
}

#[tokio::test]
async fn qemu_runs_sandboxed_as_an_unprivileged_user_and_still_migrates_over_tls() {
    let bed = TestBed::new().await;
    let nobody = nix::unistd::User::from_name("nobody")
        .unwrap()
        .expect("a nobody user")
        .uid
        .as_raw();
    let a = bed.host_args("a", &["--qemu-user", "nobody"]).await;
    let b = bed.host_args("b", &["--qemu-user", "nobody"]).await;
    a.define_and_start(bed.definition("vm", 64, Workload::busy(8, 50_000)))
        .await;
    let pid = a.qemu_pids()[0];
    // 2: a seccomp filter (QEMU's -sandbox).
    assert_eq!(uid_and_seccomp(pid), (nobody, 2));

    let options = MigrateOptions {
        auto_converge: true,
        tls: true,
        ..testkit::live()
    };
    a.migrate_completes("vm", &b, options).await;
    assert_eq!(uid_and_seccomp(b.qemu_pids()[0]), (nobody, 2));
}
