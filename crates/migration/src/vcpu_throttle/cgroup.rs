//! Throttling a QEMU's vCPU threads from the host.
//!
//! QEMU's own throttle stops at 99 % and never comes down during a job. The
//! host can do both: the vCPU threads (their ids come from
//! `query-cpus-fast`) are moved into a cgroup of their own whose CPU quota
//! is `(1 − throttle)` of a CPU per vCPU. Only the vCPU threads are
//! throttled; QEMU's migration thread keeps sending at full speed.
//!
//! This uses the cgroup v1 `cpu` controller, where single threads can be
//! moved by writing their id to `tasks`. On hosts without it (cgroup v2
//! only, or no write access) [`HostThrottle::available`] says so and callers
//! fall back to QEMU's throttle.
//!
//! A throttle must never outlive its migration: [`HostThrottle::release`]
//! puts every thread back where it was, and [`release_stale`] clears what a
//! crashed agent left behind.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// Where the cgroup v1 `cpu` controller is mounted on most distributions.
pub const CPU_V1_ROOT: &str = "/sys/fs/cgroup/cpu";
/// Our subdirectory under the controller.
const OURS: &str = "livemig";
/// Quota period when at least 1 % of a CPU is left: a throttled vCPU runs
/// again within 100 ms.
const PERIOD_US: u64 = 100_000;
/// Longest period, for the highest throttles (the quota stays ≥ 1 ms).
const LONG_PERIOD_US: u64 = 1_000_000;
const MIN_QUOTA_US: u64 = 1_000;
/// Above this throttle the period grows beyond 100 ms.
pub const LONG_PERIOD_ABOVE: f64 = 0.99;

/// Why the host cannot throttle.
#[derive(Debug, thiserror::Error)]
pub enum ThrottleError {
    /// No cgroup v1 `cpu` controller we may write to.
    #[error("no writable cgroup v1 cpu controller at {0}")]
    Unavailable(PathBuf),
    /// A cgroup file could not be written.
    #[error("cannot {what} {path}")]
    Io {
        /// What we tried.
        what: &'static str,
        /// On which file.
        path: PathBuf,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// A cgroup name that could escape its directory.
    #[error("throttle name {0:?} is not a plain name")]
    BadName(String),
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ThrottleError {
    let path = path.to_path_buf();
    move |source| ThrottleError::Io { what, path, source }
}

/// The highest throttle the host mechanism can apply.
pub const MAX_HOST_THROTTLE: f64 = 1.0 - MIN_QUOTA_US as f64 / LONG_PERIOD_US as f64;

/// `(period, quota)` in microseconds for a throttle on `vcpus` threads;
/// quota `None` means unlimited.
pub fn quota_for(throttle: f64, vcpus: usize) -> (u64, Option<u64>) {
    let throttle = throttle.clamp(0.0, MAX_HOST_THROTTLE);
    if throttle <= 0.0 {
        return (PERIOD_US, None);
    }
    let period = if throttle <= LONG_PERIOD_ABOVE {
        PERIOD_US
    } else {
        LONG_PERIOD_US
    };
    let share = ((1.0 - throttle) * period as f64).round() as u64;
    let quota = (share * vcpus.max(1) as u64).max(MIN_QUOTA_US);
    (period, Some(quota))
}

/// vCPU threads of one QEMU, moved into a cgroup with a CPU quota.
#[derive(Debug)]
pub struct HostThrottle {
    dir: PathBuf,
    controller: PathBuf,
    /// Each thread and the cgroup tasks file it came from.
    threads: Vec<(u32, PathBuf)>,
    current: f64,
}

impl HostThrottle {
    /// True if this host lets us throttle single threads.
    pub fn available(controller: &Path) -> bool {
        controller.join("tasks").exists() && fs::create_dir_all(controller.join(OURS)).is_ok()
    }

    /// Moves `threads` of process `pid` into `CONTROLLER/livemig/NAME`,
    /// unthrottled so far.
    ///
    /// # Errors
    /// [`ThrottleError`] if the controller is missing or a write fails; in
    /// that case every thread already moved is moved back.
    pub fn attach(
        controller: &Path,
        name: &str,
        pid: u32,
        threads: &[u32],
    ) -> Result<HostThrottle, ThrottleError> {
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            || name.starts_with('.')
        {
            return Err(ThrottleError::BadName(name.to_string()));
        }
        if !Self::available(controller) {
            return Err(ThrottleError::Unavailable(controller.to_path_buf()));
        }
        let dir = controller.join(OURS).join(name);
        if dir.exists() {
            release_dir(controller, &dir);
        }
        fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
        let mut throttle = HostThrottle {
            dir,
            controller: controller.to_path_buf(),
            threads: Vec::new(),
            current: 0.0,
        };
        for &tid in threads {
            let origin = origin_tasks(controller, pid, tid);
            let tasks = throttle.dir.join("tasks");
            if let Err(e) =
                fs::write(&tasks, tid.to_string()).map_err(io_err("move a thread into", &tasks))
            {
                throttle.release_inner();
                return Err(e);
            }
            throttle.threads.push((tid, origin));
        }
        Ok(throttle)
    }

    /// Sets the throttle (0 = none, up to [`MAX_HOST_THROTTLE`]).
    ///
    /// # Errors
    /// [`ThrottleError::Io`] if the quota cannot be written.
    pub fn set(&mut self, throttle: f64) -> Result<(), ThrottleError> {
        let (period, quota) = quota_for(throttle, self.threads.len());
        let quota_path = self.dir.join("cpu.cfs_quota_us");
        let period_path = self.dir.join("cpu.cfs_period_us");
        // The quota must stay valid for the period at every step.
        fs::write(&quota_path, "-1").map_err(io_err("write", &quota_path))?;
        fs::write(&period_path, period.to_string()).map_err(io_err("write", &period_path))?;
        if let Some(quota) = quota {
            fs::write(&quota_path, quota.to_string()).map_err(io_err("write", &quota_path))?;
        }
        self.current = throttle.clamp(0.0, MAX_HOST_THROTTLE);
        Ok(())
    }

    /// The throttle in force.
    pub fn current(&self) -> f64 {
        self.current
    }

    /// Lifts the quota, moves every thread back, removes the cgroup.
    pub fn release(mut self) {
        self.release_inner();
    }

    fn release_inner(&mut self) {
        let _ = fs::write(self.dir.join("cpu.cfs_quota_us"), "-1");
        for (tid, origin) in self.threads.drain(..) {
            if fs::write(&origin, tid.to_string()).is_err() {
                let _ = fs::write(self.controller.join("tasks"), tid.to_string());
            }
        }
        release_dir(&self.controller, &self.dir);
        // Gone once the last throttle is; fails harmlessly while others run.
        let _ = fs::remove_dir(self.controller.join(OURS));
        self.current = 0.0;
    }
}

impl Drop for HostThrottle {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.release_inner();
        }
    }
}

