//! The simulated VM's state, shared by the monitor, the vCPUs and the
//! migration tasks: one `std` mutex, never held across an `.await`.

use std::sync::{Arc, Mutex, MutexGuard};

use serde_json::{json, Value};
use tokio::sync::broadcast;

use crate::args::Config;
use crate::block::Block;
use crate::dirty_rate::DirtyRate;
use crate::guest::Guest;
use crate::migration::Migration;
use crate::ram::{PageSet, Ram};

/// QEMU's run states, as `query-status` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// vCPUs run.
    Running,
    /// Stopped by `stop` (or never started, after an incoming migration).
    Paused,
    /// Started with `-S`, never run.
    Prelaunch,
    /// Waiting for an incoming migration.
    Inmigrate,
    /// Stopped for the switchover.
    FinishMigrate,
    /// Its state was migrated away.
    Postmigrate,
}

impl RunState {
    /// QEMU's name.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Prelaunch => "prelaunch",
            RunState::Inmigrate => "inmigrate",
            RunState::FinishMigrate => "finish-migrate",
            RunState::Postmigrate => "postmigrate",
        }
    }
}

/// Everything the simulated VM is.
#[derive(Debug)]
pub struct Machine {
    /// Its command line.
    pub config: Config,
    /// Its run state.
    pub run_state: RunState,
    /// Run the vCPUs once an incoming migration has landed (no `-S`).
    pub autostart: bool,
    /// Guest memory.
    pub ram: Ram,
    /// The guest; `None` for a probe, and on a destination until the
    /// migration brings it.
    pub guest: Option<Guest>,
    /// Pages a post-copy destination is still waiting for.
    pub missing: Option<PageSet>,
    /// Serial output not yet written to the log.
    pub serial: String,
    /// Migration state and settings.
    pub migration: Migration,
    /// `calc-dirty-rate`.
    pub dirty_rate: DirtyRate,
    /// Thread ids of the vCPU threads.
    pub vcpu_threads: Vec<i64>,
    /// `object-add`ed objects by id: type and properties.
    pub objects: Vec<(String, String)>,
    /// NBD server, NBD nodes, block jobs.
    pub block: Block,
    events: broadcast::Sender<String>,
}

/// The machine, shared.
pub type Shared = Arc<Mutex<Machine>>;

/// Locks the machine.
pub fn lock(shared: &Shared) -> MutexGuard<'_, Machine> {
    shared
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Machine {
    /// A machine as `config` starts it.
    pub fn new(config: Config, guest: Option<Guest>) -> Machine {
        let run_state = if config.incoming {
            RunState::Inmigrate
        } else if config.paused {
            RunState::Prelaunch
        } else {
            RunState::Running
        };
        let (events, _) = broadcast::channel(1024);
        let mut serial = String::new();
        if let Some(guest) = &guest {
            serial.push_str(&guest.start_line());
        }
        let objects = config
            .objects
            .iter()
            .map(|(id, (kind, _))| (id.clone(), kind.clone()))
            .collect();
        Machine {
            ram: Ram::new(config.ram_bytes),
            autostart: !config.paused,
            run_state,
            guest,
            missing: None,
            serial,
            migration: Migration::default(),
            dirty_rate: DirtyRate::default(),
            vcpu_threads: Vec::new(),
            objects,
            block: Block::default(),
            events,
            config,
        }
    }

    /// Events go to every negotiated monitor connection.
    pub fn subscribe(&self) -> broadcast::Receiver<String> {
        self.events.subscribe()
    }

    /// Sends an event.
    pub fn emit(&self, name: &str, data: Option<Value>) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let mut event = json!({
            "event": name,
            "timestamp": {"seconds": now.as_secs(), "microseconds": now.subsec_micros()},
        });
        if let Some(data) = data {
            event["data"] = data;
        }
        let _ = self.events.send(event.to_string());
    }

    /// True when the `events` capability is on (MIGRATION and
    /// MIGRATION_PASS need it).
    pub fn migration_events(&self) -> bool {
        self.migration.capability("events")
    }

    /// Stops the vCPUs (`STOP`), moving to `state`.
    pub fn stop(&mut self, state: RunState) {
        let was_running = self.run_state == RunState::Running;
        self.run_state = state;
        if was_running {
            self.emit("STOP", None);
        }
    }

    /// Starts the vCPUs (`RESUME`).
    pub fn resume(&mut self) {
        if self.run_state != RunState::Running {
            self.run_state = RunState::Running;
            self.emit("RESUME", None);
        }
    }

    /// The throttle QEMU's auto-converge holds the vCPUs at, 0 to 1.
    pub fn throttle(&self) -> f64 {
        self.migration.throttle_pct as f64 / 100.0
    }
}
