//! Protocol edge cases against a scripted QMP peer.

use std::time::Duration;

use qmp::commands::migration::{MigrationCapability, QueryMigrateCapabilities};
use qmp::commands::vm::QueryStatus;
use qmp::{Client, Error, ErrorClass, EventKind};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, DuplexStream};

const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": ["oob"]}}"#;

/// The peer's side: reads our commands, writes what the test says.
struct Peer {
    reader: BufReader<tokio::io::ReadHalf<DuplexStream>>,
    writer: tokio::io::WriteHalf<DuplexStream>,
}

impl Peer {
    async fn recv(&mut self) -> Value {
        let mut line = String::new();
        self.reader.read_line(&mut line).await.unwrap();
        serde_json::from_str(&line).unwrap()
    }

    async fn send(&mut self, line: &str) {
        self.writer.write_all(line.as_bytes()).await.unwrap();
        self.writer.write_all(b"\n").await.unwrap();
    }

    async fn reply(&mut self, id: &Value, ret: &str) {
        self.send(&format!(r#"{{"return": {ret}, "id": {id}}}"#))
            .await;
    }
}

async fn connect(timeout: Duration) -> (Client, Peer) {
    let (ours, theirs) = tokio::io::duplex(1 << 16);
    let (r, w) = tokio::io::split(theirs);
    let mut peer = Peer {
        reader: BufReader::new(r),
        writer: w,
    };
    let (our_r, our_w) = tokio::io::split(ours);
    let client = tokio::spawn(Client::handshake(our_r, our_w, timeout));
    peer.send(GREETING).await;
    let negotiate = peer.recv().await;
    assert_eq!(negotiate["execute"], "qmp_capabilities");
    peer.reply(&negotiate["id"], "{}").await;
    (client.await.unwrap().unwrap(), peer)
}

#[tokio::test]
async fn greeting_reports_the_qemu_version() {
    let (client, _peer) = connect(Duration::from_secs(5)).await;
    assert_eq!(
        client.greeting().version.qemu,
        qmp::QemuVersion::new(7, 2, 0)
    );
}

#[tokio::test]
async fn replies_are_routed_by_id_even_out_of_order() {
    let (client, mut peer) = connect(Duration::from_secs(5)).await;
    let a = {
        let c = client.clone();
        tokio::spawn(async move { c.execute(&QueryStatus).await })
    };
    let first = peer.recv().await;
    let b = {
        let c = client.clone();
        tokio::spawn(async move { c.execute(&QueryMigrateCapabilities).await })
    };
    let second = peer.recv().await;
    assert_eq!(second["execute"], "query-migrate-capabilities");
    peer.reply(
        &second["id"],
        r#"[{"capability": "auto-converge", "state": true}]"#,
    )
    .await;
    peer.reply(
        &first["id"],
        r#"{"running": true, "status": "running", "extra": 1}"#,
    )
    .await;
    let caps = b.await.unwrap().unwrap();
    assert_eq!(caps[0].capability, MigrationCapability::AutoConverge);
    assert!(a.await.unwrap().unwrap().running);
}

#[tokio::test]
async fn qmp_error_class_is_typed() {
    let (client, mut peer) = connect(Duration::from_secs(5)).await;
    let call = tokio::spawn(async move { client.execute(&QueryStatus).await });
    let cmd = peer.recv().await;
    peer.send(&format!(
        r#"{{"error": {{"class": "CommandNotFound", "desc": "nope"}}, "id": {}}}"#,
        cmd["id"]
    ))
    .await;
    let err = call.await.unwrap().unwrap_err();
    assert!(err.is_command_not_found(), "{err}");
    match err {
        Error::Command {
            command,
            class,
            desc,
        } => {
            assert_eq!(command, "query-status");
            assert_eq!(class, ErrorClass::CommandNotFound);
            assert_eq!(desc, "nope");
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn malformed_json_fails_the_pending_call_and_later_ones() {
    let (client, mut peer) = connect(Duration::from_secs(5)).await;
    let c = client.clone();
    let call = tokio::spawn(async move { c.execute(&QueryStatus).await });
    peer.recv().await;
    peer.send(r#"{"return": {"running": tru"#).await;
    let err = call.await.unwrap().unwrap_err();
    assert!(matches!(err, Error::Malformed { .. }), "{err:?}");
    assert!(client.is_closed());
    assert!(matches!(
        client.execute(&QueryStatus).await.unwrap_err(),
        Error::Disconnected
    ));
}

#[tokio::test]
async fn disconnect_fails_every_pending_call() {
    let (client, mut peer) = connect(Duration::from_secs(5)).await;
    let calls: Vec<_> = (0..3)
        .map(|_| {
            let c = client.clone();
            tokio::spawn(async move { c.execute(&QueryStatus).await })
        })
        .collect();
    for _ in 0..3 {
        peer.recv().await;
    }
    drop(peer);
    for call in calls {
        assert!(matches!(
            call.await.unwrap().unwrap_err(),
            Error::Disconnected
        ));
    }
}

#[tokio::test]
async fn a_peer_that_never_answers_times_out() {
    let (client, mut peer) = connect(Duration::from_millis(200)).await;
    let call = tokio::spawn(async move { client.execute(&QueryStatus).await });
    peer.recv().await;
    match call.await.unwrap().unwrap_err() {
        Error::Timeout { command, .. } => assert_eq!(command, "query-status"),
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn events_are_broadcast_to_every_subscriber() {
    let (client, mut peer) = connect(Duration::from_secs(5)).await;
    let mut a = client.events();
    let mut b = client.events();
    peer.send(r#"{"event": "MIGRATION_PASS", "data": {"pass": 3}, "timestamp": {"seconds": 1, "microseconds": 0}}"#)
        .await;
    for rx in [&mut a, &mut b] {
        let event = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(event.kind(), EventKind::MigrationPass { pass: 3 });
    }
}

#[tokio::test]
async fn a_peer_that_is_not_qmp_is_rejected() {
    let (ours, theirs) = tokio::io::duplex(1 << 12);
    let (_r, mut w) = tokio::io::split(theirs);
    let (our_r, our_w) = tokio::io::split(ours);
    let client = tokio::spawn(Client::handshake(our_r, our_w, Duration::from_secs(5)));
    w.write_all(b"SSH-2.0-OpenSSH\n").await.unwrap();
    assert!(matches!(
        client.await.unwrap().unwrap_err(),
        Error::Greeting(_)
    ));
}
