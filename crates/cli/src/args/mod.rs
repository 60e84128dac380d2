//! The command line, with virsh's command and option names where virsh has
//! them.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

mod migrate;

pub use migrate::{ConvergeArg, MigrateArgs};

#[derive(Debug, Parser)]
#[command(
    name = "livemig",
    version,
    about = "Manage livemig agents: define, start and live-migrate QEMU domains",
    after_help = "Examples:\n  \
        livemig -c unix:///var/lib/livemig/livemigd.sock define web1.toml\n  \
        livemig start web1\n  \
        livemig migrate --live --auto-converge --bandwidth 64 --verbose web1 tcp://10.0.0.2:7000\n  \
        livemig demo"
)]
pub struct Cli {
    /// Agent to talk to: unix:///PATH, tls://HOST:PORT (with --tls-dir) or
    /// tcp://HOST:PORT (an agent started --insecure) [default: the local
    /// agent, unix:///run/livemig/livemigd.sock].
    #[arg(
        short = 'c',
        long = "connect",
        env = "LIVEMIG_URI",
        global = true,
        value_name = "URI"
    )]
    pub connect: Option<String>,
    /// TLS directory (ca.pem, cert.pem, key.pem, from `livemig pki issue`)
    /// for tls:// agents.
    #[arg(long, env = "LIVEMIG_TLS_DIR", global = true, value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
    /// The cluster's etcd endpoints, https://HOST:PORT[,...] (with
    /// --tls-dir), for the cluster commands (`hosts`).
    #[arg(long, env = "LIVEMIG_CLUSTER", global = true, value_name = "URLS")]
    pub cluster: Option<String>,
    /// Talk to a plaintext (http://) cluster.
    #[arg(long, global = true)]
    pub insecure: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Args)]
