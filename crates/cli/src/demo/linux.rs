//! `livemig demo --guest linux`: the Linux test guest with a disk and a NIC
//! on a bridge, two "hosts" in network namespaces on one L2 segment, a TCP
//! session to the guest kept open from host-a's side, and a live migration
//! (with `--copy-storage-all`, of the disk too). Needs root (namespaces,
//! bridges, mounts).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use domain::DomainDefinition;
use guest::linux::counter::keep_talking;
use guest::linux::{self, LinuxWorkload};
use guest::{SerialLog, Workload};
use launcher::netns::{connect_in, NetnsPair};
use launcher::{AgentProcess, LaunchOptions};
use protocol::domain::{DefinitionDoc, DomainState};
use protocol::job::JobStatus;
use protocol::{Client, ConvergeMode, MigrateOptions};

use super::{converge_mode, dominfo, find_livemigd, migrate_and_follow, stop_all, Say, DOMAIN};
use crate::agent::call;
use crate::args::DemoArgs;
use crate::output;
use protocol::call;

const GUEST_PORT: u16 = 7000;
const DISK_MIB: u64 = 1024;
const WAIT: Duration = Duration::from_secs(120);

/// The static workload: `--workload`, else where
/// `scripts/build-linux-guest.sh` puts it beside this build.
fn find_workload(given: Option<PathBuf>) -> PathBuf {
    given.unwrap_or_else(linux::workload_beside_this_build)
}

/// Waits until the guest's serial log satisfies `ready`.
async fn wait_log(
    serial: &Path,
    what: &str,
    ready: impl Fn(&SerialLog) -> bool,
) -> Result<SerialLog> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let log = SerialLog::read(serial)?;
        if let Some(error) = log.errors.first() {
            bail!("the guest reports: {error}");
        }
        if ready(&log) {
            return Ok(log);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{what} within {WAIT:?} (serial log {})", serial.display());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

pub async fn run(args: DemoArgs) -> Result<ExitCode> {
    let say = Say { json: args.json };
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "the Linux demo makes network namespaces, a bridge in each and mounts: run it as root"
        );
    }
    let tmp = tempfile::Builder::new()
        .prefix("livemig-demo-")
        .tempdir()
        .context("cannot create a temporary directory")?;
    let images = tmp.path().join("images");
    let local = tmp.path().join("local");
    for dir in ["images", "local", "local-a", "local-b"] {
        std::fs::create_dir_all(tmp.path().join(dir))?;
    }
    let parts = linux::Parts::installed(&find_workload(args.workload.clone()))?;
    let image = linux::build(&parts, &images)?;
    let net = NetnsPair::create_bridged("demo").map_err(|e| anyhow!(e))?;
    say.line(&format!(
        "==> Two hosts in network namespaces {} and {}, each with a bridge br0 on one segment \
         ({}.0/24)",
        net.a, net.b, net.prefix
    ));

    let livemigd = find_livemigd(args.livemigd.clone());
    let pki = tmp.path().join("pki");
    tls::pki::init_if_missing(&pki).context("cannot create the demo's CA")?;
    let launch = |host: &str, ns: &str, ip: &str| -> Result<LaunchOptions> {
        Ok(LaunchOptions {
            binary: livemigd.clone(),
            state_dir: tmp.path().join(format!("host-{host}")),
            listen: Some(format!("tls://{ip}:0")),
            tls_dir: Some(tls::pki::issue(
                &pki,
                &format!("host-{host}"),
                protocol::Role::Agent,
                &[ip.to_string()],
            )?),
            netns: Some(ns.to_string()),
            image_dirs: vec![images.clone(), local.clone()],
            extra_args: args
                .qemu
                .iter()
                .flat_map(|q| ["--qemu".to_string(), q.display().to_string()])
                .collect(),
            // Each host's own "local" storage, at the same path.
            private_dirs: vec![(tmp.path().join(format!("local-{host}")), local.clone())],
        })
    };
    let host_a = AgentProcess::spawn(&launch("a", &net.a, &net.a_ip)?)
        .await
        .with_context(|| format!("cannot start {}", livemigd.display()))?;
    let host_b = AgentProcess::spawn(&launch("b", &net.b, &net.b_ip)?).await?;
    let a = Client::connect(&host_a.local_uri()).await?;
    let b = Client::connect(&host_b.local_uri()).await?;
    let b_uri = host_b
        .tcp_uri()
        .ok_or_else(|| anyhow!("host-b does not listen on TCP"))?;

    let result = scenario(&args, &say, &net, (&a, &b), &b_uri, &image, tmp.path()).await;

    say.line("==> Cleaning up: the guest, both agents, the namespaces");
    stop_all([&a, &b], [host_a, host_b]).await;
    drop(net);
    result
}

