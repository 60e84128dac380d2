//! Repetition: a busy guest migrated back and forth twenty times, its
//! memory checked after every round.

use super::*;

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
