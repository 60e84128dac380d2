//! `livemig`: the command line for livemig agents.
//!
//! Exit status: 0 success; 1 the agent refused or the operation (e.g. a
//! migration) failed; 2 bad usage.

mod args;
mod demo;
mod limits;
mod migrate;
mod output;
mod progress;

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::Parser;
use domain::{DomainDefinition, DomainName};
use protocol::domain::DefinitionDoc;
use protocol::{AgentUri, Client, Reply, Request};
use serde::Serialize;

use crate::args::{Cli, Command, PkiCommand};

/// Requests that only read or change local state answer quickly.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            if let Some(hint) = hint(&e) {
                eprintln!("hint: {hint}");
            }
            ExitCode::from(1)
        }
    }
}

/// What to do next, for the errors people hit most.
fn hint(error: &anyhow::Error) -> Option<&'static str> {
    if let Some(client) = error.downcast_ref::<protocol::ClientError>() {
        return match client {
            protocol::ClientError::Connect { .. } => Some(
                "is livemigd running? Without -c or LIVEMIG_URI this talks to the local agent at \
                 /run/livemig/livemigd.sock (contrib/livemigd.service); for another, pass -c \
                 unix:///DIR/livemigd.sock or -c tls://HOST:PORT",
            ),
            protocol::ClientError::Api(api) => api_hint(api.code),
            protocol::ClientError::Tls { .. } => Some(
                "the agent's certificate must name the host you dialled (`livemig pki issue ... \
                 --host HOST`), and yours must come from the same CA",
            ),
            protocol::ClientError::NoCredentials { .. } => Some(
                "issue yourself a certificate with `livemig pki issue PKI NAME --role admin` and \
                 pass its directory with --tls-dir",
            ),
            _ => None,
        };
    }
    None
}

fn api_hint(code: protocol::ErrorCode) -> Option<&'static str> {
    use protocol::ErrorCode::*;
    match code {
        NoDomain => Some("`livemig list --all` shows the domains this agent knows"),
        NoJob => Some("`livemig jobs` lists finished jobs; `livemig domjobinfo DOMAIN` the running one"),
        Unsupported => Some(
            "`livemig domcapabilities` on each host lists what its QEMU supports; drop the flag or \
             upgrade QEMU there",
        ),
        PeerUnreachable => Some(
            "check the destination agent runs and listens on that address (livemigd --listen \
             tcp://HOST:PORT) and that this host can reach it",
        ),
        InvalidDefinition => Some("fix the definition file; README.md shows every key"),
        OperationInvalid => Some("`livemig dominfo DOMAIN` shows its state and any active job"),
        PermissionDenied => Some(
            "your certificate's role does not allow this: monitor reads, agent does only the peer \
             half of a migration, admin does everything",
        ),
        _ => None,
    }
}

/// The local agent's socket as the packaged config and systemd unit set
/// it up (`contrib/`): the agent used with no `-c` and no `LIVEMIG_URI`,
/// as virsh defaults to `qemu:///system`.
pub const DEFAULT_URI: &str = "unix:///run/livemig/livemigd.sock";

/// Connects to the agent at `uri` (the local one by default), with the TLS
/// directory for `tls://`.
pub async fn connect(uri: Option<&str>, tls_dir: Option<&Path>) -> Result<Client> {
    let uri: AgentUri = uri.unwrap_or(DEFAULT_URI).parse()?;
    let tls = match (&uri, tls_dir) {
        (AgentUri::Tls { .. }, Some(dir)) => Some(
            tls::TlsDir::load(dir)
                .and_then(|d| d.client_config())
                .with_context(|| format!("cannot use the TLS directory {}", dir.display()))?,
        ),
        _ => None,
    };
    Ok(Client::connect_with(&uri, tls.as_ref()).await?)
}

pub async fn request(client: &Client, request: Request) -> Result<Reply> {
    Ok(client.request(request, REQUEST_TIMEOUT).await?)
}

fn domain(name: &str) -> Result<DomainName> {
    Ok(name.parse()?)
}

/// `dominfo` of one domain.
async fn dominfo(client: &Client, name: &str) -> Result<protocol::domain::DomainInfo> {
    match request(
        client,
        Request::DomInfo {
            domain: domain(name)?,
        },
    )
    .await?
    {
        Reply::DomainInfo(info) => Ok(*info),
        other => Err(unexpected(other)),
    }
}

fn print_json<T: Serialize>(value: &T) -> Result<()> {
    println!("{}", serde_json::to_string(value)?);
    Ok(())
}

fn unexpected(reply: Reply) -> anyhow::Error {
    anyhow!("the agent sent an unexpected reply: {reply:?}")
}

