//! Admitting a drain's next migrations and sharing the links among all
//! that run: the schedule's rule (`schedule::admit`, `schedule::shares`)
//! applied to what the cluster and the agents say now.

use std::collections::{BTreeMap, BTreeSet};

use cluster::{GuestState, Leadership};
use protocol::call;
use protocol::Client;

use super::migrate;
use super::step::{back_to_waiting, guest_model, now_ms, Draft};
use super::{Context, Moving, Snapshot};
use crate::plan::{self, Host};
use crate::schedule::{self, Policy, Running, Waiting};
use crate::survey::FleetError;

/// Attempts a guest gets before it fails for good.
pub(super) const MAX_ATTEMPTS: usize = 4;
/// How long after a failure a guest may go back to a host it failed on:
/// this, doubled with each failure (an agent restarting, a lease running
/// out, a host short of RAM for a moment).
const RETRY_BACKOFF_MS: u64 = 5_000;

/// Why a waiting guest cannot start now.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum NoHost {
    /// It may later: a host may come back, free RAM or be uncordoned, or
    /// one it failed on may be tried again.
    Now(String),
    /// It failed [`MAX_ATTEMPTS`] times.
    Ever(String),
}

/// Where `g` may go at `now_ms`: its planned host if that still can take it,
/// it has not failed there and it is not `busy` (at its inbound cap with
/// the migrations running and placed before `g`), else the best host it
/// has not failed on that is not busy, else its planned host all the same
/// (it waits for a slot there), else (after the backoff) the best it
/// failed on; or why none can.
pub(super) fn destination(
    g: &cluster::DrainGuest,
    source: &Host,
    hosts: &[Host],
    to: &[String],
    now_ms: u64,
    busy: &BTreeSet<String>,
) -> Result<String, NoHost> {
    if g.failures.len() >= MAX_ATTEMPTS {
        return Err(NoHost::Ever(format!(
            "failed {} times: {}",
            g.failures.len(),
            g.failures.join("; ")
        )));
    }
    let tried = |h: &Host| {
        g.failures
            .iter()
            .any(|f| f.starts_with(&format!("{}: ", h.name)))
    };
    let untried: Vec<Host> = hosts.iter().filter(|h| !tried(h)).cloned().collect();
    let guest = guest_model(g);
    let planned = g.destination.as_ref().filter(|planned| {
        untried.iter().any(|h| {
            &&h.name == planned
                && plan::incompatible(source, h, to).is_none()
                && h.room() >= guest.memory_bytes
        })
    });
    if let Some(planned) = planned.filter(|p| !busy.contains(*p)) {
        return Ok(planned.clone());
    }
    // The plan spread the guests by bytes; a host whose slots are taken
    // by long migrations would hold short ones back while another has
    // a slot free.
    // Placing runs the cost model: not when no host could take it anyway,
    // as at every tick while the caps bind everywhere.
    let free: Vec<Host> = untried
        .iter()
        .filter(|h| {
            !busy.contains(&h.name)
                && plan::incompatible(source, h, to).is_none()
                && h.room() >= guest.memory_bytes
        })
        .cloned()
        .collect();
    if !free.is_empty() {
        let placement = plan::place(std::slice::from_ref(&guest), source, &free, to);
        if let Some(host) = placement.destination.get(&g.domain) {
            return Ok(host.clone());
        }
    }
    if let Some(planned) = planned {
        return Ok(planned.clone());
    }
    let placement = plan::place(std::slice::from_ref(&guest), source, &untried, to);
    if let Some(host) = placement.destination.get(&g.domain) {
        return Ok(host.clone());
    }
    let backoff = RETRY_BACKOFF_MS << g.failures.len().saturating_sub(1).min(6);
    let retry_at = g.failed_at_ms.unwrap_or(0).saturating_add(backoff);
    let again = plan::place(std::slice::from_ref(&guest), source, hosts, to);
    match again.destination.get(&g.domain) {
        Some(host) if now_ms >= retry_at => Ok(host.clone()),
        Some(host) => Err(NoHost::Now(format!(
            "{host} failed it before; trying it again in {:.0} s",
            (retry_at - now_ms) as f64 / 1000.0
        ))),
        None => {
            let mut why = placement
                .unplaceable
                .get(&g.domain)
                .cloned()
                .unwrap_or_else(|| "no host in the cluster".into());
            if !g.failures.is_empty() {
                why = format!("{why}; failed before on {}", g.failures.join("; "));
            }
            Err(NoHost::Now(why))
        }
    }
}

/// Of the admitted migrations (indexes into `candidates`, in order), those
/// whose guests fit in their destinations' free RAM together with the
/// ones admitted before them; `memory` gives each candidate's bytes.
fn within_ram(
    admitted: Vec<usize>,
    candidates: &[Waiting],
    memory: impl Fn(usize) -> u64,
    hosts: &[Host],
) -> Vec<usize> {
    let mut free: Vec<u64> = hosts.iter().map(Host::room).collect();
    admitted
        .into_iter()
        .filter(|&a| {
            let (to, bytes) = (candidates[a].to, memory(a));
            let fits = free[to] >= bytes;
            if fits {
                free[to] -= bytes;
            }
            fits
        })
        .collect()
}

