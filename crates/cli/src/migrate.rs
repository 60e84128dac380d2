//! `livemig migrate`: start the job on the source agent, follow it, print
//! its record.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Result};
use protocol::call::{self, JobState, Migration};
use protocol::job::{JobRecord, JobStatus};
use protocol::Client;

use crate::agent::{call, domain};
use crate::args::MigrateArgs;
use crate::commands::json;
use crate::output;
use crate::progress::Progress;

const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// Asks whether to abort (on a terminal) or decides to (otherwise).
fn confirm_abort(progress: &Progress) -> bool {
    if !progress.interactive() {
        return true;
    }
    let line = tokio::task::block_in_place(|| {
        progress.suspend(|| {
            use std::io::Write;
            print!("\nAbort the migration? The guest stays on the source. [y/N] ");
            let _ = std::io::stdout().flush();
            let mut line = String::new();
            let _ = std::io::stdin().read_line(&mut line);
            line
        })
    });
    matches!(line.trim(), "y" | "Y" | "yes")
}

/// Follows a job until it has a record, showing its progress. Ctrl-C asks
/// (on a terminal) whether to abort it; abort leaves the guest on the
/// source.
pub async fn follow(
    client: &Client,
    domain_name: &str,
    job_id: &str,
    progress: &mut Progress,
) -> Result<JobRecord> {
    let mut abort_sent = false;
    loop {
        let id = job_id.to_string();
        match call(client, call::Job { id }).await? {
            JobState::Ended(record) => {
                progress.finish();
                return Ok(*record);
            }
            JobState::Active(job) => progress.update(&job),
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL_INTERVAL) => {}
            _ = tokio::signal::ctrl_c(), if !abort_sent => {
                if confirm_abort(progress) {
                    abort_sent = true;
                    progress.say("Aborting the migration; the guest stays on the source");
                    let domain = domain(domain_name)?;
                    if let Err(e) = call(client, call::DomJobAbort { domain }).await {
                        progress.say(&format!("could not abort: {e:#}"));
                    }
                }
            }
        }
    }
}

pub async fn run(
    client: &Client,
    args: MigrateArgs,
    options: protocol::MigrateOptions,
) -> Result<ExitCode> {
    let migration = call(
        client,
        call::Migrate {
            domain: domain(&args.domain)?,
            destination: args.dest_uri.clone(),
            flags: options,
        },
    )
    .await?;
    let job_id = match migration {
        Migration::Started(job_id) => job_id,
        Migration::DryRun(report) => {
            if args.json {
                print!("{}", json(&report)?);
            } else {
                println!("Dry run: every check passed; nothing was started.");
                print!("{}", output::estimate(&report));
            }
            return Ok(ExitCode::SUCCESS);
        }
    };
    let mut progress = Progress::new(&job_id, args.json);
    let record = follow(client, &args.domain, &job_id, &mut progress).await?;
    if args.json {
        print!("{}", json(&record)?);
    } else {
        print!("{}", output::record_summary(&record));
    }
    match record.status {
        JobStatus::Completed => Ok(ExitCode::SUCCESS),
        JobStatus::Active => bail!("the agent reported an active job as finished"),
        _ => Ok(ExitCode::from(1)),
    }
}
