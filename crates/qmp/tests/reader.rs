//! Whatever a QEMU monitor (or something pretending to be one) writes, the
//! client ends each command with a reply or an error within its timeout,
//! and never panics.

use std::time::Duration;

use proptest::prelude::*;
use qmp::commands::vm::QueryStatus;
use qmp::Client;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": []}}"#;
const TIMEOUT: Duration = Duration::from_millis(100);

/// Runs a monitor that greets, negotiates, then answers the first command
/// with `answer` (and the command's id where `{id}` appears).
fn exchange(greeting: Vec<u8>, answer: Vec<u8>) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let (ours, theirs) = tokio::io::duplex(1 << 16);
        let (r, mut w) = tokio::io::split(theirs);
        let monitor = tokio::spawn(async move {
            let mut r = BufReader::new(r);
            let mut line = String::new();
            w.write_all(&greeting).await.ok()?;
            r.read_line(&mut line).await.ok()?;
            let id = serde_json::from_str::<serde_json::Value>(&line).ok()?["id"].clone();
            w.write_all(format!("{{\"return\": {{}}, \"id\": {id}}}\n").as_bytes())
                .await
                .ok()?;
            line.clear();
            r.read_line(&mut line).await.ok()?;
            let id = serde_json::from_str::<serde_json::Value>(&line).ok()?["id"].to_string();
            let answer = String::from_utf8_lossy(&answer).replace("{id}", &id);
            w.write_all(answer.as_bytes()).await.ok()?;
            // Stay connected: a silent monitor must time out, not hang.
            tokio::time::sleep(Duration::from_secs(5)).await;
            Some(())
        });
        let (our_r, our_w) = tokio::io::split(ours);
        let result = async {
            let client = Client::handshake(our_r, our_w, TIMEOUT)
                .await
                .map_err(|e| e.to_string())?;
            client
                .execute(&QueryStatus)
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        };
        let outcome = tokio::time::timeout(Duration::from_secs(3), result)
            .await
            .unwrap_or_else(|_| panic!("the client hung past its own timeout"));
        monitor.abort();
        outcome
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn any_answer_ends_in_a_reply_or_an_error(answer in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = exchange(format!("{GREETING}\n").into_bytes(), answer);
    }

    #[test]
    fn any_json_shaped_answer_ends_cleanly(body in "[\\[\\]{}\":,a-z0-9 .e+-]{0,200}") {
        let _ = exchange(
            format!("{GREETING}\n").into_bytes(),
            format!("{{\"return\": {body}, \"id\": {{id}}}}\n").into_bytes(),
        );
    }

    #[test]
    fn any_greeting_is_accepted_or_refused(greeting in proptest::collection::vec(any::<u8>(), 0..256)) {
        let mut greeting = greeting;
        greeting.push(b'\n');
        let _ = exchange(greeting, b"{\"return\": {\"status\": \"running\", \"running\": true}, \"id\": {id}}\n".to_vec());
    }
}

#[test]
fn a_good_answer_is_a_reply() {
    exchange(
        format!("{GREETING}\n").into_bytes(),
        b"{\"return\": {\"status\": \"running\", \"running\": true}, \"id\": {id}}\n".to_vec(),
    )
    .unwrap();
}

#[test]
fn deep_nesting_and_huge_numbers_are_errors() {
    let deep = format!("{}\n", "[".repeat(100_000));
    assert!(exchange(format!("{GREETING}\n").into_bytes(), deep.into_bytes()).is_err());
    let huge = "{\"return\": {\"status\": \"running\", \"running\": true}, \"id\": 1e999999}\n";
    assert!(exchange(
        format!("{GREETING}\n").into_bytes(),
        huge.as_bytes().to_vec()
    )
    .is_err());
}
