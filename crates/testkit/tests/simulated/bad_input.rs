//! Bad input gets a clear error and changes nothing.

use guest::Workload;
use protocol::domain::DomainState;
use protocol::job::JobStatus;
use protocol::MigrateOptions;
use protocol::{ErrorCode, Request};
use testkit::{capped, live, Host, TestBed};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// What must not change: the guest runs on `a` in the same QEMU, with no
/// job, and `b` has neither the domain nor any QEMU.
struct Untouched {
    pid: u32,
}

impl Untouched {
    async fn record(a: &Host, name: &str) -> Self {
        Untouched {
            pid: a.dominfo(name).await.unwrap().qemu_pid.unwrap(),
        }
    }

    async fn check(&self, a: &Host, b: &Host, name: &str) {
        let info = a.dominfo(name).await.unwrap();
        assert_eq!(info.state, DomainState::Running);
        assert_eq!(
            info.qemu_pid,
            Some(self.pid),
            "the source QEMU was replaced"
        );
        assert_eq!(info.active_job, None);
        assert!(!a.capability(name, "auto-converge").await);
        assert!(
            b.dominfo(name).await.is_err(),
            "the destination has the domain"
        );
        assert!(b.qemu_pids().is_empty(), "QEMU left on the destination");
        a.wait_guest_progress(name, 1).await;
    }
}

#[tokio::test]
async fn a_capability_the_qemu_lacks_names_the_capability_and_the_host() {
    let bed = TestBed::simulated().await;
    let (a, b) = bed.two_hosts_running("vm", 64, Workload::IDLE).await;
    let before = Untouched::record(&a, "vm").await;

    // QEMU 7.2 has no dirty-limit capability (it came in 8.1).
    let out = a.cli(&["migrate", "--live", "--dirty-limit", "vm", &b.uri()]);

    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "dirty-limit migration is not supported by the QEMU binary on {}",
            a.uri()
        )),
        "{err}"
    );
    before.check(&a, &b, "vm").await;
}

