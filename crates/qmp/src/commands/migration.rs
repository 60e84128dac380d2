//! Migration commands: capabilities, parameters, migrate, incoming, status.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::unit_command;
use crate::command::{Command, Empty};

/// A migration capability name. Known names get variants; any other name
/// (from a newer QEMU) is kept verbatim so it can be listed and sent back.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(from = "String", into = "String")]
pub enum MigrationCapability {
    /// Compress pages that repeat (XBZRLE).
    Xbzrle,
    /// Throttle the vCPUs when dirtying outpaces the transfer.
    AutoConverge,
    /// Multithreaded compression (deprecated in newer QEMU).
    Compress,
    /// Emit MIGRATION and MIGRATION_PASS events.
    Events,
    /// Allow switching to post-copy.
    PostcopyRam,
    /// A return path from destination to source.
    ReturnPath,
    /// Stop in `pre-switchover` until `migrate-continue`.
    PauseBeforeSwitchover,
    /// Several data channels (multifd).
    Multifd,
    /// Activate block devices only at `cont` on the destination.
    LateBlockActivate,
    /// Check that both sides run the same VM (by UUID).
    ValidateUuid,
    /// Zero-copy sending (multifd).
    ZeroCopySend,
    /// A separate channel for post-copy page requests.
    PostcopyPreempt,
    /// The destination acknowledges the switchover.
    SwitchoverAck,
    /// QEMU's dirty-limit throttle (8.1+).
    DirtyLimit,
    /// A capability this crate does not know, by name.
    Other(String),
}

impl MigrationCapability {
    /// The capability's QAPI name.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Xbzrle => "xbzrle",
            Self::AutoConverge => "auto-converge",
            Self::Compress => "compress",
            Self::Events => "events",
            Self::PostcopyRam => "postcopy-ram",
            Self::ReturnPath => "return-path",
            Self::PauseBeforeSwitchover => "pause-before-switchover",
            Self::Multifd => "multifd",
            Self::LateBlockActivate => "late-block-activate",
            Self::ValidateUuid => "validate-uuid",
            Self::ZeroCopySend => "zero-copy-send",
            Self::PostcopyPreempt => "postcopy-preempt",
            Self::SwitchoverAck => "switchover-ack",
            Self::DirtyLimit => "dirty-limit",
            Self::Other(name) => name,
        }
    }
}

impl From<String> for MigrationCapability {
    fn from(name: String) -> Self {
        match name.as_str() {
            "xbzrle" => Self::Xbzrle,
            "auto-converge" => Self::AutoConverge,
            "compress" => Self::Compress,
            "events" => Self::Events,
            "postcopy-ram" => Self::PostcopyRam,
            "return-path" => Self::ReturnPath,
            "pause-before-switchover" => Self::PauseBeforeSwitchover,
            "multifd" => Self::Multifd,
            "late-block-activate" => Self::LateBlockActivate,
            "validate-uuid" => Self::ValidateUuid,
            "zero-copy-send" => Self::ZeroCopySend,
            "postcopy-preempt" => Self::PostcopyPreempt,
            "switchover-ack" => Self::SwitchoverAck,
            "dirty-limit" => Self::DirtyLimit,
            _ => Self::Other(name),
        }
    }
}

impl From<MigrationCapability> for String {
    fn from(cap: MigrationCapability) -> Self {
        cap.as_str().to_string()
    }
}

impl fmt::Display for MigrationCapability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
/// A capability and whether it is on.
pub struct CapabilityStatus {
    /// The capability.
    pub capability: MigrationCapability,
    /// On or off.
    pub state: bool,
}

unit_command!(
    /// `query-migrate-capabilities`
    QueryMigrateCapabilities,
    "query-migrate-capabilities",
    Vec<CapabilityStatus>
);

/// `migrate-set-capabilities`
#[derive(Debug, Clone, Serialize)]
pub struct MigrateSetCapabilities {
    /// What to change.
    pub capabilities: Vec<CapabilityStatus>,
}

impl Command for MigrateSetCapabilities {
    const NAME: &'static str = "migrate-set-capabilities";
    type Reply = Empty;
}

