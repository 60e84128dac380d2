//! `drain` and `drains`: a drain is checked here (the host, `--to`, a place
//! for every guest) before anything is recorded; the controller does the
//! rest, and `--wait`/`--watch` follow its record in etcd.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use cluster::{now_ms, Cluster, Cordon, DrainRecord, DrainStart, DrainState, GuestState};
use fleet::plan;
use fleet::schedule::{self, Caps, Move, Policy};
use fleet::survey::{self, Agents};

use super::cluster::connect;
use crate::args::DrainArgs;

/// `drain HOST ...` or `drain --watch ID`.
///
/// # Errors
/// An unknown or already-draining host, a `--to` host that cannot take
/// guests, a guest no host can take (each said, nothing recorded), an
/// etcd or agent that does not answer.
pub async fn run(
    urls: Option<&str>,
    insecure: bool,
    tls_dir: Option<&Path>,
    args: DrainArgs,
) -> Result<ExitCode> {
    let cluster = connect(urls, insecure, tls_dir).await?;
    let mode = if args.json.json {
        Follow::Json
    } else {
        Follow::Text
    };
    if let Some(id) = &args.watch {
        return follow(&cluster, id, mode).await.map(|(code, _)| code);
    }
    let host = args
        .host
        .clone()
        .context("which host? give HOST or --watch ID")?;
    let agents = Agents::new(tls_dir)?;
    let checked = check(&cluster, &agents, &host, &args.to, args.dry_run).await?;
    let leader = cluster
        .leader_limits()
        .await
        .context("cannot ask the cluster which controller leads")?;
    if args.dry_run {
        let under = Under::new(leader, args.max_parallel);
        return Ok(print(dry_run(&checked, &under, args.json.json)?));
    }
    if leader.is_none() {
        eprintln!(
            "warning: no controller leads the cluster: the drain waits until a \
             livemig-controller runs"
        );
    }
    let record = record(&cluster, &host, &args.to, args.max_parallel).await?;
    let guests = checked.guests.len();
    if !args.wait {
        if args.json.json {
            return Ok(print(super::json(&record)?));
        }
        return Ok(print(format!(
            "drain {id} of {host} recorded ({guests} guests), {host} cordoned; follow it with \
             `livemig drain --watch {id}`\n",
            id = record.id,
        )));
    }
    if !args.json.json {
        println!("drain {} of {host}: {guests} guests", record.id);
    }
    follow(&cluster, &record.id, mode)
        .await
        .map(|(code, _)| code)
}

/// A drain checked against the cluster: the host's guests and where each
/// would go.
#[derive(Debug)]
pub struct Checked {
    /// The survey it rests on.
    pub survey: survey::Survey,
    /// The guests' cost models.
    pub guests: Vec<plan::Guest>,
    /// Where each goes.
    pub placement: plan::Placement,
    /// The cluster's migration policies.
    pub policies: Vec<cluster::Policy>,
}

/// Checks a drain of `host` (to `to`, if given) without changing
/// anything; with `measure`, the guests' dirty rates are measured too.
///
/// # Errors
/// An unknown or draining host, a bad `--to`, a guest no host can take.
pub async fn check(
    cluster: &Cluster,
    agents: &Agents,
    host: &str,
    to: &[String],
    measure: bool,
) -> Result<Checked> {
    if let Some(active) = cluster
        .drains()
        .await?
        .into_iter()
        .find(|d| d.record.host == host && !d.record.state.ended())
    {
        anyhow::bail!(
            "{host} is being drained already (drain {}); follow it with `livemig drain --watch {}`",
            active.record.id,
            active.record.id
        );
    }
    let (records, hosts) = survey::hosts(cluster).await?;
    for name in to {
        let Some(target) = hosts.iter().find(|h| &h.name == name) else {
            let known: Vec<&str> = records.iter().map(|r| r.name.as_str()).collect();
            anyhow::bail!(
                "--to {name}: no such host in the cluster (registered: {})",
                known.join(", ")
            );
        };
        if name == host {
            anyhow::bail!("--to {name}: that is the host being drained");
        }
        if let Some(reason) = &target.cordoned {
            anyhow::bail!("--to {name}: it is cordoned ({reason}); no guest may land there");
        }
    }
    let survey = survey::survey(cluster, agents, host, measure).await?;
    let guests: Vec<plan::Guest> = survey.guests.iter().map(|s| s.guest.clone()).collect();
    let placement = plan::place(&guests, &survey.source, &survey.hosts, to);
    if !placement.unplaceable.is_empty() {
        let mut why = String::new();
        for (guest, reason) in &placement.unplaceable {
            why.push_str(&format!("\n  {guest}: {reason}"));
        }
        anyhow::bail!(
            "cannot drain {host}: no host can take {} of its guests (nothing was changed):{why}",
            placement.unplaceable.len()
        );
    }
    Ok(Checked {
        survey,
        guests,
        placement,
        policies: cluster.policies().await?,
    })
}

