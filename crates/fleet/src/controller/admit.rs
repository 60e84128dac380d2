//! Admitting a drain's next migrations and sharing the links among all
//! that run: the schedule's rule (`schedule::admit`, `schedule::shares`)
//! applied to what the cluster and the agents say now.

use std::collections::BTreeMap;

use cluster::{GuestState, Leadership};
use protocol::call;
use protocol::Client;

use super::migrate;
use super::step::{back_to_waiting, guest_model, now_ms, Draft};
use super::Context;
use crate::plan::{self, Host};
use crate::schedule::{self, Policy, Running, Waiting};
use crate::survey::{self, FleetError};

/// Where `g` may go now: its planned host if that still can take it, else
/// the best other; or why none can.
fn destination(
    g: &cluster::DrainGuest,
    source: &Host,
    hosts: &[Host],
    to: &[String],
) -> Result<String, String> {
    let tried = |h: &Host| {
        g.failures
            .iter()
            .any(|f| f.starts_with(&format!("{}: ", h.name)))
    };
    let open: Vec<Host> = hosts.iter().filter(|h| !tried(h)).cloned().collect();
    let guest = guest_model(g);
    if let Some(planned) = &g.destination {
        if let Some(h) = open.iter().find(|h| &h.name == planned) {
            if plan::incompatible(source, h, to).is_none() && h.ram_free_bytes >= guest.memory_bytes
            {
                return Ok(planned.clone());
            }
        }
    }
    let placement = plan::place(std::slice::from_ref(&guest), source, &open, to);
    placement
        .destination
        .get(&g.domain)
        .cloned()
        .ok_or_else(|| {
            let mut why = placement
                .unplaceable
                .get(&g.domain)
                .cloned()
                .unwrap_or_default();
            if !g.failures.is_empty() {
                why = format!("{why}; failed before on {}", g.failures.join("; "));
            }
            why
        })
}

