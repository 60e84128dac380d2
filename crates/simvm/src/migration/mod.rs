//! Migration: capabilities and parameters as QEMU 7.2 has them, the
//! status `query-migrate` reports, and the two halves that move the guest
//! between simulated VMs over a real socket.
//!
//! - `outgoing`: the source's passes over the dirty bitmap, paced at
//!   `max-bandwidth`, the switchover when what is left fits the downtime
//!   limit, cancel; `passes`: which pages go next and what they cost, the
//!   sync with QEMU's auto-converge check; `postcopy`: the source's
//!   post-copy.
//! - `incoming`: the destination's listener and the stream's landing.
//! - `wire`: the stream between them.

pub mod incoming;
pub mod outgoing;
mod passes;
mod postcopy;
pub mod wire;

use std::collections::BTreeMap;

use qmp::commands::migration::MigrationStatus;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::ram::PAGE_SIZE;

/// What the monitor tells a running outgoing migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// `migrate_cancel`.
    Cancel,
    /// `migrate-continue` (from `pre-switchover`).
    Continue,
    /// `migrate-start-postcopy`.
    StartPostcopy,
}

/// Counters of the RAM sent, as `query-migrate`'s `ram` has them.
#[derive(Debug, Clone, Default)]
pub struct RamCounters {
    /// Bytes on the link.
    pub transferred: u64,
    /// Pages sent whole.
    pub normal: u64,
    /// Zero pages (a header each).
    pub duplicate: u64,
    /// Bytes sent before the switchover.
    pub precopy_bytes: u64,
    /// Bytes sent while the guest was stopped.
    pub downtime_bytes: u64,
    /// Bytes sent in post-copy.
    pub postcopy_bytes: u64,
    /// Dirty-bitmap syncs.
    pub dirty_sync_count: u64,
    /// Pages newly dirtied per second over the last period.
    pub dirty_pages_rate: u64,
    /// Throughput over the last window, megabits per second.
    pub mbps: f64,
    /// Pages sent per second over the last window.
    pub pages_per_second: u64,
    /// Bytes still to send in this pass.
    pub remaining: u64,
    /// Guest RAM, bytes.
    pub total: u64,
}

/// One side's migration state.
#[derive(Debug)]
pub struct Migration {
    /// Capabilities by name.
    pub capabilities: BTreeMap<String, bool>,
    /// Parameters by name, with 7.2's defaults.
    pub parameters: Map<String, Value>,
    /// `None` before any migration.
    pub status: Option<MigrationStatus>,
    /// When `migrate` was issued.
    pub started: Option<Instant>,
    /// Milliseconds of setup.
    pub setup_time_ms: u64,
    /// Set when it ends.
    pub total_time_ms: Option<u64>,
    /// Set when it completes.
    pub downtime_ms: Option<u64>,
    /// QEMU's estimate of the downtime now.
    pub expected_downtime_ms: u64,
    /// Auto-converge's throttle, percent.
    pub throttle_pct: u64,
    /// Why it failed.
    pub error_desc: Option<String>,
    /// RAM counters.
    pub ram: RamCounters,
    /// An incoming migration's listening addresses (`socket-address`).
    pub listening: Option<Value>,
    /// This side receives.
    pub incoming: bool,
    /// The running outgoing migration's control channel.
    pub control: Option<mpsc::UnboundedSender<Control>>,
}

impl Default for Migration {
    fn default() -> Self {
        let probe = crate::probe::qemu_7_2();
        let without = crate::probe::capabilities_without();
        Migration {
            capabilities: probe
                .capabilities
                .iter()
                .filter(|c| !without.contains(c))
                .map(|c| (c.clone(), false))
                .collect(),
            parameters: probe.parameters.clone(),
            status: None,
            started: None,
            setup_time_ms: 0,
            total_time_ms: None,
            downtime_ms: None,
            expected_downtime_ms: 0,
            throttle_pct: 0,
            error_desc: None,
            ram: RamCounters::default(),
            listening: None,
            incoming: false,
            control: None,
        }
    }
}

