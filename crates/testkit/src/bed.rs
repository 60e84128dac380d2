//! The test bed: a directory with the guest kernel and a CA, from which
//! hosts are started.

use std::path::{Path, PathBuf};

use domain::hypervisor::HypervisorKind;
use domain::DomainDefinition;
use guest::linux::{self, LinuxImage, LinuxWorkload};
use guest::Workload;
use launcher::LaunchOptions;
use tokio::sync::{Mutex, MutexGuard};

use crate::bin;
use crate::host::{AgentKind, Host};
use crate::netns::NetnsPair;

static SERIAL: Mutex<()> = Mutex::const_new(());

/// A per-test directory with the guest kernel; hosts live inside it.
#[derive(Debug)]
pub struct TestBed {
    dir: tempfile::TempDir,
    kernel: PathBuf,
    /// The bed's CA: agents and test clients get certificates from it.
    pki: PathBuf,
    /// How `host` and `two_hosts_running` run their agents.
    agents: AgentKind,
    /// What runs the guests of every host of the bed.
    hypervisor: HypervisorKind,
    /// `--timeout` settings of every agent the bed starts from now on.
    timeouts: Vec<String>,
    /// Held by beds of real guests: they take the machine's cores.
    _serial: Option<MutexGuard<'static, ()>>,
}

impl TestBed {
    /// Waits for any other test bed in this process to finish, then makes
    /// a fresh directory. Its plain hosts (`host`, `two_hosts_running`)
    /// serve their agents in-process; hosts with flags or in a network
    /// namespace are `livemigd` processes.
    pub async fn new() -> TestBed {
        Self::with(AgentKind::InProcess, HypervisorKind::Qemu).await
    }

    /// A bed whose every agent is a `livemigd` process: for tests that
    /// crash an agent or measure its process.
    pub async fn with_agent_processes() -> TestBed {
        Self::with(AgentKind::Process, HypervisorKind::Qemu).await
    }

    /// A bed whose hosts run simulated VMs (`livemig-simvm`): for tests
    /// whose subject is the agent, the CLI or the protocol. Such beds take
    /// little CPU, so they do not wait for one another.
    pub async fn simulated() -> TestBed {
        Self::with(AgentKind::InProcess, HypervisorKind::Simulated).await
    }

    /// A bed of simulated VMs whose every agent is a `livemigd` process.
    pub async fn simulated_with_agent_processes() -> TestBed {
        Self::with(AgentKind::Process, HypervisorKind::Simulated).await
    }

    /// A bed of `agents` whose guests run on `hypervisor`.
    pub async fn with(agents: AgentKind, hypervisor: HypervisorKind) -> TestBed {
        let serial = match hypervisor {
            HypervisorKind::Qemu => Some(SERIAL.lock().await),
            HypervisorKind::Simulated => None,
        };
        let mut dir = tempfile::Builder::new()
            .prefix("livemig-test-")
            .tempdir()
            .expect("temporary directory");
        if std::env::var_os("LIVEMIG_TEST_KEEP").is_some() {
            // Agent and guest logs, for a look after the test.
            dir.disable_cleanup(true);
            eprintln!("test directory kept: {}", dir.path().display());
        }
        let images = dir.path().join("images");
        std::fs::create_dir(&images).expect("the bed's image directory");
        let kernel = guest::install_kernel(&images).expect("install the guest kernel");
        let pki = dir.path().join("pki");
        tls::pki::init(&pki).expect("the test bed's CA");
        TestBed {
            dir,
            kernel,
            pki,
            agents,
            hypervisor,
            timeouts: Vec::new(),
            _serial: serial,
        }
    }

    /// What runs the bed's guests.
    pub fn hypervisor(&self) -> HypervisorKind {
        self.hypervisor
    }

