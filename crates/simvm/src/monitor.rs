//! The QMP monitor: QEMU's greeting, capability negotiation, one JSON
//! command per line with its `id` echoed, and events to every negotiated
//! connection.

use std::path::Path;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::broadcast;

use crate::commands::{self, Outcome};
use crate::machine::{lock, Shared};
use crate::probe;

/// Serves QMP on `listener` until the process exits.
pub async fn serve(shared: Shared, listener: UnixListener) {
    while let Ok((stream, _)) = listener.accept().await {
        tokio::spawn(connection(shared.clone(), stream));
    }
}

/// Binds the monitor's socket (QEMU's `server=on`: a stale socket is
/// replaced).
///
/// # Errors
/// The bind's error.
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path)
}

async fn connection(shared: Shared, stream: UnixStream) {
    let (read, mut write) = stream.into_split();
    let greeting = json!({"QMP": {"version": probe::version(), "capabilities": ["oob"]}});
    if write
        .write_all(format!("{greeting}\r\n").as_bytes())
        .await
        .is_err()
    {
        return;
    }
    let mut lines = BufReader::new(read).lines();
    let mut events: Option<broadcast::Receiver<String>> = None;
    loop {
        let line = tokio::select! {
            line = lines.next_line() => match line {
                Ok(Some(line)) => line,
                _ => return,
            },
            event = recv(&mut events) => {
                if let Some(event) = event {
                    if write.write_all(format!("{event}\r\n").as_bytes()).await.is_err() {
                        return;
                    }
                }
                continue;
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        let (reply, quit) = match serde_json::from_str::<Value>(&line) {
            Err(e) => (
                error_reply(
                    &Value::Null,
                    "GenericError",
                    &format!("JSON parse error, {e}"),
                ),
                false,
            ),
            Ok(request) => answer(&shared, &request, &mut events).await,
        };
        // QEMU writes the events a command raised before its reply.
        let mut raised = String::new();
        if let Some(rx) = &mut events {
            while let Ok(event) = rx.try_recv() {
                raised.push_str(&event);
                raised.push_str("\r\n");
            }
        }
        if !raised.is_empty() && write.write_all(raised.as_bytes()).await.is_err() {
            return;
        }
        if write
            .write_all(format!("{reply}\r\n").as_bytes())
            .await
            .is_err()
        {
            return;
        }
        if quit {
            let _ = write.flush().await;
            std::process::exit(0);
        }
    }
}

async fn recv(events: &mut Option<broadcast::Receiver<String>>) -> Option<String> {
    match events {
        Some(rx) => loop {
            match rx.recv().await {
                Ok(event) => return Some(event),
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return std::future::pending().await,
            }
        },
        None => std::future::pending().await,
    }
}

async fn answer(
    shared: &Shared,
    request: &Value,
    events: &mut Option<broadcast::Receiver<String>>,
) -> (Value, bool) {
    let id = request.get("id").cloned().unwrap_or(Value::Null);
    let Some(name) = request.get("execute").and_then(Value::as_str) else {
        return (
            error_reply(&id, "GenericError", "QMP input lacks member 'execute'"),
            false,
        );
    };
    let arguments = request
        .get("arguments")
        .cloned()
        .unwrap_or_else(|| json!({}));
    if name == "qmp_capabilities" {
        if events.is_some() {
            return (
                error_reply(
                    &id,
                    "CommandNotFound",
                    "Capabilities negotiation is already complete, command ignored",
                ),
                false,
            );
        }
        *events = Some(lock(shared).subscribe());
        return (ok_reply(&id, json!({})), false);
    }
    if events.is_none() {
        return (
            error_reply(
                &id,
                "CommandNotFound",
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            ),
            false,
        );
    }
    match commands::execute(shared, name, &arguments) {
        Outcome::Reply(Ok(value)) => (ok_reply(&id, value), false),
        Outcome::Reply(Err((class, desc))) => (error_reply(&id, class, &desc), false),
        Outcome::Quit => (ok_reply(&id, json!({})), true),
        Outcome::Pending(later) => match later.await {
            Ok(value) => (ok_reply(&id, value), false),
            Err((class, desc)) => (error_reply(&id, class, &desc), false),
        },
    }
}

fn ok_reply(id: &Value, value: Value) -> Value {
    let mut reply = json!({ "return": value });
    if !id.is_null() {
        reply["id"] = id.clone();
    }
    reply
}

fn error_reply(id: &Value, class: &str, desc: &str) -> Value {
    let mut reply = json!({"error": {"class": class, "desc": desc}});
    if !id.is_null() {
        reply["id"] = id.clone();
    }
    reply
}
