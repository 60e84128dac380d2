//! A supervised VM process with its QMP connection: a QEMU, or a simulated
//! VM that stands in for one (see [`crate::hypervisor`]).
//!
//! A task owns the child: it reaps it and publishes how it exited on a
//! `watch` channel, and kills it when asked or when the [`VmProcess`] is
//! dropped — unless it was [detached](VmProcess::detach), which an agent
//! does when it shuts down so its guests keep running. A QEMU started by an
//! earlier agent process is [adopted](VmProcess::adopt): it is not our
//! child, so its exit is noticed by watching `/proc`. QEMU's stdout and
//! stderr go to a log file, whose tail is quoted when QEMU fails to start.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use qmp::Client;
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

/// How long QEMU gets to quit (or die, once killed) before we stop waiting.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// How QEMU ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitInfo {
    /// Its exit code, if it exited.
    pub code: Option<i32>,
    /// The signal that killed it, if one did.
    pub signal: Option<i32>,
}

impl std::fmt::Display for ExitInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.code, self.signal) {
            (Some(code), _) => write!(f, "exit code {code}"),
            (None, Some(signal)) => write!(f, "signal {signal}"),
            (None, None) => f.write_str("unknown status"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
/// Why a QEMU could not be started or adopted.
pub enum ProcessError {
    #[error("cannot open QEMU log {path}")]
    /// Its log could not be opened.
    Log {
        /// The log.
        path: PathBuf,
        #[source]
        /// Why.
        source: std::io::Error,
    },
    #[error("cannot run {binary}")]
    /// The binary would not run.
    Spawn {
        /// The binary.
        binary: PathBuf,
        #[source]
        /// Why.
        source: std::io::Error,
    },
    #[error("QEMU exited during start-up ({exit}): {log_tail}")]
    /// It exited before its QMP socket came up.
    EarlyExit {
        /// How it exited.
        exit: ExitInfo,
        /// The end of its log.
        log_tail: String,
    },
    #[error("QEMU's QMP socket did not come up within {timeout:?}: {log_tail}")]
    /// Its QMP socket did not come up in time.
    QmpTimeout {
        /// How long we waited.
        timeout: Duration,
        /// The end of its log.
        log_tail: String,
    },
    #[error("cannot adopt QEMU pid {pid}: {reason}")]
    /// A QEMU an earlier agent started could not be taken over.
    Adopt {
        /// Its pid.
        pid: u32,
        /// Why.
        reason: String,
    },
}

/// Kills the child when dropped — also when the runtime drops the task
/// that owns it before a kill order could run — unless it was detached.
struct ChildGuard {
    child: tokio::process::Child,
    /// Set by [`VmProcess::detach`] directly: an agent that shuts down
    /// detaches and exits at once, without this task running again.
    detached: Arc<AtomicBool>,
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if !self.detached.load(Ordering::SeqCst) {
            let _ = self.child.start_kill();
        }
    }
}

/// What the owner of a [`VmProcess`] wants done with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Order {
    Kill,
    /// Leave it running; stop only watching it.
    Detach,
}

/// A running QEMU (or simulated VM).
#[derive(Debug)]
pub struct VmProcess {
    pid: u32,
    qmp: Client,
    exit: watch::Receiver<Option<ExitInfo>>,
    kill: Mutex<Option<oneshot::Sender<Order>>>,
    log: PathBuf,
    detached: Arc<AtomicBool>,
}

