//! A real etcd (Debian's `etcd-server`) for a test: its own data directory
//! in the bed, ports picked free on loopback, mutual TLS with certificates
//! from the bed's CA; killed (its process group, by PID) when dropped.

use std::path::PathBuf;
use std::time::Duration;

use launcher::etcd::{EtcdOptions, EtcdProcess};

use crate::TestBed;

/// How long etcd may take to answer after it starts.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running etcd.
#[derive(Debug)]
pub struct Etcd {
    process: EtcdProcess,
    probe: cluster::TlsFiles,
    /// `https://127.0.0.1:PORT`.
    pub endpoint: String,
    /// Its data directory.
    pub data_dir: PathBuf,
}

impl Etcd {
    /// Freezes etcd (SIGSTOP): it holds its connections and answers
    /// nothing, as a partitioned or overloaded etcd would.
    pub fn pause(&self) {
        self.process.pause();
    }

    /// Lets a paused etcd go on (SIGCONT).
    pub fn resume(&self) {
        self.process.resume();
    }

    /// Kills etcd (SIGKILL): connections are refused until
    /// [`Etcd::start_again`].
    pub fn stop(&mut self) {
        self.process.kill();
    }

    /// Starts a stopped etcd again on its data directory and ports, and
    /// waits until it answers.
    pub async fn start_again(&mut self) {
        self.process.restart().expect("etcd starts again");
        self.wait_ready().await;
    }

    async fn wait_ready(&self) {
        let endpoints = cluster::Endpoints::parse(&self.endpoint, false).expect("endpoint");
        crate::wait_until(START_TIMEOUT, "etcd to answer", || async {
            cluster::Cluster::connect(&endpoints, Some(&self.probe))
                .await
                .ok()
                .map(|_| ())
        })
        .await;
    }

    /// Starts etcd for `bed`, serving clients over mutual TLS with a
    /// certificate named `etcd` from the bed's CA; waits until it answers.
    ///
    /// # Panics
    /// If etcd is not installed (`scripts/setup.sh` installs it) or does
    /// not come up.
    pub async fn start(bed: &TestBed) -> Etcd {
        let tls = bed.path().join("pki/etcd");
        let tls = if tls.exists() {
            tls
        } else {
            bed.certificate("etcd", protocol::Role::Agent, &["127.0.0.1"])
        };
        let data_dir = bed.path().join("etcd");
        let process = EtcdProcess::spawn(&EtcdOptions {
            data_dir: data_dir.clone(),
            tls_dir: tls,
            host: "127.0.0.1".into(),
            log: bed.path().join("etcd.log"),
        })
        .expect("etcd (etcd-server, installed by scripts/setup.sh)");
        let etcd = Etcd {
            endpoint: process.endpoint.clone(),
            process,
            probe: cluster::TlsFiles {
                dir: bed.certificate_dir("etcd-probe", protocol::Role::Admin),
            },
            data_dir,
        };
        etcd.wait_ready().await;
        etcd
    }
}
