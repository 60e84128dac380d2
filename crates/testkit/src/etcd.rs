//! A real etcd (Debian's `etcd-server`) for a test: its own data directory
//! in the bed, ports picked free on loopback, mutual TLS with certificates
//! from the bed's CA; killed (its process group, by PID) when dropped.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::TestBed;

/// How long etcd may take to answer after it starts.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// A running etcd.
#[derive(Debug)]
pub struct Etcd {
    child: Child,
    /// `https://127.0.0.1:PORT`.
    pub endpoint: String,
    /// Its data directory.
    pub data_dir: PathBuf,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        // Its own process group: nothing else is touched.
        let pid = nix::unistd::Pid::from_raw(-(self.child.id() as i32));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl Etcd {
    /// Freezes etcd (SIGSTOP): it holds its connections and answers
    /// nothing, as a partitioned or overloaded etcd would.
    pub fn pause(&self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("stop etcd");
    }

    /// Lets a paused etcd go on (SIGCONT).
    pub fn resume(&self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).expect("continue etcd");
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
        let (client, peer) = (free_port(), free_port());
        let endpoint = format!("https://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = std::fs::File::create(bed.path().join("etcd.log")).expect("etcd's log");
        let child = Command::new("etcd")
            .args(["--name", "test", "--data-dir"])
            .arg(&data_dir)
            .args(["--listen-client-urls", &endpoint])
            .args(["--advertise-client-urls", &endpoint])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("test={peer_url}")])
            .arg("--cert-file")
            .arg(tls.join("cert.pem"))
            .arg("--key-file")
            .arg(tls.join("key.pem"))
            .arg("--trusted-ca-file")
            .arg(tls.join("ca.pem"))
            .arg("--client-cert-auth")
            .args(["--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("etcd's log"))
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("etcd (etcd-server, installed by scripts/setup.sh)");
        let etcd = Etcd {
            child,
            endpoint,
            data_dir,
        };
        let admin = bed.certificate_dir("etcd-probe", protocol::Role::Admin);
        let endpoints = cluster::Endpoints::parse(&etcd.endpoint, false).expect("endpoint");
        let files = cluster::TlsFiles { dir: admin };
        crate::wait_until(START_TIMEOUT, "etcd to answer", || async {
            cluster::Cluster::connect(&endpoints, Some(&files))
                .await
                .ok()
                .map(|_| ())
        })
        .await;
        etcd
    }
}
