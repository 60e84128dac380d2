//! `migrate --tls`: the migration stream between the two QEMUs is TLS,
//! each QEMU authenticated by its agent's certificate, and a host can
//! refuse any other (`migrate_tls_force`).

use guest::Workload;
use protocol::job::{JobRecord, JobStatus};
use protocol::{ErrorCode, MigrateOptions};
use testkit::capture::Capture;
use testkit::{assert_no_leftovers, assert_runs_only_on, live, TestBed};

/// QEMU's migration stream starts with this magic.
const QEMU_MAGIC: &[u8] = b"QEVM";

fn data_port(record: &JobRecord) -> u16 {
    let uri = record.data_uri.as_deref().expect("a data URI");
    uri.rsplit(':').next().unwrap().parse().expect("a port")
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn the_stream_is_plaintext_without_tls_and_encrypted_with_it() {
    let bed = TestBed::new().await;
    let (net, a, b) = bed.hosts_in_namespaces("tls").await;
    a.define_and_start(bed.definition("vm", 64, Workload::busy(8, 50_000)))
        .await;
    // Both streams pass through b's namespace: a to b, then b back to a.
    let capture = Capture::start(&net.b).expect("a packet capture in the namespace");

    let plain = a.migrate_live("vm", &b).await;
    assert_eq!(plain.status, JobStatus::Completed, "{plain:?}");
    b.wait_guest_passes("vm", 1).await;
    let options = MigrateOptions {
        auto_converge: true,
        tls: true,
        ..live()
    };
    let encrypted = b.migrate("vm", &a, options).await;
    assert_eq!(encrypted.status, JobStatus::Completed, "{encrypted:?}");
    assert!(
        encrypted.flags.contains(&"tls".to_string()),
        "{encrypted:?}"
    );
    assert_runs_only_on("vm", &a, &b, 2).await;
    let seen = capture.finish();

    let plain_stream = seen
        .client_stream(data_port(&plain))
        .expect("the plaintext migration's connection");
    assert!(
        plain_stream.starts_with(QEMU_MAGIC),
        "a plaintext stream starts with QEMU's magic: {:02x?}",
        &plain_stream[..plain_stream.len().min(16)]
    );
    let tls_stream = seen
        .client_stream(data_port(&encrypted))
        .expect("the TLS migration's connection");
    // A TLS handshake record (ClientHello), then nothing QEMU wrote in
    // the clear.
    assert!(
        tls_stream.len() > 64 && tls_stream[0] == 0x16 && tls_stream[1] == 0x03,
        "the stream starts with a TLS handshake: {:02x?}",
        &tls_stream[..tls_stream.len().min(16)]
    );
    assert!(
        !contains(&tls_stream, QEMU_MAGIC),
        "QEMU's magic in the TLS stream ({} bytes seen)",
        tls_stream.len()
    );
}

#[tokio::test]
async fn a_host_that_forces_tls_refuses_a_plain_migration_and_takes_a_tls_multifd_one() {
    let bed = TestBed::new().await;
    let a = bed.host("a").await;
    let b = bed.host_args("b", &["--migrate-tls-force"]).await;
    a.define_and_start(bed.definition("vm", 64, Workload::busy(4, 50_000)))
        .await;

    let refused = a
        .start_migration(
            "vm",
            &b.uri(),
            MigrateOptions {
                live: true,
                ..Default::default()
            },
        )
        .await
        .unwrap_err();
    let refused = refused.to_api();
    assert_eq!(refused.code, ErrorCode::OperationInvalid, "{refused:?}");
    assert!(
        refused.message.contains("migrate_tls_force") && refused.message.contains("--tls"),
        "{}",
        refused.message
    );
    // Nothing changed: the guest runs on a only, b never started a QEMU.
    assert!(b.qemu_pids().is_empty());
    assert_eq!(b.state("vm").await, None);
    assert_runs_only_on("vm", &a, &b, 1).await;

    a.migrate_completes(
        "vm",
        &b,
        MigrateOptions {
            tls: true,
            // Every multifd channel is TLS too.
            parallel: true,
            parallel_connections: Some(3),
            ..live()
        },
    )
    .await;
    assert_no_leftovers(&a);
}

#[tokio::test]
async fn tls_destination_is_the_name_the_destination_qemu_s_certificate_must_carry() {
    let bed = TestBed::new().await;
    let (a, b) = bed
        .two_hosts_running("vm", 64, Workload::busy(4, 50_000))
        .await;

    // b's certificate names 127.0.0.1, not this: the source QEMU refuses
    // the stream, the guest stays on a and b tears its side down.
    let record = a
        .migrate(
            "vm",
            &b,
            MigrateOptions {
                tls: true,
                tls_destination: Some("not-b.example".into()),
                ..live()
            },
        )
        .await;
    assert_eq!(record.status, JobStatus::Failed, "{record:#?}");
    let error = record.error.clone().unwrap_or_default();
    assert!(error.contains("not-b.example"), "{error}");
    b.wait_no_qemu().await;
    assert_runs_only_on("vm", &a, &b, 1).await;

    // The name it does carry.
    let record = a
        .migrate_completes(
            "vm",
            &b,
            MigrateOptions {
                tls: true,
                tls_destination: Some("127.0.0.1".into()),
                ..live()
            },
        )
        .await;
    assert!(record
        .flags
        .contains(&"tls-destination=127.0.0.1".to_string()));
}
