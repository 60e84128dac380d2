//! What a QEMU binary can do, found by asking it.
//!
//! Capabilities differ between versions (7.2 has no `dirty-limit`, 8.2 added
//! `avail-switchover-bandwidth`, ...), so they are probed at run time: start
//! the binary with `-machine none`, query it over QMP, quit.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use qmp::commands::migration::{
    MigrateSetParameters, MigrationParameters, QueryMigrateCapabilities, QueryMigrateParameters,
};
use qmp::commands::vm::{
    QueryCommandLineOptions, QueryCommands, QueryKvm, QueryMachines, QueryVersion,
};
use qmp::QemuVersion;
use serde::{Deserialize, Serialize};

use crate::definition::Accel;
use crate::qemu::layout;
use crate::qemu::process::{ProcessError, VmProcess};

/// A machine type and the alias pointing at it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Machine {
    /// The concrete type.
    pub name: String,
    #[serde(default)]
    /// The alias pointing at it.
    pub alias: Option<String>,
}

/// The probed facts about one QEMU binary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuBinary {
    /// The binary.
    pub path: PathBuf,
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
    pub machines: Vec<Machine>,
    /// KVM is available.
    pub kvm_present: bool,
    /// Command-line option groups it has (`sandbox`, `run-with`, ...).
    #[serde(default)]
    pub command_line_options: BTreeSet<String>,
    /// The values its `multifd-compression` takes (`none`, `zlib`, `zstd`:
    /// the compressions it was built with). No default: a probe cached
    /// before this was probed is made again.
    pub multifd_compressions: BTreeSet<String>,
    /// Setting `multifd-zlib-level`/`multifd-zstd-level` changes them
    /// (QEMU 7.2 takes both and keeps level 1).
    pub multifd_levels_apply: bool,
}

#[derive(Debug, thiserror::Error)]
/// Why a binary could not be probed.
pub enum ProbeError {
    #[error("cannot create a scratch directory to probe {binary}")]
    /// No scratch directory for the probe.
    Scratch {
        /// The binary.
        binary: PathBuf,
        #[source]
        /// Why.
        source: std::io::Error,
    },
    #[error("cannot start {binary}")]
    /// The binary would not start.
    Start {
        /// The binary.
        binary: PathBuf,
        #[source]
        /// Why.
        source: ProcessError,
    },
    #[error("{binary} did not answer a QMP query")]
    /// It started but did not answer.
    Query {
        /// The binary.
        binary: PathBuf,
        #[source]
        /// Why.
        source: qmp::Error,
    },
}

impl QemuBinary {
    /// It knows the migration capability `name`.
    pub fn has_capability(&self, name: &str) -> bool {
        self.migration_capabilities.contains(name)
    }

    /// It knows the migration parameter `name`.
    pub fn has_parameter(&self, name: &str) -> bool {
        self.migration_parameters.contains(name)
    }

    /// It knows the QMP command `name`.
    pub fn has_command(&self, name: &str) -> bool {
        self.commands.contains(name)
    }

    /// The concrete machine type for `name` (an alias such as `pc` or a
    /// concrete name), or `None` if this binary does not have it.
    pub fn resolve_machine(&self, name: &str) -> Option<String> {
        self.machines
            .iter()
            .find(|m| m.alias.as_deref() == Some(name))
            .or_else(|| self.machines.iter().find(|m| m.name == name))
            .map(|m| m.name.clone())
    }

    /// The binary was built with seccomp (`-sandbox`).
    pub fn has_sandbox(&self) -> bool {
        self.command_line_options.contains("sandbox")
    }

    /// The binary takes `-run-with user=` (9.1+) rather than `-runas`.
    pub fn has_run_with(&self) -> bool {
        self.command_line_options.contains("run-with")
    }

    /// True when migrating a guest under `accel` on this binary needs the
    /// RAM-layout workaround (see [`layout`]).
    pub fn has_tcg_dirty_bitmap_bug(&self, accel: Accel) -> bool {
        layout::tcg_dirty_bitmap_bug(accel, self.version)
    }
}

/// What a probe's scratch directory is named after.
const SCRATCH_PREFIX: &str = "livemig-probe-";

/// Probes `binary` by starting it with `-machine none`, with its scratch
/// directory in the system's temporary directory.
///
/// # Errors
/// As [`probe_within`].
pub async fn probe(binary: &Path, timeout: Duration) -> Result<QemuBinary, ProbeError> {
    probe_within(binary, &std::env::temp_dir(), timeout).await
}

/// Probes `binary` by starting it with `-machine none`, with its scratch
/// directory (its QMP socket and log) in `parent`: an agent's state
/// directory, where [`clear_stale_probes`] finds what a killed agent left.
///
/// # Errors
/// [`ProbeError::Start`] when the binary cannot run, [`ProbeError::Query`]
/// when it does not answer.
pub async fn probe_within(
    binary: &Path,
    parent: &Path,
    timeout: Duration,
) -> Result<QemuBinary, ProbeError> {
    // A fresh, private, unpredictable directory: nobody else can plant a
    // socket or a link where the probe's QEMU will create its own.
    let scratch = tempfile::Builder::new()
        .prefix(SCRATCH_PREFIX)
        .tempdir_in(parent)
        .map_err(|source| ProbeError::Scratch {
            binary: binary.to_path_buf(),
            source,
        })?;
    probe_in(binary, scratch.path(), timeout).await
}

