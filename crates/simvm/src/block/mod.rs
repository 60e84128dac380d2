//! Copying a disk to another host, as QEMU 7.2 does it for livemig: the
//! destination serves its new images over NBD (`nbd-server-start`,
//! `block-export-add`), the source opens them as nodes (`blockdev-add`)
//! and mirrors each disk into one (`blockdev-mirror`) until the job is
//! ready, then completes or abandons it (`block-job-cancel`).
//!
//! The bytes really travel over a TCP socket between the two simulated
//! VMs, paced at the job's `speed`, so a copy takes time, reports
//! progress, and fails as QEMU's does when the link or the destination
//! goes away. A raw image's bytes are carried and written; for other
//! formats only the byte count is (the simulation does not read qcow2).
//! The simulated guest does no disk I/O, so a ready mirror stays ready.
//!
//! - `server`: the destination's NBD server and its exports.
//! - `mirror`: the source's NBD nodes and mirror jobs.
//! - [`wire`]: the stream between them.

pub mod mirror;
pub mod server;
pub mod wire;

use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::task::AbortHandle;

/// The block layer's state beyond the `-drive`s.
#[derive(Debug, Default)]
pub struct Block {
    /// The NBD server, while it runs.
    pub server: Option<server::NbdServer>,
    /// NBD client nodes (`blockdev-add`).
    pub nodes: Vec<NbdNode>,
    /// Block jobs, until dismissed.
    pub jobs: Vec<MirrorJob>,
}

/// An NBD client node: an open export on another host.
#[derive(Debug)]
pub struct NbdNode {
    /// `node-name`.
    pub name: String,
    /// The export's size, bytes.
    pub size: u64,
    /// The connection (a job writing through it holds it meanwhile).
    pub stream: Arc<tokio::sync::Mutex<TcpStream>>,
}

/// A block job's status, as `query-block-jobs` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobStatus {
    /// Copying.
    Running,
    /// In sync: writes are mirrored until the job is completed.
    Ready,
    /// Over (completed, cancelled or failed); stays until dismissed.
    Concluded,
}

impl JobStatus {
    /// QEMU's name.
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Running => "running",
            JobStatus::Ready => "ready",
            JobStatus::Concluded => "concluded",
        }
    }
}

/// A mirror job.
#[derive(Debug)]
pub struct MirrorJob {
    /// `job-id`.
    pub id: String,
    /// The target node.
    pub target: String,
    /// Bytes to copy.
    pub len: u64,
    /// Bytes copied.
    pub offset: u64,
    /// Rate cap, bytes/s (0: none).
    pub speed: u64,
    /// Its status.
    pub status: JobStatus,
    /// Why it failed.
    pub error: Option<String>,
    /// Removed once concluded, without `job-dismiss`.
    pub auto_dismiss: bool,
    /// The task copying; `None` once it is done.
    pub task: Option<AbortHandle>,
}

impl MirrorJob {
    /// The job as `query-block-jobs` lists it.
    pub fn info(&self) -> serde_json::Value {
        let mut info = serde_json::json!({
            "type": "mirror",
            "device": self.id,
            "len": self.len,
            "offset": self.offset,
            "busy": self.status == JobStatus::Running,
            "paused": false,
            "speed": self.speed,
            "io-status": "ok",
            "ready": self.status == JobStatus::Ready,
            "status": self.status.as_str(),
            "auto-finalize": true,
            "auto-dismiss": self.auto_dismiss,
        });
        if let Some(error) = &self.error {
            info["error"] = serde_json::json!(error);
        }
        info
    }

    /// What the job's events carry.
    pub fn event_data(&self) -> serde_json::Value {
        serde_json::json!({
            "type": "mirror",
            "device": self.id,
            "len": self.len,
            "offset": self.offset,
            "speed": self.speed,
        })
    }
}
