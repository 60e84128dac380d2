//! What the scripted QEMU answers to each command, from its model: the
//! replies and the events they cause, as QEMU 7.2 gives them.

use serde_json::{json, Map, Value};

use super::{event, QmpError, State, LISTEN_PORT, RAM_BYTES};
use crate::commands::migration::MigrationStatus;

fn migration_event(status: MigrationStatus) -> Value {
    event("MIGRATION", json!({"status": status.as_str()}))
}

/// What QEMU would answer, from the model.
pub(super) fn model(
    s: &mut State,
    name: &str,
    args: &Value,
) -> (Result<Value, QmpError>, Vec<Value>) {
    let ok = |v: Value| (Ok(v), Vec::new());
    match name {
        "qmp_capabilities" => ok(json!({})),
        "query-migrate" => ok(query_migrate(s)),
        "migrate" => {
            if args["resume"] == json!(true) {
                s.status = Some(MigrationStatus::PostcopyActive);
                return (
                    Ok(json!({})),
                    vec![migration_event(MigrationStatus::PostcopyActive)],
                );
            }
            s.status = Some(MigrationStatus::Active);
            s.dirty_sync_count = 1;
            s.remaining = RAM_BYTES;
            (
                Ok(json!({})),
                vec![
                    migration_event(MigrationStatus::Setup),
                    migration_event(MigrationStatus::Active),
                ],
            )
        }
        "migrate-continue" => match s.status {
            Some(MigrationStatus::PreSwitchover) if args["state"] == "pre-switchover" => {
                s.status = Some(MigrationStatus::Device);
                (
                    Ok(json!({})),
                    vec![migration_event(MigrationStatus::Device)],
                )
            }
            _ => (
                Err((
                    "GenericError",
                    "Migration not in expected state".into(),
                )),
                Vec::new(),
            ),
        },
        "migrate_cancel" => match s.status {
            Some(
                MigrationStatus::Active | MigrationStatus::Setup | MigrationStatus::PreSwitchover,
            ) => {
                s.status = Some(MigrationStatus::Cancelled);
                (
                    Ok(json!({})),
                    vec![migration_event(MigrationStatus::Cancelled)],
                )
            }
            _ => ok(json!({})),
        },
        "migrate-start-postcopy" => {
            if s.capabilities.get("postcopy-ram") != Some(&true) {
                return (
                    Err((
                        "GenericError",
                        "Enable postcopy with migrate_set_capability before the start of migration"
                            .into(),
                    )),
                    Vec::new(),
                );
            }
            s.status = Some(MigrationStatus::PostcopyActive);
            s.run_state = "finish-migrate".into();
            (
                Ok(json!({})),
                vec![migration_event(MigrationStatus::PostcopyActive)],
            )
        }
        "migrate-pause" => {
            s.status = Some(MigrationStatus::PostcopyPaused);
            (
                Ok(json!({})),
                vec![migration_event(MigrationStatus::PostcopyPaused)],
            )
        }
        "migrate-set-parameters" => {
            if let Some(params) = args.as_object() {
                for (k, v) in params {
                    s.parameters.insert(k.clone(), v.clone());
                }
            }
            ok(json!({}))
        }
        "query-migrate-parameters" => ok(Value::Object(s.parameters.clone())),
        "migrate-set-capabilities" => {
            for c in args["capabilities"].as_array().into_iter().flatten() {
                if let (Some(name), Some(state)) = (c["capability"].as_str(), c["state"].as_bool())
                {
                    s.capabilities.insert(name.to_string(), state);
                }
            }
            ok(json!({}))
        }
        "query-migrate-capabilities" => ok(Value::Array(
            s.capabilities
                .iter()
                .map(|(c, on)| json!({"capability": c, "state": on}))
                .collect(),
        )),
        "migrate-incoming" | "migrate-recover" => {
            let uri = args["uri"].as_str().unwrap_or_default();
            let rest = uri.trim_start_matches("tcp:");
            let (host, port) = rest.rsplit_once(':').unwrap_or((rest, "0"));
            let port = match port.parse::<u16>().unwrap_or(0) {
                0 => LISTEN_PORT,
                p => p,
            };
            s.listening = Some((host.to_string(), port));
            if name == "migrate-recover" {
                s.status = Some(MigrationStatus::PostcopyRecover);
            }
            ok(json!({}))
        }
        "stop" => {
            if s.run_state == "running" {
                s.run_state = "paused".into();
            }
            (Ok(json!({})), vec![event("STOP", json!({}))])
        }
        "cont" => {
            s.run_state = "running".into();
            (Ok(json!({})), vec![event("RESUME", json!({}))])
        }
        "announce-self" | "nbd-server-start" | "block-export-add" | "nbd-server-stop" => {
            ok(json!({}))
        }
        "blockdev-add" => {
            let node = args["node-name"].as_str().unwrap_or_default().to_string();
            if s.block_nodes.contains(&node) {
                return (
                    Err(("GenericError", format!("Duplicate nodes with node-name='{node}'"))),
                    Vec::new(),
                );
            }
            s.block_nodes.push(node);
            ok(json!({}))
        }
        "blockdev-del" => {
            let node = args["node-name"].as_str().unwrap_or_default();
            match s.block_nodes.iter().position(|n| n == node) {
                Some(i) => {
                    s.block_nodes.remove(i);
                    ok(json!({}))
                }
                None => (
                    Err(("GenericError", format!("Failed to find node with node-name='{node}'"))),
                    Vec::new(),
                ),
            }
        }
        "blockdev-mirror" => {
            if s.block_jobs.iter().any(|j| j["device"] == args["job-id"]) {
                return (
                    Err(("GenericError", format!("Job ID '{}' already in use", args["job-id"].as_str().unwrap_or_default()))),
                    Vec::new(),
                );
            }
            s.block_jobs.push(json!({"device": args["job-id"], "type": "mirror",
                "len": 8 << 20, "offset": 0, "ready": false, "status": "running"}));
            ok(json!({}))
        }
        "block-job-change" => match s.block_jobs.iter_mut().find(|j| j["device"] == args["id"]) {
            Some(job) if args["type"] == "mirror" => {
                job["copy-mode"] = args["copy-mode"].clone();
                ok(json!({}))
            }
            _ => (
                Err(("GenericError", format!("Job '{}' not found", args["id"]))),
                Vec::new(),
            ),
        },
        "query-blockstats" => ok(Value::Array(
            s.block_jobs
                .iter()
                .filter_map(|j| j["device"].as_str()?.strip_prefix("livemig-mirror-"))
                .map(|target| {
                    json!({"device": format!("drive-{target}"),
                           "stats": {"wr_bytes": s.disk_written, "rd_bytes": 0}})
                })
                .collect(),
        )),
        "query-block-jobs" => {
            let writes = s.disk_writes_per_query;
            s.disk_written += writes;
            for job in &mut s.block_jobs {
                if job["status"] == "running" {
                    let len = job["len"].as_u64().unwrap_or(0) + writes;
                    job["len"] = json!(len);
                    let offset = (job["offset"].as_u64().unwrap_or(0) + (4 << 20)).min(len);
                    job["offset"] = json!(offset);
                    if offset == len {
                        job["ready"] = json!(true);
                        job["status"] = json!("ready");
                    }
                }
            }
            ok(Value::Array(s.block_jobs.clone()))
        }
        "block-job-cancel" => match s.block_jobs.iter_mut().find(|j| j["device"] == args["device"]) {
            Some(job) => {
                job["status"] = json!("concluded");
                ok(json!({}))
            }
            None => (
                Err(("DeviceNotActive", format!("Block job '{}' not found", args["device"]))),
                Vec::new(),
            ),
        },
        "job-dismiss" => {
            s.block_jobs
                .retain(|j| !(j["device"] == args["id"] && j["status"] == "concluded"));
            ok(json!({}))
        }
        "query-status" => ok(json!({"status": s.run_state, "running": s.run_state == "running"})),
        "query-cpus-fast" => ok(Value::Array(
            s.vcpu_threads
                .iter()
                .enumerate()
                .map(|(i, t)| json!({"cpu-index": i, "qom-path": format!("/machine/cpu[{i}]"), "thread-id": t}))
                .collect(),
        )),
        "calc-dirty-rate" => ok(json!({})),
        "query-dirty-rate" => ok(json!({"status": "measured", "dirty-rate": s.dirty_rate_mib_s,
            "calc-time": args.get("calc-time").cloned().unwrap_or(json!(1))})),
        "object-add" => {
            let id = args["id"].as_str().unwrap_or_default().to_string();
            if s.objects.contains_key(&id) {
                return (
                    Err((
                        "GenericError",
                        format!("attempt to add duplicate property '{id}' to object"),
                    )),
                    Vec::new(),
                );
            }
            s.objects.insert(id, args.clone());
            ok(json!({}))
        }
        "qom-list" if args["path"] == "/objects" => ok(Value::Array(
            s.objects
                .iter()
                .map(|(id, o)| json!({"name": id, "type": format!("child<{}>", o["qom-type"].as_str().unwrap_or_default())}))
                .collect(),
        )),
        "object-del" => {
            let id = args["id"].as_str().unwrap_or_default();
            match s.objects.remove(id) {
                Some(_) => ok(json!({})),
                None => (
                    Err(("GenericError", format!("object '{id}' not found"))),
                    Vec::new(),
                ),
            }
        }
        "quit" => ok(json!({})),
        other => (
            Err((
                "CommandNotFound",
                format!("The command {other} has not been found"),
            )),
            Vec::new(),
        ),
    }
}

