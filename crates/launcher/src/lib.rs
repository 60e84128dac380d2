//! Running `livemigd` as a child process: for the demo, the tests and the
//! benchmarks; [`netns`], two "hosts" on one machine, and [`fabric`],
//! several on one bridge; [`etcd`], the cluster's store; [`local_fleet`],
//! all of it with agents and a controller.
//!
//! The agent is put in a process group of its own, and the QEMU processes
//! it starts inherit that group; dropping the [`AgentProcess`] kills the
//! whole group, so nothing it started can outlive it.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use protocol::host::AgentInfo;
use protocol::{AgentUri, Client, Reply, Request};

pub mod etcd;
pub mod fabric;
pub mod local_fleet;
pub mod netns;

const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Why an agent could not be started.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// Its state directory or log could not be created.
    #[error("cannot create {path}")]
    Io {
        /// What could not be created.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The binary would not run.
    #[error("cannot run {binary}")]
    Spawn {
        /// The binary.
        binary: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It exited before answering.
    #[error("livemigd exited during start-up ({status}); see {log}")]
    Exited {
        /// How it exited.
        status: String,
        /// Its log.
        log: PathBuf,
    },
    /// It never answered.
    #[error("livemigd did not answer within {READY_TIMEOUT:?}; see {log}")]
    NotReady {
        /// Its log.
        log: PathBuf,
    },
}

/// How to start an agent.
#[derive(Debug, Clone)]
pub struct LaunchOptions {
    /// The `livemigd` binary.
    pub binary: PathBuf,
    /// Its `--state-dir`.
    pub state_dir: PathBuf,
    /// `tls://HOST:PORT` (with `tls_dir`) or `tcp://HOST:PORT` (with
    /// `--insecure` among the extra arguments); port 0 lets the agent pick.
    pub listen: Option<String>,
    /// The agent's TLS directory (`--tls-dir`).
    pub tls_dir: Option<PathBuf>,
    /// Run inside this network namespace (`ip netns exec`).
    pub netns: Option<String>,
    /// Directories definitions may take images from (`--image-dir`); the
    /// agent's default (`STATE_DIR/images`) when empty.
    pub image_dirs: Vec<PathBuf>,
    /// More `livemigd` arguments.
    pub extra_args: Vec<String>,
    /// Directories only this agent sees: each `(dir, at)` is bind-mounted
    /// at `at` in a mount namespace of the agent's own (`unshare`), so two
    /// agents on one machine can each have "local" storage at one path.
    pub private_dirs: Vec<(PathBuf, PathBuf)>,
}

/// The shell that sets up the agent's mount namespace, then runs the rest:
/// its first argument says which cgroup hierarchy to mount again (`ip netns
/// exec` mounts a fresh /sys without the host's cgroup tree, which the
/// agent's vCPU throttle needs): `v1` (the `cpu` controller), `v2` (the
/// unified tree) or `none`; then it bind-mounts `DIR AT` pairs up to `--`.
const SETUP: &str = "case \"$1\" in \
     v1) mount -t tmpfs cgroup /sys/fs/cgroup && mkdir /sys/fs/cgroup/cpu && \
         mount -t cgroup -o cpu cgroup /sys/fs/cgroup/cpu || exit 1;; \
     v2) mount -t cgroup2 cgroup2 /sys/fs/cgroup || exit 1;; \
   esac; shift; \
   while [ \"$1\" != -- ]; do mount --bind \"$1\" \"$2\" || exit 1; shift 2; done; shift; \
   exec \"$@\"";

/// Which of the host's cgroup hierarchies an agent in a network namespace
/// gets mounted again (see [`SETUP`]).
fn host_cgroup() -> &'static str {
    if Path::new("/sys/fs/cgroup/cpu/tasks").exists() {
        "v1"
    } else if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        "v2"
    } else {
        "none"
    }
}

/// A running `livemigd` child.
#[derive(Debug)]
pub struct AgentProcess {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
    info: AgentInfo,
}

