//! `livemig-bench storage`: a disk on one host's storage copied with the
//! guest (`--copy-storage-all`) at a capped link, idle and under a steady
//! guest write load, against the least time the link allows (disk and
//! memory at the cap). libvirt's `virsh migrate --copy-storage-all` is the
//! comparison the issue asks for where libvirtd can run; on machines
//! without it, the theoretical minimum is the baseline.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use domain::DomainDefinition;
use guest::linux::{self, LinuxWorkload};
use guest::{SerialLog, Workload};
use protocol::domain::DefinitionDoc;
use protocol::job::JobStatus;
use protocol::{Client, MigrateOptions, Reply, Request};
use serde::Serialize;

use crate::convergence::Hosts;
use crate::libvirt::{self, CompletedJob, DomainXml, LibvirtHosts};
use crate::tls::migrate_with;

const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
const MEMORY_MIB: u32 = 192;
/// The writing guest's load: 4 MiB/s over a 16 MiB region.
const WRITE_KIB_S: u32 = 4096;

/// One copy.
#[derive(Debug, Clone, Serialize)]
pub struct StorageTrial {
    /// `livemig`, or `virsh` (libvirt driving the same QEMU).
    pub engine: &'static str,
    pub disk_gib: u64,
    pub load: &'static str,
    pub completed: bool,
    pub error: Option<String>,
    /// From the command to its end, as this benchmark saw it.
    pub total_time_ms: u64,
    /// The engine's own figure for the job's time (livemig's record,
    /// libvirt's completed job).
    pub reported_time_ms: Option<u64>,
    pub disk_bytes: u64,
    pub memory_bytes: u64,
    /// (disk + memory) at the cap: the least time the link allows.
    pub minimum_time_ms: u64,
    pub over_minimum: f64,
    pub downtime_ms: Option<u64>,
    /// What the guest wrote to its disk while it was copied, KiB/s (its
    /// target: `WRITE_KIB_S`).
    pub guest_write_kib_s: Option<f64>,
    /// What it wrote in the seconds before, on its own: the baseline.
    pub guest_write_before_kib_s: Option<f64>,
    pub disk_check: &'static str,
}

/// A raw image of `gib` GiB full of data (a sparse or zero image would
/// not be copied).
fn fill(path: &Path, gib: u64) -> Result<()> {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let chunk: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8 + 1).collect();
    for _ in 0..gib * 256 {
        file.write_all(&chunk)?;
    }
    file.flush()?;
    Ok(())
}

pub async fn request(client: &Client, request: Request) -> Result<Reply> {
    Ok(client.request(request, REQUEST_TIMEOUT).await?)
}

/// Defines `definition` on the host behind `client` and starts it; the
/// path of its serial log.
pub async fn define_and_start(client: &Client, definition: &DomainDefinition) -> Result<PathBuf> {
    request(
        client,
        Request::Define {
            definition: DefinitionDoc(definition.to_document()),
        },
    )
    .await?;
    request(
        client,
        Request::Start {
            domain: definition.name.clone(),
            paused: false,
        },
    )
    .await?;
    serial_path(client, definition.name.as_str()).await
}

pub async fn serial_path(client: &Client, name: &str) -> Result<PathBuf> {
    let domain = name.parse()?;
    match request(client, Request::DomInfo { domain }).await? {
        Reply::DomainInfo(info) => Ok(PathBuf::from(info.serial_log.unwrap_or_default())),
        other => bail!("unexpected reply {other:?}"),
    }
}

/// The workload both engines run: idle, or rewriting and rereading 16 MiB
/// of its disk.
fn workload(writing: bool) -> LinuxWorkload {
    LinuxWorkload {
        disk: writing.then(|| "/dev/vda".to_string()),
        disk_kib_s: WRITE_KIB_S,
        disk_blocks: 4096,
        ..LinuxWorkload::memory(Workload::IDLE)
    }
}

