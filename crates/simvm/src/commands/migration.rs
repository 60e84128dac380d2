//! Migration commands, with QEMU 7.2's checks.

use qmp::commands::migration::MigrationStatus;
use serde_json::{json, Value};

use super::{generic, string_arg, QmpError};
use crate::machine::{lock, Shared};
use crate::migration::{incoming, outgoing, Control};

/// Parameters QEMU takes as a percentage, and their range.
const PERCENT_PARAMETERS: &[(&str, u64, u64)] = &[
    ("cpu-throttle-initial", 1, 99),
    ("cpu-throttle-increment", 1, 99),
    ("max-cpu-throttle", 1, 99),
    ("throttle-trigger-threshold", 1, 100),
];

pub fn execute(shared: &Shared, name: &str, args: &Value) -> Option<Result<Value, QmpError>> {
    Some(match name {
        "query-migrate" => Ok(lock(shared).migration.info()),
        "query-migrate-capabilities" => {
            let m = lock(shared);
            Ok(Value::Array(
                m.migration
                    .capabilities
                    .iter()
                    .map(|(c, on)| json!({"capability": c, "state": on}))
                    .collect(),
            ))
        }
        "migrate-set-capabilities" => set_capabilities(shared, args),
        "query-migrate-parameters" => Ok(Value::Object(lock(shared).migration.parameters.clone())),
        "migrate-set-parameters" => set_parameters(shared, args),
        "migrate" => if args.get("resume").and_then(Value::as_bool) == Some(true) {
            Err(generic("Cannot resume if there is no paused migration"))
        } else {
            string_arg(args, "uri").and_then(|uri| outgoing::start(shared, uri).map_err(generic))
        }
        .map(|()| json!({})),
        "migrate-incoming" => string_arg(args, "uri")
            .and_then(|uri| incoming::listen(shared, uri).map_err(generic))
            .map(|()| json!({})),
        "migrate_cancel" => cancel(shared),
        "migrate-continue" => {
            let m = lock(shared);
            match (m.migration.status, &m.migration.control) {
                (Some(MigrationStatus::PreSwitchover), Some(control)) => {
                    let _ = control.send(Control::Continue);
                    Ok(json!({}))
                }
                (status, _) => Err(generic(format!(
                    "Migration not in expected state: {}",
                    status.map_or("none", MigrationStatus::as_str)
                ))),
            }
        }
        "migrate-start-postcopy" => {
            let m = lock(shared);
            if !m.migration.capability("postcopy-ram") {
                Err(generic(
                    "Enable postcopy with migrate_set_capability before the start of migration",
                ))
            } else {
                match (m.migration.status, &m.migration.control) {
                    (Some(MigrationStatus::Active), Some(control)) => {
                        let _ = control.send(Control::StartPostcopy);
                        Ok(json!({}))
                    }
                    _ => Err(generic(
                        "Postcopy must be started after migration has been started",
                    )),
                }
            }
        }
        "calc-dirty-rate" => calc_dirty_rate(shared, args),
        "query-dirty-rate" => {
            let mut m = lock(shared);
            let m = &mut *m;
            m.dirty_rate.settle(&mut m.ram.rate_log);
            Ok(m.dirty_rate.info())
        }
        _ => return None,
    })
}

fn set_capabilities(shared: &Shared, args: &Value) -> Result<Value, QmpError> {
    let list = args
        .get("capabilities")
        .and_then(Value::as_array)
        .ok_or_else(|| generic("Parameter 'capabilities' is missing"))?;
    let mut m = lock(shared);
    if m.migration.in_progress() {
        return Err(generic("There's a migration process in progress"));
    }
    let mut changes = Vec::new();
    for entry in list {
        let name = string_arg(entry, "capability")?;
        let state = entry
            .get("state")
            .and_then(Value::as_bool)
            .ok_or_else(|| generic("Parameter 'state' is missing"))?;
        if !m.migration.capabilities.contains_key(name) {
            return Err(generic(format!(
                "Parameter 'capability' does not accept value '{name}'"
            )));
        }
        changes.push((name.to_string(), state));
    }
    let after = |cap: &str| {
        changes
            .iter()
            .rev()
            .find(|(name, _)| name == cap)
            .map(|&(_, state)| state)
            .unwrap_or_else(|| m.migration.capabilities.get(cap).copied().unwrap_or(false))
    };
    if after("zero-copy-send") {
        let param = |name: &str| m.migration.parameters.get(name).and_then(Value::as_str);
        let compressed = param("multifd-compression").is_some_and(|c| c != "none");
        let tls = param("tls-creds").is_some_and(|c| !c.is_empty());
        if !after("multifd") || compressed || tls {
            return Err(generic(
                "Zero copy only available for non-compressed non-TLS multifd migration",
            ));
        }
    }
    for (name, state) in changes {
        m.migration.capabilities.insert(name, state);
    }
    Ok(json!({}))
}

