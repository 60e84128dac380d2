//! The options of a migration, and what a source sends its destination.

use serde::{Deserialize, Serialize};
use types::Accel;

use crate::domain::DefinitionDoc;

/// The downtime limit a job gets when neither its options nor the domain
/// give one: QEMU's own default.
pub const DEFAULT_DOWNTIME_MS: u64 = 300;

/// Who makes a busy guest's migration converge.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConvergeMode {
    /// Plain pre-copy.
    #[default]
    None,
    /// QEMU's auto-converge.
    Qemu,
    /// livemig's controller: measures, throttles only as much as needed.
    Adaptive,
}

impl ConvergeMode {
    /// Every mode.
    pub const ALL: [ConvergeMode; 3] = [
        ConvergeMode::None,
        ConvergeMode::Qemu,
        ConvergeMode::Adaptive,
    ];

    /// The mode with this wire name.
    pub fn from_name(name: &str) -> Option<ConvergeMode> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }

    /// The mode's wire name.
    pub fn name(self) -> &'static str {
        match self {
            ConvergeMode::None => "none",
            ConvergeMode::Qemu => "qemu",
            ConvergeMode::Adaptive => "adaptive",
        }
    }
}

impl std::fmt::Display for ConvergeMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What to do when the migration's timeout expires.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TimeoutAction {
    /// Cancel the migration; the guest keeps running on the source.
    #[default]
    Abort,
    /// Switch to post-copy.
    Postcopy,
    /// Pause the guest so the copy finishes; it resumes on the destination.
    Suspend,
}

impl TimeoutAction {
    /// The action's wire name.
    pub fn name(self) -> &'static str {
        match self {
            TimeoutAction::Abort => "abort",
            TimeoutAction::Postcopy => "postcopy",
            TimeoutAction::Suspend => "suspend",
        }
    }
}

/// A way of compressing the migration stream (virsh's `--comp-methods`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CompMethod {
    /// XBZRLE: pages that were sent before go as deltas (one stream only).
    Xbzrle,
    /// zlib on every multifd channel (`--parallel`).
    Zlib,
    /// zstd on every multifd channel (`--parallel`).
    Zstd,
}

impl CompMethod {
    /// Every method.
    pub const ALL: [CompMethod; 3] = [CompMethod::Xbzrle, CompMethod::Zlib, CompMethod::Zstd];

    /// The method's name, as virsh spells it.
    pub fn name(self) -> &'static str {
        match self {
            CompMethod::Xbzrle => "xbzrle",
            CompMethod::Zlib => "zlib",
            CompMethod::Zstd => "zstd",
        }
    }

    /// It compresses each multifd channel (QEMU's `multifd-compression`).
    pub fn multifd(self) -> bool {
        matches!(self, CompMethod::Zlib | CompMethod::Zstd)
    }
}