    /// Gives every agent the bed starts from now on these timeouts
    /// (`NAME=DURATION`, as `livemigd --timeout` takes them), so a test
    /// need not wait out production values.
    pub fn with_timeouts(mut self, settings: &[&str]) -> TestBed {
        self.timeouts = settings.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Where the bed's agents take images from (`--image-dir`).
    pub fn images(&self) -> PathBuf {
        self.dir.path().join("images")
    }

    /// The bed's directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The guest kernel installed in it.
    pub fn kernel(&self) -> &Path {
        &self.kernel
    }

    /// A certificate from the bed's CA for `name` with `role`, valid for
    /// `hosts`: a TLS directory (`--tls-dir`).
    pub fn certificate(&self, name: &str, role: protocol::Role, hosts: &[&str]) -> PathBuf {
        let hosts: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
        tls::pki::issue(&self.pki, name, role, &hosts).expect("issue a test certificate")
    }

    /// A certificate for a client `name` with `role`, issued once: the
    /// same directory on later calls.
    pub fn certificate_dir(&self, name: &str, role: protocol::Role) -> PathBuf {
        let dir = self.pki.join(name);
        if dir.exists() {
            dir
        } else {
            self.certificate(name, role, &[])
        }
    }

    /// Starts an agent listening on loopback (mutual TLS).
    pub async fn host(&self, name: &str) -> Host {
        self.launch(name, Some("tls://127.0.0.1:0".into()), None, &[], None)
            .await
    }

    /// Starts an agent with explicit listen address and namespace.
    pub async fn host_with(
        &self,
        name: &str,
        listen: Option<String>,
        netns: Option<String>,
    ) -> Host {
        self.launch(name, listen, netns, &[], None).await
    }

    /// Two hosts on loopback, `a` and `b`, with the test guest `name`
    /// (`memory_mib` of RAM, running `workload`) started on `a`.
    pub async fn two_hosts_running(
        &self,
        name: &str,
        memory_mib: u32,
        workload: Workload,
    ) -> (Host, Host) {
        self.two_hosts_running_args(name, memory_mib, workload, &[])
            .await
    }

    /// As [`TestBed::two_hosts_running`], with `b` started with extra
    /// `livemigd` arguments.
    pub async fn two_hosts_running_args(
        &self,
        name: &str,
        memory_mib: u32,
        workload: Workload,
        b_args: &[&str],
    ) -> (Host, Host) {
        let a = self.host("a").await;
        let b = self.host_args("b", b_args).await;
        a.define_and_start(self.definition(name, memory_mib, workload))
            .await;
        (a, b)
    }

    /// Two hosts in two fresh network namespaces joined by a veth pair,
    /// each agent listening on its namespace's address. `tag` keeps the
    /// namespace names apart.
    pub async fn hosts_in_namespaces(&self, tag: &str) -> (NetnsPair, Host, Host) {
        let net = NetnsPair::create(tag).expect("network namespaces (needs root and iproute2)");
        self.hosts_in(net).await
    }

    /// As [`TestBed::hosts_in_namespaces`], each namespace with a bridge
    /// `br0` on one L2 segment ([`NetnsPair::create_bridged`]).
    pub async fn hosts_on_one_segment(&self, tag: &str) -> (NetnsPair, Host, Host) {
        let net = NetnsPair::create_bridged(tag)
            .expect("bridged network namespaces (needs root and iproute2)");
        self.hosts_in(net).await
    }

    async fn hosts_in(&self, net: NetnsPair) -> (NetnsPair, Host, Host) {
        let a = self
            .host_with(
                "a",
                Some(format!("tls://{}:0", net.a_ip)),
                Some(net.a.clone()),
            )
            .await;
        let b = self
            .host_with(
                "b",
                Some(format!("tls://{}:0", net.b_ip)),
                Some(net.b.clone()),
            )
            .await;
        (net, a, b)
    }

    /// Starts an agent on loopback with extra `livemigd` arguments.
    pub async fn host_args(&self, name: &str, args: &[&str]) -> Host {
        self.launch(name, Some("tls://127.0.0.1:0".into()), None, args, None)
            .await
    }

    /// Starts an agent on loopback that takes images only from
    /// `image_dirs` (not the bed's).
    pub async fn host_with_image_dirs(&self, name: &str, image_dirs: Vec<PathBuf>) -> Host {
        self.launch(
            name,
            Some("tls://127.0.0.1:0".into()),
            None,
            &[],
            Some(image_dirs),
        )
        .await
    }

    /// The path at which every host with local storage sees its own
    /// (see [`TestBed::hosts_with_local_storage`]).
    pub fn local(&self) -> PathBuf {
        self.dir.path().join("local")
    }

    /// What host `name` sees at [`TestBed::local`], as the test sees it.
    pub fn local_of(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("local-{name}"))
    }

