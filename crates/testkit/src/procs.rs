//! Processes by process group, read from `/proc`, for leak checks.

use std::path::Path;

/// The command name of a process (`/proc/PID/comm`).
pub fn comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_string())
}

pub use domain::qemu::process::alive;

/// Live processes whose process group is `pgid`.
pub fn in_group(pgid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| {
            let Ok(stat) =
                std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("stat"))
            else {
                return false;
            };
            // Fields after the command name: state ppid pgrp ...
            let Some((_, rest)) = stat.rsplit_once(')') else {
                return false;
            };
            let fields: Vec<&str> = rest.split_whitespace().collect();
            fields.len() > 2 && fields[0] != "Z" && fields[2].parse::<u32>().ok() == Some(pgid)
        })
        .collect()
}

/// True for a VM process: QEMU, or a simulated VM.
pub fn is_vm(pid: u32) -> bool {
    comm(pid).is_some_and(|c| c.starts_with("qemu-system") || c == "livemig-simvm")
}

/// True for a QEMU an agent started to probe its binary (`-machine none`,
/// its socket in a `livemig-probe-` scratch directory): not a guest.
pub fn is_probe(pid: u32) -> bool {
    cmdline_contains(pid, b"/livemig-probe-")
}

/// Process `pid`'s command line holds `needle`.
fn cmdline_contains(pid: u32, needle: &[u8]) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|cmdline| cmdline.windows(needle.len()).any(|w| w == needle))
}

/// VM processes (QEMU or simulated) in a process group.
pub fn qemus_in_group(pgid: u32) -> Vec<u32> {
    in_group(pgid)
        .into_iter()
        .filter(|&pid| is_vm(pid))
        .collect()
}

/// Live VM processes (QEMU or simulated) whose command line names a path
/// under `dir` (an agent's state directory: every VM it starts, and each
/// probe of its QEMU binary, has its QMP socket there).
pub fn qemus_naming(dir: &Path) -> Vec<u32> {
    let mut needle = dir.as_os_str().as_encoded_bytes().to_vec();
    needle.push(b'/');
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| is_vm(pid) && alive(pid) && cmdline_contains(pid, &needle))
        .collect()
}
