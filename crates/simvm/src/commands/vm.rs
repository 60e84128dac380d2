//! The VM's own commands: run state, identity, objects.

use serde_json::{json, Value};

use super::{generic, string_arg, Outcome, QmpError, COMMANDS};
use crate::machine::{lock, RunState, Shared};
use crate::probe;

pub fn execute(shared: &Shared, name: &str, args: &Value) -> Option<Outcome> {
    let reply: Result<Value, QmpError> = match name {
        "query-version" => Ok(probe::version()),
        "query-commands" => Ok(Value::Array(
            COMMANDS.iter().map(|c| json!({ "name": c })).collect(),
        )),
        "query-machines" => Ok(Value::Array(probe::qemu_7_2().machines.clone())),
        "query-command-line-options" => {
            Ok(Value::Array(probe::qemu_7_2().command_line_options.clone()))
        }
        "query-kvm" => {
            let m = lock(shared);
            Ok(json!({
                "enabled": m.config.accel == "kvm",
                "present": std::path::Path::new("/dev/kvm").exists(),
            }))
        }
        "query-name" => Ok(match &lock(shared).config.name {
            Some(name) => json!({ "name": name }),
            None => json!({}),
        }),
        "query-status" => {
            let m = lock(shared);
            Ok(json!({
                "status": m.run_state.as_str(),
                "running": m.run_state == RunState::Running,
                "singlestep": false,
            }))
        }
        "query-cpus-fast" => {
            let m = lock(shared);
            Ok(Value::Array(
                m.vcpu_threads
                    .iter()
                    .enumerate()
                    .map(|(i, tid)| {
                        json!({
                            "cpu-index": i,
                            "thread-id": tid,
                            "qom-path": format!("/machine/unattached/device[{i}]"),
                            "target": "x86_64",
                            "props": {"core-id": 0, "thread-id": 0, "socket-id": i},
                        })
                    })
                    .collect(),
            ))
        }
        "stop" => {
            let mut m = lock(shared);
            match m.run_state {
                // Stopping a destination only keeps it from starting.
                RunState::Inmigrate => m.autostart = false,
                RunState::Running => m.stop(RunState::Paused),
                _ => {}
            }
            Ok(json!({}))
        }
        "cont" => {
            let mut m = lock(shared);
            match m.run_state {
                RunState::Inmigrate => m.autostart = true,
                RunState::FinishMigrate => {
                    return Some(Outcome::Reply(Err(generic(
                        "Migration is not finalized yet",
                    ))))
                }
                _ => m.resume(),
            }
            Ok(json!({}))
        }
        "quit" => {
            let m = lock(shared);
            m.emit(
                "SHUTDOWN",
                Some(json!({"guest": false, "reason": "host-qmp-quit"})),
            );
            return Some(Outcome::Quit);
        }
        "announce-self" => Ok(json!({})),
        // What QEMU's resident RAM mapping tells of a real guest.
        "x-livemig-query-ram" => {
            let m = lock(shared);
            Ok(json!({"in-use": m.ram.in_use() as u64 * crate::ram::PAGE_SIZE}))
        }
        "object-add" => object_add(shared, args),
        "object-del" => {
            let id = match string_arg(args, "id") {
                Ok(id) => id.to_string(),
                Err(e) => return Some(Outcome::Reply(Err(e))),
            };
            let mut m = lock(shared);
            let before = m.objects.len();
            m.objects.retain(|(i, _)| *i != id);
            if m.objects.len() == before {
                Err(generic(format!("object '{id}' not found")))
            } else {
                Ok(json!({}))
            }
        }
        "qom-list" => {
            let path = args.get("path").and_then(Value::as_str).unwrap_or("/");
            if path == "/objects" {
                let m = lock(shared);
                Ok(Value::Array(
                    m.objects
                        .iter()
                        .map(|(id, kind)| json!({"name": id, "type": format!("child<{kind}>")}))
                        .collect(),
                ))
            } else {
                Err(("DeviceNotFound", format!("Device '{path}' not found")))
            }
        }
        _ => return None,
    };
    Some(Outcome::Reply(reply))
}

fn object_add(shared: &Shared, args: &Value) -> Result<Value, QmpError> {
    let kind = string_arg(args, "qom-type")?.to_string();
    let id = string_arg(args, "id")?.to_string();
    if kind == "tls-creds-x509" {
        let dir = string_arg(args, "dir")?;
        if !std::path::Path::new(dir).join("ca-cert.pem").is_file() {
            return Err(generic(format!(
                "Unable to access credentials {dir}/ca-cert.pem: No such file or directory"
            )));
        }
    }
    let mut m = lock(shared);
    if m.objects.iter().any(|(i, _)| *i == id) {
        return Err(generic(format!(
            "attempt to add duplicate property '{id}' to object (type 'container')"
        )));
    }
    m.objects.push((id, kind));
    Ok(json!({}))
}
