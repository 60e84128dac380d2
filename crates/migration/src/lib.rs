//! Live migration of one QEMU guest, as far as QEMU is concerned.
//!
//! - [`flags`]: what the user asked (`--auto-converge`, `--bandwidth`, ...),
//!   validated, and which QEMU capabilities that needs on which host.
//! - [`support`]: checks those needs against a probed QEMU binary.
//! - [`safety`]: whether the guest can move as defined (CPU model, disks).
//! - [`settings`]: sets capabilities and parameters on a QEMU for a job and
//!   restores them afterwards.
//! - [`storage`]: copying disks that are not shared (NBD and mirrors).
//! - [`stream_tls`]: `--tls`: the QEMUs' credentials and who they admit.
//! - [`incoming`]: the destination QEMU: listen, wait for the data to land.
//! - [`perform`]: the source QEMU: `migrate`, watch, steer (controller,
//!   escalation, timeout action), cancel.
//! - [`vcpu_throttle`]: the throttle mechanisms the controller drives.
//! - [`dirty`]: measuring a guest's dirty rate (`calc-dirty-rate`).
//! - [`job`]: QEMU's job statistics in the protocol's terms.
//! - [`uri`]: migration data URIs.
//! - [`wire`]: conversions to and from the protocol's types.
//!
//! The agents (`livemigd`) orchestrate these across two hosts.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod cleanup;
pub mod dirty;
pub mod estimate;
pub mod flags;
pub mod incoming;
pub mod job;
pub mod perform;
pub mod plan;
pub mod postcopy;
pub mod record;
pub mod safety;
pub mod settings;
pub mod storage;
pub mod stream_tls;
pub mod support;
pub mod uri;
pub mod vcpu_throttle;
pub mod wire;

pub use flags::{Flags, InvalidFlags};
pub use protocol::{ConvergeMode, TimeoutAction};
