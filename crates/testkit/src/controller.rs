//! A `livemig-controller` for a test: an administrator's certificate from
//! the bed, the test's etcd, a short lease; killed (its process group, by
//! PID) when dropped.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};

use crate::etcd::Etcd;
use crate::{bin, TestBed};

/// A running controller.
#[derive(Debug)]
pub struct Controller {
    child: Option<Child>,
    /// Its name in the election.
    pub name: String,
}

impl Controller {
    /// Starts controller `name` for the cluster at `etcd`, with `args`
    /// besides (`--lease 2`, caps).
    pub fn start(bed: &TestBed, etcd: &Etcd, name: &str, args: &[&str]) -> Controller {
        let admin = bed.certificate_dir(&format!("controller-{name}"), protocol::Role::Admin);
        let log = std::fs::File::create(bed.path().join(format!("controller-{name}.log")))
            .expect("the controller's log");
        let child = Command::new(bin("livemig-controller"))
            .args(["--cluster", &etcd.endpoint, "--tls-dir"])
            .arg(&admin)
            .args(["--name", name])
            .args(args)
            .env("RUST_LOG", "info,fleet=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("the controller's log"))
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("livemig-controller");
        Controller {
            child: Some(child),
            name: name.to_string(),
        }
    }

    /// Kills it without a word (SIGKILL): its leadership lasts until its
    /// lease runs out.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(-(child.id() as i32));
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = child.wait();
        }
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.kill();
    }
}