fn set_parameters(shared: &Shared, args: &Value) -> Result<Value, QmpError> {
    let given = args
        .as_object()
        .ok_or_else(|| generic("Invalid parameter type, expected: object"))?;
    let mut m = lock(shared);
    for (name, value) in given {
        let Some(default) = m.migration.parameters.get(name) else {
            return Err(generic(format!("Parameter '{name}' is unexpected")));
        };
        let same_type = (default.is_u64() && value.is_u64())
            || (default.is_string() && value.is_string())
            || (default.is_boolean() && value.is_boolean());
        if !same_type {
            return Err(generic(format!("Invalid parameter type for '{name}'")));
        }
        if let Some(&(_, low, high)) = PERCENT_PARAMETERS.iter().find(|(p, _, _)| p == name) {
            let v = value.as_u64().unwrap_or(0);
            if !(low..=high).contains(&v) {
                return Err(generic(format!(
                    "Parameter '{}' expects an integer in the range of {low} to {high}",
                    name.replace('-', "_")
                )));
            }
        }
        if name == "multifd-compression"
            && !["none", "zlib", "zstd"].contains(&value.as_str().unwrap_or_default())
        {
            return Err(generic(format!(
                "Parameter 'multifd-compression' does not accept value '{}'",
                value.as_str().unwrap_or_default()
            )));
        }
        if name == "xbzrle-cache-size" {
            let bytes = value.as_u64().unwrap_or(0);
            if bytes < 4096 || !bytes.is_power_of_two() {
                return Err(generic(
                    "Parameter 'xbzrle_cache_size' expects a power of two no less than the target page size",
                ));
            }
        }
        if name == "downtime-limit" && value.as_u64().unwrap_or(0) > 2_000_000 {
            return Err(generic(
                "Parameter 'downtime_limit' expects an integer in the range of 0 to 2000000 ms",
            ));
        }
    }
    for (name, value) in given {
        // QEMU 7.2 takes the multifd compression levels and keeps level 1.
        if name == "multifd-zlib-level" || name == "multifd-zstd-level" {
            continue;
        }
        m.migration.parameters.insert(name.clone(), value.clone());
    }
    Ok(json!({}))
}

fn cancel(shared: &Shared) -> Result<Value, QmpError> {
    let mut m = lock(shared);
    let status = m.migration.status;
    if m.migration.incoming || !m.migration.in_progress() {
        return Ok(json!({}));
    }
    if status.is_some_and(MigrationStatus::is_postcopy) {
        // The destination runs the guest: no source may take it back.
        return Err(generic("Postcopy migration cannot be cancelled"));
    }
    if let Some(control) = m.migration.control.clone() {
        outgoing::set_status(&mut m, MigrationStatus::Cancelling);
        let _ = control.send(Control::Cancel);
    }
    Ok(json!({}))
}

fn calc_dirty_rate(shared: &Shared, args: &Value) -> Result<Value, QmpError> {
    let secs = args
        .get("calc-time")
        .and_then(Value::as_u64)
        .filter(|s| (1..=60).contains(s))
        .ok_or_else(|| generic("calc-time is out of range[1, 60]."))?;
    let sample_pages = args
        .get("sample-pages")
        .and_then(Value::as_u64)
        .unwrap_or(512);
    let mut m = lock(shared);
    match args.get("mode").and_then(Value::as_str) {
        None | Some("page-sampling") => {}
        Some("dirty-ring") if m.config.dirty_ring.is_some() => {}
        Some(mode) => {
            return Err(generic(format!(
                "mode {mode} is not enabled, use other method to calculate dirty rate."
            )))
        }
    }
    let m = &mut *m;
    m.dirty_rate.settle(&mut m.ram.rate_log);
    if m.ram.rate_log.is_some() {
        return Err(generic("the dirty rate is already being measured."));
    }
    let pages = m.ram.len();
    m.dirty_rate
        .start(secs, sample_pages, &mut m.ram.rate_log, pages);
    Ok(json!({}))
}
