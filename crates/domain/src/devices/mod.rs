//! A domain's devices beyond CPU and RAM: its disks and its network
//! interfaces, as a definition declares them.

pub mod disk;
pub mod nic;

pub use disk::{Disk, DiskCache, DiskError, DiskFormat};
pub use nic::{Nic, NicError, NicNetwork};
