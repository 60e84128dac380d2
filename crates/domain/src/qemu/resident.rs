//! How much of a guest's RAM holds anything: what a migration's first pass
//! really sends.
//!
//! QEMU sends a page that reads as zero as a few bytes of header, so a
//! guest that has touched half its RAM costs half a first pass, not a
//! whole one (measured: `estimate` predicted a guest writing 256 MiB of its
//! 512 MiB about twice as slow as it migrated). Guest RAM is an anonymous
//! mapping in the QEMU process; a page the guest never wrote was never
//! faulted in, so the mapping's resident size bounds the pages worth
//! sending. It is an upper bound: a page written and later zeroed again by
//! the guest stays resident, and with transparent huge pages one write
//! makes 2 MiB resident.

use std::path::PathBuf;

/// How far a mapping may exceed the RAM size and still be taken for it
/// (QEMU rounds the block to its alignment).
const SLACK_BYTES: u64 = 4 << 20;

/// Why the resident size could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ResidentError {
    /// `/proc/PID/smaps` could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The simulated VM did not answer its RAM query.
    #[error("cannot ask the VM (pid {pid}) for the {ram_bytes} bytes of its RAM in use: {reason}")]
    Query {
        /// The VM's pid.
        pid: u32,
        /// Its RAM size.
        ram_bytes: u64,
        /// Why.
        reason: String,
    },
    /// No mapping there has the size of the guest's RAM.
    #[error("no mapping of {ram_bytes} bytes (the guest's RAM) in {path}")]
    NotFound {
        /// The file.
        path: PathBuf,
        /// The RAM size looked for.
        ram_bytes: u64,
    },
}

/// Bytes of guest RAM that QEMU process `pid` holds resident, for a guest
/// of `ram_bytes`.
///
/// # Errors
/// [`ResidentError`] when the process's mappings cannot be read or none
/// of them is the guest's RAM.
pub async fn guest_ram_resident(pid: u32, ram_bytes: u64) -> Result<u64, ResidentError> {
    let path = PathBuf::from(format!("/proc/{pid}/smaps"));
    let smaps = tokio::fs::read_to_string(&path)
        .await
        .map_err(|source| ResidentError::Read {
            path: path.clone(),
            source,
        })?;
    resident_of_ram(&smaps, ram_bytes).ok_or(ResidentError::NotFound { path, ram_bytes })
}

/// One mapping of `smaps`.
#[derive(Debug, Default)]
struct Mapping {
    size: u64,
    rss: u64,
    /// Read-write, private, no file: how QEMU maps guest RAM (TCG's code
    /// buffer, also anonymous and as large, is executable).
    anonymous_rw: bool,
}

/// The resident bytes of the mapping that is the guest's RAM in `smaps`:
/// the anonymous read-write one closest above `ram_bytes` in size.
pub fn resident_of_ram(smaps: &str, ram_bytes: u64) -> Option<u64> {
    mappings(smaps)
        .filter(|m| m.anonymous_rw)
        .filter(|m| m.size >= ram_bytes && m.size - ram_bytes <= SLACK_BYTES)
        .min_by_key(|m| m.size - ram_bytes)
        .map(|m| m.rss.min(m.size))
}

fn mappings(smaps: &str) -> impl Iterator<Item = Mapping> + '_ {
    let mut current: Option<Mapping> = None;
    let mut lines = smaps.lines();
    std::iter::from_fn(move || loop {
        let Some(line) = lines.next() else {
            return current.take();
        };
        if let Some(header) = header(line) {
            if let Some(done) = current.replace(header) {
                return Some(done);
            }
        } else if let (Some(m), Some(kib)) = (current.as_mut(), field_kib(line, "Rss:")) {
            m.rss = kib * 1024;
        }
    })
}

/// `start-end perms offset dev inode [path]`; `None` for a field line.
fn header(line: &str) -> Option<Mapping> {
    let mut fields = line.split_whitespace();
    let (start, end) = fields.next()?.split_once('-')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    let perms = fields.next()?;
    let (_offset, _dev, _inode) = (fields.next()?, fields.next()?, fields.next()?);
    let path = fields.next();
    Some(Mapping {
        size: end.checked_sub(start)?,
        rss: 0,
        anonymous_rw: perms == "rw-p" && path.is_none(),
    })
}

fn field_kib(line: &str, key: &str) -> Option<u64> {
    line.strip_prefix(key)?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// Shaped like a TCG guest's QEMU 7.2: a 1 GiB executable code
    /// buffer, 512 MiB of RAM (off the 64-page grid) of which 260 MiB is
    /// resident, a smaller anonymous block and a file mapping.
    const SMAPS: &str = "\
55d0c0000000-55d0c0200000 r-xp 00000000 08:01 1234 /usr/bin/qemu-system-x86_64
Size:               2048 kB
Rss:                1900 kB
7f0000000000-7f0040000000 rwxp 00000000 00:00 0
Size:            1048576 kB
Rss:              120000 kB
7f1000000000-7f101fffe000 rw-p 00000000 00:00 0
Size:             524280 kB
KernelPageSize:        4 kB
Rss:              266240 kB
AnonHugePages:    264192 kB
7f2000000000-7f2001000000 rw-p 00000000 00:00 0
Size:              16384 kB
Rss:               16384 kB
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
Size:                132 kB
Rss:                  12 kB
";

    #[test]
    fn the_ram_mapping_is_found_by_size_and_its_resident_part_read() {
        let ram = 512 * MIB - 8192;
        assert_eq!(resident_of_ram(SMAPS, ram), Some(266_240 * 1024));
    }

    #[test]
    fn the_executable_code_buffer_of_the_same_size_is_not_ram() {
        assert_eq!(resident_of_ram(SMAPS, 1024 * MIB), None);
    }

    #[test]
    fn no_mapping_of_that_size_is_none() {
        assert_eq!(resident_of_ram(SMAPS, 256 * MIB), None);
        assert_eq!(resident_of_ram("", 256 * MIB), None);
    }

    #[tokio::test]
    async fn a_process_without_such_a_mapping_is_an_error() {
        let err = guest_ram_resident(std::process::id(), 1 << 50)
            .await
            .unwrap_err();
        assert!(matches!(err, ResidentError::NotFound { .. }), "{err}");
    }
}