/// The migration parameters livemig reads and writes. As a reply, fields a
/// QEMU does not have are `None` and fields we do not model land in `other`
/// (so a probe can list every parameter name); as arguments of
/// `migrate-set-parameters`, only the `Some` fields are sent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationParameters {
    #[serde(skip_serializing_if = "Option::is_none")]
    /// Bandwidth cap, bytes per second.
    pub max_bandwidth: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// Downtime limit, milliseconds.
    pub downtime_limit: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// First auto-converge throttle step, percent.
    pub cpu_throttle_initial: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// Auto-converge throttle increment, percent.
    pub cpu_throttle_increment: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// Scale the increment by how far dirtying outpaces sending.
    pub cpu_throttle_tailslow: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// Highest auto-converge throttle, percent.
    pub max_cpu_throttle: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// Percent of the sent bytes a period must dirty to count as high.
    pub throttle_trigger_threshold: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// multifd channels.
    pub multifd_channels: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// XBZRLE cache, bytes.
    pub xbzrle_cache_size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// How multifd's channels are compressed (`none`, `zlib`, `zstd`).
    pub multifd_compression: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// zlib's level on multifd's channels.
    pub multifd_zlib_level: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// zstd's level on multifd's channels.
    pub multifd_zstd_level: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// Bandwidth cap during post-copy, bytes per second (0: none).
    pub max_postcopy_bandwidth: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// Id of the `tls-creds-x509` object that encrypts the stream ("": none).
    pub tls_creds: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// The name the source checks the destination's certificate against.
    pub tls_hostname: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// Id of the authorization object that admits the source (destination).
    pub tls_authz: Option<String>,
    #[serde(flatten, skip_serializing)]
    /// Parameters this crate does not model, as QEMU sent them.
    pub other: BTreeMap<String, Value>,
}

impl MigrationParameters {
    /// Names of every parameter present, modelled or not.
    pub fn names(&self) -> Vec<String> {
        let modelled = serde_json::to_value(self).unwrap_or(Value::Null);
        let mut names: Vec<String> = modelled
            .as_object()
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        names.extend(self.other.keys().cloned());
        names.sort();
        names
    }
}

unit_command!(
    /// `query-migrate-parameters`
    QueryMigrateParameters,
    "query-migrate-parameters",
    MigrationParameters
);

/// `migrate-set-parameters`
#[derive(Debug, Clone, Serialize)]
pub struct MigrateSetParameters(pub MigrationParameters);

impl Command for MigrateSetParameters {
    const NAME: &'static str = "migrate-set-parameters";
    type Reply = Empty;
}

/// `migrate`: start (or, with `resume`, recover) an outgoing migration.
#[derive(Debug, Clone, Serialize)]
pub struct Migrate {
    /// Where to send (`tcp:HOST:PORT`, `unix:PATH`).
    pub uri: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// Resume a paused post-copy migration.
    pub resume: Option<bool>,
}

impl Command for Migrate {
    const NAME: &'static str = "migrate";
    type Reply = Empty;
}

/// `migrate-incoming`: start listening (QEMU started with `-incoming defer`).
#[derive(Debug, Clone, Serialize)]
pub struct MigrateIncoming {
    /// Where to listen.
    pub uri: String,
}

impl Command for MigrateIncoming {
    const NAME: &'static str = "migrate-incoming";
    type Reply = Empty;
}

/// `migrate-continue`: lets a migration paused in `pre-switchover` (the
/// `pause-before-switchover` capability) go on to switch over.
#[derive(Debug, Clone, Serialize)]
pub struct MigrateContinue {
    /// The state it is paused in: `pre-switchover`.
    pub state: MigrationStatus,
}

impl Command for MigrateContinue {
    const NAME: &'static str = "migrate-continue";
    type Reply = Empty;
}

/// `migrate-recover`: destination side of a post-copy recovery.
#[derive(Debug, Clone, Serialize)]
pub struct MigrateRecover {
    /// Where to listen again.
    pub uri: String,
}

impl Command for MigrateRecover {
    const NAME: &'static str = "migrate-recover";
    type Reply = Empty;
}

unit_command!(
    /// `migrate_cancel`
    MigrateCancel,
    "migrate_cancel",
    Empty
);
unit_command!(
    /// `migrate-pause`: force a post-copy migration into `postcopy-paused`
    /// (for a link that died without the socket noticing).
    MigratePause,
    "migrate-pause",
    Empty
);
unit_command!(
    /// `migrate-start-postcopy`
    MigrateStartPostcopy,
    "migrate-start-postcopy",
    Empty
);
unit_command!(
    /// `query-migrate`
    QueryMigrate,
    "query-migrate",
    MigrationInfo
);

