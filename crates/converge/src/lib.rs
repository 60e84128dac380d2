//! Convergence of pre-copy live migration.
//!
//! - [`model`]: the guest as a dirty rate and a working set, and a
//!   pass-by-pass simulator of pre-copy with a steering hook.
//! - [`qemu`]: QEMU's auto-converge (7.2) as a steering, to predict what
//!   `--auto-converge` will do.
//! - [`controller`]: livemig's adaptive controller, a pure function from the
//!   last pass to the next throttle/downtime/post-copy decision.
//! - [`stall`]: per-pass stall detection.
//! - [`estimate`]: fitting the model to dirty-rate measurements and
//!   predicting plain pre-copy, auto-converge and the controller.
//!
//! Everything here is pure: no I/O, so every rule can be tested against
//! scripted scenarios. The mechanisms that apply a throttle live in the
//! `migration` crate.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod calibration;
pub mod controller;
pub mod estimate;
pub mod model;
pub mod qemu;
pub mod stall;

pub use controller::{decide, Action, Decision, Observation, Policy, State};
pub use model::{simulate, DirtyModel, Prediction, Scenario};
