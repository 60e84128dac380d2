//! A cluster on one machine, for the fleet demo and the drain benchmark:
//! hosts in network namespaces on one bridge ([`Fabric`]) with capped
//! links, an etcd ([`EtcdProcess`]) and an agent per host registered in
//! it, all over mutual TLS from one throwaway PKI, and a
//! `livemig-controller`. Dropping it kills everything it started (agents
//! with their QEMUs, the controller, etcd) and removes the namespaces.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

use cluster::{Cluster, Endpoints, TlsFiles};
use protocol::Client;

use crate::etcd::{EtcdOptions, EtcdProcess};
use crate::fabric::Fabric;
use crate::{AgentProcess, LaunchOptions};

/// What the cluster runs.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// Where everything keeps its state and logs.
    pub dir: PathBuf,
    /// The hosts' names.
    pub hosts: Vec<String>,
    /// Each host's link, MiB/s each way.
    pub link_mib_s: u64,
    /// The `livemigd` binary.
    pub livemigd: PathBuf,
    /// The `livemig-controller` binary; none: no controller.
    pub controller: Option<PathBuf>,
    /// A QEMU binary for every agent.
    pub qemu: Option<PathBuf>,
    /// Directories definitions may take images from.
    pub image_dirs: Vec<PathBuf>,
}

/// A running cluster on this machine.
#[derive(Debug)]
pub struct LocalFleet {
    /// The agents, in the order of the hosts.
    pub agents: Vec<AgentProcess>,
    /// A client to each agent (its local socket).
    pub clients: Vec<Client>,
    /// The cluster, as an administrator.
    pub cluster: Cluster,
    /// etcd's endpoint.
    pub endpoint: String,
    /// An administrator's TLS directory (for etcd and the agents).
    pub operator: PathBuf,
    controller: Option<Child>,
    // Held for their Drop: etcd killed, the network removed (after the
    // agents, which are stopped first).
    _etcd: EtcdProcess,
    _fabric: Fabric,
}

