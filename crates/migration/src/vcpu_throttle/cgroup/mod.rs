//! Throttling a QEMU's vCPU threads from the host.
//!
//! QEMU's own throttle stops at 99 % and never comes down during a job. The
//! host can do both: the vCPU threads (their ids come from
//! `query-cpus-fast`) get a CPU quota of `(1 − throttle)` of a CPU each.
//! Only the vCPU threads are throttled; QEMU's migration thread keeps
//! sending at full speed.
//!
//! Two hierarchies, as the host offers ([`Hierarchy::probe`]):
//! - cgroup v1's `cpu` controller ([`v1`]): single threads move by writing
//!   their id to `tasks`; each vCPU gets a cgroup `vcpuN` and a quota of
//!   its own.
//! - cgroup v2 ([`v2`], Debian 12, Ubuntu 22.04+, RHEL 9): threads move
//!   only inside a threaded subtree, so the QEMU process moves into a cgroup
//!   of ours, with one threaded child per vCPU (`vcpu0`, ..., as libvirt
//!   lays them out) and `cpu.max` on each.
//!
//! The cgroups are made when the job starts; the threads enter them with
//! the first quota ([`HostThrottle::set`]).
//!
//! Every throttle lives under `ROOT/livemig/SCOPE/NAME`, where the scope
//! names one agent (its state directory), so that an agent clearing what a
//! crashed predecessor left never touches another agent's throttles.
//!
//! A throttle must never outlive its migration: [`HostThrottle::release`]
//! puts every thread back where it was, [`release_scope`] clears what a
//! crashed agent left behind, and the lease ([`super::lease`]) lifts it when
//! the agent is gone or stuck.

pub mod v1;
pub mod v2;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// Where the cgroup v1 `cpu` controller is mounted on most distributions.
pub const CPU_V1_ROOT: &str = "/sys/fs/cgroup/cpu";
/// Where the unified (v2) hierarchy is mounted on cgroup v2 hosts.
pub const UNIFIED_ROOT: &str = "/sys/fs/cgroup";
/// Our subdirectory under the hierarchy's root.
const OURS: &str = "livemig";
/// Quota period when at least 1 % of a CPU is left: a throttled vCPU runs
/// again within 100 ms.
const PERIOD_US: u64 = 100_000;
/// Longest period, for the highest throttles (the quota stays ≥ 1 ms).
const LONG_PERIOD_US: u64 = 1_000_000;
const MIN_QUOTA_US: u64 = 1_000;
/// The least CPU time a throttled vCPU gets in a period it runs in at all:
/// the smallest quota the kernel takes. (It enforces quotas at its tick,
/// so a vCPU often overruns it: 1.5 ms measured at a 1 ms quota.)
pub const MIN_SLICE: std::time::Duration = std::time::Duration::from_micros(MIN_QUOTA_US);
/// Above this throttle the period grows beyond 100 ms.
pub const LONG_PERIOD_ABOVE: f64 = 0.99;

/// Why the host cannot throttle.
#[derive(Debug, thiserror::Error)]
pub enum ThrottleError {
    /// No cgroup hierarchy with a `cpu` controller we may write to.
    #[error("no host vCPU throttle at {root}: {why}")]
    Unavailable {
        /// Where we looked.
        root: PathBuf,
        /// What is missing.
        why: String,
    },
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

/// `DIR/vcpuN`: the cgroup of a throttle's N-th vCPU thread (both
/// hierarchies, as libvirt lays them out).
fn vcpu_dir(dir: &Path, index: usize) -> PathBuf {
    dir.join(format!("vcpu{index}"))
}

/// The cgroups directly under `dir` (a throttle's vCPUs).
fn children(dir: &Path) -> Vec<PathBuf> {
    fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default()
}

/// A cgroup hierarchy with a `cpu` controller, as probed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hierarchy {
    /// cgroup v1's `cpu` controller, mounted here.
    V1(PathBuf),
    /// The unified hierarchy, mounted here, offering `cpu`.
    V2(PathBuf),
}

impl Hierarchy {
    /// Where to look by default: the unified root on a cgroup v2 host, the
    /// v1 `cpu` controller elsewhere.
    pub fn default_root() -> PathBuf {
        if Path::new(UNIFIED_ROOT).join("cgroup.controllers").exists() {
            PathBuf::from(UNIFIED_ROOT)
        } else {
            PathBuf::from(CPU_V1_ROOT)
        }
    }

