//! The agent and its QEMU binary.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};
use types::Accel;

/// About the agent itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    /// livemig's version.
    pub version: String,
    /// The protocol version it speaks.
    pub protocol: u32,
    /// The agent's TCP URI, as peers should use it.
    pub uri: Option<String>,
    /// Its state directory (shown to administrators only).
    #[serde(default)]
    pub state_dir: Option<String>,
    /// Random per agent process: lets an agent recognise itself.
    #[serde(default)]
    pub instance: String,
}

/// A QEMU version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct QemuVersion {
    /// Major.
    pub major: u32,
    /// Minor.
    pub minor: u32,
    /// Micro.
    pub micro: u32,
}

impl fmt::Display for QemuVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// A machine type and the alias pointing at it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineInfo {
    /// The concrete type (`pc-i440fx-7.2`).
    pub name: String,
    /// The alias, if any (`pc`).
    #[serde(default)]
    pub alias: Option<String>,
}

/// A QEMU binary, as probed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuInfo {
    /// Its path.
    pub path: String,
    /// Its version.
    pub version: QemuVersion,
    /// The distribution's package version.
    pub package: String,
    /// Migration capabilities it knows.
    pub migration_capabilities: BTreeSet<String>,
    /// Migration parameters it knows.
    pub migration_parameters: BTreeSet<String>,
    /// QMP commands it knows.
    pub commands: BTreeSet<String>,
    /// Machine types it offers.
    pub machines: Vec<MachineInfo>,
    /// `/dev/kvm` is usable.
    pub kvm_present: bool,
}

/// `domcapabilities`: the host's QEMU binary as probed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostCapabilities {
    /// The agent's URI.
    pub host: String,
    /// Its QEMU binary.
    pub qemu: QemuInfo,
    /// The accelerator used when a definition does not say.
    pub default_accel: Accel,
    /// Whether the TCG migration bug needs the RAM-layout workaround here.
    pub tcg_dirty_bitmap_bug: bool,
    /// How the adaptive controller would throttle a guest's vCPUs here.
    #[serde(default)]
    pub vcpu_throttle: Option<ThrottleMechanism>,
}

/// The mechanism the adaptive controller throttles vCPUs with on a host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ThrottleMechanism {
    /// "host" (a CPU quota on the vCPU threads) or "qemu" (QEMU's own).
    pub kind: String,
    /// The highest throttle it can apply, percent.
    pub max_throttle_pct: f64,
    /// Which cgroup hierarchy, or why the host cannot throttle.
    pub detail: String,
}
