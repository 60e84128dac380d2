//! `livemigd`: the livemig per-host agent.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use domain::Accel;

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Switch {
    On,
    Off,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum AccelArg {
    Tcg,
    Kvm,
}

/// The livemig agent: owns this host's domains and runs migrations with its
/// peers.
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "Example:\n  livemigd --state-dir /var/lib/livemig --socket /run/livemig.sock --listen tcp://0.0.0.0:7000"
)]
struct Args {
    /// Directory for definitions, job records, sockets and logs.
    #[arg(long, value_name = "DIR")]
    state_dir: PathBuf,
    /// Unix socket for the local CLI [default: STATE_DIR/livemigd.sock].
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// TCP address for peer agents and remote CLIs (port 0 picks one).
    #[arg(long, value_name = "tcp://HOST:PORT")]
    listen: Option<String>,
    /// QEMU binary.
    #[arg(long, value_name = "PATH", default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    /// Default accelerator for probing.
    #[arg(long, value_enum, default_value = "tcg")]
    accel: AccelArg,
    /// Work around QEMU < 9.0 losing guest writes when migrating under TCG
    /// (see `livemig domcapabilities`). `off` only serves to show the bug.
    #[arg(long, value_enum, default_value = "on")]
    tcg_workaround: Switch,
    /// Log format on stderr.
    #[arg(long, value_enum, default_value = "text")]
    log_format: LogFormat,
}

fn parse_listen(uri: &str) -> Result<SocketAddr> {
    let Some(rest) = uri.strip_prefix("tcp://") else {
        bail!("--listen takes tcp://HOST:PORT, got {uri:?}");
    };
    rest.trim_end_matches('/')
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve --listen {uri:?}"))?
        .next()
        .with_context(|| format!("--listen {uri:?} resolves to no address"))
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LIVEMIG_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    init_logging(args.log_format);
    let listen = args.listen.as_deref().map(parse_listen).transpose()?;
    let socket = args
        .socket
        .clone()
        .unwrap_or_else(|| args.state_dir.join("livemigd.sock"));
    let mut config = agent::Config::new(args.state_dir.clone(), socket, listen);
    config.qemu = args.qemu;
    config.default_accel = match args.accel {
        AccelArg::Tcg => Accel::Tcg,
        AccelArg::Kvm => Accel::Kvm,
    };
    config.qemu_timeout = Duration::from_secs(30);
    config.tcg_workaround = args.tcg_workaround == Switch::On;
    agent::run(config, shutdown_signal())
        .await
        .context("livemigd failed")?;
    Ok(())
}
