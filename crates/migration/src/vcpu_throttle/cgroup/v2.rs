//! cgroup v2: a thread can only move inside a threaded subtree, so the
//! QEMU process moves into a cgroup of ours for the job (a threaded
//! domain), each vCPU thread into a threaded child `vcpuN` of it with its
//! own `cpu.max`, and the process goes back where it was at the end.
//!
//! The `cpu` controller has to be enabled in `cgroup.subtree_control` from
//! the root down to our cgroup; as root on the host (or in a delegated
//! subtree) the agent does that itself.

use std::fs;
use std::path::{Path, PathBuf};

use super::{children, io_err, quota_for, vcpu_dir, HostThrottle, ThrottleError, OURS};

fn write(path: &Path, what: &'static str, value: &str) -> Result<(), ThrottleError> {
    fs::write(path, value).map_err(io_err(what, path))
}

/// Makes `cpu` available to the children of `dir`.
fn enable_cpu(dir: &Path) -> Result<(), ThrottleError> {
    let control = dir.join("cgroup.subtree_control");
    let enabled = fs::read_to_string(&control)
        .map(|s| s.split_whitespace().any(|c| c == "cpu"))
        .unwrap_or(false);
    if enabled {
        return Ok(());
    }
    write(&control, "enable the cpu controller in", "+cpu")
}

/// The throttle's cgroup, empty: `cpu` enabled down the path to it.
pub(super) fn prepare(root: &Path, throttle: &HostThrottle) -> Result<(), ThrottleError> {
    let ours = root.join(OURS);
    fs::create_dir_all(&throttle.scope_dir).map_err(io_err("create", &throttle.scope_dir))?;
    for dir in [root, ours.as_path(), throttle.scope_dir.as_path()] {
        enable_cpu(dir)?;
    }
    fs::create_dir(&throttle.dir).map_err(io_err("create", &throttle.dir))
}

/// The process into the throttle's cgroup, each vCPU thread into its
/// threaded child.
pub(super) fn enter(
    root: &Path,
    throttle: &mut HostThrottle,
    threads: &[u32],
) -> Result<(), ThrottleError> {
    let origin = super::cgroup_of(throttle.pid, throttle.pid, true)
        .map(|path| root.join(path.trim_start_matches('/')).join("cgroup.procs"))
        .filter(|procs| procs.exists())
        .unwrap_or_else(|| root.join("cgroup.procs"));
    write(
        &throttle.dir.join("cgroup.procs"),
        "move the QEMU process into",
        &throttle.pid.to_string(),
    )?;
    throttle.origin = Some(origin);
    for index in 0..threads.len() {
        let vcpu = vcpu_dir(&throttle.dir, index);
        fs::create_dir(&vcpu).map_err(io_err("create", &vcpu))?;
        write(&vcpu.join("cgroup.type"), "make threaded", "threaded")?;
    }
    enable_cpu(&throttle.dir)?;
    for (index, &tid) in threads.iter().enumerate() {
        let vcpu = vcpu_dir(&throttle.dir, index);
        write(
            &vcpu.join("cgroup.threads"),
            "move a vCPU thread into",
            &tid.to_string(),
        )?;
        throttle.threads.push((tid, vcpu));
    }
    Ok(())
}

pub(super) fn set(dir: &Path, index: usize, throttle: f64) -> Result<(), ThrottleError> {
    let (period, quota) = quota_for(throttle, 1);
    let value = match quota {
        Some(quota) => format!("{quota} {period}"),
        None => format!("max {period}"),
    };
    write(
        &vcpu_dir(dir, index).join("cpu.max"),
        "write",
        value.as_str(),
    )
}

pub(super) fn release(root: &Path, dir: &Path, pid: u32, origin: Option<PathBuf>) {
    lift(dir);
    if let Some(origin) = origin {
        // Moving the process moves every thread of it, the vCPUs too.
        if fs::write(&origin, pid.to_string()).is_err() {
            let _ = fs::write(root.join("cgroup.procs"), pid.to_string());
        }
    }
    release_dir(root, dir);
}

/// Lifts every vCPU's quota under `dir`.
fn lift(dir: &Path) {
    for vcpu in children(dir) {
        let _ = fs::write(vcpu.join("cpu.max"), "max");
    }
}

