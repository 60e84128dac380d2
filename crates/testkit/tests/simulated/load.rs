//! Concurrency: a second migrate of a domain, several domains at once, the
//! API under load while they move.

use std::time::Duration;

use guest::Workload;
use protocol::domain::DomainState;
use protocol::job::JobStatus;
use protocol::Request;
use testkit::{assert_runs_only_on, capped, Host, TestBed};

/// ~50 MiB/s over 16 MiB: never converges at a few MiB/s.
const BUSY: Workload = Workload {
    working_set_mib: 16,
    spin: 20_000,
    report_ms: 500,
};
/// ~4 MiB/s: converges on its own at 16 MiB/s.
const LIGHT: Workload = Workload {
    working_set_mib: 16,
    spin: 250_000,
    report_ms: 500,
};

/// Starts two more light guests beside `vm` on `a` and migrates all three
/// to `b` at once at `bandwidth` MiB/s each; returns their jobs.
async fn migrate_three_at_once(bed: &TestBed, a: &Host, b: &Host, bandwidth: u64) -> Vec<String> {
    for name in ["vm2", "vm3"] {
        a.define_and_start(bed.definition(name, 64, LIGHT)).await;
    }
    let mut jobs = Vec::new();
    for name in ["vm", "vm2", "vm3"] {
        jobs.push(
            a.start_migration(name, &b.uri(), capped(bandwidth))
                .await
                .unwrap(),
        );
    }
    jobs
}

#[tokio::test]
async fn a_second_migrate_of_the_same_domain_is_refused() {
    let bed = TestBed::simulated().await;
    let (a, b) = bed.two_hosts_running("vm", 64, BUSY).await;
    let job = a.start_migration("vm", &b.uri(), capped(2)).await.unwrap();

    let err = a
        .start_migration("vm", &b.uri(), capped(2))
        .await
        .unwrap_err();

    assert!(
        err.to_string()
            .contains("already has an active migration job"),
        "{err}"
    );
    a.request(Request::DomJobAbort {
        domain: "vm".parse().unwrap(),
    })
    .await
    .expect("abort accepted");
    assert_eq!(a.wait_job(&job).await.status, JobStatus::Cancelled);
    assert_runs_only_on("vm", &a, &b, 2).await;
}

#[tokio::test]
async fn several_domains_migrate_at_once() {
    let bed = TestBed::simulated().await;
    let (a, b) = bed.two_hosts_running("vm", 64, LIGHT).await;

    let jobs = migrate_three_at_once(&bed, &a, &b, 16).await;

    for job in &jobs {
        let record = a.wait_job(job).await;
        assert_eq!(record.status, JobStatus::Completed, "{record:#?}");
    }
    assert!(a.qemu_pids().is_empty());
    assert_eq!(b.qemu_pids().len(), 3);
    for name in ["vm", "vm2", "vm3"] {
        assert_eq!(b.state(name).await, Some(DomainState::Running));
        let log = b.wait_guest_passes(name, 1).await;
        assert!(log.memory_intact(), "{name}: {:?}", log.corruptions);
    }
}

#[tokio::test]
async fn the_api_answers_thousands_of_requests_during_migrations() {
    let bed = TestBed::simulated().await;
    let (a, b) = bed.two_hosts_running("vm", 64, LIGHT).await;
    let jobs = migrate_three_at_once(&bed, &a, &b, 8).await;
    let uri: protocol::AgentUri = a.local_uri().parse().unwrap();
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
        assert_eq!(a.wait_job(job).await.status, JobStatus::Completed);
    }
}
