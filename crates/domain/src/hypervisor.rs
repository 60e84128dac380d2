//! The seam between an agent and what runs its guests.
//!
//! An agent asks four things of a VM process: start it from a command line
//! (built by [`crate::qemu::build_argv`] for either kind), take it over
//! after a restart, probe the program's capabilities, and tell how much of
//! the guest's RAM is in use. Everything else goes over the QMP connection
//! of the [`VmProcess`] it gets back, and the process's pid, exit and vCPU
//! threads come with it.
//!
//! - [`Qemu`]: the real thing.
//! - [`Simulated`]: `livemig-simvm` (crate `simvm`), a process that takes
//!   QEMU's command line and speaks its QMP, with a modelled guest whose
//!   memory migrates over a real socket. Its vCPU threads do not run the
//!   guest, so it is never throttled from the host (QEMU's own throttle,
//!   which it models, is used instead), and it reports the RAM in use over
//!   QMP rather than through a memory mapping.

use std::fmt;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::qemu::{ProbeError, ProcessError, QemuBinary, ResidentError, VmProcess};

/// A boxed future, so [`Hypervisor`] stays object safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Which hypervisor an agent runs its guests on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HypervisorKind {
    /// QEMU.
    #[default]
    Qemu,
    /// Simulated VMs (`livemig-simvm`).
    Simulated,
}

impl HypervisorKind {
    /// Its name in configuration and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            HypervisorKind::Qemu => "qemu",
            HypervisorKind::Simulated => "simulated",
        }
    }

    /// The program it runs when none is configured.
    pub fn default_program(self) -> PathBuf {
        match self {
            HypervisorKind::Qemu => PathBuf::from("qemu-system-x86_64"),
            // Installed beside the agent.
            HypervisorKind::Simulated => std::env::current_exe()
                .ok()
                .and_then(|exe| exe.parent().map(|d| d.join(SIMULATED_PROGRAM)))
                .filter(|p| p.exists())
                .unwrap_or_else(|| PathBuf::from(SIMULATED_PROGRAM)),
        }
    }

    /// The hypervisor of this kind running `program`.
    pub fn with_program(self, program: PathBuf) -> Box<dyn Hypervisor> {
        match self {
            HypervisorKind::Qemu => Box::new(Qemu { program }),
            HypervisorKind::Simulated => Box::new(Simulated { program }),
        }
    }
}

impl fmt::Display for HypervisorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for HypervisorKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "qemu" => Ok(HypervisorKind::Qemu),
            "simulated" => Ok(HypervisorKind::Simulated),
            other => Err(format!("unknown hypervisor '{other}' (qemu or simulated)")),
        }
    }
}

/// The simulated VM's program name.
pub const SIMULATED_PROGRAM: &str = "livemig-simvm";

/// What runs an agent's guests.
pub trait Hypervisor: Send + Sync + fmt::Debug {
    /// Which one it is.
    fn kind(&self) -> HypervisorKind;

    /// The program it runs.
    fn program(&self) -> &Path;

    /// Starts `program argv...` and connects to its QMP socket.
    ///
    /// # Errors
    /// [`ProcessError`] with the program's own words when it refuses to
    /// start.
    fn spawn<'a>(
        &'a self,
        argv: &'a [String],
        qmp_socket: &'a Path,
        log: &'a Path,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<VmProcess, ProcessError>> {
        Box::pin(VmProcess::spawn(
            self.program(),
            argv,
            qmp_socket,
            log,
            timeout,
        ))
    }

    /// Takes over a VM an earlier agent process started.
    ///
    /// # Errors
    /// [`ProcessError::Adopt`] when it is gone or does not answer.
    fn adopt<'a>(
        &'a self,
        pid: u32,
        qmp_socket: &'a Path,
        log: &'a Path,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<VmProcess, ProcessError>> {
        Box::pin(VmProcess::adopt(pid, qmp_socket, log, timeout))
    }

    /// The program's capabilities (`-machine none` and QMP queries), its
    /// scratch directory in `parent`.
    ///
    /// # Errors
    /// [`ProbeError`] when it does not start or answer.
    fn probe<'a>(
        &'a self,
        parent: &'a Path,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<QemuBinary, ProbeError>> {
        Box::pin(crate::qemu::probe_within(self.program(), parent, timeout))
    }

    /// Bytes of the guest's `ram_bytes` of RAM that hold anything.
    ///
    /// # Errors
    /// [`ResidentError`] when it cannot be told.
    fn ram_in_use<'a>(
        &'a self,
        vm: &'a VmProcess,
        ram_bytes: u64,
    ) -> BoxFuture<'a, Result<u64, ResidentError>>;

    /// Its vCPU threads run the guest, so a CPU quota on them throttles it.
    fn host_throttle(&self) -> bool;
}

/// QEMU.
#[derive(Debug, Clone)]
pub struct Qemu {
    /// `qemu-system-x86_64`, or another path.
    pub program: PathBuf,
}

impl Hypervisor for Qemu {
    fn kind(&self) -> HypervisorKind {
        HypervisorKind::Qemu
    }

    fn program(&self) -> &Path {
        &self.program
    }

    fn ram_in_use<'a>(
        &'a self,
        vm: &'a VmProcess,
        ram_bytes: u64,
    ) -> BoxFuture<'a, Result<u64, ResidentError>> {
        Box::pin(crate::qemu::guest_ram_resident(vm.pid(), ram_bytes))
    }

    fn host_throttle(&self) -> bool {
        true
    }
}

/// Simulated VMs.
#[derive(Debug, Clone)]
pub struct Simulated {
    /// `livemig-simvm`, or another path.
    pub program: PathBuf,
}

/// `x-livemig-query-ram`: the simulated guest's RAM in use.
#[derive(Debug, Clone, Copy, Serialize)]
struct QueryRamInUse;

/// Its reply.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "kebab-case")]
struct RamInUse {
    in_use: u64,
}

impl qmp::Command for QueryRamInUse {
    const NAME: &'static str = "x-livemig-query-ram";
    type Reply = RamInUse;
}

impl Hypervisor for Simulated {
    fn kind(&self) -> HypervisorKind {
        HypervisorKind::Simulated
    }

    fn program(&self) -> &Path {
        &self.program
    }

    fn ram_in_use<'a>(
        &'a self,
        vm: &'a VmProcess,
        ram_bytes: u64,
    ) -> BoxFuture<'a, Result<u64, ResidentError>> {
        Box::pin(async move {
            match vm.qmp().execute(&QueryRamInUse).await {
                Ok(ram) => Ok(ram.in_use),
                Err(e) => Err(ResidentError::Query {
                    pid: vm.pid(),
                    ram_bytes,
                    reason: e.to_string(),
                }),
            }
        })
    }

    fn host_throttle(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_read_and_print_their_names() {
        for kind in [HypervisorKind::Qemu, HypervisorKind::Simulated] {
            assert_eq!(kind.as_str().parse::<HypervisorKind>(), Ok(kind));
        }
        assert!("xen"
            .parse::<HypervisorKind>()
            .unwrap_err()
            .contains("qemu or simulated"));
        let sim = HypervisorKind::Simulated.with_program("/x/livemig-simvm".into());
        assert!(!sim.host_throttle());
        assert_eq!(sim.program(), Path::new("/x/livemig-simvm"));
        assert!(HypervisorKind::Qemu
            .with_program("q".into())
            .host_throttle());
    }
}
