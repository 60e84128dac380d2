//! Running domains under QEMU.

pub mod argv;
pub mod binary;
pub mod fingerprint;
pub mod img;
pub mod layout;
pub mod memlock;
pub mod process;
pub mod resident;
pub mod sockets;

pub use argv::{build_argv, Hardening, LaunchConfig, LaunchSpec};
pub use binary::{clear_stale_probes, probe, probe_within, ProbeError, QemuBinary};
pub use layout::RamLayout;
pub use process::{ExitInfo, ProcessError, VmProcess, STOP_TIMEOUT};
pub use resident::{guest_ram_resident, ResidentError};
