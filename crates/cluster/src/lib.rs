//! The cluster's shared state, kept in etcd (a real distributed store:
//! leases, watches, transactions), never in a store of livemig's own. A
//! single pair of agents works without it.
//!
//! - [`connect`]: a client to the etcd endpoints, over mutual TLS with a
//!   certificate from the cluster's PKI (plaintext only when asked for).
//! - [`membership`]: each agent registers its host under a lease, so it
//!   is gone from the cluster within seconds of the agent dying.
//! - [`ownership`]: which host runs each domain, moved only by
//!   compare-and-swap transactions.
//! - [`cordon`]: hosts no new guest lands on.
//! - [`policy`]: migration settings by domain labels.
//! - [`leader`]: which controller leads, by a key under its lease.
//! - [`drain`]: drains and how each of their guests stands.
//! - [`changes`]: being woken when keys change (etcd watches).
//!
//! Keys live under `/livemig/`: `/livemig/hosts/NAME` holds a
//! [`HostRecord`] as JSON, `/livemig/domains/NAME` the name of the host
//! that runs the domain, `/livemig/cordons/NAME` a [`Cordon`],
//! `/livemig/drains/ID` a [`DrainRecord`] (and `/livemig/draining/HOST`
//! its id while it runs), `/livemig/controller/leader` the leading
//! controller's name.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod changes;
pub mod connect;
pub mod cordon;
pub mod drain;
pub mod leader;
pub mod membership;
pub mod ownership;
pub mod policy;

pub use changes::Changes;
pub use connect::{Cluster, ClusterError, Endpoints, TlsFiles};
pub use cordon::Cordon;
pub use drain::{
    now_ms, Blocked, DrainGuest, DrainRecord, DrainStart, DrainState, GuestCost, GuestState,
    Versioned,
};
pub use leader::{Leadership, Limits};
pub use membership::{HostRecord, Registration};
pub use ownership::Claim;
pub use policy::{Policy, PolicyError};

/// The prefix of every key livemig writes.
pub const PREFIX: &str = "/livemig/";
