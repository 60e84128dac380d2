//! One look at a drain: plan it if nobody has, follow its migrations,
//! admit the next, end it when the host runs no guest. Every change is
//! written back before anything acts on it, under the leadership and the
//! revision read, so a successor never finds a migration it cannot
//! account for.

use std::collections::BTreeMap;

use cluster::{DrainGuest, DrainRecord, DrainState, GuestCost, GuestState, Leadership, Versioned};
use protocol::call::{self, JobState};
use protocol::job::JobStatus;
use protocol::Client;

use super::{Context, Moving, Snapshot};
use crate::plan::{self, Guest};
use crate::schedule::{self, Move, Policy};
use crate::survey::{self, FleetError};

/// A drain being worked on, with the revision the next write must find.
pub(super) struct Draft {
    pub record: DrainRecord,
    pub revision: i64,
}

impl Draft {
    /// Writes the record; false if this controller no longer leads or
    /// another wrote it meanwhile (then the step stops).
    pub async fn save(
        &mut self,
        cx: &Context,
        leadership: &Leadership,
    ) -> Result<bool, FleetError> {
        match cx
            .cluster
            .save_drain(leadership, &self.record, self.revision)
            .await?
        {
            Some(revision) => {
                self.revision = revision;
                Ok(true)
            }
            None => Ok(false),
        }
    }
}

pub(super) use cluster::now_ms;

/// The cost model of a drain's guest, as recorded.
pub(super) fn guest_model(g: &DrainGuest) -> Guest {
    let mut guest = Guest::idle(&g.domain, g.memory_mib << 20);
    if let Some(bytes) = g.first_pass_bytes {
        guest.first_pass_bytes = bytes;
    }
    guest.model.rate = g.dirty_rate.unwrap_or(0.0);
    guest.model.working_set = g.working_set.unwrap_or(0.0);
    guest.model.rate_is_lower_bound = g.dirty_rate_is_lower_bound;
    guest
}

/// # Errors
/// An etcd or agent failure that stopped the step; the next tick retries.
/// Steps one drain with what the cluster said at the tick's start; the
/// record as the step left it.
pub(super) async fn step(
    cx: &Context,
    leadership: &Leadership,
    drain: Versioned,
    snapshot: &Snapshot,
    elsewhere: &[Moving],
) -> Result<DrainRecord, FleetError> {
    let mut draft = Draft {
        record: drain.record,
        revision: drain.revision,
    };
    if draft.record.state == DrainState::Pending
        && !plan_drain(cx, leadership, &mut draft, &snapshot.policies).await?
    {
        return Ok(draft.record);
    }
    let source_uri = snapshot
        .records
        .iter()
        .find(|h| h.name == draft.record.host)
        .map(|h| h.agent_uri.clone());
    let source_uri = match source_uri {
        Some(uri) => uri,
        None => {
            // The drained host's agent is gone: its guests are never
            // started elsewhere behind its back; wait for it.
            let note = format!(
                "{} is not registered: waiting for its agent to come back",
                draft.record.host
            );
            if draft.record.note.as_deref() != Some(&note) {
                draft.record.note = Some(note);
                draft.save(cx, leadership).await?;
            }
            return Ok(draft.record);
        }
    };
    let source = cx.agents.connect(&draft.record.host, &source_uri).await?;
    if follow(cx, leadership, &mut draft, &source, &snapshot.owners).await?
        && super::admit::admit(
            cx,
            leadership,
            &mut draft,
            &source,
            &source_uri,
            snapshot,
            elsewhere,
        )
        .await?
    {
        finish_if_empty(cx, leadership, &mut draft, &source).await?;
    }
    Ok(draft.record)
}

