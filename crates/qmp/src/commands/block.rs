//! Block devices, block jobs and the NBD server: what copying a disk to
//! another host takes (`blockdev-mirror` into an NBD export there).

use serde::{Deserialize, Serialize};

use super::unit_command;
use crate::command::{Command, Empty};

unit_command!(
    /// `query-block`: the guest's block devices.
    QueryBlock,
    "query-block",
    Vec<BlockInfo>
);
unit_command!(
    /// `query-block-jobs`: the running block jobs.
    QueryBlockJobs,
    "query-block-jobs",
    Vec<BlockJobInfo>
);
unit_command!(
    /// `query-blockstats`: I/O counters of the guest's block devices.
    QueryBlockstats,
    "query-blockstats",
    Vec<BlockStats>
);
unit_command!(
    /// `nbd-server-stop`: stops the NBD server and removes its exports.
    NbdServerStop,
    "nbd-server-stop",
    Empty
);

/// One block device of `query-blockstats`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockStats {
    /// The block backend's name (the `-drive` id); empty for a node.
    #[serde(default)]
    pub device: String,
    /// Its counters.
    pub stats: BlockDeviceStats,
}

/// The counters of one block device (the ones livemig reads).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
pub struct BlockDeviceStats {
    /// Bytes the guest wrote since QEMU started.
    pub wr_bytes: u64,
    /// Bytes the guest read since QEMU started.
    pub rd_bytes: u64,
}

/// One block device of `query-block`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockInfo {
    /// The block backend's name (the `-drive` id).
    pub device: String,
    /// The medium, if any.
    pub inserted: Option<BlockDeviceInfo>,
}

/// The medium of a block device.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockDeviceInfo {
    /// The top node's name.
    pub node_name: Option<String>,
    /// The image file.
    pub file: String,
    /// What the image says of itself.
    pub image: ImageInfo,
}

/// An image's own description.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageInfo {
    /// Its format (`qcow2`, `raw`).
    pub format: String,
    /// The size the guest sees, bytes.
    pub virtual_size: u64,
    /// The backing file, as the image names it.
    pub backing_filename: Option<String>,
    /// The backing file resolved against the image's directory.
    pub full_backing_filename: Option<String>,
    /// The backing file's format, if the image records it.
    pub backing_filename_format: Option<String>,
}

/// One job of `query-block-jobs`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockJobInfo {
    /// The job's id.
    pub device: String,
    /// Bytes to copy in all (grows as the guest writes).
    pub len: u64,
    /// Bytes copied.
    pub offset: u64,
    /// Source and target are in sync; writes are mirrored from now on.
    pub ready: bool,
    /// `running`, `ready`, `concluded`, ...
    pub status: Option<String>,
    /// Why it failed, once concluded with an error.
    pub error: Option<String>,
}

/// A TCP address in QMP's `SocketAddress` form.
#[derive(Debug, Clone, Serialize)]
pub struct InetAddress {
    /// Always `inet`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Host name or address.
    pub host: String,
    /// Port, as a string (QEMU's form).
    pub port: String,
}

impl InetAddress {
    /// `host:port`.
    pub fn new(host: &str, port: u16) -> Self {
        InetAddress {
            kind: "inet",
            host: host.to_string(),
            port: port.to_string(),
        }
    }
}

/// A TCP address in QMP's older `SocketAddressLegacy` form (`type` and
/// `data`), which `nbd-server-start` takes.
#[derive(Debug, Clone, Serialize)]
pub struct LegacyInetAddress {
    /// Always `inet`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The address.
    pub data: LegacyInetData,
}

/// The `data` of a [`LegacyInetAddress`].
#[derive(Debug, Clone, Serialize)]
pub struct LegacyInetData {
    /// Host name or address.
    pub host: String,
    /// Port, as a string (`0`: any free port).
    pub port: String,
    /// With it, QEMU binds the first free port from `port` to this one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub to: Option<u16>,
}

impl LegacyInetAddress {
    /// `host:port`.
    pub fn new(host: &str, port: u16) -> Self {
        Self::range(host, port, None)
    }

    /// `host`, the first free port from `port` to `to` (QEMU binds it).
    pub fn range(host: &str, port: u16, to: Option<u16>) -> Self {
        LegacyInetAddress {
            kind: "inet",
            data: LegacyInetData {
                host: host.to_string(),
                port: port.to_string(),
                to,
            },
        }
    }
}

