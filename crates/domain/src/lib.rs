//! Domains: what a VM is, and how it runs under QEMU.
//!
//! - [`definition`]: the TOML definition a user writes, with validation.
//! - [`devices`]: its disks and network interfaces.
//! - [`confine`]: which files a definition may make QEMU open on a host.
//! - [`hypervisor`]: the seam between an agent and what runs its guests
//!   (QEMU, or simulated VMs).
//! - [`qemu`]: everything about the QEMU binary: probing its capabilities
//!   ([`qemu::binary`]), the RAM layout that avoids a TCG migration bug
//!   ([`qemu::layout`]), the argv built from a definition ([`qemu::argv`]),
//!   the supervised process with its QMP connection ([`qemu::process`]),
//!   and how much of the guest's RAM it holds ([`qemu::resident`]).

#![warn(missing_docs)]

pub mod confine;
pub mod definition;
pub mod devices;
pub mod hypervisor;
pub mod qemu;

pub use definition::{DefinitionError, DomainDefinition};
pub use types::{Accel, DomainName, InvalidName};
