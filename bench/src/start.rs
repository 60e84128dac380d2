//! `livemig-bench start`: how long from the command to the first byte,
//! livemig against QEMU driven over raw QMP, side by side in one run.
//!
//! The same idle guest (the in-tree kernel, 64 MiB, plain pre-copy, no
//! bandwidth cap) migrates back and forth
//! - between two livemig agents on loopback (the agents speak mutual TLS;
//!   the migration stream is plain, as for the baselines): "command" is the
//!   agent's receipt of the request, "first byte" the source QEMU accepting
//!   `migrate` (the job record's `first_byte_ms`), "done" the record's end
//!   (the guest runs on the destination, the source QEMU is gone);
//! - between two QEMUs this process drives itself, started with the same
//!   command line livemig builds: `raw-qmp` starts the destination QEMU per
//!   migration (`-incoming defer`, `migrate-incoming`, `migrate`, wait,
//!   `cont` on the destination, `quit` on the source): what any tool has to
//!   do; `raw-qmp-prestarted` has the destination QEMU listening already,
//!   the floor.
//!
//! - between two session libvirtd on this machine with `virsh migrate
//!   --live` (libvirt 9.0 from Debian), timed from virsh's start to its
//!   end, the first byte on the wire through a relay.
//!
//! The order of the engines rotates with each repetition.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use domain::qemu::argv::{build_argv, Hardening, LaunchConfig, LaunchSpec};
use domain::qemu::layout::RamLayout;
use domain::qemu::process::VmProcess;
use domain::DomainDefinition;
use guest::Workload;
use migration::uri::parse_data_uri;
use protocol::job::JobStatus;
use protocol::MigrateOptions;
use qmp::commands::migration::{Migrate, MigrationStatus, QueryMigrate};
use qmp::commands::vm::Cont;
use serde::Serialize;

use crate::convergence::Hosts;
use crate::libvirt::{DomainXml, LibvirtHosts};
use crate::median;

const MEMORY_MIB: u32 = 64;
const QEMU: &str = "qemu-system-x86_64";
const QEMU_TIMEOUT: Duration = Duration::from_secs(30);
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(60);

/// One migration.
#[derive(Debug, Clone, Serialize)]
pub struct StartTrial {
    pub engine: &'static str,
    pub rep: u32,
    /// Command to the source QEMU accepting `migrate`, ms.
    pub first_byte_ms: f64,
    /// Command to the guest running on the destination alone, ms.
    pub done_ms: f64,
}

/// Medians per engine, and livemig's difference to each baseline.
#[derive(Debug, Clone, Serialize)]
pub struct StartSummary {
    pub summary: &'static str,
    pub reps: u32,
    pub medians: Vec<EngineMedians>,
    pub livemig_minus_raw_first_byte_ms: Option<f64>,
    pub livemig_minus_raw_done_ms: Option<f64>,
    /// A `virsh version` call: what virsh's own start and connection add
    /// to its figures.
    pub virsh_connect_ms: Option<f64>,
}

/// One engine's medians.
#[derive(Debug, Clone, Serialize)]
pub struct EngineMedians {
    pub engine: &'static str,
    pub first_byte_ms: Option<f64>,
    pub done_ms: Option<f64>,
}

const ENGINES: [&str; 4] = ["livemig", "raw-qmp", "raw-qmp-prestarted", "virsh"];