/// Admits what may start, starts it, and re-splits the links; false if
/// the record could not be written.
pub(super) async fn admit(
    cx: &Context,
    leadership: &Leadership,
    draft: &mut Draft,
    source: &Client,
    source_uri: &str,
    elsewhere: &[(String, String)],
) -> Result<bool, FleetError> {
    let (records, mut hosts) = survey::hosts(&cx.cluster).await?;
    let policies = cx.cluster.policies().await?;
    let record = &mut draft.record;
    let index: BTreeMap<String, usize> = hosts
        .iter()
        .enumerate()
        .map(|(i, h)| (h.name.clone(), i))
        .collect();
    let Some(&from) = index.get(&record.host) else {
        return Ok(true);
    };
    let links: Vec<f64> = hosts.iter().map(|h| h.link).collect();
    let path = |to: usize| links[from].min(links[to]);
    // What runs now, here and in other drains.
    let mut running = Vec::new();
    let mut running_guests = Vec::new();
    for (k, g) in record.guests.iter().enumerate() {
        if g.state != GuestState::Migrating {
            continue;
        }
        let Some(&to) = g.destination.as_ref().and_then(|d| index.get(d)) else {
            continue;
        };
        hosts[to].ram_free_bytes = hosts[to].ram_free_bytes.saturating_sub(g.memory_mib << 20);
        running.push(Running {
            from,
            to,
            need: guest_model(g).need(path(to)),
            remaining_secs: g
                .remaining_secs
                .unwrap_or_else(|| g.predicted_secs.unwrap_or(1.0)),
        });
        running_guests.push((k, running.len() - 1));
    }
    for (other_from, other_to) in elsewhere {
        if let (Some(&f), Some(&t)) = (index.get(other_from), index.get(other_to)) {
            running.push(Running {
                from: f,
                to: t,
                need: links[f].min(links[t]),
                remaining_secs: f64::INFINITY,
            });
        }
    }
    // What waits, longest first, each with where it would go.
    let mut order: Vec<usize> = (0..record.guests.len())
        .filter(|&k| record.guests[k].state == GuestState::Waiting)
        .collect();
    order.sort_by(|&a, &b| {
        let secs = |k: usize| record.guests[k].predicted_secs.unwrap_or(0.0);
        secs(b).total_cmp(&secs(a))
    });
    let source_host = hosts[from].clone();
    let mut changed = false;
    let mut candidates = Vec::new();
    let mut candidate_guests = Vec::new();
    for k in order {
        let g = &mut record.guests[k];
        match destination(g, &source_host, &hosts, &record.to) {
            Ok(to) => {
                let t = index[&to];
                candidates.push(Waiting {
                    from,
                    to: t,
                    need: guest_model(g).need(path(t)),
                });
                if g.destination.as_ref() != Some(&to) {
                    g.destination = Some(to);
                    changed = true;
                }
                candidate_guests.push(k);
            }
            Err(why) => {
                g.state = GuestState::Failed;
                g.error = Some(format!("no host can take it: {why}"));
                changed = true;
            }
        }
    }
    let mut admitted = schedule::admit(
        Policy::Livemig,
        cx.settings.caps,
        &links,
        &running,
        &candidates,
    );
    if let Some(max) = record.max_parallel {
        let room = (max as usize).saturating_sub(running_guests.len());
        admitted.truncate(room);
    }
    for &a in &admitted {
        let g = &mut record.guests[candidate_guests[a]];
        g.state = GuestState::Migrating;
        g.started_at_ms = Some(now_ms());
        g.progress = 0.0;
        running.push(Running {
            from,
            to: candidates[a].to,
            need: candidates[a].need,
            remaining_secs: g.predicted_secs.unwrap_or(1.0),
        });
        running_guests.push((candidate_guests[a], running.len() - 1));
    }
    // Each running migration's share, in MiB/s (at least 1: QEMU takes 0
    // as no limit).
    let shares = schedule::shares(Policy::Livemig, &links, &running);
    let share_of = |slot: usize| ((shares[slot] / 1048576.0).floor() as u64).max(1);
    if changed || !admitted.is_empty() {
        // Recorded before anything starts: a successor asks the agent
        // about every guest marked migrating.
        if !draft.save(cx, leadership).await? {
            return Ok(false);
        }
    }
    let record = &mut draft.record;
    let mut changed = false;
    for &(k, slot) in &running_guests {
        let g = &mut record.guests[k];
        let share = share_of(slot);
        let Some(to) = g.destination.clone() else {
            continue;
        };
        match &g.job_id {
            None => {
                if !leadership.is_leading() {
                    return Ok(false);
                }
                let Some(uri) = records.iter().find(|r| r.name == to).map(|r| &r.agent_uri) else {
                    continue;
                };
                let flags = migrate::options(
                    &policies,
                    &g.labels,
                    share,
                    source_uri.starts_with("tls://"),
                );
                let domain = match g.domain.parse() {
                    Ok(domain) => domain,
                    Err(e) => {
                        g.state = GuestState::Failed;
                        g.error = Some(format!("{e}"));
                        changed = true;
                        continue;
                    }
                };
                match migrate::start(&cx.agents, source, &record.host, domain, uri, flags).await {
                    Ok(id) => {
                        tracing::info!(guest = %g.domain, to = %to, job = %id, share, "migration started");
                        g.job_id = Some(id);
                        g.bandwidth_mib_s = Some(share);
                    }
                    Err(e) => back_to_waiting(g, Some(e.to_string())),
                }
                changed = true;
            }
            Some(_) if g.bandwidth_mib_s != Some(share) => {
                let Ok(domain) = g.domain.parse() else {
                    continue;
                };
                let set = cx
                    .agents
                    .call(
                        source,
                        &record.host,
                        call::MigrateSetSpeed {
                            domain,
                            bandwidth_mib_s: share,
                        },
                    )
                    .await;
                match set {
                    Ok(()) => {
                        tracing::info!(guest = %g.domain, share, "bandwidth re-split");
                        g.bandwidth_mib_s = Some(share);
                        changed = true;
                    }
                    Err(e) => {
                        tracing::warn!(guest = %g.domain, error = %e, "cannot re-split the bandwidth")
                    }
                }
            }
            Some(_) => {}
        }
    }
    if changed {
        return draft.save(cx, leadership).await;
    }
    Ok(true)
}