    /// Which hierarchy `root` is, if the host lets us throttle threads
    /// there.
    ///
    /// # Errors
    /// [`ThrottleError::Unavailable`] saying what is missing.
    pub fn probe(root: &Path) -> Result<Hierarchy, ThrottleError> {
        let unavailable = |why: String| ThrottleError::Unavailable {
            root: root.to_path_buf(),
            why,
        };
        let hierarchy = if let Ok(controllers) = fs::read_to_string(root.join("cgroup.controllers"))
        {
            if !controllers.split_whitespace().any(|c| c == "cpu") {
                return Err(unavailable(format!(
                    "this cgroup v2 hierarchy does not offer the cpu controller (it offers \
                     {:?}; a v1 hierarchy may hold it)",
                    controllers.trim()
                )));
            }
            Hierarchy::V2(root.to_path_buf())
        } else if root.join("tasks").exists() {
            Hierarchy::V1(root.to_path_buf())
        } else {
            return Err(unavailable(
                "neither a cgroup v2 root (cgroup.controllers) nor a v1 cpu controller (tasks)"
                    .into(),
            ));
        };
        fs::create_dir_all(root.join(OURS))
            .map_err(|e| unavailable(format!("cannot create {OURS}/ there: {e}")))?;
        Ok(hierarchy)
    }

    /// The hierarchy's mount point.
    pub fn root(&self) -> &Path {
        match self {
            Hierarchy::V1(root) | Hierarchy::V2(root) => root,
        }
    }

    /// "cgroup v1" or "cgroup v2", for people.
    pub fn describe(&self) -> &'static str {
        match self {
            Hierarchy::V1(_) => "cgroup v1 cpu controller",
            Hierarchy::V2(_) => "cgroup v2 cpu.max",
        }
    }

    /// `ROOT/livemig/SCOPE`: one agent's throttles.
    fn scope_dir(&self, scope: &str) -> Result<PathBuf, ThrottleError> {
        check_name(scope)?;
        Ok(self.root().join(OURS).join(scope))
    }

    /// Removes the scope's directory and ours once they are empty.
    fn tidy(&self, scope_dir: &Path) {
        // Both fail harmlessly while other throttles live there.
        let _ = fs::remove_dir(scope_dir);
        let _ = fs::remove_dir(self.root().join(OURS));
    }
}

/// Refuses names that could leave their directory.
fn check_name(name: &str) -> Result<(), ThrottleError> {
    let plain = !name.is_empty()
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    if plain {
        Ok(())
    } else {
        Err(ThrottleError::BadName(name.to_string()))
    }
}

/// The vCPU threads of one QEMU under a CPU quota.
#[derive(Debug)]
pub struct HostThrottle {
    hierarchy: Hierarchy,
    scope_dir: PathBuf,
    dir: PathBuf,
    pid: u32,
    /// The vCPU threads, by index.
    vcpus: Vec<u32>,
    /// They (and on v2 the process) are in the throttle's cgroups: not
    /// until the first quota, because a cgroup of their own competes for
    /// the CPU beside everything else on the host, and an unthrottled
    /// vCPU moved there early runs faster than it did (on a crowded host a
    /// whole core where it had a fifth), so the guest dirties more than
    /// was measured while its migration thread, left behind, gets less.
    entered: bool,
    /// Each thread moved and the cgroup it came from (v1: its `tasks`
    /// file).
    threads: Vec<(u32, PathBuf)>,
    /// v2: the cgroup the process came from (`cgroup.procs`).
    origin: Option<PathBuf>,
    current: f64,
    /// Which vCPUs the throttle applies to (by index); all at first.
    selected: Vec<bool>,
    /// A vCPU under a probe's throttle, while nothing else is throttled.
    probing: Option<usize>,
    released: bool,
}

