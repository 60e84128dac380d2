//! The disks' side of an estimate: how fast the guest writes each disk
//! (QEMU's block counters over the measurement) and whether copying the
//! disks a migration would have to copy converges at the link: a mirror
//! re-copies every block written while it runs, so a disk written as fast
//! as the link carries is never ready.

use std::collections::BTreeMap;

use domain::qemu::argv::drive_id;
use protocol::estimate::{AdaptiveDiskCopy, DiskCopyOutlook, DiskEstimate};
use qmp::commands::block::{QueryBlock, QueryBlockstats};
use qmp::Client;
use tokio::time::Instant;

use crate::storage::pace::{OUTRUN, TARGET};
use crate::vcpu_throttle::cgroup::MAX_HOST_THROTTLE;

/// What the estimate needs to know of a disk from the definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskFacts {
    /// The guest's name for it (`vda`).
    pub target: String,
    /// Both hosts see it: a migration does not copy it.
    pub shared: bool,
}

/// Bytes written per disk (by its `-drive` id) at one moment, and each
/// disk's size.
#[derive(Debug, Clone)]
pub(super) struct Counters {
    at: Instant,
    written: BTreeMap<String, u64>,
    sizes: BTreeMap<String, u64>,
}

/// Reads the guest's block counters and disk sizes now.
pub(super) async fn counters(qmp: &Client) -> Result<Counters, qmp::Error> {
    let stats = qmp.execute(&QueryBlockstats).await?;
    let blocks = qmp.execute(&QueryBlock).await?;
    Ok(Counters {
        at: Instant::now(),
        written: stats
            .iter()
            .map(|s| (s.device.clone(), s.stats.wr_bytes))
            .collect(),
        sizes: blocks
            .iter()
            .filter_map(|b| Some((b.device.clone(), b.inserted.as_ref()?.image.virtual_size)))
            .collect(),
    })
}

/// How long copying `size` bytes takes at `bandwidth` while the guest
/// writes `write_rate` to it, if it ever finishes; for a copy that does
/// not, what the adaptive controller's disk pacing ([`crate::storage::pace`])
/// would need: writes at or above [`OUTRUN`] of the link are never caught
/// up, and the pacing aims them at [`TARGET`] of it.
pub fn copy_outlook(size: u64, write_rate: f64, bandwidth: f64) -> DiskCopyOutlook {
    let converges = bandwidth > 0.0 && write_rate < OUTRUN * bandwidth;
    // Every byte written during the copy is copied again: the copy gains
    // on the disk at (bandwidth − writes). An upper bound: QEMU skips what
    // the image never allocated.
    let copy_secs = |writes: f64| size as f64 / (bandwidth - writes);
    DiskCopyOutlook {
        converges,
        copy_secs: converges.then(|| copy_secs(write_rate)),
        adaptive: (!converges && bandwidth > 0.0).then(|| AdaptiveDiskCopy {
            throttle_pct: ((1.0 - TARGET * bandwidth / write_rate) * 100.0)
                .clamp(0.0, MAX_HOST_THROTTLE * 100.0),
            copy_secs: copy_secs(TARGET * bandwidth),
        }),
    }
}

/// Each disk's write rate between `before` and `after`, and for those a
/// migration would copy, whether the copy converges at `bandwidth`.
pub(super) fn outlook(
    disks: &[DiskFacts],
    before: &Counters,
    after: &Counters,
    bandwidth: f64,
) -> Vec<DiskEstimate> {
    let secs = after.at.duration_since(before.at).as_secs_f64().max(1e-3);
    disks
        .iter()
        .map(|disk| {
            let drive = drive_id(&disk.target);
            let written = match (before.written.get(&drive), after.written.get(&drive)) {
                (Some(b), Some(a)) => a.saturating_sub(*b),
                _ => 0,
            };
            let write_rate = written as f64 / secs;
            let size = after.sizes.get(&drive).copied().unwrap_or(0);
            DiskEstimate {
                target: disk.target.clone(),
                shared: disk.shared,
                size_bytes: size,
                write_bytes_s: write_rate,
                copy: (!disk.shared).then(|| copy_outlook(size, write_rate, bandwidth)),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: f64 = 1024.0 * 1024.0;

    #[test]
    fn a_copy_converges_only_while_writes_leave_the_link_room() {
        let idle = copy_outlook(1 << 30, 0.0, 100.0 * MIB);
        assert!(idle.converges);
        assert!((idle.copy_secs.unwrap() - 10.24).abs() < 0.01);
        // Half the link for the guest's writes: twice as long.
        let busy = copy_outlook(1 << 30, 50.0 * MIB, 100.0 * MIB);
        assert!((busy.copy_secs.unwrap() - 20.48).abs() < 0.01);
        // As fast as the link (or nearly): never ready.
        for writes in [90.0, 100.0, 150.0] {
            let never = copy_outlook(1 << 30, writes * MIB, 100.0 * MIB);
            assert!(!never.converges && never.copy_secs.is_none(), "{writes}");
        }
        assert!(!copy_outlook(1, 0.0, 0.0).converges);
        assert_eq!(idle.adaptive, None);
    }

    #[test]
    fn a_copy_that_does_not_converge_says_what_throttle_would_make_it() {
        // 150 MiB/s of writes over a 100 MiB/s link: down to 50 MiB/s.
        let paced = copy_outlook(1 << 30, 150.0 * MIB, 100.0 * MIB)
            .adaptive
            .expect("an adaptive outlook");
        assert!(
            (paced.throttle_pct - 100.0 / 3.0 * 2.0).abs() < 0.01,
            "{paced:?}"
        );
        // Then the copy gains at half the link.
        assert!((paced.copy_secs - 20.48).abs() < 0.01, "{paced:?}");
    }

    #[test]
    fn rates_come_from_the_counters_and_shared_disks_are_not_copied() {
        let at = Instant::now();
        let counters = |secs: u64, vda: u64, vdb: u64| Counters {
            at: at + std::time::Duration::from_secs(secs),
            written: [
                ("drive-vda".to_string(), vda),
                ("drive-vdb".to_string(), vdb),
            ]
            .into(),
            sizes: [
                ("drive-vda".to_string(), 1 << 30),
                ("drive-vdb".to_string(), 1 << 20),
            ]
            .into(),
        };
        let disks = [
            DiskFacts {
                target: "vda".into(),
                shared: false,
            },
            DiskFacts {
                target: "vdb".into(),
                shared: true,
            },
        ];
        let out = outlook(
            &disks,
            &counters(0, 100, 0),
            &counters(4, 100 + (8 << 20), 4 << 20),
            16.0 * MIB,
        );
        assert_eq!(out[0].write_bytes_s, 2.0 * MIB);
        assert_eq!(out[0].size_bytes, 1 << 30);
        assert!(out[0].copy.unwrap().converges);
        assert_eq!(out[1].write_bytes_s, 1.0 * MIB);
        assert!(out[1].copy.is_none());
    }
}
