//! A scripted QEMU monitor, for fast tests of the code that drives QEMU.
//!
//! [`ScriptedQemu`] answers a [`Client`] over an in-memory stream the way
//! QEMU's monitor would, from a small model of a migration: a status, RAM
//! figures, capabilities, parameters and a run state. The test moves the
//! migration along ([`ScriptedQemu::pass`], [`ScriptedQemu::complete`],
//! [`ScriptedQemu::fail`], ...) and can replace any command's answer with a
//! hook ([`ScriptedQemu::on`]) to script a race or a refusal. Every command
//! received is logged, so a test can check what was asked of QEMU.
//!
//! It is a stand-in for protocol-level state machines only: whatever only a
//! real QEMU shows (the data landing, the guest's memory) stays with the
//! end-to-end tests.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Map, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::client::Client;
use crate::commands::migration::MigrationStatus;

mod model;

use model::model;

/// The port a scripted destination "listens" on when asked for port 0.
pub const LISTEN_PORT: u16 = 49_999;
/// Guest RAM of the scripted guest.
pub const RAM_BYTES: u64 = 512 << 20;

/// What the scripted QEMU knows.
#[derive(Debug, Clone)]
pub struct State {
    /// The migration's status (`None` before any).
    pub status: Option<MigrationStatus>,
    /// The VM's run state as `query-status` names it.
    pub run_state: String,
    /// Bytes left in this pass.
    pub remaining: u64,
    /// Bytes sent so far.
    pub transferred: u64,
    /// Dirty-bitmap syncs so far.
    pub dirty_sync_count: u64,
    /// Megabits per second QEMU measured.
    pub mbps: f64,
    /// Set when the migration completes, or to say QEMU's clock while it
    /// runs (with `setup_time_ms`).
    pub total_time_ms: Option<u64>,
    /// QEMU's setup time, reported with `total_time_ms` while it runs.
    pub setup_time_ms: Option<u64>,
    /// Set when the migration completes.
    pub downtime_ms: Option<u64>,
    /// Why it failed.
    pub error_desc: Option<String>,
    /// Migration capabilities and their states.
    pub capabilities: BTreeMap<String, bool>,
    /// Migration parameters as set.
    pub parameters: Map<String, Value>,
    /// Where an incoming migration listens.
    pub listening: Option<(String, u16)>,
    /// Objects made with `object-add`, by id: their arguments.
    pub objects: BTreeMap<String, Value>,
    /// Block jobs, as `query-block-jobs` lists them; a running one copies
    /// 4 MiB per query (half its first length) and is ready once it caught
    /// up.
    pub block_jobs: Vec<Value>,
    /// Bytes the guest writes to a mirrored disk between two queries (the
    /// job's length grows by as much).
    pub disk_writes_per_query: u64,
    /// Bytes the guest wrote to its disks in all, as `query-blockstats`
    /// counts them (each `drive-TARGET` of a mirror `livemig-mirror-TARGET`).
    pub disk_written: u64,
    /// Nodes made with `blockdev-add`.
    pub block_nodes: Vec<String>,
    /// Thread ids `query-cpus-fast` reports.
    pub vcpu_threads: Vec<i64>,
    /// What `query-dirty-rate` measures, MiB/s.
    pub dirty_rate_mib_s: i64,
    /// Every command received, with its arguments, in order.
    pub log: Vec<(String, Value)>,
}

/// The migration capabilities a scripted QEMU offers,
/// all off: the ones livemig uses that QEMU 7.2 has.
pub const CAPABILITIES: &[&str] = &[
    "xbzrle",
    "auto-converge",
    "events",
    "postcopy-ram",
    "return-path",
    "multifd",
];

