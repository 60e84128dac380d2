//! Asynchronous QMP events.

use serde::Deserialize;
use serde_json::Value;

use crate::commands::migration::MigrationStatus;

/// An event as QEMU sent it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Event {
    #[serde(rename = "event")]
    /// The event's name (`MIGRATION`, `STOP`, ...).
    pub name: String,
    #[serde(default)]
    /// Its data.
    pub data: Value,
    #[serde(default)]
    /// When QEMU emitted it.
    pub timestamp: Option<Timestamp>,
}

/// Host time at which QEMU emitted the event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct Timestamp {
    /// Seconds since the epoch.
    pub seconds: i64,
    /// Microseconds within the second.
    pub microseconds: i64,
}

/// The events livemig acts on, decoded; everything else is `Other`.
#[derive(Debug, Clone, PartialEq)]
pub enum EventKind {
    /// Migration state change (needs the `events` capability).
    Migration {
        /// The new state.
        status: MigrationStatus,
    },
    /// A dirty-bitmap sync: one pass over guest memory finished.
    MigrationPass {
        /// The sync's number.
        pass: u64,
    },
    /// The vCPUs stopped.
    Stop,
    /// The vCPUs run again.
    Resume,
    /// QEMU is shutting down.
    Shutdown {
        /// The guest asked for it.
        guest: bool,
        /// QEMU's reason.
        reason: String,
    },
    /// Any other event.
    Other,
}

#[derive(Deserialize)]
struct MigrationData {
    status: MigrationStatus,
}

#[derive(Deserialize)]
struct PassData {
    pass: u64,
}

#[derive(Deserialize)]
struct ShutdownData {
    #[serde(default)]
    guest: bool,
    #[serde(default)]
    reason: String,
}

impl Event {
    /// Decodes the events we know; malformed data decodes as `Other`.
    pub fn kind(&self) -> EventKind {
        let data = || self.data.clone();
        match self.name.as_str() {
            "MIGRATION" => serde_json::from_value::<MigrationData>(data())
                .map(|d| EventKind::Migration { status: d.status })
                .unwrap_or(EventKind::Other),
            "MIGRATION_PASS" => serde_json::from_value::<PassData>(data())
                .map(|d| EventKind::MigrationPass { pass: d.pass })
                .unwrap_or(EventKind::Other),
            "STOP" => EventKind::Stop,
            "RESUME" => EventKind::Resume,
            "SHUTDOWN" => serde_json::from_value::<ShutdownData>(data())
                .map(|d| EventKind::Shutdown {
                    guest: d.guest,
                    reason: d.reason,
                })
                .unwrap_or(EventKind::Other),
            _ => EventKind::Other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(json: &str) -> Event {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn decodes_migration_status() {
        let e = event(
            r#"{"event":"MIGRATION","data":{"status":"completed"},"timestamp":{"seconds":1,"microseconds":2}}"#,
        );
        assert_eq!(
            e.kind(),
            EventKind::Migration {
                status: MigrationStatus::Completed
            }
        );
    }

    #[test]
    fn unknown_status_and_events_do_not_fail() {
        let e = event(r#"{"event":"MIGRATION","data":{"status":"some-future-state"}}"#);
        assert_eq!(
            e.kind(),
            EventKind::Migration {
                status: MigrationStatus::Unknown
            }
        );
        assert_eq!(event(r#"{"event":"NEW_THING"}"#).kind(), EventKind::Other);
    }

    #[test]
    fn decodes_shutdown() {
        let e = event(r#"{"event":"SHUTDOWN","data":{"guest":false,"reason":"host-qmp-quit"}}"#);
        assert_eq!(
            e.kind(),
            EventKind::Shutdown {
                guest: false,
                reason: "host-qmp-quit".into()
            }
        );
    }
}
