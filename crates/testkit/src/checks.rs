//! What a user checks after a migration: exactly one copy of the guest
//! runs, where it should, making progress with its memory intact, and
//! nothing is left behind.

use std::time::Duration;

use protocol::domain::DomainState;

use crate::{wait_until, Host};

/// How long the host that gave up a guest may take to clean up.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(60);

/// Exactly one copy of `name` runs, on `on`: it is running there, with one
/// QEMU, its progress counter keeps growing, and its own memory check finds
/// nothing wrong after `passes` more sweeps of its working set; `off` has
/// no copy and no QEMU left.
pub async fn assert_runs_only_on(name: &str, on: &Host, off: &Host, passes: u64) {
    wait_until(CLEANUP_TIMEOUT, "the other host to clean up", || async {
        off.qemu_pids().is_empty().then_some(())
    })
    .await;
    assert_eq!(
        on.state(name).await,
        Some(DomainState::Running),
        "state on {}",
        on.name
    );
    let off_state = off.state(name).await;
    assert!(
        matches!(off_state, None | Some(DomainState::ShutOff)),
        "on {} the domain is {off_state:?}",
        off.name
    );
    assert_eq!(on.qemu_pids().len(), 1, "exactly one QEMU on {}", on.name);
    let before = on
        .wait_guest_progress(name, 1)
        .await
        .last_progress()
        .expect("a progress line");
    let log = on.wait_guest_passes(name, passes).await;
    let after = log.last_progress().expect("a progress line");
    assert!(
        after.writes > before.writes,
        "guest progress stalled on {}",
        on.name
    );
    assert!(
        log.memory_intact(),
        "guest memory corrupted on {}: {:?}",
        on.name,
        log.corruptions
    );
}

/// No run record, QMP socket or temporary file without a running QEMU.
pub fn assert_no_leftovers(host: &Host) {
    let run = host.state_dir().join("run");
    let running = !host.qemu_pids().is_empty();
    for entry in std::fs::read_dir(&run)
        .expect("the run directory")
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        assert!(
            running,
            "{}: {name} left in run/ with no QEMU running",
            host.name
        );
    }
    for dir in ["domains", "run"] {
        for entry in std::fs::read_dir(host.state_dir().join(dir))
            .expect("a state subdirectory")
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            assert!(
                !name.contains(".tmp."),
                "{}: temporary file {dir}/{name}",
                host.name
            );
        }
    }
}