/// Records a drain of `host` and cordons it, for the controller.
///
/// # Errors
/// A host being drained already, or an etcd that does not answer.
pub async fn record(
    cluster: &Cluster,
    host: &str,
    to: &[String],
    max_parallel: Option<u32>,
) -> Result<DrainRecord> {
    let created_at_ms = now_ms();
    let record = DrainRecord::pending(host, to, max_parallel, created_at_ms);
    let cordon = Cordon {
        reason: format!("draining ({})", record.id),
        at_ms: created_at_ms,
    };
    match cluster.start_drain(&record, &cordon).await? {
        DrainStart::Started => Ok(record),
        DrainStart::AlreadyDraining(id) => {
            anyhow::bail!("{host} is being drained already (drain {id})")
        }
    }
}

fn print(text: String) -> ExitCode {
    print!("{text}");
    ExitCode::SUCCESS
}

/// The limits a dry run plans under: the leading controller's (a
/// controller's defaults when none leads), and the drain's own
/// `--max-parallel` on the host it empties.
struct Under {
    caps: Caps,
    /// The leading controller's name.
    controller: Option<String>,
}

impl Under {
    fn new(leader: Option<(String, cluster::Limits)>, max_parallel: Option<u32>) -> Under {
        let (controller, mut caps) = match leader {
            Some((name, limits)) => (Some(name), Caps::from(limits)),
            None => (None, fleet::controller::Settings::default().caps),
        };
        if let Some(max) = max_parallel {
            caps.outbound = Some(caps.outbound.map_or(max, |out| out.min(max)));
        }
        Under { caps, controller }
    }

    fn describe(&self) -> String {
        let caps = limits_text(self.caps);
        match &self.controller {
            Some(name) => format!("under the limits of controller {name}, leading: {caps}"),
            None => format!(
                "under a controller's default limits, {caps}: no controller leads, and the \
                 drain would wait for one"
            ),
        }
    }
}

/// `caps` in words.
fn limits_text(caps: Caps) -> String {
    let cap = |c: Option<u32>| c.map_or("any number".to_string(), |n| n.to_string());
    format!(
        "{} out and {} in per host, {} in the cluster",
        cap(caps.outbound),
        cap(caps.inbound),
        cap(caps.cluster)
    )
}

/// What `--dry-run` prints: where each guest goes and the predicted drain.
fn dry_run(checked: &Checked, under: &Under, json: bool) -> Result<String> {
    let (survey, guests, placement) = (&checked.survey, &checked.guests, &checked.placement);
    let index = |name: &str| survey.hosts.iter().position(|h| h.name == name);
    let links: Vec<f64> = survey.hosts.iter().map(|h| h.link).collect();
    let from = index(&survey.source.name).expect("the source is registered");
    let moves: Vec<Move> = guests
        .iter()
        .zip(&survey.guests)
        .map(|(g, s)| Move {
            guest: g.clone(),
            from,
            to: index(&placement.destination[&g.name]).expect("placed on a registered host"),
            postcopy: cluster::policy::allows_postcopy(&checked.policies, &s.labels),
        })
        .collect();
    let outcome = schedule::simulate(Policy::Livemig, under.caps, &links, &moves);
    let bound = plan::lower_bound(guests, &survey.source, &survey.hosts, placement);
    let rows: Vec<serde_json::Value> = moves
        .iter()
        .zip(&outcome.moves)
        .zip(&survey.guests)
        .map(|((m, o), s)| {
            serde_json::json!({
                "guest": m.guest.name,
                "to": survey.hosts[m.to].name,
                "memory_mib": m.guest.memory_bytes >> 20,
                "dirty_rate_mib_s": s.measured.then(|| m.guest.model.rate / 1048576.0),
                "start_s": o.start,
                "end_s": o.end,
            })
        })
        .collect();
    if json {
        return super::json(&serde_json::json!({
            "host": survey.source.name,
            "guests": rows,
            "predicted_s": outcome.makespan,
            "lower_bound_s": bound,
            "controller": under.controller,
            "caps": {
                "outbound": under.caps.outbound,
                "inbound": under.caps.inbound,
                "cluster": under.caps.cluster,
            },
        }));
    }
    let mut out = format!(
        "{:<20} {:<16} {:>8} {:>12} {:>8} {:>8}\n",
        "GUEST", "TO", "MEMORY", "DIRTY RATE", "START", "END"
    );
    for row in &rows {
        let rate = row["dirty_rate_mib_s"]
            .as_f64()
            .map_or("?".to_string(), |r| format!("{r:.0} MiB/s"));
        out.push_str(&format!(
            "{:<20} {:<16} {:>4} MiB {:>12} {:>6.1} s {:>6.1} s\n",
            row["guest"].as_str().unwrap_or(""),
            row["to"].as_str().unwrap_or(""),
            row["memory_mib"],
            rate,
            row["start_s"].as_f64().unwrap_or(0.0),
            row["end_s"].as_f64().unwrap_or(0.0),
        ));
    }
    out.push_str(&format!(
        "predicted: {:.1} s (lower bound {:.1} s), {}; nothing was recorded\n",
        outcome.makespan,
        bound,
        under.describe()
    ));
    Ok(out)
}

