//! A drain as text: a bar per guest and one for the drain while it runs,
//! then the report.

use cluster::{DrainGuest, DrainRecord, DrainState, GuestState};

const BAR: usize = 24;

fn bar(share: f64) -> String {
    let filled = ((share.clamp(0.0, 1.0)) * BAR as f64).round() as usize;
    format!("[{}{}]", "#".repeat(filled), "-".repeat(BAR - filled))
}

fn guest_state(g: &DrainGuest) -> &'static str {
    match g.state {
        GuestState::Waiting => "waiting",
        GuestState::Migrating => "moving",
        GuestState::Moved => "moved",
        GuestState::Failed => "failed",
    }
}

/// The drain's share done: each guest weighs its memory.
pub fn completion(record: &DrainRecord) -> f64 {
    let total: u64 = record.guests.iter().map(|g| g.memory_mib.max(1)).sum();
    if total == 0 {
        return if record.state == DrainState::Done {
            1.0
        } else {
            0.0
        };
    }
    let done: f64 = record
        .guests
        .iter()
        .map(|g| {
            let share = match g.state {
                GuestState::Moved => 1.0,
                GuestState::Migrating => g.progress,
                _ => 0.0,
            };
            share * g.memory_mib.max(1) as f64
        })
        .sum();
    done / total as f64
}

/// The drain as it stands at `now_ms`.
pub fn progress(record: &DrainRecord, now_ms: u64) -> String {
    let elapsed = now_ms.saturating_sub(record.created_at_ms) as f64 / 1000.0;
    let mut out = String::new();
    let predicted = record
        .predicted_secs
        .map(|p| format!(", predicted end in {:.0} s", (p - elapsed).max(0.0)))
        .unwrap_or_default();
    let share = completion(record);
    out.push_str(&format!(
        "{} {} {:>3.0}% {:<8} {:.1} s{predicted}\n",
        record.host,
        bar(share),
        share * 100.0,
        format!("{:?}", record.state).to_lowercase(),
        elapsed
    ));
    for g in &record.guests {
        let share = match g.state {
            GuestState::Moved => 1.0,
            GuestState::Migrating => g.progress,
            _ => 0.0,
        };
        let to = g.destination.as_deref().unwrap_or("-");
        let speed = g
            .bandwidth_mib_s
            .filter(|_| g.state == GuestState::Migrating)
            .map(|b| format!(" at {b} MiB/s"))
            .unwrap_or_default();
        out.push_str(&format!(
            "  {:<20} {} {:>3.0}% {:<8} -> {to}{speed}\n",
            g.domain,
            bar(share),
            share * 100.0,
            guest_state(g)
        ));
        if let Some(blocked) = g
            .blocked
            .as_ref()
            .filter(|_| g.state == GuestState::Waiting)
        {
            let waited = now_ms.saturating_sub(blocked.since_ms) as f64 / 1000.0;
            out.push_str(&format!(
                "    no host can take it now ({waited:.0} s): {}\n",
                blocked.why
            ));
        }
    }
    if let Some(note) = &record.note {
        out.push_str(&format!("  ({note})\n"));
    }
    out
}

/// The report of an ended drain: each guest's cost, and what failed and
/// why.
pub fn report(record: &DrainRecord) -> String {
    let took = record
        .ended_at_ms
        .map(|end| end.saturating_sub(record.created_at_ms) as f64 / 1000.0);
    let verdict = match record.state {
        DrainState::Done => format!("{} runs no guest", record.host),
        DrainState::Failed => format!("{} still runs guests", record.host),
        _ => "not ended".into(),
    };
    let mut out = format!(
        "drain {}: {} in {}{}{}\n",
        record.id,
        verdict,
        took.map_or("?".into(), |t| format!("{t:.1} s")),
        record
            .predicted_secs
            .map(|p| format!(" (predicted {p:.1} s"))
            .unwrap_or_default(),
        record
            .lower_bound_secs
            .map(|b| format!(", lower bound {b:.1} s)"))
            .unwrap_or_else(|| if record.predicted_secs.is_some() {
                ")".into()
            } else {
                String::new()
            }),
    );
    out.push_str(&format!(
        "{:<20} {:<8} {:<16} {:>8} {:>10} {:>9} {:>9}\n",
        "GUEST", "STATE", "TO", "TIME", "SENT", "THROTTLE", "DOWNTIME"
    ));
    for g in &record.guests {
        let cost = g.cost.as_ref();
        out.push_str(&format!(
            "{:<20} {:<8} {:<16} {:>8} {:>10} {:>9} {:>9}\n",
            g.domain,
            guest_state(g),
            if g.state == GuestState::Moved {
                g.destination.as_deref().unwrap_or("-")
            } else {
                "-"
            },
            cost.map_or("-".into(), |c| format!(
                "{:.1} s",
                c.time_ms as f64 / 1000.0
            )),
            cost.map_or("-".into(), |c| format!("{} MiB", c.bytes >> 20)),
            cost.map_or("-".into(), |c| format!("{:.0} %", c.max_throttle_pct)),
            cost.and_then(|c| c.downtime_ms)
                .map_or("-".into(), |d| format!("{d} ms")),
        ));
    }
    for g in &record.guests {
        for failure in &g.failures {
            out.push_str(&format!("  {}: tried {failure}\n", g.domain));
        }
        if let Some(error) = &g.error {
            out.push_str(&format!("  {}: {error}\n", g.domain));
        }
    }
    out
}
