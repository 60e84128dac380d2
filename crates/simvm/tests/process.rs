//! `livemig-simvm` as an agent runs it: started with QEMU's command line,
//! answering QMP on its socket, and migrating its guest to another
//! simulated VM over a real socket with every page intact.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use qmp::commands::migration::{
    Migrate, MigrateIncoming, MigrateSetParameters, MigrationParameters, MigrationStatus,
    QueryMigrate,
};
use qmp::commands::vm::{Cont, QueryStatus, QueryVersion, RunState};
use qmp::Client;

const TIMEOUT: Duration = Duration::from_secs(20);

/// A simulated VM process, killed when dropped.
struct Vm {
    child: Child,
    qmp: Client,
    serial: PathBuf,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn argv(dir: &Path, name: &str, extra: &[&str]) -> Vec<String> {
    let socket = dir.join(format!("{name}.qmp"));
    let serial = dir.join(format!("{name}.serial"));
    let mut argv: Vec<String> = [
        "-name",
        &format!("guest={name}"),
        "-machine",
        "pc-i440fx-7.2",
        "-m",
        "64",
        "-chardev",
        &format!("socket,id=qmp,path={},server=on,wait=off", socket.display()),
        "-mon",
        "chardev=qmp,mode=control",
        "-chardev",
        &format!("file,id=serial0,path={}", serial.display()),
        "-serial",
        "chardev:serial0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    argv.extend(extra.iter().map(|s| s.to_string()));
    argv
}

async fn start(dir: &Path, name: &str, extra: &[&str]) -> Vm {
    let child = Command::new(env!("CARGO_BIN_EXE_livemig-simvm"))
        .args(argv(dir, name, extra))
        .stderr(Stdio::null())
        .spawn()
        .expect("start livemig-simvm");
    let socket = dir.join(format!("{name}.qmp"));
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let qmp = loop {
        if let Ok(client) = Client::connect(&socket, TIMEOUT).await {
            break client;
        }
        assert!(tokio::time::Instant::now() < deadline, "no QMP socket");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    Vm {
        child,
        qmp,
        serial: dir.join(format!("{name}.serial")),
    }
}

fn serial(vm: &Vm) -> guest::SerialLog {
    guest::SerialLog::read(&vm.serial).expect("the serial log")
}

#[tokio::test]
async fn it_speaks_qmp_as_qemu_72_and_quits_when_told() {
    let dir = tempfile::tempdir().unwrap();
    let mut vm = start(dir.path(), "vm", &["-append", "wss=1 spin=0 report=100"]).await;

    let version = vm.qmp.execute(&QueryVersion).await.unwrap();
    assert_eq!((version.qemu.major, version.qemu.minor), (7, 2));
    assert_eq!(version.package, "livemig-simvm");
    let status = vm.qmp.execute(&QueryStatus).await.unwrap();
    assert_eq!(status.status, RunState::Running);

    let _ = vm.qmp.execute(&qmp::commands::vm::Quit).await;
    let exit = tokio::task::spawn_blocking(move || vm.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success());
}

#[test]
fn a_command_line_qemu_would_refuse_is_refused_in_its_words() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_livemig-simvm"))
        .args(argv(
            dir.path(),
            "vm",
            &["-kernel", "/nonexistent/kernel.elf"],
        ))
        .output()
        .unwrap();

    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("qemu-system-x86_64: could not load kernel '/nonexistent/kernel.elf'"),
        "{err}"
    );
}

#[tokio::test]
async fn a_busy_guest_migrates_with_every_page_intact() {
    let dir = tempfile::tempdir().unwrap();
    // 8 MiB rewritten at 64 MiB/s against 256 MiB/s: a few passes.
    let src = start(dir.path(), "src", &["-append", "wss=8 rate=64 report=100"]).await;
    let dst = start(dir.path(), "dst", &["-incoming", "defer", "-S"]).await;
    dst.qmp
        .execute(&MigrateIncoming {
            uri: "tcp:127.0.0.1:0".into(),
        })
        .await
        .unwrap();
    let port = dst
        .qmp
        .execute(&QueryMigrate)
        .await
        .unwrap()
        .socket_address
        .unwrap()[0]
        .port
        .clone()
        .unwrap();
    src.qmp
        .execute(&MigrateSetParameters(MigrationParameters {
            max_bandwidth: Some(256 << 20),
            ..Default::default()
        }))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = serial(&src).last_progress().expect("progress before");

    src.qmp
        .execute(&Migrate {
            uri: format!("tcp:127.0.0.1:{port}"),
            resume: None,
        })
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let info = src.qmp.execute(&QueryMigrate).await.unwrap();
        match info.status {
            Some(MigrationStatus::Completed) => break,
            Some(MigrationStatus::Failed) => panic!("failed: {:?}", info.error_desc),
            _ => {}
        }
        assert!(tokio::time::Instant::now() < deadline, "not completed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let landed = dst.qmp.execute(&QueryStatus).await.unwrap();
    assert_eq!(landed.status, RunState::Paused, "-S keeps it paused");
    let left = src.qmp.execute(&QueryStatus).await.unwrap();
    assert_eq!(left.status, RunState::Postmigrate);
    dst.qmp.execute(&Cont).await.unwrap();
    // Two more sweeps of the working set on the destination: every page
    // checked against what the guest last wrote on the source.
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let log = serial(&dst);
        assert!(log.memory_intact(), "{:?}", log.corruptions);
        if log
            .last_progress()
            .is_some_and(|p| p.pass >= before.pass + 3 && p.writes > before.writes)
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no progress");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

mod disks {
    use super::*;
    use qmp::commands::block::{
        BlockExportAddNbd, BlockJobCancel, BlockJobInfo, BlockdevAddNbd, BlockdevDel,
        BlockdevMirror, CopyMode, InetAddress, JobDismiss, LegacyInetAddress, MirrorSync,
        NbdServerStart, QueryBlockJobs,
    };

    const DISK: usize = 8 << 20;

    fn drive(file: &Path) -> String {
        format!(
            "file={},format=raw,if=none,id=drive-vda,node-name=disk-vda,cache=none",
            file.display()
        )
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    fn add_node(port: u16, export: &str) -> BlockdevAddNbd {
        BlockdevAddNbd {
            driver: "nbd",
            node_name: "target".into(),
            server: InetAddress::new("127.0.0.1", port),
            export: export.into(),
            tls_creds: None,
            tls_hostname: None,
        }
    }

    fn mirror(speed: u64) -> BlockdevMirror {
        BlockdevMirror {
            job_id: "copy".into(),
            device: "disk-vda".into(),
            target: "target".into(),
            sync: MirrorSync::Full,
            copy_mode: CopyMode::Background,
            auto_dismiss: false,
            speed: Some(speed),
            buf_size: Some(512 << 10),
        }
    }

    async fn job(vm: &Vm) -> BlockJobInfo {
        let jobs = vm.qmp.execute(&QueryBlockJobs).await.unwrap();
        assert_eq!(jobs.len(), 1, "{jobs:?}");
        jobs[0].clone()
    }

    async fn until(vm: &Vm, what: &str, done: impl Fn(&BlockJobInfo) -> bool) -> BlockJobInfo {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let job = job(vm).await;
            if done(&job) {
                return job;
            }
            assert!(tokio::time::Instant::now() < deadline, "{what}: {job:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A destination serving its empty image, and a source whose image
    /// holds a pattern.
    async fn pair(dir: &Path) -> (Vm, Vm, u16, Vec<u8>) {
        let pattern: Vec<u8> = (0..DISK).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(dir.join("src.raw"), &pattern).unwrap();
        std::fs::File::create(dir.join("dst.raw"))
            .unwrap()
            .set_len(DISK as u64)
            .unwrap();
        let src_drive = drive(&dir.join("src.raw"));
        let dst_drive = drive(&dir.join("dst.raw"));
        let src = start(dir, "src", &["-append", "wss=1", "-drive", &src_drive]).await;
        let dst = start(
            dir,
            "dst",
            &["-incoming", "defer", "-S", "-drive", &dst_drive],
        )
        .await;
        let port = free_port();
        dst.qmp
            .execute(&NbdServerStart {
                addr: LegacyInetAddress::new("127.0.0.1", port),
                tls_creds: None,
                tls_authz: None,
            })
            .await
            .unwrap();
        dst.qmp
            .execute(&BlockExportAddNbd {
                kind: "nbd",
                id: "vda".into(),
                node_name: "disk-vda".into(),
                name: "vda".into(),
                writable: true,
            })
            .await
            .unwrap();
        (src, dst, port, pattern)
    }

    #[tokio::test]
    async fn a_mirror_copies_the_disk_at_its_speed_and_completes_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let (src, _dst, port, pattern) = pair(dir.path()).await;

        let refused = src.qmp.execute(&add_node(free_port(), "vda")).await;
        assert!(
            refused
                .unwrap_err()
                .to_string()
                .contains("Connection refused"),
            "a server that is not there"
        );
        let unknown = src.qmp.execute(&add_node(port, "vdb")).await;
        assert!(unknown.unwrap_err().to_string().contains("not available"));

        src.qmp.execute(&add_node(port, "vda")).await.unwrap();
        // 8 MiB at 4 MiB/s: about two seconds, seen halfway.
        src.qmp.execute(&mirror(4 << 20)).await.unwrap();
        let midway = until(&src, "copying", |j| j.offset > 0).await;
        assert!(!midway.ready && midway.offset < midway.len, "{midway:?}");
        assert_eq!(midway.len, DISK as u64);
        let ready = until(&src, "ready", |j| j.ready).await;
        assert_eq!(ready.offset, ready.len);
        assert_eq!(std::fs::read(dir.path().join("dst.raw")).unwrap(), pattern);

        src.qmp
            .execute(&BlockJobCancel {
                device: "copy".into(),
                force: false,
            })
            .await
            .unwrap();
        let done = job(&src).await;
        assert_eq!(done.status.as_deref(), Some("concluded"));
        assert_eq!(done.error, None);
        src.qmp
            .execute(&JobDismiss { id: "copy".into() })
            .await
            .unwrap();
        src.qmp
            .execute(&BlockdevDel {
                node_name: "target".into(),
            })
            .await
            .unwrap();
        assert!(src.qmp.execute(&QueryBlockJobs).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_mirror_fails_with_an_io_error_when_the_destination_dies() {
        let dir = tempfile::tempdir().unwrap();
        let (src, dst, port, _) = pair(dir.path()).await;
        src.qmp.execute(&add_node(port, "vda")).await.unwrap();
        src.qmp.execute(&mirror(1 << 20)).await.unwrap();
        until(&src, "copying", |j| j.offset > 0).await;
        let busy = src
            .qmp
            .execute(&BlockdevDel {
                node_name: "target".into(),
            })
            .await;
        assert!(busy.unwrap_err().to_string().contains("busy"));

        drop(dst);
        let failed = until(&src, "failed", |j| j.status.as_deref() == Some("concluded")).await;
        assert_eq!(failed.error.as_deref(), Some("Input/output error"));
        assert!(!failed.ready && failed.offset < failed.len, "{failed:?}");
    }
}