/// `pki init` and `pki issue`: local, no agent involved.
fn pki(command: PkiCommand) -> Result<ExitCode> {
    match command {
        PkiCommand::Init { dir } => {
            tls::pki::init(&dir)
                .with_context(|| format!("cannot create a CA in {}", dir.display()))?;
            println!(
                "CA created in {} (keep ca-key.pem private; ca.pem goes to every host)",
                dir.display()
            );
        }
        PkiCommand::Issue {
            dir,
            name,
            role,
            hosts,
        } => {
            let out = tls::pki::issue(&dir, &name, role, &hosts)
                .with_context(|| format!("cannot issue a certificate for {name}"))?;
            println!(
                "Certificate for {name} (role {role}) in {}: use it as --tls-dir",
                out.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn run(cli: Cli) -> Result<ExitCode> {
    let uri = cli.connect.as_deref();
    let tls_dir = cli.tls_dir.as_deref();
    match cli.command {
        Command::Pki(command) => return pki(command),
        Command::Demo(args) => return demo::run(args).await,
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "livemig", &mut std::io::stdout());
            return Ok(ExitCode::SUCCESS);
        }
        Command::Man => {
            let command = <Cli as clap::CommandFactory>::command();
            clap_mangen::Man::new(command).render(&mut std::io::stdout())?;
            return Ok(ExitCode::SUCCESS);
        }
        Command::Migrate(args) => {
            // Contradictory options are refused before any agent is
            // contacted, with the agent's own rules.
            migration::Flags::new(args.options())?;
            let client = connect(uri, tls_dir).await?;
            return migrate::run(&client, args).await;
        }
        _ => {}
    }
    // What can be checked here is checked before any agent is contacted.
    let definition = match &cli.command {
        Command::Define { file } => Some(
            DomainDefinition::from_file(file)
                .with_context(|| format!("cannot define a domain from {}", file.display()))?,
        ),
        _ => None,
    };
    let client = connect(uri, tls_dir).await?;
    match cli.command {
        Command::Define { file } => {
            let definition = definition.expect("parsed above");
            let name = definition.name.clone();
            let definition = DefinitionDoc(definition.to_document());
            request(&client, Request::Define { definition }).await?;
            println!("Domain '{name}' defined from {}", file.display());
        }
        Command::Undefine(d) => {
            request(
                &client,
                Request::Undefine {
                    domain: domain(&d.domain)?,
                },
            )
            .await?;
            println!("Domain '{}' has been undefined", d.domain);
        }
        Command::Start {
            domain: name,
            paused,
        } => {
            request(
                &client,
                Request::Start {
                    domain: domain(&name)?,
                    paused,
                },
            )
            .await?;
            println!("Domain '{name}' started");
        }
        Command::Destroy(d) => {
            request(
                &client,
                Request::Destroy {
                    domain: domain(&d.domain)?,
                },
            )
            .await?;
            println!("Domain '{}' destroyed", d.domain);
        }
        Command::Suspend(d) => {
            request(
                &client,
                Request::Suspend {
                    domain: domain(&d.domain)?,
                },
            )
            .await?;
            println!("Domain '{}' suspended", d.domain);
        }
        Command::Resume(d) => {
            request(
                &client,
                Request::Resume {
                    domain: domain(&d.domain)?,
                },
            )
            .await?;
            println!("Domain '{}' resumed", d.domain);
        }
        Command::List { all, json } => match request(&client, Request::List { all }).await? {
            Reply::Domains { domains } if json.json => print_json(&domains)?,
            Reply::Domains { domains } => print!("{}", output::domain_list(&domains)),
            other => return Err(unexpected(other)),
        },
        Command::Dumpdef { domain: name } => match request(
            &client,
            Request::DumpDef {
                domain: domain(&name)?,
            },
        )
        .await?
        {
            Reply::Definition { definition } => {
                let definition = DomainDefinition::from_document(definition.0)
                    .context("the agent sent a definition that does not validate")?;
                print!("{}", definition.to_toml());
            }
            other => return Err(unexpected(other)),
        },
        Command::Dominfo { domain: name, json } => {
            let info = dominfo(&client, &name).await?;
            if json.json {
                print_json(&info)?;
            } else {
                print!("{}", output::domain_info(&info));
            }
        }
        Command::Domstate { domain: name, json } => {
            let info = dominfo(&client, &name).await?;
            if json.json {
                print_json(&serde_json::json!({"domain": info.name, "state": info.state}))?;
            } else {
                println!("{}", info.state);
            }
        }
        Command::Domcapabilities { json } => {
            match request(&client, Request::DomCapabilities).await? {
                Reply::Capabilities(caps) if json.json => print_json(&caps)?,
                Reply::Capabilities(caps) => print!("{}", output::capabilities(&caps)),
                other => return Err(unexpected(other)),
            }
        }
        Command::Domjobinfo {
            domain: name,
            completed,
            json,
        } => match request(
            &client,
            Request::DomJobInfo {
                domain: domain(&name)?,
                completed,
            },
        )
        .await?
        {
            Reply::JobInfo { job } if json.json => print_json(&job)?,
            Reply::JobInfo { job: Some(job) } => print!("{}", output::job_info(&job)),
            Reply::JobInfo { job: None } => println!("Job type:  None"),
            other => return Err(unexpected(other)),
        },
        Command::Domjobabort(d) => {
            request(
                &client,
                Request::DomJobAbort {
                    domain: domain(&d.domain)?,
                },
            )
            .await?;
            println!("Abort requested for the job of '{}'", d.domain);
        }
        Command::MigrateSetspeed {
            domain: name,
            bandwidth,
        } => {
            request(
                &client,
                Request::MigrateSetSpeed {
                    domain: domain(&name)?,
                    bandwidth_mib_s: bandwidth,
                },
            )
            .await?;
        }
        Command::MigrateGetspeed { domain: name, json } => {
            limits::speed(&client, &name, json.json).await?
        }
        Command::MigrateGetmaxdowntime { domain: name, json } => {
            limits::max_downtime(&client, &name, json.json).await?
        }
        Command::MigrateSetmaxdowntime {
            domain: name,
            downtime,
        } => {
            request(
                &client,
                Request::MigrateSetMaxDowntime {
                    domain: domain(&name)?,
                    downtime_ms: downtime,
                },
            )
            .await?;
        }
        Command::MigratePostcopy(d) => {
            request(
                &client,
                Request::MigratePostcopy {
                    domain: domain(&d.domain)?,
                },
            )
            .await?;
        }
        Command::Estimate {
            domain: name,
            bandwidth,
            downtime,
            timeout,
            max_throttle,
            json,
        } => {
            let params = protocol::estimate::EstimateParams {
                bandwidth_mib_s: bandwidth,
                downtime_ms: downtime,
                timeout_s: timeout,
                max_throttle_pct: max_throttle,
            };
            match request(
                &client,
                Request::Estimate {
                    domain: domain(&name)?,
                    params,
                },
            )
            .await?
            {
                Reply::Estimate(report) if json.json => print_json(&report)?,
                Reply::Estimate(report) => print!("{}", output::estimate(&report)),
                other => return Err(unexpected(other)),
            }
        }
        Command::Jobs {
            domain: name,
            limit,
            json,
        } => {
            let domain = name.as_deref().map(domain).transpose()?;
            match request(&client, Request::Jobs { domain, limit }).await? {
                Reply::Jobs { jobs } if json.json => print_json(&jobs)?,
                Reply::Jobs { jobs } => print!("{}", output::job_list(&jobs)),
                other => return Err(unexpected(other)),
            }
        }
        Command::Report { id, output: path } => {
            let record = match request(&client, Request::Job { id: id.clone() }).await? {
                Reply::Job {
                    record: Some(record),
                    ..
                } => *record,
                Reply::Job {
                    active: Some(_), ..
                } => {
                    bail!("job {id} is still running: report it once it has finished")
                }
                other => return Err(unexpected(other)),
            };
            report::write(&record, &path)
                .with_context(|| format!("cannot write the report to {}", path.display()))?;
            println!("Report of job {id} written to {}", path.display());
        }
        Command::Job { id, json } => match request(&client, Request::Job { id }).await? {
            Reply::Job {
                record: Some(r), ..
            } if json.json => print_json(&r)?,
            Reply::Job {
                active: Some(j), ..
            } if json.json => print_json(&j)?,
            Reply::Job {
                record: Some(r), ..
            } => print!("{}", output::record_summary(&r)),
            Reply::Job {
                active: Some(j), ..
            } => print!("{}", output::job_info(&j)),
            other => return Err(unexpected(other)),
        },
        Command::QemuMonitorCommand {
            domain: name,
            command,
        } => {
            let command: serde_json::Value = serde_json::from_str(&command)
                .context("the command must be JSON, e.g. '{\"execute\":\"query-status\"}'")?;
            match request(
                &client,
                Request::QemuMonitorCommand {
                    domain: domain(&name)?,
                    command,
                },
            )
            .await?
            {
                Reply::Monitor { result } => print_json(&serde_json::json!({ "return": result }))?,
                other => return Err(unexpected(other)),
            }
        }
        Command::Demo(_)
        | Command::Migrate(_)
        | Command::Completions { .. }
        | Command::Man
        | Command::Pki(_) => {
            bail!("handled above")
        }
    }
    Ok(ExitCode::SUCCESS)
}
