//! cgroup v1's `cpu` controller: single threads move by writing their id to
//! `tasks`, and one cgroup holds all of a QEMU's vCPU threads under
//! `cpu.cfs_quota_us` (a quota for all of them together).

use std::fs;
use std::path::{Path, PathBuf};

use super::{io_err, quota_for, HostThrottle, ThrottleError};

pub(super) fn attach(
    root: &Path,
    throttle: &mut HostThrottle,
    threads: &[u32],
) -> Result<(), ThrottleError> {
    fs::create_dir_all(&throttle.dir).map_err(io_err("create", &throttle.dir))?;
    let tasks = throttle.dir.join("tasks");
    for &tid in threads {
        let origin = origin_tasks(root, throttle.pid, tid);
        fs::write(&tasks, tid.to_string()).map_err(io_err("move a thread into", &tasks))?;
        throttle.threads.push((tid, origin));
    }
    Ok(())
}

pub(super) fn set(dir: &Path, vcpus: usize, throttle: f64) -> Result<(), ThrottleError> {
    let (period, quota) = quota_for(throttle, vcpus);
    let quota_path = dir.join("cpu.cfs_quota_us");
    let period_path = dir.join("cpu.cfs_period_us");
    // The quota must stay valid for the period at every step.
    fs::write(&quota_path, "-1").map_err(io_err("write", &quota_path))?;
    fs::write(&period_path, period.to_string()).map_err(io_err("write", &period_path))?;
    if let Some(quota) = quota {
        fs::write(&quota_path, quota.to_string()).map_err(io_err("write", &quota_path))?;
    }
    Ok(())
}

pub(super) fn release(root: &Path, dir: &Path, threads: impl Iterator<Item = (u32, PathBuf)>) {
    let _ = fs::write(dir.join("cpu.cfs_quota_us"), "-1");
    for (tid, origin) in threads {
        if fs::write(&origin, tid.to_string()).is_err() {
            let _ = fs::write(root.join("tasks"), tid.to_string());
        }
    }
    release_dir(root, dir);
}

/// The `tasks` file of the cgroup a thread is in now.
fn origin_tasks(root: &Path, pid: u32, tid: u32) -> PathBuf {
    let path = super::cgroup_of(pid, tid, false).unwrap_or_else(|| "/".into());
    root.join(path.trim_start_matches('/')).join("tasks")
}

pub(super) fn release_dir(root: &Path, dir: &Path) {
    let _ = fs::write(dir.join("cpu.cfs_quota_us"), "-1");
    if let Ok(tasks) = fs::read_to_string(dir.join("tasks")) {
        for tid in tasks.lines() {
            let _ = fs::write(root.join("tasks"), tid);
        }
    }
    let _ = fs::remove_dir(dir);
}
