//! `livemig demo`: two agents on loopback, a busy guest, a live migration
//! with auto-converge, and a check that the guest's memory survived;
//! `linux`: the Linux guest with its disk and network; `fleet`: a host
//! of mixed guests drained through etcd and the controller.

mod fleet;
mod linux;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use domain::DomainDefinition;
use guest::{SerialLog, Workload};
use launcher::{AgentProcess, LaunchOptions};
use protocol::domain::{DefinitionDoc, DomainInfo, DomainState};
use protocol::job::JobStatus;
use protocol::{Client, ConvergeMode, MigrateOptions, Request};

use crate::agent::call;
use crate::args::{DemoArgs, GuestArg};
use crate::progress::Progress;
use crate::{migrate, output};
use protocol::call;

const DOMAIN: &str = "demo-busy";
const GUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Who makes it converge, from `--converge` / `--no-auto-converge`.
fn converge_mode(args: &DemoArgs) -> ConvergeMode {
    match (args.converge, args.no_auto_converge) {
        (Some(mode), _) => mode.into(),
        (None, true) => ConvergeMode::None,
        (None, false) => ConvergeMode::Qemu,
    }
}

/// Destroys the demo's guest wherever it is and stops both agents.
async fn stop_all(clients: [&Client; 2], agents: [AgentProcess; 2]) {
    for client in clients {
        if let Ok(domain) = DOMAIN.parse() {
            let _ = client
                .request(Request::Destroy { domain }, Duration::from_secs(20))
                .await;
        }
    }
    for agent in agents {
        agent.stop(Duration::from_secs(20)).await;
    }
}

/// Starts the demo guest's migration from `a` and shows its progress
/// until the record.
async fn migrate_and_follow(
    a: &Client,
    b_uri: &str,
    flags: MigrateOptions,
    json: bool,
) -> Result<protocol::job::JobRecord> {
    let migration = call(
        a,
        call::Migrate {
            domain: DOMAIN.parse()?,
            destination: b_uri.to_string(),
            flags,
        },
    )
    .await?;
    let call::Migration::Started(job_id) = migration else {
        bail!("the demo's migration was a dry run");
    };
    let mut progress = Progress::new(&job_id, json);
    migrate::follow(a, DOMAIN, &job_id, &mut progress).await
}

/// Where progress goes: stdout for people, stderr when stdout carries JSON.
struct Say {
    json: bool,
}

impl Say {
    fn line(&self, text: &str) {
        if self.json {
            eprintln!("{text}");
        } else {
            println!("{text}");
        }
    }
}

fn find_livemigd(given: Option<PathBuf>) -> PathBuf {
    if let Some(path) = given {
        return path;
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("livemigd")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("livemigd"))
}

async fn dominfo(client: &Client) -> Result<DomainInfo> {
    crate::commands::domains::info(client, DOMAIN).await
}