/// Surveys the host, measures its guests, places them and predicts the
/// drain; false if the drain cannot be planned yet.
async fn plan_drain(
    cx: &Context,
    leadership: &Leadership,
    draft: &mut Draft,
    policies: &[cluster::Policy],
) -> Result<bool, FleetError> {
    let record = &mut draft.record;
    tracing::info!(drain = %record.id, host = %record.host, "planning: measuring the guests");
    let survey = match survey::survey(&cx.cluster, &cx.agents, &record.host, true).await {
        Ok(survey) => survey,
        Err(e @ (FleetError::UnknownHost { .. } | FleetError::Agent { .. })) => {
            tracing::warn!(drain = %record.id, error = %e, "cannot plan the drain yet");
            record.note = Some(format!("cannot survey {}: {e}", record.host));
            draft.save(cx, leadership).await?;
            return Ok(false);
        }
        Err(e) => return Err(e),
    };
    let guests: Vec<Guest> = survey.guests.iter().map(|s| s.guest.clone()).collect();
    let placement = plan::place(&guests, &survey.source, &survey.hosts, &record.to);
    let index: BTreeMap<&str, usize> = survey
        .hosts
        .iter()
        .enumerate()
        .map(|(i, h)| (h.name.as_str(), i))
        .collect();
    let links: Vec<f64> = survey.hosts.iter().map(|h| h.link).collect();
    let from = index[survey.source.name.as_str()];
    let moves: Vec<Move> = survey
        .guests
        .iter()
        .filter_map(|s| {
            let to = placement.destination.get(&s.guest.name)?;
            Some(Move {
                guest: s.guest.clone(),
                from,
                to: index[to.as_str()],
                postcopy: cluster::policy::allows_postcopy(policies, &s.labels),
            })
        })
        .collect();
    let outcome = schedule::simulate(Policy::Livemig, cx.settings.caps, &links, &moves);
    record.predicted_secs = Some(outcome.makespan);
    record.lower_bound_secs = Some(plan::lower_bound(
        &guests,
        &survey.source,
        &survey.hosts,
        &placement,
    ));
    record.guests = survey
        .guests
        .iter()
        .map(|s| {
            let destination = placement.destination.get(&s.guest.name).cloned();
            let path = destination.as_ref().map_or(survey.source.link, |d| {
                links[index[d.as_str()]].min(survey.source.link)
            });
            // A guest no host can take now waits for one (admission
            // says so, and gives up after the controller's patience).
            let mut guest = DrainGuest::waiting(&s.guest.name, s.guest.memory_bytes >> 20);
            guest.predicted_secs = Some(s.guest.cost(path).secs + plan::SETUP_SECS);
            guest.dirty_rate = s.measured.then_some(s.guest.model.rate);
            guest.working_set = s.measured.then_some(s.guest.model.working_set);
            guest.dirty_rate_is_lower_bound = s.measured && s.guest.model.rate_is_lower_bound;
            guest.first_pass_bytes = Some(s.guest.first_pass_bytes);
            guest.labels = s.labels.clone();
            guest.destination = destination;
            guest
        })
        .collect();
    record.state = DrainState::Running;
    record.controller = Some(cx.settings.name.clone());
    record.note = None;
    draft.save(cx, leadership).await
}

/// Follows every migrating guest on the source agent; false if the
/// record could not be written.
async fn follow(
    cx: &Context,
    leadership: &Leadership,
    draft: &mut Draft,
    source: &Client,
    owners: &BTreeMap<String, String>,
) -> Result<bool, FleetError> {
    let host = draft.record.host.clone();
    let mut changed = false;
    for g in draft.record.guests.iter_mut() {
        if g.state != GuestState::Migrating {
            continue;
        }
        let moved_to = |g: &DrainGuest| {
            owners
                .get(&g.domain)
                .is_some_and(|o| Some(o) == g.destination.as_ref())
        };
        let Some(id) = g.job_id.clone() else {
            // Marked but not known to have started: the agent says
            // whether it did.
            let moved = moved_to(g);
            changed |= settle_unknown(cx, source, &host, g, moved, None).await?;
            continue;
        };
        match cx
            .agents
            .call(source, &host, call::Job { id: id.clone() })
            .await
        {
            Ok(JobState::Active(info)) => {
                let (done, left) = (
                    info.stats.memory_processed_bytes,
                    info.stats.memory_remaining_bytes,
                );
                // What is left, in seconds: the prediction's rest, but no
                // less than the bytes left at the job's bandwidth (a
                // guest that overran its prediction is not nearly done
                // because its share of bytes sent is high).
                let predicted_left =
                    g.predicted_secs.unwrap_or(0.0) - info.elapsed_ms as f64 / 1000.0;
                let bandwidth = g.bandwidth_mib_s.unwrap_or(1).max(1) as f64 * 1048576.0;
                let bytes_left = left.map_or(0.0, |l| l as f64 / bandwidth);
                let remaining = predicted_left.max(bytes_left).max(0.0);
                if g.remaining_secs.is_none_or(|r| (r - remaining).abs() > 0.2) {
                    g.remaining_secs = Some(remaining);
                    changed = true;
                }
                let postcopy = info.stats.in_postcopy();
                if g.postcopy_active != postcopy {
                    g.postcopy_active = postcopy;
                    changed = true;
                }
                if let (Some(done), Some(left)) = (done, left) {
                    let total = done.saturating_add(left);
                    if total > 0 {
                        let share = done as f64 / total as f64;
                        if share > g.progress + 0.01 {
                            g.progress = share.min(0.99);
                            changed = true;
                        }
                    }
                }
            }
            Ok(JobState::Ended(record)) => {
                changed = true;
                if record.status == JobStatus::Completed {
                    g.state = GuestState::Moved;
                    g.progress = 1.0;
                    g.cost = Some(GuestCost {
                        time_ms: record.total_time_ms,
                        bytes: record.transferred_bytes,
                        max_throttle_pct: record.max_cpu_throttle_pct,
                        downtime_ms: record.downtime_ms,
                    });
                } else {
                    let reason = record
                        .error
                        .unwrap_or_else(|| format!("the job ended {:?}", record.status));
                    back_to_waiting(g, Some(reason));
                }
            }
            Err(FleetError::Agent { source: e, .. }) => {
                // The agent cannot show the job (restarted without it, or
                // a request that failed): what runs where says how it
                // ended.
                let why = format!("its job {id} was lost: {e}");
                let moved = moved_to(g);
                changed |= settle_unknown(cx, source, &host, g, moved, Some(why)).await?;
            }
            Err(e) => return Err(e),
        }
    }
    if changed {
        return draft.save(cx, leadership).await;
    }
    Ok(true)
}

