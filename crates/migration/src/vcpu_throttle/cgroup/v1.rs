//! cgroup v1's `cpu` controller: single threads move by writing their id to
//! `tasks`. Each vCPU thread gets a cgroup of its own, `NAME/vcpuN`, with
//! its own `cpu.cfs_quota_us`, as on v2. One quota for all the vCPUs
//! together (the first layout) let a busy vCPU use what the idle ones left:
//! the single writer of a 4-vCPU guest ran at full speed under any throttle
//! below 75 %.

use std::fs;
use std::path::{Path, PathBuf};

use super::{children, io_err, quota_for, vcpu_dir, HostThrottle, ThrottleError};

/// The throttle's cgroup and one per vCPU under it, empty.
pub(super) fn prepare(throttle: &HostThrottle, vcpus: usize) -> Result<(), ThrottleError> {
    fs::create_dir_all(&throttle.dir).map_err(io_err("create", &throttle.dir))?;
    for index in 0..vcpus {
        let vcpu = vcpu_dir(&throttle.dir, index);
        fs::create_dir_all(&vcpu).map_err(io_err("create", &vcpu))?;
    }
    Ok(())
}

/// Each vCPU thread into its cgroup.
pub(super) fn enter(
    root: &Path,
    throttle: &mut HostThrottle,
    threads: &[u32],
) -> Result<(), ThrottleError> {
    for (index, &tid) in threads.iter().enumerate() {
        let vcpu = vcpu_dir(&throttle.dir, index);
        let origin = origin_tasks(root, throttle.pid, tid);
        let tasks = vcpu.join("tasks");
        fs::write(&tasks, tid.to_string()).map_err(io_err("move a thread into", &tasks))?;
        throttle.threads.push((tid, origin));
    }
    Ok(())
}

pub(super) fn set(dir: &Path, index: usize, throttle: f64) -> Result<(), ThrottleError> {
    let (period, quota) = quota_for(throttle, 1);
    let vcpu = vcpu_dir(dir, index);
    let quota_path = vcpu.join("cpu.cfs_quota_us");
    let period_path = vcpu.join("cpu.cfs_period_us");
    // The quota must stay valid for the period at every step.
    fs::write(&quota_path, "-1").map_err(io_err("write", &quota_path))?;
    fs::write(&period_path, period.to_string()).map_err(io_err("write", &period_path))?;
    if let Some(quota) = quota {
        fs::write(&quota_path, quota.to_string()).map_err(io_err("write", &quota_path))?;
    }
    Ok(())
}