/// The guest's definition: its disk at `disk`, on host-a's own storage
/// (not shared) with `--copy-storage-all`.
fn definition(
    args: &DemoArgs,
    image: &linux::LinuxImage,
    workload: &LinuxWorkload,
    disk: &Path,
) -> Result<DomainDefinition> {
    Ok(DomainDefinition::from_toml(&format!(
        "name = \"{DOMAIN}\"\nmemory_mib = {}\n[kernel]\npath = {:?}\ninitrd = {:?}\n\
         cmdline = {:?}\n[[disks]]\npath = {:?}\nformat = \"qcow2\"\nshared = {}\n\
         [[nics]]\nbridge = \"br0\"\n",
        args.memory,
        image.kernel.display().to_string(),
        image.initrd.display().to_string(),
        workload.cmdline(),
        disk.display().to_string(),
        !args.copy_storage_all,
    ))?)
}

async fn scenario(
    args: &DemoArgs,
    say: &Say,
    net: &NetnsPair,
    (a, b): (&Client, &Client),
    b_uri: &str,
    image: &linux::LinuxImage,
    dir: &Path,
) -> Result<ExitCode> {
    let (disk, disk_file) = if args.copy_storage_all {
        (dir.join("local/demo.qcow2"), dir.join("local-a/demo.qcow2"))
    } else {
        (dir.join("images/demo.qcow2"), dir.join("images/demo.qcow2"))
    };
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&disk_file)
        .arg(format!("{DISK_MIB}M"))
        .output()
        .context("cannot run qemu-img (qemu-utils)")?;
    if !out.status.success() {
        bail!("qemu-img create: {}", String::from_utf8_lossy(&out.stderr));
    }
    let address = format!("{}/24", net.address(10));
    let workload = LinuxWorkload {
        disk: Some("/dev/vda".into()),
        disk_blocks: 1024,
        disk_kib_s: 1024,
        port: Some(GUEST_PORT),
        address: Some(address.clone()),
        ..LinuxWorkload::memory(Workload::busy(args.working_set, args.spin))
    };
    let definition = definition(args, image, &workload, &disk)?;
    call(
        a,
        call::Define {
            definition: DefinitionDoc(definition.to_document()),
        },
    )
    .await?;
    call(
        a,
        call::Start {
            domain: DOMAIN.parse()?,
            paused: false,
        },
    )
    .await?;
    let info = dominfo(a).await?;
    let serial_a = PathBuf::from(info.serial_log.clone().unwrap_or_default());
    say.line(&format!(
        "==> Started '{DOMAIN}' (Linux) on host-a: {} MiB RAM, a {} MiB working set, a {DISK_MIB} \
         MiB qcow2 disk on {} written at 1 MiB/s, a NIC on br0 at {address}",
        args.memory,
        args.working_set,
        if args.copy_storage_all {
            "host-a's own storage"
        } else {
            "shared storage"
        },
    ));
    wait_log(&serial_a, "the guest did not check its disk", |l| {
        l.last_disk().is_some_and(|d| d.verified > 0) && l.progress.len() >= 2
    })
    .await?;

    let guest: std::net::SocketAddr = format!("{}:{GUEST_PORT}", net.address(10)).parse()?;
    let deadline = Instant::now() + WAIT;
    let stream = loop {
        match connect_in(&net.a, guest, Duration::from_secs(2)) {
            Ok(s) => break s,
            Err(e) if Instant::now() > deadline => {
                bail!("cannot reach the guest at {guest}: {e}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    };
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    say.line(&format!(
        "    a client on host-a's side holds a TCP session to {guest}, a line every 50 ms"
    ));
    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        let stop = stop.clone();
        std::thread::spawn(move || keep_talking(stream, Duration::from_millis(50), stop))
    };

    let converge = converge_mode(args);
    let flags = MigrateOptions {
        live: true,
        auto_converge: converge == ConvergeMode::Qemu,
        converge: (converge == ConvergeMode::Adaptive).then_some(converge),
        bandwidth: Some(args.bandwidth),
        timeout: Some(args.timeout),
        copy_storage_all: args.copy_storage_all,
        ..Default::default()
    };
    say.line(&format!(
        "==> livemig migrate --live{}{} --bandwidth {} {DOMAIN} {b_uri}",
        if converge == ConvergeMode::Qemu {
            " --auto-converge"
        } else {
            ""
        },
        if args.copy_storage_all {
            " --copy-storage-all"
        } else {
            ""
        },
        args.bandwidth
    ));
    let record = migrate_and_follow(a, b_uri, flags, args.json).await?;

    let (runs_on, owner) = match record.status {
        JobStatus::Completed => ("host-b", b),
        _ => ("host-a", a),
    };
    let info = dominfo(owner).await?;
    if info.state != DomainState::Running {
        bail!(
            "after the migration the guest is {} on {runs_on}",
            info.state
        );
    }
    let serial = PathBuf::from(info.serial_log.clone().unwrap_or_default());
    let verified = SerialLog::read(&serial)?
        .last_disk()
        .map_or(0, |d| d.verified);
    say.line(&format!(
        "==> Checking the guest on {runs_on}: memory, every disk block it rereads, the TCP session"
    ));
    let after = wait_log(&serial, "the guest did not go on checking", |l| {
        l.progress.len() >= 3 && l.last_disk().is_some_and(|d| d.verified >= verified + 1024)
    })
    .await?;
    stop.store(true, Ordering::SeqCst);
    let session = tokio::task::spawn_blocking(move || client.join())
        .await?
        .map_err(|_| anyhow!("the client thread panicked"))?;

    let before = SerialLog::read(&serial_a)?;
    let memory_ok = after.memory_intact() && before.memory_intact();
    let disk_ok = after.disk_intact() && before.disk_intact();
    let network_ok = session.unbroken();
    let check = |ok: bool| if ok { "ok" } else { "failed" };
    if args.json {
        let mut value = serde_json::to_value(&record)?;
        value["memory_check"] = check(memory_ok).into();
        value["disk_check"] = check(disk_ok).into();
        value["network_check"] = check(network_ok).into();
        value["network_longest_pause_ms"] = (session.longest_pause.as_millis() as u64).into();
        print!("{}", crate::commands::json(&value)?);
    } else {
        print!("{}", output::record_summary(&record));
        println!("Memory check: {}", check(memory_ok));
        let (reread, wrong) = after
            .last_disk()
            .map(|d| (d.verified, d.errors))
            .unwrap_or_default();
        println!(
            "Disk check: {} (the guest reread {reread} blocks as it wrote them; {wrong} wrong)",
            check(disk_ok)
        );
        println!(
            "Network check: {} ({} answers in order, longest pause {} ms{})",
            check(network_ok),
            session.numbers.len(),
            session.longest_pause.as_millis(),
            session
                .error
                .as_ref()
                .map(|e| format!(", {e}"))
                .unwrap_or_default()
        );
    }
    Ok(
        if record.status == JobStatus::Completed && memory_ok && disk_ok && network_ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        },
    )
}