/// Waits until the guest's serial log shows `lines` progress lines whose
/// pass counter has advanced by `passes` since the first.
async fn wait_for_guest(log: &Path, lines: usize, passes: u64) -> Result<SerialLog> {
    let deadline = tokio::time::Instant::now() + GUEST_TIMEOUT;
    loop {
        let parsed = SerialLog::read(log)?;
        if let Some(error) = parsed.errors.first() {
            bail!("the guest could not run its workload: {error}");
        }
        if let (Some(first), Some(last)) = (parsed.progress.first(), parsed.progress.last()) {
            if parsed.progress.len() >= lines && last.pass >= first.pass + passes {
                return Ok(parsed);
            }
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "the guest made no progress within {GUEST_TIMEOUT:?} (serial log {})",
                log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn dirty_rate_mib_s(log: &SerialLog) -> Option<f64> {
    let (a, b) = (log.progress.first()?, log.progress.last()?);
    let dt = b.t_ms.checked_sub(a.t_ms).filter(|d| *d > 0)? as f64 / 1000.0;
    Some((b.writes - a.writes) as f64 * 4096.0 / dt / (1024.0 * 1024.0))
}

pub async fn run(args: DemoArgs) -> Result<ExitCode> {
    if args.fleet {
        return fleet::run(args).await;
    }
    if args.guest == GuestArg::Linux {
        return linux::run(args).await;
    }
    if args.copy_storage_all {
        bail!("--copy-storage-all needs --guest linux (the test kernel has no disk)");
    }
    let say = Say { json: args.json };
    let tmp = tempfile::Builder::new()
        .prefix("livemig-demo-")
        .tempdir()
        .context("cannot create a temporary directory")?;
    let kernel = guest::install_kernel(tmp.path())?;
    let livemigd = find_livemigd(args.livemigd.clone());
    let extra_args: Vec<String> = args
        .qemu
        .iter()
        .flat_map(|q| ["--qemu".to_string(), q.display().to_string()])
        .collect();
    // A throwaway PKI: the agents talk mutual TLS, as in production.
    let pki = tmp.path().join("pki");
    tls::pki::init_if_missing(&pki).context("cannot create the demo's CA")?;
    let launch = |host: &str| -> Result<LaunchOptions> {
        Ok(LaunchOptions {
            binary: livemigd.clone(),
            state_dir: tmp.path().join(host),
            listen: Some("tls://127.0.0.1:0".into()),
            tls_dir: Some(tls::pki::issue(
                &pki,
                host,
                protocol::Role::Agent,
                &["127.0.0.1".into()],
            )?),
            netns: None,
            // The demo's guest kernel is in its temporary directory.
            image_dirs: vec![tmp.path().to_path_buf()],
            extra_args: extra_args.clone(),
            private_dirs: Vec::new(),
        })
    };

    say.line("==> Starting two livemig agents on loopback (host-a, host-b)");
    let host_a = AgentProcess::spawn(&launch("host-a")?)
        .await
        .with_context(|| format!("cannot start {}", livemigd.display()))?;
    let host_b = AgentProcess::spawn(&launch("host-b")?).await?;
    let a = Client::connect(&host_a.local_uri()).await?;
    let b = Client::connect(&host_b.local_uri()).await?;
    let b_uri = host_b
        .tcp_uri()
        .ok_or_else(|| anyhow!("host-b does not listen on TCP"))?;
    say.line(&format!(
        "    host-a: {}  host-b: {b_uri}",
        host_a.tcp_uri().unwrap_or_default()
    ));

    let result = scenario(&args, &say, &a, &b, &b_uri, &kernel).await;

    say.line("==> Cleaning up: stopping the guest and both agents");
    stop_all([&a, &b], [host_a, host_b]).await;
    result
}

async fn scenario(
    args: &DemoArgs,
    say: &Say,
    a: &Client,
    b: &Client,
    b_uri: &str,
    kernel: &Path,
) -> Result<ExitCode> {
    let workload = Workload::busy(args.working_set, args.spin);
    let definition = DomainDefinition::from_toml(&guest::definition_toml(
        DOMAIN,
        args.memory,
        kernel,
        workload,
    ))?;
    let definition = DefinitionDoc(definition.to_document());
    call(a, call::Define { definition }).await?;
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
        "==> Started '{DOMAIN}' on host-a: {} MiB RAM, guest dirtying a {} MiB working set (QEMU {}, pid {})",
        args.memory,
        args.working_set,
        info.qemu_version.as_deref().unwrap_or("?"),
        info.qemu_pid.unwrap_or(0)
    ));
    if let Some(note) = &info.tcg_dirty_bitmap_workaround {
        say.line(&format!("    TCG dirty-bitmap workaround {note}"));
    }
    let before = wait_for_guest(&serial_a, 3, 1).await?;
    let rate = dirty_rate_mib_s(&before).unwrap_or(0.0);
    say.line(&format!(
        "    guest rewrites {rate:.0} MiB/s of memory; migration bandwidth is capped at {} MiB/s",
        args.bandwidth
    ));

    let converge = converge_mode(args);
    let flags = MigrateOptions {
        live: true,
        auto_converge: converge == ConvergeMode::Qemu,
        converge: (converge == ConvergeMode::Adaptive).then_some(converge),
        bandwidth: Some(args.bandwidth),
        timeout: Some(args.timeout),
        ..Default::default()
    };
    let how = match converge {
        ConvergeMode::Qemu => " --auto-converge",
        ConvergeMode::Adaptive => " --converge adaptive",
        ConvergeMode::None => "",
    };
    say.line(&format!(
        "==> livemig migrate --live{how} --bandwidth {} --timeout {} {DOMAIN} {b_uri}",
        args.bandwidth, args.timeout
    ));
    let record = migrate_and_follow(a, b_uri, flags, args.json).await?;
    if let Some(path) = &args.report {
        report::write(&record, path)
            .with_context(|| format!("cannot write the report to {}", path.display()))?;
        say.line(&format!(
            "==> Timeline report written to {}",
            path.display()
        ));
    }

    // Where the guest runs now, and whether its memory survived.
    let (runs_on, client) = match record.status {
        JobStatus::Completed => ("host-b", b),
        _ => ("host-a", a),
    };
    let info = dominfo(client).await?;
    if info.state != DomainState::Running {
        bail!(
            "after the migration the guest is {} on {runs_on}",
            info.state
        );
    }
    let domains = call(a, call::List { all: true }).await?;
    let source_gone = !domains.iter().any(|d| d.name == DOMAIN && d.id.is_some());
    let serial = PathBuf::from(info.serial_log.clone().unwrap_or_default());
    say.line(&format!(
        "==> Checking the guest on {runs_on}: it must keep running and find every page intact"
    ));
    let after = wait_for_guest(&serial, 3, 2).await?;
    let intact = after.memory_intact() && SerialLog::read(&serial_a)?.memory_intact();
    let memory_check = if intact { "ok" } else { "corrupt" };
    let last = after.last_progress().expect("wait_for_guest saw progress");
    say.line(&format!(
        "    guest on {runs_on}: pass {} writes {} errors {}; corruption reports: {}",
        last.pass,
        last.writes,
        last.errors,
        after.corruptions.len()
    ));
    if record.status == JobStatus::Completed && !source_gone {
        bail!("the guest still runs on host-a after a completed migration");
    }

    if args.json {
        let mut value = serde_json::to_value(&record)?;
        value["memory_check"] = serde_json::Value::from(memory_check);
        print!("{}", crate::commands::json(&value)?);
    } else {
        print!("{}", output::record_summary(&record));
        println!("Memory check: {memory_check}");
    }
    Ok(if record.status == JobStatus::Completed && intact {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