impl Default for State {
    fn default() -> Self {
        State {
            status: None,
            run_state: "running".into(),
            remaining: RAM_BYTES,
            transferred: 0,
            dirty_sync_count: 0,
            mbps: 536.870912,
            total_time_ms: None,
            setup_time_ms: None,
            downtime_ms: None,
            error_desc: None,
            capabilities: CAPABILITIES
                .iter()
                .map(|c| (c.to_string(), false))
                .collect(),
            parameters: json!({"max-bandwidth": 134217728, "downtime-limit": 300,
                "cpu-throttle-initial": 20, "cpu-throttle-increment": 10,
                "max-cpu-throttle": 99, "throttle-trigger-threshold": 50,
                "tls-creds": "", "tls-hostname": "", "tls-authz": ""})
            .as_object()
            .cloned()
            .unwrap_or_default(),
            listening: None,
            objects: BTreeMap::new(),
            block_jobs: Vec::new(),
            block_nodes: Vec::new(),
            disk_writes_per_query: 0,
            disk_written: 0,
            vcpu_threads: vec![4242],
            dirty_rate_mib_s: 100,
            log: Vec::new(),
        }
    }
}

/// A QMP error a hook can answer with: class and description.
pub type QmpError = (&'static str, String);

/// A command's answer in place of the model's: `None` lets the model
/// answer.
pub type Hook = Box<dyn FnMut(&mut State, &Value) -> Option<Result<Value, QmpError>> + Send>;

struct Shared {
    state: Mutex<State>,
    hooks: Mutex<HashMap<String, Hook>>,
}

/// The scripted QEMU's model, shared.
#[derive(Clone)]
pub struct Model(Arc<Shared>);

impl Model {
    /// Reads or changes the model.
    pub fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.0.state.lock().expect("state lock"))
    }
}

/// The scripted monitor; dropping it closes the connection.
pub struct ScriptedQemu {
    shared: Arc<Shared>,
    out: mpsc::UnboundedSender<Option<Value>>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for ScriptedQemu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScriptedQemu").finish_non_exhaustive()
    }
}

impl Drop for ScriptedQemu {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub(crate) fn event(name: &str, data: Value) -> Value {
    json!({"event": name, "data": data, "timestamp": {"seconds": 0, "microseconds": 0}})
}

impl ScriptedQemu {
    /// A negotiated client and the monitor behind it.
    ///
    /// # Panics
    /// If the handshake fails, which would be a bug in this module.
    pub async fn start() -> (Client, ScriptedQemu) {
        let (ours, theirs) = tokio::io::duplex(1 << 20);
        let (read, write) = tokio::io::split(theirs);
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            hooks: Mutex::new(HashMap::new()),
        });
        let (out, outgoing) = mpsc::unbounded_channel();
        let task = tokio::spawn(serve(shared.clone(), read, write, out.clone(), outgoing));
        let (our_read, our_write) = tokio::io::split(ours);
        let client = Client::handshake(our_read, our_write, Duration::from_secs(5))
            .await
            .expect("handshake with the scripted QEMU");
        (client, ScriptedQemu { shared, out, task })
    }

    /// Answers `command` with `hook` from now on (the hook may return
    /// `None` to let the model answer).
    pub fn on(
        &self,
        command: &str,
        hook: impl FnMut(&mut State, &Value) -> Option<Result<Value, QmpError>> + Send + 'static,
    ) {
        self.shared
            .hooks
            .lock()
            .expect("hooks lock")
            .insert(command.to_string(), Box::new(hook));
    }

    /// Reads or changes the model.
    pub fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self.shared.state.lock().expect("state lock"))
    }

    /// A handle on the model for another party of a test (a scripted
    /// throttle that slows the guest), which does not hold the connection.
    pub fn model(&self) -> Model {
        Model(self.shared.clone())
    }

    /// Sends an event.
    pub fn emit(&self, name: &str, data: Value) {
        let _ = self.out.send(Some(event(name, data)));
    }

    /// Sets the migration's status, with its `MIGRATION` event.
    pub fn set_status(&self, status: MigrationStatus) {
        self.with(|s| s.status = Some(status));
        self.emit("MIGRATION", json!({"status": status.as_str()}));
    }

    /// A dirty-bitmap sync: a pass ended and `remaining` bytes are left.
    pub fn pass(&self, remaining: u64) {
        let pass = self.with(|s| {
            // What was left has been sent; the pass dirtied `remaining`.
            s.transferred += s.remaining;
            s.remaining = remaining;
            s.dirty_sync_count += 1;
            s.dirty_sync_count
        });
        self.emit("MIGRATION_PASS", json!({"pass": pass}));
    }

    /// The migration completes after `total_time_ms` with `downtime_ms`.
    pub fn complete(&self, total_time_ms: u64, downtime_ms: u64) {
        self.with(|s| {
            s.remaining = 0;
            s.total_time_ms = Some(total_time_ms);
            s.downtime_ms = Some(downtime_ms);
            s.run_state = "postmigrate".into();
        });
        self.set_status(MigrationStatus::Completed);
    }

    /// The migration fails, saying `why`.
    pub fn fail(&self, why: &str) {
        self.with(|s| s.error_desc = Some(why.to_string()));
        self.set_status(MigrationStatus::Failed);
    }

    /// Hangs up, as a QEMU that died would.
    pub fn disconnect(&self) {
        let _ = self.out.send(None);
    }

    /// The names of the commands received, in order (without the
    /// negotiation).
    pub fn commands(&self) -> Vec<String> {
        self.with(|s| s.log.iter().map(|(name, _)| name.clone()).collect())
    }

    /// The arguments of every `command` received, in order.
    pub fn calls(&self, command: &str) -> Vec<Value> {
        self.with(|s| {
            s.log
                .iter()
                .filter(|(name, _)| name == command)
                .map(|(_, args)| args.clone())
                .collect()
        })
    }

    /// The parameter `name` as last set.
    pub fn parameter(&self, name: &str) -> Option<Value> {
        self.with(|s| s.parameters.get(name).cloned())
    }
}

