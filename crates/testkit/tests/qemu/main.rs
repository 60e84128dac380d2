//! End-to-end tests with real QEMU that can share the machine: two run at
//! once (the ones that measure rates or throttle real vCPUs are in
//! `tests/convergence`, and run alone).
//!
//! - [`contract`]: migrations on QEMU and on the simulated VM, compared.
//! - [`confinement`]: QEMU sandboxed, as an unprivileged user.
//! - [`demo`]: `livemig demo`, both guests.
//! - [`linux_guest`]: the Linux guest on a shared disk.
//! - [`migrate_options`]: compression and multifd.
//! - [`network`]: a TCP session across a bridged guest's migration.
//! - [`rogue_peer`]: a destination that admits only the asking agent's QEMU.
//! - [`storage`]: disks copied to the destination.
//! - [`stream_tls`]: the migration stream in the clear and over TLS.
//! - [`tcg_bug`]: QEMU 7.2's TCG dirty-bitmap bug and its workaround.
//! - [`two_hosts`]: agents in two network namespaces.

mod confinement;
mod contract;
mod demo;
mod linux_guest;
mod migrate_options;
mod network;
mod rogue_peer;
mod storage;
mod stream_tls;
mod tcg_bug;
mod two_hosts;
