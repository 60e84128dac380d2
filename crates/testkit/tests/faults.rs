//! The fault matrix: whatever fails mid-migration, the guest keeps running
//! on exactly one host with its memory intact, and the job record says what
//! happened. Two hosts in two network namespaces joined by a veth pair;
//! faults injected for real (processes killed by pid, the link cut, traffic
//! shaped, a disk filled, jobs aborted) at a defined phase.
//!
//! After every case: exactly one QEMU runs the guest, the guest's own memory
//! check reports nothing and its progress continues, the job record names
//! the failure, and neither host has a QEMU, run record, QMP socket or
//! temporary file left over.

use std::path::Path;
use std::time::Duration;

use guest::Workload;
use protocol::domain::DomainState;
use protocol::job::{ActionKind, JobInfo, JobRecord, JobStatus};
use protocol::Request;
use protocol::{ConvergeMode, MigrateOptions};
use testkit::netns::NetnsPair;
use testkit::{wait_until, Host, TestBed};

const VM: &str = "vm";

/// ~50 MiB/s over 16 MiB: needs help against 16 MiB/s.
const BUSY: Workload = Workload {
    working_set_mib: 16,
    spin: 20_000,
    report_ms: 500,
};
/// ~4 MiB/s: converges on its own, in a few seconds at 16 MiB/s.
const LIGHT: Workload = Workload {
    working_set_mib: 16,
    spin: 250_000,
    report_ms: 500,
};
/// ~1.5 MiB/s: converges on its own even at 4 MiB/s, slowly enough to hit.
const SLOW: Workload = Workload {
    working_set_mib: 16,
    spin: 600_000,
    report_ms: 500,
};

struct Bed {
    net: NetnsPair,
    bed: TestBed,
    a: Host,
    b: Host,
}

impl Bed {
    async fn new(tag: &str, workload: Workload) -> Bed {
        let bed = TestBed::new().await;
        let net = NetnsPair::create(tag).expect("network namespaces (needs root and iproute2)");
        let a = bed
            .host_with(
                "a",
                Some(format!("tcp://{}:0", net.a_ip)),
                Some(net.a.clone()),
            )
            .await;
        let b = bed
            .host_with(
                "b",
                Some(format!("tcp://{}:0", net.b_ip)),
                Some(net.b.clone()),
            )
            .await;
        a.define_and_start(bed.definition(VM, 64, workload)).await;
        Bed { net, bed, a, b }
    }

    async fn start(&self, flags: MigrateOptions) -> String {
        self.a
            .start_migration(VM, &self.b.uri(), flags)
            .await
            .expect("the migration starts")
    }

    /// Waits until the job's live info satisfies `pred`.
    async fn wait_phase(&self, job: &str, what: &str, pred: impl Fn(&JobInfo) -> bool) -> JobInfo {
        wait_until(Duration::from_secs(90), what, || async {
            self.a.job_active(job).await.filter(|j| pred(j))
        })
        .await
    }

    /// Starts a post-copy-enabled migration and switches it to post-copy
    /// once pre-copy runs; returns the job once QEMU is in post-copy.
    async fn start_in_postcopy(&self, bandwidth: u64) -> String {
        let job = self
            .start(MigrateOptions {
                postcopy: true,
                ..live(bandwidth)
            })
            .await;
        self.wait_phase(&job, "pre-copy", precopy).await;
        self.a.cli(&["migrate-postcopy", VM]);
        self.wait_phase(&job, "post-copy", |j| {
            j.stats.qemu_status.as_deref() == Some("postcopy-active")
        })
        .await;
        job
    }

    async fn record(&self, job: &str) -> JobRecord {
        self.a.wait_job(job).await
    }
}

fn live(bandwidth: u64) -> MigrateOptions {
    MigrateOptions {
        live: true,
        bandwidth: Some(bandwidth),
        ..Default::default()
    }
}

fn precopy(j: &JobInfo) -> bool {
    j.stats.qemu_status.as_deref() == Some("active")
}

fn throttled(j: &JobInfo) -> bool {
    j.throttle_pct > 0.0
}

