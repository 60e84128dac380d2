//! Draining hosts.
//!
//! - [`plan`]: what moving each guest costs (the convergence model), where
//!   each goes, and the shortest a drain could take.
//! - [`schedule`]: which migrations run at once and how the links are
//!   shared, livemig's rule beside the fixed ones operators use, and a
//!   simulator that runs any of them in virtual time.
//! - [`survey`]: what the cluster and the agents say about a host's guests
//!   and the hosts that could take them.
//! - [`controller`]: the controller that leads by etcd election and runs
//!   the drains recorded in etcd.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod controller;
pub mod plan;
pub mod schedule;
pub mod survey;
