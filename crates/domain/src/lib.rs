//! Domains: what a VM is, and how it runs under QEMU.
//!
//! - [`name`]: validated domain names (they become file names).
//! - [`definition`]: the TOML definition a user writes, with validation.
//! - [`qemu`]: everything about the QEMU binary: probing its capabilities
//!   ([`qemu::binary`]), the RAM layout that avoids a TCG migration bug
//!   ([`qemu::layout`]), the argv built from a definition ([`qemu::argv`]),
//!   and the supervised process with its QMP connection
//!   ([`qemu::process`]).

pub mod definition;
pub mod name;
pub mod qemu;

pub use definition::{Accel, DefinitionError, DomainDefinition};
pub use name::{DomainName, InvalidName};
