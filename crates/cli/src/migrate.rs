//! `livemig migrate`: start the job on the source agent, follow it, print
//! its record.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Result};
use migration::{JobInfo, JobRecord, JobStatus};
use protocol::message::Reply;
use protocol::{Client, Request};

use crate::args::MigrateArgs;
use crate::{domain, output, print_json, request, unexpected};

const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// What to do with each poll of a running job.
pub type OnProgress<'a> = &'a mut dyn FnMut(&JobInfo);

/// Follows a job until it has a record. Ctrl-C asks the agent to abort it
/// (the guest stays on the source) and keeps following.
pub async fn follow(
    client: &Client,
    domain_name: &str,
    job_id: &str,
    on_progress: OnProgress<'_>,
) -> Result<JobRecord> {
    let mut abort_sent = false;
    loop {
        match request(
            client,
            Request::Job {
                id: job_id.to_string(),
            },
        )
        .await?
        {
            Reply::Job {
                record: Some(record),
                ..
            } => return Ok(*record),
            Reply::Job {
                active: Some(job), ..
            } => on_progress(&job),
            other => return Err(unexpected(other)),
        }
        tokio::select! {
            _ = tokio::time::sleep(POLL_INTERVAL) => {}
            _ = tokio::signal::ctrl_c(), if !abort_sent => {
                eprintln!("\nInterrupted: aborting the migration; the guest stays on the source");
                abort_sent = true;
                if let Err(e) = request(client, Request::DomJobAbort { domain: domain(domain_name)? }).await {
                    eprintln!("could not abort: {e:#}");
                }
            }
        }
    }
}

pub async fn run(client: &Client, args: MigrateArgs) -> Result<ExitCode> {
    let reply = request(
        client,
        Request::Migrate {
            domain: domain(&args.domain)?,
            destination: args.dest_uri.clone(),
            flags: Box::new(args.flags.clone()),
        },
    )
    .await?;
    let job_id = match reply {
        Reply::MigrationStarted { job_id } => job_id,
        Reply::Estimate(report) => {
            if args.json {
                print_json(&report)?;
            } else {
                println!("Dry run: every check passed; nothing was started.");
                print!("{}", output::estimate(&report));
            }
            return Ok(ExitCode::SUCCESS);
        }
        other => return Err(unexpected(other)),
    };
    let verbose = args.verbose;
    let mut on_progress = |job: &JobInfo| {
        if verbose {
            eprintln!("{}", output::progress_line(job));
        }
    };
    let record = follow(client, &args.domain, &job_id, &mut on_progress).await?;
    if args.json {
        print_json(&record)?;
    } else {
        print!("{}", output::record_summary(&record));
    }
    match record.status {
        JobStatus::Completed => Ok(ExitCode::SUCCESS),
        JobStatus::Active => bail!("the agent reported an active job as finished"),
        _ => Ok(ExitCode::from(1)),
    }
}