/// A migrating guest whose job the source agent cannot show: adopted if
/// the agent runs another job for it, moved if the cluster says it runs on
/// its destination, else back to waiting. Returns whether it changed.
async fn settle_unknown(
    cx: &Context,
    source: &Client,
    host: &str,
    g: &mut DrainGuest,
    moved: bool,
    why: Option<String>,
) -> Result<bool, FleetError> {
    let Ok(domain) = g.domain.parse() else {
        return Ok(false);
    };
    match cx.agents.call(source, host, call::DomInfo { domain }).await {
        Ok(info) if info.active_job.is_some() => {
            if info.active_job == g.job_id {
                return Ok(false);
            }
            g.job_id = info.active_job;
        }
        _ if moved => {
            g.state = GuestState::Moved;
            g.progress = 1.0;
        }
        Ok(_) => back_to_waiting(g, why),
        // The agent does not answer: wait for it.
        Err(FleetError::Agent { .. }) => return Ok(false),
        Err(e) => return Err(e),
    }
    Ok(true)
}

/// The guest waits again, with why its last destination failed.
pub(super) fn back_to_waiting(g: &mut DrainGuest, reason: Option<String>) {
    if let (Some(to), Some(reason)) = (&g.destination, reason) {
        g.failures.push(format!("{to}: {reason}"));
        g.failed_at_ms = Some(now_ms());
    }
    g.state = GuestState::Waiting;
    g.job_id = None;
    g.progress = 0.0;
    g.bandwidth_mib_s = None;
    g.remaining_secs = None;
    g.postcopy_active = false;
}

/// Ends the drain once nothing waits or moves: done if the host runs no
/// guest, failed (each left guest saying why) if some could not go. A
/// guest that started on the host meanwhile joins the drain.
async fn finish_if_empty(
    cx: &Context,
    leadership: &Leadership,
    draft: &mut Draft,
    source: &Client,
) -> Result<(), FleetError> {
    let record = &mut draft.record;
    if record
        .guests
        .iter()
        .any(|g| matches!(g.state, GuestState::Waiting | GuestState::Migrating))
    {
        return Ok(());
    }
    let running = cx
        .agents
        .call(source, &record.host, call::List { all: false })
        .await?;
    let mut joined = false;
    for domain in running {
        if !record.guests.iter().any(|g| g.domain == domain.name) {
            let mut guest = DrainGuest::waiting(&domain.name, 0);
            if let Ok(name) = domain.name.parse() {
                if let Ok(info) = cx
                    .agents
                    .call(source, &record.host, call::DomInfo { domain: name })
                    .await
                {
                    guest.memory_mib = u64::from(info.memory_mib);
                    guest.labels = info.labels;
                }
            }
            record.guests.push(guest);
            joined = true;
        }
    }
    if !joined {
        let all_moved = record.guests.iter().all(|g| g.state == GuestState::Moved);
        record.state = if all_moved {
            DrainState::Done
        } else {
            DrainState::Failed
        };
        record.ended_at_ms = Some(now_ms());
    }
    draft.save(cx, leadership).await.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_known_only_from_below_stays_so_in_the_drain_record() {
        const MIB: f64 = 1048576.0;
        let mut g = DrainGuest::waiting("vm", 128);
        g.dirty_rate = Some(6.0 * MIB);
        g.working_set = Some(6.0 * MIB);
        g.dirty_rate_is_lower_bound = true;
        let stored: DrainGuest = serde_json::from_value(serde_json::to_value(&g).unwrap()).unwrap();
        assert!(guest_model(&stored).model.rate_is_lower_bound);
        // Its need comes from its working set, not from a rate it may
        // well exceed.
        let link = 100.0 * MIB;
        let bounded = guest_model(&stored).need(link);
        g.dirty_rate_is_lower_bound = false;
        assert!(bounded > guest_model(&g).need(link), "{bounded}");
        // A record written before the field existed reads as exact.
        let mut old = serde_json::to_value(&g).unwrap();
        old.as_object_mut()
            .unwrap()
            .remove("dirty_rate_is_lower_bound");
        let old: DrainGuest = serde_json::from_value(old).unwrap();
        assert!(!guest_model(&old).model.rate_is_lower_bound);
    }
}