/// Admits what may start, starts it, and re-splits the links; false if
/// the record could not be written.
pub(super) async fn admit(
    cx: &Context,
    leadership: &Leadership,
    draft: &mut Draft,
    source: &Client,
    source_uri: &str,
    snapshot: &Snapshot,
    elsewhere: &[Moving],
) -> Result<bool, FleetError> {
    let (records, policies) = (&snapshot.records, &snapshot.policies);
    let mut hosts = snapshot.hosts.clone();
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
    let now = now_ms();
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
        let ran_secs = g
            .started_at_ms
            .map_or(0.0, |t| now.saturating_sub(t) as f64 / 1000.0);
        let model = guest_model(g);
        running.push(Running {
            from,
            to,
            need: model.need(path(to)),
            remaining_secs: g
                .remaining_secs
                .unwrap_or_else(|| g.predicted_secs.unwrap_or(1.0)),
            overran: g.predicted_secs.is_some_and(|p| ran_secs > p),
            postcopy_active: g.postcopy_active,
            converges_on: Some(model.converges_on()),
        });
        running_guests.push((k, running.len() - 1));
    }
    for other in elsewhere {
        if let (Some(&f), Some(&t)) = (index.get(&other.from), index.get(&other.to)) {
            hosts[t].ram_free_bytes = hosts[t]
                .ram_free_bytes
                .saturating_sub(other.memory_mib << 20);
            running.push(Running {
                from: f,
                to: t,
                need: links[f].min(links[t]),
                remaining_secs: f64::INFINITY,
                overran: false,
                postcopy_active: false,
                converges_on: None,
            });
        }
    }
    // What waits, each with where it would go, in the schedule's order
    // (each guest's policy looked up once).
    let mut order: Vec<(usize, schedule::Rank)> = record
        .guests
        .iter()
        .enumerate()
        .filter(|(_, g)| g.state == GuestState::Waiting)
        .map(|(k, g)| {
            let rank = schedule::Rank {
                secs: g.predicted_secs.unwrap_or(0.0),
                postcopy: cluster::policy::allows_postcopy(policies, &g.labels),
            };
            (k, rank)
        })
        .collect();
    order.sort_by(|(_, a), (_, b)| schedule::by_order(*a, *b));
    let source_host = hosts[from].clone();
    let patience_ms = cx.settings.patience.as_millis() as u64;
    let mut changed = false;
    let mut candidates = Vec::new();
    let mut candidate_guests = Vec::new();
    // Migrations into each host, running and placed in this step, and the
    // hosts they bring to their inbound cap.
    let mut inbound = vec![0u32; hosts.len()];
    let mut busy = BTreeSet::new();
    let arrives = |to: usize, inbound: &mut [u32], busy: &mut BTreeSet<String>| {
        inbound[to] += 1;
        if cx
            .settings
            .caps
            .inbound
            .is_some_and(|cap| inbound[to] >= cap)
        {
            busy.insert(hosts[to].name.clone());
        }
    };
    for r in &running {
        arrives(r.to, &mut inbound, &mut busy);
    }
    for (k, rank) in order {
        let g = &mut record.guests[k];
        match destination(g, &source_host, &hosts, &record.to, now, &busy) {
            Ok(to) => {
                arrives(index[&to], &mut inbound, &mut busy);
                if g.blocked.take().is_some() {
                    changed = true;
                }
                let t = index[&to];
                let model = guest_model(g);
                let need = model.need(path(t));
                candidates.push(Waiting {
                    from,
                    to: t,
                    need,
                    secs: g.predicted_secs.unwrap_or(1.0),
                    fill_in_secs: model.is_small(path(t)).then(|| model.cost(need).secs),
                    postcopy: rank.postcopy,
                });
                if g.destination.as_ref() != Some(&to) {
                    g.destination = Some(to);
                    changed = true;
                }
                candidate_guests.push(k);
            }
            Err(NoHost::Ever(why)) => {
                g.state = GuestState::Failed;
                g.error = Some(why);
                g.blocked = None;
                changed = true;
            }
            Err(NoHost::Now(why)) => {
                let since_ms = g.blocked.as_ref().map_or(now, |b| b.since_ms);
                if now.saturating_sub(since_ms) > patience_ms {
                    g.state = GuestState::Failed;
                    g.error = Some(format!(
                        "no host could take it for {:.0} s: {why}",
                        patience_ms as f64 / 1000.0
                    ));
                    g.blocked = None;
                    changed = true;
                } else if g.blocked.as_ref().map(|b| &b.why) != Some(&why) {
                    g.blocked = Some(cluster::Blocked { since_ms, why });
                    changed = true;
                }
            }
        }
    }
    let admitted = schedule::admit(
        Policy::Livemig,
        cx.settings.caps,
        &links,
        &running,
        &candidates,
    );
    // The schedule shares links; RAM is shared too, with the guests
    // admitted in this same step.
    let mut admitted = within_ram(
        admitted,
        &candidates,
        |a| record.guests[candidate_guests[a]].memory_mib << 20,
        &hosts,
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
            overran: false,
            postcopy_active: false,
            converges_on: Some(guest_model(g).converges_on()),
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
                let flags =
                    migrate::options(policies, &g.labels, share, source_uri.starts_with("tls://"));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::tests::host;

    fn waiting(name: &str, mib: u64) -> cluster::DrainGuest {
        cluster::DrainGuest::waiting(name, mib)
    }

    #[test]
    fn guests_admitted_in_one_step_do_not_overfill_a_host_s_ram() {
        // b has room for one 256 MiB guest beside its reserve, c for both.
        let hosts = [
            host("a", 100.0, 4096),
            host("b", 100.0, 400),
            host("c", 100.0, 1024),
        ];
        let to = |t| Waiting {
            from: 0,
            to: t,
            need: 1.0,
            secs: 1.0,
            fill_in_secs: None,
            postcopy: false,
        };
        let candidates = [to(1), to(1), to(2), to(2)];
        let kept = within_ram(vec![0, 1, 2, 3], &candidates, |_| 256 << 20, &hosts);
        assert_eq!(kept, [0, 2, 3]);
    }

    /// a, b and c, each with 4 GiB free on a 100 MiB/s link.
    fn three_roomy_hosts() -> [Host; 3] {
        ["a", "b", "c"].map(|name| host(name, 100.0, 4096))
    }

    #[test]
    fn a_guest_goes_to_a_host_it_has_not_failed_on_first() {
        let hosts = three_roomy_hosts();
        let mut g = waiting("vm", 128);
        g.destination = Some("b".into());
        assert_eq!(
            destination(&g, &hosts[0], &hosts, &[], 0, &BTreeSet::new()),
            Ok("b".into())
        );
        g.failures.push("b: refused".into());
        g.failed_at_ms = Some(1_000);
        assert_eq!(
            destination(&g, &hosts[0], &hosts, &[], 1_000, &BTreeSet::new()),
            Ok("c".into())
        );
    }

    #[test]
    fn a_guest_planned_on_a_host_with_no_slot_free_goes_to_one_with_a_slot() {
        let hosts = three_roomy_hosts();
        let mut g = waiting("vm", 128);
        g.destination = Some("c".into());
        let busy = |names: &[&str]| names.iter().map(|n| n.to_string()).collect();
        assert_eq!(
            destination(&g, &hosts[0], &hosts, &[], 0, &busy(&["c"])),
            Ok("b".into())
        );
        // With no slot free anywhere it waits for its own.
        assert_eq!(
            destination(&g, &hosts[0], &hosts, &[], 0, &busy(&["b", "c"])),
            Ok("c".into())
        );
        // --to still binds.
        assert_eq!(
            destination(&g, &hosts[0], &hosts, &["c".into()], 0, &busy(&["c"])),
            Ok("c".into())
        );
    }

    #[test]
    fn a_host_it_failed_on_is_tried_again_after_a_backoff_and_only_so_often() {
        let hosts = [host("a", 100.0, 4096), host("b", 100.0, 4096)];
        let to = ["b".to_string()];
        let mut g = waiting("vm", 128);
        g.destination = Some("b".into());
        g.failures.push("b: connection refused".into());
        g.failed_at_ms = Some(10_000);
        match destination(&g, &hosts[0], &hosts, &to, 11_000, &BTreeSet::new()) {
            Err(NoHost::Now(why)) => assert!(why.contains("b failed it before"), "{why}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            destination(
                &g,
                &hosts[0],
                &hosts,
                &to,
                10_000 + RETRY_BACKOFF_MS,
                &BTreeSet::new()
            ),
            Ok("b".into())
        );
        // The backoff doubles with each failure.
        g.failures.push("b: connection refused".into());
        assert!(destination(
            &g,
            &hosts[0],
            &hosts,
            &to,
            10_000 + RETRY_BACKOFF_MS,
            &BTreeSet::new()
        )
        .is_err());
        assert!(destination(
            &g,
            &hosts[0],
            &hosts,
            &to,
            10_000 + 2 * RETRY_BACKOFF_MS,
            &BTreeSet::new()
        )
        .is_ok());
        while g.failures.len() < MAX_ATTEMPTS {
            g.failures.push("b: connection refused".into());
        }
        assert!(matches!(
            destination(&g, &hosts[0], &hosts, &to, u64::MAX, &BTreeSet::new()),
            Err(NoHost::Ever(_))
        ));
    }

    #[test]
    fn a_guest_with_no_host_now_may_have_one_later() {
        // b is gone from the cluster (its agent restarting): only a is left.
        let hosts = [host("a", 100.0, 4096)];
        let g = waiting("vm", 128);
        match destination(&g, &hosts[0], &hosts, &[], 0, &BTreeSet::new()) {
            Err(NoHost::Now(why)) => assert!(!why.is_empty()),
            other => panic!("{other:?}"),
        }
    }
}
