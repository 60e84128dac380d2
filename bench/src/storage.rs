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
use crate::tls::migrate_with;

const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
const MEMORY_MIB: u32 = 192;
/// The writing guest's load: 4 MiB/s over a 16 MiB region.
const WRITE_KIB_S: u32 = 4096;

/// One copy.
#[derive(Debug, Clone, Serialize)]
pub struct StorageTrial {
    pub disk_gib: u64,
    pub load: &'static str,
    pub completed: bool,
    pub total_time_ms: u64,
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

async fn request(client: &Client, request: Request) -> Result<Reply> {
    Ok(client.request(request, REQUEST_TIMEOUT).await?)
}

async fn serial_path(client: &Client, name: &str) -> Result<PathBuf> {
    let domain = name.parse()?;
    match request(client, Request::DomInfo { domain }).await? {
        Reply::DomainInfo(info) => Ok(PathBuf::from(info.serial_log.unwrap_or_default())),
        other => bail!("unexpected reply {other:?}"),
    }
}

async fn serial(client: &Client, name: &str) -> Result<SerialLog> {
    Ok(SerialLog::read(&serial_path(client, name).await?)?)
}

async fn wait_serial(
    client: &Client,
    name: &str,
    ready: impl Fn(&SerialLog) -> bool,
) -> Result<SerialLog> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let log = serial(client, name).await?;
        if ready(&log) {
            return Ok(log);
        }
        if Instant::now() > deadline {
            bail!("the guest '{name}' did not get going");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// One copy of a `gib` GiB disk, `writing` or idle, at `bandwidth` MiB/s.
async fn trial(
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
    let workload = LinuxWorkload {
        disk: writing.then(|| "/dev/vda".to_string()),
        disk_kib_s: WRITE_KIB_S,
        disk_blocks: 4096,
        ..LinuxWorkload::memory(Workload::IDLE)
    };
    let definition = DomainDefinition::from_toml(&format!(
        "name = \"{name}\"\nmemory_mib = {MEMORY_MIB}\n[kernel]\npath = {:?}\ninitrd = {:?}\ncmdline = {:?}\n\
         [[disks]]\npath = {:?}\n",
        image.kernel.display().to_string(),
        image.initrd.display().to_string(),
        workload.cmdline(),
        hosts.local().join(&file).display().to_string(),
    ))?;
    request(
        &hosts.a_client,
        Request::Define {
            definition: DefinitionDoc(definition.to_document()),
        },
    )
    .await?;
    request(
        &hosts.a_client,
        Request::Start {
            domain: name.parse()?,
            paused: false,
        },
    )
    .await?;
    let before = wait_serial(&hosts.a_client, &name, |l| {
        l.progress.len() >= 2 && (!writing || l.last_disk().is_some_and(|d| d.verified > 0))
    })
    .await?;

    let source_log = serial_path(&hosts.a_client, &name).await?;
    // The guest's own write rate, undisturbed, over a few seconds.
    let baseline = if writing {
        let start = before.last_disk().map(|d| d.writes);
        let measured = Instant::now();
        tokio::time::sleep(Duration::from_secs(5)).await;
        let end = SerialLog::read(&source_log)?.last_disk().map(|d| d.writes);
        end.zip(start)
            .map(|(e, s)| (e - s) as f64 * 4.0 / measured.elapsed().as_secs_f64())
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
        let after = SerialLog::read(&source_log).ok();
        let writes = |l: &SerialLog| l.last_disk().map(|d| d.writes);
        after
            .as_ref()
            .and_then(writes)
            .zip(writes(&before))
            .map(|(end, start)| (end - start) as f64 * 4.0 / elapsed.as_secs_f64())
    } else {
        None
    };
    let (owner, other) = if completed {
        (&hosts.b_client, &hosts.a_client)
    } else {
        (&hosts.a_client, &hosts.b_client)
    };
    let disk_check = if writing {
        tokio::time::sleep(Duration::from_secs(3)).await;
        if serial(owner, &name).await?.disk_intact() {
            "ok"
        } else {
            "corrupt"
        }
    } else {
        "-"
    };
    let disk_bytes = record.stats.disk_total_bytes.unwrap_or(0);
    let memory_bytes = record.transferred_bytes;
    let rate = (bandwidth << 20) as f64;
    let minimum = (disk_bytes + memory_bytes) as f64 / rate;
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
    Ok(StorageTrial {
        disk_gib: gib,
        load,
        completed,
        total_time_ms: elapsed.as_millis() as u64,
        disk_bytes,
        memory_bytes,
        minimum_time_ms: (minimum * 1000.0) as u64,
        over_minimum: elapsed.as_secs_f64() / minimum.max(1e-9),
        downtime_ms: record.downtime_ms,
        guest_write_kib_s,
        guest_write_before_kib_s: baseline,
        disk_check,
    })
}

/// Every size, idle then writing.
pub async fn run(
    livemigd: &Path,
    sizes: &[u64],
    bandwidth: u64,
    json: bool,
) -> Result<Vec<StorageTrial>> {
    let hosts = Hosts::start_with(livemigd, true).await?;
    let parts = linux::Parts::installed(&linux::workload_beside_this_build())
        .context("the Linux guest (scripts/setup.sh, scripts/build-linux-guest.sh)")?;
    let image = linux::build(&parts, hosts.images())?;
    let mut trials = Vec::new();
    let result = async {
        for &gib in sizes {
            for writing in [false, true] {
                let t = trial(&hosts, &image, gib, writing, bandwidth).await?;
                crate::emit(
                    json,
                    &t,
                    format!(
                        "{:>2} GiB {:<7} completed={} total {:>6.1} s minimum {:>6.1} s ({:.2}x) disk {:>6.0} MiB memory {:>4.0} MiB downtime {:>4} guest writes {} disk {}",
                        t.disk_gib,
                        t.load,
                        t.completed,
                        t.total_time_ms as f64 / 1000.0,
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
                    ),
                );
                trials.push(t);
            }
        }
        Ok::<_, anyhow::Error>(())
    }
    .await;
    hosts.stop().await;
    result?;
    Ok(trials)
}