pub(super) fn release_dir(root: &Path, dir: &Path) {
    lift(dir);
    if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
        for pid in procs.lines() {
            let _ = fs::write(root.join("cgroup.procs"), pid);
        }
    }
    for vcpu in children(dir) {
        let _ = fs::remove_dir(vcpu);
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

    /// A directory stands in for the unified hierarchy: the writes are
    /// what a cgroup v2 kernel would be asked for.
    #[test]
    fn a_v2_tree_gets_threaded_vcpu_cgroups_with_cpu_max() {
        let tree = tempfile::tempdir().unwrap();
        let root = tree.path();
        fs::write(
            root.join("cgroup.controllers"),
            "cpuset cpu io memory pids\n",
        )
        .unwrap();
        fs::write(root.join("cgroup.subtree_control"), "memory\n").unwrap();
        let hierarchy = Hierarchy::probe(root).unwrap();
        assert!(matches!(hierarchy, Hierarchy::V2(_)));

        let mut throttle =
            HostThrottle::attach(&hierarchy, "agent1", "vm-1234", 4321, &[11, 12]).unwrap();
        let dir = root.join("livemig/agent1/vm-1234");
        assert_eq!(throttle.dir(), dir);
        // Nothing moves before the first quota, none included: the
        // process keeps its place (and its share of the CPU) until then.
        assert!(dir.is_dir());
        throttle.set(0.0).unwrap();
        assert!(!dir.join("cgroup.procs").exists());
        assert!(!dir.join("vcpu0").exists());

        // Per vCPU: half a CPU each, then the long period above 99 %.
        throttle.set(0.5).unwrap();
        for enabled in [
            root,
            &root.join("livemig"),
            &root.join("livemig/agent1"),
            &dir,
        ] {
            assert_eq!(read(enabled.join("cgroup.subtree_control")), "+cpu");
        }
        assert_eq!(read(dir.join("cgroup.procs")), "4321");
        for (index, tid) in [(0, "11"), (1, "12")] {
            let vcpu = dir.join(format!("vcpu{index}"));
            assert_eq!(read(vcpu.join("cgroup.type")), "threaded");
            assert_eq!(read(vcpu.join("cgroup.threads")), tid);
        }
        assert_eq!(read(dir.join("vcpu0/cpu.max")), "50000 100000");
        assert_eq!(read(dir.join("vcpu1/cpu.max")), "50000 100000");
        throttle.set(0.998).unwrap();
        assert_eq!(read(dir.join("vcpu1/cpu.max")), "2000 1000000");
        throttle.set(0.0).unwrap();
        assert_eq!(read(dir.join("vcpu0/cpu.max")), "max 100000");
        throttle.set(0.9).unwrap();

        // The process goes back where it came from (here: the root), the
        // quota is lifted first.
        throttle.release();
        assert_eq!(read(root.join("cgroup.procs")), "4321");
        assert_eq!(read(dir.join("vcpu0/cpu.max")), "max");
    }

    #[test]
    fn what_a_crashed_agent_left_in_a_v2_tree_is_lifted() {
        let tree = tempfile::tempdir().unwrap();
        let root = tree.path();
        fs::write(root.join("cgroup.controllers"), "cpu\n").unwrap();
        let hierarchy = Hierarchy::probe(root).unwrap();
        let mut throttle = HostThrottle::attach(&hierarchy, "a", "vm", 77, &[78]).unwrap();
        throttle.set(0.99).unwrap();
        // The agent dies: no release.
        std::mem::forget(throttle);
        let mut other = HostThrottle::attach(&hierarchy, "b", "vm", 88, &[89]).unwrap();
        other.set(0.5).unwrap();

        assert_eq!(release_scope(&hierarchy, "a").unwrap(), 1);
        let dir = root.join("livemig/a/vm");
        assert_eq!(read(dir.join("vcpu0/cpu.max")), "max");
        assert_eq!(read(root.join("cgroup.procs")), "77");
        // Another agent's throttle is not touched.
        assert_eq!(read(other.dir().join("cgroup.procs")), "88");
        drop(other);
    }
}
