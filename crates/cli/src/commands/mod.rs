//! One handler per command. A handler takes the client and the command's
//! arguments and returns what the command prints, so that tests read a
//! command's output against a scripted agent; `migrate` and `demo`, which
//! print as they go, have modules of their own.
//!
//! - [`domains`]: define, start, stop, list and show domains.
//! - [`jobs`]: migration jobs, their limits, estimates and records.
//! - [`local`]: what needs no agent (`pki`, completions, the man page).
//! - [`cluster`]: what the cluster's etcd says (`hosts`).
//! - [`drain`]: draining hosts (`drain`, `drains`).

pub mod cluster;
pub mod domains;
pub mod drain;
pub mod jobs;
pub mod local;

use std::process::ExitCode;

use anyhow::{Context, Result};
use domain::DomainDefinition;
use protocol::Client;
use serde::Serialize;

use crate::agent::connect;
use crate::args::{Cli, Command};

/// A value as one line of JSON.
///
/// # Errors
/// Only if the value cannot be serialised.
pub fn json<T: Serialize>(value: &T) -> Result<String> {
    Ok(serde_json::to_string(value)? + "\n")
}

/// Runs a command line: checks what can be checked without an agent, then
/// connects and runs the command's handler, printing what it returns.
///
/// # Errors
/// What the command failed on; the caller prints it and exits 1.
pub async fn run(cli: Cli) -> Result<ExitCode> {
    let uri = cli.connect.as_deref();
    let tls_dir = cli.tls_dir.as_deref();
    let command = match cli.command {
        Command::Pki(command) => return local::pki(command).map(print),
        Command::Demo(args) => return crate::demo::run(args).await,
        Command::Completions { shell } => return local::completions(shell).map(print),
        Command::Man => return local::man().map(print),
        Command::List { json, .. } if cli.cluster.is_some() => {
            return cluster::domains(cli.cluster.as_deref(), cli.insecure, tls_dir, json.json)
                .await
                .map(print)
        }
        Command::Cordon { host, reason } => {
            return cluster::cordon(
                cli.cluster.as_deref(),
                cli.insecure,
                tls_dir,
                &host,
                &reason,
            )
            .await
            .map(print)
        }
        Command::Policy(command) => {
            return cluster::policy(cli.cluster.as_deref(), cli.insecure, tls_dir, command)
                .await
                .map(print)
        }
        Command::Uncordon { host } => {
            return cluster::uncordon(cli.cluster.as_deref(), cli.insecure, tls_dir, &host)
                .await
                .map(print)
        }
        Command::Drain(args) => {
            return drain::run(cli.cluster.as_deref(), cli.insecure, tls_dir, args).await
        }
        Command::Drains(json) => {
            return drain::list(cli.cluster.as_deref(), cli.insecure, tls_dir, json.json)
                .await
                .map(print)
        }
        Command::Hosts(json) => {
            return cluster::hosts(cli.cluster.as_deref(), cli.insecure, tls_dir, json.json)
                .await
                .map(print)
        }
        Command::Migrate(args) => {
            // Contradictory options are refused before any agent is
            // contacted, with the agent's own rules.
            let options = args.wire_options()?;
            migration::Flags::new(options.clone())?;
            let client = connect(uri, tls_dir).await?;
            return crate::migrate::run(&client, *args, options).await;
        }
        // A definition is read and validated before any agent is
        // contacted.
        Command::Define { file } => {
            let definition = DomainDefinition::from_file(&file)
                .with_context(|| format!("cannot define a domain from {}", file.display()))?;
            let client = connect(uri, tls_dir).await?;
            return domains::define(&client, definition, &file).await.map(print);
        }
        Command::Watch { domain, json } => {
            let client = connect(uri, tls_dir).await?;
            return crate::watch::run(&client, domain.as_deref(), json.json).await;
        }
        command => command,
    };
    let client = connect(uri, tls_dir).await?;
    execute(&client, command).await.map(print)
}

fn print(text: String) -> ExitCode {
    print!("{text}");
    ExitCode::SUCCESS
}

/// Runs one command against `client`; returns what it prints.
///
/// # Errors
/// The agent's refusal, or what the command found wrong.
pub async fn execute(client: &Client, command: Command) -> Result<String> {
    match command {
        Command::Undefine(d) => domains::undefine(client, &d.domain).await,
        Command::Start { domain, paused } => domains::start(client, &domain, paused).await,
        Command::Destroy(d) => domains::destroy(client, &d.domain).await,
        Command::Suspend(d) => domains::suspend(client, &d.domain).await,
        Command::Resume(d) => domains::resume(client, &d.domain).await,
        Command::List { all, json } => domains::list(client, all, json.json).await,
        Command::Dumpdef { domain } => domains::dumpdef(client, &domain).await,
        Command::Dominfo { domain, json } => domains::dominfo(client, &domain, json.json).await,
        Command::Domstate { domain, json } => domains::domstate(client, &domain, json.json).await,
        Command::Domcapabilities { json } => domains::domcapabilities(client, json.json).await,
        Command::Domjobinfo {
            domain,
            completed,
            json,
            ..
        } => jobs::domjobinfo(client, &domain, completed, json.json).await,
        Command::MigrateCompcache { domain, size, json } => {
            crate::measure::compcache(client, &domain, size, json.json).await
        }
        Command::DomdirtyrateCalc {
            domain,
            seconds,
            mode,
        } => crate::measure::calc(client, &domain, seconds, mode).await,
        Command::Domstats {
            domain,
            dirtyrate,
            json,
        } => crate::measure::domstats(client, &domain, dirtyrate, json.json).await,
        Command::Domjobabort(d) => jobs::domjobabort(client, &d.domain).await,
        Command::MigrateSetspeed { domain, bandwidth } => {
            jobs::setspeed(client, &domain, bandwidth).await
        }
        Command::MigrateGetspeed { domain, json } => {
            crate::limits::speed(client, &domain, json.json).await
        }
        Command::MigrateGetmaxdowntime { domain, json } => {
            crate::limits::max_downtime(client, &domain, json.json).await
        }
        Command::MigrateSetmaxdowntime { domain, downtime } => {
            jobs::setmaxdowntime(client, &domain, downtime).await
        }
        Command::MigratePostcopy(d) => jobs::postcopy(client, &d.domain).await,
        Command::Estimate {
            domain,
            bandwidth,
            downtime,
            timeout,
            max_throttle,
            max_age,
            json,
        } => {
            let params = protocol::estimate::EstimateParams {
                bandwidth_mib_s: bandwidth,
                downtime_ms: downtime,
                timeout_s: timeout,
                max_throttle_pct: max_throttle,
                max_age_s: max_age,
            };
            jobs::estimate(client, &domain, params, json.json).await
        }
        Command::Jobs {
            domain,
            limit,
            json,
        } => jobs::list(client, domain.as_deref(), limit, json.json).await,
        Command::Report { id, output } => jobs::report(client, &id, &output).await,
        Command::Job { id, json } => jobs::job(client, &id, json.json).await,
        Command::QemuMonitorCommand { domain, command } => {
            jobs::monitor_command(client, &domain, &command).await
        }
        Command::Define { .. }
        | Command::Demo(_)
        | Command::Migrate(_)
        | Command::Completions { .. }
        | Command::Man
        | Command::Hosts(_)
        | Command::Cordon { .. }
        | Command::Watch { .. }
        | Command::Policy(_)
        | Command::Drain(_)
        | Command::Drains(_)
        | Command::Uncordon { .. }
        | Command::Pki(_) => anyhow::bail!("run handles this command itself"),
    }
}

#[cfg(test)]
mod tests;
