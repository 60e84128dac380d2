//! What the simulation answers to a capability probe: QEMU 7.2's own
//! answers, recorded from Debian's `qemu-system-x86_64` 7.2 on a
//! `-machine none` instance (`qemu-7.2.json`: migration capabilities and
//! parameters with their defaults, machine types, the `sandbox` option),
//! so an agent probing a simulated VM plans with the same facts. The
//! commands it lists are the ones the simulation implements.

use std::sync::OnceLock;

use serde::Deserialize;
use serde_json::{Map, Value};

/// The recorded answers.
#[derive(Debug, Deserialize)]
pub struct Recorded {
    /// `query-version`.
    pub version: Value,
    /// `query-migrate-capabilities`, names only.
    #[serde(rename = "migrate-capabilities")]
    pub capabilities: Vec<String>,
    /// `query-migrate-parameters`.
    #[serde(rename = "migrate-parameters")]
    pub parameters: Map<String, Value>,
    /// `query-machines`.
    pub machines: Vec<Value>,
    /// `query-command-line-options`, the options livemig asks about.
    #[serde(rename = "command-line-options")]
    pub command_line_options: Vec<Value>,
}

/// QEMU 7.2's answers.
pub fn qemu_7_2() -> &'static Recorded {
    static RECORDED: OnceLock<Recorded> = OnceLock::new();
    RECORDED.get_or_init(|| {
        serde_json::from_str(include_str!("qemu-7.2.json")).expect("the recorded probe parses")
    })
}

/// Capabilities to leave out (`LIVEMIG_SIMVM_WITHOUT=cap,cap`): a simulated
/// VM then stands for an older QEMU that lacks them.
pub fn capabilities_without() -> Vec<String> {
    std::env::var("LIVEMIG_SIMVM_WITHOUT")
        .unwrap_or_default()
        .split(',')
        .filter(|c| !c.is_empty())
        .map(str::to_string)
        .collect()
}

/// The package name a simulated VM reports beside QEMU's version.
pub const PACKAGE: &str = "livemig-simvm";

/// `query-version`: QEMU 7.2's version, with our package name, so a
/// reader of logs can tell a simulated VM from a real one.
pub fn version() -> Value {
    let mut version = qemu_7_2().version.clone();
    version["package"] = Value::String(PACKAGE.into());
    version
}

/// Resolves an alias (`pc`) to its machine type.
pub fn resolve_machine(name: &str) -> Option<String> {
    qemu_7_2().machines.iter().find_map(|m| {
        let machine = m["name"].as_str()?;
        (machine == name || m["alias"].as_str() == Some(name)).then(|| machine.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_recording_has_what_an_agent_probes() {
        let r = qemu_7_2();
        assert!(r.capabilities.iter().any(|c| c == "auto-converge"));
        assert_eq!(r.parameters["downtime-limit"], 300);
        assert_eq!(resolve_machine("pc").as_deref(), Some("pc-i440fx-7.2"));
        assert_eq!(version()["qemu"]["major"], 7);
    }
}