impl HostThrottle {
    /// Prepares `ROOT/livemig/SCOPE/NAME` for `threads` of process `pid`,
    /// unthrottled so far: they move there with the first quota.
    ///
    /// # Errors
    /// [`ThrottleError`] if a name is not plain or a write fails; in that
    /// case what was created is removed.
    pub fn attach(
        hierarchy: &Hierarchy,
        scope: &str,
        name: &str,
        pid: u32,
        threads: &[u32],
    ) -> Result<HostThrottle, ThrottleError> {
        check_name(name)?;
        let scope_dir = hierarchy.scope_dir(scope)?;
        let dir = scope_dir.join(name);
        if dir.exists() {
            release_dir(hierarchy, &dir);
        }
        let mut throttle = HostThrottle {
            hierarchy: hierarchy.clone(),
            scope_dir,
            dir,
            pid,
            vcpus: threads.to_vec(),
            entered: false,
            threads: Vec::new(),
            origin: None,
            current: 0.0,
            selected: vec![true; threads.len()],
            probing: None,
            released: false,
        };
        let prepared = match hierarchy {
            Hierarchy::V1(_) => v1::prepare(&throttle, threads.len()),
            Hierarchy::V2(root) => v2::prepare(root, &throttle),
        };
        if let Err(e) = prepared {
            throttle.release_inner();
            return Err(e);
        }
        Ok(throttle)
    }

    /// Moves the threads into the throttle's cgroups, once.
    fn enter(&mut self) -> Result<(), ThrottleError> {
        if self.entered {
            return Ok(());
        }
        // Once only, even if a move fails: the threads moved so far are
        // recorded with where they came from (the release puts them back),
        // and moving them again would record our own cgroup instead.
        self.entered = true;
        let vcpus = self.vcpus.clone();
        match self.hierarchy.clone() {
            Hierarchy::V1(root) => v1::enter(&root, self, &vcpus),
            Hierarchy::V2(root) => v2::enter(&root, self, &vcpus),
        }
    }

    /// Sets the throttle (0 = none, up to [`MAX_HOST_THROTTLE`]).
    ///
    /// # Errors
    /// [`ThrottleError::Io`] if the quota cannot be written.
    ///
    /// It applies to the selected vCPUs ([`HostThrottle::select`]; all
    /// unless told otherwise); the others run free. It overrules a probe in
    /// progress, "none" too: that is how the switchover lets every vCPU run.
    pub fn set(&mut self, throttle: f64) -> Result<(), ThrottleError> {
        self.probing = None;
        for index in 0..self.vcpus.len() {
            let level = if self.selected[index] { throttle } else { 0.0 };
            self.set_vcpu(index, level)?;
        }
        self.current = throttle.clamp(0.0, MAX_HOST_THROTTLE);
        Ok(())
    }

    fn set_vcpu(&mut self, index: usize, throttle: f64) -> Result<(), ThrottleError> {
        if throttle > 0.0 {
            self.enter()?;
        } else if !self.entered {
            return Ok(());
        }
        match &self.hierarchy {
            Hierarchy::V1(_) => v1::set(&self.dir, index, throttle),
            Hierarchy::V2(_) => v2::set(&self.dir, index, throttle),
        }
    }

    /// Narrows the throttle to the vCPUs at `indices` (the ones that write
    /// memory), applying the throttle in force to them alone. Indices out
    /// of range are ignored; an empty selection is refused (false): a
    /// guest that dirties memory has a vCPU that writes.
    ///
    /// # Errors
    /// [`ThrottleError::Io`] if a quota cannot be written.
    pub fn select(&mut self, indices: &[usize]) -> Result<bool, ThrottleError> {
        let selected: Vec<bool> = (0..self.vcpus.len())
            .map(|i| indices.contains(&i))
            .collect();
        if !selected.contains(&true) {
            return Ok(false);
        }
        self.selected = selected;
        if self.current > 0.0 {
            self.set(self.current)?;
        }
        Ok(true)
    }

    /// The vCPUs the throttle applies to, by index.
    pub fn selected(&self) -> Vec<usize> {
        (0..self.selected.len())
            .filter(|&i| self.selected[i])
            .collect()
    }

    /// Throttles vCPU `index` alone, to see what the guest dirties without
    /// it. Only while no throttle is in force (false otherwise): the
    /// controller's throttle comes first.
    ///
    /// # Errors
    /// [`ThrottleError::Io`] if the quota cannot be written.
    pub fn probe(&mut self, index: usize, throttle: f64) -> Result<bool, ThrottleError> {
        if self.current > 0.0 || index >= self.vcpus.len() {
            return Ok(false);
        }
        if let Some(other) = self.probing.take() {
            self.set_vcpu(other, 0.0)?;
        }
        self.set_vcpu(index, throttle)?;
        self.probing = Some(index);
        Ok(true)
    }