/// `nbd-server-start`: serve block nodes over NBD on `addr`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct NbdServerStart {
    /// Where to listen.
    pub addr: LegacyInetAddress,
    /// TLS credentials object (server endpoint) clients must use.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_creds: Option<String>,
    /// Authorization object naming the client certificates admitted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_authz: Option<String>,
}

impl Command for NbdServerStart {
    const NAME: &'static str = "nbd-server-start";
    type Reply = Empty;
}

/// `block-export-add` of an NBD export.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockExportAddNbd {
    /// Always `nbd`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The export's id.
    pub id: String,
    /// The node exported.
    pub node_name: String,
    /// The export's name clients ask for.
    pub name: String,
    /// Clients may write.
    pub writable: bool,
}

impl Command for BlockExportAddNbd {
    const NAME: &'static str = "block-export-add";
    type Reply = Empty;
}

/// `blockdev-add` of an NBD client node.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevAddNbd {
    /// Always `nbd`.
    pub driver: &'static str,
    /// The new node's name.
    pub node_name: String,
    /// The NBD server.
    pub server: InetAddress,
    /// The export to open.
    pub export: String,
    /// TLS credentials object (client endpoint).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_creds: Option<String>,
    /// The name the server's certificate must carry.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_hostname: Option<String>,
}

impl Command for BlockdevAddNbd {
    const NAME: &'static str = "blockdev-add";
    type Reply = Empty;
}

/// `blockdev-del`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevDel {
    /// The node to remove.
    pub node_name: String,
}

impl Command for BlockdevDel {
    const NAME: &'static str = "blockdev-del";
    type Reply = Empty;
}

/// How much of a disk a mirror copies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MirrorSync {
    /// The whole disk, backing chain included.
    Full,
    /// The top image only.
    Top,
}

/// When a mirror copies a guest write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CopyMode {
    /// Later, in the background: the guest's writes are not slowed.
    Background,
    /// Before the write completes: the target never falls behind.
    WriteBlocking,
}

/// `blockdev-mirror`: copy node `device` to node `target`, then keep
/// mirroring its writes until the job is completed or cancelled.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockdevMirror {
    /// The job's id.
    pub job_id: String,
    /// The source node.
    pub device: String,
    /// The target node.
    pub target: String,
    /// How much to copy.
    pub sync: MirrorSync,
    /// When guest writes are copied.
    pub copy_mode: CopyMode,
    /// The job stays until dismissed, so its end can be read.
    pub auto_dismiss: bool,
    /// Copy rate cap, bytes/s.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub speed: Option<u64>,
    /// Most bytes in flight at once (QEMU's default: 16 MiB).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub buf_size: Option<u64>,
}

impl Command for BlockdevMirror {
    const NAME: &'static str = "blockdev-mirror";
    type Reply = Empty;
}

/// `block-job-change` (QEMU 8.2+) for a mirror: a new copy mode.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockJobChangeMirror {
    /// The job's id.
    pub id: String,
    /// Always `mirror`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The copy mode from now on.
    pub copy_mode: CopyMode,
}

impl BlockJobChangeMirror {
    /// Makes the mirror `id` copy every guest write before completing it.
    pub fn write_blocking(id: &str) -> Self {
        BlockJobChangeMirror {
            id: id.to_string(),
            kind: "mirror",
            copy_mode: CopyMode::WriteBlocking,
        }
    }
}

impl Command for BlockJobChangeMirror {
    const NAME: &'static str = "block-job-change";
    type Reply = Empty;
}

/// `block-job-cancel`: on a ready mirror without `force`, completes it
/// leaving the target a point-in-time copy; with `force`, abandons it.
#[derive(Debug, Clone, Serialize)]
pub struct BlockJobCancel {
    /// The job's id.
    pub device: String,
    /// Abandon at once, even a ready mirror.
    pub force: bool,
}

impl Command for BlockJobCancel {
    const NAME: &'static str = "block-job-cancel";
    type Reply = Empty;
}

/// `block-job-set-speed`: a running block job's rate cap.
#[derive(Debug, Clone, Serialize)]
pub struct BlockJobSetSpeed {
    /// The job's id.
    pub device: String,
    /// Bytes per second (0: no cap).
    pub speed: u64,
}

impl Command for BlockJobSetSpeed {
    const NAME: &'static str = "block-job-set-speed";
    type Reply = Empty;
}

/// `job-dismiss`: removes a concluded job.
#[derive(Debug, Clone, Serialize)]
pub struct JobDismiss {
    /// The job's id.
    pub id: String,
}

impl Command for JobDismiss {
    const NAME: &'static str = "job-dismiss";
    type Reply = Empty;
}
