//! Domains as the agent reports them, and definitions as they travel.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use types::Accel;

/// A domain definition in the form the `domain` crate defines (the TOML
/// file's keys, as JSON). The protocol carries it without reading it, as
/// libvirt's carries domain XML: the agent parses and validates it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DefinitionDoc(pub Value);

/// A domain's state as `list` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DomainState {
    /// Its guest runs.
    Running,
    /// Its QEMU runs with the vCPUs stopped.
    Paused,
    /// No QEMU.
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
    /// The domain's name.
    pub name: String,
    /// Its state.
    pub state: DomainState,
    /// It has a definition on disk.
    pub persistent: bool,
}

/// Migration limits an agent keeps per domain between jobs
/// (`migrate-setspeed`, `migrate-setmaxdowntime`); options given to
/// `migrate` win over them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tunables {
    /// Bandwidth cap, MiB/s.
    pub bandwidth_mib_s: Option<u64>,
    /// Downtime limit, ms.
    pub downtime_ms: Option<u64>,
}

/// `dominfo`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DomainInfo {
    /// Run id while running.
    pub id: Option<u64>,
    /// The domain's name.
    pub name: String,
    /// Its state.
    pub state: DomainState,
    /// It has a definition on disk.
    pub persistent: bool,
    /// Guest RAM as defined, MiB.
    pub memory_mib: u32,
    /// vCPUs as defined.
    pub vcpus: u32,
    /// Accelerator as defined.
    pub accel: Accel,
    /// Guest RAM actually given to QEMU (smaller when the TCG workaround
    /// is active).
    pub guest_ram_bytes: Option<u64>,
    /// Concrete machine type of the running QEMU.
    pub machine: Option<String>,
    /// PID of the running QEMU.
    pub qemu_pid: Option<u32>,
    /// Version of the running QEMU.
    pub qemu_version: Option<String>,
    /// Path of its QMP socket.
    pub qmp_socket: Option<String>,
    /// Path of the guest's serial log.
    pub serial_log: Option<String>,
    /// Path of QEMU's own log.
    pub qemu_log: Option<String>,
    /// Present when the running QEMU has the TCG dirty-bitmap migration bug
    /// and livemig is working around it.
    pub tcg_dirty_bitmap_workaround: Option<String>,
    /// Limits the next migration gets.
    pub tunables: Tunables,
    /// The active job's id.
    pub active_job: Option<String>,
    /// Its labels (which migration policy applies).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
}

/// A domain's last dirty-rate measurement (`domdirtyrate-calc`, read by
/// `domstats --dirtyrate`), as QEMU reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirtyRate {
    /// `unstarted`, `measuring` or `measured`.
    pub status: String,
    /// When the measurement started, QEMU's clock (seconds).
    #[serde(default)]
    pub start_time: Option<i64>,
    /// Its window, seconds.
    #[serde(default)]
    pub calc_period_s: Option<i64>,
    /// How it measured (`page-sampling`, `dirty-bitmap`, `dirty-ring`).
    #[serde(default)]
    pub mode: Option<String>,
    /// The rate, MiB/s, once measured.
    #[serde(default)]
    pub mib_s: Option<i64>,
    /// Each vCPU's rate, MiB/s (`dirty-ring` only), by index.
    #[serde(default)]
    pub vcpus_mib_s: Vec<i64>,
}