    /// Two agents `a` and `b`, each with storage of its own at
    /// [`TestBed::local`] (a bind mount in the agent's mount namespace;
    /// [`TestBed::local_of`] from the test), as two hosts with local disks
    /// at the same paths; in `net`'s namespaces if given.
    pub async fn hosts_with_local_storage(&self, net: Option<&NetnsPair>) -> (Host, Host) {
        std::fs::create_dir_all(self.local()).expect("the local storage mount point");
        let mut hosts = Vec::new();
        for name in ["a", "b"] {
            std::fs::create_dir_all(self.local_of(name)).expect("a host's local storage");
            let (listen, netns) = match net {
                Some(net) => {
                    let (ip, ns) = if name == "a" {
                        (&net.a_ip, &net.a)
                    } else {
                        (&net.b_ip, &net.b)
                    };
                    (format!("tls://{ip}:0"), Some(ns.clone()))
                }
                None => ("tls://127.0.0.1:0".to_string(), None),
            };
            let mut options = self.options(
                name,
                Some(listen),
                netns,
                &[],
                Some(vec![self.images(), self.local()]),
            );
            options.private_dirs = vec![(self.local_of(name), self.local())];
            hosts.push(Host::start(options, AgentKind::Process).await);
        }
        let b = hosts.pop().expect("b");
        let a = hosts.pop().expect("a");
        (a, b)
    }

    /// An agent `name` on loopback with `args`, and storage of its own at
    /// [`TestBed::local`] as in [`TestBed::hosts_with_local_storage`].
    pub async fn host_with_local_storage(&self, name: &str, args: &[&str]) -> Host {
        std::fs::create_dir_all(self.local()).expect("the local storage mount point");
        std::fs::create_dir_all(self.local_of(name)).expect("a host's local storage");
        let mut options = self.options(
            name,
            Some("tls://127.0.0.1:0".into()),
            None,
            args,
            Some(vec![self.images(), self.local()]),
        );
        options.private_dirs = vec![(self.local_of(name), self.local())];
        Host::start(options, AgentKind::Process).await
    }

    async fn launch(
        &self,
        name: &str,
        listen: Option<String>,
        netns: Option<String>,
        args: &[&str],
        image_dirs: Option<Vec<PathBuf>>,
    ) -> Host {
        let kind = if netns.is_some() || !args.is_empty() {
            AgentKind::Process
        } else {
            self.agents
        };
        Host::start(self.options(name, listen, netns, args, image_dirs), kind).await
    }

