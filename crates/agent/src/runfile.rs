//! What the agent runs, on disk, so a restarted agent can take it over.
//!
//! `STATE_DIR/run/NAME.json` exists while a domain's QEMU runs: its pid,
//! sockets, logs, launch spec and running definition, and the migration job
//! it is part of, if any. It is written atomically at start, whenever a job
//! starts or ends, and removed when QEMU exits.

use std::path::PathBuf;

use domain::qemu::LaunchSpec;
use domain::{DomainDefinition, DomainName};
use protocol::MigrateOptions;
use qmp::QemuVersion;
use serde::{Deserialize, Serialize};

/// A migration this domain is part of.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct RunJob {
    pub id: String,
    /// The other agent's URI.
    pub peer: String,
    /// The job's options (validated again when read back).
    pub flags: MigrateOptions,
    pub started_at_ms: u64,
    /// Destination only: the domain did not exist here before.
    #[serde(default)]
    pub created_domain: bool,
    /// Destination only: images created for copied disks, removed if the
    /// guest does not land.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub created_images: Vec<PathBuf>,
    /// The other host's certificate name: the destination's for a job
    /// sent, the agent's that prepared it for one received (which alone
    /// may finish or abort it after a restart).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_name: Option<String>,
}

/// One running QEMU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct RunRecord {
    pub name: DomainName,
    pub pid: u32,
    pub run_id: u64,
    pub qmp_socket: PathBuf,
    pub serial_log: PathBuf,
    pub qemu_log: PathBuf,
    pub spec: LaunchSpec,
    pub qemu_version: QemuVersion,
    /// The definition it runs with.
    pub definition: DomainDefinition,
    /// Sending this domain away.
    #[serde(default)]
    pub outgoing: Option<RunJob>,
    /// Receiving this domain.
    #[serde(default)]
    pub incoming: Option<RunJob>,
}
