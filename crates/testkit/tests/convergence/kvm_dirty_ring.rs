//! The writers read off KVM's dirty ring: a real QEMU under KVM with a
//! ring (`dirty_ring` in the definition) gives each vCPU's dirty rate, and
//! the writers' search names the vCPU that writes from it, probing none.
//! Without a ring KVM's QEMU refuses the measurement, which sends the
//! search to its probes. Its own test binary: the suite's only KVM guest.
//!
//! The guest is the in-tree test kernel, which runs on vCPU 0 and leaves
//! vCPU 1 halted, without timer interrupts (`timer=0`: this machine's
//! nested KVM fails to emulate their `iret`; Debian's kernel does not get
//! past its early boot there). Measured outside a migration: with dirty
//! logging on for one, every first write to a page costs this nested KVM
//! an exit through two hypervisors, and the guest dirties next to nothing
//! (0–18 MiB/s with a 16 MiB working set), too little to need its writers
//! found. That a computing vCPU is told from a writer by its rate is the
//! unit tests' (`writers`).

use std::path::Path;
use std::time::Duration;

use domain::qemu::{build_argv, LaunchConfig, LaunchSpec, RamLayout, VmProcess};
use domain::DomainDefinition;
use guest::{SerialLog, Workload};
use migration::dirty::{per_vcpu, MeasureError};
use migration::vcpu_throttle::writers::from_dirty_rates;
use types::{Accel, MIB};

const QEMU: &str = "qemu-system-x86_64";
const TIMEOUT: Duration = Duration::from_secs(20);

const SWEEP: Workload = Workload {
    working_set_mib: 32,
    spin: 0,
    report_ms: 500,
};

fn kvm_available() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// The test guest with two vCPUs sweeping on vCPU 0, under `accel`
/// (with a dirty ring of `ring` entries).
async fn start(dir: &Path, accel: Accel, ring: Option<u32>) -> VmProcess {
    let kernel = guest::install_kernel(dir).unwrap();
    let mut def = DomainDefinition::from_toml(&format!(
        "name = \"t\"\nmemory_mib = 128\nvcpus = 2\n[kernel]\npath = {:?}\ncmdline = {:?}\n",
        kernel,
        format!("{} timer=0", SWEEP.cmdline()),
    ))
    .unwrap();
    def.accel = accel;
    def.dirty_ring = ring;
    def.validate().expect("a valid definition");
    let spec = LaunchSpec {
        machine: "pc".into(),
        accel,
        ram: RamLayout::plain(def.memory_mib),
    };
    let socket = dir.join("qmp.sock");
    let argv = build_argv(&LaunchConfig {
        definition: &def,
        spec: &spec,
        qmp_socket: &socket,
        serial_log: &dir.join("serial.log"),
        incoming: false,
        taps: &[],
        hardening: Default::default(),
    });
    let qemu = VmProcess::spawn(
        Path::new(QEMU),
        &argv,
        &socket,
        &dir.join("qemu.log"),
        TIMEOUT,
    )
    .await
    .unwrap();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let log = SerialLog::read(&dir.join("serial.log")).unwrap();
        if log.progress.len() >= 2 {
            assert!(log.memory_intact(), "{:?}", log.corruptions);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no guest progress: {log:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    qemu
}

#[tokio::test]
async fn kvms_dirty_ring_names_the_vcpu_that_writes() {
    assert!(
        kvm_available(),
        "this test needs KVM (/dev/kvm, read-write)"
    );
    let dir = tempfile::tempdir().unwrap();
    let qemu = start(dir.path(), Accel::Kvm, Some(4096)).await;

    let rates = per_vcpu(qemu.qmp()).await.expect("per-vCPU dirty rates");
    assert_eq!(rates.len(), 2, "{rates:?}");
    assert!(rates[0] >= 16.0 * MIB as f64, "vCPU 0 sweeps: {rates:?}");
    assert_eq!(rates[1], 0.0, "vCPU 1 is halted: {rates:?}");

    // As the search reads them against a 16 MiB/s link (vCPU 0 busy,
    // vCPU 1 idle).
    let found = from_dirty_rates(&rates, &[1.0, 0.0], 16.0 * MIB as f64).unwrap();
    assert_eq!(found.writers, [0]);
    let text = found.describe();
    assert!(
        text.starts_with("vCPU 0 writes: only it is throttled") && text.contains("dirty ring"),
        "{text}"
    );
}

#[tokio::test]
async fn without_a_ring_qemu_refuses_and_the_search_probes_instead() {
    assert!(
        kvm_available(),
        "this test needs KVM (/dev/kvm, read-write)"
    );
    let dir = tempfile::tempdir().unwrap();
    // KVM without a ring. (Under TCG, QEMU 7.2 aborts on the request
    // instead: the agent asks only guests defined with a ring, which
    // must be KVM's.)
    let qemu = start(dir.path(), Accel::Kvm, None).await;
    match per_vcpu(qemu.qmp()).await {
        Err(MeasureError::Start(e)) => {
            assert!(e.to_string().contains("dirty-ring"), "{e}")
        }
        other => panic!("expected QEMU's refusal, got {other:?}"),
    }
}
