//! virsh's per-domain QEMU knobs outside a migration: measuring the dirty
//! rate (`domdirtyrate-calc`, read back by `domstats --dirtyrate`) and the
//! XBZRLE cache (`migrate-compcache`).

use std::sync::Arc;

use domain::DomainName;
use protocol::domain::DirtyRate;
use protocol::{ApiError, Reply};
use qmp::commands::dirty_rate::{CalcDirtyRate, DirtyRateMode, DirtyRateStatus, QueryDirtyRate};
use qmp::commands::migration::{MigrateSetParameters, MigrationParameters, QueryMigrateParameters};

use crate::errors;
use crate::state::Agent;

/// The longest window QEMU measures over.
const MAX_WINDOW_S: u32 = 60;

fn mode_of(name: Option<&str>) -> Result<Option<DirtyRateMode>, ApiError> {
    match name {
        None => Ok(None),
        Some("page-sampling") => Ok(Some(DirtyRateMode::PageSampling)),
        Some("dirty-bitmap") => Ok(Some(DirtyRateMode::DirtyBitmap)),
        Some("dirty-ring") => Ok(Some(DirtyRateMode::DirtyRing)),
        Some(other) => Err(errors::invalid(format!(
            "--mode {other:?}: page-sampling, dirty-bitmap or dirty-ring"
        ))),
    }
}

/// A running domain with no migration: a job measures the guest itself,
/// and QEMU runs one measurement at a time.
fn idle_vm(agent: &Agent, name: &DomainName) -> Result<Arc<crate::running::RunningVm>, ApiError> {
    if agent.table.get(name)?.job.is_some() {
        return Err(errors::operation_invalid(format!(
            "domain '{name}' is migrating: its job measures the dirty rate itself"
        )));
    }
    agent.table.vm(name)
}

/// Starts a measurement over `seconds`; QEMU answers at once.
pub(crate) async fn calc(
    agent: &Agent,
    name: &DomainName,
    seconds: u32,
    mode: Option<&str>,
) -> Result<Reply, ApiError> {
    if !(1..=MAX_WINDOW_S).contains(&seconds) {
        return Err(errors::invalid(format!(
            "--seconds must be between 1 and {MAX_WINDOW_S}, got {seconds}"
        )));
    }
    let mode = mode_of(mode)?;
    let vm = idle_vm(agent, name)?;
    // The agent's own measurement of the guest (`measurements`) ends in
    // seconds; QEMU would refuse this one meanwhile.
    vm.measurements.settle().await;
    let qmp = vm.process.qmp();
    let running = qmp
        .execute(&QueryDirtyRate)
        .await
        .map_err(|e| errors::qemu_failed(&e))?;
    if running.status == DirtyRateStatus::Measuring {
        return Err(errors::operation_invalid(format!(
            "domain '{name}' is being measured already; see `domstats --dirtyrate {name}`"
        )));
    }
    qmp.execute(&CalcDirtyRate {
        calc_time: i64::from(seconds),
        sample_pages: None,
        mode,
    })
    .await
    .map_err(|e| errors::qemu_failed(&e))?;
    Ok(Reply::Done)
}

/// The last measurement, as QEMU has it.
pub(crate) async fn last(agent: &Agent, name: &DomainName) -> Result<Reply, ApiError> {
    let vm = agent.table.vm(name)?;
    let info = vm
        .process
        .qmp()
        .execute(&QueryDirtyRate)
        .await
        .map_err(|e| errors::qemu_failed(&e))?;
    let mode = info.mode.map(|m| match m {
        DirtyRateMode::PageSampling => "page-sampling",
        DirtyRateMode::DirtyRing => "dirty-ring",
        DirtyRateMode::DirtyBitmap => "dirty-bitmap",
        DirtyRateMode::Unknown => "unknown",
    });
    let measured = info.status == DirtyRateStatus::Measured;
    Ok(Reply::DirtyRate(DirtyRate {
        status: match info.status {
            DirtyRateStatus::Unstarted => "unstarted",
            DirtyRateStatus::Measuring => "measuring",
            DirtyRateStatus::Measured => "measured",
            DirtyRateStatus::Unknown => "unknown",
        }
        .to_string(),
        start_time: info.start_time,
        calc_period_s: info.calc_time,
        mode: mode.map(str::to_string),
        mib_s: info.dirty_rate.filter(|_| measured),
        vcpus_mib_s: info
            .vcpu_dirty_rate
            .unwrap_or_default()
            .iter()
            .map(|v| v.dirty_rate)
            .collect(),
    }))
}

/// The XBZRLE cache's size, after setting it to `bytes` (a power of two
/// of at least a page, as QEMU takes it). A migration's
/// `--comp-xbzrle-cache` overrides it for that job only.
pub(crate) async fn compcache(
    agent: &Agent,
    name: &DomainName,
    bytes: Option<u64>,
) -> Result<Reply, ApiError> {
    if let Some(bytes) = bytes {
        if bytes < 4096 || !bytes.is_power_of_two() {
            return Err(errors::invalid(format!(
                "--size must be a power of two of at least 4096 bytes, got {bytes}"
            )));
        }
    }
    let vm = agent.table.vm(name)?;
    let qmp = vm.process.qmp();
    if let Some(bytes) = bytes {
        qmp.execute(&MigrateSetParameters(MigrationParameters {
            xbzrle_cache_size: Some(bytes),
            ..Default::default()
        }))
        .await
        .map_err(|e| errors::qemu_failed(&e))?;
    }
    let now = qmp
        .execute(&QueryMigrateParameters)
        .await
        .map_err(|e| errors::qemu_failed(&e))?;
    let bytes = now
        .xbzrle_cache_size
        .ok_or_else(|| errors::operation_invalid("QEMU has no xbzrle-cache-size parameter"))?;
    Ok(Reply::Compcache { bytes })
}
