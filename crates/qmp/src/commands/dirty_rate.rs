//! Dirty-rate measurement (`calc-dirty-rate`, `query-dirty-rate`).

use serde::{Deserialize, Serialize};

use super::unit_command;
use crate::command::{Command, Empty};

/// How QEMU measures the dirty rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DirtyRateMode {
    /// Sample pages and hash them (works everywhere).
    PageSampling,
    /// KVM's dirty ring.
    DirtyRing,
    /// The dirty bitmap.
    DirtyBitmap,
    #[serde(other)]
    /// A mode this crate does not know.
    Unknown,
}

/// `calc-dirty-rate`: start a measurement lasting `calc_time` seconds.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CalcDirtyRate {
    /// The window, seconds.
    pub calc_time: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// Pages sampled per GiB.
    pub sample_pages: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// How to measure.
    pub mode: Option<DirtyRateMode>,
}

impl Command for CalcDirtyRate {
    const NAME: &'static str = "calc-dirty-rate";
    type Reply = Empty;
}

unit_command!(
    /// `query-dirty-rate`
    QueryDirtyRate,
    "query-dirty-rate",
    DirtyRateInfo
);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
/// How a measurement stands.
pub enum DirtyRateStatus {
    /// None started.
    Unstarted,
    /// Under way.
    Measuring,
    /// Done.
    Measured,
    #[serde(other)]
    /// A state this crate does not know.
    Unknown,
}

/// The reply of `query-dirty-rate`; `dirty_rate` is in MiB/s.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct DirtyRateInfo {
    #[serde(default)]
    /// Dirty rate, MiB/s.
    pub dirty_rate: Option<i64>,
    /// How the measurement stands.
    pub status: DirtyRateStatus,
    #[serde(default)]
    /// When it started.
    pub start_time: Option<i64>,
    #[serde(default)]
    /// The window, seconds.
    pub calc_time: Option<i64>,
    #[serde(default)]
    /// Pages sampled per GiB.
    pub sample_pages: Option<u64>,
    #[serde(default)]
    /// How it measured.
    pub mode: Option<DirtyRateMode>,
    #[serde(default)]
    /// Each vCPU's dirty rate (`dirty-ring` mode only).
    pub vcpu_dirty_rate: Option<Vec<DirtyRateVcpu>>,
}

/// One vCPU's dirty rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct DirtyRateVcpu {
    /// The vCPU's index.
    pub id: i64,
    /// Its dirty rate, MiB/s.
    pub dirty_rate: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dirty_ring_measurement_carries_each_vcpus_rate() {
        // As QEMU 7.2 answered with a KVM dirty ring on this machine.
        let info: DirtyRateInfo = serde_json::from_str(
            r#"{"vcpu-dirty-rate": [{"dirty-rate": 384, "id": 0}, {"dirty-rate": 0, "id": 1}],
                "status": "measured", "sample-pages": 0, "dirty-rate": 384,
                "mode": "dirty-ring", "start-time": 12930, "calc-time": 1}"#,
        )
        .unwrap();
        assert_eq!(info.mode, Some(DirtyRateMode::DirtyRing));
        assert_eq!(
            info.vcpu_dirty_rate.unwrap(),
            [
                DirtyRateVcpu {
                    id: 0,
                    dirty_rate: 384
                },
                DirtyRateVcpu {
                    id: 1,
                    dirty_rate: 0
                }
            ]
        );
    }
}
