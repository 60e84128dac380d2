//! End-to-end tests with real QEMU that measure rates or throttle real
//! vCPUs: each needs the machine to itself (`scripts/test.sh` runs this
//! binary one test at a time).
//!
//! - [`controller`]: the adaptive controller and QEMU's auto-converge.
//! - [`disk_pace`]: disk copies the guest's writes outrun.
//! - [`hot_guest`]: livemig's own switchover for a guest held above 99 %.
//! - [`kvm_dirty_ring`]: the writers from KVM's dirty ring.
//! - [`slice_floor`]: the fastest writer to post-copy from the probe, also
//!   one measured below the link but only from below.
//! - [`vcpus`]: throttling only the vCPUs that write, in a Linux guest.

mod controller;
mod disk_pace;
mod hot_guest;
mod kvm_dirty_ring;
mod slice_floor;
mod vcpus;
