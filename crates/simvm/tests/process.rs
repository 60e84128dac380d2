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
