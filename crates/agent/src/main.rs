//! `livemigd`: the livemig per-host agent.
//!
//! Settings come from a TOML file (`--config`), overridden by flags.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use domain::hypervisor::HypervisorKind;
use domain::Accel;
use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Switch {
    On,
    Off,
}

/// The livemig agent: owns this host's domains and runs migrations with its
/// peers.
#[derive(Debug, Parser)]
#[command(
    version,
    after_help = "Examples:\n  \
        livemigd --state-dir /var/lib/livemig --listen tls://10.0.0.1:7000 --tls-dir /etc/livemig/tls\n  \
        livemigd --config /etc/livemig/livemigd.toml\n\n\
        The config file takes the same settings as the flags (state_dir, socket, socket_group, listen,\n\
        metrics_listen, tls_dir,\n\
        insecure, qemu_monitor_command, migrate_tls_force, image_dirs = [\"/srv/images\"],\n\
        allow_device_nodes, qemu_user, qemu_sandbox = \"on\", hypervisor, qemu, accel, tcg_workaround, log_format,\n\
        migration_ports = \"49152-49215\", [timeouts] peer-silence = \"20s\",\n\
        [peers] allow_replace = [\"agent-a\"], max_jobs = 4, max_memory_mib, max_disk_gib,\n\
        [cluster] endpoints = \"https://10.0.0.9:2379\", link_mib_s, labels = { rack = \"r1\" },\n\
        cgroup_cpu); flags override it. LIVEMIG_LOG sets the log filter (e.g. debug)."
)]
struct Args {
    #[command(subcommand)]
    command: Option<Command>,
    /// TOML configuration file.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Directory for definitions, job history, run records, sockets and logs.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Unix socket for the local CLI [default: STATE_DIR/livemigd.sock].
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// A group whose members may use the unix socket too (it becomes 0660)
    /// [default: the agent's user and root only].
    #[arg(long, value_name = "GROUP")]
    socket_group: Option<String>,
    /// Network address for peer agents, remote CLIs and /metrics: tls://HOST:PORT
    /// (mutual TLS, with --tls-dir), or tcp://HOST:PORT with --insecure. Port 0
    /// picks one.
    #[arg(long, value_name = "tls://HOST:PORT")]
    listen: Option<String>,
    /// A second address that serves only GET /metrics, for Prometheus:
    /// tls://HOST:PORT (a client certificate of any role), or tcp:// with
    /// --insecure.
    #[arg(long, value_name = "tls://HOST:PORT")]
    metrics_listen: Option<String>,
    /// TLS directory (ca.pem, cert.pem, key.pem, from `livemig pki issue ...
    /// --role agent`): serves tls:// and dials peers with it.
    #[arg(long, value_name = "DIR")]
    tls_dir: Option<PathBuf>,
    /// Allow plaintext tcp:// (no certificates): only on a network where
    /// everyone is trusted.
    #[arg(long)]
    insecure: bool,
    /// Allow `qemu-monitor-command` (raw QMP, administrators only).
    #[arg(long)]
    allow_qemu_monitor_command: bool,
    /// Refuse live migrations, in or out, whose stream is not encrypted
    /// (`livemig migrate --tls`).
    #[arg(long)]
    migrate_tls_force: bool,
    /// A directory definitions may take kernels, initrds and disk images
    /// from; repeat for more [default: STATE_DIR/images].
    #[arg(long = "image-dir", value_name = "DIR")]
    image_dirs: Vec<PathBuf>,
    /// Disks may be device nodes (block devices) under the image directories.
    #[arg(long)]
    allow_device_nodes: bool,
    /// Run QEMU as this unprivileged user once it has opened its files
    /// (-runas / -run-with user=) [default: the agent's user].
    #[arg(long, value_name = "USER")]
    qemu_user: Option<String>,
    /// Filter QEMU's system calls with -sandbox (on if the binary has
    /// seccomp) [default: on].
    #[arg(long, value_enum)]
    qemu_sandbox: Option<Switch>,
    /// What runs the guests: qemu, or simulated (livemig-simvm: modelled
    /// guests that migrate for real between agents; for tests and for
    /// trying a cluster without guests) [default: qemu].
    #[arg(long, value_name = "KIND")]
    hypervisor: Option<HypervisorKind>,
    /// The hypervisor's program [default: qemu-system-x86_64, or
    /// livemig-simvm beside livemigd].
    #[arg(long, value_name = "PATH")]
    qemu: Option<PathBuf>,
    /// Default accelerator: tcg or kvm [default: tcg].
    #[arg(long)]
    accel: Option<Accel>,
    /// Work around QEMU < 9.0 losing guest writes when migrating under TCG
    /// (see `livemig domcapabilities`). `off` only serves to show the bug.
    #[arg(long, value_enum)]
    tcg_workaround: Option<Switch>,
    /// Ports the destination's QEMU may listen on for migration data, e.g.
    /// 49152-49215 [default: any free port].
    #[arg(long, value_name = "FIRST-LAST")]
    migration_ports: Option<String>,
    /// A timeout, NAME=DURATION (500ms, 20s, 2m); repeat for more. Names:
    /// peer-silence (20s), peer-retry (30s), prepare (90s), disk-progress
    /// (30s), throttle-lease (5s), client-idle (120s), client-write (30s),
    /// handshake (10s), orphan (60s), cluster-lease (10s), watch-interval
    /// (500ms: between a watch's reports of the running jobs).
    #[arg(long = "timeout", value_name = "NAME=DURATION")]
    timeouts: Vec<String>,
    /// A peer (agent certificate name, or `*`) whose incoming migrations
    /// may replace a domain defined here that was not handed to it;
    /// repeat for more [default: none].
    #[arg(long = "allow-replace", value_name = "PEER")]
    allow_replace: Vec<String>,
    /// Incoming migrations one peer may have under way at once [default: 4].
    #[arg(long, value_name = "N")]
    peer_max_jobs: Option<usize>,
    /// Guest RAM one peer's incoming migrations may hold at once, MiB
    /// [default: this host's RAM].
    #[arg(long, value_name = "MIB")]
    peer_max_memory: Option<u64>,
    /// Disk one peer's incoming migrations may create at once, GiB
    /// [default: 1024].
    #[arg(long, value_name = "GIB")]
    peer_max_disk: Option<u64>,
    /// Join the cluster whose etcd is at these endpoints,
    /// https://HOST:PORT[,...] (with --tls-dir; http:// only with
    /// --insecure): this host is registered there while the agent runs.
    #[arg(long, value_name = "URLS")]
    cluster: Option<String>,
    /// This host's migration link, MiB/s: predictions send a job's
    /// stop-and-copy at this speed once QEMU lifts its bandwidth cap (a
    /// 10 GbE path is assumed without it), and a cluster is told it.
    #[arg(long, value_name = "MIB_S")]
    link: Option<u32>,
    /// A label the cluster may select this host by, KEY=VALUE; repeat for
    /// more.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    labels: Vec<String>,
    /// How often to measure the idle guests' dirty rates in the
    /// background (500ms, 30s, 2m; `off`), so that a drain plans from a
    /// recent measurement without measuring first [default: 60s].
    #[arg(long, value_name = "DURATION")]
    measure_every: Option<String>,
    /// Log format on stderr [default: text].
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
}

