//! Conversions between the libraries' types and the protocol's, for what
//! crosses between agents or to the CLI.

use domain::qemu::{LaunchSpec, QemuBinary, RamLayout};
use protocol::{estimate, host, migrate};

/// A launch spec as it travels to the destination.
pub fn launch_spec(spec: &LaunchSpec) -> migrate::LaunchSpec {
    migrate::LaunchSpec {
        machine: spec.machine.clone(),
        accel: spec.accel,
        ram: migrate::RamLayout {
            bytes: spec.ram.bytes,
            backend: spec.ram.backend,
        },
    }
}

/// A launch spec as it arrives from the source.
pub fn launch_spec_from(spec: &migrate::LaunchSpec) -> LaunchSpec {
    LaunchSpec {
        machine: spec.machine.clone(),
        accel: spec.accel,
        ram: RamLayout {
            bytes: spec.ram.bytes,
            backend: spec.ram.backend,
        },
    }
}

/// A probed QEMU binary, as `domcapabilities` shows it.
pub fn qemu_info(binary: &QemuBinary) -> host::QemuInfo {
    host::QemuInfo {
        path: binary.path.display().to_string(),
        version: host::QemuVersion {
            major: binary.version.major,
            minor: binary.version.minor,
            micro: binary.version.micro,
        },
        package: binary.package.clone(),
        migration_capabilities: binary.migration_capabilities.clone(),
        migration_parameters: binary.migration_parameters.clone(),
        commands: binary.commands.clone(),
        machines: binary
            .machines
            .iter()
            .map(|m| host::MachineInfo {
                name: m.name.clone(),
                alias: m.alias.clone(),
            })
            .collect(),
        kvm_present: binary.kvm_present,
    }
}

/// A dirty-rate measurement.
pub fn dirty_sample(sample: &converge::estimate::Sample) -> estimate::DirtySample {
    estimate::DirtySample {
        window_secs: sample.window_secs,
        dirtied: sample.dirtied,
    }
}

/// A fitted model.
pub fn dirty_model(model: &converge::DirtyModel) -> estimate::DirtyModel {
    estimate::DirtyModel {
        rate: model.rate,
        working_set: model.working_set,
        rate_is_lower_bound: model.rate_is_lower_bound,
    }
}

fn prediction(p: &converge::Prediction) -> estimate::Prediction {
    estimate::Prediction {
        converges: p.converges,
        total_secs: p.total_secs,
        downtime_secs: p.downtime_secs,
        passes: p.passes,
        max_throttle: p.max_throttle,
        work_lost_secs: p.work_lost_secs,
        transferred: p.transferred,
    }
}

fn outlook(o: &converge::estimate::Outlook) -> estimate::Outlook {
    estimate::Outlook {
        none: prediction(&o.none),
        qemu: prediction(&o.qemu),
        adaptive: prediction(&o.adaptive),
    }
}

/// The predictions for each convergence policy.
pub fn predictions(p: &converge::estimate::Predictions) -> estimate::Predictions {
    estimate::Predictions {
        measured: outlook(&p.measured),
        worst_case: p.worst_case.as_ref().map(outlook),
    }
}

#[cfg(test)]
mod tests {
    use domain::Accel;

    use super::*;

    #[test]
    fn a_launch_spec_survives_the_trip() {
        let spec = LaunchSpec {
            machine: "pc-i440fx-7.2".into(),
            accel: Accel::Tcg,
            ram: RamLayout::for_domain(512, Accel::Tcg, qmp::QemuVersion::new(7, 2, 0)),
        };
        assert_eq!(launch_spec_from(&launch_spec(&spec)), spec);
    }
}