/// Exactly one copy runs, on `on`, intact and making progress; nothing is
/// left anywhere. Returns the host's serial-log progress.
async fn assert_one_intact_copy(on: &Host, off: &Host) {
    wait_until(
        Duration::from_secs(60),
        "the other host to clean up",
        || async { (off.qemu_pids().is_empty()).then_some(()) },
    )
    .await;
    assert_eq!(
        on.state(VM).await,
        Some(DomainState::Running),
        "state on {}",
        on.name
    );
    assert!(
        matches!(off.state(VM).await, None | Some(DomainState::ShutOff)),
        "on {} the domain is {:?}",
        off.name,
        off.state(VM).await
    );
    assert_eq!(on.qemu_pids().len(), 1, "exactly one QEMU on {}", on.name);
    let log = on.wait_guest_passes(VM, 2).await;
    assert!(
        log.memory_intact(),
        "memory corrupted on {}: {:?}",
        on.name,
        log.corruptions
    );
    for host in [on, off] {
        assert_no_leftovers(host);
    }
}

/// No run record, QMP socket or temporary file without a running QEMU.
fn assert_no_leftovers(host: &Host) {
    let run = host.state_dir().join("run");
    let running = !host.qemu_pids().is_empty();
    for entry in std::fs::read_dir(&run).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        assert!(
            running,
            "{}: {name} left in run/ with no QEMU running",
            host.name
        );
    }
    for dir in ["domains", "run"] {
        for entry in std::fs::read_dir(host.state_dir().join(dir))
            .unwrap()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            assert!(
                !name.contains(".tmp."),
                "{}: temporary file {dir}/{name}",
                host.name
            );
        }
    }
}

fn mentions(record: &JobRecord, words: &str) {
    let error = record.error.clone().unwrap_or_default();
    assert!(
        error.contains(words),
        "record should say {words:?}: {record:#?}"
    );
}

// ---- destination QEMU killed ------------------------------------------

#[tokio::test]
async fn destination_qemu_killed_during_precopy() {
    let t = Bed::new("dqp", BUSY).await;
    let job = t.start(live(4)).await;
    t.wait_phase(&job, "pre-copy", precopy).await;

    t.b.kill_qemu(VM).await;

    let record = t.record(&job).await;
    assert_eq!(record.status, JobStatus::Failed);
    mentions(&record, "migration failed");
    assert_eq!(record.recovery.as_deref(), Some("source kept running"));
    assert_one_intact_copy(&t.a, &t.b).await;
}

#[tokio::test]
async fn destination_qemu_killed_under_throttle() {
    let t = Bed::new("dqt", BUSY).await;
    let job = t
        .start(MigrateOptions {
            converge: Some(ConvergeMode::Adaptive),
            ..live(2)
        })
        .await;
    t.wait_phase(&job, "the controller to throttle", throttled)
        .await;

    t.b.kill_qemu(VM).await;

    let record = t.record(&job).await;
    assert_eq!(record.status, JobStatus::Failed);
    assert!(
        record
            .actions
            .iter()
            .any(|a| a.action == ActionKind::Release),
        "{record:#?}"
    );
    assert_one_intact_copy(&t.a, &t.b).await;
}

// ---- destination agent killed -----------------------------------------

#[tokio::test]
async fn destination_agent_killed_during_precopy_and_gone_for_good() {
    let mut t = Bed::new("dak", BUSY).await;
    let job = t.start(live(4)).await;
    t.wait_phase(&job, "pre-copy", precopy).await;

    t.b.crash();
    let record = t.record(&job).await;

    assert_eq!(record.status, JobStatus::Failed);
    mentions(&record, "lost contact with the destination agent");
    // Its orphaned incoming QEMU goes when the agent comes back.
    t.b.start_again().await;
    assert_one_intact_copy(&t.a, &t.b).await;
}

#[tokio::test]
async fn destination_agent_restarted_during_precopy() {
    let mut t = Bed::new("dar", SLOW).await;
    let job = t.start(live(4)).await;
    t.wait_phase(&job, "pre-copy", precopy).await;

    t.b.crash();
    t.b.start_again().await;
    let record = t.record(&job).await;

    assert_eq!(record.status, JobStatus::Completed, "{record:#?}");
    assert_one_intact_copy(&t.b, &t.a).await;
}