impl AgentProcess {
    /// Starts the agent and waits until it answers on its socket.
    ///
    /// # Errors
    /// [`LaunchError`] if it cannot start or does not become ready.
    pub async fn spawn(options: &LaunchOptions) -> Result<AgentProcess, LaunchError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| LaunchError::Io { path, source }
        };
        std::fs::create_dir_all(&options.state_dir).map_err(io(&options.state_dir))?;
        let socket = options.state_dir.join("livemigd.sock");
        let log = options.state_dir.join("livemigd.log");
        let log_file = File::create(&log).map_err(io(&log))?;
        let log_err = log_file.try_clone().map_err(io(&log))?;

        // [ip netns exec NS | unshare --mount ...] sh -c SETUP CGROUP DIR AT.. -- livemigd ...
        let mut program: Vec<std::ffi::OsString> = Vec::new();
        let cgroup = if let Some(ns) = &options.netns {
            program.extend(["ip", "netns", "exec", ns].map(Into::into));
            host_cgroup()
        } else {
            "none"
        };
        if !options.private_dirs.is_empty() && options.netns.is_none() {
            program
                .extend(["unshare", "--mount", "--propagation", "private", "--"].map(Into::into));
        }
        if options.netns.is_some() || !options.private_dirs.is_empty() {
            program.extend(["sh", "-c", SETUP, "sh", cgroup].map(Into::into));
            for (dir, at) in &options.private_dirs {
                program.push(dir.into());
                program.push(at.into());
            }
            program.push("--".into());
        }
        program.push(options.binary.clone().into());
        let mut command = Command::new(&program[0]);
        command.args(&program[1..]);
        command
            .arg("--state-dir")
            .arg(&options.state_dir)
            .arg("--socket")
            .arg(&socket)
            .args(
                options
                    .listen
                    .iter()
                    .flat_map(|l| ["--listen".to_string(), l.clone()]),
            )
            .args(
                options
                    .tls_dir
                    .iter()
                    .flat_map(|d| [std::ffi::OsString::from("--tls-dir"), d.into()]),
            )
            .args(
                options
                    .image_dirs
                    .iter()
                    .flat_map(|d| [std::ffi::OsString::from("--image-dir"), d.into()]),
            )
            .args(&options.extra_args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log_file))
            .stderr(Stdio::from(log_err))
            .process_group(0);
        let child = command.spawn().map_err(|source| LaunchError::Spawn {
            binary: options.binary.clone(),
            source,
        })?;
        let mut process = AgentProcess {
            child,
            socket,
            log,
            info: AgentInfo {
                version: String::new(),
                protocol: 0,
                uri: None,
                state_dir: None,
                instance: String::new(),
            },
        };
        process.info = process.wait_ready().await?;
        Ok(process)
    }

    async fn wait_ready(&mut self) -> Result<AgentInfo, LaunchError> {
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        let uri = self.local_uri();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(LaunchError::Exited {
                    status: status.to_string(),
                    log: self.log.clone(),
                });
            }
            if let Ok(client) = Client::connect(&uri).await {
                if let Ok(Reply::Hello(info)) =
                    client.request(Request::Hello, Duration::from_secs(5)).await
                {
                    return Ok(info);
                }
            }
            if tokio::time::Instant::now() > deadline {
                return Err(LaunchError::NotReady {
                    log: self.log.clone(),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The unix socket URI for a local CLI.
    pub fn local_uri(&self) -> AgentUri {
        AgentUri::Unix(self.socket.clone())
    }

    /// The agent's network URI (`tls://` or `tcp://`), for peers, when it
    /// listens on the network.
    pub fn tcp_uri(&self) -> Option<String> {
        self.info.uri.clone()
    }

    /// What the agent said of itself when it came up.
    pub fn info(&self) -> &AgentInfo {
        &self.info
    }

    /// The agent's pid (and process group).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The agent's own log (its stderr).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Asks the agent to shut down (SIGTERM: it stops its QEMUs), waits, then
    /// kills whatever is left of its process group.
    pub async fn stop(mut self, timeout: Duration) {
        let _ = nix::sys::signal::kill(self.pgid(), Signal::SIGTERM);
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.kill_group();
    }

    /// Sends SIGTERM and waits for the agent to exit; its QEMU processes
    /// are left alone. Returns whether it exited in time.
    pub async fn terminate(&mut self, timeout: Duration) -> bool {
        let _ = nix::sys::signal::kill(self.pgid(), Signal::SIGTERM);
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// Kills the agent alone with SIGKILL, as a crash would; its QEMU
    /// processes keep running (they die with the group on drop).
    pub fn crash(&mut self) {
        let _ = nix::sys::signal::kill(self.pgid(), Signal::SIGKILL);
        let _ = self.child.wait();
    }

    fn pgid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    /// SIGKILL to every process in the group, then reap the agent.
    pub fn kill_group(&mut self) {
        let _ = killpg(self.pgid(), Signal::SIGKILL);
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill_group();
    }
}
