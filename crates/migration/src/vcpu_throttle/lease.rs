//! A host throttle is held on a lease, so that it cannot outlive the agent
//! that set it.
//!
//! A throttle of 99.8 % leaves the guest 2 ms of CPU a second: if the
//! agent died then, nobody would lift it and the VM would stay all but
//! frozen. So with every host throttle the agent starts a guard process
//! (`livemigd guard-throttle`, its own process group, so it outlives the
//! agent) whose stdin is a pipe from the agent:
//! - the agent writes `renew` five times per lease ([`LEASE`] unless the
//!   agent is configured otherwise); a guard that hears nothing for a
//!   lease (the agent is stopped or wedged) lifts the throttle;
//! - the agent dies: the pipe closes and the guard lifts the throttle at
//!   once;
//! - the job ends: the agent releases the throttle itself, then writes
//!   `done` and the guard leaves without touching anything.
//!
//! The guard lifts only its own throttle (`ROOT/livemig/SCOPE/NAME`); the
//! systemd unit's `ExecStopPost=livemigd release-throttles` lifts all of an
//! agent's throttles when the agent stops, should a guard be gone too.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::sync::oneshot;

use super::cgroup::{release_named, Hierarchy, ThrottleError};

/// How long a throttle outlives the agent's last renewal, unless the
/// agent says otherwise.
pub const LEASE: Duration = Duration::from_secs(5);
/// Renewals per lease.
const RENEWALS: u32 = 5;
/// How long the agent waits for its guard to leave at the end of a job.
const GUARD_EXIT: Duration = Duration::from_secs(2);

/// The guard's command-line arguments after the program.
pub fn guard_args(root: &Path, scope: &str, name: &str, lease: Duration) -> Vec<String> {
    vec![
        "guard-throttle".into(),
        "--cgroup-root".into(),
        root.display().to_string(),
        "--scope".into(),
        scope.into(),
        "--name".into(),
        name.into(),
        "--lease-ms".into(),
        lease.as_millis().to_string(),
    ]
}

/// The agent's side: a guard process, renewed until [`Lease::end`].
#[derive(Debug)]
pub struct Lease {
    done: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Lease {
    /// Starts `program guard-throttle ...` for the throttle `scope/name`
    /// under `root`, held for `lease` past each renewal, and renews it
    /// from a task of its own.
    ///
    /// # Errors
    /// The guard could not be started.
    pub fn take(
        program: &Path,
        root: &Path,
        scope: &str,
        name: &str,
        lease: Duration,
    ) -> std::io::Result<Lease> {
        let mut child = tokio::process::Command::new(program)
            .args(guard_args(root, scope, name, lease))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .process_group(0)
            .kill_on_drop(false)
            .spawn()?;
        let mut stdin = child.stdin.take().expect("piped stdin");
        let (done, mut done_rx) = oneshot::channel::<()>();
        let name = name.to_string();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(lease / RENEWALS);
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        if stdin.write_all(b"renew\n").await.is_err() {
                            tracing::warn!(
                                throttle = %name,
                                "the throttle's lease guard is gone: the throttle may be lifted"
                            );
                            return;
                        }
                    }
                    ended = &mut done_rx => {
                        if ended.is_ok() {
                            let _ = stdin.write_all(b"done\n").await;
                        }
                        // Dropped without `end` (a panic): the pipe closes
                        // and the guard lifts the throttle.
                        drop(stdin);
                        let _ = tokio::time::timeout(GUARD_EXIT, child.wait()).await;
                        return;
                    }
                }
            }
        });
        Ok(Lease {
            done: Some(done),
            task,
        })
    }

    /// Ends the lease after the agent lifted the throttle itself.
    pub async fn end(mut self) {
        if let Some(done) = self.done.take() {
            let _ = done.send(());
        }
        let _ = tokio::time::timeout(GUARD_EXIT * 2, &mut self.task).await;
    }
}

/// How a guard ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuardEnd {
    /// The agent lifted the throttle and said `done`.
    Returned,
    /// The agent's pipe closed: the guard lifted the throttle.
    AgentGone,
    /// No renewal within the lease: the guard lifted the throttle.
    Expired,
}

