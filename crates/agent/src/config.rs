//! Agent configuration.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::timeouts::Timeouts;
use domain::hypervisor::HypervisorKind;
use domain::Accel;
use migration::vcpu_throttle::cgroup::Hierarchy;
use migration::vcpu_throttle::{lease, HostPlace};

/// How an agent runs.
#[derive(Debug, Clone)]
pub struct Config {
    /// Definitions, job records, QMP sockets and logs live here.
    pub state_dir: PathBuf,
    /// Unix socket for the local CLI.
    pub socket: PathBuf,
    /// A group whose members may use the unix socket too (it is then
    /// 0660, group-owned); by default only its owner and root.
    pub socket_group: Option<u32>,
    /// TCP address for peers and remote CLIs.
    pub listen: Option<SocketAddr>,
    /// A second address serving only `GET /metrics` (TLS with a client
    /// certificate, like `listen`).
    pub metrics_listen: Option<SocketAddr>,
    /// TLS directory (`ca.pem`, `cert.pem`, `key.pem`): the TCP listener
    /// speaks mutual TLS, and the agent dials its peers with it.
    pub tls_dir: Option<PathBuf>,
    /// Serve plaintext TCP (no `tls_dir`): only on a network where everyone
    /// is trusted.
    pub insecure: bool,
    /// Pass raw QMP commands to QEMU (`qemu-monitor-command`, admins
    /// only): off unless asked for, as it can make QEMU do anything.
    pub qemu_monitor_command: bool,
    /// Refuse live migrations whose stream is not encrypted (`--tls`), in
    /// and out.
    pub migrate_tls_force: bool,
    /// Directories definitions may take kernels, initrds and disk images
    /// from.
    pub image_dirs: Vec<PathBuf>,
    /// Disks (and images) may be device nodes.
    pub allow_device_nodes: bool,
    /// QEMU filters its system calls (`-sandbox`) when the binary has
    /// seccomp.
    pub qemu_sandbox: bool,
    /// QEMU drops to this user once it has opened its files (`-runas`, or
    /// `-run-with user=`).
    pub qemu_user: Option<String>,
    /// What runs the guests: QEMU, or simulated VMs (for tests and for
    /// trying the control plane without guests).
    pub hypervisor: HypervisorKind,
    /// The program the hypervisor runs: QEMU's binary, or `livemig-simvm`.
    pub qemu: PathBuf,
    /// Accelerator for probing and defaults.
    pub default_accel: Accel,
    /// Timeouts for QEMU start-up and QMP calls.
    pub qemu_timeout: Duration,
    /// How long a destination waits, after the source says the copy is
    /// done, for its QEMU to have received everything.
    pub finish_timeout: Duration,
    /// Size guest RAM off the 64-page grid on QEMU versions whose TCG
    /// migration loses writes (see `domain::qemu::layout`). Turning it off
    /// exists only to show that the guest's memory check catches the bug.
    pub tcg_workaround: bool,
    /// The cgroup v2 root, or the cgroup v1 `cpu` controller's mount
    /// point, for throttling vCPU threads from the host (`--converge
    /// adaptive`).
    pub cgroup_cpu: PathBuf,
    /// The program that holds a host throttle's lease (`livemigd
    /// guard-throttle`): this binary by default. Without one the adaptive
    /// controller uses QEMU's throttle.
    pub throttle_guard: Option<PathBuf>,
    /// Ports a destination QEMU may listen on for migration data; any free
    /// port when unset.
    pub migration_ports: Option<(u16, u16)>,
    /// How long it waits, for what.
    pub timeouts: Timeouts,
    /// What another host (an agent certificate) may do when it sends a
    /// guest here.
    pub peers: PeerRules,
    /// The cluster this host joins (`--cluster`), if any.
    pub cluster: Option<ClusterSettings>,
    /// How often the idle guests' dirty rates are measured in the
    /// background (`measurements`); none: only when asked.
    pub measure_every: Option<Duration>,
    /// This host's migration link, MiB/s (`--link`), in a cluster or not.
    pub link_mib_s: Option<u32>,
}

