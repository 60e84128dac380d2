//! `migrate` options that are QEMU's own features: compression (XBZRLE)
//! and multifd. Post-copy by command and `--suspend` are in `contract`; the
//! options the agent carries out are tested on simulated VMs.

use guest::Workload;
use protocol::MigrateOptions;
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