/// The guard's side: watches `input` (the agent's pipe) and lifts the
/// throttle `scope/name` when the agent goes or stops renewing.
///
/// # Errors
/// [`ThrottleError`] if the names are not plain.
pub fn guard(
    hierarchy: &Hierarchy,
    scope: &str,
    name: &str,
    lease: Duration,
    input: impl BufRead + Send + 'static,
) -> Result<GuardEnd, ThrottleError> {
    let (lines, heard) = mpsc::channel::<String>();
    // A thread of its own, as a blocking read has no timeout.
    std::thread::spawn(move || {
        for line in input.lines() {
            match line {
                Ok(line) => {
                    if lines.send(line).is_err() {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    });
    let end = loop {
        match heard.recv_timeout(lease) {
            Ok(line) if line.trim() == "done" => return Ok(GuardEnd::Returned),
            Ok(_) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => break GuardEnd::AgentGone,
            Err(mpsc::RecvTimeoutError::Timeout) => break GuardEnd::Expired,
        }
    };
    release_named(hierarchy, scope, name)?;
    Ok(end)
}

/// Where a guard writes what it did: the agent's stderr (its log).
pub fn report(scope: &str, name: &str, end: GuardEnd) {
    let what = match end {
        GuardEnd::Returned => return,
        GuardEnd::AgentGone => "the agent is gone",
        GuardEnd::Expired => "the agent stopped renewing its lease",
    };
    let _ = writeln!(
        std::io::stderr(),
        "livemigd guard-throttle: lifted vCPU throttle {scope}/{name}: {what}"
    );
}

/// The program that guards throttles by default: this one (`livemigd`).
pub fn default_program() -> Option<PathBuf> {
    std::env::current_exe().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufReader;
    use std::os::unix::net::UnixStream;

    fn v1_tree() -> (tempfile::TempDir, Hierarchy) {
        let tree = tempfile::tempdir().unwrap();
        std::fs::write(tree.path().join("tasks"), "").unwrap();
        let hierarchy = Hierarchy::probe(tree.path()).unwrap();
        (tree, hierarchy)
    }

    fn throttled(tree: &Path, hierarchy: &Hierarchy) -> PathBuf {
        let mut throttle =
            super::super::cgroup::HostThrottle::attach(hierarchy, "a", "vm", 1, &[42]).unwrap();
        throttle.set(0.99).unwrap();
        let dir = throttle.dir().to_path_buf();
        std::mem::forget(throttle);
        assert_eq!(
            std::fs::read_to_string(dir.join("vcpu0/cpu.cfs_quota_us")).unwrap(),
            "1000"
        );
        assert!(dir.starts_with(tree));
        dir
    }

    #[test]
    fn the_agent_gone_lifts_the_throttle_at_once() {
        let (tree, hierarchy) = v1_tree();
        let dir = throttled(tree.path(), &hierarchy);
        let (agent, guard_end) = UnixStream::pair().unwrap();
        let start = std::time::Instant::now();
        let waiting = std::thread::spawn({
            let hierarchy = hierarchy.clone();
            move || {
                guard(
                    &hierarchy,
                    "a",
                    "vm",
                    Duration::from_secs(30),
                    BufReader::new(guard_end),
                )
            }
        });
        (&agent).write_all(b"renew\nrenew\n").unwrap();
        drop(agent);
        assert_eq!(waiting.join().unwrap().unwrap(), GuardEnd::AgentGone);
        assert!(start.elapsed() < Duration::from_secs(10), "not the lease");
        assert_eq!(
            std::fs::read_to_string(dir.join("vcpu0/cpu.cfs_quota_us")).unwrap(),
            "-1"
        );
        assert_eq!(
            std::fs::read_to_string(tree.path().join("tasks")).unwrap(),
            "42"
        );
    }

    #[test]
    fn a_silent_agent_loses_its_lease() {
        let (tree, hierarchy) = v1_tree();
        let dir = throttled(tree.path(), &hierarchy);
        let (_agent, guard_end) = UnixStream::pair().unwrap();
        let end = guard(
            &hierarchy,
            "a",
            "vm",
            Duration::from_millis(200),
            BufReader::new(guard_end),
        )
        .unwrap();
        assert_eq!(end, GuardEnd::Expired);
        assert_eq!(
            std::fs::read_to_string(dir.join("vcpu0/cpu.cfs_quota_us")).unwrap(),
            "-1"
        );
    }

    #[test]
    fn done_leaves_everything_as_it_is() {
        let (tree, hierarchy) = v1_tree();
        let dir = throttled(tree.path(), &hierarchy);
        let input = BufReader::new(std::io::Cursor::new(b"renew\ndone\n".to_vec()));
        let end = guard(&hierarchy, "a", "vm", Duration::from_secs(5), input).unwrap();
        assert_eq!(end, GuardEnd::Returned);
        // Not ours to touch any more (a later throttle may use the name).
        assert_eq!(
            std::fs::read_to_string(dir.join("vcpu0/cpu.cfs_quota_us")).unwrap(),
            "1000"
        );
    }
}