/// Runs `reps` migrations with each engine; prints each and the summary.
pub async fn run(livemigd: &Path, reps: u32, json: bool) -> Result<StartSummary> {
    let hosts = Hosts::start(livemigd).await?;
    let result = async {
        let mut raw = RawPair::start(hosts.images()).await?;
        let mut livemig = LivemigPair::start(&hosts).await?;
        let mut virsh = VirshPair::start()
            .await
            .context("the virsh engine needs libvirtd (apt-get install libvirt-daemon-driver-qemu libvirt-clients)")?;
        let mut trials = Vec::new();
        let mut virsh_connect = Vec::new();
        for rep in 1..=reps {
            for k in 0..ENGINES.len() {
                let engine = ENGINES[(k + rep as usize) % ENGINES.len()];
                let (first_byte_ms, done_ms) = match engine {
                    "livemig" => livemig.migrate().await?,
                    "raw-qmp" => raw.migrate(false).await?,
                    "virsh" => {
                        virsh_connect.push(virsh.connect_ms().await?);
                        virsh.migrate().await?
                    }
                    _ => raw.migrate(true).await?,
                };
                let trial = StartTrial {
                    engine,
                    rep,
                    first_byte_ms,
                    done_ms,
                };
                crate::emit(
                    json,
                    &trial,
                    format!(
                        "{engine:<19} rep {rep}: first byte {first_byte_ms:>7.1} ms, done {done_ms:>7.1} ms"
                    ),
                );
                trials.push(trial);
            }
        }
        raw.stop().await;
        let mut summary = summarize(reps, &trials);
        summary.virsh_connect_ms = median(virsh_connect);
        anyhow::Ok(summary)
    }
    .await;
    hosts.stop().await;
    result
}

fn summarize(reps: u32, trials: &[StartTrial]) -> StartSummary {
    let of = |engine: &str, f: fn(&StartTrial) -> f64| {
        median(
            trials
                .iter()
                .filter(|t| t.engine == engine)
                .map(f)
                .collect(),
        )
    };
    let medians: Vec<EngineMedians> = ENGINES
        .iter()
        .map(|&engine| EngineMedians {
            engine,
            first_byte_ms: of(engine, |t| t.first_byte_ms),
            done_ms: of(engine, |t| t.done_ms),
        })
        .collect();
    let diff = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a - b);
    StartSummary {
        summary: "start",
        reps,
        livemig_minus_raw_first_byte_ms: diff(medians[0].first_byte_ms, medians[1].first_byte_ms),
        livemig_minus_raw_done_ms: diff(medians[0].done_ms, medians[1].done_ms),
        virsh_connect_ms: None,
        medians,
    }
}

/// The guest on two agents, migrated back and forth.
struct LivemigPair<'a> {
    hosts: &'a Hosts,
    on_a: bool,
}

const LIVEMIG_GUEST: &str = "bench-start";

impl<'a> LivemigPair<'a> {
    async fn start(hosts: &'a Hosts) -> Result<LivemigPair<'a>> {
        hosts
            .start_guest(LIVEMIG_GUEST, MEMORY_MIB, Workload::IDLE)
            .await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        Ok(LivemigPair { hosts, on_a: true })
    }

    async fn migrate(&mut self) -> Result<(f64, f64)> {
        let (from, to) = if self.on_a {
            (&self.hosts.a_client, self.hosts.b_uri().to_string())
        } else {
            (&self.hosts.b_client, self.hosts.a_tcp_uri().to_string())
        };
        let flags = MigrateOptions {
            live: true,
            ..Default::default()
        };
        let record = crate::tls::migrate_with(from, LIVEMIG_GUEST, &to, flags).await?;
        if record.status != JobStatus::Completed {
            bail!("livemig's migration did not complete: {:?}", record.error);
        }
        self.on_a = !self.on_a;
        let first_byte = record
            .first_byte_ms
            .ok_or_else(|| anyhow!("the job record has no first byte time"))?;
        let done = record.finished_at_ms.saturating_sub(record.started_at_ms);
        Ok((first_byte as f64, done as f64))
    }
}

/// Two QEMUs driven over raw QMP: the running guest, and (for the
/// pre-started runs) a destination already listening.
struct RawPair {
    dir: PathBuf,
    definition: DomainDefinition,
    spec: LaunchSpec,
    source: VmProcess,
    serial: u32,
}

impl RawPair {
    async fn start(images: &Path) -> Result<RawPair> {
        let dir = images.join("raw-qmp");
        std::fs::create_dir_all(&dir)?;
        let kernel = guest::install_kernel(&dir)?;
        let definition = DomainDefinition::from_toml(&guest::definition_toml(
            "raw",
            MEMORY_MIB,
            &kernel,
            Workload::IDLE,
        ))?;
        let binary = domain::qemu::probe(Path::new(QEMU), QEMU_TIMEOUT)
            .await
            .context("probing QEMU")?;
        let machine = binary
            .resolve_machine(&definition.machine)
            .ok_or_else(|| anyhow!("QEMU has no machine {}", definition.machine))?;
        // The same layout livemig gives this guest (the TCG workaround).
        let spec = LaunchSpec {
            machine,
            accel: definition.accel,
            ram: RamLayout::for_domain(MEMORY_MIB, definition.accel, binary.version),
        };
        let pair = RawPair {
            source: spawn(&dir, &definition, &spec, "qemu-0", false).await?,
            dir,
            definition,
            spec,
            serial: 1,
        };
        tokio::time::sleep(Duration::from_secs(2)).await;
        Ok(pair)
    }

