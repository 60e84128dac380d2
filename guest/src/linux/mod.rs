//! livemig's Linux test guest: Debian's cloud kernel booted with an
//! initramfs of busybox, the virtio drivers and our static workload
//! (`guest/workload`), all from Debian packages and this tree.
//!
//! [`Parts::installed`] finds the pieces (`scripts/setup.sh` installs
//! `linux-image-cloud-amd64` and `busybox-static`;
//! `scripts/build-linux-guest.sh` builds the workload), [`build`] packs
//! them into a kernel and an initrd in a directory, and
//! [`LinuxWorkload::cmdline`] says what the guest does.

pub mod counter;
mod cpio;
mod modules;

use std::io;
use std::path::{Path, PathBuf};

use crate::Workload;

/// The guest's `/init`.
const INIT: &str = include_str!("../../linux/init");

/// Why the Linux guest cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum LinuxGuestError {
    /// A piece is not installed.
    #[error("{what} not found ({hint})")]
    Missing {
        /// Which piece.
        what: String,
        /// How to get it.
        hint: &'static str,
    },
    /// The workload is linked dynamically: it would not run alone in the
    /// initramfs.
    #[error("{0} is not statically linked (build it with scripts/build-linux-guest.sh)")]
    NotStatic(PathBuf),
    /// A file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A file could not be written.
    #[error("cannot write {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// What the Linux guest is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parts {
    /// The kernel image.
    pub kernel: PathBuf,
    /// Its modules directory (`/lib/modules/RELEASE`).
    pub modules: PathBuf,
    /// A statically linked busybox.
    pub busybox: PathBuf,
    /// The statically linked workload.
    pub workload: PathBuf,
}

/// Where `scripts/build-linux-guest.sh` leaves the static workload,
/// relative to a build's binary directory (`target/<profile>`).
pub fn workload_beside(bin_dir: &Path) -> PathBuf {
    bin_dir.join("../x86_64-unknown-linux-gnu/release/livemig-workload")
}

/// The static workload beside the running program's build.
pub fn workload_beside_this_build() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(workload_beside))
        .unwrap_or_else(|| PathBuf::from("livemig-workload"))
}

/// The kernel and initrd of a built guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinuxImage {
    /// The kernel (`[kernel] path`).
    pub kernel: PathBuf,
    /// The initramfs (`[kernel] initrd`).
    pub initrd: PathBuf,
}

const PACKAGES: &str =
    "run scripts/setup.sh: it installs linux-image-cloud-amd64 and busybox-static";

impl Parts {
    /// The newest installed cloud kernel (`/boot/vmlinuz-*-cloud-amd64`)
    /// with its modules, `/bin/busybox`, and `workload`.
    ///
    /// # Errors
    /// [`LinuxGuestError::Missing`] for a piece that is not there.
    pub fn installed(workload: &Path) -> Result<Parts, LinuxGuestError> {
        let missing = |what: &str, hint| LinuxGuestError::Missing {
            what: what.to_string(),
            hint,
        };
        let release = std::fs::read_dir("/boot")
            .map_err(|_| missing("/boot", PACKAGES))?
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_str()?.to_string();
                let release = name.strip_prefix("vmlinuz-")?;
                release
                    .ends_with("-cloud-amd64")
                    .then(|| release.to_string())
            })
            .max_by(|a, b| version_order(a, b))
            .ok_or_else(|| missing("a Debian cloud kernel in /boot", PACKAGES))?;
        let modules = Path::new("/lib/modules").join(&release);
        if !modules.is_dir() {
            return Err(missing(&modules.display().to_string(), PACKAGES));
        }
        let busybox = PathBuf::from("/bin/busybox");
        if !busybox.is_file() {
            return Err(missing("/bin/busybox", PACKAGES));
        }
        if !workload.is_file() {
            return Err(missing(
                &workload.display().to_string(),
                "run scripts/build-linux-guest.sh",
            ));
        }
        Ok(Parts {
            kernel: Path::new("/boot").join(format!("vmlinuz-{release}")),
            modules,
            busybox,
            workload: workload.to_path_buf(),
        })
    }
}

/// Orders kernel releases by their numbers (`6.1.0-9` before `6.1.0-10`).
fn version_order(a: &str, b: &str) -> std::cmp::Ordering {
    let numbers = |s: &str| -> Vec<u64> {
        s.split(|c: char| !c.is_ascii_digit())
            .filter_map(|n| n.parse().ok())
            .collect()
    };
    numbers(a).cmp(&numbers(b))
}