/// Removes the scratch directories of probes made in `parent` by an agent
/// that died before it could (a SIGKILL skips every destructor), first
/// asking over its socket any probe QEMU still running there to quit: it
/// would otherwise run, orphaned, until the host reboots. Returns how many
/// it removed.
pub async fn clear_stale_probes(parent: &Path, timeout: Duration) -> usize {
    let Ok(mut entries) = tokio::fs::read_dir(parent).await else {
        return 0;
    };
    let mut cleared = 0;
    while let Ok(Some(entry)) = entries.next_entry().await {
        if !entry
            .file_name()
            .to_string_lossy()
            .starts_with(SCRATCH_PREFIX)
        {
            continue;
        }
        let scratch = entry.path();
        if let Ok(qmp) = qmp::Client::connect(&scratch.join("qmp.sock"), timeout).await {
            let quit = qmp
                .execute_with_timeout(&qmp::commands::vm::Quit, timeout)
                .await;
            tracing::info!(scratch = %scratch.display(), answered = quit.is_ok(), "a probe's QEMU outlived its agent; asked it to quit");
        }
        if tokio::fs::remove_dir_all(&scratch).await.is_ok() {
            cleared += 1;
        }
    }
    cleared
}

async fn probe_in(
    binary: &Path,
    scratch: &Path,
    timeout: Duration,
) -> Result<QemuBinary, ProbeError> {
    let socket = scratch.join("qmp.sock");
    let log = scratch.join("qemu.log");
    let argv: Vec<String> = [
        "-machine",
        "none",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-chardev",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        format!(
            "socket,id=qmp,path={},server=on,wait=off",
            crate::qemu::argv::escape_option_value(&socket.to_string_lossy())
        ),
        "-mon".into(),
        "chardev=qmp,mode=control".into(),
    ])
    .collect();
    let process = VmProcess::spawn(binary, &argv, &socket, &log, timeout)
        .await
        .map_err(|source| ProbeError::Start {
            binary: binary.to_path_buf(),
            source,
        })?;
    let qmp = process.qmp();
    let query_error = |source| ProbeError::Query {
        binary: binary.to_path_buf(),
        source,
    };
    let version = qmp.execute(&QueryVersion).await.map_err(query_error)?;
    let caps = qmp
        .execute(&QueryMigrateCapabilities)
        .await
        .map_err(query_error)?;
    let params = qmp
        .execute(&QueryMigrateParameters)
        .await
        .map_err(query_error)?;
    let commands = qmp.execute(&QueryCommands).await.map_err(query_error)?;
    let machines = qmp.execute(&QueryMachines).await.map_err(query_error)?;
    let kvm = qmp.execute(&QueryKvm).await.map_err(query_error)?;
    let (multifd_compressions, multifd_levels_apply) = probe_multifd_compression(qmp).await;
    // A binary that cannot list its options gets none of the optional
    // hardening rather than no guests at all.
    let options = qmp
        .execute(&QueryCommandLineOptions)
        .await
        .unwrap_or_default();
    process.shutdown(timeout).await;

    Ok(QemuBinary {
        path: binary.to_path_buf(),
        version: version.qemu,
        package: version.package,
        migration_capabilities: caps
            .into_iter()
            .map(|c| c.capability.as_str().to_string())
            .collect(),
        migration_parameters: params.names().into_iter().collect(),
        commands: commands.into_iter().map(|c| c.name).collect(),
        machines: machines
            .into_iter()
            .map(|m| Machine {
                name: m.name,
                alias: m.alias,
            })
            .collect(),
        kvm_present: kvm.present,
        command_line_options: options.into_iter().map(|o| o.option).collect(),
        multifd_compressions,
        multifd_levels_apply,
    })
}

/// Which multifd compressions the binary was built with (a value it lacks
/// is refused by `migrate-set-parameters`), and whether a compression
/// level set is the level read back. The probe's QEMU is thrown away
/// after, so nothing needs putting back.
async fn probe_multifd_compression(qmp: &qmp::Client) -> (BTreeSet<String>, bool) {
    let mut methods = BTreeSet::new();
    for method in ["none", "zlib", "zstd"] {
        let set = MigrateSetParameters(MigrationParameters {
            multifd_compression: Some(method.to_string()),
            ..Default::default()
        });
        if qmp.execute(&set).await.is_ok() {
            methods.insert(method.to_string());
        }
    }
    let set = MigrateSetParameters(MigrationParameters {
        multifd_zlib_level: Some(2),
        multifd_zstd_level: Some(2),
        ..Default::default()
    });
    let applies = match qmp.execute(&set).await {
        Ok(_) => qmp
            .execute(&QueryMigrateParameters)
            .await
            .is_ok_and(|p| p.multifd_zlib_level == Some(2) && p.multifd_zstd_level == Some(2)),
        Err(_) => false,
    };
    (methods, applies)
}
