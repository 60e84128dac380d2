//! The `livemig` command line, as a library: the binary parses its
//! arguments and calls [`commands::run`].
//!
//! - [`args`]: the command line (clap), virsh's names where virsh has them.
//! - [`agent`]: reaching an agent and typed calls to it.
//! - [`commands`]: one handler per command, each returning what it prints.
//! - `migrate`, `progress`, `limits`: `migrate` and following its job,
//!   `migrate-getspeed` and `migrate-getmaxdowntime`.
//! - [`output`]: text in virsh's style.
//! - [`demo`]: `livemig demo`.
//! - [`hints`]: what to do next, for the common errors.
//!
//! Exit status: 0 success; 1 the agent refused or the operation (e.g. a
//! migration) failed; 2 bad usage.

#![warn(missing_debug_implementations)]

pub mod agent;
pub mod args;
pub mod commands;
pub mod demo;
pub mod hints;
mod limits;
mod measure;
mod migrate;
pub mod output;
mod progress;
mod watch;