/// True if `elf` is a 64-bit ELF without a program interpreter.
fn is_static(elf: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 {
        return false;
    }
    let u16_at = |at: usize| u16::from_le_bytes([elf[at], elf[at + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().expect("eight bytes")) as usize;
    let (size, count) = (u16_at(0x36), u16_at(0x38));
    (0..count).all(|i| {
        let at = phoff + i * size;
        elf.get(at..at + 4)
            .is_some_and(|t| u32::from_le_bytes(t.try_into().expect("four bytes")) != PT_INTERP)
    })
}

fn read(path: &Path) -> Result<Vec<u8>, LinuxGuestError> {
    std::fs::read(path).map_err(|source| LinuxGuestError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), LinuxGuestError> {
    std::fs::write(path, bytes).map_err(|source| LinuxGuestError::Write {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes `linux-vmlinuz` and `linux-initrd.img` into `dir`.
///
/// # Errors
/// [`LinuxGuestError`] if a piece cannot be read, the workload is not
/// static, or `dir` cannot be written.
pub fn build(parts: &Parts, dir: &Path) -> Result<LinuxImage, LinuxGuestError> {
    let workload = read(&parts.workload)?;
    if !is_static(&workload) {
        return Err(LinuxGuestError::NotStatic(parts.workload.clone()));
    }
    let busybox = read(&parts.busybox)?;
    if !is_static(&busybox) {
        return Err(LinuxGuestError::NotStatic(parts.busybox.clone()));
    }
    let mut archive = cpio::Archive::default();
    for d in ["bin", "dev", "proc", "sys", "tmp", "lib", "lib/modules"] {
        archive.directory(d);
    }
    // The kernel opens /dev/console for /init before devtmpfs is mounted.
    archive.char_device("dev/console", 5, 1);
    archive.file("init", 0o755, INIT.as_bytes());
    archive.file("bin/busybox", 0o755, &busybox);
    archive.file("bin/livemig-workload", 0o755, &workload);
    let mut order = String::new();
    for module in modules::load_order(&parts.modules)? {
        let name = module
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        archive.file(&format!("lib/modules/{name}"), 0o644, &read(&module)?);
        order.push_str(&name);
        order.push('\n');
    }
    archive.file("lib/modules/load-order", 0o644, order.as_bytes());

    let image = LinuxImage {
        kernel: dir.join("linux-vmlinuz"),
        initrd: dir.join("linux-initrd.img"),
    };
    write(&image.kernel, &read(&parts.kernel)?)?;
    write(&image.initrd, &archive.finish())?;
    Ok(image)
}

/// What the Linux guest does: the bare-metal guest's memory workload, and
/// optionally a disk writer and a TCP counter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinuxWorkload {
    /// The memory sweep.
    pub memory: Workload,
    /// The block device to write (`/dev/vda`), if any.
    pub disk: Option<String>,
    /// Its write rate, KiB/s.
    pub disk_kib_s: u32,
    /// How many 4 KiB blocks it cycles through.
    pub disk_blocks: u32,
    /// The TCP counter's port, if any.
    pub port: Option<u16>,
    /// The NIC's address, `IP/PREFIX`, if any.
    pub address: Option<String>,
    /// Compute-only threads on vCPUs 1..=N, the sweep pinned to vCPU 0.
    pub spinners: u32,
    /// What the working set's pages hold: `text` (compresses like prose)
    /// or `random` (does not); zeros if none.
    pub fill: Option<&'static str>,
}

impl LinuxWorkload {
    /// Only the memory sweep.
    pub fn memory(memory: Workload) -> Self {
        LinuxWorkload {
            memory,
            disk: None,
            disk_kib_s: 256,
            disk_blocks: 1024,
            port: None,
            address: None,
            spinners: 0,
            fill: None,
        }
    }

    /// The kernel command line.
    pub fn cmdline(&self) -> String {
        let mut line = format!("console=ttyS0 quiet {}", self.memory.cmdline());
        if let Some(disk) = &self.disk {
            line.push_str(&format!(
                " disk={disk} disk_kib_s={} disk_blocks={}",
                self.disk_kib_s, self.disk_blocks
            ));
        }
        if let Some(port) = self.port {
            line.push_str(&format!(" port={port}"));
        }
        if let Some(address) = &self.address {
            line.push_str(&format!(" guest_ip={address}"));
        }
        if self.spinners > 0 {
            line.push_str(&format!(" spinners={}", self.spinners));
        }
        if let Some(fill) = self.fill {
            line.push_str(&format!(" fill={fill}"));
        }
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_releases_order_by_number() {
        let mut releases = [
            "6.1.0-10-cloud-amd64",
            "6.1.0-9-cloud-amd64",
            "6.1.0-56-cloud-amd64",
        ];
        releases.sort_by(|a, b| version_order(a, b));
        assert_eq!(releases.last(), Some(&"6.1.0-56-cloud-amd64"));
    }

    #[test]
    fn this_test_binary_is_not_static_and_a_script_is_not_an_elf() {
        let exe = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(!is_static(&exe), "test binaries are dynamically linked");
        assert!(!is_static(b"#!/bin/sh\n"));
    }

    #[test]
    fn the_command_line_names_what_the_guest_does() {
        let w = LinuxWorkload {
            disk: Some("/dev/vda".into()),
            port: Some(7000),
            address: Some("10.9.0.5/24".into()),
            ..LinuxWorkload::memory(Workload::busy(8, 100))
        };
        assert_eq!(
            w.cmdline(),
            "console=ttyS0 quiet wss=8 spin=100 report=500 disk=/dev/vda disk_kib_s=256 \
             disk_blocks=1024 port=7000 guest_ip=10.9.0.5/24"
        );
    }
}
