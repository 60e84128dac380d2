//! A stand-in for `qemu-system-x86_64` that only answers the QMP queries an
//! agent's capability probe makes, and lacks the migration capabilities named
//! in `FAKE_QEMU_DROP_CAPS` (comma-separated). It lets a test give one
//! "host" a QEMU without, say, auto-converge: something the real binary on
//! this machine cannot show.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;

use serde_json::{json, Value};

use qmp::scripted::CAPABILITIES;

fn socket_path() -> String {
    let args: Vec<String> = std::env::args().collect();
    args.windows(2)
        .filter(|w| w[0] == "-chardev")
        .find_map(|w| {
            w[1].split(',')
                .find_map(|kv| kv.strip_prefix("path=").map(str::to_string))
        })
        .expect("a -chardev socket with path=")
}

fn reply(command: &str, dropped: &[String]) -> Value {
    match command {
        "query-version" => json!({"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": "fake"}),
        "query-migrate-capabilities" => Value::Array(
            CAPABILITIES
                .iter()
                .filter(|c| !dropped.iter().any(|d| d == *c))
                .map(|c| json!({"capability": c, "state": false}))
                .collect(),
        ),
        "query-migrate-parameters" => json!({"max-bandwidth": 134217728, "downtime-limit": 300,
            "cpu-throttle-initial": 20, "cpu-throttle-increment": 10}),
        "query-commands" => json!([{"name": "query-migrate"}]),
        "query-machines" => json!([{"name": "pc-i440fx-7.2", "alias": "pc"}]),
        "query-kvm" => json!({"enabled": false, "present": false}),
        "query-command-line-options" => json!([{"option": "sandbox", "parameters": []}]),
        _ => json!({}),
    }
}

fn main() {
    let dropped: Vec<String> = std::env::var("FAKE_QEMU_DROP_CAPS")
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect();
    let path = socket_path();
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).expect("bind the QMP socket");
    let (stream, _) = listener.accept().expect("a QMP client");
    let mut writer = stream.try_clone().expect("clone stream");
    let greeting = json!({"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": "fake"}, "capabilities": []}});
    writeln!(writer, "{greeting}").unwrap();
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { break };
        let Ok(request) = serde_json::from_str::<Value>(&line) else {
            break;
        };
        let command = request["execute"].as_str().unwrap_or_default().to_string();
        let answer = json!({"return": reply(&command, &dropped), "id": request["id"]});
        if writeln!(writer, "{answer}").is_err() || command == "quit" {
            break;
        }
    }
}
