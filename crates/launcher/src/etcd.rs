//! Running etcd (Debian's `etcd-server`) as a child process for a demo, a
//! benchmark or a test: its own data directory, clients served over mutual
//! TLS on one address, in a process group of its own that dropping the
//! [`EtcdProcess`] kills (by PID).

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// How to start etcd.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// Its data directory.
    pub data_dir: PathBuf,
    /// A TLS directory (ca.pem, cert.pem, key.pem) whose certificate names
    /// `host`; clients must present a certificate from the same CA.
    pub tls_dir: PathBuf,
    /// The address it serves clients on.
    pub host: String,
    /// Where its output goes.
    pub log: PathBuf,
}

/// A running etcd.
#[derive(Debug)]
pub struct EtcdProcess {
    child: Child,
    options: EtcdOptions,
    ports: (u16, u16),
    /// `https://HOST:PORT`.
    pub endpoint: String,
}

fn free_port(host: &str) -> std::io::Result<u16> {
    std::net::TcpListener::bind((host, 0))?
        .local_addr()
        .map(|a| a.port())
}

impl EtcdProcess {
    /// Starts etcd on free ports of `options.host`; it answers a moment
    /// later.
    ///
    /// # Errors
    /// No free port, or etcd is not installed.
    pub fn spawn(options: &EtcdOptions) -> std::io::Result<EtcdProcess> {
        let ports = (free_port(&options.host)?, free_port(&options.host)?);
        let child = Self::child(options, ports)?;
        Ok(EtcdProcess {
            child,
            options: options.clone(),
            ports,
            endpoint: format!("https://{}:{}", options.host, ports.0),
        })
    }

    /// Kills it (SIGKILL, as a crash would) and starts it again on the same
    /// data directory and ports.
    ///
    /// # Errors
    /// It cannot be started again.
    pub fn restart(&mut self) -> std::io::Result<()> {
        self.kill();
        self.child = Self::child(&self.options, self.ports)?;
        Ok(())
    }

    /// Kills it (SIGKILL); [`EtcdProcess::restart`] brings it back.
    pub fn kill(&mut self) {
        let pid = nix::unistd::Pid::from_raw(-(self.child.id() as i32));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.wait();
    }

    fn child(options: &EtcdOptions, (client, peer): (u16, u16)) -> std::io::Result<Child> {
        let endpoint = format!("https://{}:{client}", options.host);
        let peer_url = format!("http://{}:{peer}", options.host);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&options.log)?;
        let tls = &options.tls_dir;
        Command::new("etcd")
            .args(["--name", "livemig", "--data-dir"])
            .arg(&options.data_dir)
            .args(["--listen-client-urls", &endpoint])
            .args(["--advertise-client-urls", &endpoint])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("livemig={peer_url}")])
            .arg("--cert-file")
            .arg(tls.join("cert.pem"))
            .arg("--key-file")
            .arg(tls.join("key.pem"))
            .arg("--trusted-ca-file")
            .arg(tls.join("ca.pem"))
            .arg("--client-cert-auth")
            .args(["--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
    }

    /// Its PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Freezes it (SIGSTOP): it holds its connections and answers nothing.
    pub fn pause(&self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP);
    }

    /// Lets a frozen etcd go on (SIGCONT).
    pub fn resume(&self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
    }
}

impl Drop for EtcdProcess {
    fn drop(&mut self) {
        // Its own process group: nothing else is touched.
        self.kill();
    }
}
