//! `livemigd`, the per-host agent.
//!
//! - [`config`]: how the agent runs; [`timeouts`]: how long it waits.
//! - [`store`]: the state directory (definitions, run records, sockets, logs).
//! - [`history`]: finished jobs with their timelines, in SQLite.
//! - `state`: the agent itself; `table`: every domain, its state and
//!   transitions (the only place that locks them); `jobs`: the migrations a
//!   domain can be part of; `running`: a domain's running VM.
//! - `vm`: starting a domain's VM and noticing when it exits.
//! - `api`: one handler per request.
//! - `estimate`: measuring a guest and predicting its migration;
//!   `measure`: virsh's dirty-rate measurement and XBZRLE cache.
//!   `measurements`: each guest's last dirty-rate measurement, kept fresh.
//! - `migrate`: the source and destination halves of a migration.
//! - `runfile`, `reattach`: what runs, on disk, and taking it over after
//!   a restart.
//! - [`throttles`]: lifting the vCPU throttles a crashed agent left.
//! - `server`: unix and TCP listeners, one task per connection; an HTTP
//!   `GET /metrics` on the TCP port is answered by `metrics`.
//!
//! [`run`] starts an agent; it serves until `shutdown` resolves. [`serve`]
//! does the same on listeners bound beforehand ([`Listeners::bind`]), which
//! is how tests run agents in-process.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod api;
mod caller;
pub mod config;
mod credentials;
mod errors;
mod estimate;
pub mod history;
mod jobs;
mod measure;
mod measurements;
mod membership;
mod metrics;
mod migrate;
mod probe_cache;
mod reattach;
mod runfile;
mod running;
mod server;
mod state;
pub mod store;
mod table;
mod taps;
pub mod throttles;
pub mod timeouts;
mod vm;
mod watch;

pub use config::Config;
pub use server::{run, serve, Listeners, RunError};
pub use throttles::release_stale_throttles;
pub use timeouts::Timeouts;

/// The tap names the agent with `state_dir` gives `def`'s bridged NICs.
pub fn tap_names(state_dir: &std::path::Path, def: &domain::DomainDefinition) -> Vec<String> {
    taps::Taps::of(state_dir, def).names
}