pub(super) fn release(root: &Path, dir: &Path, threads: impl Iterator<Item = (u32, PathBuf)>) {
    lift(dir);
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

/// Lifts the quota of `dir` and of every cgroup under it.
fn lift(dir: &Path) {
    let _ = fs::write(dir.join("cpu.cfs_quota_us"), "-1");
    for child in children(dir) {
        lift(&child);
    }
}

/// Lifts, empties (threads to the root) and removes `dir` and its vCPU
/// cgroups; a throttle of the first layout (threads in `dir` itself) too.
pub(super) fn release_dir(root: &Path, dir: &Path) {
    lift(dir);
    for child in children(dir) {
        release_dir(root, &child);
    }
    if let Ok(tasks) = fs::read_to_string(dir.join("tasks")) {
        for tid in tasks.lines() {
            let _ = fs::write(root.join("tasks"), tid);
        }
    }
    let _ = fs::remove_dir(dir);
}

#[cfg(test)]
mod tests {
    use super::super::{release_scope, Hierarchy};
    use super::*;

    fn read(path: PathBuf) -> String {
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// A directory stands in for the v1 `cpu` controller.
    #[test]
    fn each_vcpu_gets_a_cgroup_and_a_quota_of_its_own() {
        let tree = tempfile::tempdir().unwrap();
        let root = tree.path();
        fs::write(root.join("tasks"), "").unwrap();
        let hierarchy = Hierarchy::probe(root).unwrap();
        assert!(matches!(hierarchy, Hierarchy::V1(_)));

        let mut throttle =
            HostThrottle::attach(&hierarchy, "agent1", "vm-1234", 4321, &[11, 12]).unwrap();
        let dir = root.join("livemig/agent1/vm-1234");
        // The cgroups are there, empty until the first quota: a vCPU in a
        // cgroup of its own competes for the CPU on other terms.
        assert!(dir.join("vcpu1").is_dir());
        throttle.set(0.0).unwrap();
        assert!(!dir.join("vcpu0/tasks").exists());

        // Half a CPU for each vCPU, not one CPU for the two together.
        throttle.set(0.5).unwrap();
        assert_eq!(read(dir.join("vcpu0/tasks")), "11");
        assert_eq!(read(dir.join("vcpu1/tasks")), "12");
        for vcpu in ["vcpu0", "vcpu1"] {
            assert_eq!(read(dir.join(vcpu).join("cpu.cfs_quota_us")), "50000");
            assert_eq!(read(dir.join(vcpu).join("cpu.cfs_period_us")), "100000");
        }
        throttle.set(0.998).unwrap();
        assert_eq!(read(dir.join("vcpu1/cpu.cfs_quota_us")), "2000");
        assert_eq!(read(dir.join("vcpu1/cpu.cfs_period_us")), "1000000");

        throttle.release();
        // Back where they came from (the root here), quotas lifted first.
        assert_eq!(read(root.join("tasks")), "12");
        assert_eq!(read(dir.join("vcpu0/cpu.cfs_quota_us")), "-1");
    }

    #[test]
    fn only_the_selected_vcpus_are_throttled_and_a_probe_yields_to_the_throttle() {
        let tree = tempfile::tempdir().unwrap();
        let root = tree.path();
        fs::write(root.join("tasks"), "").unwrap();
        let hierarchy = Hierarchy::probe(root).unwrap();
        let mut throttle =
            HostThrottle::attach(&hierarchy, "a", "vm-1", 4321, &[11, 12, 13]).unwrap();
        let dir = root.join("livemig/a/vm-1");
        let quota = |vcpu: &str| read(dir.join(vcpu).join("cpu.cfs_quota_us"));

        // A probe throttles one vCPU alone.
        assert!(throttle.probe(2, 0.99).unwrap());
        assert_eq!(quota("vcpu2"), "1000");
        assert!(throttle.end_probe(2).unwrap());
        assert_eq!(quota("vcpu2"), "-1");
        // Lifting every quota (the switchover) ends a probe too.
        assert!(throttle.probe(2, 0.99).unwrap());
        throttle.set(0.0).unwrap();
        assert_eq!(quota("vcpu2"), "-1");
        assert!(!throttle.end_probe(2).unwrap());

        // A real throttle overrules a probe, which then reports so.
        assert!(throttle.probe(0, 0.99).unwrap());
        throttle.set(0.5).unwrap();
        assert!(!throttle.end_probe(0).unwrap());
        assert_eq!(quota("vcpu0"), "50000");
        // No probing under a throttle.
        assert!(!throttle.probe(1, 0.99).unwrap());

        // Narrowed to the writer, the throttle in force follows.
        assert!(throttle.select(&[1]).unwrap());
        assert_eq!(throttle.selected(), [1]);
        assert_eq!(quota("vcpu0"), "-1");
        assert_eq!(quota("vcpu1"), "50000");
        assert_eq!(quota("vcpu2"), "-1");
        throttle.set(0.9).unwrap();
        assert_eq!(quota("vcpu1"), "10000");
        assert_eq!(quota("vcpu0"), "-1");
        // Nobody selected would throttle nothing: refused.
        assert!(!throttle.select(&[7]).unwrap());
        assert_eq!(throttle.selected(), [1]);
        throttle.release();
    }

    #[test]
    fn a_throttle_of_the_first_layout_is_lifted_too() {
        let tree = tempfile::tempdir().unwrap();
        let root = tree.path();
        fs::write(root.join("tasks"), "").unwrap();
        let hierarchy = Hierarchy::probe(root).unwrap();
        // All threads in the throttle's own cgroup, one quota.
        let old = root.join("livemig/a/vm-old");
        fs::create_dir_all(&old).unwrap();
        fs::write(old.join("tasks"), "31").unwrap();
        fs::write(old.join("cpu.cfs_quota_us"), "1000").unwrap();

        assert_eq!(release_scope(&hierarchy, "a").unwrap(), 1);
        assert_eq!(read(old.join("cpu.cfs_quota_us")), "-1");
        assert_eq!(read(root.join("tasks")), "31");
    }
}