    /// One migration to a new QEMU; the times from the "command" (before
    /// the destination is started, or with it already listening).
    async fn migrate(&mut self, prestarted: bool) -> Result<(f64, f64)> {
        let name = format!("qemu-{}", self.serial);
        self.serial += 1;
        let early = if prestarted {
            Some(spawn(&self.dir, &self.definition, &self.spec, &name, true).await?)
        } else {
            None
        };
        let command = Instant::now();
        let destination = match early {
            Some(d) => d,
            None => spawn(&self.dir, &self.definition, &self.spec, &name, true).await?,
        };
        let listen = parse_data_uri("tcp:127.0.0.1:0").map_err(|e| anyhow!("{e}"))?;
        let uri = migration::incoming::listen(destination.qmp(), &listen).await?;
        self.source
            .qmp()
            .execute(&Migrate {
                uri: uri.to_string(),
                resume: None,
            })
            .await?;
        let first_byte = command.elapsed();
        let deadline = Instant::now() + MIGRATION_TIMEOUT;
        loop {
            let info = self.source.qmp().execute(&QueryMigrate).await?;
            match info.status {
                Some(MigrationStatus::Completed) => break,
                Some(s) if s.is_finished() => bail!("raw QMP migration ended {s:?}"),
                _ if Instant::now() > deadline => bail!("raw QMP migration did not complete"),
                _ => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
        migration::incoming::wait_complete(destination.qmp(), MIGRATION_TIMEOUT).await?;
        destination.qmp().execute(&Cont).await?;
        let old = std::mem::replace(&mut self.source, destination);
        old.shutdown(QEMU_TIMEOUT).await;
        let done = command.elapsed();
        Ok((ms(first_byte), ms(done)))
    }

    async fn stop(self) {
        self.source.kill_and_wait(QEMU_TIMEOUT).await;
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Starts QEMU `name` for `definition` with livemig's command line.
async fn spawn(
    dir: &Path,
    definition: &DomainDefinition,
    spec: &LaunchSpec,
    name: &str,
    incoming: bool,
) -> Result<VmProcess> {
    let qmp_socket = dir.join(format!("{name}.qmp"));
    let serial_log = dir.join(format!("{name}.serial"));
    let argv = build_argv(&LaunchConfig {
        definition,
        spec,
        qmp_socket: &qmp_socket,
        serial_log: &serial_log,
        incoming,
        taps: &[],
        hardening: Hardening::default(),
    });
    Ok(VmProcess::spawn(
        Path::new(QEMU),
        &argv,
        &qmp_socket,
        &dir.join(format!("{name}.log")),
        QEMU_TIMEOUT,
    )
    .await?)
}

/// The guest on two session libvirtd, migrated back and forth with
/// `virsh migrate --live`. libvirt owns the QEMUs' monitors, so the first
/// byte is timed on the wire: the destination listens on 127.0.0.2 and the
/// source's stream goes through a relay on 127.0.0.1 that notes its first
/// byte. "Command" is virsh's start: its time includes virsh connecting to
/// both daemons (`virsh_connect_ms` in the summary measures that alone).
struct VirshPair {
    libvirt: LibvirtHosts,
    on_a: bool,
}

const VIRSH_GUEST: &str = "bench-start-virsh";

impl VirshPair {
    async fn start() -> Result<VirshPair> {
        let libvirt = LibvirtHosts::start().await?;
        let files = libvirt.files();
        std::fs::create_dir_all(&files)?;
        let kernel = guest::install_kernel(&files)?;
        let cmdline = Workload::IDLE.cmdline();
        let serial_log = files.join(format!("{VIRSH_GUEST}.log"));
        let xml = DomainXml {
            name: VIRSH_GUEST,
            memory_mib: MEMORY_MIB,
            kernel: &kernel,
            initrd: None,
            cmdline: &cmdline,
            disks: &[],
            serial_log: &serial_log,
        }
        .render();
        let xml_path = files.join(format!("{VIRSH_GUEST}.xml"));
        std::fs::write(&xml_path, xml)?;
        crate::libvirt::give_to_user(&files).await?;
        libvirt
            .a
            .virsh(&["create", &xml_path.display().to_string()])
            .await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
        Ok(VirshPair {
            libvirt,
            on_a: true,
        })
    }

    async fn migrate(&mut self) -> Result<(f64, f64)> {
        let (from, to) = if self.on_a {
            (&self.libvirt.a, &self.libvirt.b)
        } else {
            (&self.libvirt.b, &self.libvirt.a)
        };
        let relay = FirstByteRelay::bind().await?;
        let migrate_uri = format!("tcp://127.0.0.1:{}", relay.port);
        let to_uri = to.uri();
        let command = Instant::now();
        let relayed = tokio::spawn(relay.run());
        from.virsh(&[
            "migrate",
            "--live",
            "--migrateuri",
            &migrate_uri,
            "--listen-address",
            RELAY_TARGET,
            VIRSH_GUEST,
            &to_uri,
        ])
        .await?;
        let done = command.elapsed();
        let first_byte = tokio::time::timeout(QEMU_TIMEOUT, relayed)
            .await
            .context("the relay saw no stream")???;
        self.on_a = !self.on_a;
        Ok((ms(first_byte.duration_since(command)), ms(done)))
    }

    /// A `virsh` call that only connects, and asks for the version.
    async fn connect_ms(&self) -> Result<f64> {
        let started = Instant::now();
        self.libvirt.a.virsh(&["version"]).await?;
        Ok(ms(started.elapsed()))
    }
}

/// Where libvirt's destination QEMU listens; the relay forwards to it.
const RELAY_TARGET: &str = "127.0.0.2";

/// One migration stream's relay: accepts the source's connection on
/// 127.0.0.1, connects to the same port on [`RELAY_TARGET`], copies both
/// ways, and returns when the first byte arrived from the source.
struct FirstByteRelay {
    listener: tokio::net::TcpListener,
    port: u16,
}

impl FirstByteRelay {
    async fn bind() -> Result<FirstByteRelay> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        Ok(FirstByteRelay { listener, port })
    }

    async fn run(self) -> Result<Instant> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut source, _) = tokio::time::timeout(MIGRATION_TIMEOUT, self.listener.accept())
            .await
            .context("the source never connected")??;
        let mut destination = tokio::net::TcpStream::connect((RELAY_TARGET, self.port)).await?;
        let mut first = [0u8; 1];
        tokio::time::timeout(MIGRATION_TIMEOUT, source.read_exact(&mut first))
            .await
            .context("the source sent nothing")??;
        let at = Instant::now();
        destination.write_all(&first).await?;
        tokio::spawn(async move {
            let _ = tokio::io::copy_bidirectional(&mut source, &mut destination).await;
        });
        Ok(at)
    }
}