async fn wait_log(path: &Path, writing: bool) -> Result<SerialLog> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let log = SerialLog::read(path).unwrap_or_default();
        if log.progress.len() >= 2 && (!writing || log.last_disk().is_some_and(|d| d.verified > 0))
        {
            return Ok(log);
        }
        if Instant::now() > deadline {
            bail!("the guest logging to {} did not get going", path.display());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Blocks the guest wrote between two logs, KiB/s over `elapsed`.
fn write_rate(before: &SerialLog, after: &SerialLog, elapsed: Duration) -> Option<f64> {
    let writes = |l: &SerialLog| l.last_disk().map(|d| d.writes);
    writes(after)
        .zip(writes(before))
        .map(|(end, start)| end.saturating_sub(start) as f64 * 4.0 / elapsed.as_secs_f64())
}

/// The guest's write rate on its own for a few seconds before the copy.
async fn baseline(source_log: &Path) -> Result<Option<f64>> {
    let before = SerialLog::read(source_log)?;
    let measured = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = SerialLog::read(source_log)?;
    Ok(write_rate(&before, &after, measured.elapsed()))
}

/// A few seconds after the switchover, the running copy's log: every block
/// it wrote reads back as written, and it reported at all.
async fn disk_check(owner_log: &Path) -> &'static str {
    tokio::time::sleep(Duration::from_secs(3)).await;
    match SerialLog::read(owner_log) {
        Ok(log) if log.last_disk().is_none() => "no report",
        Ok(log) if log.disk_intact() => "ok",
        Ok(_) => "corrupt",
        Err(_) => "no log",
    }
}

/// What an engine's copy measured; the trial adds the rest.
struct CopyOutcome {
    completed: bool,
    error: Option<String>,
    elapsed: Duration,
    reported_time_ms: Option<u64>,
    disk_bytes: u64,
    memory_bytes: u64,
    downtime_ms: Option<u64>,
    guest_write_kib_s: Option<f64>,
    disk_check: &'static str,
}

fn finish(
    engine: &'static str,
    gib: u64,
    load: &'static str,
    bandwidth: u64,
    baseline: Option<f64>,
    copy: CopyOutcome,
) -> StorageTrial {
    let rate = (bandwidth << 20) as f64;
    let minimum = (copy.disk_bytes + copy.memory_bytes) as f64 / rate;
    StorageTrial {
        engine,
        disk_gib: gib,
        load,
        completed: copy.completed,
        error: copy.error,
        total_time_ms: copy.elapsed.as_millis() as u64,
        reported_time_ms: copy.reported_time_ms,
        disk_bytes: copy.disk_bytes,
        memory_bytes: copy.memory_bytes,
        minimum_time_ms: (minimum * 1000.0) as u64,
        over_minimum: copy.elapsed.as_secs_f64() / minimum.max(1e-9),
        downtime_ms: copy.downtime_ms,
        guest_write_kib_s: copy.guest_write_kib_s,
        guest_write_before_kib_s: baseline,
        disk_check: copy.disk_check,
    }
}