impl Migration {
    /// Whether a capability is on.
    pub fn capability(&self, name: &str) -> bool {
        self.capabilities.get(name).copied().unwrap_or(false)
    }

    /// A numeric parameter.
    pub fn number(&self, name: &str) -> u64 {
        self.parameters
            .get(name)
            .and_then(Value::as_u64)
            .unwrap_or(0)
    }

    /// True while a migration is under way on this side.
    pub fn in_progress(&self) -> bool {
        matches!(
            self.status,
            Some(
                MigrationStatus::Setup
                    | MigrationStatus::Active
                    | MigrationStatus::Cancelling
                    | MigrationStatus::PreSwitchover
                    | MigrationStatus::Device
                    | MigrationStatus::PostcopyActive
                    | MigrationStatus::PostcopyPaused
                    | MigrationStatus::PostcopyRecover
            )
        )
    }

    /// `query-migrate`'s reply, shaped as QEMU 7.2 shapes it for each
    /// state.
    pub fn info(&self) -> Value {
        let mut info = Map::new();
        if let Some(listening) = &self.listening {
            if !matches!(self.status, Some(MigrationStatus::Completed)) {
                info.insert("socket-address".into(), listening.clone());
            }
        }
        let Some(status) = self.status else {
            return Value::Object(info);
        };
        if self.incoming {
            // A destination reports no status until the source connects.
            if status != MigrationStatus::Setup {
                info.insert("status".into(), json!(status.as_str()));
            }
            if let Some(error) = &self.error_desc {
                info.insert("error-desc".into(), json!(error));
            }
            return Value::Object(info);
        }
        info.insert("status".into(), json!(status.as_str()));
        let elapsed = self.started.map_or(0, |s| s.elapsed().as_millis() as u64);
        match status {
            MigrationStatus::Setup | MigrationStatus::Cancelling | MigrationStatus::Cancelled => {}
            MigrationStatus::Failed => {
                if let Some(error) = &self.error_desc {
                    info.insert("error-desc".into(), json!(error));
                }
            }
            MigrationStatus::Completed => {
                info.insert("setup-time".into(), json!(self.setup_time_ms));
                info.insert("downtime".into(), json!(self.downtime_ms.unwrap_or(0)));
                info.insert(
                    "total-time".into(),
                    json!(self.total_time_ms.unwrap_or(elapsed)),
                );
                info.insert("ram".into(), self.ram_info());
            }
            _ => {
                info.insert("setup-time".into(), json!(self.setup_time_ms));
                info.insert("total-time".into(), json!(elapsed));
                if !status.is_postcopy() {
                    info.insert("expected-downtime".into(), json!(self.expected_downtime_ms));
                }
                info.insert("ram".into(), self.ram_info());
                if self.throttle_pct > 0 {
                    info.insert("cpu-throttle-percentage".into(), json!(self.throttle_pct));
                }
            }
        }
        Value::Object(info)
    }

    fn ram_info(&self) -> Value {
        let r = &self.ram;
        json!({
            "total": r.total,
            "remaining": r.remaining,
            "transferred": r.transferred,
            "normal": r.normal,
            "normal-bytes": r.normal * PAGE_SIZE,
            "duplicate": r.duplicate,
            "skipped": 0,
            "dirty-sync-count": r.dirty_sync_count,
            "dirty-pages-rate": r.dirty_pages_rate,
            "mbps": r.mbps,
            "pages-per-second": r.pages_per_second,
            "page-size": PAGE_SIZE,
            "postcopy-requests": 0,
            "multifd-bytes": 0,
            "precopy-bytes": r.precopy_bytes,
            "downtime-bytes": r.downtime_bytes,
            "postcopy-bytes": r.postcopy_bytes,
            "dirty-sync-missed-zero-copy": 0,
        })
    }
}
