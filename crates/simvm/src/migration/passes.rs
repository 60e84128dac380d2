//! The bookkeeping of the source's passes: which pages go next within a
//! window's budget and what they cost on the link, the dirty-bitmap sync
//! with QEMU 7.2's auto-converge check, and the pages a post-copy has left.

use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;

use crate::machine::Machine;
use crate::ram::{PageSet, PAGE_SIZE};

/// The link's speed when `max-bandwidth` is higher: what QEMU reaches on
/// loopback here, about.
pub const LINK_BYTES_PER_SEC: u64 = 1 << 30;
/// QEMU's rate-limiting window.
pub(super) const WINDOW: Duration = Duration::from_millis(100);
/// Bytes a page whose content is sent costs on the link (page and header).
pub(super) const NORMAL_PAGE_BYTES: u64 = PAGE_SIZE + 8;
/// Bytes a zero page costs (header and one byte).
const ZERO_PAGE_BYTES: u64 = 9;

/// QEMU's auto-converge state between syncs.
pub(super) struct Trigger {
    pub(super) last_check: Instant,
    pub(super) dirtied: u64,
    pub(super) sent_at_check: u64,
    pub(super) high_periods: u32,
}

/// Which counter the bytes go to.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    Precopy,
    Downtime,
    Postcopy,
}

/// The pace: a `max-bandwidth`-like parameter, capped by the link (and 0,
/// "no limit" for post-copy, is the link).
pub(super) fn bandwidth(m: &Machine, parameter: &str) -> u64 {
    match m.migration.number(parameter) {
        0 => LINK_BYTES_PER_SEC,
        bw => bw.min(LINK_BYTES_PER_SEC),
    }
}

/// Takes up to `budget` bytes' worth of pages from `to_send`, from `scan`
/// on, counting them.
pub(super) fn take_pages(
    m: &mut Machine,
    to_send: &mut PageSet,
    scan: &mut usize,
    budget: u64,
    phase: Phase,
) -> Vec<(u32, u64)> {
    let mut batch = Vec::new();
    let mut cost = 0u64;
    let mut normal = 0u64;
    while cost < budget {
        let Some(page) = to_send.next_from(*scan) else {
            break;
        };
        to_send.remove(page);
        *scan = page + 1;
        let value = m.ram.pages[page];
        if value == 0 {
            cost += ZERO_PAGE_BYTES;
            m.migration.ram.duplicate += 1;
        } else {
            cost += NORMAL_PAGE_BYTES;
            normal += 1;
        }
        batch.push((page as u32, value));
    }
    let ram = &mut m.migration.ram;
    ram.normal += normal;
    ram.transferred += cost;
    match phase {
        Phase::Precopy => ram.precopy_bytes += cost,
        Phase::Downtime => ram.downtime_bytes += cost,
        Phase::Postcopy => ram.postcopy_bytes += cost,
    }
    if phase != Phase::Downtime {
        let secs = WINDOW.as_secs_f64();
        ram.mbps = cost as f64 * 8.0 / 1e6 / secs;
        ram.pages_per_second = (batch.len() as f64 / secs) as u64;
    }
    batch
}

/// A dirty-bitmap sync: what the guest wrote since the last one joins the
/// pages to send; QEMU's auto-converge looks at the period.
pub(super) fn sync(
    m: &mut Machine,
    to_send: &mut PageSet,
    trigger: &mut Trigger,
    last_sync: Instant,
) {
    let newly = m
        .ram
        .dirty_log
        .as_mut()
        .map(PageSet::take)
        .unwrap_or_default();
    let dirtied = newly.count() as u64;
    to_send.union_with(&newly);
    let ram = &mut m.migration.ram;
    ram.dirty_sync_count += 1;
    let secs = last_sync.elapsed().as_secs_f64().max(1e-3);
    ram.dirty_pages_rate = (dirtied as f64 / secs) as u64;
    let pass = ram.dirty_sync_count;
    if m.migration_events() {
        m.emit("MIGRATION_PASS", Some(json!({"pass": pass})));
    }
    trigger.dirtied += dirtied * PAGE_SIZE;
    if trigger.last_check.elapsed() < Duration::from_secs(1) {
        return;
    }
    let mig = &mut m.migration;
    let sent = mig.ram.transferred - trigger.sent_at_check;
    let high = trigger.dirtied > sent * mig.number("throttle-trigger-threshold") / 100;
    trigger.last_check = Instant::now();
    trigger.dirtied = 0;
    trigger.sent_at_check = mig.ram.transferred;
    if mig.capability("auto-converge") && high {
        trigger.high_periods += 1;
        if trigger.high_periods >= 2 {
            trigger.high_periods = 0;
            let max = mig.number("max-cpu-throttle");
            mig.throttle_pct = if mig.throttle_pct == 0 {
                mig.number("cpu-throttle-initial")
            } else {
                (mig.throttle_pct + mig.number("cpu-throttle-increment")).min(max)
            };
        }
    }
}

pub(super) fn page_words(set: &PageSet) -> Vec<u64> {
    let mut words = vec![0u64; set.len().div_ceil(64)];
    let mut page = set.next_from(0);
    let mut seen = 0;
    while let Some(p) = page {
        words[p / 64] |= 1 << (p % 64);
        seen += 1;
        if seen == set.count() {
            break;
        }
        page = set.next_from(p + 1);
    }
    words
}

/// The pages a [`Frame::Postcopy`] names.
pub fn pages_of(words: &[u64], len: usize) -> PageSet {
    let mut set = PageSet::new(len);
    for (i, word) in words.iter().enumerate() {
        for bit in 0..64 {
            if word & (1 << bit) != 0 && i * 64 + bit < len {
                set.insert(i * 64 + bit);
            }
        }
    }
    set
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_postcopy_set_survives_as_words() {
        let mut set = PageSet::new(130);
        for p in [0, 63, 64, 129] {
            set.insert(p);
        }
        assert_eq!(pages_of(&page_words(&set), 130), set);
    }
}
