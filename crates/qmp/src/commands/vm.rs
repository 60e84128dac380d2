//! Commands about the VM itself: version, run state, vCPUs, machine types.

use serde::{Deserialize, Serialize};

use super::unit_command;
use crate::command::{Command, Empty};
use crate::greeting::QemuVersion;

unit_command!(
    /// `query-version`
    QueryVersion,
    "query-version",
    VersionInfo
);
unit_command!(
    /// `query-status`
    QueryStatus,
    "query-status",
    StatusInfo
);
unit_command!(
    /// `stop`: pause the vCPUs.
    Stop,
    "stop",
    Empty
);
unit_command!(
    /// `cont`: resume the vCPUs.
    Cont,
    "cont",
    Empty
);
unit_command!(
    /// `quit`: QEMU exits right after replying.
    Quit,
    "quit",
    Empty
);
unit_command!(
    /// `query-cpus-fast`: vCPUs with their host thread ids.
    QueryCpusFast,
    "query-cpus-fast",
    Vec<CpuInfoFast>
);
unit_command!(
    /// `query-machines`: machine types and their aliases.
    QueryMachines,
    "query-machines",
    Vec<MachineInfo>
);
unit_command!(
    /// `query-kvm`
    QueryKvm,
    "query-kvm",
    KvmInfo
);

#[derive(Debug, Clone, Deserialize)]
pub struct VersionInfo {
    pub qemu: QemuVersion,
    #[serde(default)]
    pub package: String,
}

/// QEMU's run state (`RunState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    Debug,
    Inmigrate,
    InternalError,
    IoError,
    Paused,
    Postmigrate,
    Prelaunch,
    FinishMigrate,
    RestoreVm,
    Running,
    SaveVm,
    Shutdown,
    Suspended,
    Watchdog,
    GuestPanicked,
    Colo,
    #[serde(other)]
    Unknown,
}

#[derive(Debug, Clone, Deserialize)]
pub struct StatusInfo {
    pub running: bool,
    pub status: RunState,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct CpuInfoFast {
    pub cpu_index: i64,
    pub qom_path: String,
    pub thread_id: i64,
    #[serde(default)]
    pub target: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MachineInfo {
    pub name: String,
    #[serde(default)]
    pub alias: Option<String>,
    #[serde(default)]
    pub is_default: Option<bool>,
    #[serde(default)]
    pub deprecated: Option<bool>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
pub struct KvmInfo {
    pub enabled: bool,
    pub present: bool,
}

/// `human-monitor-command`, kept for diagnostics only.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct HumanMonitorCommand {
    pub command_line: String,
}

impl Command for HumanMonitorCommand {
    const NAME: &'static str = "human-monitor-command";
    type Reply = String;
}

unit_command!(
    /// `query-commands`: the commands this QEMU accepts.
    QueryCommands,
    "query-commands",
    Vec<CommandInfo>
);

#[derive(Debug, Clone, Deserialize)]
pub struct CommandInfo {
    pub name: String,
}
