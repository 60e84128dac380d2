//! A QEMU process's locked-memory limit (`RLIMIT_MEMLOCK`), raised for a
//! zero-copy migration: the kernel counts the pages of every
//! `MSG_ZEROCOPY` send as locked until it is done with them, and a QEMU
//! over its limit fails the migration. libvirt raises it the same way
//! (`prlimit` on the running process).

/// A process's locked-memory limit, bytes (`u64::MAX`: none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemlockLimit {
    /// The soft limit, the one enforced.
    pub soft: u64,
    /// The ceiling the soft limit may be raised to without privilege.
    pub hard: u64,
}

/// Why the limit could not be read or set.
#[derive(Debug, thiserror::Error)]
#[error("prlimit(RLIMIT_MEMLOCK) on process {pid}")]
pub struct MemlockError {
    /// The process.
    pub pid: u32,
    /// What the kernel said.
    #[source]
    pub source: std::io::Error,
}

// The one system call livemig makes itself: std has no prlimit, and nix
// only sets its own process's limits.
#[allow(unsafe_code)]
fn prlimit(pid: u32, new: Option<MemlockLimit>) -> Result<MemlockLimit, MemlockError> {
    // rlim_t is u64 on Linux, and RLIM_INFINITY is u64::MAX: "none".
    let new = new.map(|l| libc::rlimit {
        rlim_cur: l.soft,
        rlim_max: l.hard,
    });
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    let new_ptr = new
        .as_ref()
        .map_or(std::ptr::null(), |n| n as *const libc::rlimit);
    // SAFETY: `new_ptr` is null or points at a live rlimit, `old` is a
    // live rlimit the call writes; prlimit keeps neither pointer.
    let rc = unsafe { libc::prlimit(pid as libc::pid_t, libc::RLIMIT_MEMLOCK, new_ptr, &mut old) };
    if rc != 0 {
        return Err(MemlockError {
            pid,
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(MemlockLimit {
        soft: old.rlim_cur,
        hard: old.rlim_max,
    })
}

/// Whether process `pid` may lock memory beyond its limit: it holds
/// `CAP_IPC_LOCK` (a QEMU that runs as root without dropping it), which
/// the kernel's accounting of zero-copy sends does not charge.
pub fn exempt(pid: u32) -> bool {
    const CAP_IPC_LOCK: u32 = 14;
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
            u64::from_str_radix(hex.trim(), 16).ok()
        })
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

/// Process `pid`'s limit.
///
/// # Errors
/// [`MemlockError`] from the kernel (no such process, not permitted).
pub fn get(pid: u32) -> Result<MemlockLimit, MemlockError> {
    prlimit(pid, None)
}

/// Raises process `pid`'s limit to at least `bytes` (both soft and hard,
/// never lowering either); the limit it had, to put back.
///
/// # Errors
/// [`MemlockError`]: raising the hard limit needs `CAP_SYS_RESOURCE`.
pub fn raise(pid: u32, bytes: u64) -> Result<MemlockLimit, MemlockError> {
    let before = get(pid)?;
    if before.soft >= bytes {
        return Ok(before);
    }
    let wanted = MemlockLimit {
        soft: bytes,
        hard: before.hard.max(bytes),
    };
    prlimit(pid, Some(wanted))?;
    Ok(before)
}

/// Puts process `pid`'s limit back to `limit`.
///
/// # Errors
/// [`MemlockError`] from the kernel.
pub fn set(pid: u32, limit: MemlockLimit) -> Result<(), MemlockError> {
    prlimit(pid, Some(limit)).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_s_limit_is_raised_and_put_back() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        let before = get(pid).unwrap();
        let wanted = before.soft.saturating_add(64 << 20).min(u64::MAX - 1);
        match raise(pid, wanted) {
            Ok(was) => {
                assert_eq!(was, before);
                assert!(get(pid).unwrap().soft >= wanted);
                set(pid, before).unwrap();
                assert_eq!(get(pid).unwrap(), before);
            }
            // Without CAP_SYS_RESOURCE the hard limit cannot rise: the
            // error says which process and why.
            Err(e) => assert!(e.to_string().contains(&pid.to_string()), "{e}"),
        }
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