/// What else the binary does besides serving.
#[derive(Debug, Subcommand)]
enum Command {
    /// Lift every vCPU throttle this agent (by its state directory) left
    /// in the cgroup tree, and exit: the systemd unit's stop hook.
    ReleaseThrottles,
    /// Hold one throttle's lease for the agent that started it (internal):
    /// lifts the throttle when stdin closes or stays silent for the lease.
    #[command(hide = true)]
    GuardThrottle {
        #[arg(long)]
        cgroup_root: PathBuf,
        #[arg(long)]
        scope: String,
        #[arg(long)]
        name: String,
        #[arg(long)]
        lease_ms: u64,
    },
}

/// `livemigd guard-throttle`: watches the agent's pipe on stdin.
fn guard_throttle(root: &Path, scope: &str, name: &str, lease_ms: u64) -> Result<()> {
    use migration::vcpu_throttle::{cgroup::Hierarchy, lease};
    let hierarchy = Hierarchy::probe(root).context("guard-throttle")?;
    let end = lease::guard(
        &hierarchy,
        scope,
        name,
        Duration::from_millis(lease_ms),
        std::io::BufReader::new(std::io::stdin()),
    )
    .context("guard-throttle")?;
    lease::report(scope, name, end);
    Ok(())
}

/// The config file; every field optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    state_dir: Option<PathBuf>,
    socket: Option<PathBuf>,
    socket_group: Option<String>,
    listen: Option<String>,
    metrics_listen: Option<String>,
    tls_dir: Option<PathBuf>,
    #[serde(default)]
    insecure: bool,
    #[serde(default)]
    qemu_monitor_command: bool,
    #[serde(default)]
    migrate_tls_force: bool,
    image_dirs: Option<Vec<PathBuf>>,
    #[serde(default)]
    allow_device_nodes: bool,
    qemu_user: Option<String>,
    qemu_sandbox: Option<Switch>,
    hypervisor: Option<HypervisorKind>,
    qemu: Option<PathBuf>,
    accel: Option<Accel>,
    tcg_workaround: Option<Switch>,
    migration_ports: Option<String>,
    log_format: Option<LogFormat>,
    cgroup_cpu: Option<PathBuf>,
    /// `name = "20s"`, as `--timeout` takes them.
    #[serde(default)]
    timeouts: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    peers: PeersFile,
    cluster: Option<ClusterFile>,
    /// As `--measure-every`.
    measure_every: Option<String>,
    /// As `--link` (also read from `[cluster]`).
    link_mib_s: Option<u32>,
}