#[tokio::test]
async fn an_unknown_domain_is_a_clear_error() {
    let bed = TestBed::simulated().await;
    let a = bed.host("a").await;
    let b = bed.host("b").await;

    for args in [
        vec!["dominfo", "nosuch"],
        vec!["start", "nosuch"],
        vec!["domjobinfo", "nosuch"],
        vec!["migrate", "--live", "nosuch", b.uri().as_str()],
    ] {
        let out = a.cli(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(
            stderr(&out).contains("no domain named 'nosuch'"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    let err = a
        .request(Request::Destroy {
            domain: "nosuch".parse().unwrap(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.to_api().code, ErrorCode::NoDomain);
    assert!(a.list_all().await.is_empty());
}

#[tokio::test]
async fn a_malformed_definition_is_refused_and_nothing_is_defined() {
    let bed = TestBed::simulated().await;
    let a = bed.host("a").await;
    let cases = [
        (
            "syntax.toml",
            "name = \"x\"\nmemory_mib = \n",
            "malformed definition",
        ),
        (
            "typo.toml",
            "name = \"x\"\nmemroy_mib = 64\n",
            "unknown field `memroy_mib`",
        ),
        (
            "name.toml",
            "name = \"../etc\"\nmemory_mib = 64\n[kernel]\npath = \"/k\"\n",
            "invalid domain name",
        ),
        (
            "memory.toml",
            "name = \"x\"\nmemory_mib = 1\n[kernel]\npath = \"/k\"\n",
            "memory_mib must be between",
        ),
        (
            "boot.toml",
            "name = \"x\"\nmemory_mib = 64\n",
            "nothing to boot",
        ),
    ];
    for (file, text, expected) in cases {
        let path = bed.path().join(file);
        std::fs::write(&path, text).unwrap();
        let out = a.cli(&["define", path.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1), "{file}");
        assert!(stderr(&out).contains(expected), "{file}: {}", stderr(&out));
    }
    let missing = a.cli(&["define", "/nonexistent/vm.toml"]);
    assert!(
        stderr(&missing).contains("cannot read definition"),
        "{}",
        stderr(&missing)
    );
    assert!(a.list_all().await.is_empty());
    let on_disk = std::fs::read_dir(a.state_dir().join("domains"))
        .unwrap()
        .count();
    assert_eq!(on_disk, 0);
}

#[tokio::test]
async fn bad_uris_and_flags_are_refused_before_anything_starts() {
    let bed = TestBed::simulated().await;
    let (a, b) = bed.two_hosts_running("vm", 64, Workload::IDLE).await;
    let before = Untouched::record(&a, "vm").await;

    let bad_connect = std::process::Command::new(testkit::bin("livemig"))
        .args(["-c", "qemu:///system", "list"])
        .output()
        .unwrap();
    assert_eq!(bad_connect.status.code(), Some(1));
    assert!(
        stderr(&bad_connect).contains("bad agent URI \"qemu:///system\""),
        "{}",
        stderr(&bad_connect)
    );

    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["not-a-uri".into()], "bad agent URI \"not-a-uri\""),
        (vec!["tcp://host-without-port".into()], "no port"),
        (
            vec!["--migrateuri".into(), "udp:1.2.3.4:5".into(), b.uri()],
            "bad migration URI",
        ),
        (
            vec!["--auto-converge-initial".into(), "30".into(), b.uri()],
            "need --auto-converge",
        ),
        (
            vec!["--offline".into(), b.uri()],
            "--live and --offline are mutually exclusive",
        ),
    ];
    for (extra, expected) in cases {
        let mut args = vec!["migrate".to_string(), "--live".to_string()];
        let dest = extra.last().unwrap().clone();
        args.extend(extra[..extra.len() - 1].iter().cloned());
        args.push("vm".into());
        args.push(dest);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = a.cli(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(
            stderr(&out).contains(expected),
            "{args:?}: {}",
            stderr(&out)
        );
    }
    before.check(&a, &b, "vm").await;
}

#[tokio::test]
async fn a_destination_agent_that_is_down_fails_cleanly() {
    let bed = TestBed::simulated().await;
    let a = bed.host("a").await;
    let b = bed.host("b").await;
    let down = bed.host("down").await;
    let down_uri = down.uri();
    down.stop().await;
    a.define_and_start(bed.definition("vm", 64, Workload::IDLE))
        .await;
    let before = Untouched::record(&a, "vm").await;

    let out = a.cli(&["migrate", "--live", "vm", &down_uri]);

    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("destination agent is down or unreachable"),
        "{err}"
    );
    assert!(err.contains(&down_uri), "{err}");
    before.check(&a, &b, "vm").await;
}

#[tokio::test]
async fn migrating_onto_a_host_where_the_domain_already_runs_fails_in_prepare() {
    let bed = TestBed::simulated().await;
    let (a, b) = bed.two_hosts_running("vm", 64, Workload::IDLE).await;
    b.define_and_start(bed.definition("vm", 64, Workload::IDLE))
        .await;
    let b_pid = b.dominfo("vm").await.unwrap().qemu_pid.unwrap();

    let record = a.migrate_live("vm", &b).await;

    assert_eq!(record.status, JobStatus::Failed);
    assert!(
        record
            .error
            .as_deref()
            .unwrap()
            .contains("already running on"),
        "{record:?}"
    );
    assert_eq!(a.state("vm").await, Some(DomainState::Running));
    assert_eq!(
        b.dominfo("vm").await.unwrap().qemu_pid,
        Some(b_pid),
        "b's own copy untouched"
    );
    assert_eq!(b.qemu_pids(), vec![b_pid]);
    assert_eq!(a.qemu_pids().len(), 1);
}

#[tokio::test]
async fn a_second_migration_of_the_same_domain_is_refused_while_one_runs() {
    let bed = TestBed::simulated().await;
    let (a, b) = bed
        .two_hosts_running("vm", 64, Workload::busy(16, 20_000))
        .await;
    let slow = capped(1);
    let job = a
        .start_migration("vm", &b.uri(), slow.clone())
        .await
        .unwrap();

    let second = a.start_migration("vm", &b.uri(), slow).await.unwrap_err();

    assert!(
        second
            .to_string()
            .contains("already has an active migration job"),
        "{second}"
    );
    let out = a.cli(&["domjobinfo", "vm"]);
    assert!(stdout(&out).contains(&job), "{}", stdout(&out));
    a.request(Request::DomJobAbort {
        domain: "vm".parse().unwrap(),
    })
    .await
    .unwrap();
    assert_eq!(a.wait_job(&job).await.status, JobStatus::Cancelled);
    assert_eq!(a.state("vm").await, Some(DomainState::Running));
}

#[tokio::test]
async fn a_destination_qemu_without_auto_converge_is_named_and_nothing_changes() {
    let bed = TestBed::simulated().await;
    // Host b's VMs stand for a QEMU that lacks auto-converge.
    let wrapper = bed.path().join("qemu-without-auto-converge");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\nLIVEMIG_SIMVM_WITHOUT=auto-converge exec {} \"$@\"\n",
            bed.simulated_program().display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let (a, b) = bed
        .two_hosts_running_args(
            "vm",
            64,
            Workload::IDLE,
            &["--qemu", wrapper.to_str().unwrap()],
        )
        .await;
    let before = Untouched::record(&a, "vm").await;

    let out = a.cli(&["migrate", "--live", "--auto-converge", "vm", &b.uri()]);

    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "auto-converge migration is not supported by the QEMU binary on {}",
            b.uri()
        )),
        "{err}"
    );
    before.check(&a, &b, "vm").await;
    // b's agent really probed that program.
    let caps = b.cli(&["domcapabilities", "--json"]);
    let caps: serde_json::Value = serde_json::from_slice(&caps.stdout).unwrap();
    assert_eq!(caps["qemu"]["path"], wrapper.display().to_string());
    assert!(!caps["qemu"]["migration_capabilities"]
        .as_array()
        .unwrap()
        .contains(&serde_json::json!("auto-converge")));
}

#[test]
fn the_cli_reports_what_it_can_see_before_contacting_any_agent() {
    let livemig = testkit::bin("livemig");
    let run = |args: &[&str]| {
        std::process::Command::new(&livemig)
            .args(args)
            .env_remove("LIVEMIG_URI")
            .env_remove("LIVEMIG_TLS_DIR")
            .output()
            .unwrap()
    };
    // Contradictory flags: the agent's own rules, with no agent at all.
    let out = run(&[
        "-c",
        "unix:///nonexistent/livemigd.sock",
        "migrate",
        "--live",
        "--offline",
        "vm",
        "tls://127.0.0.1:1",
    ]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--live and --offline are mutually exclusive"),
        "{}",
        stderr(&out)
    );
    let out = run(&[
        "-c",
        "unix:///nonexistent/livemigd.sock",
        "define",
        "/nonexistent/vm.toml",
    ]);
    assert!(
        stderr(&out).contains("cannot read definition"),
        "{}",
        stderr(&out)
    );
    // No -c and no LIVEMIG_URI: the local agent's packaged socket.
    if !std::path::Path::new("/run/livemig/livemigd.sock").exists() {
        let out = run(&["list"]);
        assert!(!out.status.success());
        assert!(
            stderr(&out).contains("/run/livemig/livemigd.sock"),
            "{}",
            stderr(&out)
        );
    }
}

#[tokio::test]
async fn a_host_dependent_cpu_model_migrates_only_with_unsafe() {
    let bed = TestBed::simulated().await;
    let a = bed.host("a").await;
    let b = bed.host("b").await;
    let mut definition = bed.definition("vm", 64, Workload::busy(4, 100_000));
    // `host` needs KVM; `max` (every feature this QEMU can give) depends on
    // the host just the same.
    definition.cpu = Some("max".into());
    a.define_and_start(definition).await;
    let before = Untouched::record(&a, "vm").await;

    let out = a.cli(&["migrate", "--live", "vm", &b.uri()]);

    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("CPU model 'max'") && err.contains("--unsafe"),
        "{err}"
    );
    before.check(&a, &b, "vm").await;

    let record = a
        .migrate_completes(
            "vm",
            &b,
            MigrateOptions {
                unsafe_migration: true,
                ..live()
            },
        )
        .await;
    assert!(record.flags.contains(&"unsafe".to_string()));
}

