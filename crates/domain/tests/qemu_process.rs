//! Probing the installed QEMU and running the test guest under it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use domain::qemu::{
    build_argv, probe, LaunchConfig, LaunchSpec, ProcessError, RamLayout, VmProcess,
};
use domain::DomainDefinition;
use guest::{SerialLog, Workload};
use qmp::commands::vm::{QueryStatus, RunState};

const QEMU: &str = "qemu-system-x86_64";
const TIMEOUT: Duration = Duration::from_secs(20);

fn definition(dir: &Path, workload: Workload) -> DomainDefinition {
    let kernel = guest::install_kernel(dir).unwrap();
    DomainDefinition::from_toml(&format!(
        "name = \"t\"\nmemory_mib = 64\n[kernel]\npath = {:?}\ncmdline = {:?}\n",
        kernel,
        workload.cmdline()
    ))
    .unwrap()
}

async fn wait_for_progress(log: &Path, lines: usize) -> SerialLog {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let parsed = SerialLog::read(log).unwrap();
        if parsed.progress.len() >= lines {
            return parsed;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no guest progress: {parsed:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn probe_finds_auto_converge_and_resolves_the_pc_alias() {
    let binary = probe(Path::new(QEMU), TIMEOUT).await.unwrap();
    assert!(binary.has_capability("auto-converge"));
    assert!(binary.has_parameter("cpu-throttle-initial"));
    assert!(binary.has_command("query-migrate"));
    let pc = binary.resolve_machine("pc").expect("pc alias");
    assert!(pc.starts_with("pc-i440fx-"), "{pc}");
    assert_eq!(binary.resolve_machine("no-such-machine"), None);
}

#[tokio::test]
async fn guest_runs_and_reports_progress_with_the_workaround_layout() {
    let dir = tempfile::tempdir().unwrap();
    let def = definition(dir.path(), Workload::busy(8, 1000));
    let binary = probe(Path::new(QEMU), TIMEOUT).await.unwrap();
    let spec = LaunchSpec {
        machine: binary.resolve_machine("pc").unwrap(),
        accel: def.accel,
        ram: RamLayout::for_domain(def.memory_mib, def.accel, binary.version),
    };
    let qemu = spawn(dir.path(), &def, &spec).await;
    let serial = dir.path().join("serial.log");
    let status = qemu.qmp().execute(&QueryStatus).await.unwrap();
    assert_eq!(status.status, RunState::Running);
    let log = wait_for_progress(&serial, 2).await;
    assert!(log.memory_intact());
    assert!(log.last_progress().unwrap().writes > 0);
    let exit = qemu.shutdown(TIMEOUT).await.expect("QEMU exits on quit");
    assert_eq!(exit.code, Some(0));
}

#[tokio::test]
async fn a_bad_command_line_fails_with_qemus_own_message() {
    let dir = tempfile::tempdir().unwrap();
    let err = VmProcess::spawn(
        Path::new(QEMU),
        &["-machine".into(), "no-such-machine".into()],
        &dir.path().join("qmp.sock"),
        &dir.path().join("qemu.log"),
        TIMEOUT,
    )
    .await
    .unwrap_err();
    match err {
        ProcessError::EarlyExit { log_tail, .. } => {
            assert!(log_tail.contains("unsupported machine type"), "{log_tail}")
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn a_missing_binary_is_reported() {
    let err = probe(&PathBuf::from("/nonexistent/qemu"), TIMEOUT)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("/nonexistent/qemu"), "{err}");
}

#[tokio::test]
async fn dropping_the_process_kills_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let qemu = start_guest(dir.path(), Workload::IDLE).await;
    let pid = qemu.pid();
    let mut exit = qemu.exit_watch();
    drop(qemu);
    tokio::time::timeout(TIMEOUT, exit.wait_for(Option::is_some))
        .await
        .expect("QEMU reaped")
        .unwrap();
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
}

/// The test guest under QEMU's `pc` machine, plain RAM layout.
async fn start_guest(dir: &Path, workload: Workload) -> VmProcess {
    let def = definition(dir, workload);
    let spec = LaunchSpec {
        machine: "pc".into(),
        accel: def.accel,
        ram: RamLayout::plain(def.memory_mib),
    };
    spawn(dir, &def, &spec).await
}

/// `def` under QEMU as `spec` lays it out, its files in `dir`.
async fn spawn(dir: &Path, def: &DomainDefinition, spec: &LaunchSpec) -> VmProcess {
    let socket = dir.join("qmp.sock");
    let argv = build_argv(&LaunchConfig {
        definition: def,
        spec,
        qmp_socket: &socket,
        serial_log: &dir.join("serial.log"),
        incoming: false,
        taps: &[],
        hardening: Default::default(),
    });
    VmProcess::spawn(
        Path::new(QEMU),
        &argv,
        &socket,
        &dir.join("qemu.log"),
        TIMEOUT,
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn calc_dirty_rate_sees_a_busy_guest_and_not_an_idle_one() {
    use qmp::commands::dirty_rate::{CalcDirtyRate, DirtyRateStatus, QueryDirtyRate};

    async fn measure(workload: Workload) -> i64 {
        let dir = tempfile::tempdir().unwrap();
        let qemu = start_guest(dir.path(), workload).await;
        wait_for_progress(&dir.path().join("serial.log"), 1).await;
        qemu.qmp()
            .execute(&CalcDirtyRate {
                calc_time: 1,
                sample_pages: None,
                mode: None,
            })
            .await
            .unwrap();
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let info = qemu.qmp().execute(&QueryDirtyRate).await.unwrap();
            if info.status == DirtyRateStatus::Measured {
                return info.dirty_rate.unwrap();
            }
            assert!(tokio::time::Instant::now() < deadline, "no measurement");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // Page sampling can only see a rate up to (dirtied share of RAM) x RAM
    // per second, so the working set covers most of the 64 MiB.
    let busy = measure(Workload::busy(48, 0)).await;
    let idle = measure(Workload::IDLE).await;
    eprintln!("dirty rate: busy {busy} MiB/s, idle {idle} MiB/s");
    assert!(busy >= 16, "busy guest dirty rate {busy} MiB/s");
    assert!(idle * 4 < busy, "idle {idle} MiB/s vs busy {busy} MiB/s");
}

#[tokio::test]
async fn query_cpus_fast_reports_a_host_thread_per_vcpu() {
    use qmp::commands::vm::QueryCpusFast;

    let dir = tempfile::tempdir().unwrap();
    let qemu = start_guest(dir.path(), Workload::IDLE).await;
    let cpus = qemu.qmp().execute(&QueryCpusFast).await.unwrap();
    assert_eq!(cpus.len(), 1);
    let tid = cpus[0].thread_id;
    assert!(
        Path::new(&format!("/proc/{}/task/{tid}", qemu.pid())).exists(),
        "vCPU thread {tid} is a thread of QEMU {}",
        qemu.pid()
    );
}