/// One copy of a `gib` GiB disk, `writing` or idle, at `bandwidth` MiB/s,
/// between two livemig agents.
async fn livemig_trial(
    hosts: &Hosts,
    image: &linux::LinuxImage,
    gib: u64,
    writing: bool,
    bandwidth: u64,
) -> Result<StorageTrial> {
    let load = if writing { "writing" } else { "idle" };
    let name = format!("st-{gib}g-{load}");
    let file = format!("{name}.raw");
    fill(&hosts.local_of("a").join(&file), gib)?;
    let definition = DomainDefinition::from_toml(&format!(
        "name = \"{name}\"\nmemory_mib = {MEMORY_MIB}\n[kernel]\npath = {:?}\ninitrd = {:?}\ncmdline = {:?}\n\
         [[disks]]\npath = {:?}\n",
        image.kernel.display().to_string(),
        image.initrd.display().to_string(),
        workload(writing).cmdline(),
        hosts.local().join(&file).display().to_string(),
    ))?;
    let source_log = define_and_start(&hosts.a_client, &definition).await?;
    wait_log(&source_log, writing).await?;
    let baseline = if writing {
        baseline(&source_log).await?
    } else {
        None
    };
    let before = SerialLog::read(&source_log)?;
    let started = Instant::now();
    let record = migrate_with(
        &hosts.a_client,
        &name,
        hosts.b_uri(),
        MigrateOptions {
            live: true,
            copy_storage_all: true,
            bandwidth: Some(bandwidth),
            timeout: Some(1800),
            ..Default::default()
        },
    )
    .await?;
    let elapsed = started.elapsed();
    let completed = record.status == JobStatus::Completed;
    let guest_write_kib_s = if writing {
        // The source's log: what the guest wrote up to the switchover.
        write_rate(&before, &SerialLog::read(&source_log)?, elapsed)
    } else {
        None
    };
    let (owner, other) = if completed {
        (&hosts.b_client, &hosts.a_client)
    } else {
        (&hosts.a_client, &hosts.b_client)
    };
    let disk_check = if writing {
        disk_check(&serial_path(owner, &name).await?).await
    } else {
        "-"
    };
    let copy = CopyOutcome {
        completed,
        error: record.error.clone(),
        elapsed,
        // The whole job: `total_time_ms` is the memory's copy alone.
        reported_time_ms: Some(record.finished_at_ms.saturating_sub(record.started_at_ms)),
        disk_bytes: record.stats.disk_total_bytes.unwrap_or(0),
        memory_bytes: record.transferred_bytes,
        downtime_ms: record.downtime_ms,
        guest_write_kib_s,
        disk_check,
    };
    for client in [owner, other] {
        let _ = request(
            client,
            Request::Destroy {
                domain: name.parse()?,
            },
        )
        .await;
        let _ = request(
            client,
            Request::Undefine {
                domain: name.parse()?,
            },
        )
        .await;
    }
    for host in ["a", "b"] {
        let _ = std::fs::remove_file(hosts.local_of(host).join(&file));
    }
    Ok(finish("livemig", gib, load, bandwidth, baseline, copy))
}