/// `drains`: every drain, oldest first.
///
/// # Errors
/// An etcd that does not answer.
pub async fn list(
    urls: Option<&str>,
    insecure: bool,
    tls_dir: Option<&Path>,
    json: bool,
) -> Result<String> {
    let cluster = connect(urls, insecure, tls_dir).await?;
    let drains: Vec<DrainRecord> = cluster
        .drains()
        .await?
        .into_iter()
        .map(|d| d.record)
        .collect();
    if json {
        return super::json(&drains);
    }
    let mut out = format!(
        "{:<32} {:<16} {:<8} {:>8} {:>10}\n",
        "ID", "HOST", "STATE", "MOVED", "ELAPSED"
    );
    for d in &drains {
        let moved = d
            .guests
            .iter()
            .filter(|g| g.state == GuestState::Moved)
            .count();
        let elapsed = d
            .ended_at_ms
            .unwrap_or_else(now_ms)
            .saturating_sub(d.created_at_ms);
        out.push_str(&format!(
            "{:<32} {:<16} {:<8} {:>8} {:>8.1} s\n",
            d.id,
            d.host,
            state_name(d.state),
            format!("{moved}/{}", d.guests.len()),
            elapsed as f64 / 1000.0
        ));
    }
    if drains.is_empty() {
        out.push_str("(no drain)\n");
    }
    // A drain nobody runs looks like a stuck one: say which it is.
    let leader = cluster
        .leader_limits()
        .await
        .context("cannot ask the cluster which controller leads")?;
    out.push_str(&match leader {
        Some((name, limits)) => format!(
            "controller {name} leads, at most {}\n",
            limits_text(Caps::from(limits))
        ),
        None => "no controller leads: drains wait until a livemig-controller runs\n".into(),
    });
    Ok(out)
}

fn state_name(state: DrainState) -> &'static str {
    match state {
        DrainState::Pending => "pending",
        DrainState::Running => "running",
        DrainState::Done => "done",
        DrainState::Failed => "failed",
    }
}

/// How long `--watch` waits for etcd before it gives up.
const SILENCE_LIMIT: Duration = Duration::from_secs(60);

/// How a drain is followed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Follow {
    /// Progress and the report as text on stdout.
    Text,
    /// A JSON object per change and the report, on stdout.
    Json,
    /// Progress as text on stderr, no report (the caller prints its own).
    Stderr,
}

/// Follows drain `id` until it ends: its progress at each change, then
/// the report; exit 1 if a guest could not be moved.
///
/// # Errors
/// No such drain, or a cluster silent for a minute.
pub async fn follow(cluster: &Cluster, id: &str, mode: Follow) -> Result<(ExitCode, DrainRecord)> {
    let mut last_heard = tokio::time::Instant::now();
    let mut shown = String::new();
    // An etcd watch on the record says when to read it again; the wait's
    // bound covers a watch that is being set up again.
    let mut changes = cluster.drain_changes(id);
    loop {
        let record = match cluster.drain(id).await {
            Ok(Some(drain)) => drain.record,
            Ok(None) => anyhow::bail!("no drain {id} (see `livemig drains`)"),
            Err(e) if last_heard.elapsed() < SILENCE_LIMIT => {
                eprintln!("(the cluster does not answer: {e}; retrying)");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(e) => return Err(e).context("the cluster stopped answering"),
        };
        last_heard = tokio::time::Instant::now();
        // Progress lines change with the clock: compare what they say
        // without it.
        let key = serde_json::to_string(&(record.state, &record.guests, &record.note))?;
        if key != shown {
            shown = key;
            match mode {
                Follow::Json => print!(
                    "{}",
                    super::json(&serde_json::json!({"event": "drain", "drain": record}))?
                ),
                Follow::Text => print!("{}", crate::output::drain::progress(&record, now_ms())),
                Follow::Stderr => eprint!("{}", crate::output::drain::progress(&record, now_ms())),
            }
        }
        if record.state.ended() {
            match mode {
                Follow::Json => print!(
                    "{}",
                    super::json(&serde_json::json!({"event": "report", "drain": record}))?
                ),
                Follow::Text => print!("{}", crate::output::drain::report(&record)),
                Follow::Stderr => {}
            }
            let code = if record.state == DrainState::Done {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            };
            return Ok((code, record));
        }
        changes.next(Duration::from_secs(2)).await;
    }
}
