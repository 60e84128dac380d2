//! `migrate` options that are QEMU's own features: compression (XBZRLE,
//! zstd on multifd's channels), multifd, zero-copy sending, post-copy's
//! own bandwidth. Post-copy by command and `--suspend` are in `contract`; the
//! options the agent carries out are tested on simulated VMs.

use guest::Workload;
use protocol::job::JobStatus;
use protocol::{CompMethod, MigrateOptions};
use testkit::{live, TestBed};

#[tokio::test]
async fn compressed_and_parallel_migrations_complete() {
    let bed = TestBed::new().await;
    let (a, b) = bed
        .two_hosts_running("vm", 64, Workload::busy(8, 50_000))
        .await;

    a.migrate_completes(
        "vm",
        &b,
        MigrateOptions {
            compressed: true,
            ..live()
        },
    )
    .await;
    b.migrate_completes(
        "vm",
        &a,
        MigrateOptions {
            parallel: true,
            parallel_connections: Some(4),
            ..live()
        },
    )
    .await;
}

/// Parameter `name` of the migration on `host`'s QEMU of `domain`.
async fn parameter(host: &testkit::Host, domain: &str, name: &str) -> serde_json::Value {
    host.qmp(domain, "query-migrate-parameters")
        .await
        .expect("query-migrate-parameters")[name]
        .clone()
}

#[tokio::test]
async fn zstd_compresses_multifd_s_channels_on_both_qemus_and_the_guest_arrives_intact() {
    let bed = TestBed::new().await;
    let (a, b) = bed
        .two_hosts_running("vm", 64, Workload::busy(8, 50_000))
        .await;
    let zstd = MigrateOptions {
        parallel: true,
        compressed: true,
        comp_methods: vec![CompMethod::Zstd],
        ..testkit::capped(4)
    };

    // QEMU 7.2 takes a zstd level and ignores it: asked for one, the
    // source refuses before anything starts, naming its binary.
    let refused = a
        .start_migration(
            "vm",
            &b.uri(),
            MigrateOptions {
                comp_zstd_level: Some(5),
                ..zstd.clone()
            },
        )
        .await
        .expect_err("a level the binary ignores");
    let refused = refused.to_string();
    assert!(
        refused.contains("multifd-zstd-level") && refused.contains("qemu-system-x86_64"),
        "{refused}"
    );
    assert!(b.qemu_pids().is_empty());

    let job = a.migration_in_flight("vm", &b, zstd).await;
    // Both ends compress: the destination must decompress what the
    // source sends.
    assert_eq!(parameter(&a, "vm", "multifd-compression").await, "zstd");
    assert_eq!(parameter(&b, "vm", "multifd-compression").await, "zstd");
    a.cli_ok(&["migrate-setspeed", "vm", "1000"]);
    let record = a.wait_job(&job).await;
    assert_eq!(record.status, JobStatus::Completed, "{record:#?}");
    assert!(record.flags.contains(&"comp-methods=zstd".to_string()));
    testkit::assert_runs_only_on("vm", &b, &a, 2).await;
}

#[tokio::test]
async fn postcopy_bandwidth_caps_post_copy_while_pre_copy_runs_at_the_job_s_bandwidth() {
    let bed = TestBed::new().await;
    let (a, b) = bed
        .two_hosts_running("vm", 96, Workload::busy(48, 20_000))
        .await;

    let record = a
        .migrate_completes(
            "vm",
            &b,
            MigrateOptions {
                postcopy: true,
                postcopy_after_precopy: true,
                bandwidth: Some(64),
                postcopy_bandwidth: Some(8),
                ..live()
            },
        )
        .await;

    // The rate while in post-copy, from the job's own samples.
    let postcopy: Vec<&protocol::job::Sample> = record
        .samples
        .iter()
        .filter(|s| s.status == "postcopy-active")
        .collect();
    assert!(postcopy.len() >= 2, "{:#?}", record.samples);
    let (first, last) = (postcopy[0], postcopy[postcopy.len() - 1]);
    let mib_s = (last.transferred_bytes - first.transferred_bytes) as f64
        / 1048576.0
        / ((last.t_ms - first.t_ms) as f64 / 1000.0);
    assert!(
        mib_s > 0.5 && mib_s <= 8.0 * 1.25,
        "{mib_s:.1} MiB/s in post-copy"
    );
}

/// Whether this process (and so the agents it starts) may raise another
/// process's limits: `CAP_SYS_RESOURCE` (capability 24) is effective.
fn can_raise_limits() -> bool {
    effective_capabilities(std::process::id()) & (1 << 24) != 0
}

/// A process's effective capabilities, from `/proc`.
fn effective_capabilities(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0)
}