/// Why the cluster could not be started.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// Namespaces, the bridge or the shaping.
    #[error("cannot build the hosts' network (needs root)")]
    Network(#[from] crate::netns::NetnsError),
    /// Certificates.
    #[error("cannot issue the cluster's certificates")]
    Pki(#[from] tls::pki::PkiError),
    /// etcd or the controller would not start.
    #[error("cannot start {what}")]
    Spawn {
        /// Which.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// An agent would not start.
    #[error("cannot start an agent")]
    Agent(#[from] crate::LaunchError),
    /// An agent would not answer.
    #[error("an agent does not answer")]
    Client(#[from] protocol::ClientError),
    /// etcd did not answer, or the hosts did not register.
    #[error("{0}")]
    Cluster(String),
}

impl LocalFleet {
    /// Builds the network, starts etcd, the agents and the controller, and
    /// waits until every host is registered.
    ///
    /// # Errors
    /// [`FleetError`].
    pub async fn start(options: &FleetOptions) -> Result<LocalFleet, FleetError> {
        let dir = &options.dir;
        let pki = dir.join("pki");
        tls::pki::init_if_missing(&pki)?;
        let fabric = Fabric::create("fleet", options.hosts.len())?;
        fabric.cap(options.link_mib_s)?;
        let etcd_tls = tls::pki::issue(
            &pki,
            "etcd",
            protocol::Role::Agent,
            std::slice::from_ref(&fabric.gateway_ip),
        )?;
        let etcd = EtcdProcess::spawn(&EtcdOptions {
            data_dir: dir.join("etcd"),
            tls_dir: etcd_tls,
            host: fabric.gateway_ip.clone(),
            log: dir.join("etcd.log"),
        })
        .map_err(|source| FleetError::Spawn {
            what: "etcd (Debian's etcd-server)".into(),
            source,
        })?;
        let operator = tls::pki::issue(&pki, "operator", protocol::Role::Admin, &[])?;
        let cluster = connect(&etcd.endpoint, &operator).await?;
        let mut agents = Vec::new();
        let mut clients = Vec::new();
        for (host, net) in options.hosts.iter().zip(&fabric.hosts) {
            let mut extra = vec![
                "--cluster".to_string(),
                etcd.endpoint.clone(),
                "--link".to_string(),
                options.link_mib_s.to_string(),
            ];
            if let Some(qemu) = &options.qemu {
                extra.extend(["--qemu".to_string(), qemu.display().to_string()]);
            }
            let agent = AgentProcess::spawn(&LaunchOptions {
                binary: options.livemigd.clone(),
                state_dir: dir.join(host),
                listen: Some(format!("tls://{}:0", net.ip)),
                tls_dir: Some(tls::pki::issue(
                    &pki,
                    host,
                    protocol::Role::Agent,
                    std::slice::from_ref(&net.ip),
                )?),
                netns: Some(net.netns.clone()),
                image_dirs: options.image_dirs.clone(),
                extra_args: extra,
                private_dirs: Vec::new(),
            })
            .await?;
            clients.push(Client::connect(&agent.local_uri()).await?);
            agents.push(agent);
        }
        let controller = options
            .controller
            .as_ref()
            .map(|binary| spawn_controller(binary, dir, &etcd.endpoint, &operator))
            .transpose()?;
        let fleet = LocalFleet {
            agents,
            clients,
            cluster,
            endpoint: etcd.endpoint.clone(),
            operator,
            controller,
            _etcd: etcd,
            _fabric: fabric,
        };
        fleet.wait_registered(&options.hosts).await?;
        Ok(fleet)
    }

    /// The controller's PID, if one runs.
    pub fn controller_pid(&self) -> Option<u32> {
        self.controller.as_ref().map(Child::id)
    }

    async fn wait_registered(&self, hosts: &[String]) -> Result<(), FleetError> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let registered = self
                .cluster
                .hosts()
                .await
                .map(|h| h.len())
                .unwrap_or_default();
            if registered == hosts.len() {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(FleetError::Cluster(format!(
                    "{registered} of {} hosts registered within 30 s",
                    hosts.len()
                )));
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Stops the agents (their guests with them), the controller, etcd,
    /// and removes the network.
    pub async fn stop(mut self) {
        for agent in self.agents.drain(..) {
            agent.stop(Duration::from_secs(20)).await;
        }
    }
}

impl Drop for LocalFleet {
    fn drop(&mut self) {
        if let Some(mut child) = self.controller.take() {
            let pid = nix::unistd::Pid::from_raw(-(child.id() as i32));
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = child.wait();
        }
    }
}

async fn connect(endpoint: &str, tls_dir: &Path) -> Result<Cluster, FleetError> {
    let endpoints =
        Endpoints::parse(endpoint, false).map_err(|e| FleetError::Cluster(e.to_string()))?;
    let files = TlsFiles {
        dir: tls_dir.to_path_buf(),
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match Cluster::connect(&endpoints, Some(&files)).await {
            Ok(cluster) => return Ok(cluster),
            Err(e) if tokio::time::Instant::now() > deadline => {
                return Err(FleetError::Cluster(format!(
                    "etcd did not answer within 30 s: {e}"
                )))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    }
}

fn spawn_controller(
    binary: &Path,
    dir: &Path,
    endpoint: &str,
    tls_dir: &Path,
) -> Result<Child, FleetError> {
    let spawn_error = |source| FleetError::Spawn {
        what: format!("{}", binary.display()),
        source,
    };
    let log = std::fs::File::create(dir.join("controller.log")).map_err(spawn_error)?;
    std::process::Command::new(binary)
        .args(["--cluster", endpoint, "--tls-dir"])
        .arg(tls_dir)
        .args(["--name", "local-controller"])
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(spawn_error)?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .map_err(spawn_error)
}
