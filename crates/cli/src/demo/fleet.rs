//! `livemig demo --fleet`: a local etcd, three agents in network
//! namespaces on one bridge (links capped), a controller, a mix of guests
//! on host-a; host-a is drained, and every guest's memory is checked where
//! it landed. Needs root (namespaces, the bridge, tc).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitCode, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use cluster::{Cluster, Endpoints, GuestState, TlsFiles};
use domain::DomainDefinition;
use guest::{SerialLog, Workload};
use launcher::etcd::{EtcdOptions, EtcdProcess};
use launcher::fabric::Fabric;
use launcher::{AgentProcess, LaunchOptions};
use protocol::call;
use protocol::domain::DefinitionDoc;
use protocol::Client;

use super::{wait_for_guest, Say};
use crate::agent::call as send;
use crate::args::DemoArgs;
use crate::commands::drain::{self, Follow};

const HOSTS: [&str; 3] = ["host-a", "host-b", "host-c"];

/// The guests host-a runs: name, RAM in MiB, working set in MiB, spin
/// (lower dirties faster). The quiet one still sweeps a small working set
/// slowly: a guest that writes nothing checks nothing either.
const GUESTS: [(&str, u32, u32, Option<u32>); 4] = [
    ("quiet", 128, 1, Some(500_000)),
    ("light", 128, 8, Some(20_000)),
    ("heavy", 192, 48, Some(2_000)),
    ("hot", 256, 64, Some(200)),
];

/// A child killed (its process group, by PID) when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(-(self.0.id() as i32));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.0.wait();
    }
}

fn beside_this(binary: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(binary)))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(binary))
}

/// Runs the fleet demo.
///
/// # Errors
/// Not root, a missing etcd, an agent or guest that does not start.
pub async fn run(args: DemoArgs) -> Result<ExitCode> {
    if !nix::unistd::geteuid().is_root() {
        bail!("demo --fleet makes network namespaces and a bridge: run it as root");
    }
    let say = Say { json: args.json };
    let tmp = tempfile::Builder::new()
        .prefix("livemig-fleet-")
        .tempdir()
        .context("cannot create a temporary directory")?;
    let dir = tmp.path();
    let kernel = guest::install_kernel(dir)?;
    let pki = dir.join("pki");
    tls::pki::init_if_missing(&pki).context("cannot create the demo's CA")?;

    say.line(&format!(
        "==> Three hosts in network namespaces on one bridge, links capped at {} MiB/s",
        args.link
    ));
    let fabric = Fabric::create("fleet", HOSTS.len()).context("cannot make the namespaces")?;
    fabric.cap(args.link).context("cannot cap the links")?;

    say.line("==> etcd for the cluster's state (mutual TLS)");
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
    .context("cannot start etcd (Debian's etcd-server; scripts/setup.sh installs it)")?;
    let operator = tls::pki::issue(&pki, "operator", protocol::Role::Admin, &[])?;
    let cluster = connect_cluster(&etcd.endpoint, &operator).await?;

    let mut agents = Vec::new();
    for (host, net) in HOSTS.iter().zip(&fabric.hosts) {
        let mut extra = vec![
            "--cluster".to_string(),
            etcd.endpoint.clone(),
            "--link".to_string(),
            args.link.to_string(),
        ];
        if let Some(qemu) = &args.qemu {
            extra.extend(["--qemu".to_string(), qemu.display().to_string()]);
        }
        let options = LaunchOptions {
            binary: super::find_livemigd(args.livemigd.clone()),
            state_dir: dir.join(host),
            listen: Some(format!("tls://{}:0", net.ip)),
            tls_dir: Some(tls::pki::issue(
                &pki,
                host,
                protocol::Role::Agent,
                std::slice::from_ref(&net.ip),
            )?),
            netns: Some(net.netns.clone()),
            image_dirs: vec![dir.to_path_buf()],
            extra_args: extra,
            private_dirs: Vec::new(),
        };
        agents.push(
            AgentProcess::spawn(&options)
                .await
                .with_context(|| format!("cannot start {host}'s agent"))?,
        );
    }
    let clients = [
        Client::connect(&agents[0].local_uri()).await?,
        Client::connect(&agents[1].local_uri()).await?,
        Client::connect(&agents[2].local_uri()).await?,
    ];
    let controller = spawn_controller(dir, &etcd.endpoint, &operator)?;
    say.line(&format!(
        "==> Agents {} registered; livemig-controller (pid {}) leads",
        HOSTS.join(", "),
        controller.0.id()
    ));

    let result = scenario(&args, &say, &cluster, &clients, &kernel).await;

    say.line("==> Cleaning up: guests, agents, controller, etcd, namespaces");
    for client in &clients {
        for (name, ..) in GUESTS {
            if let Ok(domain) = name.parse() {
                let _ = client
                    .request(
                        protocol::Request::Destroy { domain },
                        Duration::from_secs(20),
                    )
                    .await;
            }
        }
    }
    for agent in agents {
        agent.stop(Duration::from_secs(20)).await;
    }
    drop(controller);
    drop(etcd);
    drop(fabric);
    result
}

