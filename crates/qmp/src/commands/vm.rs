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
/// `query-version`'s reply.
pub struct VersionInfo {
    /// The version.
    pub qemu: QemuVersion,
    #[serde(default)]
    /// The distribution's package version.
    pub package: String,
}

/// QEMU's run state (`RunState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    /// Stopped by a debugger.
    Debug,
    /// Waiting for an incoming migration.
    Inmigrate,
    /// Stopped on an internal error.
    InternalError,
    /// Stopped on an I/O error.
    IoError,
    /// Paused.
    Paused,
    /// Paused after migrating away.
    Postmigrate,
    /// Started with `-S`, never run.
    Prelaunch,
    /// Finishing a migration.
    FinishMigrate,
    /// Restoring a snapshot.
    RestoreVm,
    /// Running.
    Running,
    /// Saving a snapshot.
    SaveVm,
    /// Shut down.
    Shutdown,
    /// Suspended (ACPI S3).
    Suspended,
    /// Stopped by a watchdog.
    Watchdog,
    /// The guest panicked.
    GuestPanicked,
    /// COLO fault tolerance.
    Colo,
    #[serde(other)]
    /// A state this crate does not know.
    Unknown,
}

#[derive(Debug, Clone, Deserialize)]
/// `query-status`'s reply.
pub struct StatusInfo {
    /// The vCPUs run.
    pub running: bool,
    /// The run state.
    pub status: RunState,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
/// One vCPU, as `query-cpus-fast` lists it.
pub struct CpuInfoFast {
    /// Its index.
    pub cpu_index: i64,
    /// Its QOM path.
    pub qom_path: String,
    /// The host thread running it.
    pub thread_id: i64,
    #[serde(default)]
    /// The target architecture.
    pub target: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
/// One machine type, as `query-machines` lists it.
pub struct MachineInfo {
    /// Its concrete name.
    pub name: String,
    #[serde(default)]
    /// The alias pointing at it.
    pub alias: Option<String>,
    #[serde(default)]
    /// It is the default.
    pub is_default: Option<bool>,
    #[serde(default)]
    /// It is deprecated.
    pub deprecated: Option<bool>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
/// `query-kvm`'s reply.
pub struct KvmInfo {
    /// KVM is in use.
    pub enabled: bool,
    /// KVM is available.
    pub present: bool,
}

/// `human-monitor-command`, kept for diagnostics only.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct HumanMonitorCommand {
    /// The command, as the human monitor takes it.
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

unit_command!(
    /// `query-command-line-options`: the option groups this binary has
    /// (`sandbox` only when built with seccomp, `run-with` from 9.1).
    QueryCommandLineOptions,
    "query-command-line-options",
    Vec<CommandLineOption>
);

#[derive(Debug, Clone, Deserialize)]
/// One command-line option group.
pub struct CommandLineOption {
    /// Its name, without the dash.
    pub option: String,
}

/// `qom-list`: the children and properties of a QOM path.
#[derive(Debug, Clone, Serialize)]
pub struct QomList {
    /// The path (`/objects` holds the objects made with `-object` or
    /// `object-add`).
    pub path: String,
}

impl Command for QomList {
    const NAME: &'static str = "qom-list";
    type Reply = Vec<QomProperty>;
}

#[derive(Debug, Clone, Deserialize)]
/// One entry of a `qom-list` reply.
pub struct QomProperty {
    /// The child's or property's name.
    pub name: String,
}

#[derive(Debug, Clone, Deserialize)]
/// One QMP command, as `query-commands` lists it.
pub struct CommandInfo {
    /// Its name.
    pub name: String,
}

/// `announce-self`: QEMU sends gratuitous ARP/RARP frames for every NIC,
/// `rounds` times, `initial` ms after the call and then `step` ms further
/// apart each round (at most `max` ms), so that switches learn where the
/// guest now is.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct AnnounceSelf {
    /// Delay before the first round, ms.
    pub initial: u64,
    /// Longest delay between rounds, ms.
    pub max: u64,
    /// How many rounds.
    pub rounds: u64,
    /// How much longer each delay is than the one before, ms.
    pub step: u64,
}

impl Default for AnnounceSelf {
    /// QEMU's own announce parameters.
    fn default() -> Self {
        AnnounceSelf {
            initial: 50,
            max: 550,
            rounds: 5,
            step: 100,
        }
    }
}

impl Command for AnnounceSelf {
    const NAME: &'static str = "announce-self";
    type Reply = Empty;
}
