//! `livemig-controller`: runs the cluster's drains. Start several; one
//! leads (an etcd election), the others take over within the lease of it
//! dying.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result};
use clap::Parser;
use cluster::{Cluster, Endpoints, TlsFiles};
use fleet::controller::{self, Context, Settings};
use fleet::schedule::Caps;
use fleet::survey::Agents;

/// Runs the drains recorded in the cluster (`livemig drain HOST`).
#[derive(Debug, Parser)]
#[command(name = "livemig-controller", version)]
struct Args {
    /// The cluster's etcd endpoints, https://HOST:PORT[,...].
    #[arg(long, env = "LIVEMIG_CLUSTER")]
    cluster: String,
    /// Talk to a plaintext (http://) cluster and tcp:// agents.
    #[arg(long)]
    insecure: bool,
    /// TLS directory with an administrator's certificate (from `livemig
    /// pki issue ... --role admin`): for etcd and for the agents.
    #[arg(long)]
    tls_dir: Option<PathBuf>,
    /// This controller's name in the election [default: host name and PID].
    #[arg(long)]
    name: Option<String>,
    /// Seconds a dead leader holds its leadership before another takes
    /// over.
    #[arg(long, default_value_t = 5)]
    lease: u64,
    /// Migrations leaving one host at once, at most.
    #[arg(long, default_value_t = 4)]
    max_outbound: u32,
    /// Migrations arriving at one host at once, at most.
    #[arg(long, default_value_t = 2)]
    max_inbound: u32,
    /// Migrations in the cluster at once, at most.
    #[arg(long, default_value_t = 16)]
    max_migrations: u32,
    /// Seconds a guest waits for a host that can take it (an agent coming
    /// back, RAM freed, a cordon lifted) before the drain gives it up.
    #[arg(long, default_value_t = 300)]
    patience: u64,
    /// Milliseconds between the leader's looks at the running migrations'
    /// progress (a migration that ends on a drained host wakes it at once).
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(10..=60_000))]
    tick_ms: u64,
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let endpoints = Endpoints::parse(&args.cluster, args.insecure)?;
    if endpoints.secure() && args.tls_dir.is_none() {
        anyhow::bail!("an https:// cluster needs --tls-dir (an administrator's certificate)");
    }
    let tls = args
        .tls_dir
        .as_ref()
        .map(|dir| TlsFiles { dir: dir.clone() });
    let cluster = Cluster::connect(&endpoints, tls.as_ref())
        .await
        .with_context(|| format!("cannot reach the cluster at {endpoints}"))?;
    let agents = Agents::new(args.tls_dir.as_deref())?;
    let name = args.name.unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_else(|_| "host".into());
        format!("{host}-{}", std::process::id())
    });
    let settings = Settings {
        name,
        caps: Caps {
            outbound: Some(args.max_outbound),
            inbound: Some(args.max_inbound),
            cluster: Some(args.max_migrations),
        },
        lease: Duration::from_secs(args.lease.max(1)),
        patience: Duration::from_secs(args.patience),
        tick: Duration::from_millis(args.tick_ms),
    };
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("a SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    controller::run(
        Context {
            cluster,
            agents,
            settings,
        },
        shutdown,
    )
    .await;
    Ok(())
}