async fn connect_cluster(endpoint: &str, tls_dir: &Path) -> Result<Cluster> {
    let endpoints = Endpoints::parse(endpoint, false)?;
    let files = TlsFiles {
        dir: tls_dir.to_path_buf(),
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match Cluster::connect(&endpoints, Some(&files)).await {
            Ok(cluster) => return Ok(cluster),
            Err(e) if tokio::time::Instant::now() > deadline => {
                return Err(e).context("etcd did not answer within 30 s")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    }
}

fn spawn_controller(dir: &Path, endpoint: &str, tls_dir: &Path) -> Result<Killed> {
    let log = std::fs::File::create(dir.join("controller.log"))?;
    let child = std::process::Command::new(beside_this("livemig-controller"))
        .args(["--cluster", endpoint, "--tls-dir"])
        .arg(tls_dir)
        .args(["--name", "demo-controller"])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()
        .context("cannot start livemig-controller (built beside livemig)")?;
    Ok(Killed(child))
}

async fn scenario(
    args: &DemoArgs,
    say: &Say,
    cluster: &Cluster,
    clients: &[Client; 3],
    kernel: &Path,
) -> Result<ExitCode> {
    let a = &clients[0];
    for (name, memory, working_set, spin) in GUESTS {
        let workload = match spin {
            Some(spin) => Workload::busy(working_set, spin),
            None => Workload::IDLE,
        };
        let definition =
            DomainDefinition::from_toml(&guest::definition_toml(name, memory, kernel, workload))?;
        let definition = DefinitionDoc(definition.to_document());
        send(a, call::Define { definition }).await?;
        send(
            a,
            call::Start {
                domain: name.parse()?,
                paused: false,
            },
        )
        .await?;
    }
    let mut source_logs = Vec::new();
    for (name, memory, working_set, _) in GUESTS {
        let log = serial_of(a, name).await?;
        wait_for_guest(&log, 2, 1).await?;
        source_logs.push((name, log));
        say.line(&format!(
            "    {name}: {memory} MiB, rewriting a {working_set} MiB working set"
        ));
    }
    wait_registered(cluster).await?;

    say.line("==> livemig drain host-a --wait");
    let record = drain::record(cluster, "host-a", &[], None).await?;
    let (_, record) = drain::follow(
        cluster,
        &record.id,
        if args.json {
            Follow::Stderr
        } else {
            Follow::Text
        },
    )
    .await?;

    // Every guest's memory, checked where it runs now.
    say.line("==> Checking every guest where it landed: it runs on and finds every page intact");
    let mut checks = Vec::new();
    for g in &record.guests {
        let on = match (g.state, g.destination.as_deref()) {
            (GuestState::Moved, Some(to)) => to,
            _ => "host-a",
        };
        let index = HOSTS
            .iter()
            .position(|h| *h == on)
            .ok_or_else(|| anyhow!("{} landed on an unknown host {on}", g.domain))?;
        let log = serial_of(&clients[index], &g.domain).await?;
        let after = wait_for_guest(&log, 3, 1).await?;
        // Up to the switchover, as the source saw it.
        let before = source_logs
            .iter()
            .find(|(name, _)| *name == g.domain)
            .map(|(_, log)| SerialLog::read(log).is_ok_and(|s| s.memory_intact()));
        let intact = after.memory_intact() && before != Some(false);
        say.line(&format!(
            "    {}: on {on}, memory {}",
            g.domain,
            if intact { "intact" } else { "CORRUPT" }
        ));
        checks.push(serde_json::json!({
            "name": g.domain,
            "host": on,
            "converged": g.state == GuestState::Moved,
            "memory_check": if intact { "ok" } else { "corrupt" },
        }));
    }
    let converged = checks.iter().filter(|c| c["converged"] == true).count();
    let intact = checks.iter().filter(|c| c["memory_check"] == "ok").count();
    let ok = record.state == cluster::DrainState::Done
        && converged == GUESTS.len()
        && intact == GUESTS.len();
    if args.json {
        print!(
            "{}",
            crate::commands::json(&serde_json::json!({
                "drain": record,
                "guests": checks,
                "vms": GUESTS.len(),
                "converged": converged,
                "intact": intact,
            }))?
        );
    } else {
        // The report came with the drain's end.
        println!(
            "Guests moved: {converged}/{}, memory intact: {intact}/{}",
            GUESTS.len(),
            GUESTS.len()
        );
    }
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// The serial log of a guest running on `client`'s host.
async fn serial_of(client: &Client, name: &str) -> Result<PathBuf> {
    let info = crate::commands::domains::info(client, name).await?;
    info.serial_log
        .map(PathBuf::from)
        .ok_or_else(|| anyhow!("{name} has no serial log"))
}

/// Waits until the cluster has the three hosts, host-a with its guests.
async fn wait_registered(cluster: &Cluster) -> Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let hosts = cluster.hosts().await?;
        let a_ready = hosts
            .iter()
            .any(|h| h.name == HOSTS[0] && h.domains.len() == GUESTS.len());
        if hosts.len() == HOSTS.len() && a_ready {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the three hosts did not register within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