/// A port nobody listens on now.
fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The same copy driven through libvirt: `virsh migrate --live
/// --copy-storage-all --bandwidth N` between two session daemons. libvirt
/// 9.0 does not create a file-backed target outside a storage pool, so the
/// destination's image is created empty beforehand (outside the timing),
/// at another path given with `--xml`, as an operator would.
async fn virsh_trial(
    libvirt: &LibvirtHosts,
    guest: &linux::LinuxImage,
    gib: u64,
    writing: bool,
    bandwidth: u64,
) -> Result<StorageTrial> {
    let load = if writing { "writing" } else { "idle" };
    let name = format!("vst-{gib}g-{load}");
    let files = libvirt.files();
    let (a, b) = (files.join("a"), files.join("b"));
    for dir in [&a, &b] {
        std::fs::create_dir_all(dir)?;
    }
    let disk = |dir: &Path| dir.join(format!("{name}.raw"));
    let log = |dir: &Path| dir.join(format!("{name}.log"));
    fill(&disk(&a), gib)?;
    let status = tokio::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "raw"])
        .arg(disk(&b))
        .arg(format!("{gib}G"))
        .status()
        .await?;
    if !status.success() {
        bail!("qemu-img create {} failed", disk(&b).display());
    }
    let cmdline = workload(writing).cmdline();
    let xml = |dir: &Path| {
        let image = disk(dir);
        let disks = [(image.as_path(), "raw")];
        DomainXml {
            name: &name,
            memory_mib: MEMORY_MIB,
            kernel: &guest.kernel,
            initrd: Some(&guest.initrd),
            cmdline: &cmdline,
            disks: &disks,
            serial_log: &log(dir),
        }
        .render()
    };
    std::fs::write(a.join(format!("{name}.xml")), xml(&a))?;
    std::fs::write(b.join(format!("{name}.xml")), xml(&b))?;
    libvirt::give_to_user(&files).await?;
    let source_xml = a.join(format!("{name}.xml")).display().to_string();
    let destination_xml = b.join(format!("{name}.xml")).display().to_string();
    libvirt.a.virsh(&["create", &source_xml]).await?;
    let result = async {
        let source_log = log(&a);
        wait_log(&source_log, writing).await?;
        let baseline = if writing {
            baseline(&source_log).await?
        } else {
            None
        };
        let before = SerialLog::read(&source_log)?;
        let migrate_uri = format!("tcp://127.0.0.1:{}", free_port()?);
        let disks_port = free_port()?.to_string();
        let bandwidth_arg = bandwidth.to_string();
        let started = Instant::now();
        let migrated = libvirt
            .a
            .virsh(&[
                "migrate",
                "--live",
                "--copy-storage-all",
                "--bandwidth",
                &bandwidth_arg,
                "--xml",
                &destination_xml,
                "--migrateuri",
                &migrate_uri,
                "--disks-port",
                &disks_port,
                &name,
                &libvirt.b.uri(),
            ])
            .await;
        let elapsed = started.elapsed();
        let completed = migrated.is_ok();
        let job = if completed {
            CompletedJob::parse(
                &libvirt
                    .b
                    .virsh(&["domjobinfo", "--completed", &name])
                    .await?,
            )
        } else {
            CompletedJob::default()
        };
        let guest_write_kib_s = if writing {
            write_rate(&before, &SerialLog::read(&source_log)?, elapsed)
        } else {
            None
        };
        let disk_check = if writing {
            disk_check(&log(if completed { &b } else { &a })).await
        } else {
            "-"
        };
        let copy = CopyOutcome {
            completed,
            error: migrated.err().map(|e| format!("{e:#}")),
            elapsed,
            reported_time_ms: job.elapsed_ms,
            // The destination's completed job has no disk figures: the
            // mirror copies the whole image, which is full of data.
            disk_bytes: job.file_bytes.unwrap_or(gib << 30),
            memory_bytes: job.memory_bytes.unwrap_or(0),
            downtime_ms: job.downtime_ms,
            guest_write_kib_s,
            disk_check,
        };
        Ok(finish("virsh", gib, load, bandwidth, baseline, copy))
    }
    .await;
    for host in [&libvirt.a, &libvirt.b] {
        let _ = host.virsh(&["destroy", &name]).await;
    }
    for dir in [&a, &b] {
        let _ = std::fs::remove_file(disk(dir));
    }
    result
}

/// One size and load copied by both engines: virsh's time over livemig's.
#[derive(Debug, Clone, Serialize)]
pub struct StorageComparison {
    pub summary: &'static str,
    pub disk_gib: u64,
    pub load: &'static str,
    pub livemig_total_time_ms: u64,
    pub virsh_total_time_ms: u64,
    pub virsh_over_livemig: f64,
}

/// The engines `--engines` may name.
pub const ENGINES: [&str; 2] = ["livemig", "virsh"];

fn describe(t: &StorageTrial) -> String {
    format!(
        "{:<7} {:>2} GiB {:<7} completed={} total {:>6.1} s (reported {}) minimum {:>6.1} s ({:.2}x) disk {:>6.0} MiB memory {:>4.0} MiB downtime {:>4} guest writes {} disk {}{}",
        t.engine,
        t.disk_gib,
        t.load,
        t.completed,
        t.total_time_ms as f64 / 1000.0,
        t.reported_time_ms.map_or("-".into(), |r| format!("{:.1} s", r as f64 / 1000.0)),
        t.minimum_time_ms as f64 / 1000.0,
        t.over_minimum,
        t.disk_bytes as f64 / (1u64 << 20) as f64,
        t.memory_bytes as f64 / (1u64 << 20) as f64,
        t.downtime_ms.map_or("-".into(), |d| format!("{d}ms")),
        t.guest_write_kib_s.map_or("-".into(), |k| format!(
            "{k:.0} KiB/s (before: {:.0})",
            t.guest_write_before_kib_s.unwrap_or(0.0)
        )),
        t.disk_check,
        t.error.as_ref().map_or(String::new(), |e| format!(" error: {e}")),
    )
}

