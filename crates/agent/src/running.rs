//! A domain's running VM, as the table holds it.

use std::path::PathBuf;

use domain::qemu::{LaunchSpec, VmProcess};
use qmp::QemuVersion;

/// A domain's running VM (QEMU, or a simulated one).
#[derive(Debug)]
pub(crate) struct RunningVm {
    /// Shown by `list` as the domain's Id.
    pub run_id: u64,
    pub process: VmProcess,
    pub spec: LaunchSpec,
    pub qmp_socket: PathBuf,
    pub serial_log: PathBuf,
    pub qemu_log: PathBuf,
    pub qemu_version: QemuVersion,
    /// The taps of its bridged NICs, removed when it exits.
    pub taps: crate::taps::Taps,
    /// Its last dirty-rate measurement.
    pub measurements: crate::measurements::Kept,
}