impl std::fmt::Display for CompMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What the user asked of a migration, as it travels: every field is
/// optional, and the agent validates the combination (the `migration`
/// crate's `Flags`). Field names follow virsh's options; the CLI maps its
/// own options onto this struct, so renaming an option does not change the
/// wire.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MigrateOptions {
    /// The guest keeps running while its memory is copied.
    pub live: bool,
    /// Migrate only the definition; the domain must not be running.
    pub offline: bool,
    /// QEMU's auto-converge (the same as `converge: qemu`).
    pub auto_converge: bool,
    /// Initial auto-converge throttle, percent.
    pub auto_converge_initial: Option<u8>,
    /// Auto-converge throttle increment, percent.
    pub auto_converge_increment: Option<u8>,
    /// XBZRLE compression.
    pub compressed: bool,
    /// multifd.
    pub parallel: bool,
    /// multifd channels.
    pub parallel_connections: Option<u8>,
    /// Enable post-copy (switched to with `migrate-postcopy`).
    pub postcopy: bool,
    /// Switch to post-copy after the first pre-copy pass.
    pub postcopy_after_precopy: bool,
    /// Bandwidth cap, MiB/s.
    pub bandwidth: Option<u64>,
    /// Downtime limit, ms.
    pub downtime: Option<u64>,
    /// Timeout, s.
    pub timeout: Option<u64>,
    /// Make the domain persistent on the destination.
    pub persistent: bool,
    /// Remove the definition from the source after success.
    pub undefine_source: bool,
    /// Leave the guest paused on the destination.
    pub suspend: bool,
    /// QEMU's dirty-limit throttle.
    pub dirty_limit: bool,
    /// Where the destination QEMU listens (`tcp:HOST:PORT`).
    pub migrateuri: Option<String>,
    /// Who makes it converge.
    pub converge: Option<ConvergeMode>,
    /// What the timeout does.
    pub timeout_action: Option<TimeoutAction>,
    /// Ceiling a downtime ramp may reach, ms.
    pub max_downtime: Option<u64>,
    /// Highest vCPU throttle, percent.
    pub max_throttle: Option<f64>,
    /// Post-copy enabled for the policy to switch to.
    pub allow_postcopy: bool,
    /// Check and predict only.
    pub dry_run: bool,
    /// Recover a broken post-copy migration.
    pub postcopy_resume: bool,
    /// Encrypt and authenticate the migration stream with the agents'
    /// certificates (QEMU's TLS).
    pub tls: bool,
    /// Migrate although the domain's configuration is unsafe to migrate
    /// (a host-dependent CPU model).
    #[serde(rename = "unsafe")]
    pub unsafe_migration: bool,
    /// Copy the disks that are not on shared storage to the destination
    /// (QEMU's NBD server there, a block mirror here), whole.
    pub copy_storage_all: bool,
    /// As `copy_storage_all`, only the top image of each disk: its backing
    /// chain is on storage both hosts see.
    pub copy_storage_inc: bool,
    /// Which disks to copy (`vda`, ...) [default: every disk not shared].
    pub migrate_disks: Vec<String>,
    /// The port of the destination's NBD server [default: one from its
    /// migration port range, or any].
    pub disks_port: Option<u16>,
    /// Mirror guest writes synchronously from the start, so that a busy
    /// disk converges at the cost of its write latency.
    pub copy_storage_synchronous_writes: bool,
    /// How the stream is compressed (empty: XBZRLE with `compressed`, else
    /// none).
    pub comp_methods: Vec<CompMethod>,
    /// zlib's level, 0 to 9.
    pub comp_zlib_level: Option<u8>,
    /// zstd's level, 0 to 20.
    pub comp_zstd_level: Option<u8>,
    /// XBZRLE's cache, bytes.
    pub comp_xbzrle_cache: Option<u64>,
    /// Bandwidth cap once in post-copy, MiB/s (without it, `bandwidth`).
    pub postcopy_bandwidth: Option<u64>,
    /// The name the domain arrives under.
    pub dname: Option<String>,
    /// Send multifd pages without copying them (QEMU's `zero-copy-send`:
    /// the pages are locked in memory while they are sent).
    pub zerocopy: bool,
    /// With `tls`: the name the destination QEMU's certificate must carry
    /// [default: the host the destination agent was dialled at].
    pub tls_destination: Option<String>,
    /// The definition the destination runs the domain with (virsh's
    /// `--xml`): host-side settings may differ from the source's, what the
    /// guest sees may not.
    pub xml: Option<crate::domain::DefinitionDoc>,
    /// With `persistent`: the definition the destination keeps for the
    /// domain's next start (virsh's `--persistent-xml`), as `define` on a
    /// running domain would.
    pub persistent_xml: Option<crate::domain::DefinitionDoc>,
    /// The destination's own address its QEMU listens on for the memory
    /// stream (and the source dials) [default: the address the source
    /// reached its agent at].
    pub listen_address: Option<String>,
    /// Where the destination's NBD server for the copied disks listens,
    /// `tcp:ADDRESS:PORT` (one of its own addresses) [default: beside the
    /// memory stream].
    pub disks_uri: Option<String>,
}

/// RAM as QEMU is given it; both ends of a migration must agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RamLayout {
    /// Guest RAM in bytes.
    pub bytes: u64,
    /// Given as a memory backend object rather than plain `-m`.
    pub backend: bool,
}

/// How the source QEMU runs, which the destination must match.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchSpec {
    /// The concrete machine type.
    pub machine: String,
    /// The accelerator.
    pub accel: Accel,
    /// The RAM layout.
    pub ram: RamLayout,
}

/// What a source asks its destination before anything starts.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProbeRequest {
    /// The migration's options: the destination checks that its QEMU has
    /// what they need.
    pub flags: MigrateOptions,
    /// The source's concrete machine type, which the destination's QEMU
    /// must offer (absent for an offline migration).
    #[serde(default)]
    pub machine: Option<String>,
}

/// What a source sends a destination to prepare an incoming migration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PrepareRequest {
    /// The job's id, the same on both hosts.
    pub job_id: String,
    /// The guest's definition.
    pub definition: DefinitionDoc,
    /// Machine type and RAM layout the source QEMU runs with.
    pub spec: LaunchSpec,
    /// The migration's options.
    pub flags: MigrateOptions,
    /// The source agent's URI, for the record.
    pub source: String,
    /// The disks to copy: the destination creates their images and serves
    /// them writable over NBD.
    #[serde(default)]
    pub storage: Vec<StorageCopy>,
}

/// A disk the source copies to its destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageCopy {
    /// The guest's name for it (`vda`).
    pub target: String,
    /// Its virtual size, bytes: the new image's.
    pub virtual_size: u64,
    /// With `copy_storage_inc`: the backing file the new top image sits on
    /// (the same path on both hosts) and its format.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backing: Option<(String, String)>,
}
