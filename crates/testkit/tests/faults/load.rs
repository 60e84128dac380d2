//! Concurrency and repetition: a second migrate, ping-pong, several
//! domains at once, the API under load.

use super::*;

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
    t.abort().await;
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
    let jobs = t.migrate_three_at_once(16).await;
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
    let jobs = t.migrate_three_at_once(8).await;
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