pub struct Json {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct DomainArg {
    /// Domain name.
    pub domain: String,
}

#[derive(Debug, Subcommand)]
#[allow(clippy::enum_variant_names)] // virsh's command names
pub enum Command {
    /// Define (or update) a persistent domain from a TOML file.
    Define { file: PathBuf },
    /// Remove a domain's persistent definition.
    Undefine(DomainArg),
    /// Start a defined domain.
    Start {
        domain: String,
        /// Start with the vCPUs paused.
        #[arg(long)]
        paused: bool,
    },
    /// Stop a domain immediately (kills its QEMU).
    Destroy(DomainArg),
    /// Pause a running domain.
    Suspend(DomainArg),
    /// Resume a paused domain.
    Resume(DomainArg),
    /// List domains (with --cluster: every domain running in the cluster,
    /// and its host).
    List {
        /// Include inactive domains.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        json: Json,
    },
    /// Print a domain's definition as TOML, as the agent holds it (a file
    /// `define` takes back).
    Dumpdef { domain: String },
    /// Show a domain's details.
    Dominfo {
        domain: String,
        #[command(flatten)]
        json: Json,
    },
    /// Show a domain's state (running, paused, shut off, migrating out, ...).
    Domstate {
        domain: String,
        #[command(flatten)]
        json: Json,
    },
    /// Show what the host's QEMU binary supports.
    Domcapabilities {
        #[command(flatten)]
        json: Json,
    },
    /// Migrate a domain to another host's agent.
    Migrate(Box<MigrateArgs>),
    /// Show the active (or last completed) migration job of a domain.
    Domjobinfo {
        domain: String,
        /// Show the last finished job instead of the active one.
        #[arg(long)]
        completed: bool,
        /// Accepted for virsh compatibility: a finished job's record is
        /// always kept (see `livemig jobs`).
        #[arg(long, requires = "completed")]
        keep_completed: bool,
        #[command(flatten)]
        json: Json,
    },
    /// Abort a domain's active migration (the guest stays on the source).
    Domjobabort(DomainArg),
    /// Set the migration bandwidth, MiB/s (applies to a running job too).
    MigrateSetspeed {
        domain: String,
        /// MiB/s.
        bandwidth: u64,
    },
    /// Show the migration bandwidth, MiB/s: the running job's cap, else
    /// what the next migration gets.
    MigrateGetspeed {
        domain: String,
        #[command(flatten)]
        json: Json,
    },
    /// Show the maximum tolerable downtime, ms: the running job's limit,
    /// else what the next migration gets.
    MigrateGetmaxdowntime {
        domain: String,
        #[command(flatten)]
        json: Json,
    },
    /// Set the maximum tolerable downtime, ms (applies to a running job too).
    MigrateSetmaxdowntime {
        domain: String,
        /// Milliseconds.
        downtime: u64,
    },
    /// Switch a running migration (started with --postcopy) to post-copy.
    MigratePostcopy(DomainArg),
    /// Show the XBZRLE compression cache of a running domain's QEMU, in
    /// bytes, after setting it with --size.
    MigrateCompcache {
        domain: String,
        /// The new size, bytes: a power of two.
        #[arg(long, value_name = "BYTES")]
        size: Option<u64>,
        #[command(flatten)]
        json: Json,
    },
    /// Start measuring a running domain's memory dirty rate; read it with
    /// `domstats --dirtyrate` once the window has passed.
    #[command(name = "domdirtyrate-calc")]
    DomdirtyrateCalc {
        domain: String,
        /// The window, 1 to 60 seconds.
        #[arg(long, default_value_t = 1)]
        seconds: u32,
        /// page-sampling (default), dirty-bitmap or dirty-ring (KVM with a
        /// dirty ring).
        #[arg(long, value_name = "MODE")]
        mode: Option<String>,
    },
    /// Show a domain's statistics; --dirtyrate: its last dirty-rate
    /// measurement.
    Domstats {
        domain: String,
        /// The dirty rate measured by `domdirtyrate-calc`.
        #[arg(long)]
        dirtyrate: bool,
        #[command(flatten)]
        json: Json,
    },
    /// Measure a running domain's dirty rate and predict its migration under
    /// plain pre-copy, QEMU's auto-converge and the adaptive controller.
    Estimate {
        domain: String,
        /// Link bandwidth, MiB/s [default: the domain's migrate-setspeed,
        /// else 1024 assumed].
        #[arg(long, value_name = "MiB/s")]
        bandwidth: Option<u64>,
        /// Downtime limit, ms [default 300].
        #[arg(long, value_name = "MS")]
        downtime: Option<u64>,
        /// Time budget, s [default 600].
        #[arg(long, value_name = "S")]
        timeout: Option<u64>,
        /// Highest throttle the controller may use, percent.
        #[arg(long, value_name = "PCT")]
        max_throttle: Option<f64>,
        /// Take the agent's last measurement of the guest if it is at most
        /// this many seconds old, rather than measuring for a few seconds.
        #[arg(long, value_name = "S")]
        max_age: Option<u64>,
        #[command(flatten)]
        json: Json,
    },
    /// Follow every migration job on the agent as it goes (or one
    /// domain's), whoever started it, until interrupted.
    Watch {
        /// Only this domain's jobs.
        domain: Option<String>,
        #[command(flatten)]
        json: Json,
    },
    /// List finished migration jobs, newest first.
    Jobs {
        /// Only this domain's jobs.
        #[arg(long)]
        domain: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 20)]
        limit: u32,
        #[command(flatten)]
        json: Json,
    },
    /// Write a job's timeline as a chart: FILE.svg, or FILE.html (chart and
    /// summary in one self-contained page).
    Report {
        /// The job id (from `migrate`, `jobs` or `domjobinfo --completed`).
        id: String,
        /// Output file (.svg or .html).
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Show a migration job by id (live while it runs, then its record).
    Job {
        id: String,
        #[command(flatten)]
        json: Json,
    },
    /// Send a raw QMP command to a domain's QEMU.
    QemuMonitorCommand {
        domain: String,
        /// A QMP command object, e.g. '{"execute":"query-status"}'.
        command: String,
    },
    /// Certificates for mutual TLS: a CA, and a certificate per agent and
    /// per user.
    #[command(subcommand)]
    Pki(PkiCommand),
    /// List the cluster's hosts (needs --cluster): each agent registers its
    /// host while it runs.
    Hosts(Json),
    /// Cordon a host of the cluster (needs --cluster): no new guest lands
    /// there; what runs there goes on.
    Cordon {
        /// The host, by its name in the cluster.
        host: String,
        /// Why (shown in `hosts` and in refusals).
        #[arg(long, default_value = "cordoned")]
        reason: String,
    },
    /// Lift a host's cordon (needs --cluster).
    Uncordon {
        /// The host.
        host: String,
    },
    /// The cluster's migration policies (needs --cluster): settings for
    /// the domains whose labels a selector matches.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Drain a host of the cluster (needs --cluster and a running
    /// livemig-controller): cordon it and move every guest it runs to
    /// other hosts, ordered and paced by what each costs to move.
    Drain(DrainArgs),
    /// The cluster's drains, running and ended (needs --cluster).
    Drains(Json),
    /// Run the demo: a busy guest live-migrated with auto-converge between
    /// two agents on this machine.
    Demo(DemoArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Print the manual page (roff).
    Man,
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  \
    livemig --cluster https://10.0.0.1:2379 drain host-a --dry-run\n  \
    livemig --cluster https://10.0.0.1:2379 drain host-a --to host-b --to host-c --wait\n  \
    livemig --cluster https://10.0.0.1:2379 drain --watch host-a-1765000000000")]
pub struct DrainArgs {
    /// The host to drain, by its name in the cluster.
    #[arg(required_unless_present = "watch", conflicts_with = "watch")]
    pub host: Option<String>,
    /// Only these hosts may take its guests (repeat, or separate with
    /// commas) [default: any compatible host].
    #[arg(long, value_delimiter = ',', value_name = "HOST")]
    pub to: Vec<String>,
    /// At most this many of its migrations at once (the controller's
    /// per-host and cluster caps apply besides).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_parallel: Option<u32>,
    /// Plan only: measure the guests, say where each would go and how long
    /// the drain should take; record nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Follow the drain until it ends, and exit 1 if a guest could not
    /// be moved.
    #[arg(long)]
    pub wait: bool,
    /// Follow a recorded drain until it ends.
    #[arg(long, value_name = "ID")]
    pub watch: Option<String>,
    #[command(flatten)]
    pub json: Json,
}

#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    /// Create a CA in DIR (DIR/ca.pem, DIR/ca-key.pem); never overwrites.
    Init {
        /// The PKI directory.
        dir: PathBuf,
    },
    /// Issue a certificate into DIR/NAME/ (ca.pem, cert.pem, key.pem): a
    /// directory a daemon (--tls-dir) or a client uses as is.
    Issue {
        /// The PKI directory (from `pki init`).
        dir: PathBuf,
        /// The holder's name (an agent's host name, a user's name).
        name: String,
        /// What it may do: admin (everything), agent (the peer half of a
        /// migration), monitor (read-only).
        #[arg(long)]
        role: protocol::Role,
        /// A host name or address the agent is dialled by (agents; repeat
        /// for each).
        #[arg(long = "host", value_name = "HOST")]
        hosts: Vec<String>,
    },
    /// Issue etcd's server certificate into DIR/NAME/ and print the etcd
    /// options that serve the cluster over mutual TLS with it (clients
    /// need a certificate from the same CA: agents and administrators).
    Etcd {
        /// The PKI directory (from `pki init`).
        dir: PathBuf,
        /// An address or name etcd is reached at (repeat for each).
        #[arg(long = "host", value_name = "HOST", required = true)]
        hosts: Vec<String>,
        /// The certificate's directory name.
        #[arg(long, default_value = "etcd")]
        name: String,
    },
    /// Revoke the certificate issued to NAME: DIR/crl.pem lists every
    /// certificate revoked so far; copy it into every host's TLS directory
    /// (as crl.pem), where agents pick it up within seconds.
    Revoke {
        /// The PKI directory (from `pki init`).
        dir: PathBuf,
        /// The holder whose certificate is revoked.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Create or replace a policy. The most specific matching selector
    /// wins (ties: the first name); options given to `migrate` win over it.
    Set {
        /// The policy's name.
        name: String,
        /// The labels a domain must carry, KEY=VALUE[,KEY=VALUE...].
        #[arg(long, value_name = "LABELS")]
        selector: String,
        /// none, qemu or adaptive.
        #[arg(long, value_enum)]
        converge: Option<migrate::ConvergeArg>,
        /// The downtime the adaptive controller may grow to, ms.
        #[arg(long, value_name = "MS")]
        max_downtime: Option<u64>,
        /// The adaptive controller's highest vCPU throttle, percent.
        #[arg(long, value_name = "PCT")]
        max_throttle: Option<f64>,
        /// The adaptive controller may switch to post-copy.
        #[arg(long)]
        allow_postcopy: bool,
        /// Bandwidth, MiB/s.
        #[arg(long, value_name = "MIB_S")]
        bandwidth: Option<u64>,
        /// Time limit, s.
        #[arg(long, value_name = "S")]
        timeout: Option<u64>,
    },
    /// List the policies.
    List(Json),
    /// Remove a policy.
    Rm {
        /// The policy's name.
        name: String,
    },
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Guest RAM, MiB.
    #[arg(long, default_value_t = 512)]
    pub memory: u32,
    /// Guest working set the guest keeps dirtying, MiB.
    #[arg(long, default_value_t = 256)]
    pub working_set: u32,
    /// Guest busy-loop iterations per page write (higher = slower dirtying).
    #[arg(long, default_value_t = 2000)]
    pub spin: u32,
    /// Migration bandwidth cap, MiB/s.
    #[arg(long, default_value_t = 64)]
    pub bandwidth: u64,
    /// Give up (and keep the guest on the source) after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// Migrate without --auto-converge (to see it not converge).
    #[arg(long, conflicts_with = "converge")]
    pub no_auto_converge: bool,
    /// Who makes it converge: qemu (--auto-converge, the default), adaptive
    /// (livemig's controller) or none.
    #[arg(long, value_enum, value_name = "MODE")]
    pub converge: Option<ConvergeArg>,
    /// livemigd binary [default: next to this binary, else on PATH].
    #[arg(long, value_name = "PATH")]
    pub livemigd: Option<PathBuf>,
    /// QEMU binary for both agents.
    #[arg(long, value_name = "PATH")]
    pub qemu: Option<PathBuf>,
    /// Stream progress as NDJSON and print the job record (with
    /// memory_check) as JSON on the last line.
    #[arg(long)]
    pub json: bool,
    /// Also write a timeline report of the migration (FILE.svg or FILE.html).
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// The guest: the bare-metal test kernel, or the Linux guest with a
    /// disk, a NIC on a bridge and a TCP session kept open across the
    /// migration (needs root: it makes network namespaces).
    #[arg(long, value_enum, default_value_t = GuestArg::Bare)]
    pub guest: GuestArg,
    /// With --guest linux: the disk is on host-a's own storage and is
    /// copied with the guest.
    #[arg(long)]
    pub copy_storage_all: bool,
    /// The Linux guest's static workload [default: built by
    /// scripts/build-linux-guest.sh beside this build].
    #[arg(long, value_name = "PATH")]
    pub workload: Option<PathBuf>,
    /// The fleet: etcd, three agents in network namespaces and a
    /// controller; a host of mixed guests is drained (needs root).
    #[arg(long, conflicts_with_all = ["guest", "copy_storage_all"])]
    pub fleet: bool,
    /// With --fleet: each host's link, MiB/s each way.
    #[arg(long, default_value_t = 100, value_name = "MIB_S")]
    pub link: u64,
}

/// Which guest the demo migrates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum GuestArg {
    /// The bare-metal test kernel: memory only.
    Bare,
    /// Debian's cloud kernel with busybox and our workload.
    Linux,
}
