//! An agent served inside the test process: `agent::serve` on listeners
//! bound beforehand (as mini-redis serves), on a thread and runtime of its
//! own so that a test blocking on the CLI never starves it. The same code
//! path as `livemigd`, without a process per agent.
//!
//! Its QEMUs are children of the test process, so nothing kills them with
//! a process group: [`InProcessAgent::kill_qemus`] finds them by their
//! command line (every one names a socket in the agent's state directory)
//! and kills them by pid.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use agent::{serve, Config, Listeners};
use launcher::LaunchOptions;
use tokio::sync::oneshot;

use crate::procs;

/// How long a stopping agent may take to cancel its jobs and return.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stopped agent's blocking tasks may take to return.
const RUNTIME_SHUTDOWN: Duration = Duration::from_secs(5);

/// An agent served by a thread of this process.
#[derive(Debug)]
pub(crate) struct InProcessAgent {
    state_dir: PathBuf,
    socket: PathBuf,
    uri: Option<String>,
    stop: Option<oneshot::Sender<()>>,
    stopped: mpsc::Receiver<Result<(), String>>,
    /// Set once shut down on purpose: its guests outlive it.
    keep_guests: bool,
}

impl InProcessAgent {
    /// Binds the agent's listeners as `livemigd` would for `options`
    /// (state directory, `tls://` address, TLS directory, image
    /// directories; raw QMP allowed for tests) and serves them.
    pub(crate) async fn start(options: &LaunchOptions) -> InProcessAgent {
        std::fs::create_dir_all(&options.state_dir).expect("the agent's state directory");
        let listen = options.listen.as_deref().map(|l| {
            l.strip_prefix("tls://")
                .and_then(|a| a.parse().ok())
                .unwrap_or_else(|| panic!("in-process agents listen on tls://IP:PORT, not {l}"))
        });
        let socket = options.state_dir.join("livemigd.sock");
        let mut config = Config::new(options.state_dir.clone(), socket.clone(), listen);
        config.tls_dir = options.tls_dir.clone();
        config.image_dirs = options.image_dirs.clone();
        config.qemu_monitor_command = true;
        // Not this test binary: the guard that holds a throttle's lease is
        // `livemigd guard-throttle`.
        config.throttle_guard = Some(crate::bin("livemigd"));
        // The hypervisor flags livemigd would get.
        let mut extra = options.extra_args.iter();
        while let Some(arg) = extra.next() {
            match (arg.as_str(), extra.clone().next()) {
                ("--hypervisor", Some(kind)) => {
                    config.hypervisor = kind.parse().expect("a hypervisor kind");
                }
                ("--qemu", Some(program)) => config.qemu = program.into(),
                ("--timeout", Some(setting)) => {
                    config.timeouts.apply(setting).expect("a timeout setting");
                }
                ("--measure-every", Some(every)) => {
                    config.measure_every = (every != "off")
                        .then(|| agent::timeouts::parse_duration(every).expect("a duration"));
                }
                _ => {}
            }
        }

        let log =
            std::fs::File::create(options.state_dir.join("livemigd.log")).expect("the agent's log");
        let (ready_tx, ready_rx) = oneshot::channel::<Result<Option<String>, String>>();
        let (stop, stop_rx) = oneshot::channel::<()>();
        let (stopped_tx, stopped) = mpsc::channel();
        std::thread::Builder::new()
            .name(format!("agent-{}", options.state_dir.display()))
            .spawn(move || {
                // The thread's own subscriber: the agent's log lands in its
                // state directory, as livemigd's stderr does.
                let subscriber = tracing_subscriber::fmt()
                    .with_writer(std::sync::Mutex::new(log))
                    .with_ansi(false)
                    .with_env_filter(
                        tracing_subscriber::EnvFilter::try_from_env("LIVEMIG_LOG")
                            .unwrap_or_else(|_| "info".into()),
                    )
                    .finish();
                let _logging = tracing::subscriber::set_default(subscriber);
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime for the agent");
                let result = runtime.block_on(async move {
                    let listeners = match Listeners::bind(&config).await {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = ready_tx.send(Err(types::error_chain(&e)));
                            return Ok(());
                        }
                    };
                    let uri = listeners.tcp_addr().map(|a| format!("tls://{a}"));
                    let _ = ready_tx.send(Ok(uri));
                    serve(config, listeners, async {
                        let _ = stop_rx.await;
                    })
                    .await
                    .map_err(|e| types::error_chain(&e))
                });
                // Shut down before the test hears of the stop: dropping the
                // tasks the agent detached kills what they still run (the
                // QEMU probe at its start), which the test process would
                // otherwise leave behind as it exits. Bounded: a blocking
                // task may not be waiting for a signal.
                runtime.shutdown_timeout(RUNTIME_SHUTDOWN);
                let _ = stopped_tx.send(result);
            })
            .expect("a thread for the agent");
        let uri = ready_rx
            .await
            .expect("the agent thread answers")
            .unwrap_or_else(|e| panic!("the agent did not start: {e}"));
        InProcessAgent {
            state_dir: options.state_dir.clone(),
            socket,
            uri,
            stop: Some(stop),
            stopped,
            keep_guests: false,
        }
    }

    /// The unix socket a local client connects to.
    pub(crate) fn socket(&self) -> &Path {
        &self.socket
    }

    /// `tls://ADDR` for peers.
    pub(crate) fn uri(&self) -> Option<String> {
        self.uri.clone()
    }

    /// Shuts the agent down as SIGTERM does `livemigd` (its jobs end, its
    /// guests keep running) and waits for it; panics if it fails.
    pub(crate) async fn shut_down(mut self) {
        self.keep_guests = true;
        let result = tokio::task::spawn_blocking(move || {
            if let Some(stop) = self.stop.take() {
                let _ = stop.send(());
            }
            self.stopped.recv_timeout(STOP_TIMEOUT)
        })
        .await
        .expect("the waiting task");
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("the agent failed: {e}"),
            Err(_) => panic!("the agent did not stop within {STOP_TIMEOUT:?}"),
        }
    }

    /// QEMU processes this agent (or an earlier one on the same state
    /// directory) started that are still alive, guests and binary probes.
    pub(crate) fn qemu_pids(state_dir: &Path) -> Vec<u32> {
        procs::qemus_naming(state_dir)
    }

    /// SIGKILL to every QEMU of the state directory.
    pub(crate) fn kill_qemus(state_dir: &Path) {
        for pid in Self::qemu_pids(state_dir) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

impl Drop for InProcessAgent {
    fn drop(&mut self) {
        // A test that ends (or panics) with the agent running: stop it, and
        // kill the guests it would leave running.
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
            let _ = self.stopped.recv_timeout(STOP_TIMEOUT);
        }
        if !self.keep_guests {
            Self::kill_qemus(&self.state_dir);
        }
    }
}