// ---- source agent killed and restarted --------------------------------

#[tokio::test]
async fn source_agent_restarted_during_precopy() {
    let mut t = Bed::new("sar", BUSY).await;
    let job = t.start(live(4)).await;
    t.wait_phase(&job, "pre-copy", precopy).await;

    t.a.crash();
    t.a.start_again().await;

    let record = t.record(&job).await;
    assert_eq!(record.status, JobStatus::Cancelled, "{record:#?}");
    mentions(&record, "source agent restarted");
    assert_eq!(record.recovery.as_deref(), Some("source kept running"));
    assert_one_intact_copy(&t.a, &t.b).await;
}

#[tokio::test]
async fn source_agent_restarted_under_throttle_gives_the_guest_its_cpu_back() {
    let mut t = Bed::new("sat", BUSY).await;
    let job = t
        .start(MigrateOptions {
            converge: Some(ConvergeMode::Adaptive),
            ..live(2)
        })
        .await;
    t.wait_phase(&job, "the controller to throttle", throttled)
        .await;

    t.a.crash();
    t.a.start_again().await;

    let record = t.record(&job).await;
    assert_ne!(record.status, JobStatus::Completed);
    let ours = Path::new(migration::vcpu_throttle::cgroup::CPU_V1_ROOT).join("livemig");
    let left: Vec<_> = std::fs::read_dir(&ours)
        .map(|d| d.flatten().filter(|e| e.path().is_dir()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "throttle cgroups left: {left:?}");
    assert_one_intact_copy(&t.a, &t.b).await;
    let log = t.a.wait_guest_progress(VM, 3).await;
    let (p1, p2) = (
        log.progress[log.progress.len() - 2],
        log.progress[log.progress.len() - 1],
    );
    let rate = (p2.writes - p1.writes) as f64 / ((p2.t_ms - p1.t_ms) as f64 / 1000.0);
    assert!(rate > 5_000.0, "guest still throttled: {rate:.0} writes/s");
}

#[tokio::test]
async fn source_agent_restarted_gracefully_keeps_an_idle_guest_running() {
    let mut t = Bed::new("sag", LIGHT).await;
    let pid = t.a.dominfo(VM).await.unwrap().qemu_pid.unwrap();

    t.a.restart_keeping_guests().await;

    let info = t.a.dominfo(VM).await.unwrap();
    assert_eq!(info.qemu_pid, Some(pid), "the same QEMU, adopted");
    assert_eq!(info.state, DomainState::Running);
    // And it can still be migrated.
    let record = t.a.migrate(VM, &t.b, live(16)).await;
    assert_eq!(record.status, JobStatus::Completed, "{record:#?}");
    assert_one_intact_copy(&t.b, &t.a).await;
}

// ---- the link -----------------------------------------------------------

#[tokio::test]
async fn link_cut_during_precopy_for_good() {
    let t = Bed::new("lcg", BUSY).await;
    let job = t.start(live(4)).await;
    t.wait_phase(&job, "pre-copy", precopy).await;

    t.net.cut().unwrap();
    let record = t.record(&job).await;
    t.net.restore().unwrap();

    assert_eq!(record.status, JobStatus::Failed);
    mentions(&record, "lost contact with the destination agent");
    assert_one_intact_copy(&t.a, &t.b).await;
}

#[tokio::test]
async fn link_cut_during_precopy_and_back_before_the_timeout() {
    let t = Bed::new("lcr", SLOW).await;
    let job = t.start(live(4)).await;
    t.wait_phase(&job, "pre-copy", precopy).await;

    t.net.cut().unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    t.net.restore().unwrap();
    let record = t.record(&job).await;

    assert_eq!(record.status, JobStatus::Completed, "{record:#?}");
    assert_one_intact_copy(&t.b, &t.a).await;
}

#[tokio::test]
async fn link_cut_under_throttle_and_back() {
    let t = Bed::new("lct", BUSY).await;
    let job = t
        .start(MigrateOptions {
            converge: Some(ConvergeMode::Adaptive),
            ..live(8)
        })
        .await;
    t.wait_phase(&job, "the controller to throttle", throttled)
        .await;

    t.net.cut().unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    t.net.restore().unwrap();
    let record = t.record(&job).await;

    assert_eq!(record.status, JobStatus::Completed, "{record:#?}");
    assert_one_intact_copy(&t.b, &t.a).await;
}

/// Migrates the busy guest with auto-converge over a shaped link; returns
/// the record and the packets the shaping dropped.
async fn migrate_over_shaped_link(t: &Bed, shape: impl FnOnce(&NetnsPair)) -> (JobRecord, u64) {
    shape(&t.net);
    let record =
        t.a.migrate(
            VM,
            &t.b,
            MigrateOptions {
                auto_converge: true,
                timeout: Some(150),
                ..live(16)
            },
        )
        .await;
    let dropped = t.net.dropped_packets().unwrap();
    t.net.unshape().unwrap();
    (record, dropped)
}

#[tokio::test]
async fn slow_congested_link_with_auto_converge() {
    let t = Bed::new("slw", BUSY).await;
    // No netem in this kernel: a token bucket at 40 Mbit/s with up to
    // 200 ms of queueing stands in for a slow, laggy link.
    let (record, _) =
        migrate_over_shaped_link(&t, |net| net.shape("40mbit", "200ms").unwrap()).await;

    assert_eq!(record.status, JobStatus::Completed, "{record:#?}");
    assert_one_intact_copy(&t.b, &t.a).await;
}

#[tokio::test]
async fn lossy_link_with_auto_converge() {
    let t = Bed::new("lss", BUSY).await;
    // 40 Mbit/s with a 100 KB queue: TCP overruns it and loses packets
    // (several percent) all through the migration.
    let (record, dropped) =
        migrate_over_shaped_link(&t, |net| net.shape_lossy("40mbit", 100_000).unwrap()).await;

    assert_eq!(record.status, JobStatus::Completed, "{record:#?}");
    assert!(dropped > 0, "the link lost no packets");
    assert_one_intact_copy(&t.b, &t.a).await;
}

#[tokio::test]
async fn unroutable_destination_is_refused_before_anything_starts() {
    let t = Bed::new("bad", LIGHT).await;
    let nowhere = format!("tcp://{}9:7000", &t.net.b_ip[..t.net.b_ip.len() - 1]);

    let err =
        t.a.start_migration(VM, &nowhere, live(16))
            .await
            .unwrap_err();

    assert!(
        err.to_string()
            .contains("destination agent is down or unreachable"),
        "{err}"
    );
    assert_one_intact_copy(&t.a, &t.b).await;
}

// ---- the destination's disk -------------------------------------------

#[tokio::test]
async fn destination_state_disk_full() {
    // On loopback: `ip netns exec` gives an agent its own mount namespace,
    // and the full disk must be the one the agent writes to.
    let bed = TestBed::new().await;
    let a = bed.host("a").await;
    let b = bed.host("b").await;
    a.define_and_start(bed.definition(VM, 64, LIGHT)).await;
    let domains = b.state_dir().join("domains");
    let mount = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
        .arg(&domains)
        .status()
        .unwrap();
    assert!(mount.success());
    // Fill it page by page: a single large write leaves room for a small one.
    let mut files = 0;
    while std::fs::write(domains.join(format!("filler{files}")), [0u8; 4096]).is_ok() {
        files += 1;
    }
    assert!(
        std::fs::write(domains.join("probe"), b"x").is_err(),
        "the disk is full"
    );

    let flags = MigrateOptions {
        persistent: true,
        ..live(16)
    };
    let record = a.migrate(VM, &b, flags).await;
    std::process::Command::new("umount")
        .arg(&domains)
        .status()
        .unwrap();

    // The guest moved; persisting its definition failed, and the record
    // says so.
    assert_eq!(record.status, JobStatus::Completed, "{record:#?}");
    assert_one_intact_copy(&b, &a).await;
    assert!(!b.dominfo(VM).await.unwrap().persistent);
    let id = record.id.clone();
    let b_record = match b.request(Request::Job { id }).await.unwrap() {
        protocol::Reply::Job {
            record: Some(r), ..
        } => *r,
        other => panic!("{other:?}"),
    };
    mentions(&b_record, "could not persist the definition");
}

// ---- domjobabort in every phase ---------------------------------------

async fn abort(t: &Bed) {
    t.a.request(Request::DomJobAbort {
        domain: VM.parse().unwrap(),
    })
    .await
    .expect("abort accepted");
}

#[tokio::test]
async fn domjobabort_right_after_start() {
    let t = Bed::new("ab0", BUSY).await;
    let job = t.start(live(4)).await;
    abort(&t).await;
    let record = t.record(&job).await;
    assert_eq!(record.status, JobStatus::Cancelled, "{record:#?}");
    assert_one_intact_copy(&t.a, &t.b).await;
}

#[tokio::test]
async fn domjobabort_during_precopy() {
    let t = Bed::new("ab1", BUSY).await;
    let job = t.start(live(4)).await;
    t.wait_phase(&job, "pre-copy", |j| {
        precopy(j) && j.stats.iteration.unwrap_or(0) >= 1
    })
    .await;
    abort(&t).await;
    let record = t.record(&job).await;
    assert_eq!(record.status, JobStatus::Cancelled);
    mentions(&record, "domjobabort");
    assert_one_intact_copy(&t.a, &t.b).await;
}

#[tokio::test]
async fn domjobabort_under_throttle() {
    let t = Bed::new("ab2", BUSY).await;
    let job = t
        .start(MigrateOptions {
            converge: Some(ConvergeMode::Adaptive),
            ..live(2)
        })
        .await;
    t.wait_phase(&job, "the controller to throttle", throttled)
        .await;
    abort(&t).await;
    let record = t.record(&job).await;
    assert_eq!(record.status, JobStatus::Cancelled);
    assert_one_intact_copy(&t.a, &t.b).await;
}

#[tokio::test]
async fn domjobabort_late_in_precopy_ends_consistently_either_way() {
    // Late in QEMU's auto-converge ramp, a pass or two from switchover.
    let t = Bed::new("ab3", BUSY).await;
    let job = t
        .start(MigrateOptions {
            auto_converge: true,
            ..live(16)
        })
        .await;
    t.wait_phase(&job, "a throttle of 50 % or more", |j| {
        j.stats.cpu_throttle_pct.unwrap_or(0) >= 50
    })
    .await;
    abort(&t).await;
    let record = t.record(&job).await;
    // A late cancel may lose the race to the switchover: both endings are
    // fine, as long as exactly one copy runs where the record says.
    match record.status {
        JobStatus::Completed => assert_one_intact_copy(&t.b, &t.a).await,
        JobStatus::Cancelled => assert_one_intact_copy(&t.a, &t.b).await,
        other => panic!("unexpected {other}: {record:#?}"),
    }
}

#[tokio::test]
async fn domjobabort_during_postcopy_is_ignored_and_postcopy_finishes() {
    let t = Bed::new("ab4", BUSY).await;
    let job = t.start_in_postcopy(4).await;
    abort(&t).await;
    let record = t.record(&job).await;
    assert_eq!(record.status, JobStatus::Completed, "{record:#?}");
    assert!(
        record.actions.iter().any(
            |a| a.action == ActionKind::Cancel && a.detail.contains("ignored during post-copy")
        ),
        "{record:#?}"
    );
    assert_one_intact_copy(&t.b, &t.a).await;
}

// ---- post-copy over a failed link -------------------------------------

#[tokio::test]
async fn link_cut_during_postcopy_pauses_and_postcopy_resume_recovers() {
    let t = Bed::new("pcr", BUSY).await;
    let job = t.start_in_postcopy(2).await;

    t.net.cut().unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    t.net.restore().unwrap();
    // Neither side may tear the guest down meanwhile: the destination runs
    // it, the source holds the rest of its memory.
    assert_eq!(t.b.qemu_pids().len(), 1);
    assert_eq!(t.a.qemu_pids().len(), 1);
    let out = t.a.cli(&["migrate", "--postcopy-resume", VM, &t.b.uri()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let record = t.record(&job).await;
    assert_eq!(record.status, JobStatus::Completed, "{record:#?}");
    assert_one_intact_copy(&t.b, &t.a).await;
}

// ---- concurrency and repetition ----------------------------------------

#[tokio::test]
async fn a_second_migrate_of_the_same_domain_is_refused() {
    let t = Bed::new("dup", BUSY).await;
    let job = t.start(live(2)).await;
    let err =
        t.a.start_migration(VM, &t.b.uri(), live(2))
            .await
            .unwrap_err();
    assert!(
        err.to_string()
            .contains("already has an active migration job"),
        "{err}"
    );
    abort(&t).await;
    assert_eq!(t.record(&job).await.status, JobStatus::Cancelled);
    assert_one_intact_copy(&t.a, &t.b).await;
}

#[tokio::test]
async fn twenty_ping_pong_migrations_of_a_busy_guest() {
    let t = Bed::new("png", BUSY).await;
    let flags = MigrateOptions {
        converge: Some(ConvergeMode::Adaptive),
        ..live(64)
    };
    for round in 0..20 {
        let (from, to) = if round % 2 == 0 {
            (&t.a, &t.b)
        } else {
            (&t.b, &t.a)
        };
        let record = from.migrate(VM, to, flags.clone()).await;
        assert_eq!(
            record.status,
            JobStatus::Completed,
            "round {round}: {record:#?}"
        );
        let log = to.wait_guest_progress(VM, 1).await;
        assert!(log.memory_intact(), "round {round}: {:?}", log.corruptions);
    }
    assert_one_intact_copy(&t.a, &t.b).await;
}

#[tokio::test]
async fn several_domains_migrate_at_once() {
    let t = Bed::new("par", LIGHT).await;
    for name in ["vm2", "vm3"] {
        t.a.define_and_start(t.bed.definition(name, 64, LIGHT))
            .await;
    }
    let mut jobs = Vec::new();
    for name in [VM, "vm2", "vm3"] {
        jobs.push(
            t.a.start_migration(name, &t.b.uri(), live(16))
                .await
                .unwrap(),
        );
    }
    for job in &jobs {
        let record = t.a.wait_job(job).await;
        assert_eq!(record.status, JobStatus::Completed, "{record:#?}");
    }
    assert!(t.a.qemu_pids().is_empty());
    assert_eq!(t.b.qemu_pids().len(), 3);
    for name in [VM, "vm2", "vm3"] {
        assert_eq!(t.b.state(name).await, Some(DomainState::Running));
        let log = t.b.wait_guest_passes(name, 1).await;
        assert!(log.memory_intact(), "{name}: {:?}", log.corruptions);
    }
}

#[tokio::test]
async fn the_api_answers_thousands_of_requests_during_migrations() {
    let t = Bed::new("api", LIGHT).await;
    for name in ["vm2", "vm3"] {
        t.a.define_and_start(t.bed.definition(name, 64, LIGHT))
            .await;
    }
    let mut jobs = Vec::new();
    for name in [VM, "vm2", "vm3"] {
        jobs.push(
            t.a.start_migration(name, &t.b.uri(), live(8))
                .await
                .unwrap(),
        );
    }
    let uri: protocol::AgentUri = t.a.local_uri().parse().unwrap();
    let mut clients = Vec::new();
    for c in 0..6 {
        let uri = uri.clone();
        clients.push(tokio::spawn(async move {
            let client = protocol::Client::connect(&uri).await.unwrap();
            let mut failures = 0;
            for i in 0..500 {
                let name = ["vm", "vm2", "vm3"][(c + i) % 3].parse().unwrap();
                let request = match i % 3 {
                    0 => Request::List { all: true },
                    1 => Request::DomInfo { domain: name },
                    _ => Request::DomJobInfo {
                        domain: name,
                        completed: false,
                    },
                };
                if client
                    .request(request, Duration::from_secs(30))
                    .await
                    .is_err()
                {
                    failures += 1;
                }
            }
            failures
        }));
    }
    for client in clients {
        assert_eq!(
            client.await.unwrap(),
            0,
            "requests failed during the migrations"
        );
    }
    for job in &jobs {
        assert_eq!(t.a.wait_job(job).await.status, JobStatus::Completed);
    }
}
