//! Starting a domain's QEMU, and noticing when it exits.

use std::sync::Arc;

use domain::qemu::{build_argv, Hardening, LaunchConfig, LaunchSpec, QemuBinary, RamLayout};
use domain::{DomainDefinition, DomainName};
use protocol::{ApiError, ErrorCode};

use crate::errors;
use crate::running::RunningVm;
use crate::state::Agent;
use crate::taps::Taps;

/// Unix socket paths are limited to 107 bytes.
const MAX_SOCKET_PATH: usize = 107;

/// The launch spec for a fresh start on this host.
pub(crate) fn spec_for(
    def: &DomainDefinition,
    binary: &QemuBinary,
    host: &str,
    tcg_workaround: bool,
) -> Result<LaunchSpec, ApiError> {
    let machine = binary.resolve_machine(&def.machine).ok_or_else(|| {
        ApiError::new(
            ErrorCode::Unsupported,
            format!(
                "machine type '{}' is not supported by the QEMU binary on {host}",
                def.machine
            ),
        )
    })?;
    Ok(LaunchSpec {
        machine,
        accel: def.accel,
        ram: if tcg_workaround {
            RamLayout::for_domain(def.memory_mib, def.accel, binary.version)
        } else {
            RamLayout::plain(def.memory_mib)
        },
    })
}

/// Checks that a spec decided elsewhere (by a migration source) can run here.
pub(crate) fn check_spec(
    spec: &LaunchSpec,
    binary: &QemuBinary,
    host: &str,
    tcg_workaround: bool,
) -> Result<(), ApiError> {
    if binary.resolve_machine(&spec.machine).as_deref() != Some(spec.machine.as_str()) {
        return Err(ApiError::new(
            ErrorCode::Unsupported,
            format!(
                "machine type '{}' is not supported by the QEMU binary on {host}",
                spec.machine
            ),
        ));
    }
    // A destination with the bug must use the workaround layout too; the
    // source's layout is only safe if it avoids the buggy path.
    if tcg_workaround
        && binary.has_tcg_dirty_bitmap_bug(spec.accel)
        && !spec.ram.avoids_tcg_dirty_bitmap_bug()
    {
        return Err(ApiError::new(
            ErrorCode::Unsupported,
            format!(
                "QEMU {} on {host} loses guest writes when receiving a TCG migration into a RAM \
                 block on the 64-page grid; start the domain on a source that applies the \
                 RAM-layout workaround",
                binary.version
            ),
        ));
    }
    Ok(())
}

/// Starts QEMU for `def` with `spec`.
pub(crate) async fn launch(
    agent: &Arc<Agent>,
    def: &DomainDefinition,
    spec: &LaunchSpec,
    incoming: bool,
    paused: bool,
) -> Result<Arc<RunningVm>, ApiError> {
    // Checked again at start: a definition saved before the rules changed,
    // or a file replaced by a link since.
    agent.check_paths(def).await?;
    let binary = agent.binary().await?;
    let binary = binary.as_ref();
    let name = &def.name;
    let qmp_socket = agent.store.run_dir().join(format!("{name}.qmp"));
    if qmp_socket.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(errors::invalid(format!(
            "state directory path is too long for a unix socket: {}",
            qmp_socket.display()
        )));
    }
    let serial_log = def
        .serial
        .log
        .clone()
        .unwrap_or_else(|| agent.store.logs_dir().join(format!("{name}.serial.log")));
    // A log in the domain's own directory (see `domain::confine`): QEMU
    // creates the file, not the directory.
    let own_dir = agent.store.logs_dir().join(name.as_str());
    if serial_log.parent() == Some(own_dir.as_path()) {
        tokio::fs::create_dir_all(&own_dir).await.map_err(|e| {
            errors::operation_invalid(format!(
                "cannot create the serial log directory {}: {e}",
                own_dir.display()
            ))
        })?;
    }
    let qemu_log = agent.store.logs_dir().join(format!("{name}.qemu.log"));
    if agent.config.qemu_sandbox && !binary.has_sandbox() {
        tracing::warn!(
            qemu = %binary.path.display(),
            "this QEMU was built without seccomp: it runs without -sandbox"
        );
    }
    let taps = Taps::of(agent.store.root(), def);
    taps.create(def, agent.config.qemu_user.as_deref(), &agent.uri)
        .await?;
    let mut argv = build_argv(&LaunchConfig {
        definition: def,
        spec,
        qmp_socket: &qmp_socket,
        serial_log: &serial_log,
        incoming,
        taps: &taps.names,
        hardening: Hardening {
            sandbox: agent.config.qemu_sandbox && binary.has_sandbox(),
            user: agent.config.qemu_user.as_deref(),
            run_with: binary.has_run_with(),
            tls_credentials: agent.qemu_credentials.as_deref(),
        },
    });
    // An incoming guest also starts with its vCPUs stopped, so that it runs
    // only when Finish (or the switch to post-copy) says so, never merely
    // because QEMU received the last page.
    if paused || incoming {
        argv.push("-S".into());
    }
    let process = match agent
        .hypervisor
        .spawn(&argv, &qmp_socket, &qemu_log, agent.config.qemu_timeout)
        .await
    {
        Ok(process) => process,
        Err(e) => {
            taps.remove().await;
            return Err(errors::qemu(format!(
                "cannot start domain '{name}': {}",
                errors::chain(&e)
            )));
        }
    };
    tracing::info!(domain = %name, pid = process.pid(), incoming, "QEMU started");
    let vm = Arc::new(RunningVm {
        run_id: agent.next_run_id(),
        process,
        spec: spec.clone(),
        qmp_socket,
        serial_log,
        qemu_log,
        qemu_version: binary.version,
        taps,
        measurements: Default::default(),
    });
    watch_exit(agent.clone(), name.clone(), vm.clone());
    Ok(vm)
}

/// When QEMU exits on its own (guest shutdown, crash, kill), the domain
/// becomes shut off, and a transient one goes away; its run record goes
/// whoever took it out of the table.
pub(crate) fn watch_exit(agent: Arc<Agent>, name: DomainName, vm: Arc<RunningVm>) {
    let mut exit = vm.process.exit_watch();
    let run_id = vm.run_id;
    let socket = vm.qmp_socket.clone();
    let taps = vm.taps.clone();
    drop(vm);
    tokio::spawn(async move {
        let Ok(info) = exit.wait_for(Option::is_some).await.map(|i| *i) else {
            return;
        };
        let cleared = agent.table.vm_exited(&name, run_id);
        agent.store.remove_run_if(&name, run_id).await;
        taps.remove().await;
        let replaced = agent.table.runs_another_vm(&name, run_id);
        if !replaced {
            let _ = tokio::fs::remove_file(&socket).await;
        }
        if cleared {
            tracing::info!(domain = %name, exit = ?info, "QEMU exited");
            // Stopped here: the cluster no longer has it running here (a
            // domain handed over at switchover is not this host's to
            // release).
            if crate::membership::release(&agent, name.as_str()).await {
                agent.table.drop_if_transient_and_idle(&name);
            }
        }
    });
}
