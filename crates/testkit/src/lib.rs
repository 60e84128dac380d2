//! Test harness for livemig: real agents, real QEMU, the in-tree guest.
//!
//! - [`TestBed`]: a per-test temporary directory with the guest kernel and a
//!   CA (every agent listens on mutual TLS with a certificate from it), from
//!   which hosts (agents) are started. Holding it serialises QEMU-heavy tests
//!   in one process: two busy TCG guests per test already fill two cores.
//! - [`Host`]: one agent plus a client. Plain hosts serve `agent::serve`
//!   in the test process (on a thread of their own); hosts that tests crash,
//!   measure, give flags or put in a namespace are `livemigd` children in
//!   their own process group. Dropping a host kills its agent and every
//!   QEMU it started (the group, or the QEMUs naming its state directory).
//! - [`netns`]: two network namespaces joined by a veth pair.
//! - [`capture`]: the start of each TCP connection in a namespace, as sent.
//! - [`rogue`]: a compromised peer agent that rewrites a real one's replies.
//! - [`contract`]: a scenario run on real QEMU and on simulated VMs, the
//!   agent's view of both compared.
//! - [`etcd`]: a real etcd on loopback, for the cluster's tests.
//! - [`procs`]: which processes are in a group, for leak checks.
//! - [`output`]: what the CLI printed.
//! - [`tls_client`]: a raw TLS connection to an agent (metrics, probing).
//! - [`assert_runs_only_on`], [`assert_no_leftovers`]: what a user checks
//!   after a migration.
//!
//! Binaries are found next to the test executable's directory
//! (`target/<profile>/`); build them first (`cargo build --bins`), or point
//! `LIVEMIG_BIN_DIR` at them.

#![warn(missing_docs)]

mod bed;
pub mod capture;
mod checks;
pub mod contract;
pub mod controller;
pub mod etcd;
mod host;
mod in_process;
pub use launcher::netns;
pub mod output;
pub mod procs;
pub mod rogue;
pub mod tls_client;

use std::path::PathBuf;
use std::time::Duration;

pub use bed::{create_image, TestBed};
pub use checks::{assert_no_leftovers, assert_runs_only_on};
pub use host::{AgentKind, Host};

/// How long a guest may take to show progress after a start or migration.
pub const GUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// `--live` and nothing else: the options most tests start from.
pub fn live() -> protocol::MigrateOptions {
    protocol::MigrateOptions {
        live: true,
        ..Default::default()
    }
}

/// `--live` capped at `bandwidth_mib_s`: low enough, a job that stays in
/// flight while a test looks at it.
pub fn capped(bandwidth_mib_s: u64) -> protocol::MigrateOptions {
    protocol::MigrateOptions {
        bandwidth: Some(bandwidth_mib_s),
        ..live()
    }
}

/// The Linux guest's workload in the tests: 8 MiB of memory swept, and
/// 1 MiB of `/dev/vda` rewritten and reread every second.
pub fn disk_workload() -> guest::linux::LinuxWorkload {
    guest::linux::LinuxWorkload {
        disk: Some("/dev/vda".into()),
        disk_blocks: 256,
        disk_kib_s: 1024,
        ..guest::linux::LinuxWorkload::memory(guest::Workload::busy(8, 20_000))
    }
}

/// The directory holding `livemig` and `livemigd`.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("LIVEMIG_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test executable lives in target/<profile>/deps");
    dir.to_path_buf()
}

/// The Linux test guest's static workload (`scripts/build-linux-guest.sh`
/// builds it; `LIVEMIG_WORKLOAD` points elsewhere).
pub fn linux_workload() -> PathBuf {
    if let Some(path) = std::env::var_os("LIVEMIG_WORKLOAD") {
        return PathBuf::from(path);
    }
    guest::linux::workload_beside(&bin_dir())
}

/// Path of a workspace binary, checked to exist.
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace's tests first (`cargo nextest run --workspace` and scripts/test.sh do)",
        path.display()
    );
    path
}

/// Whether this host has a cgroup hierarchy with a `cpu` controller where
/// livemig's host throttle can work.
pub fn host_throttle_available() -> bool {
    use migration::vcpu_throttle::cgroup::Hierarchy;
    Hierarchy::probe(&Hierarchy::default_root()).is_ok()
}

/// The host throttles the agent on `state_dir` holds now, by name.
pub fn throttles_held(state_dir: &std::path::Path) -> Vec<String> {
    use migration::vcpu_throttle::cgroup::{held, Hierarchy};
    match Hierarchy::probe(&Hierarchy::default_root()) {
        Ok(hierarchy) => held(&hierarchy, &agent::config::throttle_scope(state_dir)),
        Err(_) => Vec::new(),
    }
}

/// The `define` request for `definition`.
pub fn define(definition: &domain::DomainDefinition) -> protocol::Request {
    protocol::Request::Define {
        definition: protocol::domain::DefinitionDoc(definition.to_document()),
    }
}

/// Polls `condition` every 100 ms until it returns `Some`, or panics with
/// `what` after `timeout`.
pub async fn wait_until<T, F, Fut>(timeout: Duration, what: &str, mut condition: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = condition().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
