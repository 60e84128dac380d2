//! `livemig demo --fleet`: a local etcd, three agents in network
//! namespaces on one bridge (links capped), a controller, a mix of guests
//! on host-a; host-a is drained, and every guest's memory is checked where
//! it landed. Needs root (namespaces, the bridge, tc).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use cluster::{Cluster, GuestState};
use domain::DomainDefinition;
use guest::{SerialLog, Workload};
use launcher::local_fleet::{FleetOptions, LocalFleet};
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
    say.line(&format!(
        "==> etcd, three agents in network namespaces on one bridge (links capped at {} MiB/s), \
         a controller; all mutual TLS",
        args.link
    ));
    let fleet = LocalFleet::start(&FleetOptions {
        dir: dir.to_path_buf(),
        hosts: HOSTS.iter().map(|h| h.to_string()).collect(),
        link_mib_s: args.link,
        livemigd: super::find_livemigd(args.livemigd.clone()),
        controller: Some(beside_this("livemig-controller")),
        qemu: args.qemu.clone(),
        image_dirs: vec![dir.to_path_buf()],
    })
    .await
    .context("cannot start the cluster")?;
    say.line(&format!(
        "    etcd at {}; {} registered; livemig-controller (pid {}) leads",
        fleet.endpoint,
        HOSTS.join(", "),
        fleet.controller_pid().unwrap_or(0)
    ));

    let result = scenario(&args, &say, &fleet.cluster, &fleet.clients, &kernel).await;

    say.line("==> Cleaning up: guests, agents, controller, etcd, namespaces");
    fleet.stop().await;
    result
}

async fn scenario(
    args: &DemoArgs,
    say: &Say,
    cluster: &Cluster,
    clients: &[Client],
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
