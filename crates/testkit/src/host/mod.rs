//! One host of a test bed: an agent (served in-process, or a `livemigd`
//! child in its own process group), a client on its socket, and the checks
//! and actions tests take on it.

use std::path::Path;
use std::time::Duration;

use domain::DomainDefinition;
use launcher::{AgentProcess, LaunchOptions};
use protocol::domain::{DefinitionDoc, DomainInfo, DomainState, DomainSummary};

use protocol::call::{self, Call};
use protocol::{AgentUri, Client, ClientError, Reply, Request};
use serde_json::Value;

mod migrate;
mod serial;

use crate::in_process::InProcessAgent;
use crate::{bin, procs};

const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
const JOB_TIMEOUT: Duration = Duration::from_secs(300);

/// How a host's agent runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentKind {
    /// `agent::serve` on a thread of the test process: for tests that do
    /// not kill the agent.
    InProcess,
    /// A `livemigd` child in its own process group: for tests that crash
    /// it, measure it, give it flags or put it in a network namespace.
    Process,
}

#[derive(Debug)]
enum Agent {
    InProcess(InProcessAgent),
    Process(AgentProcess),
}

/// One agent ("host").
#[derive(Debug)]
pub struct Host {
    /// The host's name (`a`, `b`).
    pub name: String,
    options: LaunchOptions,
    kind: AgentKind,
    agent: Option<Agent>,
    client: Option<Client>,
    /// Agents that crashed: their process groups still hold QEMUs a new
    /// agent adopted, and are killed when the host is dropped.
    graveyard: Vec<AgentProcess>,
}

impl Host {
    pub(crate) async fn start(mut options: LaunchOptions, kind: AgentKind) -> Host {
        let agent = match kind {
            AgentKind::InProcess => Agent::InProcess(InProcessAgent::start(&options).await),
            AgentKind::Process => Agent::Process(
                AgentProcess::spawn(&options)
                    .await
                    .unwrap_or_else(|e| panic!("livemigd did not start: {e}")),
            ),
        };
        let (uri, local) = match &agent {
            Agent::InProcess(a) => (a.uri(), AgentUri::Unix(a.socket().to_path_buf())),
            Agent::Process(p) => (p.tcp_uri(), p.local_uri()),
        };
        // A restarted agent comes back on the same address, as a real one
        // with a configured port would.
        if let Some(uri) = uri {
            options.listen = Some(uri);
        }
        let client = Client::connect(&local).await.expect("connect to the agent");
        Host {
            name: options
                .state_dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            options,
            kind,
            agent: Some(agent),
            client: Some(client),
            graveyard: Vec::new(),
        }
    }

    fn agent(&self) -> &Agent {
        self.agent.as_ref().expect("agent is running")
    }

    fn process(&self) -> &AgentProcess {
        match self.agent() {
            Agent::Process(p) => p,
            Agent::InProcess(_) => panic!(
                "{}'s agent runs in-process: start it with TestBed::with_agent_processes",
                self.name
            ),
        }
    }

    /// How this host's agent runs.
    pub fn kind(&self) -> AgentKind {
        self.kind
    }

    /// The client connected to the agent's socket.
    pub fn client(&self) -> &Client {
        self.client.as_ref().expect("agent is running")
    }

    /// The agent's TCP URI (for peers).
    pub fn uri(&self) -> String {
        match self.agent() {
            Agent::InProcess(a) => a.uri(),
            Agent::Process(p) => p.tcp_uri(),
        }
        .expect("agent listens on TCP")
    }

    /// The unix socket URI (for a local CLI).
    pub fn local_uri(&self) -> String {
        match self.agent() {
            Agent::InProcess(a) => AgentUri::Unix(a.socket().to_path_buf()).to_string(),
            Agent::Process(p) => p.local_uri().to_string(),
        }
    }

    /// The agent's state directory.
    pub fn state_dir(&self) -> &Path {
        &self.options.state_dir
    }

    /// The agent's process group (also its pid).
    pub fn pgid(&self) -> u32 {
        self.process().pid()
    }

    /// Guests' QEMU processes this host's agents started that are still
    /// alive (including those of crashed agents); not the probes of the
    /// QEMU binary.
    pub fn qemu_pids(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = match self.kind {
            AgentKind::InProcess => InProcessAgent::qemu_pids(self.state_dir()),
            AgentKind::Process => self
                .graveyard
                .iter()
                .chain(match &self.agent {
                    Some(Agent::Process(p)) => Some(p),
                    _ => None,
                })
                .flat_map(|p| procs::qemus_in_group(p.pid()))
                .collect(),
        };
        pids.retain(|&pid| !procs::is_probe(pid));
        pids.sort_unstable();
        pids
    }

    /// Kills the agent alone with SIGKILL, as a crash would; its QEMUs run
    /// on. The host has no agent until [`Host::start_again`].
    pub fn crash(&mut self) {
        self.process();
        self.client = None;
        if let Some(Agent::Process(mut process)) = self.agent.take() {
            process.crash();
            self.graveyard.push(process);
        }
    }