/// Every size, idle then writing, with each engine in turn (the order
/// rotates from one size and load to the next).
pub async fn run(
    livemigd: &Path,
    sizes: &[u64],
    bandwidth: u64,
    engines: &[String],
    json: bool,
) -> Result<Vec<StorageTrial>> {
    if let Some(unknown) = engines.iter().find(|e| !ENGINES.contains(&e.as_str())) {
        bail!(
            "unknown engine '{unknown}': the engines are {}",
            ENGINES.join(", ")
        );
    }
    let mut hosts = Hosts::start_with(livemigd, true).await?;
    let libvirt = if engines.iter().any(|e| e == "virsh") {
        Some(LibvirtHosts::start().await.context(
            "the virsh engine needs libvirtd (apt-get install libvirt-daemon-driver-qemu \
             libvirt-clients); leave it out with --engines livemig",
        )?)
    } else {
        None
    };
    let parts = linux::Parts::installed(&linux::workload_beside_this_build())
        .context("the Linux guest (scripts/setup.sh, scripts/build-linux-guest.sh)")?;
    let image = linux::build(&parts, hosts.images())?;
    // libvirt's QEMUs run unprivileged: they get copies they can read.
    let libvirt_image = match &libvirt {
        Some(libvirt) => {
            std::fs::create_dir_all(libvirt.files())?;
            let copy = |from: &Path, name: &str| -> Result<PathBuf> {
                let to = libvirt.files().join(name);
                std::fs::copy(from, &to)?;
                Ok(to)
            };
            Some(linux::LinuxImage {
                kernel: copy(&image.kernel, "vmlinuz")?,
                initrd: copy(&image.initrd, "initrd")?,
            })
        }
        None => None,
    };
    let mut trials = Vec::new();
    let result = async {
        let mut turn = 0;
        for &gib in sizes {
            for writing in [false, true] {
                let mut order: Vec<&String> = engines.iter().collect();
                let shift = turn % order.len().max(1);
                order.rotate_left(shift);
                turn += 1;
                let mut times = Vec::new();
                for engine in order {
                    let t = match (engine.as_str(), &libvirt, &libvirt_image) {
                        ("virsh", Some(libvirt), Some(guest)) => {
                            virsh_trial(libvirt, guest, gib, writing, bandwidth).await?
                        }
                        _ => {
                            hosts.reconnect().await?;
                            livemig_trial(&hosts, &image, gib, writing, bandwidth).await?
                        }
                    };
                    crate::emit(json, &t, describe(&t));
                    if t.completed {
                        times.push((t.engine, t.total_time_ms));
                    }
                    trials.push(t);
                }
                let time_of = |name| times.iter().find(|(e, _)| *e == name).map(|(_, t)| *t);
                if let (Some(livemig), Some(virsh)) = (time_of("livemig"), time_of("virsh")) {
                    let c = StorageComparison {
                        summary: "storage",
                        disk_gib: gib,
                        load: if writing { "writing" } else { "idle" },
                        livemig_total_time_ms: livemig,
                        virsh_total_time_ms: virsh,
                        virsh_over_livemig: virsh as f64 / livemig.max(1) as f64,
                    };
                    let text = format!(
                        "summary {:>2} GiB {:<7} livemig {:.1} s virsh {:.1} s (virsh/livemig {:.2})",
                        c.disk_gib,
                        c.load,
                        livemig as f64 / 1000.0,
                        virsh as f64 / 1000.0,
                        c.virsh_over_livemig
                    );
                    crate::emit(json, &c, text);
                }
            }
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    drop(libvirt);
    hosts.stop().await;
    result?;
    Ok(trials)
}