    fn options(
        &self,
        name: &str,
        listen: Option<String>,
        netns: Option<String>,
        args: &[&str],
        image_dirs: Option<Vec<PathBuf>>,
    ) -> LaunchOptions {
        // An agent on tls:// gets a certificate naming the address it
        // listens on.
        let tls_dir = listen
            .as_deref()
            .and_then(|l| l.strip_prefix("tls://"))
            .and_then(|rest| rest.rsplit_once(':'))
            .map(|(host, _)| {
                self.certificate(&format!("agent-{name}"), protocol::Role::Agent, &[host])
            });
        LaunchOptions {
            binary: bin("livemigd"),
            state_dir: self.dir.path().join(name),
            listen,
            tls_dir,
            netns,
            image_dirs: image_dirs.unwrap_or_else(|| vec![self.images()]),
            // Tests look inside QEMU (Host::qmp); production agents keep
            // raw QMP off.
            extra_args: std::iter::once("--allow-qemu-monitor-command")
                .chain(args.iter().copied())
                .map(str::to_string)
                .chain(self.hypervisor_args(args))
                .chain(
                    self.timeouts
                        .iter()
                        .flat_map(|t| ["--timeout".to_string(), t.clone()]),
                )
                .collect(),
            private_dirs: Vec::new(),
        }
    }

    /// The flags that give an agent the bed's hypervisor (with the
    /// simulation's program, unless the test names another in `args`).
    fn hypervisor_args(&self, args: &[&str]) -> Vec<String> {
        match self.hypervisor {
            HypervisorKind::Qemu => Vec::new(),
            HypervisorKind::Simulated => {
                let mut flags = vec!["--hypervisor".to_string(), "simulated".into()];
                if !args.contains(&"--qemu") {
                    flags.push("--qemu".into());
                    flags.push(self.simulated_program().display().to_string());
                }
                flags
            }
        }
    }

    /// The simulated VM's program.
    pub fn simulated_program(&self) -> PathBuf {
        bin(domain::hypervisor::SIMULATED_PROGRAM)
    }

    /// The Linux test guest's kernel and initrd, built into the bed's
    /// image directory (once).
    pub fn linux_image(&self) -> LinuxImage {
        let image = LinuxImage {
            kernel: self.images().join("linux-vmlinuz"),
            initrd: self.images().join("linux-initrd.img"),
        };
        if image.kernel.exists() && image.initrd.exists() {
            return image;
        }
        let parts = linux::Parts::installed(&crate::linux_workload())
            .unwrap_or_else(|e| panic!("the Linux test guest: {e}"));
        linux::build(&parts, &self.images()).unwrap_or_else(|e| panic!("the Linux test guest: {e}"))
    }

    /// A definition of the Linux test guest doing `workload`, with
    /// `devices` (TOML: `[[disks]]`, `[[nics]]`) appended.
    pub fn linux_definition(
        &self,
        name: &str,
        memory_mib: u32,
        workload: &LinuxWorkload,
        devices: &str,
    ) -> DomainDefinition {
        let image = self.linux_image();
        DomainDefinition::from_toml(&format!(
            "name = \"{name}\"\nmemory_mib = {memory_mib}\n[kernel]\npath = {:?}\ninitrd = {:?}\n\
             cmdline = {:?}\n{devices}",
            image.kernel.display().to_string(),
            image.initrd.display().to_string(),
            workload.cmdline(),
        ))
        .expect("valid Linux guest definition")
    }

    /// A fresh disk image of `size_mib` in the bed's image directory
    /// (`qemu-img create`), `format` "raw" or "qcow2".
    pub fn disk_image(&self, file: &str, size_mib: u32, format: &str) -> PathBuf {
        let path = self.images().join(file);
        create_image(&path, size_mib, format);
        path
    }

    /// A definition of the test guest.
    pub fn definition(&self, name: &str, memory_mib: u32, workload: Workload) -> DomainDefinition {
        DomainDefinition::from_toml(&guest::definition_toml(
            name,
            memory_mib,
            &self.kernel,
            workload,
        ))
        .expect("valid test definition")
    }
}

/// `qemu-img create -f FORMAT PATH SIZE_MIB M`.
pub fn create_image(path: &Path, size_mib: u32, format: &str) {
    let out = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", format])
        .arg(path)
        .arg(format!("{size_mib}M"))
        .output()
        .expect("run qemu-img (qemu-utils)");
    assert!(
        out.status.success(),
        "qemu-img create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