/// `--zerocopy` where the source QEMU may lock the pages it sends (it
/// holds CAP_IPC_LOCK, or the agent raises its locked-memory limit): they
/// go out with QEMU's zero-copy-send and the guest arrives intact. Where
/// neither holds (an unprivileged QEMU in a container without
/// CAP_SYS_RESOURCE): a refusal before anything starts that names the
/// limit, and nothing changed.
#[tokio::test]
async fn zerocopy_sends_multifd_pages_with_the_source_qemu_s_memory_lock_raised_or_says_why_not() {
    let bed = TestBed::new().await;
    let (a, b) = bed
        .two_hosts_running("vm", 64, Workload::busy(8, 50_000))
        .await;
    let pid = a.qemu_pids()[0];
    let limit = || locked_memory_limit(pid);
    let before = limit();
    let zerocopy = MigrateOptions {
        parallel: true,
        zerocopy: true,
        ..testkit::capped(4)
    };

    let exempt = effective_capabilities(pid) & (1 << 14) != 0;
    if !exempt && before < 64 << 20 && !can_raise_limits() {
        let refused = a
            .start_migration("vm", &b.uri(), zerocopy)
            .await
            .expect_err("a limit the agent cannot raise")
            .to_string();
        assert!(
            refused.contains("RLIMIT_MEMLOCK") && refused.contains("127 MiB"),
            "{refused}"
        );
        assert_eq!(limit(), before);
        assert!(b.qemu_pids().is_empty());
        testkit::assert_runs_only_on("vm", &a, &b, 2).await;
        return;
    }
    let job = a.migration_in_flight("vm", &b, zerocopy).await;
    assert!(a.capability("vm", "zero-copy-send").await);
    assert!(
        !b.capability("vm", "zero-copy-send").await,
        "a source's option"
    );
    assert!(
        exempt || limit() >= 64 << 20,
        "{} bytes locked at most (before: {before})",
        limit()
    );
    a.cli_ok(&["migrate-setspeed", "vm", "1000"]);
    let record = a.wait_job(&job).await;
    assert_eq!(record.status, JobStatus::Completed, "{record:#?}");
    testkit::assert_runs_only_on("vm", &b, &a, 2).await;
}

/// A process's soft `RLIMIT_MEMLOCK`, bytes, from `/proc` (u64::MAX: none).
fn locked_memory_limit(pid: u32) -> u64 {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max locked memory"))
        .unwrap();
    let soft = line.split_whitespace().nth(3).unwrap();
    soft.parse().unwrap_or(u64::MAX)
}

#[tokio::test]
async fn xbzrle_takes_the_cache_size_asked_for_and_migrate_compcache_sets_qemu_s() {
    let bed = TestBed::new().await;
    let (a, b) = bed
        .two_hosts_running("vm", 64, Workload::busy(8, 50_000))
        .await;
    let out = a.cli_ok(&["migrate-compcache", "vm", "--size", "33554432"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "Compression cache: 32.000 MiB\n"
    );
    assert_eq!(parameter(&a, "vm", "xbzrle-cache-size").await, 33554432);

    let job = a
        .migration_in_flight(
            "vm",
            &b,
            MigrateOptions {
                compressed: true,
                comp_methods: vec![CompMethod::Xbzrle],
                comp_xbzrle_cache: Some(128 << 20),
                ..testkit::capped(4)
            },
        )
        .await;
    // The job's cache on the source, XBZRLE on both ends.
    assert_eq!(parameter(&a, "vm", "xbzrle-cache-size").await, 128u64 << 20);
    assert!(a.capability("vm", "xbzrle").await && b.capability("vm", "xbzrle").await);
    a.cli_ok(&["migrate-setspeed", "vm", "1000"]);
    let record = a.wait_job(&job).await;
    assert_eq!(record.status, JobStatus::Completed, "{record:#?}");
    testkit::assert_runs_only_on("vm", &b, &a, 2).await;
}

#[tokio::test]
async fn migrate_setspeed_reaches_post_copy_s_own_limit_where_post_copy_has_no_cap_of_its_own() {
    let bed = TestBed::new().await;
    let (a, b) = bed
        .two_hosts_running("vm", 64, Workload::busy(8, 50_000))
        .await;
    let job = a
        .migration_in_flight(
            "vm",
            &b,
            MigrateOptions {
                postcopy: true,
                ..testkit::capped(4)
            },
        )
        .await;
    let mib = |n: u64| serde_json::json!(n << 20);
    assert_eq!(parameter(&a, "vm", "max-postcopy-bandwidth").await, mib(4));
    // QEMU applies max-bandwidth only before post-copy and
    // max-postcopy-bandwidth only in it: a new cap must set both, or a
    // guest in post-copy (a drain's re-split, an operator's setspeed)
    // goes on at the old one.
    a.cli_ok(&["migrate-setspeed", "vm", "1000"]);
    assert_eq!(parameter(&a, "vm", "max-bandwidth").await, mib(1000));
    assert_eq!(
        parameter(&a, "vm", "max-postcopy-bandwidth").await,
        mib(1000)
    );
    let record = a.wait_job(&job).await;
    assert_eq!(record.status, JobStatus::Completed, "{record:#?}");
    testkit::assert_runs_only_on("vm", &b, &a, 2).await;
}
