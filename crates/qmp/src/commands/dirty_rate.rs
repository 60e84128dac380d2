//! Dirty-rate measurement (`calc-dirty-rate`, `query-dirty-rate`).

use serde::{Deserialize, Serialize};

use super::unit_command;
use crate::command::{Command, Empty};

/// How QEMU measures the dirty rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DirtyRateMode {
    PageSampling,
    DirtyRing,
    DirtyBitmap,
    #[serde(other)]
    Unknown,
}

/// `calc-dirty-rate`: start a measurement lasting `calc_time` seconds.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CalcDirtyRate {
    pub calc_time: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sample_pages: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
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
pub enum DirtyRateStatus {
    Unstarted,
    Measuring,
    Measured,
    #[serde(other)]
    Unknown,
}

/// The reply of `query-dirty-rate`; `dirty_rate` is in MiB/s.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct DirtyRateInfo {
    #[serde(default)]
    pub dirty_rate: Option<i64>,
    pub status: DirtyRateStatus,
    #[serde(default)]
    pub start_time: Option<i64>,
    #[serde(default)]
    pub calc_time: Option<i64>,
    #[serde(default)]
    pub sample_pages: Option<u64>,
    #[serde(default)]
    pub mode: Option<DirtyRateMode>,
}