/// `[cluster]`: the cluster this host joins.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterFile {
    endpoints: String,
    link_mib_s: Option<u32>,
    #[serde(default)]
    labels: std::collections::BTreeMap<String, String>,
}

/// `[peers]`: what another host may do when it sends a guest here.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PeersFile {
    #[serde(default)]
    allow_replace: Vec<String>,
    max_jobs: Option<usize>,
    max_memory_mib: Option<u64>,
    max_disk_gib: Option<u64>,
}

fn read_config(path: &Path) -> Result<ConfigFile> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("malformed config file {}", path.display()))
}

/// A network address (`flag`, parsed by [`parse_listen`]) is served with
/// TLS, or in plaintext only with `--insecure` and no TLS directory.
fn check_listen(
    flag: &str,
    listen: Option<(SocketAddr, bool)>,
    tls_dir: bool,
    insecure: bool,
) -> Result<()> {
    match (listen, tls_dir) {
        (Some((_, true)), false) => bail!(
            "{flag} tls://... needs --tls-dir DIR (create it with `livemig pki init PKI && \
             livemig pki issue PKI NAME --role agent --host HOST`)"
        ),
        (Some((addr, false)), _) if !insecure => bail!(
            "refusing plaintext {flag} tcp://{addr}: anyone who can reach it could see or control \
             this host's VMs. Use {flag} tls://{addr} --tls-dir DIR (create DIR with `livemig pki \
             init PKI && livemig pki issue PKI NAME --role agent --host HOST`), or pass --insecure \
             on a network where everyone is trusted"
        ),
        (Some((_, false)), true) => {
            bail!("{flag} tcp://... is plaintext; with --tls-dir, listen on tls://")
        }
        _ => Ok(()),
    }
}

/// `--listen`: the address, and whether it is `tls://`.
fn parse_listen(uri: &str) -> Result<(SocketAddr, bool)> {
    let (tls, rest) = match (uri.strip_prefix("tls://"), uri.strip_prefix("tcp://")) {
        (Some(rest), _) => (true, rest),
        (None, Some(rest)) => (false, rest),
        (None, None) => bail!(
            "--listen takes tls://HOST:PORT (or tcp://HOST:PORT with --insecure), got {uri:?}"
        ),
    };
    let addr = rest
        .trim_end_matches('/')
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve --listen {uri:?}"))?
        .next()
        .with_context(|| format!("--listen {uri:?} resolves to no address"))?;
    Ok((addr, tls))
}

