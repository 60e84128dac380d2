//! The livemig test guest.
//!
//! `src/guest.s` is a multiboot kernel for `qemu -kernel` that sweeps a
//! working set at a rate set on its command line, checks that every page still
//! holds what it last wrote, and reports progress on the serial port. The
//! build script assembles it; this crate carries the image ([`KERNEL`]), builds
//! its command line ([`Workload`]) and reads what it printed ([`SerialLog`]).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod linux;
mod serial;

use std::io;
use std::path::{Path, PathBuf};

pub use serial::{
    spinner_rate, Corruption, DiskProgress, Progress, SerialLog, SpinnerProgress, Start,
};

/// The guest kernel image (32-bit multiboot ELF).
pub const KERNEL: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/livemig-guest.elf"));

/// A domain definition (TOML) that boots the guest `kernel` as `name` with
/// `memory_mib` of RAM, running `workload`.
pub fn definition_toml(name: &str, memory_mib: u32, kernel: &Path, workload: Workload) -> String {
    format!(
        "name = \"{name}\"\nmemory_mib = {memory_mib}\n[kernel]\npath = {:?}\ncmdline = {:?}\n",
        kernel.display().to_string(),
        workload.cmdline()
    )
}

/// What the guest does: its command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Workload {
    /// Working set in MiB; 0 makes the guest idle (it only touches one page,
    /// 100 times a second, sleeping in between).
    pub working_set_mib: u32,
    /// Busy-loop iterations after each page write: the knob for the dirty rate.
    pub spin: u32,
    /// Interval between progress lines on the serial port.
    pub report_ms: u32,
}

impl Workload {
    /// A guest that sleeps between timer ticks and dirties almost nothing.
    pub const IDLE: Workload = Workload {
        working_set_mib: 0,
        spin: 0,
        report_ms: 500,
    };

    /// A guest sweeping `working_set_mib` with `spin` iterations between writes.
    pub fn busy(working_set_mib: u32, spin: u32) -> Self {
        Workload {
            working_set_mib,
            spin,
            report_ms: 500,
        }
    }

    /// The kernel command line (QEMU's `-append`).
    pub fn cmdline(&self) -> String {
        format!(
            "wss={} spin={} report={}",
            self.working_set_mib, self.spin, self.report_ms
        )
    }
}

/// Writes [`KERNEL`] into `dir` and returns its path.
///
/// # Errors
/// Any error from writing the file.
pub fn install_kernel(dir: &Path) -> io::Result<PathBuf> {
    let path = dir.join("livemig-guest.elf");
    std::fs::write(&path, KERNEL)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_is_a_32_bit_elf_with_a_multiboot_header() {
        assert_eq!(&KERNEL[..4], b"\x7fELF");
        assert_eq!(
            KERNEL[4], 1,
            "ELFCLASS32: QEMU's multiboot loader refuses 64-bit images"
        );
        let magic = 0x1BAD_B002u32.to_le_bytes();
        let header = KERNEL[..8192.min(KERNEL.len())]
            .windows(4)
            .position(|w| w == magic)
            .expect("multiboot magic within the first 8 KiB");
        assert_eq!(header % 4, 0);
    }

    #[test]
    fn cmdline_names_every_knob() {
        assert_eq!(
            Workload::busy(64, 3000).cmdline(),
            "wss=64 spin=3000 report=500"
        );
    }
}
