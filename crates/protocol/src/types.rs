//! Data carried in replies.

use std::fmt;

use domain::qemu::{LaunchSpec, QemuBinary};
use domain::{Accel, DomainDefinition};
use migration::settings::Tunables;
use serde::{Deserialize, Serialize};

/// A domain's state as `list` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DomainState {
    Running,
    Paused,
    ShutOff,
    /// Running here, being migrated away.
    MigratingOut,
    /// Arriving here from another host; not yet resumed.
    MigratingIn,
    /// QEMU stopped and the agent has not yet cleaned up.
    Crashed,
}

impl fmt::Display for DomainState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DomainState::Running => "running",
            DomainState::Paused => "paused",
            DomainState::ShutOff => "shut off",
            DomainState::MigratingOut => "migrating out",
            DomainState::MigratingIn => "migrating in",
            DomainState::Crashed => "crashed",
        })
    }
}

/// One line of `list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DomainSummary {
    /// Run id, assigned when the domain starts (like virsh's Id).
    pub id: Option<u64>,
    pub name: String,
    pub state: DomainState,
    pub persistent: bool,
}

/// `dominfo`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DomainInfo {
    pub id: Option<u64>,
    pub name: String,
    pub state: DomainState,
    pub persistent: bool,
    pub memory_mib: u32,
    pub vcpus: u32,
    pub accel: Accel,
    /// Guest RAM actually given to QEMU (smaller when the TCG workaround
    /// is active).
    pub guest_ram_bytes: Option<u64>,
    /// Concrete machine type of the running QEMU.
    pub machine: Option<String>,
    pub qemu_pid: Option<u32>,
    pub qemu_version: Option<String>,
    pub qmp_socket: Option<String>,
    pub serial_log: Option<String>,
    pub qemu_log: Option<String>,
    /// Present when the running QEMU has the TCG dirty-bitmap migration bug
    /// and livemig is working around it.
    pub tcg_dirty_bitmap_workaround: Option<String>,
    pub tunables: Tunables,
    pub active_job: Option<String>,
}

/// `domcapabilities`: the host's QEMU binary as probed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostCapabilities {
    pub host: String,
    pub qemu: QemuBinary,
    /// The accelerator used when a definition does not say.
    pub default_accel: Accel,
    /// Whether the TCG migration bug needs the RAM-layout workaround here.
    pub tcg_dirty_bitmap_bug: bool,
}

/// About the agent itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    pub version: String,
    pub protocol: u32,
    /// The agent's TCP URI, as peers should use it.
    pub uri: Option<String>,
    pub state_dir: String,
    /// Random per agent process: lets an agent recognise itself.
    #[serde(default)]
    pub instance: String,
}

/// What a source sends a destination to prepare an incoming migration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrepareRequest {
    pub job_id: String,
    pub definition: DomainDefinition,
    /// Machine type and RAM layout the source QEMU runs with.
    pub spec: LaunchSpec,
    pub flags: migration::MigrateFlags,
    /// The source agent's URI, for the record.
    pub source: String,
}

/// `estimate` and `migrate --dry-run`: what the guest does to its memory and
/// what each convergence policy is predicted to make of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EstimateReport {
    pub domain: String,
    pub guest_ram_bytes: u64,
    /// Bytes per second the prediction assumes.
    pub bandwidth_bytes_s: f64,
    /// No bandwidth was given: the figure is an assumption.
    pub bandwidth_assumed: bool,
    pub downtime_ms: u64,
    pub budget_s: Option<f64>,
    /// Highest throttle the adaptive controller may use here, percent.
    pub max_throttle_pct: f64,
    pub samples: Vec<converge::estimate::Sample>,
    pub model: converge::DirtyModel,
    pub predictions: converge::estimate::Predictions,
}

/// What to estimate for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct EstimateParams {
    pub bandwidth_mib_s: Option<u64>,
    pub downtime_ms: Option<u64>,
    pub timeout_s: Option<u64>,
    pub max_throttle_pct: Option<f64>,
}

/// One line of `jobs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSummary {
    pub id: String,
    pub domain: String,
    /// `source` or `destination`.
    pub role: String,
    pub status: String,
    pub started_at_ms: u64,
    pub total_time_ms: u64,
    pub downtime_ms: Option<u64>,
    pub max_throttle_pct: f64,
    pub converge: String,
    pub error: Option<String>,
}