/// This host's place in a cluster: etcd's endpoints, and what it says of
/// itself there.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClusterSettings {
    /// `https://HOST:PORT[,...]` (`http://` only with `insecure`).
    pub endpoints: String,
    /// The bandwidth of this host's migration link, MiB/s.
    pub link_mib_s: Option<u32>,
    /// Labels the cluster may select this host by.
    pub labels: std::collections::BTreeMap<String, String>,
}

/// What this host lets a peer do when it sends a guest here. Every host of
/// a cluster holds an agent certificate, so these hold against one that
/// was compromised: it may hand over the guests it sends, within limits,
/// and nothing else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerRules {
    /// Peers (certificate names; `*` for any) whose incoming migrations may
    /// replace a domain defined here that was not handed to them.
    pub allow_replace: Vec<String>,
    /// Incoming migrations one peer may have under way at once.
    pub max_jobs: usize,
    /// Guest RAM one peer's incoming migrations may hold at once, MiB.
    pub max_memory_mib: u64,
    /// Disk one peer's incoming migrations may create at once, GiB.
    pub max_disk_gib: u64,
}

impl Default for PeerRules {
    fn default() -> Self {
        PeerRules {
            allow_replace: Vec::new(),
            max_jobs: 4,
            max_memory_mib: host_memory_mib().unwrap_or(64 << 10),
            max_disk_gib: 1024,
        }
    }
}

impl PeerRules {
    /// True when `peer` may replace a domain it was not handed.
    pub fn may_replace(&self, peer: &str) -> bool {
        self.allow_replace.iter().any(|p| p == "*" || p == peer)
    }
}

/// This host's RAM, from `/proc/meminfo`.
fn host_memory_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// A drain takes a measurement up to two minutes old (see
/// `fleet::survey`): once a minute keeps one at hand.
pub const DEFAULT_MEASURE_EVERY: Duration = Duration::from_secs(60);

impl Config {
    /// The defaults, with this state directory, socket and TCP address.
    pub fn new(state_dir: PathBuf, socket: PathBuf, listen: Option<SocketAddr>) -> Self {
        Config {
            image_dirs: vec![state_dir.join("images")],
            allow_device_nodes: false,
            qemu_sandbox: true,
            qemu_user: None,
            state_dir,
            socket,
            listen,
            metrics_listen: None,
            socket_group: None,
            tls_dir: None,
            insecure: false,
            qemu_monitor_command: false,
            migrate_tls_force: false,
            hypervisor: HypervisorKind::Qemu,
            qemu: HypervisorKind::Qemu.default_program(),
            default_accel: Accel::Tcg,
            qemu_timeout: Duration::from_secs(30),
            finish_timeout: Duration::from_secs(60),
            tcg_workaround: true,
            cgroup_cpu: Hierarchy::default_root(),
            throttle_guard: lease::default_program(),
            migration_ports: None,
            timeouts: Timeouts::default(),
            peers: PeerRules::default(),
            cluster: None,
            measure_every: Some(DEFAULT_MEASURE_EVERY),
            link_mib_s: None,
        }
    }
}

impl Config {
    /// The host's migration path speed, as configured for the cluster
    /// (`--link`): what a job's stop-and-copy gets once QEMU lifts its
    /// cap.
    pub fn path_bandwidth(&self) -> Option<types::Bandwidth> {
        self.link_mib_s
            .and_then(|mib| types::Bandwidth::from_mib_s(u64::from(mib)))
    }

    /// This agent's throttles: under its own scope, named after its state
    /// directory, so that agents sharing a host (and a restarted agent's
    /// predecessor) each see only their own.
    pub fn throttle_place(&self) -> HostPlace {
        HostPlace {
            root: self.cgroup_cpu.clone(),
            scope: throttle_scope(&self.state_dir),
            guard: self.throttle_guard.clone(),
            lease: self.timeouts.throttle_lease,
        }
    }
}

/// The throttle scope of the agent on `state_dir`.
pub fn throttle_scope(state_dir: &std::path::Path) -> String {
    use std::os::unix::ffi::OsStrExt;
    let hash = domain::devices::nic::stable_hash(state_dir.as_os_str().as_bytes());
    format!("agent-{hash:016x}")
}
