//! Tests whose subject is the agent, the CLI or the protocol, on simulated
//! VMs (`livemig-simvm`, held to real QEMU by `tests/qemu/contract.rs`):
//! they take little CPU, so they run side by side.
//!
//! - [`bad_input`]: a clear error, and nothing changed.
//! - [`cluster`]: hosts registered in a real etcd.
//! - [`drain`]: draining a host through a controller, and its leader
//!   killed mid-drain.
//! - [`drain_faults`]: drains meeting a refusing destination, a killed
//!   agent, a frozen etcd.
//! - [`confinement`]: no definition makes a VM open a file it may not.
//! - [`load`]: concurrent migrations and requests.
//! - [`operator`]: progress, job statistics, history, reports, metrics.
//! - [`options`]: `migrate` options the agent carries out.
//! - [`persistence`]: definitions across restarts and migrations.
//! - [`peer_prepare`]: what a compromised peer may ask a destination.
//! - [`rogue_peer`]: a compromised peer agent in front of a real one.
//! - [`security`]: TLS, roles, sockets, abusive clients.

mod bad_input;
mod cluster;
mod confinement;
mod drain;
mod drain_faults;
mod load;
mod operator;
mod options;
mod peer_prepare;
mod persistence;
mod rogue_peer;
mod security;