async fn serve(
    shared: Arc<Shared>,
    read: tokio::io::ReadHalf<tokio::io::DuplexStream>,
    mut write: tokio::io::WriteHalf<tokio::io::DuplexStream>,
    out: mpsc::UnboundedSender<Option<Value>>,
    mut outgoing: mpsc::UnboundedReceiver<Option<Value>>,
) {
    let greeting = json!({"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0},
        "package": "scripted"}, "capabilities": []}});
    let mut lines = BufReader::new(read).lines();
    let send = |message: Value| {
        let _ = out.send(Some(message));
    };
    send(greeting);
    loop {
        tokio::select! {
            message = outgoing.recv() => match message {
                Some(Some(message)) => {
                    let mut line = message.to_string();
                    line.push('\n');
                    if write.write_all(line.as_bytes()).await.is_err() {
                        return;
                    }
                }
                // Hang up.
                _ => return,
            },
            line = lines.next_line() => {
                let Ok(Some(line)) = line else { return };
                let Ok(request) = serde_json::from_str::<Value>(&line) else { continue };
                let id = request.get("id").cloned().unwrap_or(Value::Null);
                let name = request["execute"].as_str().unwrap_or_default().to_string();
                let args = request.get("arguments").cloned().unwrap_or(json!({}));
                let (reply, events) = answer(&shared, &name, &args);
                let message = match reply {
                    Ok(value) => json!({"return": value, "id": id}),
                    Err((class, desc)) => json!({"error": {"class": class, "desc": desc}, "id": id}),
                };
                send(message);
                for e in events {
                    send(e);
                }
            }
        }
    }
}

/// The reply to one command, and the events it causes.
fn answer(shared: &Shared, name: &str, args: &Value) -> (Result<Value, QmpError>, Vec<Value>) {
    let mut state = shared.state.lock().expect("state lock");
    if name != "qmp_capabilities" {
        state.log.push((name.to_string(), args.clone()));
    }
    if let Some(hook) = shared.hooks.lock().expect("hooks lock").get_mut(name) {
        if let Some(reply) = hook(&mut state, args) {
            return (reply, Vec::new());
        }
    }
    model(&mut state, name, args)
}