fn query_migrate(s: &State) -> Value {
    let mut reply = Map::new();
    if let Some(status) = s.status {
        reply.insert("status".into(), json!(status.as_str()));
    }
    if matches!(
        s.status,
        Some(
            MigrationStatus::Active
                | MigrationStatus::Completed
                | MigrationStatus::PostcopyActive
                | MigrationStatus::PostcopyPaused
        )
    ) {
        reply.insert(
            "ram".into(),
            json!({"total": RAM_BYTES, "transferred": s.transferred, "remaining": s.remaining,
                "mbps": s.mbps, "dirty-sync-count": s.dirty_sync_count, "page-size": 4096,
                "dirty-pages-rate": 0, "duplicate": 0, "normal": 0, "normal-bytes": 0}),
        );
    }
    if let (Some(MigrationStatus::Active), Some(total), Some(setup)) =
        (s.status, s.total_time_ms, s.setup_time_ms)
    {
        reply.insert("total-time".into(), json!(total));
        reply.insert("setup-time".into(), json!(setup));
    }
    if s.status == Some(MigrationStatus::Completed) {
        reply.insert("total-time".into(), json!(s.total_time_ms.unwrap_or(0)));
        reply.insert("downtime".into(), json!(s.downtime_ms.unwrap_or(0)));
    }
    if let Some(desc) = &s.error_desc {
        reply.insert("error-desc".into(), json!(desc));
    }
    if let Some((host, port)) = &s.listening {
        reply.insert(
            "socket-address".into(),
            json!([{"type": "inet", "host": host, "port": port.to_string()}]),
        );
    }
    Value::Object(reply)
}