    /// Lifts the probe of vCPU `index`. False if the controller's throttle
    /// overruled it meanwhile: what was measured under it means nothing.
    ///
    /// # Errors
    /// [`ThrottleError::Io`] if the quota cannot be written.
    pub fn end_probe(&mut self, index: usize) -> Result<bool, ThrottleError> {
        if self.probing != Some(index) {
            return Ok(false);
        }
        self.probing = None;
        self.set_vcpu(index, 0.0)?;
        Ok(true)
    }

    /// The throttle in force.
    pub fn current(&self) -> f64 {
        self.current
    }

    /// The cgroup holding the throttled threads.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Lifts the quota, moves every thread back, removes the cgroup.
    pub fn release(mut self) {
        self.release_inner();
    }

    fn release_inner(&mut self) {
        match &self.hierarchy {
            Hierarchy::V1(root) => v1::release(root, &self.dir, self.threads.drain(..)),
            Hierarchy::V2(root) => {
                v2::release(root, &self.dir, self.pid, self.origin.take());
                self.threads.clear();
            }
        }
        self.hierarchy.tidy(&self.scope_dir);
        self.current = 0.0;
        self.released = true;
    }
}

impl Drop for HostThrottle {
    fn drop(&mut self) {
        if !self.released {
            self.release_inner();
        }
    }
}

/// The cgroup path (`/` or `/livemig/...`) thread `tid` of process `pid` is
/// in now: in the v1 `cpu` controller's hierarchy, or with `v2`, the
/// unified one.
pub fn cgroup_of(pid: u32, tid: u32, v2: bool) -> Option<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/task/{tid}/cgroup")).ok()?;
    text.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let ours = if v2 {
            id == "0" && controllers.is_empty()
        } else {
            controllers.split(',').any(|c| c == "cpu")
        };
        ours.then(|| path.to_string())
    })
}

/// The v1 `cpu` controller's cgroup thread `tid` of process `pid` is in.
pub fn cpu_cgroup_of(pid: u32, tid: u32) -> Option<String> {
    cgroup_of(pid, tid, false)
}

/// Lifts the quota of one of our cgroups and empties and removes it,
/// whatever is in it (its threads go to the root).
pub fn release_dir(hierarchy: &Hierarchy, dir: &Path) {
    match hierarchy {
        Hierarchy::V1(root) => v1::release_dir(root, dir),
        Hierarchy::V2(root) => v2::release_dir(root, dir),
    }
}

/// Lifts and removes one named throttle of `scope`, if it is there.
///
/// # Errors
/// [`ThrottleError::BadName`] for a name that could escape.
pub fn release_named(hierarchy: &Hierarchy, scope: &str, name: &str) -> Result<(), ThrottleError> {
    check_name(name)?;
    let scope_dir = hierarchy.scope_dir(scope)?;
    let dir = scope_dir.join(name);
    if dir.is_dir() {
        release_dir(hierarchy, &dir);
    }
    hierarchy.tidy(&scope_dir);
    Ok(())
}

/// Removes the throttles one agent's `scope` holds (what a crashed agent
/// left behind), so no guest stays slowed. Returns how many were cleared.
///
/// # Errors
/// [`ThrottleError::BadName`] for a scope that could escape.
pub fn release_scope(hierarchy: &Hierarchy, scope: &str) -> Result<usize, ThrottleError> {
    let scope_dir = hierarchy.scope_dir(scope)?;
    let Ok(entries) = fs::read_dir(&scope_dir) else {
        return Ok(0);
    };
    let mut cleared = 0;
    for entry in entries.flatten() {
        if entry.path().is_dir() {
            release_dir(hierarchy, &entry.path());
            cleared += 1;
        }
    }
    hierarchy.tidy(&scope_dir);
    Ok(cleared)
}

/// The throttles `scope` holds now, by name.
pub fn held(hierarchy: &Hierarchy, scope: &str) -> Vec<String> {
    let Ok(dir) = hierarchy.scope_dir(scope) else {
        return Vec::new();
    };
    let mut names: Vec<String> = fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().is_dir())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[cfg(test)]
mod tests;
