//! A simulated VM: `livemig-simvm` takes the command line livemig gives
//! QEMU, serves the QMP livemig uses on the same socket, and runs a modelled
//! guest whose memory really moves to another simulated VM over a real
//! socket. An agent configured with the simulated hypervisor
//! (`livemigd --hypervisor simulated`) starts, adopts, migrates, pauses and
//! kills these processes exactly as it does QEMU, so tests whose subject is
//! the agent, the CLI or the protocol run without booting a guest under
//! TCG, and a fleet of hosts fits on one machine. A contract test
//! (`crates/testkit/tests/contract.rs`) holds it to real QEMU.
//!
//! - [`args`]: the part of QEMU's command line it reads.
//! - [`ram`], [`guest`]: guest memory (a word per page) and the test
//!   kernel's workload on it, with the kernel's serial output.
//! - [`machine`]: the shared state (run state, events).
//! - [`monitor`], `commands`: QMP.
//! - [`migration`]: QEMU 7.2's pre-copy, auto-converge, post-copy and
//!   cancel, over [`migration::wire`].
//! - [`probe`]: QEMU 7.2's answers to a capability probe, as recorded.
//! - [`block`]: the disks' nodes, the NBD server a destination exports
//!   them on and the mirror jobs a source copies them with
//!   (`--copy-storage-*`): a raw image's bytes really move, paced at the
//!   job's speed, and a lost destination fails the job as QEMU's does.
//!
//! What it does not model (tested with real QEMU only): the guest's own
//! disk I/O, the contents of a qcow2 image (a mirror of one counts its
//! virtual size but writes nothing), TLS on the migration and NBD streams (both ends must agree to
//! use it, but the stream is not encrypted), multifd channels and
//! compression (accepted, no effect), post-copy recovery, and vCPU threads
//! that burn CPU (host-side throttling).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod args;
pub mod block;
mod commands;
pub mod dirty_rate;
pub mod guest;
pub mod machine;
pub mod migration;
pub mod monitor;
pub mod probe;
pub mod ram;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use crate::guest::{Guest, Workload};
use crate::machine::{lock, Machine, RunState, Shared};

/// How often the vCPUs run.
const TICK: Duration = Duration::from_millis(10);

/// Why a simulated VM did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Its command line.
    #[error(transparent)]
    Args(#[from] args::ArgsError),
    /// A machine type QEMU 7.2 does not have.
    #[error("unsupported machine type '{0}'")]
    Machine(String),
    /// The monitor's socket or the serial log.
    #[error("{what}: {source}")]
    Io {
        /// What could not be opened.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Starts the VM `argv` describes and runs it until `quit`, a signal, or a
/// failed incoming migration ends the process.
///
/// # Errors
/// [`StartError`] when QEMU would not have started either.
pub async fn run(argv: &[String]) -> Result<(), StartError> {
    let config = args::parse(argv)?;
    if config.machine != "none" && probe::resolve_machine(&config.machine).is_none() {
        return Err(StartError::Machine(config.machine));
    }
    let serial_log = match &config.serial_log {
        Some(path) => {
            Some(
                tokio::fs::File::create(path)
                    .await
                    .map_err(|source| StartError::Io {
                        what: format!("could not open serial log {}", path.display()),
                        source,
                    })?,
            )
        }
        None => None,
    };
    let listener = monitor::bind(&config.qmp_socket).map_err(|source| StartError::Io {
        what: format!("Failed to bind socket {}", config.qmp_socket.display()),
        source,
    })?;
    let pages = (config.ram_bytes / ram::PAGE_SIZE) as usize;
    let guest = (config.machine != "none" && !config.incoming)
        .then(|| Guest::boot(Workload::from_cmdline(&config.cmdline, pages), seed()));
    let vcpus = config.vcpus;
    let shared: Shared = Arc::new(Mutex::new(Machine::new(config, guest)));
    lock(&shared).vcpu_threads = spawn_vcpu_threads(vcpus);
    tokio::spawn(monitor::serve(shared.clone(), listener));
    run_vcpus(shared, serial_log).await;
    Ok(())
}

/// Threads that stand for the vCPUs in `query-cpus-fast`: named as QEMU
/// names them, idle (the guest's work is modelled, not executed).
fn spawn_vcpu_threads(count: u32) -> Vec<i64> {
    (0..count)
        .filter_map(|i| {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::Builder::new()
                .name(format!("CPU {i}/TCG"))
                .spawn(move || {
                    let _ = tx.send(i64::from(nix::unistd::gettid().as_raw()));
                    loop {
                        std::thread::park();
                    }
                })
                .ok()?;
            rx.recv().ok()
        })
        .collect()
}

fn seed() -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    u64::from(now.subsec_nanos()) ^ (u64::from(std::process::id()) << 20)
}

/// Runs the guest in ticks while the VM runs, and writes what it prints.
async fn run_vcpus(shared: Shared, mut serial_log: Option<tokio::fs::File>) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        let now = tokio::time::Instant::now();
        let secs = (now - last).as_secs_f64();
        last = now;
        let output = {
            let mut m = lock(&shared);
            let m = &mut *m;
            m.dirty_rate.settle(&mut m.ram.rate_log);
            let throttle = m.throttle();
            if m.run_state == RunState::Running {
                if let Some(guest) = &mut m.guest {
                    let printed = guest.run(&mut m.ram, secs, throttle, m.missing.as_ref());
                    m.serial.push_str(&printed);
                }
            }
            std::mem::take(&mut m.serial)
        };
        if let (Some(log), false) = (&mut serial_log, output.is_empty()) {
            let _ = log.write_all(output.as_bytes()).await;
            let _ = log.flush().await;
        }
    }
}