/// The cgroup of the v1 `cpu` controller thread `tid` of process `pid` is
/// in now ("/" or "/livemig/NAME"), if it is in one.
pub fn cpu_cgroup_of(pid: u32, tid: u32) -> Option<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/task/{tid}/cgroup")).ok()?;
    text.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        controllers
            .split(',')
            .any(|c| c == "cpu")
            .then(|| path.to_string())
    })
}

/// The `tasks` file of the cgroup a thread is in now.
fn origin_tasks(controller: &Path, pid: u32, tid: u32) -> PathBuf {
    let path = cpu_cgroup_of(pid, tid).unwrap_or_else(|| "/".into());
    controller.join(path.trim_start_matches('/')).join("tasks")
}

/// Empties and removes one of our cgroups, whatever is in it.
fn release_dir(controller: &Path, dir: &Path) {
    let _ = fs::write(dir.join("cpu.cfs_quota_us"), "-1");
    if let Ok(tasks) = fs::read_to_string(dir.join("tasks")) {
        for tid in tasks.lines() {
            let _ = fs::write(controller.join("tasks"), tid);
        }
    }
    let _ = fs::remove_dir(dir);
}

/// Removes throttles a crashed agent left behind, so no guest stays slowed.
/// Returns how many were cleared.
pub fn release_stale(controller: &Path) -> usize {
    let Ok(entries) = fs::read_dir(controller.join(OURS)) else {
        return 0;
    };
    let mut cleared = 0;
    for entry in entries.flatten() {
        if entry.path().is_dir() {
            release_dir(controller, &entry.path());
            cleared += 1;
        }
    }
    cleared
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_matches_the_throttle() {
        assert_eq!(quota_for(0.0, 1), (100_000, None));
        assert_eq!(quota_for(0.5, 1), (100_000, Some(50_000)));
        assert_eq!(quota_for(0.5, 2), (100_000, Some(100_000)));
        assert_eq!(quota_for(0.99, 1), (100_000, Some(1_000)));
        assert_eq!(quota_for(0.995, 1), (1_000_000, Some(5_000)));
        assert_eq!(quota_for(0.999, 1), (1_000_000, Some(1_000)));
        // Beyond what the quota can express, the mechanism's maximum.
        assert_eq!(quota_for(1.0, 1), (1_000_000, Some(1_000)));
    }

    #[test]
    fn names_that_could_escape_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["", "../x", "a/b", ".."] {
            assert!(matches!(
                HostThrottle::attach(dir.path(), name, 1, &[]),
                Err(ThrottleError::BadName(_))
            ));
        }
    }

    #[test]
    fn a_missing_controller_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!HostThrottle::available(dir.path()));
        assert!(matches!(
            HostThrottle::attach(dir.path(), "x", 1, &[]),
            Err(ThrottleError::Unavailable(_))
        ));
    }
}