fn parse_ports(range: &str) -> Result<(u16, u16)> {
    let (first, last) = range
        .split_once('-')
        .with_context(|| format!("migration ports take FIRST-LAST, got {range:?}"))?;
    let first: u16 = first.trim().parse().context("bad first migration port")?;
    let last: u16 = last.trim().parse().context("bad last migration port")?;
    if first == 0 || last < first {
        bail!("migration port range {range:?} is empty or starts at 0");
    }
    Ok((first, last))
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

/// Raises the open-file limit to what the host allows: every connection,
/// QEMU log and QMP socket is a descriptor.
fn raise_nofile_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(error = %e, soft, hard, "cannot raise the open-file limit");
            }
        }
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if let Some(Command::GuardThrottle {
        cgroup_root,
        scope,
        name,
        lease_ms,
    }) = &args.command
    {
        let (root, scope, name, lease_ms) =
            (cgroup_root.clone(), scope.clone(), name.clone(), *lease_ms);
        return tokio::task::spawn_blocking(move || guard_throttle(&root, &scope, &name, lease_ms))
            .await?;
    }
    let file = match &args.config {
        Some(path) => read_config(path)?,
        None => ConfigFile::default(),
    };
    init_logging(
        args.log_format
            .or(file.log_format)
            .unwrap_or(LogFormat::Text),
    );
    raise_nofile_limit();
    let state_dir = args
        .state_dir
        .or(file.state_dir)
        .context("no state directory: pass --state-dir DIR or set state_dir in --config")?;
    let listen = args
        .listen
        .or(file.listen)
        .as_deref()
        .map(parse_listen)
        .transpose()?;
    let tls_dir = args.tls_dir.or(file.tls_dir);
    let insecure = args.insecure || file.insecure;
    let metrics_listen = args
        .metrics_listen
        .or(file.metrics_listen)
        .as_deref()
        .map(parse_listen)
        .transpose()?;
    check_listen("--listen", listen, tls_dir.is_some(), insecure)?;
    check_listen(
        "--metrics-listen",
        metrics_listen,
        tls_dir.is_some(),
        insecure,
    )?;
    let socket = args
        .socket
        .or(file.socket)
        .unwrap_or_else(|| state_dir.join("livemigd.sock"));
    let mut config = agent::Config::new(state_dir, socket, listen.map(|(addr, _)| addr));
    config.tls_dir = tls_dir;
    if let Some(name) = args.socket_group.or(file.socket_group) {
        let group = nix::unistd::Group::from_name(&name)
            .ok()
            .flatten()
            .with_context(|| format!("--socket-group {name:?}: no such group on this host"))?;
        config.socket_group = Some(group.gid.as_raw());
    }
    config.metrics_listen = metrics_listen.map(|(addr, _)| addr);
    config.insecure = insecure;
    config.qemu_monitor_command = args.allow_qemu_monitor_command || file.qemu_monitor_command;
    config.migrate_tls_force = args.migrate_tls_force || file.migrate_tls_force;
    if !args.image_dirs.is_empty() {
        config.image_dirs = args.image_dirs;
    } else if let Some(dirs) = file.image_dirs {
        config.image_dirs = dirs;
    }
    for dir in &config.image_dirs {
        if !dir.is_absolute() {
            bail!("image directory {} must be absolute", dir.display());
        }
    }
    config.allow_device_nodes = args.allow_device_nodes || file.allow_device_nodes;
    config.qemu_sandbox = args.qemu_sandbox.or(file.qemu_sandbox) != Some(Switch::Off);
    config.qemu_user = args.qemu_user.or(file.qemu_user);
    if let Some(user) = &config.qemu_user {
        // QEMU would fail at every start; say so now.
        if nix::unistd::User::from_name(user).ok().flatten().is_none() {
            bail!("--qemu-user {user:?}: no such user on this host");
        }
    }
    config.hypervisor = args.hypervisor.or(file.hypervisor).unwrap_or_default();
    config.qemu = args
        .qemu
        .or(file.qemu)
        .unwrap_or_else(|| config.hypervisor.default_program());
    config.default_accel = args.accel.or(file.accel).unwrap_or(Accel::Tcg);
    config.qemu_timeout = Duration::from_secs(30);
    config.tcg_workaround = args.tcg_workaround.or(file.tcg_workaround) != Some(Switch::Off);
    config.migration_ports = args
        .migration_ports
        .or(file.migration_ports)
        .as_deref()
        .map(parse_ports)
        .transpose()?;
    for (name, value) in &file.timeouts {
        config
            .timeouts
            .apply(&format!("{name}={value}"))
            .with_context(|| {
                format!(
                    "[timeouts] in {}",
                    args.config.as_deref().unwrap_or(Path::new("?")).display()
                )
            })?;
    }
    for setting in &args.timeouts {
        config.timeouts.apply(setting).context("--timeout")?;
    }
    if let Some(every) = args.measure_every.or(file.measure_every) {
        config.measure_every = match every.as_str() {
            "off" => None,
            text => Some(
                agent::timeouts::parse_duration(text)
                    .ok()
                    .filter(|d| !d.is_zero())
                    .with_context(|| {
                        format!("--measure-every {text:?}: a duration (500ms, 30s, 2m) or off")
                    })?,
            ),
        };
    }
    let peers = &mut config.peers;
    peers.allow_replace = file.peers.allow_replace;
    peers.allow_replace.extend(args.allow_replace);
    if let Some(n) = args.peer_max_jobs.or(file.peers.max_jobs) {
        peers.max_jobs = n;
    }
    if let Some(mib) = args.peer_max_memory.or(file.peers.max_memory_mib) {
        peers.max_memory_mib = mib;
    }
    if let Some(gib) = args.peer_max_disk.or(file.peers.max_disk_gib) {
        peers.max_disk_gib = gib;
    }
    let from_file = file.cluster.unwrap_or_default();
    config.link_mib_s = args.link.or(file.link_mib_s).or(from_file.link_mib_s);
    if config.link_mib_s == Some(0) {
        anyhow::bail!("--link 0: the link's bandwidth is a positive number of MiB/s");
    }
    if let Some(endpoints) = args
        .cluster
        .or(Some(from_file.endpoints).filter(|e| !e.is_empty()))
    {
        let mut labels = from_file.labels;
        for label in &args.labels {
            let (key, value) = label
                .split_once('=')
                .with_context(|| format!("--label {label:?}: expected KEY=VALUE"))?;
            labels.insert(key.to_string(), value.to_string());
        }
        // Refused now rather than at the first connection.
        cluster::Endpoints::parse(&endpoints, config.insecure).context("--cluster")?;
        config.cluster = Some(agent::config::ClusterSettings {
            endpoints,
            link_mib_s: config.link_mib_s,
            labels,
        });
    }
    if let Some(cgroup) = file.cgroup_cpu {
        config.cgroup_cpu = cgroup;
    }
    if let Some(Command::ReleaseThrottles) = args.command {
        let released = agent::release_stale_throttles(&config);
        println!("released {released} vCPU throttle(s)");
        return Ok(());
    }
    agent::run(config, shutdown_signal())
        .await
        .context("livemigd failed")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges() {
        assert_eq!(parse_ports("49152-49215").unwrap(), (49152, 49215));
        assert!(parse_ports("5-1").is_err());
        assert!(parse_ports("0-10").is_err());
        assert!(parse_ports("7000").is_err());
    }

    #[test]
    fn the_packaged_config_parses_and_is_secure() {
        let file: ConfigFile =
            toml::from_str(include_str!("../../../contrib/livemigd.toml")).unwrap();
        assert!(file.listen.as_deref().unwrap().starts_with("tls://"));
        assert!(file.tls_dir.is_some() && !file.insecure && !file.qemu_monitor_command);
        // The CLI's default connection is this socket.
        assert_eq!(
            file.socket.as_deref(),
            Some(Path::new("/run/livemig/livemigd.sock"))
        );
        let unit = include_str!("../../../contrib/livemigd.service");
        for hardening in [
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "PrivateTmp=yes",
        ] {
            assert!(unit.contains(hardening), "{hardening}");
        }
    }

    #[test]
    fn the_config_file_refuses_unknown_keys() {
        let err = toml::from_str::<ConfigFile>("state_dri = \"/x\"").unwrap_err();
        assert!(err.to_string().contains("state_dri"), "{err}");
        let ok: ConfigFile =
            toml::from_str("listen = \"tcp://0.0.0.0:7000\"\naccel = \"kvm\"").unwrap();
        assert_eq!(ok.accel, Some(Accel::Kvm));
    }

    #[test]
    fn the_config_file_sets_timeouts_by_name() {
        let file: ConfigFile =
            toml::from_str("hypervisor = \"simulated\"\n[timeouts]\npeer-silence = \"3s\"")
                .unwrap();
        let mut timeouts = agent::Timeouts::default();
        for (name, value) in &file.timeouts {
            timeouts.apply(&format!("{name}={value}")).unwrap();
        }
        assert_eq!(timeouts.peer_silence, Duration::from_secs(3));
        assert_eq!(file.hypervisor, Some(HypervisorKind::Simulated));
    }
}