impl VmProcess {
    /// Starts `binary argv...`, then connects to its QMP socket.
    ///
    /// # Errors
    /// [`ProcessError::EarlyExit`] with QEMU's own message when it refuses
    /// its command line, [`ProcessError::QmpTimeout`] when it hangs.
    pub async fn spawn(
        binary: &Path,
        argv: &[String],
        qmp_socket: &Path,
        log: &Path,
        timeout: Duration,
    ) -> Result<VmProcess, ProcessError> {
        let log_file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|source| ProcessError::Log {
                path: log.to_path_buf(),
                source,
            })?;
        let log_err = log_file.try_clone().map_err(|source| ProcessError::Log {
            path: log.to_path_buf(),
            source,
        })?;
        // A stale socket would make us talk to nothing, or to an old QEMU.
        let _ = std::fs::remove_file(qmp_socket);
        let child = tokio::process::Command::new(binary)
            .args(argv)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log_file))
            .stderr(Stdio::from(log_err))
            // Killing is ours to decide (see `Order`): an agent that stops
            // leaves its guests running.
            .kill_on_drop(false)
            .spawn()
            .map_err(|source| ProcessError::Spawn {
                binary: binary.to_path_buf(),
                source,
            })?;
        let pid = child.id().unwrap_or(0);
        tracing::debug!(pid, binary = %binary.display(), ?argv, "QEMU started");

        let (exit_tx, exit_rx) = watch::channel(None);
        let (kill_tx, kill_rx) = oneshot::channel::<Order>();
        let detached = Arc::new(AtomicBool::new(false));
        let mut guard = ChildGuard {
            child,
            detached: detached.clone(),
        };
        tokio::spawn(async move {
            let status = tokio::select! {
                status = guard.child.wait() => status,
                order = kill_rx => {
                    // A dropped handle (no order) means kill.
                    match order.unwrap_or(Order::Kill) {
                        Order::Kill => {
                            let _ = guard.child.start_kill();
                        }
                        Order::Detach => guard.detached.store(true, Ordering::SeqCst),
                    }
                    guard.child.wait().await
                }
            };
            let info = match status {
                Ok(s) => {
                    use std::os::unix::process::ExitStatusExt;
                    ExitInfo {
                        code: s.code(),
                        signal: s.signal(),
                    }
                }
                Err(_) => ExitInfo {
                    code: None,
                    signal: None,
                },
            };
            tracing::debug!(pid, %info, "QEMU exited");
            let _ = exit_tx.send(Some(info));
        });

        let deadline = Instant::now() + timeout;
        let mut exit = exit_rx.clone();
        let qmp = loop {
            if let Some(info) = *exit.borrow_and_update() {
                return Err(ProcessError::EarlyExit {
                    exit: info,
                    log_tail: log_tail(log),
                });
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                let _ = kill_tx.send(Order::Kill);
                return Err(ProcessError::QmpTimeout {
                    timeout,
                    log_tail: log_tail(log),
                });
            }
            match Client::connect(qmp_socket, remaining).await {
                Ok(client) => break client,
                Err(_) => {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                        _ = exit.changed() => {}
                    }
                }
            }
        };
        Ok(VmProcess {
            pid,
            qmp,
            exit: exit_rx,
            kill: Mutex::new(Some(kill_tx)),
            log: log.to_path_buf(),
            detached,
        })
    }

    /// Takes over a QEMU started by an earlier agent process: checks that
    /// `pid` is alive and connects to its QMP socket.
    ///
    /// # Errors
    /// [`ProcessError::Adopt`] if the process is gone or does not answer.
    pub async fn adopt(
        pid: u32,
        qmp_socket: &Path,
        log: &Path,
        timeout: Duration,
    ) -> Result<VmProcess, ProcessError> {
        let adopt_error = |reason: String| ProcessError::Adopt { pid, reason };
        if !alive(pid) {
            return Err(adopt_error("the process is gone".into()));
        }
        let qmp = Client::connect(qmp_socket, timeout)
            .await
            .map_err(|e| adopt_error(format!("its QMP socket does not answer: {e}")))?;
        let (exit_tx, exit_rx) = watch::channel(None);
        let (kill_tx, mut kill_rx) = oneshot::channel::<Order>();
        tokio::spawn(async move {
            let mut killing = false;
            loop {
                if !alive(pid) {
                    break;
                }
                if !killing {
                    match kill_rx.try_recv() {
                        Ok(Order::Detach) => return,
                        Ok(Order::Kill) | Err(oneshot::error::TryRecvError::Closed) => {
                            killing = true;
                            let _ = nix::sys::signal::kill(
                                nix::unistd::Pid::from_raw(pid as i32),
                                nix::sys::signal::Signal::SIGKILL,
                            );
                        }
                        Err(oneshot::error::TryRecvError::Empty) => {}
                    }
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            // Not our child: its parent reaped it, the status is unknown.
            tracing::debug!(pid, "adopted QEMU exited");
            let _ = exit_tx.send(Some(ExitInfo {
                code: None,
                signal: None,
            }));
        });
        Ok(VmProcess {
            pid,
            qmp,
            exit: exit_rx,
            kill: Mutex::new(Some(kill_tx)),
            log: log.to_path_buf(),
            detached: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Stops supervising without stopping QEMU: dropping the handle after
    /// this leaves the guest running.
    pub fn detach(&self) {
        self.detached.store(true, Ordering::SeqCst);
        if let Some(tx) = self.kill.lock().expect("kill lock").take() {
            let _ = tx.send(Order::Detach);
        }
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Its QMP connection.
    pub fn qmp(&self) -> &Client {
        &self.qmp
    }

    /// QEMU's stdout/stderr log.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// How QEMU exited, once it has.
    pub fn exit_info(&self) -> Option<ExitInfo> {
        *self.exit.borrow()
    }

    /// A receiver that changes once, when QEMU exits.
    pub fn exit_watch(&self) -> watch::Receiver<Option<ExitInfo>> {
        self.exit.clone()
    }

    /// Waits up to `timeout` for QEMU to exit.
    pub async fn wait_exit(&self, timeout: Duration) -> Option<ExitInfo> {
        let mut exit = self.exit.clone();
        let waited = tokio::time::timeout(timeout, exit.wait_for(Option::is_some)).await;
        match waited {
            Ok(Ok(info)) => *info,
            _ => *self.exit.borrow(),
        }
    }

    /// Sends SIGKILL (once); returns immediately.
    pub fn kill(&self) {
        if let Some(tx) = self.kill.lock().expect("kill lock").take() {
            let _ = tx.send(Order::Kill);
        }
    }

    /// Kills QEMU and waits until it has been reaped.
    pub async fn kill_and_wait(&self, timeout: Duration) -> Option<ExitInfo> {
        self.kill();
        self.wait_exit(timeout).await
    }

    /// Asks QEMU to quit over QMP; kills it if it does not exit in time.
    pub async fn shutdown(&self, timeout: Duration) -> Option<ExitInfo> {
        if self.exit_info().is_none() {
            let _ = self
                .qmp
                .execute_with_timeout(&qmp::commands::vm::Quit, timeout)
                .await;
            if let Some(info) = self.wait_exit(timeout).await {
                return Some(info);
            }
        }
        self.kill_and_wait(timeout).await
    }
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// True if `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// The last lines of a log, for error messages.
pub fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let start = lines.len().saturating_sub(5);
    let tail = lines[start..].join(" | ");
    if tail.is_empty() {
        "(QEMU printed nothing)".into()
    } else {
        tail
    }
}