/// Migration state (`MigrationStatus`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationStatus {
    /// No migration yet.
    None,
    /// Setting up.
    Setup,
    /// Cancel requested.
    Cancelling,
    /// Cancelled.
    Cancelled,
    /// Pre-copy in progress.
    Active,
    /// Post-copy: the destination runs the guest.
    PostcopyActive,
    /// Post-copy with a broken stream.
    PostcopyPaused,
    /// Post-copy being recovered.
    PostcopyRecover,
    /// Done.
    Completed,
    /// Failed.
    Failed,
    /// COLO fault tolerance.
    Colo,
    /// Paused before switchover (pause-before-switchover).
    PreSwitchover,
    /// Sending device state.
    Device,
    /// Waiting for a device unplug.
    WaitUnplug,
    #[serde(other)]
    /// A state this crate does not know.
    Unknown,
}

impl MigrationStatus {
    /// QEMU's name for the state.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Setup => "setup",
            Self::Cancelling => "cancelling",
            Self::Cancelled => "cancelled",
            Self::Active => "active",
            Self::PostcopyActive => "postcopy-active",
            Self::PostcopyPaused => "postcopy-paused",
            Self::PostcopyRecover => "postcopy-recover",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Colo => "colo",
            Self::PreSwitchover => "pre-switchover",
            Self::Device => "device",
            Self::WaitUnplug => "wait-unplug",
            Self::Unknown => "unknown",
        }
    }

    /// True once QEMU will not change the state on its own any more.
    pub fn is_finished(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }

    /// In post-copy: the destination runs the guest, the source only has
    /// part of its memory.
    pub fn is_postcopy(self) -> bool {
        matches!(
            self,
            Self::PostcopyActive | Self::PostcopyPaused | Self::PostcopyRecover
        )
    }
}

/// RAM statistics of `query-migrate`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RamStats {
    /// Bytes sent so far.
    pub transferred: Option<u64>,
    /// Bytes left in this pass.
    pub remaining: Option<u64>,
    /// Guest RAM, bytes.
    pub total: Option<u64>,
    /// Pages sent as one repeated byte.
    pub duplicate: Option<u64>,
    /// Pages skipped.
    pub skipped: Option<u64>,
    /// Pages sent whole.
    pub normal: Option<u64>,
    /// Bytes of the pages sent whole.
    pub normal_bytes: Option<u64>,
    /// Pages newly dirtied per second in the last period.
    pub dirty_pages_rate: Option<u64>,
    /// Throughput QEMU measured, megabits per second.
    pub mbps: Option<f64>,
    /// Dirty-bitmap syncs so far.
    pub dirty_sync_count: Option<u64>,
    /// Pages the destination asked for in post-copy.
    pub postcopy_requests: Option<u64>,
    /// Guest page size, bytes.
    pub page_size: Option<u64>,
    /// Bytes sent over multifd channels.
    pub multifd_bytes: Option<u64>,
    /// Pages sent per second.
    pub pages_per_second: Option<u64>,
    /// Bytes sent in pre-copy.
    pub precopy_bytes: Option<u64>,
    /// Bytes sent while the guest was paused.
    pub downtime_bytes: Option<u64>,
    /// Bytes sent in post-copy.
    pub postcopy_bytes: Option<u64>,
}

/// A socket address in `query-migrate` (the incoming side's listener).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SocketAddress {
    #[serde(rename = "type")]
    /// `inet`, `unix`, ...
    pub kind: String,
    #[serde(default)]
    /// Host, for `inet`.
    pub host: Option<String>,
    #[serde(default)]
    /// Port, for `inet`.
    pub port: Option<String>,
    #[serde(default)]
    /// Path, for `unix`.
    pub path: Option<String>,
}

/// The reply of `query-migrate`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationInfo {
    /// The migration's state.
    pub status: Option<MigrationStatus>,
    /// RAM figures (while active or completed).
    pub ram: Option<RamStats>,
    /// Milliseconds since the migration started.
    pub total_time: Option<u64>,
    /// QEMU's estimate of the downtime now, milliseconds.
    pub expected_downtime: Option<u64>,
    /// Milliseconds paused at switchover (once completed).
    pub downtime: Option<u64>,
    /// Milliseconds of setup.
    pub setup_time: Option<u64>,
    /// Auto-converge throttle in force, percent.
    pub cpu_throttle_percentage: Option<u64>,
    /// Why it failed.
    pub error_desc: Option<String>,
    /// Where an incoming migration listens.
    pub socket_address: Option<Vec<SocketAddress>>,
    /// Post-copy blocktime, milliseconds.
    pub postcopy_blocktime: Option<u64>,
}

#[cfg(test)]
mod tests;