    /// Starts a new agent on the same state directory and address.
    pub async fn start_again(&mut self) {
        let fresh = Host::start(self.options.clone(), self.kind).await;
        let graveyard = std::mem::take(&mut self.graveyard);
        let old = std::mem::replace(self, fresh);
        drop(old);
        self.graveyard = graveyard;
    }

    /// Kills a domain's QEMU with SIGKILL.
    pub async fn kill_qemu(&self, name: &str) -> u32 {
        let pid = self
            .dominfo(name)
            .await
            .expect("dominfo")
            .qemu_pid
            .expect("the domain runs");
        std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .expect("kill");
        pid
    }

    /// Stops the agent gracefully and starts it again on the same state
    /// directory (and the same listen address, if it had a fixed one).
    pub async fn restart(&mut self) {
        self.stop_agent().await;
        self.start_again().await;
    }

    /// Stops the agent with SIGTERM (it leaves its guests running) and
    /// starts a new one on the same state directory, which adopts them.
    pub async fn restart_keeping_guests(&mut self) {
        self.client = None;
        match self.agent.take() {
            Some(Agent::Process(mut process)) => {
                assert!(
                    process.terminate(Duration::from_secs(30)).await,
                    "livemigd did not exit on SIGTERM"
                );
                self.graveyard.push(process);
            }
            Some(Agent::InProcess(agent)) => agent.shut_down().await,
            None => {}
        }
        self.start_again().await;
    }

    /// Stops the agent, then kills its QEMUs.
    pub async fn stop(mut self) {
        self.stop_agent().await;
    }

    async fn stop_agent(&mut self) {
        self.client = None;
        match self.agent.take() {
            Some(Agent::Process(process)) => process.stop(Duration::from_secs(30)).await,
            Some(Agent::InProcess(agent)) => {
                agent.shut_down().await;
                InProcessAgent::kill_qemus(self.state_dir());
            }
            None => {}
        }
    }

    /// Sends a request to the agent.
    pub async fn request(&self, request: Request) -> Result<Reply, ClientError> {
        self.client().request(request, REQUEST_TIMEOUT).await
    }

    /// Defines and starts a domain; waits until the guest reports progress.
    pub async fn define_and_start(&self, definition: DomainDefinition) {
        let name = definition.name.clone();
        self.request(Request::Define {
            definition: DefinitionDoc(definition.to_document()),
        })
        .await
        .expect("define");
        self.request(Request::Start {
            domain: name.clone(),
            paused: false,
        })
        .await
        .expect("start");
        self.wait_guest_progress(name.as_str(), 2).await;
    }

    /// Sends a typed call to the agent.
    pub async fn call<C: Call>(&self, call: C) -> Result<C::Output, ClientError> {
        self.client().call(call, REQUEST_TIMEOUT).await
    }

    /// The domain's `dominfo`.
    pub async fn dominfo(&self, name: &str) -> Result<DomainInfo, ClientError> {
        self.call(call::DomInfo {
            domain: name.parse().expect("valid name"),
        })
        .await
    }

    /// Every domain the agent knows.
    pub async fn list_all(&self) -> Vec<DomainSummary> {
        self.call(call::List { all: true }).await.expect("list")
    }

    /// The domain's state, if the agent knows it.
    pub async fn state(&self, name: &str) -> Option<DomainState> {
        self.dominfo(name).await.ok().map(|i| i.state)
    }

    /// Runs a QMP command on a domain's QEMU through the agent.
    pub async fn qmp(&self, name: &str, execute: &str) -> Result<Value, ClientError> {
        self.call(call::QemuMonitorCommand {
            domain: name.parse().expect("valid name"),
            command: serde_json::json!({ "execute": execute }),
        })
        .await
    }

    /// The state of one migration capability on a domain's QEMU.
    pub async fn capability(&self, name: &str, capability: &str) -> bool {
        let caps = self
            .qmp(name, "query-migrate-capabilities")
            .await
            .expect("query-migrate-capabilities");
        caps.as_array()
            .expect("capability list")
            .iter()
            .find(|c| c["capability"] == capability)
            .and_then(|c| c["state"].as_bool())
            .unwrap_or_else(|| panic!("QEMU has no capability {capability}"))
    }

    /// Runs the `livemig` CLI against this agent.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new(bin("livemig"))
            .arg("-c")
            .arg(self.local_uri())
            .args(args)
            .env_remove("LIVEMIG_URI")
            .output()
            .expect("run livemig")
    }

    /// `livemig migrate OPTIONS NAME DEST` through the CLI, asserted to
    /// succeed.
    pub fn cli_migrate(&self, name: &str, dest: &Host, options: &[&str]) -> std::process::Output {
        let uri = dest.uri();
        let args: Vec<&str> = std::iter::once("migrate")
            .chain(options.iter().copied())
            .chain([name, uri.as_str()])
            .collect();
        self.cli_ok(&args)
    }

    /// Runs the CLI against this host and asserts that it succeeded.
    pub fn cli_ok(&self, args: &[&str]) -> std::process::Output {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "livemig {} failed on {}: {}",
            args.join(" "),
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        // AgentProcess's own Drop kills the process group.
        self.client = None;
        self.agent = None;
        self.graveyard.clear();
    }
}