#[tokio::test]
async fn a_disk_only_this_host_has_is_refused_and_a_cached_shared_disk_needs_unsafe() {
    let bed = TestBed::simulated().await;
    let a = bed.host("a").await;
    let b = bed.host("b").await;
    let image = bed.disk_image("vm.raw", 16, "raw");
    let with_disk = |disk: &str| {
        let mut definition = bed.definition("vm", 64, Workload::busy(4, 100_000));
        let devices = domain::DomainDefinition::from_toml(&format!(
            "name = \"vm\"\nmemory_mib = 64\n[[disks]]\npath = {:?}\n{disk}\n",
            image.display().to_string()
        ))
        .unwrap();
        definition.disks = devices.disks;
        definition
    };

    a.define_and_start(with_disk("")).await;
    let before = Untouched::record(&a, "vm").await;
    let out = a.cli(&["migrate", "--live", "--unsafe", "vm", &b.uri()]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("disk vda") && err.contains("not on shared storage"),
        "{err}"
    );
    assert!(err.contains(&image.display().to_string()), "{err}");
    before.check(&a, &b, "vm").await;
    a.cli_ok(&["destroy", "vm"]);

    a.request(testkit::define(&with_disk(
        "shared = true\ncache = \"writeback\"",
    )))
    .await
    .unwrap();
    a.cli_ok(&["start", "vm"]);
    a.wait_guest_progress("vm", 1).await;
    let before = Untouched::record(&a, "vm").await;
    let out = a.cli(&["migrate", "--live", "vm", &b.uri()]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("cache = \"writeback\"") && err.contains("--unsafe"),
        "{err}"
    );
    before.check(&a, &b, "vm").await;

    let record = a
        .migrate_completes(
            "vm",
            &b,
            MigrateOptions {
                unsafe_migration: true,
                ..live()
            },
        )
        .await;
    assert!(record.flags.contains(&"unsafe".to_string()));
}
